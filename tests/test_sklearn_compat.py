"""scikit-learn's own estimator checks on a small, fast configuration.

The configuration evaluates in float64 with the fixed-step ``rk4`` solver: a row's
log-density then does not depend on which other rows share the batch, so
``check_methods_subset_invariance`` and ``check_methods_sample_order_invariance`` (tolerance
1e-7) pass exactly (ecosystem.md §1.5; float32 or an adaptive solver with a shared step size
would not).  Measured with scikit-learn 1.9.1: every generated check passes, so the expected
failures below are empty; ``check_array_api_input`` skips itself unless ``SCIPY_ARRAY_API``
is set.
"""

from __future__ import annotations

import functools

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from skscoreflow import ScoreFlowDensity


def _fast_estimator() -> ScoreFlowDensity:
    return ScoreFlowDensity(
        hidden_layer_sizes=(16,),
        max_iter=20,
        batch_size=64,
        dtype="float64",
        solver="rk4",
        random_state=0,
    )


def _expected_failed_checks(estimator: ScoreFlowDensity) -> dict[str, str]:
    """Checks known to fail, each with its measured reason.  None do (sklearn 1.9.1)."""
    return {}


_CHECKS = parametrize_with_checks(
    [_fast_estimator()], expected_failed_checks=_expected_failed_checks
)


@_CHECKS
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


def _check_names() -> set[str]:
    names = set()
    for _, check in _CHECKS.args[1]:
        func = check.func if isinstance(check, functools.partial) else check
        names.add(func.__name__)
    return names


def test_determinism_dependent_checks_are_generated():
    """With ``non_deterministic=False`` sklearn runs the checks that compare two evaluations;
    setting that tag would silently drop them (ecosystem.md decision 5)."""
    names = _check_names()
    for required in (
        "check_methods_subset_invariance",
        "check_methods_sample_order_invariance",
        "check_pipeline_consistency",
        "check_fit_idempotent",
        "check_estimators_pickle",
        "check_estimators_nan_inf",
        "check_dict_unchanged",
    ):
        assert required in names, required


@pytest.mark.parametrize("estimator", [ScoreFlowDensity(), _fast_estimator()])
def test_default_tags_are_kept(estimator):
    tags = estimator.__sklearn_tags__()
    assert tags.estimator_type == "density_estimator"
    assert tags.non_deterministic is False
    assert tags.requires_fit is True
    assert tags.target_tags.required is False
    assert tags.input_tags.two_d_array is True
    assert tags.input_tags.allow_nan is False
    assert tags.input_tags.sparse is False
    assert tags.input_tags.string is False
    assert tags.array_api_support is False


def test_mixin_order_and_score_convention():
    from sklearn.base import BaseEstimator, DensityMixin

    mro = ScoreFlowDensity.__mro__
    assert mro.index(DensityMixin) < mro.index(BaseEstimator)
    # ``score`` is our own (mean log-likelihood), not DensityMixin's placeholder.
    assert ScoreFlowDensity.score is not DensityMixin.score
