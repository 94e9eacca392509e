"""Exact log-likelihood through the probability-flow ODE.

The probability-flow ODE ``dx/dt = f(x, t) - g(t)^2 s(x, t) / 2`` is a continuous
normalising flow.  Integrating the augmented state ``[x, Δ]`` with
``dΔ/dt = div_x(f - g^2 s / 2)`` forward from ``t = eps`` (data) to ``t = T`` (noise) gives

    log p_eps(x) = log pi(x(T)) + Δ(T)

(spec §7; the prior is evaluated at the ODE's end point).  The drift ``f`` is linear, so its
divergence is added in closed form and only ``div s`` is estimated:

* ``"exact"``: the trace of the score's Jacobian, from one forward pass and one backward pass
  per basis vector through its graph on the CPU, ``d`` stacked copies of the batch on a GPU
  (no Python loop over samples in either);
* ``"hutchinson"``: Skilling-Hutchinson ``v^T J v`` with ``n_probes`` Rademacher (or Gaussian)
  probes per row, drawn once per solve and held fixed for every solver step (resampling them
  inside an adaptive solve breaks its step control);
* ``"auto"``: exact up to ``exact_max_dim`` dimensions, Hutchinson above.

Rows are evaluated in chunks so memory stays bounded for any number of rows.  Tolerances follow
the paper's evaluation (``rtol = atol = 1e-5`` with Dormand-Prince ``dopri5``; torchdiffeq's own
defaults are tighter, 1e-7 / 1e-9).  torchdiffeq shares one adaptive step size across the rows
of a chunk; the default ``error_norm="row"`` makes the largest per-row error decide each step,
so every row meets the tolerances whatever rows share its chunk, and a row's value depends on
its batch mates only within the solver's accuracy (``docs/benchmarks/engine.md`` measures the
per-row error against a tight float64 solve).  For results equal to rounding across subsets,
use a fixed-step solver (``method="rk4"``, ``options={"step_size": ...}``) in float64 (BLAS may
still pick other kernels for another batch size).

Examples
--------
>>> import torch
>>> from skscoreflow.sde import VPSDE
>>> sde = VPSDE()
>>> score_fn = lambda x, t: -x  # exact score of N(0, I) data under VP
>>> x = torch.zeros(3, 2, dtype=torch.float64)
>>> ll = ode_log_likelihood(score_fn, x, sde)
>>> [round(v, 4) for v in ll.tolist()]  # log N(0; 0, I_2) = -log(2 pi) = -1.8379
[-1.8379, -1.8379, -1.8379]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from ._ode import _MAX_NUM_STEPS, check_error_norm, odeint_checked
from ._ode import time_variable as time_variable_
from .sde import SDE

__all__ = ["ode_log_likelihood", "ODEInfo"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]

#: Divergence estimators accepted by ``divergence=`` (ODE likelihood and estimator).
_DIVERGENCES = ("auto", "exact", "hutchinson")
_PROBES = ("rademacher", "gaussian")
#: ``divergence="auto"`` uses the exact trace up to this many dimensions.
_EXACT_MAX_DIM = 16
@dataclass
class ODEInfo:
    """Diagnostics of one :func:`ode_log_likelihood` call.

    Parameters
    ----------
    nfe : list of int, optional
        See Attributes.
    divergence : str, default="exact"
        See Attributes.
    prior_log_prob, delta_log_prob : Tensor or None, default=None
        See Attributes.

    Attributes
    ----------
    nfe : list of int
        Number of ODE function evaluations for each chunk of rows.
    divergence : str
        The divergence estimator used ("exact" or "hutchinson").
    prior_log_prob : Tensor
        ``log pi(x(T))`` per row.
    delta_log_prob : Tensor
        ``∫ div(f - g^2 s / 2) dt`` per row.

    Examples
    --------
    >>> import torch
    >>> from skscoreflow.sde import VPSDE
    >>> x = torch.zeros(4, 2, dtype=torch.float64)
    >>> ll, info = ode_log_likelihood(lambda x, t: -x, x, VPSDE(), return_info=True)
    >>> info.divergence, len(info.nfe), info.total_nfe > 0
    ('exact', 1, True)
    >>> bool(torch.allclose(ll, info.prior_log_prob + info.delta_log_prob))
    True
    """

    nfe: list[int] = field(default_factory=list)
    divergence: str = "exact"
    prior_log_prob: Tensor | None = None
    delta_log_prob: Tensor | None = None

    @property
    def total_nfe(self) -> int:
        """Function evaluations summed over the chunks."""
        return int(sum(self.nfe))


def _make_probes(
    n: int,
    d: int,
    kind: str,
    n_probes: int = 1,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Probe vectors of shape ``(k, n, d)``.

    ``kind="exact"`` gives the ``d`` basis vectors (``k = d``); ``"rademacher"`` and
    ``"gaussian"`` give ``n_probes`` random probes per row.
    """
    if kind == "exact":
        eye = torch.eye(d, device=device, dtype=dtype)
        return eye[:, None, :].expand(d, n, d)
    if kind == "rademacher":
        v = torch.randint(0, 2, (n_probes, n, d), generator=generator, device=device)
        return (2 * v - 1).to(dtype)
    if kind == "gaussian":
        return torch.randn((n_probes, n, d), generator=generator, device=device, dtype=dtype)
    raise ValueError(f"unknown probe {kind!r}; expected 'exact' or one of {_PROBES}")


def _vectorise_probes(device: torch.device) -> bool:
    """Whether :func:`_divergence` shares one forward pass among the probes on ``device``.

    On the CPU it does: one forward pass, then one backward pass per probe through the same
    graph (``retain_graph``), about half the work of pushing ``k`` stacked copies of the batch
    through both passes.  A single backward vectorised over the probes
    (``is_grads_batched``) does the same arithmetic but falls back to per-probe loops and
    copies inside several backward kernels (SiLU, layer norm), so the plain loop is faster
    (measured in the user guide's divergence section).  On a GPU the
    ``k`` stacked copies form one wide batch that the device runs in parallel, so GPUs keep
    them (``docs/user_guide/gpu.rst`` and ``docs/benchmarks/speed_gpu.md``).
    """
    return device.type == "cpu"


def _divergence(
    fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    t: Tensor,
    probes: Tensor,
    *,
    exact: bool = False,
    create_graph: bool = False,
) -> tuple[Tensor, Tensor]:
    """Value and divergence estimate of ``fn`` at ``x`` from fixed probes.

    Computes ``fn(x, t)`` and ``sum_k v_k^T J v_k / m`` where ``J = d fn / d x`` and ``m = k``
    for random probes (an unbiased estimate of the trace) or ``m = 1`` for the basis probes of
    ``exact=True`` (the exact trace).  On the CPU: one forward pass, then one backward pass per
    probe through the retained graph; on other devices ``k`` stacked copies of the batch
    through both passes, which a GPU runs as one wide batch (faster there, see
    ``_vectorise_probes``).

    Parameters
    ----------
    fn : callable
        Row-wise function ``(x (n, d), t (n,)) -> (n, d)``.
    x : Tensor of shape (n, d)
        Points at which to evaluate.
    t : Tensor of shape (n,)
        Times passed to ``fn``.
    probes : Tensor of shape (k, n, d)
        From :func:`_make_probes`.
    exact : bool
        The probes are the ``d`` basis vectors: sum instead of average.
    create_graph : bool
        Keep the graph (for training through the divergence).

    Returns
    -------
    value : Tensor of shape (n, d)
        ``fn(x, t)``.
    div : Tensor of shape (n,)
        The divergence (exact trace or Hutchinson estimate) per row.

    Examples
    --------
    >>> import torch
    >>> fn = lambda x, t: 3.0 * x  # Jacobian 3 I: divergence 3 d
    >>> x, t = torch.randn(5, 4), torch.zeros(5)
    >>> _, div = _divergence(fn, x, t, _make_probes(5, 4, "exact"), exact=True)
    >>> div.tolist()
    [12.0, 12.0, 12.0, 12.0, 12.0]
    >>> g = torch.Generator().manual_seed(0)
    >>> _, div = _divergence(fn, x, t, _make_probes(5, 4, "rademacher", generator=g))
    >>> div.tolist()  # v^T (3 I) v = 3 |v|^2 = 12 for Rademacher probes
    [12.0, 12.0, 12.0, 12.0, 12.0]
    """
    k = probes.shape[0]
    if k > 1 and not _vectorise_probes(x.device):
        return _divergence_stacked(fn, x, t, probes, exact, create_graph)
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        out = fn(xr, t)
        quad = out.new_zeros(out.shape[0])
        # exact: probes[i] is the i-th basis vector of every row (_make_probes("exact")).
        assert not exact or k == x.shape[1], "exact divergence needs the d basis probes"
        for i in range(k):
            # One backward pass per probe through the one forward graph.
            (vjp,) = torch.autograd.grad(
                out, xr, probes[i], create_graph=create_graph,
                retain_graph=create_graph or i < k - 1,
            )
            if exact:  # e_i^T J e_i: only the i-th coordinate of the VJP is needed
                quad = quad + vjp[:, i]
            else:
                quad = quad + (vjp * probes[i]).sum(-1)
    value = out
    if not create_graph:
        value = value.detach()
        quad = quad.detach()
    return value, (quad if exact else quad / k)


def _divergence_stacked(
    fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    t: Tensor,
    probes: Tensor,
    exact: bool,
    create_graph: bool,
) -> tuple[Tensor, Tensor]:
    """:func:`divergence` through ``k`` stacked copies of the batch (a plain backward pass)."""
    k, n, d = probes.shape
    with torch.enable_grad():
        xr = x.detach().unsqueeze(0).expand(k, n, d).reshape(k * n, d).requires_grad_(True)
        out = fn(xr, t.unsqueeze(0).expand(k, n).reshape(k * n))
        v = probes.reshape(k * n, d)
        (vjp,) = torch.autograd.grad((out * v).sum(), xr, create_graph=create_graph)
    quad = (vjp * v).sum(-1).reshape(k, n)
    value = out.reshape(k, n, d)[0]
    if not create_graph:
        value, quad = value.detach(), quad.detach()
    return value, (quad.sum(0) if exact else quad.mean(0))


def _resolve_divergence(divergence_: str, d: int, exact_max_dim: int) -> str:
    if divergence_ not in _DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence_!r}; expected one of {_DIVERGENCES}")
    if divergence_ == "auto":
        return "exact" if d <= exact_max_dim else "hutchinson"
    return divergence_


def _default_chunk_size(
    n_probe_copies: int, device: torch.device | str = "cpu", budget: int | None = None
) -> int:
    """Rows per chunk so that ``rows * probes`` stays near ``budget`` (per device).

    The CPU runs one backward pass per probe on the chunk's rows, so a chunk of ``budget / d``
    rows keeps every pass large enough to amortise the per-operation overhead, capped at 8,192
    rows, beyond which larger passes stop paying at small ``d`` while the memory of the graph
    grows.  GPUs stack the probes into one batch of ``rows * probes`` inputs, kept near 16,384.
    """
    if budget is None:
        budget = 2**16 if torch.device(device).type == "cpu" else 2**14
    rows = max(1, budget // max(1, n_probe_copies))
    return min(rows, 8192) if torch.device(device).type == "cpu" else rows


def ode_log_likelihood(
    score_fn: ScoreFn,
    x: Tensor,
    sde: SDE,
    *,
    eps: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    options: dict[str, Any] | None = None,
    divergence: str = "auto",
    probe: str = "rademacher",
    n_probes: int = 1,
    exact_max_dim: int = _EXACT_MAX_DIM,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    return_info: bool = False,
    max_num_steps: int | None = _MAX_NUM_STEPS,
    error_norm: str = "row",
    time_variable: str = "t",
) -> Tensor | tuple[Tensor, ODEInfo]:
    """Per-row log-density (nats) of the probability-flow ODE model.

    Parameters
    ----------
    score_fn : callable
        ``score_fn(x, t) -> Tensor`` with ``x`` of shape ``(n, d)``, ``t`` of shape ``(n,)``.
    x : Tensor of shape (n, d)
        Points to evaluate, on the device and in the dtype to integrate with.
    sde : SDE
        The forward SDE whose probability-flow ODE is integrated.
    eps : float, optional
        Start time of the integration; the SDE's ``default_eps`` when None.
    rtol, atol : float
        Tolerances of the adaptive solver (paper: 1e-5).
    method : str
        Any torchdiffeq method ("dopri5", "dopri8", "bosh3", "rk4", "euler", ...).
    options : dict, optional
        Solver options passed to ``torchdiffeq.odeint`` (e.g. ``{"step_size": 0.01}``).
    divergence : {"auto", "exact", "hutchinson"}
    probe : {"rademacher", "gaussian"}
        Hutchinson probe distribution.
    n_probes : int
        Hutchinson probes per row (averaged; fixed for the whole solve).
    exact_max_dim : int
        Largest dimension for which ``"auto"`` picks the exact trace.
    chunk_size : int, optional
        Rows per solve; by default (CPU) 65,536 backward-pass inputs (rows × probes) per
        function evaluation and at most 8,192 rows, (GPU) about 16,384 inputs.
    generator : torch.Generator, optional
        Source of the Hutchinson probes (a fresh generator seeded with 0 when None, so results
        are reproducible).
    return_info : bool
        Also return an :class:`ODEInfo` with the function-evaluation counts.
    max_num_steps : int or None, default=10000
        Cap on the steps of each adaptive solve (None: no cap); exceeding it, or a step-size
        underflow, raises a ``RuntimeError`` naming the rows instead of running on.
    error_norm : {"row", "mixed"}, default="row"
        How an adaptive solver measures a step's error: ``"row"`` holds every row to the
        tolerances on its own (the largest per-row error decides), so a row's result does not
        depend on its batch mates beyond the solver's accuracy; ``"mixed"`` is torchdiffeq's
        RMS over all rows, cheaper but blind to a few hard rows (the earlier behaviour).
    time_variable : {"t", "log_t"}, default="t"
        Variable the solver steps in: diffusion time, or its logarithm (more steps near
        ``eps``).  The value is the same up to the solver's accuracy.

    Returns
    -------
    log_likelihood : Tensor of shape (n,)
        ``log p_eps(x)`` of the probability-flow ODE model, in nats.
    info : ODEInfo
        Diagnostics; only returned when ``return_info``.

    See Also
    --------
    skscoreflow.bound.likelihood_bound : The cheaper Theorem-3 bound of the SDE model.

    Examples
    --------
    >>> import torch
    >>> from skscoreflow.sde import VPSDE
    >>> x = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    >>> exact = ode_log_likelihood(lambda x, t: -x, x, VPSDE(), divergence="exact")
    >>> [round(v, 3) for v in exact.tolist()]  # log N(x; 0, I_2)
    [-1.838, -2.838]
    >>> hutch = ode_log_likelihood(lambda x, t: -x, x, VPSDE(), divergence="hutchinson")
    >>> bool(torch.allclose(exact, hutch, atol=1e-3))  # exact here: the score is linear
    True
    """
    if x.ndim != 2:
        raise ValueError(f"x must have shape (n_samples, n_features), got {tuple(x.shape)}")
    if probe not in _PROBES:
        raise ValueError(f"unknown probe {probe!r}; expected one of {_PROBES}")
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    n, d = x.shape
    eps = sde._resolve_eps(eps)
    check_error_norm(error_norm)
    tv = time_variable_(time_variable)
    kind = _resolve_divergence(divergence, d, exact_max_dim)
    copies = d if kind == "exact" else n_probes
    if chunk_size is None:
        chunk_size = _default_chunk_size(copies, x.device)
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0)

    times = torch.tensor([tv.to_u(eps), tv.to_u(sde.T)], dtype=x.dtype, device=x.device)
    info = ODEInfo(divergence=kind)
    out, prior_lp, delta_lp = [], [], []
    for start in range(0, n, chunk_size):
        xc = x[start : start + chunk_size].detach()
        m = xc.shape[0]
        probes = _make_probes(
            m,
            d,
            "exact" if kind == "exact" else probe,
            n_probes,
            generator=generator,
            device=x.device,
            dtype=x.dtype,
        )
        nfe = [0]

        def ode_fn(u: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            nfe[0] += 1
            xs = state[0]
            t = tv.to_t(u)
            score, div_s = _divergence(
                score_fn, xs, t.expand(xs.shape[0]), probes, exact=kind == "exact"
            )
            # The SDE's own probability-flow drift and its divergence (t is a scalar here).
            dx, ddelta = sde.ode_drift(xs, t, score), sde.ode_drift_divergence(t, d, div_s)
            if tv.name == "t":
                return dx, ddelta
            dt_du = tv.dt_du(t)
            return dx * dt_du, ddelta * dt_du

        state0 = (xc, torch.zeros(m, dtype=x.dtype, device=x.device))
        with torch.no_grad():
            xs, delta = odeint_checked(
                ode_fn, state0, times, rtol=rtol, atol=atol, method=method, options=options,
                max_num_steps=max_num_steps, what=f"rows {start}..{start + m - 1}",
                error_norm=error_norm,
            )
        x_T, delta_T = xs[-1], delta[-1]
        plp = sde.prior_log_prob(x_T)
        out.append(plp + delta_T)
        prior_lp.append(plp)
        delta_lp.append(delta_T)
        info.nfe.append(nfe[0])
    result = torch.cat(out) if out else x.new_zeros(0)
    if not return_info:
        return result
    info.prior_log_prob = torch.cat(prior_lp) if prior_lp else x.new_zeros(0)
    info.delta_log_prob = torch.cat(delta_lp) if delta_lp else x.new_zeros(0)
    return result, info


