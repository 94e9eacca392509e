"""Streaming and out-of-core data: ``partial_fit``, memmaps and row-sliceable array-likes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from skscoreflow import ScoreFlowDensity, _data
from skscoreflow._preprocessing import Standardizer

SMALL = dict(hidden_layer_sizes=(16,), random_state=0, dtype="float64", device="cpu")


def gaussian(n: int = 512, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 2)) * [1.0, 2.0] + [0.3, -1.0]


def memmap_of(X: np.ndarray, tmp_path, name: str = "X.dat") -> np.memmap:
    m = np.memmap(tmp_path / name, dtype=X.dtype, mode="w+", shape=X.shape)
    m[:] = X
    m.flush()
    return np.memmap(tmp_path / name, dtype=X.dtype, mode="r", shape=X.shape)


class RowReader:
    """A row-sliceable array-like (like an h5py dataset) that records every read."""

    def __init__(self, X: np.ndarray) -> None:
        self._X, self.shape, self.dtype, self.reads = X, X.shape, X.dtype, []

    def __getitem__(self, key):
        block = self._X[key]
        self.reads.append(block.shape[0])
        return block


def weights(est: ScoreFlowDensity) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in est.network_.parameters()]).numpy()


# ---------------------------------------------------------------------------- partial_fit
def test_partial_fit_over_the_batches_equals_fit_on_their_concatenation() -> None:
    X, B, k = gaussian(), 64, 8
    # The "auto" settings fixed: fit would resolve them from all rows, partial_fit from the
    # first chunk.
    params = dict(SMALL, shuffle=False, standardize=False, max_iter=k, batch_size=B,
                  early_stopping=False, gaussian_reference="diagonal", dropout=0.0)
    full = ScoreFlowDensity(**params).fit(X)
    streamed = ScoreFlowDensity(**params)
    for j in range(k):
        streamed.partial_fit(X[j * B : (j + 1) * B])
    assert streamed.n_iter_ == full.n_iter_ == k
    np.testing.assert_array_equal(streamed.loss_curve_, full.loss_curve_)
    np.testing.assert_array_equal(weights(streamed), weights(full))


def test_partial_fit_continues_optimizer_schedule_and_standardisation() -> None:
    X = gaussian(600)
    est = ScoreFlowDensity(**SMALL, max_iter=50, batch_size=100)
    est.partial_fit(X[:300])
    mean, state = est.mean_.copy(), est._train_state
    assert est.n_iter_ == 3
    est.partial_fit(X[300:] * 5)  # other moments: the first chunk's standardisation stays
    np.testing.assert_array_equal(est.mean_, mean)
    assert est._train_state is state and est.n_iter_ == 6 and len(est.loss_curve_) == 6
    # One optimizer across calls: Adam's step count is the total.
    step = next(iter(est._train_state.optimizer.state.values()))["step"]
    assert int(step) == 6
    # Different chunks draw different noise (the random stream continues).
    again = ScoreFlowDensity(**SMALL, max_iter=50, batch_size=100)
    again.partial_fit(X[:300])
    again.partial_fit(X[:300])
    assert again.loss_curve_[3:] != again.loss_curve_[:3]


def test_partial_fit_survives_pickling_and_checks_width() -> None:
    X = gaussian(256)
    est = ScoreFlowDensity(**SMALL, max_iter=20, batch_size=64).partial_fit(X)
    est = pickle.loads(pickle.dumps(est)).partial_fit(X)
    assert est.n_iter_ == 8
    with pytest.raises(ValueError, match="features"):
        est.partial_fit(np.zeros((10, 3)))


def test_partial_fit_trains_the_variational_dequantizer_on_each_chunk() -> None:
    X = np.random.default_rng(0).integers(0, 4, size=(160, 3))
    est = ScoreFlowDensity(**SMALL, max_iter=10, batch_size=40, dequantization="variational",
                           dequantizer_hidden_layer_sizes=(8,), dequantizer_n_couplings=2)
    est.partial_fit(X[:80]).partial_fit(X[80:])
    assert len(est.dequantizer_loss_curve_) == 4 and est.n_iter_ == 4
    assert np.isfinite(est.score_samples(X[:5])).all()


def test_fit_resets_partial_fit_state() -> None:
    X = gaussian(256)
    est = ScoreFlowDensity(**SMALL, max_iter=4, batch_size=64).partial_fit(X)
    est.fit(X)
    assert est.n_iter_ == 4 and est._partial_rng is None


# ---------------------------------------------------------------------------- out-of-core fit
@pytest.mark.parametrize("options", [
    {},
    {"early_stopping": True, "validation_fraction": 0.2, "max_iter": 60},
    {"dtype": "float32"},
])
def test_memmap_fit_equals_in_memory_fit(tmp_path, options) -> None:
    X = gaussian(400)
    params = {**SMALL, "max_iter": 20, "batch_size": 64, **options}
    in_memory = ScoreFlowDensity(**params).fit(X)
    mapped = ScoreFlowDensity(**params).fit(memmap_of(X, tmp_path))
    np.testing.assert_array_equal(mapped.loss_curve_, in_memory.loss_curve_)
    np.testing.assert_array_equal(weights(mapped), weights(in_memory))
    np.testing.assert_array_equal(mapped.mean_, in_memory.mean_)


def test_dequantized_memmap_fit_equals_in_memory_fit(tmp_path) -> None:
    X = np.random.default_rng(1).integers(0, 17, size=(300, 4)).astype(np.uint8)
    params = dict(SMALL, max_iter=10, batch_size=50, dequantization="uniform")
    in_memory = ScoreFlowDensity(**params).fit(X)
    mapped = ScoreFlowDensity(**params).fit(memmap_of(X, tmp_path))
    np.testing.assert_array_equal(weights(mapped), weights(in_memory))
    np.testing.assert_array_equal(mapped.data_max_, in_memory.data_max_)


def test_array_like_is_read_a_batch_at_a_time(monkeypatch) -> None:
    monkeypatch.setattr(_data, "CHUNK_ROWS", 100)
    X = gaussian(1000)
    reader = RowReader(X)
    params = dict(SMALL, max_iter=15, batch_size=64)
    est = ScoreFlowDensity(**params).fit(reader)
    assert max(reader.reads) <= 100  # chunks of the scan, batches of training: never the data
    np.testing.assert_array_equal(weights(est), weights(ScoreFlowDensity(**params).fit(X)))


def test_out_of_core_input_is_checked_in_chunks(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(_data, "CHUNK_ROWS", 50)
    X = gaussian(200)
    X[130, 1] = np.nan
    with pytest.raises(ValueError, match="row 130"):
        ScoreFlowDensity(**SMALL, max_iter=2).fit(memmap_of(X, tmp_path))
    with pytest.raises(ValueError, match="integer"):
        ScoreFlowDensity(**SMALL, max_iter=2, dequantization="uniform").fit(
            memmap_of(gaussian(200), tmp_path, "Y.dat"))


def test_chunked_moments_match_numpy() -> None:
    X = gaussian(1000) * 1e3 + 1e6  # a large offset: the naive one-pass formula would fail
    mean, var = _data.column_moments(X, chunk_rows=77)
    np.testing.assert_allclose(mean, X.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(var, X.var(axis=0), rtol=1e-10)
    st = Standardizer.fit(X)  # one chunk: exactly NumPy's moments
    np.testing.assert_array_equal(st.mean, X.mean(axis=0))


# ---------------------------------------------------------------------------- bounded evaluation
@pytest.fixture(scope="module")
def fitted() -> ScoreFlowDensity:
    return ScoreFlowDensity(**SMALL, max_iter=100, batch_size=128).fit(gaussian())


def test_score_samples_on_a_memmap_goes_chunk_by_chunk(fitted, tmp_path, monkeypatch) -> None:
    X = gaussian(45, seed=3)
    expected = fitted.score_samples(X)
    monkeypatch.setattr(_data, "CHUNK_ROWS", 20)
    calls: list[int] = []
    method = type(fitted).score_samples

    def spy(self, Z):
        calls.append(len(Z))
        return method(self, Z)

    monkeypatch.setattr(type(fitted), "score_samples", spy)
    got = fitted.score_samples(memmap_of(X, tmp_path))
    assert calls[1:] == [20, 20, 5]  # the outer call, then one per chunk
    # Other batch mates change the shared adaptive steps only within the tolerance.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)


def test_bound_and_sample_in_chunks(fitted, tmp_path, monkeypatch) -> None:
    X = gaussian(30, seed=4)
    whole = fitted.bound(X, n_time_samples=50, random_state=2)
    np.testing.assert_array_equal(fitted.bound(memmap_of(X, tmp_path), n_time_samples=50,
                                               random_state=2), whole)  # one chunk
    monkeypatch.setattr(_data, "CHUNK_ROWS", 8)
    chunked = fitted.bound(memmap_of(X, tmp_path, "b.dat"), n_time_samples=50, random_state=2)
    assert chunked.shape == (30,) and np.isfinite(chunked).all()
    assert np.abs(chunked - whole).mean() < 0.5  # other draws, same estimate
    a = fitted.sample(20, random_state=5, method="sde", n_steps=20)
    b = fitted.sample(20, random_state=5, method="sde", n_steps=20)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (20, 2)


def test_fit_on_a_dask_array_reads_it_by_rows() -> None:
    da = pytest.importorskip("dask.array")
    X = gaussian(400)
    params = dict(SMALL, max_iter=10, batch_size=64)
    lazy = ScoreFlowDensity(**params).fit(da.from_array(X, chunks=(100, 2)))
    np.testing.assert_array_equal(lazy.loss_curve_, ScoreFlowDensity(**params).fit(X).loss_curve_)
