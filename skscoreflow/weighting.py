"""Weightings of the denoising score-matching loss and the time sampling that goes with them.

With ``x_t = alpha(t) x0 + sigma(t) z`` the per-example losses are (spec §3, ScoreFlow's
``losses.get_sde_loss_fn`` with ``reduce_mean=True``; mean over dimensions):

=================== ================================ =========================================
weighting           time sampling                    per-example loss
=================== ================================ =========================================
``score_matching``  ``t ~ U(eps, T)``                ``||sigma s + z||^2``  (lambda = sigma^2)
``likelihood``      ``t ~ U(eps, T)``                ``g^2 ||s + z / sigma||^2``  (lambda = g^2)
``likelihood_is``   ``t ~ p_IS ∝ g^2 / sigma^2``     ``||sigma s + z||^2``  (lambda = g^2, IS)
=================== ================================ =========================================

``likelihood`` and ``likelihood_is`` estimate the same objective up to a constant factor
(``Z / (T - eps)``): the likelihood-weighted DSM loss, which upper-bounds the negative
log-likelihood of the SDE model (Theorem 1).  Importance sampling absorbs the ``1/sigma^2``
spike at small ``t`` into the time density, so its estimator has far lower variance.

Examples
--------
>>> import torch
>>> from skscoreflow.sde import VPSDE
>>> sde = VPSDE()
>>> score_fn = lambda x, t: -x  # exact score of N(0, I) data under VP
>>> g = torch.Generator().manual_seed(0)
>>> loss = dsm_loss(score_fn, torch.randn(64, 2, generator=g), sde, "likelihood_is", generator=g)
>>> loss.shape
torch.Size([64])
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .sde import SDE

__all__ = ["dsm_loss"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]

#: The loss weightings accepted by ``ScoreFlowDensity(weighting=...)``, each mapped to its time
#: sampling: ``"uniform"`` on ``[eps, T]`` or ``"importance"`` (``p_IS ∝ g^2 / sigma^2``).
_WEIGHTINGS: dict[str, str] = {
    "score_matching": "uniform",
    "likelihood": "uniform",
    "likelihood_is": "importance",
}


def _check_weighting(weighting: str) -> str:
    """``weighting`` itself if it is a key of ``_WEIGHTINGS``; a ``ValueError`` otherwise."""
    if not isinstance(weighting, str) or weighting not in _WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {sorted(_WEIGHTINGS)}")
    return weighting


def _sample_time(
    sde: SDE,
    n: int,
    weighting: str,
    eps: float | None = None,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Training times for ``weighting``: from ``p_IS`` for "likelihood_is", else uniform."""
    importance = _WEIGHTINGS[_check_weighting(weighting)] == "importance"
    return sde.sample_time(
        n, eps, importance_sampling=importance, generator=generator, device=device, dtype=dtype
    )


def dsm_loss(
    score_fn: ScoreFn,
    x0: Tensor,
    sde: SDE,
    weighting: str = "likelihood_is",
    eps: float | None = None,
    *,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    z: Tensor | None = None,
) -> Tensor:
    """Per-example weighted denoising score-matching loss (mean over dimensions).

    Parameters
    ----------
    score_fn : callable
        ``score_fn(x, t) -> Tensor`` with ``x`` of shape ``(n, d)`` and ``t`` of shape ``(n,)``.
    x0 : Tensor of shape (n, d)
        Clean data.
    sde : SDE
        The forward SDE.
    weighting : {"score_matching", "likelihood", "likelihood_is"}
        Loss weighting (see the module docstring).
    eps : float, optional
        Lower time cutoff; the SDE's default when None.
    generator : torch.Generator, optional
        Source of the times and the noise.
    t, z : Tensor, optional
        Fixed times and noise (e.g. for a low-variance validation loss).

    Returns
    -------
    Tensor of shape (n,)
        The per-example loss; its batch mean is the training objective.

    See Also
    --------
    skscoreflow.training.train_score_model : The training loop that minimises it.

    Examples
    --------
    >>> import torch
    >>> from skscoreflow.sde import VPSDE
    >>> score_fn = lambda x, t: -x  # exact score of N(0, I) data under VP
    >>> g = torch.Generator().manual_seed(0)
    >>> x0 = torch.randn(4096, 2, generator=g, dtype=torch.float64)
    >>> loss = dsm_loss(score_fn, x0, VPSDE(), "likelihood_is", generator=g)
    >>> round(float(loss.mean()), 1)  # > 0 even for the exact score (denoising error)
    0.6
    """
    _check_weighting(weighting)
    n = x0.shape[0]
    if t is None:
        t = _sample_time(
            sde, n, weighting, eps, generator=generator, device=x0.device, dtype=x0.dtype
        )
    if z is None:
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    xt = sde.perturb(x0, t, z)
    score = score_fn(xt, t)
    sigma = sde.std(t).reshape(-1, *([1] * (x0.ndim - 1)))
    dims = tuple(range(1, x0.ndim))
    # ||sigma s + z||^2, written this way (not ||s + z/sigma||^2) to avoid cancelling two
    # O(1/sigma) terms at small t.
    residual = (sigma * score + z).pow(2).mean(dim=dims)
    if weighting == "likelihood":
        return sde.likelihood_weight_ratio(t) * residual
    return residual
