"""Dequantization: the conditional flow, the discrete-probability bounds, integer sampling."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from skscoreflow import ScoreFlowDensity, bits_per_dim
from skscoreflow.dequantization import VariationalDequantizer, check_integer_valued

LEVELS = 5


def _discrete_data(n: int = 2000, seed: int = 0) -> np.ndarray:
    """2 dims x 5 levels, correlated: every value can be enumerated."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, LEVELS, n)
    b = np.clip(a + rng.integers(-1, 2, n), 0, LEVELS - 1)
    return np.stack([a, b], 1)


GRID = np.stack(np.meshgrid(np.arange(LEVELS), np.arange(LEVELS)), -1).reshape(-1, 2)


@pytest.fixture(scope="module")
def fitted() -> dict[str, ScoreFlowDensity]:
    X = _discrete_data()
    out = {}
    for mode in ("uniform", "variational"):
        out[mode] = ScoreFlowDensity(
            dequantization=mode,
            hidden_layer_sizes=(64, 64),
            max_iter=600,
            dequantizer_max_iter=200,
            random_state=0,
        ).fit(X)
    return out


def test_check_integer_valued_names_the_column():
    X = np.array([[1.0, 2.0], [3.0, 4.5]])
    with pytest.raises(ValueError, match=r"column 1 .*4\.5"):
        check_integer_valued(X)
    with pytest.raises(ValueError, match=r"column 'b'"):
        check_integer_valued(X, ["a", "b"])
    check_integer_valued(np.array([[0.0, 16.0]]))  # integers pass


def test_untrained_dequantizer_is_uniform():
    deq = VariationalDequantizer(3).double()
    x = torch.randn(50, 3, dtype=torch.float64)
    u, log_q = deq.sample(x, torch.Generator().manual_seed(0))
    assert ((u > 0) & (u < 1)).all()
    assert torch.allclose(log_q, torch.zeros(50, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("d", [1, 2, 5])
def test_dequantizer_density_is_normalised(d):
    """E_q[1 / q(u|x)] = volume of the unit cube = 1 for any normalised q on (0,1)^d."""
    torch.manual_seed(0)
    deq = VariationalDequantizer(d, hidden_layer_sizes=(16,), n_couplings=3).double()
    with torch.no_grad():
        for p in deq.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.full((40_000, d), 0.7, dtype=torch.float64)
    with torch.no_grad():
        u, log_q = deq.sample(x, torch.Generator().manual_seed(1))
    w = torch.exp(-log_q)
    assert log_q.std() > 0.05, "perturbed flow should not be uniform"
    se = float(w.std() / math.sqrt(len(w)))
    assert abs(float(w.mean()) - 1.0) < 5 * se + 1e-3


def test_probabilities_of_all_values_sum_to_at_most_one(fitted):
    """exp(score_samples) is an unbiased estimate of P(x) for every K; summed over all 25
    values it estimates the model's total mass on the grid (<= 1, close to 1 when fitted)."""
    est = copy.deepcopy(fitted["variational"])
    est.set_params(n_dequantization_samples=32)
    total = float(np.exp(est.score_samples(GRID)).sum())
    assert total <= 1.0 + 0.05
    assert total > 0.85


def test_importance_weighted_bound_is_tighter(fitted):
    X = _discrete_data(300, seed=1)
    est = copy.deepcopy(fitted["uniform"])
    one = est.score_samples(X).mean()
    est.set_params(n_dequantization_samples=8)
    eight = est.score_samples(X).mean()
    assert eight >= one - 1e-3


def test_variational_improves_on_uniform(fitted):
    """Same score network (same seed), q(u|x) learned: the ELBO on log P(x) improves."""
    X = _discrete_data(500, seed=2)
    uni = fitted["uniform"].score_samples(X).mean()
    var = fitted["variational"].score_samples(X).mean()
    assert var > uni


def test_discrete_log_probability_below_zero_and_bits_per_dim(fitted):
    est = fitted["variational"]
    lp = est.score_samples(GRID)
    assert np.all(lp < 0.05)  # log-probabilities, not densities
    X = _discrete_data(200, seed=3)
    assert est.bits_per_dim(X) == pytest.approx(
        -est.score_samples(X).mean() / (2 * math.log(2))
    )
    assert bits_per_dim(est.score_samples(X), 2) > 0


def test_samples_are_integers_in_range(fitted):
    for est in fitted.values():
        S = est.sample(500, random_state=0)
        assert S.dtype == np.int64 and S.shape == (500, 2)
        assert S.min() >= 0 and S.max() <= LEVELS - 1
        np.testing.assert_array_equal(S, est.sample(500, random_state=0))
        # the correlation of the data (|a - b| <= 1) is mostly reproduced
        assert np.mean(np.abs(S[:, 0] - S[:, 1]) <= 1) > 0.8


def test_non_integer_input_is_rejected_with_the_column_name(fitted):
    X = _discrete_data(50).astype(float)
    X[3, 1] = 2.5
    with pytest.raises(ValueError, match="column 1"):
        ScoreFlowDensity(dequantization="uniform", max_iter=5).fit(X)
    with pytest.raises(ValueError, match="column 1"):
        fitted["uniform"].score_samples(X)
    df = pd.DataFrame(X, columns=["first", "second"])
    with pytest.raises(ValueError, match="'second'"):
        ScoreFlowDensity(dequantization="uniform", max_iter=5).fit(df)


def test_dequantized_model_round_trips(fitted, tmp_path):
    est = fitted["variational"]
    ref = est.score_samples(GRID)
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.score_samples(GRID), ref)
    path = tmp_path / "deq.pt"
    est.save(path)
    loaded = ScoreFlowDensity.load(path)
    np.testing.assert_array_equal(loaded.score_samples(GRID), ref)
    np.testing.assert_array_equal(loaded.sample(20, random_state=1), est.sample(20, random_state=1))
