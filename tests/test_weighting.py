"""Tests of :mod:`skscoreflow.weighting`: the three DSM weightings (spec §3), the time
sampling that goes with them, and the importance-sampling identity of spec §3-§4."""

from __future__ import annotations

import math

import pytest
import torch

from skscoreflow.sde import VESDE, VPSDE, SubVPSDE
from skscoreflow.weighting import _WEIGHTINGS, _check_weighting, dsm_loss, _sample_time

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# Independent (plain-math) kernel formulas for the hand computation
# --------------------------------------------------------------------------------------------
def _hand_kernel(name: str, t: float) -> tuple[float, float, float]:
    """(alpha, sigma, g^2) written out from the spec formulas, default parameters."""
    if name == "ve":
        smin, smax = 0.01, 50.0
        sigma = smin * (smax / smin) ** t
        return 1.0, sigma, sigma**2 * 2 * math.log(smax / smin)
    bmin, bmax = 0.1, 20.0
    B = bmin * t + 0.5 * (bmax - bmin) * t**2
    beta = bmin + t * (bmax - bmin)
    alpha = math.exp(-0.5 * B)
    if name == "vp":
        return alpha, math.sqrt(1 - math.exp(-B)), beta
    return alpha, 1 - math.exp(-B), beta * (1 - math.exp(-2 * B))


def _score_fn(x, t):
    """An arbitrary smooth (non-exact) score: -0.7 x + 0.1 t + 0.05 x^2."""
    return -0.7 * x + 0.1 * t[:, None] + 0.05 * x**2


SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("weighting", ["score_matching", "likelihood", "likelihood_is"])
def test_dsm_loss_matches_hand_computation(name, weighting):
    sde = SDES[name]
    x0 = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.4], [1.5, 1.5, 0.1]], dtype=F64)
    z = torch.tensor([[0.2, 1.1, -0.6], [-1.3, 0.4, 0.9], [0.05, -0.7, 1.8]], dtype=F64)
    ts = [0.02, 0.4, 0.95]
    loss = dsm_loss(_score_fn, x0, sde, weighting, t=torch.tensor(ts, dtype=F64), z=z)
    assert loss.shape == (3,)
    for i, t in enumerate(ts):
        alpha, sigma, g2 = _hand_kernel(name, t)
        total = 0.0
        for j in range(3):
            xt = alpha * float(x0[i, j]) + sigma * float(z[i, j])
            s = -0.7 * xt + 0.1 * t + 0.05 * xt**2
            zij = float(z[i, j])
            if weighting == "likelihood":
                total += g2 * (s + zij / sigma) ** 2  # lambda = g^2, ||s - grad log p_0t||^2
            else:
                total += (sigma * s + zij) ** 2  # lambda = sigma^2 (or g^2 with IS)
        assert float(loss[i]) == pytest.approx(total / 3, rel=1e-10)  # mean over dims


def test_dsm_loss_reduces_over_all_non_batch_dims():
    sde = VPSDE()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, generator=g, dtype=F64)
    z = torch.randn(4, 2, 3, generator=g, dtype=F64)
    t = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)

    def score(x, tt):
        return -x

    loss = dsm_loss(score, x0, sde, "score_matching", t=t, z=z)
    flat = dsm_loss(score, x0.reshape(4, 6), sde, "score_matching", t=t, z=z.reshape(4, 6))
    torch.testing.assert_close(loss, flat)


def test_dsm_loss_is_reproducible_and_uses_generator():
    sde = VPSDE()
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    a = dsm_loss(_score_fn, x0, sde, generator=torch.Generator().manual_seed(7))
    b = dsm_loss(_score_fn, x0, sde, generator=torch.Generator().manual_seed(7))
    c = dsm_loss(_score_fn, x0, sde, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == torch.float32


def test_unknown_weighting_raises_value_error_naming_options():
    with pytest.raises(ValueError) as err:
        dsm_loss(_score_fn, torch.zeros(2, 2), VPSDE(), "bogus")
    msg = str(err.value)
    assert "bogus" in msg
    for option in _WEIGHTINGS:
        assert option in msg
    with pytest.raises(ValueError):
        _check_weighting(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        _sample_time(VPSDE(), 3, "uniform")
    assert _check_weighting("likelihood") == "likelihood"
    assert set(_WEIGHTINGS) == {"score_matching", "likelihood", "likelihood_is"}


@pytest.mark.parametrize("weighting", ["score_matching", "likelihood"])
def test_uniform_weightings_sample_uniform_times(weighting):
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    sde = SubVPSDE()
    t = _sample_time(sde, 500, weighting, 0.05, generator=g1, dtype=F64)
    expected = sde.sample_time(500, 0.05, importance_sampling=False, generator=g2, dtype=F64)
    torch.testing.assert_close(t, expected)


def test_likelihood_is_samples_importance_times():
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    sde = VPSDE()
    t = _sample_time(sde, 500, "likelihood_is", generator=g1, dtype=F64)
    torch.testing.assert_close(t, sde.sample_time(500, generator=g2, dtype=F64))
    # the IS times concentrate at small t: median far below the uniform median 0.5
    assert float(t.median()) < 0.2


# --------------------------------------------------------------------------------------------
# Importance sampling: same integral, much lower variance
# --------------------------------------------------------------------------------------------
def _exact_integral_vp_standard_normal(sde: VPSDE, eps: float) -> float:
    """∫_eps^T (g^2/sigma^2) E||sigma s + z||^2 / d dt for N(0, I) data and its exact score.

    With s = -x, sigma s + z = alpha^2 z - sigma alpha x0, so E||.||^2 / d = alpha^2 and the
    integrand is beta e^{-B} / (1 - e^{-B}) = d/dt log(1 - e^{-B}).
    """
    def log1m(t: float) -> float:
        return math.log(-math.expm1(-float(sde.integrated_beta(torch.tensor(t, dtype=F64)))))

    return log1m(sde.T) - log1m(eps)


@pytest.mark.parametrize("eps", [1e-3, 1e-5])
def test_is_and_uniform_likelihood_losses_estimate_the_same_integral(eps):
    """E_U[likelihood loss] = Z/(T - eps) * E_IS[likelihood_is loss] = I/(T - eps)."""
    sde = VPSDE()
    n, d = 400_000, 2
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, d, generator=g, dtype=F64)

    def exact_score(x, t):
        return -x

    is_loss = dsm_loss(exact_score, x0, sde, "likelihood_is", eps, generator=g)
    u_loss = dsm_loss(exact_score, x0, sde, "likelihood", eps, generator=g)
    Z = float(sde.importance_normalizer(eps))
    integral = _exact_integral_vp_standard_normal(sde, eps)

    def check(samples, target):
        mean = float(samples.mean())
        se = float(samples.std()) / math.sqrt(n)
        assert abs(mean - target) < 5 * se, (mean, target, se)
        return mean

    m_is = check(is_loss, integral / Z)
    m_u = check(u_loss, integral / (sde.T - eps))
    # the two estimates agree up to the constant Z / (T - eps) (loose Monte-Carlo tolerance)
    assert m_u / m_is == pytest.approx(Z / (sde.T - eps), rel=0.05)


@pytest.mark.parametrize("eps, min_ratio", [(1e-5, 100.0), (1e-3, 5.0)])
def test_is_estimator_has_much_lower_variance(eps, min_ratio):
    """Variance of the two unbiased estimators of I = ∫ g^2 E||s + z/sigma||^2 / d dt."""
    sde = VPSDE()
    n, d = 100_000, 2
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, d, generator=g, dtype=F64)

    def exact_score(x, t):
        return -x

    Z = float(sde.importance_normalizer(eps))
    est_is = Z * dsm_loss(exact_score, x0, sde, "likelihood_is", eps, generator=g)
    est_u = (sde.T - eps) * dsm_loss(exact_score, x0, sde, "likelihood", eps, generator=g)
    ratio = float(est_u.var() / est_is.var())
    assert ratio > min_ratio, ratio
