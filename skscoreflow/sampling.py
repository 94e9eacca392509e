"""Sampling from a score model: reverse SDE (predictor-corrector) and probability-flow ODE.

* :func:`sde_sample`: Euler-Maruyama on the reverse-time SDE
  ``dx = [f - g^2 s] dt + g dw_bar`` from ``T`` to ``eps``, optionally with a Langevin
  corrector after each step.  The corrector's step size uses the signal-to-noise rule of
  Song et al. (``snr``) with the SDE's own ``alpha`` factor, so it works for VE, VP and sub-VP
  (the reference implementations read a VP-only attribute and fail for sub-VP).
* :func:`ode_sample`: integrates the probability-flow ODE from ``T`` to ``eps`` with an
  adaptive torchdiffeq solver.

Both finish with the denoising step: the Tweedie posterior mean
``(x + sigma(eps)^2 s(x, eps)) / alpha(eps)`` at ``t = eps`` (no added noise).

Examples
--------
>>> import torch
>>> from skscoreflow.sde import VPSDE
>>> score_fn = lambda x, t: -x  # N(0, I) data
>>> g = torch.Generator().manual_seed(0)
>>> x = ode_sample(score_fn, VPSDE(), 500, 2, generator=g)
>>> x.shape
torch.Size([500, 2])
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from ._ode import _MAX_NUM_STEPS, odeint_checked
from ._ode import time_variable as time_variable_
from .sde import SDE

__all__ = ["sde_sample", "ode_sample"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]

def _eps(sde: SDE, eps: float | None) -> float:
    return sde.sampling_eps if eps is None else float(eps)


def _denoise(score_fn: ScoreFn, x: Tensor, sde: SDE, t: float) -> Tensor:
    """Tweedie denoiser ``E[x_0 | x_t] = (x + sigma^2 s(x, t)) / alpha`` at time ``t``.

    Parameters
    ----------
    score_fn : callable
        ``score_fn(x, t) -> Tensor``.
    x : Tensor of shape (n, d)
        Noisy points ``x_t``.
    sde : SDE
        The forward SDE.
    t : float
        Their diffusion time.

    Returns
    -------
    Tensor of shape (n, d)
        The posterior mean of the clean data.

    Examples
    --------
    >>> import torch
    >>> from skscoreflow.sde import VPSDE
    >>> x = torch.ones(1, 2, dtype=torch.float64)
    >>> _denoise(lambda x, t: -x, x, VPSDE(), 0.5)  # N(0, I) data: E[x_0 | x_t] = alpha x_t
    tensor([[0.2812, 0.2812]], dtype=torch.float64)
    """
    tt = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    alpha = sde.mean_coeff(tt)[:, None]
    sigma = sde.std(tt)[:, None]
    return (x + sigma**2 * score_fn(x, tt)) / alpha


@torch.no_grad()
def sde_sample(
    score_fn: ScoreFn,
    sde: SDE,
    n_samples: int,
    n_features: int,
    *,
    n_steps: int = 1000,
    eps: float | None = None,
    corrector: bool = False,
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    denoise_final: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Reverse-SDE sampling: Euler-Maruyama predictor and optional Langevin corrector.

    Parameters
    ----------
    score_fn : callable
        ``score_fn(x, t) -> Tensor``.
    sde : SDE
        The forward SDE.
    n_samples : int
        Number of samples.
    n_features : int
        Data dimension.
    n_steps : int
        Number of predictor steps from ``T`` to ``eps``.
    eps : float, optional
        Final time; the SDE's ``sampling_eps`` when None.
    corrector : bool
        Run ``n_corrector_steps`` Langevin steps after each predictor step.
    snr : float
        Signal-to-noise ratio of the corrector.
    n_corrector_steps : int
        Langevin steps per predictor step when ``corrector``.
    denoise_final : bool
        Finish with the Tweedie denoising step.
    generator : torch.Generator, optional
        Source of randomness.
    device : torch.device or str, optional
        Device of the samples.
    dtype : torch.dtype, default=torch.float32
        Floating-point type of the samples.

    Returns
    -------
    Tensor of shape (n_samples, n_features)
        The samples.

    Examples
    --------
    >>> import torch
    >>> from skscoreflow.sde import VPSDE
    >>> g = torch.Generator().manual_seed(0)
    >>> x = sde_sample(lambda x, t: -x, VPSDE(), 2000, 2, n_steps=200, generator=g)
    >>> round(float(x.std()), 1)  # samples of N(0, I)
    1.0
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    eps = _eps(sde, eps)
    x = sde.prior_sample((n_samples, n_features), generator=generator, device=device, dtype=dtype)
    times = torch.linspace(sde.T, eps, n_steps + 1, dtype=dtype, device=device)
    for i in range(n_steps):
        t, dt = times[i], float(times[i] - times[i + 1])
        tt = t.expand(n_samples)
        if corrector:
            for _ in range(n_corrector_steps):
                x = _langevin_step(score_fn, sde, x, tt, dt, snr, generator)
        g2 = sde.diffusion_squared(t)
        drift = sde.drift(x, tt) - g2 * score_fn(x, tt)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x - drift * dt + torch.sqrt(g2 * dt) * noise
    if denoise_final:
        x = _denoise(score_fn, x, sde, eps)
    return x


def _langevin_step(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    t: Tensor,
    dt: float,
    snr: float,
    generator: torch.Generator | None,
) -> Tensor:
    score = score_fn(x, t)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    grad_norm = score.reshape(x.shape[0], -1).norm(dim=-1).mean()
    noise_norm = noise.reshape(x.shape[0], -1).norm(dim=-1).mean()
    alpha = sde.langevin_alpha(t, dt)[:, None]
    step = 2 * alpha * (snr * noise_norm / grad_norm.clamp_min(1e-12)) ** 2
    return x + step * score + torch.sqrt(2 * step) * noise


@torch.no_grad()
def ode_sample(
    score_fn: ScoreFn,
    sde: SDE,
    n_samples: int,
    n_features: int,
    *,
    eps: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    options: dict[str, Any] | None = None,
    denoise_final: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    max_num_steps: int | None = _MAX_NUM_STEPS,
    time_variable: str = "t",
    error_norm: str = "mixed",
) -> Tensor:
    """Probability-flow ODE sampling from ``T`` to ``eps``, then the denoising step.

    Parameters
    ----------
    score_fn : callable
        ``score_fn(x, t) -> Tensor``.
    sde : SDE
        The forward SDE.
    n_samples : int
        Number of samples.
    n_features : int
        Data dimension.
    eps : float, optional
        Final time; the SDE's ``sampling_eps`` when None.
    rtol : float
        Relative tolerance of the adaptive solver.
    atol : float
        Absolute tolerance of the adaptive solver.
    method : str
        torchdiffeq solver.
    options : dict, optional
        Solver options passed to ``torchdiffeq.odeint``.
    denoise_final : bool
        Finish with the Tweedie denoising step.
    generator : torch.Generator, optional
        Source of the prior draws.
    device : torch.device or str, optional
        Device of the samples.
    dtype : torch.dtype, default=torch.float32
        Floating-point type of the samples.
    max_num_steps : int or None, default=10000
        Cap on the solver's steps (None: no cap); see
        :func:`~skscoreflow.likelihood.ode_log_likelihood`.
    time_variable : {"t", "log_t"}, default="t"
        Variable the solver steps in (a fixed-step solver's ``step_size`` is in its units).
        ``"log_t"`` places the steps evenly in ``log t``, where the flow is smooth, and needs far
        fewer network evaluations for samples of the same quality
        (``ScoreFlowDensity.sample`` uses it; see ``docs/benchmarks/engine.md``).
    error_norm : {"mixed", "row"}, default="mixed"
        The adaptive solver's error norm (see
        :func:`~skscoreflow.likelihood.ode_log_likelihood`); samples are judged as a whole, so
        the default is torchdiffeq's RMS over all rows.

    Returns
    -------
    Tensor of shape (n_samples, n_features)
        The samples.

    Examples
    --------
    >>> import torch
    >>> from skscoreflow.sde import VPSDE
    >>> g = torch.Generator().manual_seed(0)
    >>> x = ode_sample(lambda x, t: -x, VPSDE(), 2000, 2, generator=g)
    >>> round(float(x.std()), 1)  # samples of N(0, I)
    1.0
    """
    eps = _eps(sde, eps)
    tv = time_variable_(time_variable)
    x = sde.prior_sample((n_samples, n_features), generator=generator, device=device, dtype=dtype)

    def ode_fn(u: Tensor, xs: Tensor) -> Tensor:
        # torchdiffeq's initial step selection may probe beyond the interval (t < 0, where the
        # kernel std is undefined); clamping only affects that trial evaluation.
        t = tv.to_t(u).clamp(eps, sde.T)
        tt = t.expand(xs.shape[0])
        drift = sde.ode_drift(xs, tt, score_fn(xs, tt))
        return drift if tv.name == "t" else drift * tv.dt_du(t)

    times = torch.tensor([tv.to_u(sde.T), tv.to_u(eps)], dtype=dtype, device=device)
    x = odeint_checked(
        ode_fn, x, times, rtol=rtol, atol=atol, method=method, options=options,
        max_num_steps=max_num_steps, what="the sampling ODE", error_norm=error_norm,
    )[-1]
    if denoise_final:
        x = _denoise(score_fn, x, sde, eps)
    return x


#: Samplers by name: the ``method`` values of ``ScoreFlowDensity.sample``.
_SAMPLERS: dict[str, Callable[..., Tensor]] = {"ode": ode_sample, "sde": sde_sample}
