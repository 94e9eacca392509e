"""The built-in SDEs: VP and sub-VP (linear ``beta(t)``) and VE."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._base import SDE, _log_expm1

__all__ = ["VPSDE", "SubVPSDE", "VESDE"]


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

    ``alpha(t) = exp(-B(t)/2)``, ``sigma(t) = sqrt(1 - exp(-B(t)))``, prior ``N(0, I)``.
    Cutoffs: ``default_eps = 1e-5`` (the paper's), ``sampling_eps = 1e-3`` (the paper's) and
    ``continuous_eps = 3e-3`` (finest noise std 0.02 of standardised data; see the user guide's
    hyperparameter page).

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

    @property
    def sampling_eps(self) -> float:  # numpydoc ignore=RT01
        """1e-3, the paper's sampling cutoff for VP."""
        return 1e-3

    @property
    def continuous_eps(self) -> float:  # numpydoc ignore=RT01
        """3e-3: ``sigma(eps) = 0.02`` of the standardised data."""
        return 3e-3

    def std(self, t: Tensor) -> Tensor:
        # sqrt(1 - exp(-B)) via expm1: exact to rounding at small t.
        return torch.sqrt(-torch.expm1(-self.integrated_beta(t)))

    def diffusion_squared(self, t: Tensor) -> Tensor:
        return self.beta(t)

    def cum_weight(self, t: Tensor) -> Tensor:
        # g^2/sigma^2 = beta / (1 - e^-B) = d/dt log(e^B - 1).
        return _log_expm1(self.integrated_beta(t))

    def inverse_cum_weight(self, c: Tensor) -> Tensor:
        # log(e^B - 1) = c  =>  B = log(1 + e^c) = softplus(c).
        return self._inverse_integrated_beta(torch.nn.functional.softplus(c))


class SubVPSDE(_LinearBetaSDE):
    """Sub-VP SDE ``dx = -beta x / 2 dt + sqrt(beta (1 - exp(-2 B))) dw``.

    Same drift and mean as VP, but the kernel std is ``sigma(t) = 1 - exp(-B(t))`` (no square
    root: its variance ``(1 - e^{-B})^2`` is always below VP's).  All cutoffs are 1e-2 (the
    paper's).

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

    def cum_weight(self, t: Tensor) -> Tensor:
        # g^2/sigma^2 = beta (1 + e^-B) / (1 - e^-B); antiderivative 2 log(e^B - 1) - B.
        b = self.integrated_beta(t)
        return 2 * _log_expm1(b) - b

    def inverse_cum_weight(self, c: Tensor) -> Tensor:
        # (e^B - 1)^2 / e^B = e^c: with y = e^B, y^2 - (2 + e^c) y + 1 = 0, larger root.
        # y - 1 = (e^c + sqrt(e^c (4 + e^c))) / 2, kept as y - 1 for log1p accuracy.
        ec = torch.exp(c)
        ym1 = 0.5 * (ec + torch.sqrt(ec * (4 + ec)))
        return self._inverse_integrated_beta(torch.log1p(ym1))


class VESDE(SDE):
    """Variance-exploding SDE ``dx = sqrt(d sigma^2/dt) dw``.

    ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, mean coefficient 1, prior
    ``N(0, sigma_max^2 I)``, all cutoffs 1e-5.  ``g^2 / sigma^2`` is constant, so the
    importance-sampling proposal is uniform.

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
        return torch.zeros_like(torch.as_tensor(t))

    def std(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def diffusion_squared(self, t: Tensor) -> Tensor:
        return self.std(t) ** 2 * (2 * self._log_ratio)

    def drift_coeff(self, t: Tensor) -> Tensor:
        return torch.zeros_like(torch.as_tensor(t))

    def drift_divergence_integral(self, eps: float, dim: int) -> float:
        return 0.0

    def cum_weight(self, t: Tensor) -> Tensor:
        return 2 * self._log_ratio * t

    def inverse_cum_weight(self, c: Tensor) -> Tensor:
        return c / (2 * self._log_ratio)

    def config(self) -> dict[str, Any]:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}
