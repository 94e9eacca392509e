"""Bad input gets a clear ValueError / TypeError naming the problem; parameters are validated
in ``fit`` (never in ``__init__``); inputs are never modified; read-only and pandas inputs
work; output shapes hold for arbitrary valid input (hypothesis)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numpy.testing import assert_array_equal
from sklearn.exceptions import NotFittedError

from skscoreflow import ScoreFlowDensity

TINY = dict(hidden_layer_sizes=(16,), max_iter=20, batch_size=64, random_state=0,
            early_stopping=False)


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(0).normal(size=(120, 3))


@pytest.fixture(scope="module")
def fitted(X):
    return ScoreFlowDensity(**TINY).fit(X)


# ----------------------------------------------------------------------------- parameters
def _declared(name, value):
    """scikit-learn's message for a value outside a declared constraint."""
    return rf"'{name}' parameter of ScoreFlowDensity must be .*Got {re.escape(repr(value))} instead"


BAD_PARAMS = [
    # unknown option names
    ("sde", "vpp", ValueError, r"unknown sde 'vpp'; expected one of \['subvp', 've', 'vp'\]"),
    ("weighting", "foo", ValueError, None),
    ("solver", "bar", ValueError, None),
    ("divergence", "x", ValueError, None),
    ("dtype", "float16", ValueError, None),
    ("dequantization", "bogus", ValueError, None),
    ("device", "tpu9", ValueError, None),
    ("sde", None, ValueError, None),
    ("sde", 3, TypeError, None),
    # invalid numbers
    ("max_iter", 0, ValueError, None),
    ("max_iter", -5, ValueError, None),
    ("fourier_features", -1, ValueError, None),
    ("fourier_features", "many", ValueError, None),
    ("fourier_scale", 0.0, ValueError, None),
    ("max_iter", 1.5, TypeError, None),
    ("max_iter", True, TypeError, None),
    ("max_iter", "100", TypeError, None),
    ("fourier_features", False, TypeError, None),
    ("validation_fraction", 1.5, ValueError, None),
    ("validation_fraction", 0.0, ValueError, None),
    ("learning_rate", -1, ValueError, None),
    ("learning_rate", 0.0, ValueError, None),
    ("learning_rate", float("nan"), ValueError, None),
    ("learning_rate", float("inf"), ValueError, None),
    ("ema_decay", 1.0, ValueError, None),
    ("ema_decay", -0.1, ValueError, None),
    ("batch_size", 0, ValueError, None),
    ("eps", 2.0, ValueError, None),
    ("eps", 0.0, ValueError, None),
    ("rtol", 0, ValueError, None),
    ("atol", -1e-5, ValueError, None),
    ("tol", -1.0, ValueError, None),
    ("n_iter_no_change", 0, ValueError, None),
    ("verbose", -1, ValueError, None),
    ("n_dequantization_samples", 0, ValueError, None),
    ("dequantizer_n_couplings", -1, ValueError, None),
    ("hidden_layer_sizes", (), ValueError, None),
    ("hidden_layer_sizes", (16, 0), ValueError, None),
    ("hidden_layer_sizes", (16, 2.5), ValueError, None),
    ("hidden_layer_sizes", "16", ValueError, None),
    ("dequantizer_hidden_layer_sizes", (0,), ValueError, None),
    ("early_stopping", "yes", TypeError, None),
    ("warm_start", 1, TypeError, None),
]


@pytest.mark.parametrize(
    "name, value, error, match",
    BAD_PARAMS,
    ids=[f"{n}={v!r}" for n, v, _, _ in BAD_PARAMS],
)
def test_bad_parameter_raises_at_fit_not_init(name, value, error, match, X):
    est = ScoreFlowDensity(**{**TINY, name: value})  # must not raise
    assert est.get_params()[name] is value  # stored unchanged
    est.set_params(**{name: value})  # must not raise either
    with pytest.raises(error, match=match or _declared(name, value)):
        est.fit(X)
    assert not hasattr(est, "network_")
    assert est.get_params()[name] is value


@pytest.mark.parametrize(
    "sde, name", [("vp", "vp"), ("VP", "vp"), ("subvp", "subvp"), ("sub-vp", "subvp"), ("ve", "ve")]
)
def test_sde_names_are_case_and_dash_insensitive(sde, name, X):
    est = ScoreFlowDensity(**{**TINY, "max_iter": 2, "sde": sde}).fit(X)
    assert est.get_params()["sde"] == sde
    assert est.sde_.name == name


def test_unavailable_cuda_raises_clearly(X, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        ScoreFlowDensity(**{**TINY, "device": "cuda"}).fit(X)


def test_early_stopping_needs_rows_on_both_sides():
    X2 = np.random.default_rng(0).normal(size=(2, 2))
    est = ScoreFlowDensity(**{**TINY, "early_stopping": True, "validation_fraction": 0.9})
    with pytest.raises(ValueError, match="validation_fraction=0.9 leaves no training"):
        est.fit(X2)


# ----------------------------------------------------------------------------- data at fit
def _with(X, i, j, value):
    Z = X.astype(np.float64).copy()
    Z[i, j] = value
    return Z


def _fit_matrix(X):
    rng = np.random.default_rng(1)
    return [
        ("nan", _with(X, 3, 1, np.nan), ValueError, "NaN"),
        ("inf", _with(X, 0, 0, np.inf), ValueError, "infinity"),
        ("-inf", _with(X, 5, 2, -np.inf), ValueError, "infinity"),
        ("empty", np.empty((0, 3)), ValueError, r"0 sample\(s\)"),
        ("no-columns", np.empty((5, 0)), ValueError, r"0 feature\(s\)"),
        ("one-row", X[:1], ValueError, r"1 sample\(s\).*minimum of 2"),
        ("1-D", X[:, 0], ValueError, "Expected 2D array, got 1D array"),
        ("scalar", np.float64(3.0), ValueError, "Expected 2D array, got scalar"),
        ("3-D", X[:, :, None], ValueError, "dim 3"),
        ("strings", np.array([["a", "b"], ["c", "d"], ["e", "f"]]), ValueError,
         "could not convert string to float"),
        ("object-column", pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": ["x", "y", "z"]}),
         ValueError, "could not convert string to float"),
        ("complex", X + 1j * rng.normal(size=X.shape), ValueError, "Complex data not supported"),
    ]


@pytest.mark.parametrize("case", range(12), ids=[c[0] for c in _fit_matrix(np.zeros((6, 3)))])
def test_bad_data_at_fit(case, X):
    name, bad, error, match = _fit_matrix(X)[case]
    est = ScoreFlowDensity(**TINY)
    with pytest.raises(error, match=match):
        est.fit(bad)
    assert not hasattr(est, "network_")


def test_sparse_input_is_rejected(X):
    import scipy.sparse

    with pytest.raises(TypeError, match="[Ss]parse"):
        ScoreFlowDensity(**TINY).fit(scipy.sparse.csr_matrix(X))


# ----------------------------------------------------------------------------- data at predict
METHODS = {
    "score_samples": lambda est, Z: est.score_samples(Z),
    "score": lambda est, Z: est.score(Z),
    "bound": lambda est, Z: est.bound(Z, n_time_samples=10),
}


def _predict_matrix(X):
    Xt = X[:10]
    rng = np.random.default_rng(2)
    return [
        ("nan", _with(Xt, 3, 1, np.nan), ValueError, "NaN"),
        ("inf", _with(Xt, 0, 0, np.inf), ValueError, "infinity"),
        ("too-few-features", Xt[:, :2], ValueError, "X has 2 features, but ScoreFlowDensity is "
         "expecting 3 features"),
        ("too-many-features", np.hstack([Xt, Xt]), ValueError, "X has 6 features, but "
         "ScoreFlowDensity is expecting 3 features"),
        ("empty", np.empty((0, 3)), ValueError, r"0 sample\(s\)"),
        ("1-D", Xt[0], ValueError, "Expected 2D array, got 1D array"),
        ("strings", np.array([["a", "b", "c"]]), ValueError, "could not convert string to float"),
        ("complex", Xt + 1j * rng.normal(size=Xt.shape), ValueError, "Complex data not supported"),
    ]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("case", range(8), ids=[c[0] for c in _predict_matrix(np.zeros((10, 3)))])
def test_bad_data_at_evaluation(method, case, fitted, X):
    name, bad, error, match = _predict_matrix(X)[case]
    with pytest.raises(error, match=match):
        METHODS[method](fitted, bad)


@pytest.mark.parametrize("method", sorted(METHODS) + ["sample"])
def test_unfitted_estimator_raises_not_fitted(method, X):
    est = ScoreFlowDensity(**TINY)
    with pytest.raises(NotFittedError, match="not fitted"):
        if method == "sample":
            est.sample(3)
        else:
            METHODS[method](est, X)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_samples": 0}, "'n_samples' parameter of ScoreFlowDensity.sample .*Got 0"),
        ({"n_samples": -3}, "'n_samples' parameter .*Got -3"),
        ({"n_samples": 2.5}, "'n_samples' parameter .*Got 2.5"),
        ({"n_samples": "3"}, "'n_samples' parameter .*Got '3'"),
        ({"n_samples": True}, "'n_samples' parameter .*Got True"),
        ({"n_samples": 3, "method": "langevin"}, "'method' parameter .*Got 'langevin'"),
        ({"n_samples": 3, "n_steps": 0}, "'n_steps' parameter .*Got 0"),
        ({"n_samples": 3, "corrector": "yes"}, "'corrector' parameter .*Got 'yes'"),
    ],
)
def test_bad_sample_arguments(kwargs, match, fitted):
    with pytest.raises(ValueError, match=match):
        fitted.sample(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_time_samples": 0}, "'n_time_samples' parameter of ScoreFlowDensity.bound .*Got 0"),
        ({"n_time_samples": True}, "'n_time_samples' parameter .*Got True"),
        ({"importance_sampling": 1}, "'importance_sampling' parameter .*Got 1"),
        ({"offset": None}, "'offset' parameter .*Got None"),
        ({"random_state": "a"}, "'random_state' parameter .*Got 'a'"),
    ],
)
def test_bad_bound_arguments(kwargs, match, fitted, X):
    with pytest.raises(ValueError, match=match):
        fitted.bound(X[:3], **kwargs)


# --------------------------------------------------------------------- hypothesis: bad values
@settings(deadline=None, max_examples=10)
@given(
    n_rows=st.integers(2, 12),
    row=st.integers(0, 11),
    col=st.integers(0, 2),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
    method=st.sampled_from(sorted(METHODS)),
)
def test_any_non_finite_entry_is_rejected(fitted, n_rows, row, col, value, method):
    Z = np.random.default_rng(n_rows).normal(size=(n_rows, 3))
    Z[row % n_rows, col] = value
    before = Z.copy()
    with pytest.raises(ValueError, match="NaN|infinity"):
        METHODS[method](fitted, Z)
    assert_array_equal(Z, before)


@settings(deadline=None, max_examples=10)
@given(n_rows=st.integers(1, 8), n_features=st.integers(1, 6).filter(lambda d: d != 3))
def test_any_wrong_width_is_rejected(fitted, n_rows, n_features):
    Z = np.zeros((n_rows, n_features))
    with pytest.raises(ValueError, match=f"X has {n_features} features.*expecting 3"):
        fitted.score_samples(Z)


# ----------------------------------------------------------------------------- no mutation
def test_inputs_are_never_modified(X):
    X_in = X.copy()
    X_test = X[:15].copy()
    est = ScoreFlowDensity(**TINY).fit(X_in)
    est.score_samples(X_test)
    est.bound(X_test, n_time_samples=10)
    est.score(X_test)
    assert_array_equal(X_in, X)
    assert_array_equal(X_test, X[:15])
    # the fitted model holds its own copy: later changes of the caller's array do nothing
    ll = est.score_samples(X_test)
    X_in += 100.0
    assert_array_equal(est.score_samples(X_test), ll)


def test_float32_and_fortran_inputs_are_not_modified(X):
    X32 = np.asfortranarray(X.astype(np.float32))
    before = X32.copy(order="F")
    est = ScoreFlowDensity(**TINY).fit(X32)
    ll = est.score_samples(X32[:5])
    assert ll.dtype == np.float64
    assert_array_equal(X32, before)


def test_dataframe_input_is_not_modified(X):
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    before = df.copy()
    est = ScoreFlowDensity(**TINY).fit(df)
    est.score_samples(df.iloc[:5])
    pd.testing.assert_frame_equal(df, before)


def test_read_only_arrays_work(X):
    X_ro = X.copy()
    X_ro.setflags(write=False)
    est = ScoreFlowDensity(**TINY).fit(X_ro)
    T = X[:10].copy()
    T.setflags(write=False)
    ll = est.score_samples(T)
    assert ll.shape == (10,) and np.all(np.isfinite(ll))
    assert est.bound(T, n_time_samples=10).shape == (10,)
    assert_array_equal(ll, ScoreFlowDensity(**TINY).fit(X).score_samples(X[:10]))


def test_lists_are_accepted(X):
    est = ScoreFlowDensity(**TINY).fit(X.tolist())
    assert est.score_samples(X[:4].tolist()).shape == (4,)


# ----------------------------------------------------------------------------- pandas
def test_dataframe_sets_feature_names_and_numpy_warns(X):
    df = pd.DataFrame(X, columns=["alpha", "beta", "gamma"])
    est = ScoreFlowDensity(**TINY).fit(df)
    assert_array_equal(est.feature_names_in_, ["alpha", "beta", "gamma"])
    assert est.n_features_in_ == 3
    ll_df = est.score_samples(df.iloc[:6])
    with pytest.warns(UserWarning, match="X does not have valid feature names"):
        ll_np = est.score_samples(X[:6])
    assert_array_equal(ll_np, ll_df)
    with pytest.raises(ValueError, match="feature names should match"):
        est.score_samples(df.iloc[:6].rename(columns={"gamma": "delta"}))
    # samples are plain arrays in the original column order
    assert est.sample(4, random_state=0).shape == (4, 3)


def test_numpy_fit_then_dataframe_warns(X):
    est = ScoreFlowDensity(**TINY).fit(X)
    assert not hasattr(est, "feature_names_in_")
    with pytest.warns(UserWarning, match="fitted without feature names"):
        est.score_samples(pd.DataFrame(X[:4], columns=["a", "b", "c"]))


def test_non_string_column_names_are_not_feature_names(X):
    est = ScoreFlowDensity(**TINY).fit(pd.DataFrame(X))
    assert not hasattr(est, "feature_names_in_")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.score_samples(X[:3])


# ----------------------------------------------------------------------------- hypothesis: shapes
_CACHE: dict[int, ScoreFlowDensity] = {}


def _fitted_for(n_features: int) -> ScoreFlowDensity:
    if n_features not in _CACHE:
        Z = np.random.default_rng(n_features).normal(size=(100, n_features))
        _CACHE[n_features] = ScoreFlowDensity(**TINY).fit(Z)
    return _CACHE[n_features]


@st.composite
def _valid_inputs(draw):
    n_features = draw(st.integers(1, 3))
    n_rows = draw(st.integers(1, 16))
    Z = draw(
        arrays(
            np.float64,
            (n_rows, n_features),
            elements=st.floats(-4, 4, allow_nan=False, allow_infinity=False),
        )
    )
    return Z


@settings(deadline=None, max_examples=10)
@given(Z=_valid_inputs(), k=st.integers(1, 12))
def test_output_shapes_for_any_valid_input(Z, k):
    n_rows, n_features = Z.shape
    est = _fitted_for(n_features)
    before = Z.copy()
    ll = est.score_samples(Z)
    assert ll.shape == (n_rows,)
    assert ll.dtype == np.float64
    assert np.all(np.isfinite(ll))
    assert_array_equal(Z, before)
    S = est.sample(k, random_state=0)
    assert S.shape == (k, n_features)
    assert S.dtype == np.float64
    assert np.all(np.isfinite(S))
