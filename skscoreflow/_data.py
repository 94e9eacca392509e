"""Training data that need not fit in memory: row sources read one batch at a time.

``fit`` accepts a ``numpy.memmap`` or any 2-D array-like with ``shape``, ``dtype`` and row
indexing (``X[i:j]``, ``X[sorted_indices]``: h5py and zarr datasets, dask arrays).  Such data
are checked and summarised in chunks of rows (finite, integer-valued when dequantized, column
moments and range) and read by index one mini-batch at a time, so ``fit`` holds only a batch
of rows, not the data.  Rows go through the same element-wise float64 operations as in-memory
data, so a fit on a memmap equals the fit on the same array in memory bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

# Internal helpers of the estimator and the training loop: nothing here is public API.
__all__: list[str] = []

#: Rows per chunk when scanning or evaluating out-of-core data.
CHUNK_ROWS = 65536


def is_out_of_core(X: Any) -> bool:
    """Whether ``fit`` reads ``X`` in chunks rather than as one in-memory array: a
    ``numpy.memmap``, or a 2-D array-like that is not a NumPy array, tensor, DataFrame or
    sparse matrix, with ``shape``, a NumPy ``dtype`` and row indexing."""
    if isinstance(X, np.memmap):
        return True
    if isinstance(X, (np.ndarray, list, tuple, Tensor)) or hasattr(X, "iloc") or hasattr(X, "tocsr"):
        return False
    shape = getattr(X, "shape", None)
    return (
        shape is not None and len(shape) == 2 and isinstance(getattr(X, "dtype", None), np.dtype)
        and hasattr(X, "__getitem__")
    )


def chunks(n: int, chunk_rows: int | None = None) -> Iterator[slice]:
    """Consecutive row slices of at most ``chunk_rows`` (default :data:`CHUNK_ROWS`) rows
    covering ``range(n)``."""
    chunk_rows = CHUNK_ROWS if chunk_rows is None else chunk_rows
    for start in range(0, n, chunk_rows):
        yield slice(start, min(n, start + chunk_rows))


def read_rows(X: Any, idx: np.ndarray) -> np.ndarray:
    """``X[idx]`` as an in-memory array, read in increasing row order (what h5py requires and
    what keeps a memmap's reads sequential), returned in the order of ``idx``."""
    idx = np.asarray(idx, dtype=np.int64)
    if isinstance(X, np.ndarray) and not isinstance(X, np.memmap):
        return X[idx]
    order = np.argsort(idx, kind="stable")
    block = np.asarray(X[idx[order]])
    out = np.empty_like(block)
    out[order] = block
    return out


class _Moments:
    """Column count, mean and sum of squared deviations, merged chunk by chunk (Chan et al.'s
    pairwise update); one chunk gives exactly ``X.mean(0)`` and ``X.var(0)``."""

    def __init__(self, d: int) -> None:
        self.count, self.mean, self.m2, self.var1 = 0, np.zeros(d), np.zeros(d), None

    def add(self, chunk: np.ndarray) -> None:
        k = chunk.shape[0]
        c_mean, c_var = chunk.mean(axis=0), chunk.var(axis=0)
        if self.count == 0:
            self.count, self.mean, self.m2, self.var1 = k, c_mean, c_var * k, c_var
            return
        total = self.count + k
        delta = c_mean - self.mean
        self.mean = self.mean + delta * (k / total)
        self.m2 = self.m2 + c_var * k + delta**2 * (self.count * k / total)
        self.count, self.var1 = total, None

    @property
    def var(self) -> np.ndarray:
        return self.var1 if self.var1 is not None else self.m2 / max(self.count, 1)


def column_moments(X: Any, chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Column means and (population) variances of ``X`` in float64, one chunk of rows at a
    time; data of a single chunk give exactly ``X.mean(0)`` and ``X.var(0)``."""
    moments = _Moments(X.shape[1])
    for rows in chunks(X.shape[0], chunk_rows):
        moments.add(np.asarray(X[rows]).astype(np.float64, copy=False))
    return moments.mean, moments.var


def standardized_covariance(X: Any, mean: np.ndarray, scale: np.ndarray, *,
                            dequantized: bool = False,
                            chunk_rows: int | None = None) -> np.ndarray:
    """Population covariance of ``(X - mean) / scale`` in float64, one chunk of rows at a time
    (of ``X + u``, ``u ~ U[0, 1)`` independent, when ``dequantized``: ``+ I / 12`` before
    scaling)."""
    d = X.shape[1]
    sums, cross = np.zeros(d), np.zeros((d, d))
    for rows in chunks(X.shape[0], chunk_rows):
        Z = np.asarray(X[rows]).astype(np.float64, copy=False) - mean
        sums += Z.sum(axis=0)
        cross += Z.T @ Z
    n = max(X.shape[0], 1)
    m = sums / n
    cov = cross / n - np.outer(m, m)
    if dequantized:
        cov = cov + np.eye(d) / 12.0
    cov = cov / np.outer(scale, scale)
    return (cov + cov.T) / 2


def scan(
    X: Any,
    *,
    check_chunk: Callable[[np.ndarray, int], None] | None = None,
    chunk_rows: int | None = None,
) -> dict[str, Any]:
    """One pass over out-of-core ``X``: checks each chunk and returns its summary.

    Raises a ``ValueError`` naming the problem for a non-numeric dtype, fewer than 2 rows, no
    columns, or a non-finite value (with its row); ``check_chunk(chunk, first_row)`` adds
    checks (integer values for dequantized data).  Returns the column moments (as
    :func:`column_moments`), minima, maxima and the data's sha256 digest (the same as that of
    the in-memory array).
    """
    n, d = (int(s) for s in X.shape)
    dtype = np.dtype(X.dtype)
    if dtype.kind not in "fiu":
        raise ValueError(f"out-of-core X must have a numeric dtype, got {dtype}")
    if n < 2:
        raise ValueError(f"Found array with {n} sample(s) (shape=({n}, {d})) while a minimum of 2 is required.")
    if d < 1:
        raise ValueError(f"Found array with 0 feature(s) (shape=({n}, 0)) while a minimum of 1 is required.")
    moments = _Moments(d)
    lo, hi = np.full(d, np.inf), np.full(d, -np.inf)
    digest = hashlib.sha256()
    # As the checkpoint's digest of an in-memory array: header, then the rows' bytes in order.
    digest.update(json.dumps([[n, d], str(dtype), None]).encode())
    for rows in chunks(n, chunk_rows):
        chunk = np.ascontiguousarray(np.asarray(X[rows]))
        if dtype.kind == "f" and not np.isfinite(chunk).all():
            bad = rows.start + int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
            raise ValueError(f"Input X contains NaN or infinity (row {bad}).")
        if check_chunk is not None:
            check_chunk(chunk, rows.start)
        digest.update(chunk.data)
        c64 = chunk.astype(np.float64, copy=False)
        moments.add(c64)
        lo, hi = np.minimum(lo, c64.min(axis=0)), np.maximum(hi, c64.max(axis=0))
    return {"mean": moments.mean, "var": moments.var, "min": lo, "max": hi, "digest": digest.hexdigest()}


class RowSource:
    """Rows of out-of-core data, read by index one mini-batch at a time.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        The data (a memmap, h5py/zarr dataset, ...), never loaded whole.
    rows : ndarray of int or None
        The rows of ``X`` this source holds (training rows), in order; None: all of them.
    prepare : callable
        ``prepare(block) -> block`` applied (in NumPy, float64) to the rows read.
    dtype, device
        Of the tensors returned.
    """

    def __init__(self, X: Any, rows: np.ndarray | None, prepare: Callable[[np.ndarray], np.ndarray],
                 dtype: torch.dtype, device: torch.device) -> None:
        self.X, self.rows, self.prepare = X, rows, prepare
        self.dtype, self.device = dtype, torch.device(device)
        self.shape = (int(X.shape[0]) if rows is None else len(rows), int(X.shape[1]))

    def take(self, idx: Tensor) -> Tensor:
        """Rows ``idx`` (positions in this source) as a tensor of ``dtype`` on ``device``."""
        pos = idx.detach().cpu().numpy()
        block = read_rows(self.X, pos if self.rows is None else self.rows[pos])
        return torch.tensor(self.prepare(block), dtype=self.dtype, device=self.device)


def validated(est: Any, X: Any, reset: bool) -> tuple[Any, dict[str, Any] | None]:
    """``X`` checked for training by ``est``, and for out-of-core data its chunked summary
    (:func:`scan`); in-memory data go through scikit-learn's ``validate_data``."""
    from sklearn.utils.validation import validate_data

    from .dequantization import _check_integer_valued

    names = getattr(est, "feature_names_in_", None)
    if is_out_of_core(X):
        validate_data(est, X, skip_check_array=True, reset=reset)
        check = None
        if est.dequantization is not None:
            def check(chunk: np.ndarray, first_row: int) -> None:
                _check_integer_valued(chunk, names)
        return X, scan(X, check_chunk=check)
    X = validate_data(est, X, dtype=[np.float64, np.float32], ensure_min_samples=2, reset=reset)
    if est.dequantization is not None:
        _check_integer_valued(X, getattr(est, "feature_names_in_", None))
    return X, None


def training_rows(est: Any, X: Any, rows: np.ndarray | None) -> tuple[Any, Any]:
    """The rows ``rows`` of ``X`` (all when None) for ``est``'s training loop — a tensor, or a
    :class:`RowSource` for out-of-core data — and the per-batch transform (fresh uniform
    dequantization noise, then standardisation) for dequantized data."""
    from .dequantization import _uniform_dequantize

    st = est._standardizer
    deq = est.dequantization is not None
    if is_out_of_core(X):
        prepare = (lambda b: np.asarray(b, dtype=np.float64)) if deq else st.transform
        X_train = RowSource(X, rows, prepare, est._torch_dtype, est.device_)
    else:
        X_rows = X if rows is None else X[rows]
        X_train = est._to_tensor(X_rows if deq else st.transform(X_rows))
    flip = None
    if getattr(est, "augment", None) == "hflip":
        if est.image_shape_ is None:
            raise ValueError(f"augment={est.augment!r} flips images, but this estimator was "
                             "fitted without image_shape")
        flip = hflip(est.image_shape_)
    if not deq:
        if flip is None:
            return X_train, None
        # Rows are standardised already: flip in X's units (exact for any standardisation).
        return X_train, lambda batch, g: st.transform(flip(st.inverse(batch), g))

    # Fresh uniform dequantization noise for every mini-batch (the score model is trained on
    # uniformly dequantized data for both dequantization modes).
    def batch_transform(batch: Tensor, g: torch.Generator) -> Tensor:
        if flip is not None:
            batch = flip(batch, g)
        return st.transform(batch + _uniform_dequantize(batch, g)[0])

    return X_train, batch_transform


def hflip(image_shape: Any) -> Callable[[Tensor, torch.Generator], Tensor]:
    """``flip(batch, g)``: each flat image row mirrored left-right with probability 1/2 (one
    draw per row from ``g``, so a seeded fit is reproducible and a distributed one draws what
    a 1-process fit draws)."""
    shape = tuple(int(s) for s in image_shape)

    def flip(batch: Tensor, g: torch.Generator) -> Tensor:
        mirror = torch.rand(batch.shape[0], generator=g, device=batch.device) < 0.5
        images = batch.reshape(-1, *shape)
        images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
        return images.reshape(batch.shape)

    return flip
