"""Row-wise evaluation of a fitted estimator on Dask arrays (the optional ``dask`` extra).

``ScoreFlowDensity.score_samples`` and ``bound`` hand a Dask array to :func:`lazy_rows`, which
returns a lazy 1-D Dask array: one task per row block, each calling the estimator's NumPy path
on its block.  The fitted estimator enters the task graph once, as a single key that every
block task depends on, so the threaded scheduler shares one object, ``dask.distributed`` ships
it to each worker once, and only the local *processes* scheduler (which pickles every task's
inputs) sends it with every block.

Dask is never imported by this module unless the caller has imported it already: a Dask
collection cannot exist otherwise, and ``import skscoreflow`` stays free of the extra.

Examples
--------
>>> import numpy as np
>>> is_dask_collection(np.zeros((3, 2)))
False
"""

from __future__ import annotations

import math
import sys
import uuid
from numbers import Integral
from typing import Any

import numpy as np

from ._threads import fit_threads

__all__ = ["is_dask_collection", "lazy_rows"]


def is_dask_collection(X: Any) -> bool:
    """Whether ``X`` is a Dask collection, without importing Dask.

    Parameters
    ----------
    X : object
        Any input of ``score_samples`` or ``bound``.

    Returns
    -------
    bool
        True for a Dask array (or any other Dask collection).

    Examples
    --------
    >>> import numpy as np
    >>> is_dask_collection(np.zeros((3, 2)))
    False
    >>> import dask.array as da
    >>> is_dask_collection(da.zeros((3, 2), chunks=2))
    True
    """
    # A Dask object can only exist once dask is imported; checking sys.modules first keeps
    # every NumPy call free of the (slow, optional) import.
    if "dask" not in sys.modules:
        return False
    import dask

    return bool(dask.is_dask_collection(X))


def lazy_rows(est: Any, method_name: str, X: Any, **kwargs: Any) -> Any:
    """``getattr(est, method_name)(X, **kwargs)`` as a lazy Dask array, block by block.

    What can be checked without computing is checked now (fitted, a 2-D numeric Dask array
    with ``est.n_features_in_`` columns and rows); each block is validated by the NumPy path
    when it runs, except that an empty block (after a boolean mask) gives an empty result.
    Blocks are evaluated independently, so a row's value matches the NumPy call's up to the
    ODE solver's tolerance (the adaptive solver picks its steps for a whole batch), and
    Monte-Carlo draws depend on the block: a ``random_state`` keyword is kept for the first
    block and replaced by a seed derived from it and the block's index for the others
    (independent draws in every block, reproducible for a given chunking).

    Parameters
    ----------
    est : ScoreFlowDensity
        The fitted estimator; it is read when the graph is computed, not copied now.
    method_name : str
        The row-wise method to call on each block, e.g. ``"score_samples"`` or ``"bound"``.
    X : dask.array.Array of shape (n_samples, n_features)
        Rows to evaluate; any row chunking, including unknown (``nan``) chunk sizes.  Several
        column chunks are merged into one.
    **kwargs : dict
        Keyword arguments of the method, passed to every block (``random_state``: see above).

    Returns
    -------
    dask.array.Array of shape (n_samples,)
        float64, chunked like the rows of ``X``; nothing is computed until ``.compute()``.

    Raises
    ------
    sklearn.exceptions.NotFittedError
        If ``est`` is not fitted.
    TypeError
        If ``X`` is a Dask collection other than an array (e.g. a Dask DataFrame).
    ValueError
        If ``X`` is not 2-D, has no rows, the wrong number of columns or a non-numeric dtype.

    Examples
    --------
    >>> import dask.array as da
    >>> from sklearn.datasets import make_moons
    >>> from skscoreflow import ScoreFlowDensity
    >>> X, _ = make_moons(200, noise=0.1, random_state=0)
    >>> est = ScoreFlowDensity(hidden_layer_sizes=(8,), fourier_features=0, max_iter=5,
    ...                        device="cpu", random_state=0).fit(X)
    >>> lazy = lazy_rows(est, "score_samples", da.from_array(X[:10], chunks=4))
    >>> lazy.shape, lazy.chunks
    ((10,), ((4, 4, 2),))
    >>> lazy.compute().shape
    (10,)
    """
    import dask
    import dask.array as da
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(est, "network_")
    name = type(est).__name__
    if not isinstance(X, da.Array):
        raise TypeError(
            f"{name}.{method_name} takes a Dask array, got {type(X).__name__}; convert a Dask "
            "DataFrame with .to_dask_array(lengths=True)"
        )
    if X.ndim != 2:
        raise ValueError(
            f"Expected a 2-D Dask array of shape (n_samples, n_features), got {X.ndim} "
            f"dimension(s) (shape={X.shape})"
        )
    if X.dtype.kind not in "biuf":
        raise ValueError(f"{name} needs numeric data, got a Dask array of dtype {X.dtype}")
    n_cols = X.shape[1]
    if math.isnan(n_cols):
        # Rare (e.g. after a column-wise boolean mask); rechunking needs the sizes.
        raise ValueError(
            "X has unknown column chunk sizes: call X.compute_chunk_sizes() first"
        )
    if n_cols != est.n_features_in_:
        raise ValueError(
            f"X has {n_cols} features, but {name} is expecting {est.n_features_in_} features "
            "as input."
        )
    if X.shape[0] == 0:  # the NumPy path's check and message (unknown sizes are nan, not 0)
        raise ValueError(
            f"Found array with 0 sample(s) (shape={X.shape}) while a minimum of 1 is required "
            f"by {name}."
        )
    if len(X.chunks[1]) > 1:
        # Every row needs all its columns at once; merging column chunks keeps the row chunks.
        X = X.rechunk({1: -1})
    # One key for the model, an argument of every block task (never embedded in the tasks):
    # the threaded scheduler shares the object and dask.distributed ships it once per worker.
    # A fresh name rather than pure=True: tokenizing the estimator pickles all its weights.
    model = dask.delayed(est, name=f"skscoreflow-model-{uuid.uuid4().hex}", traverse=False)
    seeds = None
    if "random_state" in kwargs:
        seeds = _BlockSeeds(kwargs.pop("random_state"))
    return da.map_blocks(
        _evaluate_block,
        X,
        model,
        method_name,
        seeds,
        kwargs,
        drop_axis=1,
        dtype=np.float64,
        meta=np.empty((0,), dtype=np.float64),
        name=f"skscoreflow-{method_name}-{uuid.uuid4().hex}",
    )


class _BlockSeeds:
    """The ``random_state`` of each block, from the caller's.

    None stays None (fresh randomness everywhere).  An int seeds the first block itself (a
    one-chunk array reproduces the NumPy call exactly) and, through ``SeedSequence`` spawn
    keys, a different seed for every later block: reusing one seed would give every block the
    same draws, correlated across blocks.  A ``RandomState`` is consumed once, now, like the
    NumPy call consumes it.
    """

    def __init__(self, random_state: Any) -> None:
        if random_state is None or (
            isinstance(random_state, Integral) and not isinstance(random_state, bool)
        ):
            self.base = random_state
        else:
            from sklearn.utils import check_random_state

            self.base = int(check_random_state(random_state).randint(0, 2**31 - 1))

    def __call__(self, index: int) -> int | None:
        if self.base is None or index == 0:
            return self.base
        return int(np.random.SeedSequence(int(self.base), spawn_key=(index,)).generate_state(1)[0])


def _evaluate_block(
    block: np.ndarray,
    est: Any,
    method_name: str,
    seeds: _BlockSeeds | None,
    kwargs: dict[str, Any],
    block_id: tuple[int, ...] | None = None,
) -> np.ndarray:
    """One block's rows through the estimator's NumPy path (runs in a Dask worker)."""
    block = np.asarray(block)
    if block.shape[0] == 0:
        # Masked or filtered arrays can have empty blocks; the NumPy path rejects 0 rows.
        return np.empty((0,), dtype=np.float64)
    if seeds is not None:
        kwargs = dict(kwargs, random_state=seeds(block_id[0] if block_id else 0))
    # Blocks running at once in one process (threaded scheduler, a distributed worker's
    # threads) share the cores like concurrent fits do, instead of each taking all of them.
    with fit_threads():
        out = getattr(est, method_name)(block, **kwargs)
    return np.asarray(out, dtype=np.float64)
