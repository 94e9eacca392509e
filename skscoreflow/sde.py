"""Forward SDEs of score-based diffusion: VE, VP and sub-VP.

Each SDE ``dx = f(x, t) dt + g(t) dw`` on ``t in [0, T]`` (``T = 1``) has a Gaussian
perturbation kernel ``p_0t(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I)`` and a Gaussian prior
``pi = N(0, prior_std^2 I)``.  Besides those, every SDE here gives the closed-form
importance-sampling proposal ``p_IS(t) ∝ g(t)^2 / sigma(t)^2`` on ``[eps, T]`` used by
likelihood-weighted training and by the likelihood bound (Song et al. 2021, "Maximum
Likelihood Training of Score-Based Diffusion Models", section 5).

Precision: all small-``t`` quantities use ``expm1`` / ``log1p`` forms.  The naive float32
``sqrt(1 - exp(-B))`` for the VP std is 2.4 % wrong at ``t = 1e-5``; the forms below are
accurate to float32 rounding.  Importance-sampling CDFs and their inverses are evaluated in
float64 and cast back.

Examples
--------
>>> import torch
>>> from skscoreflow.sde import get_sde
>>> sde = get_sde("vp")
>>> float(sde.std(torch.tensor(1e-5)))  # doctest: +ELLIPSIS
0.00100...
>>> round(float(sde.importance_normalizer(1e-5)), 4)
23.8645
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

__all__ = ["SDE", "VESDE", "VPSDE", "SubVPSDE", "get_sde", "SDES"]


def _as_tensor(t: Tensor | float, like: Tensor | None = None) -> Tensor:
    if isinstance(t, Tensor):
        return t
    if like is not None:
        return torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return torch.as_tensor(t, dtype=torch.get_default_dtype())


def _log_expm1(x: Tensor) -> Tensor:
    """``log(exp(x) - 1)`` for ``x > 0``, accurate for small and large ``x``."""
    # For large x, exp(x) - 1 overflows; log(exp(x) - 1) = x + log1p(-exp(-x)).
    return torch.where(x > 20.0, x + torch.log1p(-torch.exp(-x)), torch.log(torch.expm1(x)))


def _batch_view(t: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample times ``t`` (shape ``(n,)`` or scalar) to broadcast against ``x``."""
    if t.ndim == 0:
        return t
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


class SDE(ABC):
    """Base class of the forward SDEs.

    Subclasses implement the drift, the diffusion and the perturbation kernel; the base class
    derives the probability-flow ODE drift, the prior and the importance-sampling proposal.

    Attributes
    ----------
    T : float
        End time of the diffusion (1).
    default_eps : float
        Default lower time cutoff for training and likelihood.
    name : str
        Registry key ("ve", "vp" or "subvp").
    prior_std : float
        Standard deviation of the Gaussian prior ``pi = N(0, prior_std^2 I)``.

    See Also
    --------
    VPSDE, SubVPSDE, VESDE : The concrete SDEs.
    get_sde : Build one by name.

    Examples
    --------
    >>> import torch
    >>> sde = VPSDE()  # any subclass
    >>> t = torch.tensor([1e-5, 0.5, 1.0], dtype=torch.float64)
    >>> [round(v, 4) for v in sde.std(t).tolist()]
    [0.001, 0.9597, 1.0]
    >>> x = sde.perturb(torch.ones(3, 2, dtype=torch.float64), t, torch.zeros(3, 2, dtype=torch.float64))
    >>> x.shape
    torch.Size([3, 2])
    """

    T: float = 1.0
    default_eps: float = 1e-5
    name: str = ""

    # ------------------------------------------------------------------ kernel and dynamics
    @abstractmethod
    def log_mean_coeff(self, t: Tensor) -> Tensor:
        """``log alpha(t)``, the log of the kernel's mean coefficient.

        Parameters
        ----------
        t : Tensor
            Time(s) in ``[0, T]``: a scalar or shape ``(n,)``.

        Returns
        -------
        Tensor
            Same shape as ``t``.
        """

    def mean_coeff(self, t: Tensor) -> Tensor:
        """``alpha(t)``: ``E[x_t | x_0] = alpha(t) x_0``.

        Parameters
        ----------
        t : Tensor
            Time(s) in ``[0, T]``: a scalar or shape ``(n,)``.

        Returns
        -------
        Tensor
            Same shape as ``t``.
        """
        return torch.exp(self.log_mean_coeff(t))

    @abstractmethod
    def std(self, t: Tensor) -> Tensor:
        """``sigma(t)``: the std of the perturbation kernel ``p_0t``.

        Parameters
        ----------
        t : Tensor
            Time(s) in ``[0, T]``: a scalar or shape ``(n,)``.

        Returns
        -------
        Tensor
            Same shape as ``t``.
        """

    @abstractmethod
    def diffusion_squared(self, t: Tensor) -> Tensor:
        """``g(t)^2``, the squared diffusion coefficient.

        Parameters
        ----------
        t : Tensor
            Time(s) in ``[0, T]``: a scalar or shape ``(n,)``.

        Returns
        -------
        Tensor
            Same shape as ``t``.
        """

    def diffusion(self, t: Tensor) -> Tensor:
        """``g(t)``, the diffusion coefficient.

        Parameters
        ----------
        t : Tensor
            Time(s) in ``[0, T]``: a scalar or shape ``(n,)``.

        Returns
        -------
        Tensor
            Same shape as ``t``.
        """
        return torch.sqrt(self.diffusion_squared(t))

    @abstractmethod
    def drift_coeff(self, t: Tensor) -> Tensor:
        """Coefficient of the linear drift ``f(x, t) = drift_coeff(t) * x``.

        Parameters
        ----------
        t : Tensor
            Time(s) in ``[0, T]``: a scalar or shape ``(n,)``.

        Returns
        -------
        Tensor
            Same shape as ``t``.
        """

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """Drift ``f(x, t)``.

        Parameters
        ----------
        x : Tensor of shape (n, d)
            States.
        t : Tensor
            Time: a scalar or shape ``(n,)``.

        Returns
        -------
        Tensor of shape (n, d)
            ``drift_coeff(t) * x``.
        """
        return _batch_view(self.drift_coeff(t), x) * x

    def drift_divergence(self, t: Tensor, dim: int) -> Tensor:
        """``div_x f(x, t)`` (exact: the drift is linear, so it does not depend on ``x``).

        Parameters
        ----------
        t : Tensor
            Time(s) in ``[0, T]``: a scalar or shape ``(n,)``.
        dim : int
            Data dimension ``d``.

        Returns
        -------
        Tensor
            Same shape as ``t``: ``drift_coeff(t) * dim``.
        """
        return self.drift_coeff(t) * dim

    @abstractmethod
    def drift_divergence_integral(self, eps: float, dim: int) -> float:
        """``∫_eps^T div f dt`` in closed form (used by the bound).

        Parameters
        ----------
        eps : float
            Lower end of the integral.
        dim : int
            Data dimension ``d``.

        Returns
        -------
        float
            The integral (0 for VE).
        """

    def marginal(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``alpha(t) x0`` and std ``sigma(t)`` of ``p_0t(x_t | x0)``.

        Parameters
        ----------
        x0 : Tensor of shape (n, d)
            Clean data.
        t : Tensor
            Time: a scalar or shape ``(n,)``.

        Returns
        -------
        mean : Tensor of shape (n, d)
            ``alpha(t) x0``.
        std : Tensor
            ``sigma(t)``, same shape as ``t``.
        """
        return _batch_view(self.mean_coeff(t), x0) * x0, self.std(t)

    def perturb(self, x0: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """Diffuse clean data to time ``t``: ``x_t = alpha(t) x0 + sigma(t) z``.

        Parameters
        ----------
        x0 : Tensor of shape (n, d)
            Clean data.
        t : Tensor
            Time: a scalar or shape ``(n,)``.
        z : Tensor of shape (n, d)
            Standard normal noise.

        Returns
        -------
        Tensor of shape (n, d)
            ``x_t``.
        """
        return _batch_view(self.mean_coeff(t), x0) * x0 + _batch_view(self.std(t), x0) * z

    def ode_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Probability-flow ODE drift ``f(x, t) - g(t)^2 score / 2``.

        Parameters
        ----------
        x : Tensor of shape (n, d)
            States.
        t : Tensor
            Time: a scalar or shape ``(n,)``.
        score : Tensor of shape (n, d)
            The score ``s(x, t)`` at ``x``.

        Returns
        -------
        Tensor of shape (n, d)
            ``dx/dt`` of the probability-flow ODE.
        """
        return self.drift(x, t) - 0.5 * _batch_view(self.diffusion_squared(t), x) * score

    # ------------------------------------------------------------------ prior
    prior_std: float = 1.0

    def prior_sample(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw from the prior ``N(0, prior_std^2 I)``.

        Parameters
        ----------
        shape : tuple of int
            Shape of the sample, e.g. ``(n, d)``.
        generator : torch.Generator, optional
            Source of randomness.
        device : torch.device or str, optional
            Device of the sample.
        dtype : torch.dtype, optional
            Floating-point type of the sample.

        Returns
        -------
        Tensor
            Of the requested ``shape``.
        """
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return self.prior_std * z

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """Log-density of the prior, summed over all but the first axis.

        Parameters
        ----------
        z : Tensor of shape (n, ...)
            Points at ``t = T``.

        Returns
        -------
        Tensor of shape (n,)
            ``log pi(z)`` in nats.
        """
        d = z[0].numel()
        sq = z.reshape(z.shape[0], -1).pow(2).sum(-1)
        return -0.5 * d * math.log(2 * math.pi * self.prior_std**2) - sq / (
            2 * self.prior_std**2
        )

    def expected_prior_nll(self, x0: Tensor) -> Tensor:
        """``E_{x_T ~ p_0T(.|x0)}[-log pi(x_T)]`` in closed form, per row of ``x0``.

        Parameters
        ----------
        x0 : Tensor of shape (n, d)
            Clean data.

        Returns
        -------
        Tensor of shape (n,)
            The expected prior negative log-density (the prior term of the bound), in nats.
        """
        d = x0[0].numel()
        T = torch.as_tensor(self.T, dtype=x0.dtype, device=x0.device)
        a2 = self.mean_coeff(T) ** 2
        s2 = self.std(T) ** 2
        sq = x0.reshape(x0.shape[0], -1).pow(2).sum(-1)
        v = self.prior_std**2
        return 0.5 * d * math.log(2 * math.pi * v) + (a2 * sq + d * s2) / (2 * v)

    # ------------------------------------------------------------------ importance sampling
    @abstractmethod
    def _cum_weight(self, t: Tensor) -> Tensor:
        """An antiderivative ``G(t)`` of ``g^2 / sigma^2`` (float64)."""

    @abstractmethod
    def _inverse_cum_weight(self, c: Tensor) -> Tensor:
        """Inverse of :meth:`_cum_weight` (float64)."""

    def likelihood_weight_ratio(self, t: Tensor) -> Tensor:
        """``g(t)^2 / sigma(t)^2``, the unnormalised importance-sampling density.

        Parameters
        ----------
        t : Tensor
            Time(s) in ``[0, T]``: a scalar or shape ``(n,)``.

        Returns
        -------
        Tensor
            Same shape as ``t``.
        """
        return self.diffusion_squared(t) / self.std(t) ** 2

    def importance_normalizer(self, eps: float | None = None) -> Tensor:
        """``Z = ∫_eps^T g^2 / sigma^2 dt``, the normaliser of the importance-sampling density.

        Parameters
        ----------
        eps : float, optional
            Lower cutoff; :attr:`default_eps` when None.

        Returns
        -------
        Tensor
            A float64 scalar (e.g. 23.8645 for VP at ``eps = 1e-5``).
        """
        eps = self.default_eps if eps is None else eps
        e = torch.tensor(eps, dtype=torch.float64)
        T = torch.tensor(self.T, dtype=torch.float64)
        return self._cum_weight(T) - self._cum_weight(e)

    def importance_cdf(self, t: Tensor, eps: float | None = None) -> Tensor:
        """CDF of ``p_IS`` on ``[eps, T]``.

        Parameters
        ----------
        t : Tensor
            Times in ``[eps, T]``.
        eps : float, optional
            Lower cutoff; :attr:`default_eps` when None.

        Returns
        -------
        Tensor
            Values in ``[0, 1]``, same shape as ``t``.
        """
        eps = self.default_eps if eps is None else eps
        t64 = _as_tensor(t).to(torch.float64)
        e = torch.tensor(eps, dtype=torch.float64, device=t64.device)
        u = (self._cum_weight(t64) - self._cum_weight(e)) / self.importance_normalizer(eps).to(
            t64.device
        )
        return u.to(_as_tensor(t).dtype) if _as_tensor(t).is_floating_point() else u

    def importance_icdf(self, u: Tensor, eps: float | None = None) -> Tensor:
        """Inverse CDF of ``p_IS``: maps ``u in [0, 1]`` to ``t in [eps, T]`` (closed form).

        Parameters
        ----------
        u : Tensor
            Probabilities in ``[0, 1]``.
        eps : float, optional
            Lower cutoff; :attr:`default_eps` when None.

        Returns
        -------
        Tensor
            Times in ``[eps, T]``, same shape and dtype as ``u``.
        """
        eps = self.default_eps if eps is None else eps
        u64 = u.to(torch.float64)
        e = torch.tensor(eps, dtype=torch.float64, device=u64.device)
        z = self.importance_normalizer(eps).to(u64.device)
        t = self._inverse_cum_weight(u64 * z + self._cum_weight(e))
        return t.clamp(eps, self.T).to(u.dtype)

    def importance_log_prob(self, t: Tensor, eps: float | None = None) -> Tensor:
        """Log-density of ``p_IS`` at ``t`` (``-inf`` outside ``[eps, T]``).

        Parameters
        ----------
        t : Tensor
            Times.
        eps : float, optional
            Lower cutoff; :attr:`default_eps` when None.

        Returns
        -------
        Tensor
            Same shape and dtype as ``t``.
        """
        eps = self.default_eps if eps is None else eps
        t64 = t.to(torch.float64)
        lp = torch.log(self.likelihood_weight_ratio(t64)) - torch.log(
            self.importance_normalizer(eps).to(t64.device)
        )
        lp = torch.where((t64 >= eps) & (t64 <= self.T), lp, torch.full_like(lp, -math.inf))
        return lp.to(t.dtype)

    def sample_importance_time(
        self,
        n: int,
        eps: float | None = None,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw ``n`` times from ``p_IS(t) ∝ g^2 / sigma^2`` on ``[eps, T]`` by inverse CDF.

        Parameters
        ----------
        n : int
            Number of times.
        eps : float, optional
            Lower cutoff; :attr:`default_eps` when None.
        generator : torch.Generator, optional
            Source of randomness.
        device : torch.device or str, optional
            Device of the result.
        dtype : torch.dtype, default=torch.float32
            Floating-point type of the result.

        Returns
        -------
        Tensor of shape (n,)
            Times in ``[eps, T]``.
        """
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return self.importance_icdf(u, eps).to(dtype)

    def sample_uniform_time(
        self,
        n: int,
        eps: float | None = None,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw ``n`` times uniformly on ``[eps, T]``.

        Parameters
        ----------
        n : int
            Number of times.
        eps : float, optional
            Lower cutoff; :attr:`default_eps` when None.
        generator : torch.Generator, optional
            Source of randomness.
        device : torch.device or str, optional
            Device of the result.
        dtype : torch.dtype, default=torch.float32
            Floating-point type of the result.

        Returns
        -------
        Tensor of shape (n,)
            Times in ``[eps, T]``.
        """
        eps = self.default_eps if eps is None else eps
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return (eps + (self.T - eps) * u).to(dtype)

    # ------------------------------------------------------------------ sampling helpers
    def langevin_alpha(self, t: Tensor, dt: float) -> Tensor:
        """Step-size factor of the Langevin corrector (1 for VE, ``exp(-beta dt)`` otherwise).

        Parameters
        ----------
        t : Tensor
            Time(s) in ``[0, T]``: a scalar or shape ``(n,)``.
        dt : float
            Step of the predictor.

        Returns
        -------
        Tensor
            Same shape as ``t``.
        """
        return torch.ones_like(t)

    def config(self) -> dict[str, Any]:
        """Constructor parameters, JSON-serialisable.

        Returns
        -------
        dict
            Keyword arguments that rebuild this SDE with :func:`get_sde`.
        """
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class _LinearBetaSDE(SDE):
    """Shared pieces of VP and sub-VP: ``beta(t)`` linear in ``t``."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not (0 <= beta_min < beta_max):
            raise ValueError(
                f"need 0 <= beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}"
            )
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        """``beta(t) = beta_min + t (beta_max - beta_min)``."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: Tensor) -> Tensor:
        """``B(t) = ∫_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2``."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def _inverse_integrated_beta(self, b: Tensor) -> Tensor:
        # t = (-bmin + sqrt(bmin^2 + 2 db b)) / db, written without cancellation at small b.
        db = self.beta_max - self.beta_min
        return 2 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * db * b))

    def log_mean_coeff(self, t: Tensor) -> Tensor:
        return -0.5 * self.integrated_beta(t)

    def drift_coeff(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def drift_divergence_integral(self, eps: float, dim: int) -> float:
        b = self.integrated_beta(torch.tensor([self.T, eps], dtype=torch.float64))
        return float(-0.5 * dim * (b[0] - b[1]))

    def langevin_alpha(self, t: Tensor, dt: float) -> Tensor:
        # Score-SDE's alpha_i = 1 - beta_i of the N-step discretisation.  exp(-beta dt) agrees
        # to O((beta dt)^2) at N = 1000 (beta dt <= 0.02) and stays positive for coarse steps,
        # where 1 - beta dt turns negative and the corrector diverges (20 VP steps: 1 - 20/20).
        return torch.exp(-self.beta(t) * dt)

    def config(self) -> dict[str, Any]:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}


class VPSDE(_LinearBetaSDE):
    """Variance-preserving SDE ``dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw``.

    ``alpha(t) = exp(-B(t)/2)``, ``sigma(t) = sqrt(1 - exp(-B(t)))``, prior ``N(0, I)``,
    default cutoff ``eps = 1e-5``.

    Parameters
    ----------
    beta_min, beta_max : float
        Endpoints of the linear noise schedule ``beta(t)``.

    Examples
    --------
    >>> import torch
    >>> sde = VPSDE()
    >>> round(float(sde.std(torch.tensor(1.0, dtype=torch.float64))), 7)
    0.9999784
    """

    name = "vp"
    default_eps = 1e-5

    def std(self, t: Tensor) -> Tensor:
        # sqrt(1 - exp(-B)) via expm1: exact to rounding at small t.
        return torch.sqrt(-torch.expm1(-self.integrated_beta(t)))

    def diffusion_squared(self, t: Tensor) -> Tensor:
        return self.beta(t)

    def _cum_weight(self, t: Tensor) -> Tensor:
        # g^2/sigma^2 = beta / (1 - e^-B) = d/dt log(e^B - 1).
        return _log_expm1(self.integrated_beta(t))

    def _inverse_cum_weight(self, c: Tensor) -> Tensor:
        # log(e^B - 1) = c  =>  B = log(1 + e^c) = softplus(c).
        b = torch.nn.functional.softplus(c)
        return self._inverse_integrated_beta(b)


class SubVPSDE(_LinearBetaSDE):
    """Sub-VP SDE ``dx = -beta x / 2 dt + sqrt(beta (1 - exp(-2 B))) dw``.

    Same drift and mean as VP, but the kernel std is ``sigma(t) = 1 - exp(-B(t))`` (no square
    root: its variance ``(1 - e^{-B})^2`` is always below VP's).  Default ``eps = 1e-2``.

    Parameters
    ----------
    beta_min, beta_max : float
        Endpoints of the linear noise schedule ``beta(t)``.

    Examples
    --------
    >>> import torch
    >>> sde = SubVPSDE()
    >>> round(float(sde.std(torch.tensor(1e-2, dtype=torch.float64))), 6)
    0.001993
    """

    name = "subvp"
    default_eps = 1e-2

    def std(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self.integrated_beta(t))

    def diffusion_squared(self, t: Tensor) -> Tensor:
        return -self.beta(t) * torch.expm1(-2 * self.integrated_beta(t))

    def _cum_weight(self, t: Tensor) -> Tensor:
        # g^2/sigma^2 = beta (1 + e^-B) / (1 - e^-B); antiderivative 2 log(e^B - 1) - B.
        b = self.integrated_beta(t)
        return 2 * _log_expm1(b) - b

    def _inverse_cum_weight(self, c: Tensor) -> Tensor:
        # (e^B - 1)^2 / e^B = e^c: with y = e^B, y^2 - (2 + e^c) y + 1 = 0, larger root.
        # y - 1 = (e^c + sqrt(e^c (4 + e^c))) / 2, kept as y - 1 for log1p accuracy.
        ec = torch.exp(c)
        ym1 = 0.5 * (ec + torch.sqrt(ec * (4 + ec)))
        return self._inverse_integrated_beta(torch.log1p(ym1))


class VESDE(SDE):
    """Variance-exploding SDE ``dx = sqrt(d sigma^2/dt) dw``.

    ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, mean coefficient 1, prior
    ``N(0, sigma_max^2 I)``, default cutoff ``eps = 1e-5``.  ``g^2 / sigma^2`` is constant, so
    the importance-sampling proposal is uniform.

    Parameters
    ----------
    sigma_min, sigma_max : float
        Noise std at ``t = 0`` and ``t = 1``.

    Examples
    --------
    >>> sde = VESDE()
    >>> round(sde.prior_std, 1)
    50.0
    """

    name = "ve"
    default_eps = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        if not (0 < sigma_min < sigma_max):
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                f"sigma_max={sigma_max}"
            )
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    @property
    def prior_std(self) -> float:  # type: ignore[override]
        return self.sigma_max

    def log_mean_coeff(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_as_tensor(t))

    def std(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def diffusion_squared(self, t: Tensor) -> Tensor:
        return self.std(t) ** 2 * (2 * self._log_ratio)

    def drift_coeff(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_as_tensor(t))

    def drift_divergence_integral(self, eps: float, dim: int) -> float:
        return 0.0

    def _cum_weight(self, t: Tensor) -> Tensor:
        return 2 * self._log_ratio * t

    def _inverse_cum_weight(self, c: Tensor) -> Tensor:
        return c / (2 * self._log_ratio)

    def config(self) -> dict[str, Any]:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


#: Registry of the forward SDEs: name -> class (the names accepted by ``ScoreFlowDensity(sde=...)``).
#:
#: Examples
#: --------
#: >>> sorted(SDES)
#: ['subvp', 've', 'vp']
#: >>> SDES["vp"]().default_eps
#: 1e-05
SDES: dict[str, type[SDE]] = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}


def get_sde(name: str | SDE, **params: float) -> SDE:
    """Build an SDE from its registry name ("ve", "vp" or "subvp").

    Parameters
    ----------
    name : str or SDE
        Registry key (case-insensitive; "sub-vp" and "sub_vp" are accepted), or an SDE
        instance, returned unchanged.
    **params
        Constructor parameters, e.g. ``beta_max=20`` or ``sigma_max=50``.

    Returns
    -------
    SDE
        A new :class:`VESDE`, :class:`VPSDE` or :class:`SubVPSDE` (or ``name`` itself).

    Examples
    --------
    >>> get_sde("subvp")
    SubVPSDE(beta_min=0.1, beta_max=20.0)
    """
    if isinstance(name, SDE):
        return name
    if not isinstance(name, str):
        raise TypeError(f"sde must be a string or an SDE instance, got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in SDES:
        raise ValueError(f"unknown sde {name!r}; expected one of {sorted(SDES)}")
    return SDES[key](**params)
