"""Unit conversions for reported likelihoods.

Conventions (no hidden offsets):

* **Discrete data** (integers, modelled with ``dequantization``): ``score_samples`` is a lower
  bound on ``log P(X = x)`` in nats, so ``bits_per_dim = -log2 P(x) / d`` is an upper bound on
  the code length per dimension; it is always ``>= 0``.
* **Continuous data**: ``bits_per_dim = -log p(x) / (d ln 2)`` with ``p`` the density in the
  units of the user's ``X``.  It depends on those units (scaling ``X`` by ``c`` adds
  ``log2 |c|``) and can be negative; it is not comparable with discrete bits/dim.  The
  8-bit-image offsets of the diffusion literature (+7 for data in [-1, 1], +8 for [0, 1]) are
  the special case where ``X = (k + u) / 256``: with ``dequantization`` on the integers ``k``
  no offset is needed at all.

Examples
--------
>>> import numpy as np
>>> bits_per_dim(np.array([-np.log(2.0) * 3]), n_features=3)  # P(x) = 1/8 over 3 dims
1.0
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["bits_per_dim"]


def bits_per_dim(log_likelihood: ArrayLike, n_features: int) -> float:
    """Mean negative log-likelihood in bits per dimension.

    Parameters
    ----------
    log_likelihood : array-like of shape (n_samples,)
        Per-row log-likelihoods in nats (e.g. ``ScoreFlowDensity.score_samples``).
    n_features : int
        Number of dimensions ``d``.

    Returns
    -------
    float
        ``-mean(log_likelihood) / (d ln 2)``.

    Examples
    --------
    >>> import numpy as np
    >>> bits_per_dim(np.log([1 / 256, 1 / 16]), n_features=1)  # mean of 8 and 4 bits
    6.0
    >>> bits_per_dim([-0.5 * 64 * np.log(2 * np.pi * np.e)], n_features=64)  # N(0, I_64)
    2.047095585180641
    """
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    ll = np.asarray(log_likelihood, dtype=np.float64)
    if ll.size == 0:
        raise ValueError("log_likelihood is empty")
    return float(-ll.mean() / (n_features * math.log(2)))
