"""The ODE engine shared by the likelihood and the sampler: torchdiffeq with a step cap, the
integration variable and the error norm.

Two choices shape the cost and accuracy of an adaptive solve beyond its tolerances, and both are
string-keyed registries (torchdiffeq's style):

* ``time_variable``: the variable the solver steps in.  ``"t"`` integrates the
  probability-flow ODE in diffusion time; ``"log_t"`` in ``u = log t`` (the right-hand side is
  multiplied by ``dt/du = t``), which spreads the small-noise end, where the data's fine
  structure is resolved, over as much of the interval as the rest.  The solution is the same;
  only the step placement changes.
* ``error_norm``: how the solver folds its per-element error estimate into the one number that
  accepts or rejects a step.  ``"row"`` takes, for each row, the RMS of the row's scaled errors
  (its ``d`` coordinates, and separately its log-density increment) and then the **largest over
  the rows**: every row is held to the tolerance on its own, so a row's accuracy no longer
  depends on which rows share its batch.  ``"mixed"`` is torchdiffeq's default, the RMS over
  all rows of a state tensor, maximised over the tensors: cheaper, but a few hard rows are
  averaged away by the easy ones and their error can exceed the tolerance many times over.

The measured trade-offs (per-row error against a tight float64 solve, evaluations, rows/s) are
in ``docs/benchmarks/engine.md``; the user guide's "Speed and accuracy" page says which setting
to use when.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from torchdiffeq import odeint

__all__: list[str] = []

#: torchdiffeq's adaptive methods (the ones that take ``max_num_steps``).
_ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
#: Default cap on the steps of one adaptive solve: far above what a trained model needs
#: (tens of steps), low enough that a diverging solve fails in seconds instead of hanging.
_MAX_NUM_STEPS = 10_000


class _TimeVariable:
    """A monotone map between the solver's variable ``u`` and diffusion time ``t``."""

    name: str

    def to_u(self, t: float) -> float:  # numpydoc ignore=PR01,RT01
        """``u(t)``."""
        raise NotImplementedError

    def to_t(self, u: Tensor) -> Tensor:  # numpydoc ignore=PR01,RT01
        """``t(u)``."""
        raise NotImplementedError

    def dt_du(self, t: Tensor) -> Tensor:  # numpydoc ignore=PR01,RT01
        """``dt/du`` at time ``t``."""
        raise NotImplementedError


class _Linear(_TimeVariable):
    name = "t"

    def to_u(self, t: float) -> float:
        return float(t)

    def to_t(self, u: Tensor) -> Tensor:
        return u

    def dt_du(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)


class _Log(_TimeVariable):
    name = "log_t"

    def to_u(self, t: float) -> float:
        if t <= 0:
            raise ValueError(f'time_variable="log_t" needs times > 0, got {t}')
        return math.log(t)

    def to_t(self, u: Tensor) -> Tensor:
        return torch.exp(u)

    def dt_du(self, t: Tensor) -> Tensor:
        return t


#: Integration variables by name (the ``time_variable`` of the likelihood and the sampler).
TIME_VARIABLES: dict[str, _TimeVariable] = {"t": _Linear(), "log_t": _Log()}


def time_variable(name: str) -> _TimeVariable:
    """The registered integration variable ``name`` (a clear error for an unknown one)."""
    try:
        return TIME_VARIABLES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown time_variable {name!r}; expected one of {sorted(TIME_VARIABLES)}"
        ) from None


def _row_rms(e: Tensor) -> Tensor:
    """Per-row RMS of a state tensor of shape ``(n,)`` or ``(n, ...)``."""
    if e.ndim == 1:
        return e.abs()
    return e.reshape(e.shape[0], -1).pow(2).mean(-1).sqrt()


def row_norm(errors: tuple[Tensor, ...] | Tensor) -> Tensor:
    """The largest per-row error over the rows (each state tensor's first axis is the row).

    Each tensor of the state contributes its per-row RMS (a row's coordinates together, its
    log-density increment alone); a row's error is the largest of its contributions, and the
    step's is the largest over the rows.
    """
    if isinstance(errors, Tensor):
        errors = (errors,)
    per_row = torch.stack([_row_rms(e) for e in errors]).amax(0)
    return per_row.amax() if per_row.numel() else per_row.new_zeros(())


#: Error norms by name (``None``: torchdiffeq's own default, the RMS over a tensor's elements,
#: maximised over the tensors of a tuple state).
ERROR_NORMS: dict[str, Callable[..., Tensor] | None] = {"row": row_norm, "mixed": None}


def check_error_norm(name: str) -> None:
    """Raise a ``ValueError`` naming the choices for an unknown ``error_norm``."""
    if name not in ERROR_NORMS:
        raise ValueError(f"unknown error_norm {name!r}; expected one of {sorted(ERROR_NORMS)}")


def odeint_checked(
    fn: Callable[..., Any],
    state0: Any,
    times: Tensor,
    *,
    rtol: float,
    atol: float,
    method: str,
    options: dict[str, Any] | None,
    max_num_steps: int | None,
    what: str,
    error_norm: str = "mixed",
) -> Any:
    """``torchdiffeq.odeint`` with a step cap and an error norm, failures as ``RuntimeError``.

    The error norm and the cap apply to the adaptive methods only (a fixed-step method has no
    error control).  A norm in ``options`` wins over ``error_norm``.
    """
    check_error_norm(error_norm)
    if method in _ADAPTIVE_METHODS:
        extra: dict[str, Any] = {}
        if max_num_steps is not None:
            extra["max_num_steps"] = int(max_num_steps)
        norm = ERROR_NORMS[error_norm]
        if norm is not None:
            extra["norm"] = norm
        options = {**extra, **(options or {})}
    try:
        return odeint(fn, state0, times, rtol=rtol, atol=atol, method=method, options=options)
    except AssertionError as exc:  # torchdiffeq reports step-size underflow and the cap so
        raise RuntimeError(
            f"the ODE solver failed on {what} ({exc}): the network output is not finite or "
            "the rows lie far outside the data it was trained on; a larger atol or a "
            "fixed-step solver may help"
        ) from exc
