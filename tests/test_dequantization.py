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
from skscoreflow.dequantization import VariationalDequantizer, _check_integer_valued

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
        # No Fourier features (the 2-D "auto" default would add 128): a few seconds per fit.
        out[mode] = ScoreFlowDensity(
            dequantization=mode,
            hidden_layer_sizes=(32, 32),
            fourier_features=0,
            max_iter=400,
            dequantizer_max_iter=200,
            random_state=0,
        ).fit(X)
    return out


def test_check_integer_valued_names_the_column():
    X = np.array([[1.0, 2.0], [3.0, 4.5]])
    with pytest.raises(ValueError, match=r"column 1 .*4\.5"):
        _check_integer_valued(X)
    with pytest.raises(ValueError, match=r"column 'b'"):
        _check_integer_valued(X, ["a", "b"])
    _check_integer_valued(np.array([[0.0, 16.0]]))  # integers pass


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
    est.set_params(n_dequantization_samples=8)
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
    assert bits_per_dim(est.score_samples(X), 2) > 0  # a code length: -log2 P(x) >= 0


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


# --------------------------------------------------------------------------------------------
# The K-draw bounds against an exact oracle (a Gaussian density on x + u, exact score)
# --------------------------------------------------------------------------------------------
MU, S = 1.7, 0.8  # continuous density N(MU, S^2) of y = x + u in the data's units


def _log_p_discrete(x: np.ndarray) -> np.ndarray:
    """log P(X = x) = log of the N(MU, S^2) mass of [x, x + 1)."""
    from scipy.stats import norm

    return np.log(norm.cdf((x + 1 - MU) / S) - norm.cdf((x - MU) / S))


def _elbo(x: np.ndarray) -> np.ndarray:
    """E_{u ~ U[0, 1)}[log N(x + u; MU, S^2)] in closed form (uniform dequantization ELBO)."""
    return -0.5 * np.log(2 * np.pi * S**2) - ((x - MU + 0.5) ** 2 + 1 / 12) / (2 * S**2)


@pytest.fixture(scope="module")
def exact_1d(gaussian_oracle):
    """A uniformly dequantized 1-D estimator whose network is swapped for the exact score of
    the N(MU, S^2) density (in the standardised units the network works in)."""
    rng = np.random.default_rng(0)
    X = np.floor(rng.normal(MU, S, size=(400, 1)))
    est = ScoreFlowDensity(dequantization="uniform", hidden_layer_sizes=(8,), max_iter=2,
                           dtype="float64", device="cpu", random_state=0).fit(X)
    m, s = float(est.mean_[0]), float(est.scale_[0])
    oracle = gaussian_oracle(est.sde_, torch.tensor([(MU - m) / s], dtype=torch.float64),
                             torch.tensor([[(S / s) ** 2]], dtype=torch.float64))
    est.network_ = oracle.score
    return est, X[:, 0]


@pytest.mark.parametrize("n_time_samples", [10, 100])
def test_bound_with_k_draws_stays_below_log_p(exact_1d, n_time_samples):
    """Regression: bound() used to log-mean-exp the K draws' Monte-Carlo estimates, which
    Jensen's inequality pushes upwards (here 0.07-0.09 nats above the exact ELBO, 10-13
    standard errors, and above log P(x) on average).  It now averages them: an unbiased
    estimate of the dequantization ELBO, hence below log P(x)."""
    est, x = exact_1d
    est.set_params(n_dequantization_samples=64)
    lb = est.bound(x[:, None], n_time_samples=n_time_samples, random_state=1)
    resid = lb - _elbo(x)
    se = resid.std(ddof=1) / math.sqrt(len(x))
    assert abs(resid.mean()) < 4 * se + 1e-3  # unbiased for the exact ELBO
    assert lb.mean() < _log_p_discrete(x).mean() + 3 * se  # hence not above log P(x)


def test_score_samples_importance_weighting_approaches_log_p(exact_1d):
    """With exact log-densities (the ODE with the exact score) the K-draw importance-weighted
    bound is valid and tightens with K: ELBO = E[IW_1] <= E[IW_16] <= log P(x)."""
    est, x = exact_1d
    x = x[:200]
    out = {}
    for k in (1, 16):
        est.set_params(n_dequantization_samples=k)
        out[k] = est.score_samples(x[:, None])
    log_p, elbo = _log_p_discrete(x), _elbo(x)
    gap = log_p.mean() - elbo.mean()
    assert gap > 0.02  # the test can tell the bounds apart
    resid = out[1] - elbo
    assert abs(resid.mean()) < 4 * resid.std(ddof=1) / math.sqrt(len(x))  # K = 1: the ELBO
    resid = out[16] - log_p
    se = resid.std(ddof=1) / math.sqrt(len(x))
    assert resid.mean() < 3 * se  # still a lower bound ...
    assert resid.mean() > -0.25 * gap  # ... and much tighter than the ELBO
    print(f"gap {gap:.4f}, IW_16 - log P {resid.mean():.4f} (se {se:.4f})")


def test_dequantized_log_prob_combines_draws():
    """The function behind both: mean of log p - log q, or its log-mean-exp."""
    from skscoreflow.dequantization import dequantized_log_prob

    x = torch.zeros(5, 1, dtype=torch.float64)
    log_p = lambda y: -3.0 * y[:, 0]  # noqa: E731 - a density shape, exact in u
    g = torch.Generator().manual_seed(0)
    mean = dequantized_log_prob(log_p, x, n_samples=4000, importance_weighted=False, generator=g)
    lme = dequantized_log_prob(log_p, x, n_samples=4000, generator=g)
    # E[-3u] = -1.5; log E[exp(-3u)] = log((1 - e^-3) / 3)
    assert torch.allclose(mean, torch.full_like(mean, -1.5), atol=0.05)
    assert torch.allclose(lme, torch.full_like(lme, math.log((1 - math.exp(-3)) / 3)), atol=0.02)
    with pytest.raises(ValueError, match="n_samples"):
        dequantized_log_prob(log_p, x, n_samples=0)


def test_only_exact_log_densities_are_importance_weighted(exact_1d, monkeypatch):
    """score_samples log-mean-exps the K draws only with the exact divergence; a Hutchinson
    estimate (like the bound's Monte-Carlo estimate) is averaged instead."""
    import skscoreflow._estimator as mod

    est, x = exact_1d
    seen = []
    real = mod.dequantized_log_prob

    def spy(*args, **kwargs):
        seen.append(kwargs["importance_weighted"])
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "dequantized_log_prob", spy)
    rows = x[:5, None]
    try:
        est.set_params(n_dequantization_samples=2, divergence="hutchinson")
        est.score_samples(rows)
        est.set_params(divergence="auto")
        est.score_samples(rows)
        est.bound(rows, n_time_samples=5)
    finally:
        est.set_params(divergence="auto")
    assert seen == [False, True, False]
