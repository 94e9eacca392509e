"""Standardisation of the data before the diffusion, with its log-determinant."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = ["Standardizer"]

_A = TypeVar("_A", np.ndarray, Tensor)


@dataclass(frozen=True)
class Standardizer:
    """The affine map ``z = (x - mean) / scale``, in NumPy (float64) and torch.

    Every log-density the estimator reports is in the user's units: the model's log-density of
    ``z`` plus :attr:`log_det`.  Torch inputs are transformed in their own dtype and device.

    Parameters
    ----------
    mean, scale : ndarray of shape (n_features,)
        Column means and standard deviations (float64).

    Examples
    --------
    >>> import numpy as np, torch
    >>> st = Standardizer.fit(np.array([[0.0, 1.0], [2.0, 5.0]]))
    >>> st.transform(np.array([[1.0, 3.0]])), round(st.log_det, 4)
    (array([[0., 0.]]), -0.6931)
    >>> st.inverse(st.transform(torch.tensor([[2.0, 5.0]])))
    tensor([[2., 5.]])
    """

    mean: np.ndarray
    scale: np.ndarray
    # Torch copies of the moments per (dtype, device): made once, not once per mini-batch.
    _tensors: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def fit(cls, X: np.ndarray, *, dequantized: bool = False) -> "Standardizer":
        """Moments of the columns of ``X`` (of ``X + u``, ``u ~ U[0, 1)``, when dequantized),
        computed in chunks of rows (``X`` may be a memmap).

        Constant columns keep unit scale, so the log-determinant stays finite.
        """
        from ._data import column_moments

        return cls.from_moments(*column_moments(X), dequantized=dequantized)

    @classmethod
    def from_moments(cls, mean: np.ndarray, var: np.ndarray, *, dequantized: bool = False
                     ) -> "Standardizer":
        """The map from column means and variances (of the integers when ``dequantized``)."""
        if dequantized:
            # Moments of x + u with u ~ U[0, 1): shifted by 1/2, variance + 1/12.
            mean, var = mean + 0.5, var + 1.0 / 12.0
        scale = np.sqrt(var)
        scale = np.where(scale > 1e-12 * np.maximum(1.0, np.abs(mean)), scale, 1.0)
        return cls(mean, scale)

    @property
    def log_det(self) -> float:
        """``log |dz / dx|``, added to every log-density of ``z`` to get one of ``x``."""
        return float(-np.log(self.scale).sum())

    def _moments(self, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (like.dtype, like.device)
        if key not in self._tensors:
            kw = {"dtype": like.dtype, "device": like.device}
            self._tensors[key] = (torch.tensor(self.mean, **kw), torch.tensor(self.scale, **kw))
        return self._tensors[key]

    def transform(self, X: _A) -> _A:
        """``(X - mean) / scale``: float64 for arrays, ``X``'s dtype for tensors."""
        if isinstance(X, Tensor):
            mean, scale = self._moments(X)
            return (X - mean) / scale
        return (np.asarray(X, dtype=np.float64) - self.mean) / self.scale

    def inverse(self, Z: _A) -> _A:
        """``Z * scale + mean``: float64 for arrays, ``Z``'s dtype for tensors."""
        if isinstance(Z, Tensor):
            mean, scale = self._moments(Z)
            return Z * scale + mean
        return np.asarray(Z, dtype=np.float64) * self.scale + self.mean
