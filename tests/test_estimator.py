"""Behaviour of :class:`ScoreFlowDensity` that scikit-learn's checks never exercise for a
density estimator: reproducibility, sampling, warm starts, untouched global RNGs, no mutation
on evaluation, model selection with GridSearchCV, and the invariants a density must satisfy
(change of units, row permutation, normalisation)."""

from __future__ import annotations

import copy
import warnings

import joblib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone
from sklearn.datasets import make_moons
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, KFold

from skscoreflow import ScoreFlowDensity

# device="cpu": these tests check CPU contracts (bitwise reproducibility, subset invariance,
# device_), which must hold on a machine with a GPU too; the CUDA path has its own tests
# (skipped without CUDA) and test_device_auto_resolves checks the default.
# early_stopping=False: 30 steps would often keep the untrained (Gaussian) network, which makes
# many checks trivial; tests/test_defaults.py covers the "auto" settings.
TINY = dict(hidden_layer_sizes=(16,), max_iter=30, batch_size=64, random_state=0, device="cpu",
            early_stopping=False)
# Fixed-step solver in float64: a row's result does not depend on the other rows (up to BLAS
# rounding across batch sizes).
EXACT = dict(TINY, dtype="float64", solver="rk4")


@pytest.fixture(scope="module")
def fitted(data):
    X, _ = data
    return ScoreFlowDensity(**TINY).fit(X)


@pytest.fixture(scope="module")
def fitted_exact(data):
    X, _ = data
    return ScoreFlowDensity(**EXACT).fit(X)


# ----------------------------------------------------------------------------- fit / outputs
def test_device_auto_resolves(data):
    """The default device is CUDA where it is available, else the CPU."""
    X, _ = data
    est = ScoreFlowDensity(**dict(TINY, device="auto", max_iter=2)).fit(X)
    assert est.device_.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_fitted_attributes(fitted, data):
    X, _ = data
    assert fitted.n_features_in_ == 2
    assert not hasattr(fitted, "feature_names_in_")
    assert fitted.n_iter_ == TINY["max_iter"]
    assert len(fitted.loss_curve_) == TINY["max_iter"]
    assert np.all(np.isfinite(fitted.loss_curve_))
    assert fitted.device_ == torch.device("cpu")
    assert fitted.early_stopping_ is False
    assert fitted.validation_scores_ is None
    assert fitted.best_validation_score_ is None
    # 200 rows of 2 features: the most dropout, and enough rows for the diagonal reference.
    assert fitted.dropout_ == 0.3 and fitted.gaussian_reference_ == "diagonal"
    assert fitted.fit_time_ > 0
    assert_allclose(fitted.mean_, X.mean(axis=0))
    assert_allclose(fitted.scale_, X.std(axis=0))
    assert not fitted.network_.training
    assert all(not p.requires_grad for p in fitted.network_.parameters())


def test_score_is_mean_of_score_samples(fitted, data):
    _, X_test = data
    ll = fitted.score_samples(X_test)
    assert ll.shape == (len(X_test),)
    assert ll.dtype == np.float64
    assert np.all(np.isfinite(ll))
    assert fitted.score(X_test) == pytest.approx(ll.mean(), rel=1e-12)
    # y is accepted and ignored, as in every sklearn density estimator
    assert fitted.score(X_test, np.zeros(len(X_test))) == pytest.approx(ll.mean(), rel=1e-12)


def test_bound_shape_and_seed(fitted, data):
    _, X_test = data
    b0 = fitted.bound(X_test, n_time_samples=50, random_state=0)
    assert b0.shape == (len(X_test),) and b0.dtype == np.float64
    assert np.all(np.isfinite(b0))
    assert_array_equal(b0, fitted.bound(X_test, n_time_samples=50, random_state=0))
    assert not np.array_equal(b0, fitted.bound(X_test, n_time_samples=50, random_state=1))


def test_sample_shape_dtype_and_seeds(fitted):
    s0 = fitted.sample(50, random_state=0)
    assert s0.shape == (50, 2)
    assert s0.dtype == np.float64
    assert np.all(np.isfinite(s0))
    assert_array_equal(s0, fitted.sample(50, random_state=0))
    assert not np.array_equal(s0, fitted.sample(50, random_state=1))
    # a RandomState instance is accepted and advanced: two draws differ
    rs = np.random.RandomState(0)
    assert not np.array_equal(fitted.sample(5, random_state=rs), fitted.sample(5, random_state=rs))
    # default n_samples=1
    assert fitted.sample().shape == (1, 2)


def test_sample_without_seed_is_fresh(fitted):
    assert not np.array_equal(fitted.sample(5), fitted.sample(5))


def test_sample_reverse_sde(fitted):
    s = fitted.sample(8, random_state=0, method="sde")
    assert s.shape == (8, 2) and s.dtype == np.float64
    assert np.all(np.isfinite(s))
    assert_array_equal(s, fitted.sample(8, random_state=0, method="sde"))


def test_sample_is_in_data_units():
    """Samples are mapped back through the standardisation: far-away, wide data gives
    samples there too."""
    rng = np.random.default_rng(0)
    X = rng.normal(loc=[100.0, -50.0], scale=[10.0, 0.1], size=(300, 2))
    est = ScoreFlowDensity(**dict(TINY, max_iter=100)).fit(X)
    s = est.sample(200, random_state=0)
    assert np.all(np.abs(s.mean(axis=0) - [100.0, -50.0]) < [10.0, 0.1])
    assert s[:, 0].std() > 50 * s[:, 1].std()


# ----------------------------------------------------------------------------- reproducibility
def test_refit_same_seed_is_identical(fitted, data):
    X, X_test = data
    again = ScoreFlowDensity(**TINY).fit(X)
    assert again.loss_curve_ == fitted.loss_curve_
    assert_array_equal(again.score_samples(X_test), fitted.score_samples(X_test))
    assert_array_equal(again.sample(20, random_state=0), fitted.sample(20, random_state=0))
    # refitting the same object (fit idempotence) and a clone also agree
    cloned = clone(fitted).fit(X)
    assert_array_equal(cloned.score_samples(X_test), fitted.score_samples(X_test))


def test_different_seeds_give_different_models(fitted, data):
    X, X_test = data
    other = ScoreFlowDensity(**dict(TINY, random_state=1)).fit(X)
    assert not np.array_equal(other.score_samples(X_test), fitted.score_samples(X_test))


def test_refit_without_warm_start_starts_afresh(data):
    X, X_test = data
    est = ScoreFlowDensity(**TINY).fit(X[::-1].copy())
    est.fit(X)
    fresh = ScoreFlowDensity(**TINY).fit(X)
    assert est.n_iter_ == TINY["max_iter"]
    assert est.loss_curve_ == fresh.loss_curve_
    assert_array_equal(est.score_samples(X_test), fresh.score_samples(X_test))


# ----------------------------------------------------------------------------- no mutation
def _freeze(obj, depth=0):
    """A deep, comparable copy of an attribute value (modules by state and flags)."""
    if depth > 6:
        return repr(obj)
    if isinstance(obj, torch.nn.Module):
        return (
            "module",
            type(obj).__name__,
            obj.training,
            {k: v.detach().clone() for k, v in obj.state_dict().items()},
            [p.requires_grad for p in obj.parameters()],
        )
    if isinstance(obj, torch.optim.Optimizer):
        return ("optimizer", copy.deepcopy(obj.state_dict()))
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, dict):
        return {k: _freeze(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_freeze(v, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return ("object", type(obj).__name__, _freeze(vars(obj), depth + 1))
    return copy.deepcopy(obj)


def _assert_same(a, b, path="est"):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert_array_equal(a, b, err_msg=path)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize(
    "method",
    [
        lambda est, X: est.score_samples(X),
        lambda est, X: est.score(X),
        lambda est, X: est.bound(X, n_time_samples=20),
        lambda est, X: est.sample(10, random_state=0),
        lambda est, X: est.sample(4, random_state=0, method="sde"),
    ],
    ids=["score_samples", "score", "bound", "sample", "sample-sde"],
)
def test_evaluation_does_not_mutate_the_estimator(method, data):
    X, X_test = data
    est = ScoreFlowDensity(**TINY).fit(X)
    before = _freeze(est.__dict__)
    params = copy.deepcopy(est.get_params())
    first = method(est, X_test)
    _assert_same(before, _freeze(est.__dict__))
    assert est.get_params() == params
    # ... and a second call gives the same answer (no hidden state advanced)
    assert_array_equal(method(est, X_test), first)


# ----------------------------------------------------------------------------- global RNGs
def _np_state_equal(a, b):
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


@pytest.mark.parametrize("random_state", [0, None])
def test_global_rngs_untouched(random_state, data):
    """fit / score_samples / score / bound / sample draw only from their own generators.

    With ``random_state=None`` the seed comes from numpy's global RandomState (the
    scikit-learn convention for None), so only torch's global RNG is checked there."""
    X, X_test = data
    torch.manual_seed(1234)
    np.random.seed(1234)
    torch_before = torch.get_rng_state()
    np_before = np.random.get_state()
    est = ScoreFlowDensity(**dict(TINY, random_state=random_state)).fit(X)
    calls = [
        lambda: est.score_samples(X_test),
        lambda: est.score(X_test),
        lambda: est.bound(X_test, n_time_samples=20),
        lambda: est.bound(X_test, n_time_samples=20, random_state=3),
        lambda: est.sample(10, random_state=random_state if random_state is not None else 7),
        lambda: est.sample(3, random_state=0, method="sde"),
    ]
    for call in calls:
        call()
    assert torch.equal(torch.get_rng_state(), torch_before)
    if random_state is not None:
        assert _np_state_equal(np.random.get_state(), np_before)


# ----------------------------------------------------------------------------- warm start
def test_warm_start_continues_training(data):
    X, _ = data
    est = ScoreFlowDensity(**dict(TINY, max_iter=20, warm_start=True)).fit(X)
    first_curve = list(est.loss_curve_)
    first_weights = {k: v.clone() for k, v in est.network_.state_dict().items()}
    est.fit(X)
    assert est.n_iter_ == 40
    assert len(est.loss_curve_) == 40
    assert est.loss_curve_[:20] == first_curve
    assert any(
        not torch.equal(first_weights[k], v) for k, v in est.network_.state_dict().items()
    )
    est.set_params(max_iter=5).fit(X)
    assert est.n_iter_ == 45 and len(est.loss_curve_) == 45


def test_warm_start_rejects_a_different_width(data):
    X, _ = data
    est = ScoreFlowDensity(**dict(TINY, max_iter=5, warm_start=True)).fit(X)
    with pytest.raises(ValueError, match="features"):
        est.fit(np.hstack([X, X]))


@pytest.mark.parametrize(
    "change", [{"sde": "subvp"}, {"hidden_layer_sizes": (8,)}, {"dtype": "float64"},
               {"dequantization": "uniform"}, {"fourier_features": 4}]
)
def test_warm_start_rejects_structural_changes(data, change):
    X, _ = data
    est = ScoreFlowDensity(**dict(TINY, max_iter=5, warm_start=True)).fit(X)
    est.set_params(**change)
    with pytest.raises(ValueError, match="warm_start=True cannot change"):
        est.fit(np.round(X))


def test_early_stopping_records_validation_scores(data):
    X, _ = data
    est = ScoreFlowDensity(**dict(TINY, max_iter=100, early_stopping=True, n_iter_no_change=5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X)
    assert isinstance(est.validation_scores_, list) and len(est.validation_scores_) >= 1
    assert np.all(np.isfinite(est.validation_scores_))
    assert est.best_validation_score_ == max(est.validation_scores_)


# ----------------------------------------------------------------------------- GridSearchCV
GRID = {"weighting": ["score_matching", "likelihood", "likelihood_is"]}
GS_TINY = dict(hidden_layer_sizes=(16,), max_iter=20, batch_size=64, random_state=0)


@pytest.fixture(scope="module")
def gs_data():
    X, _ = make_moons(150, noise=0.1, random_state=0)
    return X


@pytest.fixture(scope="module")
def search_serial(gs_data):
    """n_jobs=1, with torch on one thread like the loky workers below: intra-op reductions
    on two threads sum in another order and change float32 results at the 1e-7 level."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cv = KFold(3, shuffle=True, random_state=0)
        return GridSearchCV(ScoreFlowDensity(**GS_TINY), GRID, cv=cv, n_jobs=1).fit(gs_data)
    finally:
        torch.set_num_threads(threads)


def test_grid_search_selects_the_best_mean_held_out_log_likelihood(search_serial, gs_data):
    gs = search_serial
    scores = gs.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores))
    assert gs.best_index_ == int(np.argmax(scores))
    assert gs.best_params_ == gs.cv_results_["params"][gs.best_index_]
    assert gs.best_score_ == scores[gs.best_index_]
    assert gs.best_estimator_.get_params()["weighting"] == gs.best_params_["weighting"]
    assert gs.best_estimator_.n_iter_ == GS_TINY["max_iter"]


def test_grid_search_score_is_held_out_mean_log_likelihood(search_serial, gs_data):
    """The CV score of a candidate is the mean ``score_samples`` of a model refit on the
    training part of the fold, evaluated on the held-out part."""
    gs = search_serial
    X = gs_data
    train, test = next(KFold(3, shuffle=True, random_state=0).split(X))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        est = ScoreFlowDensity(**GS_TINY).set_params(**gs.best_params_).fit(X[train])
        held_out = est.score_samples(X[test]).mean()
    finally:
        torch.set_num_threads(threads)
    assert_allclose(held_out, gs.cv_results_["split0_test_score"][gs.best_index_], rtol=1e-12)


def test_grid_search_parallel_matches_serial(search_serial, gs_data):
    cv = KFold(3, shuffle=True, random_state=0)
    with joblib.parallel_config(backend="loky", inner_max_num_threads=1):
        gs2 = GridSearchCV(ScoreFlowDensity(**GS_TINY), GRID, cv=cv, n_jobs=2).fit(gs_data)
    assert_array_equal(
        gs2.cv_results_["mean_test_score"], search_serial.cv_results_["mean_test_score"]
    )
    assert gs2.best_params_ == search_serial.best_params_


# ----------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("c", [3.0, 0.1])
def test_scaling_shifts_log_density_by_log_det(c, fitted, data):
    """Fitting on ``c X`` and evaluating at ``c x`` gives ``log p(x) - d log|c|``: the
    internal standardisation absorbs the scale, and its log-determinant is reported."""
    X, X_test = data
    scaled = ScoreFlowDensity(**TINY).fit(c * X)
    expected = fitted.score_samples(X_test) - X.shape[1] * np.log(abs(c))
    assert_allclose(scaled.score_samples(c * X_test), expected, rtol=0, atol=1e-4)
    assert_allclose(scaled.sample(20, random_state=0), c * fitted.sample(20, random_state=0),
                    rtol=1e-4, atol=1e-4)


def test_translation_does_not_change_log_density(fitted, data):
    X, X_test = data
    shift = np.array([5.0, -3.0])
    moved = ScoreFlowDensity(**TINY).fit(X + shift)
    assert_allclose(moved.score_samples(X_test + shift), fitted.score_samples(X_test),
                    rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def exact_reference(fitted_exact, data):
    _, X_test = data
    return fitted_exact.score_samples(X_test)


@settings(deadline=None, max_examples=5)
@given(perm=st.permutations(list(range(40))))
def test_row_permutation_fixed_step_is_exact(fitted_exact, exact_reference, data, perm):
    _, X_test = data
    perm = np.asarray(perm)
    assert_array_equal(fitted_exact.score_samples(X_test[perm]), exact_reference[perm])


def test_row_permutation_adaptive_solver(fitted, data):
    """dopri5 shares one step size across the batch, chosen from a norm whose floating-point
    sum depends on the row order: results agree to the solver tolerance, not bitwise."""
    _, X_test = data
    perm = np.random.default_rng(0).permutation(len(X_test))
    ll = fitted.score_samples(X_test)
    assert_allclose(fitted.score_samples(X_test[perm]), ll[perm], rtol=0, atol=1e-4)


def test_subset_invariance_fixed_step(fitted_exact, exact_reference, data):
    """A row's value does not depend on the other rows (fixed steps, float64) up to rounding:
    BLAS picks its kernels by matrix size, so a 1- or 5-row batch can differ from the 40-row one
    in the last bit (seen: 4.4e-16)."""
    _, X_test = data
    ll = exact_reference
    for idx in (slice(0, 1), np.array([3, 30, 7, 12, 25])):
        assert_allclose(fitted_exact.score_samples(X_test[idx]), ll[idx], rtol=0, atol=1e-12)


def test_density_integrates_to_one_in_2d():
    """exp(score_samples) summed over a 100 x 100 grid covering +-5 standard deviations
    (of the data, per axis) integrates to 1 within 0.05.

    The flow's density is normalised by construction (change of variables from the Gaussian
    prior), so the deviation only measures numerics: the midpoint-rule error of the grid
    (cells of ~0.1 std; the learned density is smooth on that scale), mass outside the box
    (the model's tails are Gaussian-like beyond the data: well below 1e-3 past 5 std), and the
    ODE solver's error on each log-density (rtol = atol = 1e-5, i.e. ~1e-5 relative error of
    the density).  Measured: |integral - 1| ~ 1e-6, so 0.05 is a wide margin; a missing
    log-determinant (e.g. of the standardisation) would be off by far more (factor
    1 / (std_x std_y) ~ 2.3 here)."""
    X, _ = make_moons(400, noise=0.1, random_state=0)
    est = ScoreFlowDensity(
        hidden_layer_sizes=(32, 32), max_iter=300, batch_size=128, random_state=0
    ).fit(X)
    m, s = X.mean(axis=0), X.std(axis=0)
    xs = np.linspace(m[0] - 5 * s[0], m[0] + 5 * s[0], 100)
    ys = np.linspace(m[1] - 5 * s[1], m[1] + 5 * s[1], 100)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    density = np.exp(est.score_samples(grid))
    integral = density.sum() * (xs[1] - xs[0]) * (ys[1] - ys[0])
    assert abs(integral - 1.0) < 0.05, integral


def test_default_eps_and_fourier_features_resolve_from_the_data(data):
    X, _ = data
    est = ScoreFlowDensity(**TINY).fit(X)
    assert est.eps_ == 3e-3 and est.fourier_features_ == 128 == est.network_.fourier_features
    wide = ScoreFlowDensity(**TINY).fit(np.hstack([X, X]))
    assert wide.fourier_features_ == 0 and wide.network_.fourier_features == 0
    assert ScoreFlowDensity(**dict(TINY, sde="subvp")).fit(X).eps_ == 1e-2
    ints = np.round(np.abs(X) * 3)
    assert ScoreFlowDensity(**dict(TINY, dequantization="uniform")).fit(ints).eps_ == 1e-5
    assert est.get_params()["fourier_features"] == "auto" and est.eps is None  # params untouched


def test_fourier_features_reach_the_network_and_survive_pickle(data):
    import pickle

    X, _ = data
    est = ScoreFlowDensity(**dict(TINY, max_iter=20, fourier_features=6, fourier_scale=0.3)).fit(X)
    ff = est.network_.fourier
    assert ff.B.shape == (2, 6) and ff.scale == 0.3
    again = pickle.loads(pickle.dumps(est))
    assert np.array_equal(again.score_samples(X[:20]), est.score_samples(X[:20]))
    refit = ScoreFlowDensity(**dict(TINY, max_iter=20, fourier_features=6, fourier_scale=0.3)).fit(X)
    assert torch.equal(refit.network_.fourier.B, ff.B)  # seeded by random_state


def test_sde_sampling_options_and_cutoff(data, monkeypatch):
    """n_steps/corrector reach the SDE sampler; the cutoff never goes below the trained eps."""
    import skscoreflow._estimator as mod

    X, _ = data
    est = ScoreFlowDensity(**dict(TINY, max_iter=5, eps=0.05)).fit(X)
    seen = {}
    real = dict(mod._SAMPLERS)

    def spy(name):
        def fn(*args, **kwargs):
            seen[name] = kwargs
            return real[name](*args, **kwargs)

        return fn

    monkeypatch.setitem(mod._SAMPLERS, "sde", spy("sde"))
    monkeypatch.setitem(mod._SAMPLERS, "ode", spy("ode"))
    S = est.sample(7, random_state=0, method="sde", n_steps=12, corrector=True)
    assert S.shape == (7, 2) and np.isfinite(S).all()
    assert seen["sde"]["n_steps"] == 12 and seen["sde"]["corrector"] is True
    assert seen["sde"]["eps"] == 0.05  # trained on t >= 0.05: do not sample below it
    est.sample(3, random_state=0, method="ode")
    assert seen["ode"]["eps"] == 0.05 and "n_steps" not in seen["ode"]
    est.set_params(eps=1e-5).fit(X)
    est.sample(3, random_state=0, method="sde", n_steps=3)
    assert seen["sde"]["eps"] == 1e-3  # the paper's VP sampling cutoff above eps = 1e-5
    est.set_params(eps=None).fit(X)
    est.sample(3, random_state=0, method="sde", n_steps=3)
    assert est.eps_ == 3e-3 and seen["sde"]["eps"] == 3e-3  # continuous-data default


@pytest.mark.parametrize("kwargs", [{"n_steps": 0}, {"n_steps": 2.5}, {"corrector": "yes"}])
def test_bad_sampling_options(data, kwargs):
    X, _ = data
    est = ScoreFlowDensity(**dict(TINY, max_iter=2)).fit(X)
    with pytest.raises((ValueError, TypeError), match="n_steps|corrector"):
        est.sample(3, method="sde", **kwargs)
