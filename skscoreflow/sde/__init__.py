"""Forward SDEs of score-based diffusion: VE, VP and sub-VP.

Each SDE ``dx = f(x, t) dt + g(t) dw`` on ``t in [0, T]`` (``T = 1``) has a Gaussian
perturbation kernel ``p_0t(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I)`` and a Gaussian prior
``pi = N(0, prior_std^2 I)``.  Everything the rest of the package needs to know about an SDE
lives on the SDE object, so a user's own subclass works everywhere a built-in one does:

* the kernel, the drift and the probability-flow ODE drift (used by the likelihood and the
  samplers);
* the closed-form importance-sampling proposal ``p_IS(t) ∝ g(t)^2 / sigma(t)^2`` on
  ``[eps, T]`` (Song et al. 2021, section 5) for likelihood-weighted training and the bound;
* the Gaussian reference, the exact noise of ``N(0, I)`` data (the score networks' baseline
  and the bound's control variate), and a per-instance cache for constants derived from it;
* the time cutoffs: :attr:`~SDE.default_eps` (training and likelihood),
  :attr:`~SDE.sampling_eps` (samplers) and :attr:`~SDE.continuous_eps` (the estimator's
  default for standardised continuous data).

Precision: all small-``t`` quantities use ``expm1`` / ``log1p`` forms (the naive float32
``sqrt(1 - exp(-B))`` for the VP std is 2.4 % wrong at ``t = 1e-5``).  Importance-sampling
CDFs and their inverses are evaluated in float64 and cast back.

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

from ._base import SDE
from ._builtin import VESDE, VPSDE, SubVPSDE

__all__ = ["SDE", "VESDE", "VPSDE", "SubVPSDE", "get_sde"]

# Pickles, reprs and the docs name the public path, whatever file a class lives in.
for _cls in (SDE, VESDE, VPSDE, SubVPSDE):
    _cls.__module__ = __name__
del _cls

#: Registry of the built-in SDEs: name -> class (the names ``get_sde`` accepts).
_SDES: dict[str, type[SDE]] = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}


def get_sde(name: str | SDE, **params: float) -> SDE:
    """Build a built-in SDE from its name ("ve", "vp" or "subvp").

    Parameters
    ----------
    name : str or SDE
        Name (case-insensitive; "sub-vp" and "sub_vp" are accepted), or an SDE instance
        (any subclass of :class:`SDE`), returned unchanged.
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
    if key not in _SDES:
        raise ValueError(f"unknown sde {name!r}; expected one of {sorted(_SDES)} or an SDE instance")
    return _SDES[key](**params)
