"""The "auto" settings that adapt to the shape of the data (``_params``' resolution rules)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.base import clone

from skscoreflow import ScoreFlowDensity
from skscoreflow import _params
from skscoreflow._data import standardized_covariance
from skscoreflow.nets import ScoreMLP
from skscoreflow.sde import VPSDE

#: Rows of 2-D data from which "auto" early stopping is off.
LARGE_2D = 2 * _params._EARLY_STOPPING_ROWS_PER_FEATURE


def _correlated(n: int, d: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    A = np.eye(d) + 0.9 * np.triu(rng.standard_normal((d, d)), 1)
    return rng.standard_normal((n, d)) @ A.T * np.arange(1, d + 1) + 5.0


# ----------------------------------------------------------------------------- the rule
@pytest.mark.parametrize(
    ("n", "d", "expected"),
    [(10, 2, True), (1_000, 2, True), (9_999, 2, True), (10_000, 2, False), (20_000, 2, False),
     (10_000, 8, True), (39_999, 8, True), (40_000, 8, False), (1_437, 64, True)],
)
def test_early_stopping_below_5000_rows_per_feature(n, d, expected):
    assert _params.resolve_early_stopping("auto", n, d) is expected


@pytest.mark.parametrize(
    ("n", "d", "expected"),
    [(1_000, 16, "full"), (1_000, 32, "full"), (1_000, 8, "diagonal"), (799, 8, "full"),
     (800, 8, "diagonal"), (120, 4, "full"), (10_000, 32, "diagonal"),
     (50_000, 3_072, "full"), (10, 1, "diagonal")],  # one feature: nothing to correlate
)
def test_full_reference_below_100_rows_per_feature(n, d, expected):
    assert _params.resolve_gaussian_reference("auto", n, d) == expected


@pytest.mark.parametrize(
    ("n", "expected"),
    [(10, 0.3), (1_000, 0.3), (1_437, 0.25), (3_162, 0.15), (9_999, 0.0), (10_000, 0.0),
     (10 * LARGE_2D, 0.0)],
)
def test_auto_dropout_falls_log_linearly_from_1000_to_10000_rows(n, expected):
    assert _params.resolve_dropout("auto", n) == expected


@pytest.mark.parametrize("n", [LARGE_2D, 10 * LARGE_2D])
def test_large_data_keep_the_large_data_defaults(n):
    assert _params.resolve_early_stopping("auto", n, 2) is False
    assert _params.resolve_dropout("auto", n) == 0.0
    assert _params.resolve_gaussian_reference("auto", n, 2) == "diagonal"


@pytest.mark.parametrize("n", [10, 1_000, 10 * LARGE_2D])
def test_explicit_settings_always_win(n):
    assert _params.resolve_early_stopping(False, n, 2) is False
    assert _params.resolve_early_stopping(True, n, 2) is True
    assert _params.resolve_dropout(0.0, n) == 0.0 and _params.resolve_dropout(0.15, n) == 0.15
    for ref in ("full", "diagonal"):
        assert _params.resolve_gaussian_reference(ref, n, 4) == ref


@pytest.mark.parametrize(
    ("max_iter", "n_train", "batch_size", "expected"),
    [
        (10_000, 900, 1024, 50),  # one full-batch step per epoch: every 50 steps
        (10_000, 3_000, 1024, 150),  # 3 steps per epoch
        (10_000, 9_000, 1024, 200),  # capped at max_iter // 50
        (10_000, None, 1024, 200),  # unknown size (partial_fit): the cap
        (1_000, 900, 1024, 50),  # never below 50
        (100_000, 50_000, 128, 2_000),
    ],
)
def test_validation_interval(max_iter, n_train, batch_size, expected):
    assert _params.validation_interval(max_iter, n_train, batch_size) == expected


# ------------------------------------------------------------------ through the estimator
def test_fit_resolves_auto_and_get_params_keeps_what_was_passed():
    X = _correlated(250)  # 3 features: fewer than 100 rows per feature
    est = ScoreFlowDensity(max_iter=60, hidden_layer_sizes=(16,), random_state=0)
    params = est.get_params()
    est.fit(X)
    assert est.get_params() == params  # "auto" stays "auto"
    assert params["early_stopping"] == params["dropout"] == params["gaussian_reference"] == "auto"
    assert est.early_stopping_ is True and est.dropout_ == 0.3
    assert est.gaussian_reference_ == "full"
    assert est.validation_scores_ is not None and est._train_state.validation_iters[0] == 0
    assert est.network_.full_reference and est.network_.dropout == 0.3
    st = (X - X.mean(0)) / X.std(0)
    np.testing.assert_allclose(est.reference_covariance_, np.cov(st.T, bias=True), atol=1e-10)
    clone_ = clone(est)
    assert clone_.get_params() == params and not hasattr(clone_, "early_stopping_")


def test_explicit_settings_override_auto_in_fit():
    X = _correlated(400)
    est = ScoreFlowDensity(max_iter=20, hidden_layer_sizes=(16,), random_state=0,
                           early_stopping=False, dropout=0.0, gaussian_reference="diagonal")
    est.fit(X)
    assert est.early_stopping_ is False and est.validation_scores_ is None
    assert est.dropout_ == 0.0 and est.gaussian_reference_ == "diagonal"
    assert est.reference_covariance_ is None and not est.network_.full_reference
    assert est.n_iter_ == 20


def test_large_data_fit_keeps_the_plain_recipe():
    X = np.random.default_rng(0).standard_normal((LARGE_2D, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" early stopping is off: nothing to warn about
        est = ScoreFlowDensity(max_iter=2, hidden_layer_sizes=(8,), batch_size=256,
                               random_state=0).fit(X)
    assert est.early_stopping_ is False and est.dropout_ == 0.0
    assert est.gaussian_reference_ == "diagonal" and est.reference_covariance_ is None


def test_auto_early_stopping_does_not_warn_when_it_never_triggers():
    X = _correlated(300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ScoreFlowDensity(max_iter=60, hidden_layer_sizes=(16,), random_state=0).fit(X)


def test_partial_fit_never_early_stops():
    X = _correlated(250)
    est = ScoreFlowDensity(hidden_layer_sizes=(16,), batch_size=100, random_state=0)
    est.partial_fit(X)
    assert est.early_stopping_ is False and est.validation_scores_ is None
    assert est.gaussian_reference_ == "full"  # fixed by the first chunk, like the standardisation


def test_warm_start_rejects_a_changed_reference_or_dropout():
    X = _correlated(300)
    est = ScoreFlowDensity(max_iter=10, hidden_layer_sizes=(16,), warm_start=True,
                           random_state=0, early_stopping=False).fit(X)
    for change in ({"gaussian_reference": "diagonal"}, {"dropout": 0.1}):
        est.set_params(**change)
        with pytest.raises(ValueError, match=next(iter(change))):
            est.fit(X)
        est.set_params(gaussian_reference="auto", dropout="auto")


@pytest.mark.parametrize("bad", [{"dropout": 1.0}, {"dropout": -0.1}, {"dropout": "high"},
                                 {"gaussian_reference": "spherical"},
                                 {"early_stopping": "sometimes"}])
def test_bad_auto_parameters_are_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ScoreFlowDensity(max_iter=2, **bad).fit(_correlated(50))


# ------------------------------------------------------------------ the Gaussian reference
def test_untrained_full_reference_is_the_fitted_gaussian():
    """Oracle: with a zero network output, the model's density of the data is the Gaussian
    with the data's mean and covariance, diffused to the cutoff (``C + sigma(eps)^2 /
    alpha(eps)^2 I`` in standardised units) -- what GaussianMixture(1) fits, up to that."""
    X = _correlated(2_000, d=3)
    est = ScoreFlowDensity(max_iter=1, learning_rate=1e-12, hidden_layer_sizes=(8,),
                           gaussian_reference="full", early_stopping=False, dropout=0.0,
                           random_state=0,
                           rtol=1e-7, atol=1e-7, dtype="float64").fit(X)
    sde, eps = est.sde_, est.eps_
    t = torch.tensor([eps], dtype=torch.float64)
    alpha, sigma = float(sde.mean_coeff(t)), float(sde.std(t))
    C = est.reference_covariance_
    # z_eps = alpha z_0 + sigma n: evaluating x as z_eps gives N(0, alpha^2 C + sigma^2 I) in z.
    cov_z = alpha**2 * C + sigma**2 * np.eye(3)
    Z = (X[:50] - est.mean_) / est.scale_
    expected = multivariate_normal(np.zeros(3), cov_z).logpdf(Z) - np.log(est.scale_).sum()
    np.testing.assert_allclose(est.score_samples(X[:50]), expected, atol=2e-3)


def test_full_reference_beats_the_diagonal_one_on_correlated_data_before_training():
    X = _correlated(1_000, d=4)
    kw = dict(max_iter=1, learning_rate=1e-12, hidden_layer_sizes=(8,), early_stopping=False,
              random_state=0)
    full = ScoreFlowDensity(gaussian_reference="full", **kw).fit(X)
    diag = ScoreFlowDensity(gaussian_reference="diagonal", **kw).fit(X)
    # The data's correlations are worth -log det(R) / 2 nats per row (R: their correlation
    # matrix), the Gaussian's multi-information; the cutoff's smoothing blurs it a little.
    gain = -0.5 * np.linalg.slogdet(np.corrcoef(X.T))[1]
    assert gain > 0.5
    assert full.score(X) - diag.score(X) == pytest.approx(gain, abs=0.05)


def test_standardized_covariance_in_chunks_and_dequantized():
    rng = np.random.default_rng(1)
    X = rng.integers(0, 5, size=(1_001, 3)).astype(float)
    X[:, 2] += X[:, 0]
    mean, scale = X.mean(0), X.std(0)
    whole = standardized_covariance(X, mean, scale)
    np.testing.assert_allclose(whole, np.corrcoef(X.T), atol=1e-12)
    np.testing.assert_allclose(standardized_covariance(X, mean, scale, chunk_rows=7), whole,
                               atol=1e-12)
    # x + u with independent u ~ U[0, 1): the covariance gains I / 12 before scaling.
    deq = standardized_covariance(X, mean, np.ones(3), dequantized=True)
    np.testing.assert_allclose(deq, np.cov(X.T, bias=True) + np.eye(3) / 12, atol=1e-12)


def test_reference_covariance_floor_keeps_degenerate_data_finite():
    # A constant column and a duplicated one: a singular covariance.
    C = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    net = ScoreMLP(3, VPSDE(), hidden_layer_sizes=(8,), reference_covariance=C)
    assert float(net.ref_eigvals.min()) == pytest.approx(1e-4)
    out = net(torch.randn(4, 3), torch.full((4,), 1e-3))
    assert bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match="shape"):
        ScoreMLP(3, VPSDE(), reference_covariance=np.eye(2))
    with pytest.raises(ValueError, match="finite"):
        ScoreMLP(2, VPSDE(), reference_covariance=np.array([[1.0, np.nan], [np.nan, 1.0]]))


def test_full_reference_survives_config_round_trip():
    C = np.array([[1.0, 0.6], [0.6, 1.0]])
    net = ScoreMLP(2, VPSDE(), hidden_layer_sizes=(8,), reference_covariance=C)
    copy_ = ScoreMLP.from_config(net.config())
    copy_.load_state_dict(net.state_dict())
    x, t = torch.randn(5, 2), torch.full((5,), 0.2)
    torch.testing.assert_close(copy_(x, t), net(x, t))
