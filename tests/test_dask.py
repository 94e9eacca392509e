"""``score_samples`` and ``bound`` on Dask arrays: lazy, block-wise, the model in the graph once.

Tolerances (measured on this file's models, 60 rows in blocks of 16):

* a fixed-step solver (euler) in float64 makes every row's result independent of the other rows
  of its batch, so block-wise and whole-array results agree to rounding (measured: 0.0);
* the default adaptive dopri5 picks its steps for a whole batch, so a row's value moves within
  the solver's own error when the batch changes: dask vs NumPy 1.8e-4 (float32) and 2.9e-4
  (float64) nats at the default ``rtol = atol = 1e-5``, while each of them is 5e-4 to 8e-4
  from a ``1e-11``-tolerance reference; ``1e-3`` is checked;
* ``bound`` is a Monte-Carlo estimate whose draws are consumed row after row across the whole
  batch, so no block can reproduce the NumPy call's draws (except a single-chunk array, which
  does exactly); each block draws its own sample and the two agree in distribution.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.datasets import make_moons
from sklearn.exceptions import NotFittedError

from skscoreflow import ScoreFlowDensity

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
cloudpickle = pytest.importorskip("cloudpickle")

# No Fourier features and one small layer: each fit takes well under a second.
# early_stopping=False: a trained network (30 steps would often keep the untrained one, whose
# bound has no sampling noise at all).
TINY = {"hidden_layer_sizes": (16,), "fourier_features": 0, "max_iter": 30, "batch_size": 64,
        "early_stopping": False,
        "random_state": 0, "device": "cpu"}
# Fixed-step solver (100 Euler steps: the cheapest) in float64: a row's result does not
# depend on the other rows of its batch.
EXACT = {**TINY, "dtype": "float64", "solver": "euler"}
CHUNKS = (16, 2)


@pytest.fixture(scope="module")
def rows() -> tuple[np.ndarray, np.ndarray]:
    X, _ = make_moons(200, noise=0.1, random_state=0)
    X_test, _ = make_moons(60, noise=0.1, random_state=1)
    return X, X_test


@pytest.fixture(scope="module")
def exact(rows) -> ScoreFlowDensity:
    return ScoreFlowDensity(**EXACT).fit(rows[0])


@pytest.fixture(scope="module")
def adaptive(rows) -> ScoreFlowDensity:
    return ScoreFlowDensity(**TINY).fit(rows[0])


def _value(node: object) -> object:
    """A graph value as data (dask >= 2024.12 wraps literals in ``DataNode``)."""
    return node.value if type(node).__name__ == "DataNode" else node


def test_result_is_lazy_and_the_model_is_one_key(exact, rows, monkeypatch):
    calls = []
    real = ScoreFlowDensity._evaluate

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ScoreFlowDensity, "_evaluate", counting)
    dX = da.from_array(rows[1], chunks=CHUNKS)
    lazy = exact.score_samples(dX)
    assert isinstance(lazy, da.Array) and lazy.dtype == np.float64
    assert lazy.shape == (60,) and lazy.chunks == ((16, 16, 16, 12),)
    assert calls == []  # nothing evaluated before compute

    graph = dict(lazy.__dask_graph__())
    model_keys = [k for k, v in graph.items() if _value(v) is exact]
    assert len(model_keys) == 1
    # No task carries the estimator inside it: each refers to the model key.
    model_size = len(pickle.dumps(exact))
    for key, node in graph.items():
        if key not in model_keys:
            assert len(cloudpickle.dumps(node)) < model_size / 10, key

    lazy.compute(scheduler="threads")
    assert len(calls) == 4  # one NumPy evaluation per block


def test_equals_numpy_threads(exact, rows):
    X = rows[1]
    got = exact.score_samples(da.from_array(X, chunks=CHUNKS)).compute(scheduler="threads")
    assert_allclose(got, exact.score_samples(X), rtol=0, atol=1e-10)


@pytest.mark.slow  # spawns 2 processes that import torch: 10-30 s on 2 shared cores
def test_equals_numpy_processes(exact, rows):
    """Two spawned worker processes: the estimator is pickled into them and back."""
    X = rows[1]
    lazy = exact.score_samples(da.from_array(X, chunks=(30, 2)))
    got = lazy.compute(scheduler="processes", num_workers=2, chunksize=1)
    assert_allclose(got, exact.score_samples(X), rtol=0, atol=1e-10)


def test_adaptive_solver_agrees_within_its_tolerance(adaptive, rows):
    X = rows[1]
    got = adaptive.score_samples(da.from_array(X, chunks=CHUNKS)).compute()
    assert_allclose(got, adaptive.score_samples(X), rtol=0, atol=1e-3)


def test_column_chunks_and_unknown_row_chunks(exact, rows):
    X = rows[1]
    ref = exact.score_samples(X)
    by_column = exact.score_samples(da.from_array(X, chunks=(16, 1)))
    assert by_column.chunks == ((16, 16, 16, 12),)
    assert_allclose(by_column.compute(), ref, rtol=0, atol=1e-10)

    dX = da.from_array(X, chunks=CHUNKS)
    keep = (X[:, 0] > 0.5) & (np.arange(len(X)) >= 16)  # the first block keeps no row at all
    masked = exact.score_samples(dX[da.from_array(keep, chunks=CHUNKS[0])])
    assert np.isnan(masked.shape[0])
    assert_allclose(masked.compute(), ref[keep], rtol=0, atol=1e-10)


def test_eager_validation(exact, rows):
    X = rows[1]
    with pytest.raises(ValueError, match="X has 3 features, but ScoreFlowDensity is expecting 2"):
        exact.score_samples(da.from_array(np.ones((10, 3)), chunks=5))
    with pytest.raises(ValueError, match="0 sample"):
        exact.score_samples(da.from_array(np.ones((0, 2)), chunks=5))
    with pytest.raises(ValueError, match="2-D"):
        exact.score_samples(da.ones(10, chunks=5))
    with pytest.raises(NotFittedError):
        ScoreFlowDensity(**EXACT).score_samples(da.from_array(X, chunks=CHUNKS))
    with pytest.raises(ValueError, match="n_time_samples"):  # bound's own checks first
        exact.bound(da.from_array(X, chunks=CHUNKS), n_time_samples=0)
    # What only the data can tell surfaces at compute, from the NumPy path.
    bad = X.copy()
    bad[20, 0] = np.nan
    lazy = exact.score_samples(da.from_array(bad, chunks=CHUNKS))
    with pytest.raises(ValueError, match="NaN"):
        lazy.compute()


def test_score_and_bits_per_dim_compute(exact, rows):
    X = rows[1]
    dX = da.from_array(X, chunks=CHUNKS)
    score = exact.score(dX)
    assert type(score) is float
    assert score == pytest.approx(exact.score(X), abs=1e-10)
    bpd = exact.bits_per_dim(dX)
    assert type(bpd) is float and bpd == pytest.approx(exact.bits_per_dim(X), abs=1e-10)


def test_bound_blocks_draw_their_own_sample(exact, rows):
    """One chunk: the NumPy call's draws exactly.  Several: a different, equally distributed
    sample per block, reproducible for the same chunking and random_state."""
    X = rows[1]
    kw = {"n_time_samples": 50, "random_state": 0}
    ref = exact.bound(X, **kw)
    one = exact.bound(da.from_array(X, chunks=-1), **kw).compute()
    assert_array_equal(one, ref)

    blocked = exact.bound(da.from_array(X, chunks=CHUNKS), **kw)
    got = blocked.compute()
    assert_array_equal(exact.bound(da.from_array(X, chunks=CHUNKS), **kw).compute(), got)
    diff = got - ref
    assert np.abs(diff).max() > 0  # the draws depend on the block...
    # ...their distribution does not: the per-row differences of two independent estimates
    # have mean zero (a z-test at 4 standard errors).
    assert abs(diff.mean()) < 4 * diff.std(ddof=1) / np.sqrt(len(diff))

    # Each block is seeded from random_state and its index: the same rows in 3 blocks get
    # 3 different samples (one seed for all would repeat the draws, correlated across blocks).
    same = da.from_array(np.tile(X[:10], (3, 1)), chunks=(10, 2))
    b = exact.bound(same, **kw).compute().reshape(3, 10)
    assert not np.array_equal(b[0], b[1]) and not np.array_equal(b[1], b[2])
    assert_array_equal(b[0], exact.bound(X[:10], **kw))


def test_dequantized_model(rows):
    rng = np.random.default_rng(0)
    ints = rng.integers(0, 5, size=(200, 2))
    est = ScoreFlowDensity(**EXACT, dequantization="uniform").fit(ints)
    X = ints[:40]
    dX = da.from_array(X, chunks=(20, 2))
    # One chunk reproduces the NumPy call's dequantization draws exactly.
    assert_allclose(est.score_samples(da.from_array(X, chunks=-1)).compute(),
                    est.score_samples(X), rtol=0, atol=1e-10)
    # Several chunks: each block draws u with the same fixed seed (blocks of equal rows get
    # equal values), so rows match the NumPy call on their own block.
    got = est.score_samples(dX).compute()
    assert_allclose(got[20:], est.score_samples(X[20:]), rtol=0, atol=1e-10)
    assert np.isfinite(got).all()
    b = est.bound(dX, n_time_samples=20, random_state=0).compute()
    assert b.shape == (40,) and np.isfinite(b).all()
    with pytest.raises(ValueError, match="column 0"):
        est.score_samples(dX + 0.5).compute()


def test_dask_is_not_imported_for_numpy_inputs(exact, rows, monkeypatch):
    """The hook checks sys.modules first: without dask there, NumPy inputs never touch it."""
    import sys

    from skscoreflow import _dask

    monkeypatch.delitem(sys.modules, "dask")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _dask.is_dask_collection(rows[1])
    assert "dask" not in sys.modules
