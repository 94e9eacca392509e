"""Tests of :mod:`skscoreflow.sde`: reference values (spec §2, §4, §12), kernel/dynamics
consistency (hypothesis), the importance-sampling proposal (CDF, inverse CDF, density,
goodness of fit) and float32 precision at small ``t``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skscoreflow.sde import SDE, VESDE, VPSDE, SubVPSDE, _SDES, get_sde

F64 = torch.float64


def _t(v, dtype=F64):
    return torch.as_tensor(v, dtype=dtype)


def _f(x) -> float:
    return float(x)


ALL_SDES = [VPSDE(), SubVPSDE(), VESDE()]
ALL_IDS = ["vp", "subvp", "ve"]


# ============================================================================================
# Spec reference values, to the digits the spec gives
# ============================================================================================
class TestVPReferenceValues:
    """Spec §2.1: VP with beta_min = 0.1, beta_max = 20."""

    sde = VPSDE()

    @pytest.mark.parametrize(
        "t, expected, digits",
        [
            (1.0, 0.9999784, 7),
            (1e-5, 1.0005e-3, 7),
            (1e-3, 1.0485e-2, 6),
            (1e-2, 4.464e-2, 5),
        ],
    )
    def test_std(self, t, expected, digits):
        assert round(_f(self.sde.std(_t(t))), digits) == pytest.approx(expected, abs=1e-12)

    def test_mean_coeff_at_T(self):
        assert round(_f(self.sde.mean_coeff(_t(1.0))), 7) == pytest.approx(0.0065716, abs=1e-12)

    def test_diffusion_squared_at_T(self):
        assert _f(self.sde.diffusion_squared(_t(1.0))) == pytest.approx(20.0, rel=1e-12)

    def test_std_is_sqrt_one_minus_alpha_squared(self):
        t = torch.linspace(1e-5, 1, 101, dtype=F64)
        torch.testing.assert_close(
            self.sde.std(t), torch.sqrt(1 - self.sde.mean_coeff(t) ** 2), rtol=1e-9, atol=0
        )


class TestSubVPReferenceValues:
    """Spec §2.2: sub-VP std is 1 - e^{-B} (no square root)."""

    sde = SubVPSDE()

    @pytest.mark.parametrize(
        "t, expected, digits",
        [(1.0, 0.9999568, 7), (1e-2, 1.993e-3, 6), (1e-5, 1.0e-6, 7)],
    )
    def test_std(self, t, expected, digits):
        assert round(_f(self.sde.std(_t(t))), digits) == pytest.approx(expected, abs=1e-12)

    def test_diffusion_squared(self):
        assert round(_f(self.sde.diffusion_squared(_t(1e-2))), 5) == pytest.approx(
            1.19e-3, abs=1e-12
        )

    def test_std_is_one_minus_alpha_squared_not_its_sqrt(self):
        t = torch.linspace(1e-3, 1, 101, dtype=F64)
        a2 = self.sde.mean_coeff(t) ** 2
        torch.testing.assert_close(self.sde.std(t), 1 - a2, rtol=1e-9, atol=0)


class TestVEReferenceValues:
    """Spec §2.3: VE with sigma_min = 0.01, sigma_max = 50."""

    sde = VESDE()

    def test_weight_ratio_is_constant(self):
        t = torch.linspace(1e-5, 1, 57, dtype=F64)
        r = self.sde.likelihood_weight_ratio(t)
        assert round(_f(r[0]), 4) == pytest.approx(17.0344, abs=1e-12)
        torch.testing.assert_close(r, torch.full_like(r, 2 * math.log(5000)), rtol=1e-12, atol=0)

    def test_std_endpoints_and_prior(self):
        assert _f(self.sde.std(_t(0.0))) == pytest.approx(0.01, rel=1e-12)
        assert _f(self.sde.std(_t(1.0))) == pytest.approx(50.0, rel=1e-12)
        assert self.sde.prior_std == 50.0
        assert _f(self.sde.mean_coeff(_t(0.7))) == 1.0


# Spec §4 table: (sde, eps, Z [4 decimals], median [4 decimals], 10 % quantile [given to
# ``sig10`` significant digits], 90 % quantile [4 decimals]).
IS_TABLE = [
    ("vp", 1e-5, 23.8645, 0.1144, 1.08e-4, 3, 0.8726),
    ("vp", 5e-5, 22.2511, 0.1668, 4.45e-4, 3, 0.8818),
    ("vp", 1e-3, 19.1654, 0.3046, 4.99e-3, 3, 0.8991),
    ("vp", 1e-2, 16.2661, 0.4494, 2.72e-2, 3, 0.9151),
    ("subvp", 1e-5, 37.6789, 0.0306, 6.5e-5, 2, 0.7898),
    ("subvp", 1e-2, 22.4841, 0.2289, 2.03e-2, 3, 0.8805),
]


def _round_sig(x: float, sig: int) -> float:
    return float(f"{x:.{sig - 1}e}")


@pytest.mark.parametrize("name, eps, Z, med, q10, sig10, q90", IS_TABLE)
def test_importance_sampling_reference_table(name, eps, Z, med, q10, sig10, q90):
    """Spec §4: normaliser Z = F(1) and quantiles of p_IS ∝ g^2/sigma^2 on [eps, 1]."""
    sde = get_sde(name)
    assert round(_f(sde.importance_normalizer(eps)), 4) == pytest.approx(Z, abs=1e-12)
    q = sde.importance_icdf(torch.tensor([0.5, 0.1, 0.9], dtype=F64), eps)
    assert round(_f(q[0]), 4) == pytest.approx(med, abs=1e-12)
    assert _round_sig(_f(q[1]), sig10) == pytest.approx(q10, rel=1e-9)
    assert round(_f(q[2]), 4) == pytest.approx(q90, abs=1e-12)


@pytest.mark.parametrize("x, expected", [(0.0, 1.418917), (1.0, 1.418939)])
def test_expected_prior_nll_per_dim(x, expected):
    """Spec §12: E[-log pi(x_T)] / D for VP at T = 1."""
    sde = VPSDE()
    for d in (1, 4):
        x0 = torch.full((3, d), x, dtype=F64)
        val = sde.expected_prior_nll(x0) / d
        assert torch.all(torch.round(val, decimals=6) == expected)


def test_expected_prior_nll_matches_monte_carlo():
    """The closed form is the expectation of -log pi over the kernel at T (all SDEs)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([[0.3, -1.2, 2.0]], dtype=F64)
    for sde in ALL_SDES:
        z = torch.randn(200_000, 3, generator=g, dtype=F64)
        xT = sde.perturb(x0.expand(200_000, 3), torch.ones(200_000, dtype=F64), z)
        mc = -sde.prior_log_prob(xT)
        assert _f(sde.expected_prior_nll(x0)[0]) == pytest.approx(
            _f(mc.mean()), abs=4 * _f(mc.std()) / math.sqrt(200_000)
        )


class TestFloat32Precision:
    """Spec §2.1 / §13.2: the float32 VP std at t = 1e-5 must not lose digits."""

    def test_float32_std_matches_float64(self):
        sde = VPSDE()
        s32 = _f(sde.std(torch.tensor(1e-5, dtype=torch.float32)))
        s64 = _f(sde.std(torch.tensor(1e-5, dtype=F64)))
        assert abs(s32 - s64) / s64 < 1e-5

    @pytest.mark.parametrize("sde", ALL_SDES, ids=ALL_IDS)
    def test_float32_small_t_all_quantities(self, sde):
        t = torch.logspace(-6, 0, 31, dtype=F64)
        for fn in (sde.std, sde.mean_coeff, sde.diffusion_squared, sde.likelihood_weight_ratio):
            torch.testing.assert_close(
                fn(t.float()).double(), fn(t), rtol=2e-5, atol=0, msg=fn.__name__
            )


# ============================================================================================
# hypothesis: kernel properties and consistency with drift / diffusion
# ============================================================================================
times = st.floats(min_value=1e-5, max_value=1.0, allow_nan=False)
sde_strategy = st.sampled_from(ALL_SDES)
linear_beta_sdes = st.sampled_from([VPSDE(), SubVPSDE(), VPSDE(0.05, 10.0), SubVPSDE(0.2, 15)])
any_sde = st.one_of(
    linear_beta_sdes,
    st.sampled_from([VESDE(), VESDE(0.002, 80.0)]),
)


@settings(deadline=None, max_examples=30)
@given(sde=any_sde, t=times)
def test_kernel_is_positive(sde, t):
    tt = _t(t)
    assert _f(sde.std(tt)) > 0
    assert _f(sde.diffusion_squared(tt)) > 0
    assert 0 < _f(sde.mean_coeff(tt)) <= 1
    assert _f(sde.likelihood_weight_ratio(tt)) > 0


@settings(deadline=None, max_examples=30)
@given(sde=any_sde, t1=times, t2=times)
def test_std_increasing_in_t(sde, t1, t2):
    lo, hi = min(t1, t2), max(t1, t2)
    s_lo, s_hi = _f(sde.std(_t(lo))), _f(sde.std(_t(hi)))
    assert s_lo <= s_hi
    if hi > lo * (1 + 1e-6):
        assert s_lo < s_hi


@settings(deadline=None, max_examples=30)
@given(sde=linear_beta_sdes, t1=times, t2=times)
def test_mean_coeff_in_unit_interval_and_decreasing(sde, t1, t2):
    lo, hi = min(t1, t2), max(t1, t2)
    a_lo, a_hi = _f(sde.mean_coeff(_t(lo))), _f(sde.mean_coeff(_t(hi)))
    assert 0 < a_hi <= a_lo <= 1
    if hi > lo * (1 + 1e-6):
        assert a_hi < a_lo


def _time_derivative(fn, t: float) -> float:
    tt = torch.tensor(t, dtype=F64, requires_grad=True)
    out = fn(tt)
    if not out.requires_grad:  # constant in t (VE mean coefficient)
        return 0.0
    (grad,) = torch.autograd.grad(out, tt)
    return _f(grad)


@settings(deadline=None, max_examples=30)
@given(sde=any_sde, t=times)
def test_mean_coeff_solves_drift_ode(sde, t):
    """d alpha / dt = drift_coeff(t) * alpha(t) (autograd)."""
    lhs = _time_derivative(sde.mean_coeff, t)
    tt = _t(t)
    rhs = _f(sde.drift_coeff(tt) * sde.mean_coeff(tt))
    assert lhs == pytest.approx(rhs, rel=1e-9, abs=1e-12)


@settings(deadline=None, max_examples=30)
@given(sde=any_sde, t=times)
def test_variance_solves_lyapunov_ode(sde, t):
    """d sigma^2 / dt = 2 drift_coeff(t) sigma^2 + g^2 (autograd), for all three SDEs."""
    lhs = _time_derivative(lambda s: sde.std(s) ** 2, t)
    tt = _t(t)
    rhs = _f(2 * sde.drift_coeff(tt) * sde.std(tt) ** 2 + sde.diffusion_squared(tt))
    assert lhs == pytest.approx(rhs, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("sde", ALL_SDES, ids=ALL_IDS)
def test_kernel_consistency_by_finite_differences(sde):
    """The same two identities by central differences on a grid (no autograd)."""
    t = torch.linspace(0.01, 0.99, 50, dtype=F64)
    h = 1e-6
    da = (sde.mean_coeff(t + h) - sde.mean_coeff(t - h)) / (2 * h)
    dv = (sde.std(t + h) ** 2 - sde.std(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(da, sde.drift_coeff(t) * sde.mean_coeff(t), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(
        dv,
        2 * sde.drift_coeff(t) * sde.std(t) ** 2 + sde.diffusion_squared(t),
        rtol=1e-6,
        atol=1e-9,
    )


@settings(deadline=None, max_examples=30)
@given(t=times, bmin=st.floats(0.0, 1.0), db=st.floats(0.5, 30.0))
def test_subvp_variance_below_vp_variance(t, bmin, db):
    """sub-VP variance (1 - e^{-B})^2 <= VP variance 1 - e^{-B}; sub-VP std == VP variance."""
    vp, sub = VPSDE(bmin, bmin + db), SubVPSDE(bmin, bmin + db)
    tt = _t(t)
    v_vp, v_sub = _f(vp.std(tt) ** 2), _f(sub.std(tt) ** 2)
    assert v_sub <= v_vp
    assert _f(sub.std(tt)) == pytest.approx(v_vp, rel=1e-12)
    assert _f(sub.mean_coeff(tt)) == _f(vp.mean_coeff(tt))
    assert _f(sub.diffusion_squared(tt)) <= _f(vp.diffusion_squared(tt))


@settings(deadline=None, max_examples=25)
@given(sde=any_sde, t=times, seed=st.integers(0, 2**16))
def test_perturb_marginal_and_ode_drift(sde, t, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 3, generator=g, dtype=F64)
    z = torch.randn(4, 3, generator=g, dtype=F64)
    tt = torch.full((4,), t, dtype=F64)
    mean, std = sde.mean_coeff(tt)[:, None] * x0, sde.std(tt)
    torch.testing.assert_close(sde.perturb(x0, tt, z), mean + std[:, None] * z)
    score = torch.randn(4, 3, generator=g, dtype=F64)
    expected = sde.drift_coeff(tt)[:, None] * x0 - 0.5 * sde.diffusion_squared(tt)[:, None] * score
    torch.testing.assert_close(sde.ode_drift(x0, tt, score), expected)
    # divergence of the probability-flow drift, by finite differences of ode_drift for a linear
    # score s = A x (div s = tr A): the drift is linear in x, so central differences are exact
    A = torch.randn(3, 3, generator=g, dtype=F64)
    x = x0[:1]
    h = 1e-3
    fd = sum(
        float(
            (sde.ode_drift(x + h * e, _t(t), (x + h * e) @ A.T)
             - sde.ode_drift(x - h * e, _t(t), (x - h * e) @ A.T))[0, k]
        ) / (2 * h)
        for k, e in enumerate(torch.eye(3, dtype=F64))
    )
    div = sde.ode_drift_divergence(_t(t), 3, torch.trace(A).reshape(1))
    assert float(div[0]) == pytest.approx(fd, rel=1e-8, abs=1e-8)


@pytest.mark.parametrize("sde", ALL_SDES, ids=ALL_IDS)
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_drift_divergence_integral_matches_quadrature(sde, eps):
    d = 3
    val, _ = scipy.integrate.quad(lambda s: 3 * _f(sde.drift_coeff(_t(s))), eps, 1.0)
    assert sde.drift_divergence_integral(eps, d) == pytest.approx(val, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("sde", ALL_SDES, ids=ALL_IDS)
def test_prior_log_prob(sde):
    z = torch.tensor([[0.0, 0.0], [1.0, -2.0]], dtype=F64)
    expected = scipy.stats.norm(0, sde.prior_std).logpdf(z.numpy()).sum(-1)
    np.testing.assert_allclose(sde.prior_log_prob(z).numpy(), expected, rtol=1e-12)
    s = sde.prior_sample((20_000, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    assert _f(s.std()) == pytest.approx(sde.prior_std, rel=0.03)


# ============================================================================================
# Importance-sampling proposal p_IS ∝ g^2 / sigma^2 on [eps, T]
# ============================================================================================
IS_CASES = [
    (VPSDE(), 1e-5),
    (VPSDE(), 1e-3),
    (VPSDE(), 1e-2),
    (SubVPSDE(), 1e-5),
    (SubVPSDE(), 1e-2),
    (VESDE(), 1e-5),
    (VESDE(), 1e-2),
    (VPSDE(0.05, 12.0), 1e-4),
]
IS_IDS = [f"{s.name}-{e:g}" for s, e in IS_CASES]


@pytest.mark.parametrize("sde, eps", IS_CASES, ids=IS_IDS)
def test_icdf_cdf_round_trip(sde, eps):
    """importance_cdf(importance_icdf(u)) == u to ~1e-9 (float64)."""
    u = torch.cat(
        [
            torch.linspace(0, 1, 1001, dtype=F64),
            torch.logspace(-12, -1, 23, dtype=F64),
            1 - torch.logspace(-12, -1, 23, dtype=F64),
        ]
    )
    t = sde.importance_icdf(u, eps)
    assert torch.all((t >= eps) & (t <= sde.T))
    assert _f(t[0]) == pytest.approx(eps, rel=1e-9)
    assert _f(t[1000]) == pytest.approx(sde.T, rel=1e-9)
    torch.testing.assert_close(sde.importance_cdf(t, eps), u, rtol=0, atol=1e-9)
    # and the other way round, t -> u -> t
    tg = torch.logspace(math.log10(eps), 0, 200, dtype=F64)
    back = sde.importance_icdf(sde.importance_cdf(tg, eps), eps)
    torch.testing.assert_close(back, tg, rtol=1e-8, atol=0)


@pytest.mark.parametrize("sde, eps", IS_CASES, ids=IS_IDS)
def test_importance_normalizer_matches_quadrature(sde, eps):
    """Z = ∫_eps^T g^2/sigma^2 dt, by quadrature in log t."""
    val, _ = scipy.integrate.quad(
        lambda u: math.exp(u) * _f(sde.likelihood_weight_ratio(_t(math.exp(u)))),
        math.log(eps),
        0.0,
        epsabs=1e-12,
        epsrel=1e-12,
        limit=200,
    )
    assert _f(sde.importance_normalizer(eps)) == pytest.approx(val, rel=1e-9)


@pytest.mark.parametrize("sde, eps", IS_CASES, ids=IS_IDS)
def test_importance_log_prob_integrates_to_one(sde, eps):
    """∫ p_IS(t) dt = 1 (quadrature in log t), and -inf outside [eps, T]."""
    val, _ = scipy.integrate.quad(
        lambda u: math.exp(u + _f(sde.importance_log_prob(_t(math.exp(u)), eps))),
        math.log(eps),
        0.0,
        epsabs=1e-12,
        epsrel=1e-12,
        limit=200,
    )
    assert val == pytest.approx(1.0, abs=1e-8)
    outside = sde.importance_log_prob(torch.tensor([eps / 2, 1.5], dtype=F64), eps)
    assert torch.all(torch.isneginf(outside))


@pytest.mark.parametrize("sde, eps", IS_CASES, ids=IS_IDS)
def test_importance_log_prob_is_cdf_derivative(sde, eps):
    t = torch.logspace(math.log10(eps) + 0.1, -0.01, 40, dtype=F64)
    h = 1e-7 * t
    dcdf = (sde.importance_cdf(t + h, eps) - sde.importance_cdf(t - h, eps)) / (2 * h)
    torch.testing.assert_close(torch.log(dcdf), sde.importance_log_prob(t, eps), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "sde, eps",
    [(VPSDE(), 1e-5), (VPSDE(), 1e-2), (SubVPSDE(), 1e-5), (SubVPSDE(), 1e-2)],
    ids=["vp-1e-5", "vp-1e-2", "subvp-1e-5", "subvp-1e-2"],
)
def test_importance_samples_goodness_of_fit(sde, eps):
    """Kolmogorov-Smirnov test of sampled times against the CDF (fixed seed)."""
    g = torch.Generator().manual_seed(1234)
    t = sde.sample_time(5000, eps, generator=g, dtype=F64)
    assert torch.all((t >= eps) & (t <= 1))

    def cdf(v):
        return sde.importance_cdf(torch.as_tensor(v, dtype=F64), eps).numpy()

    res = scipy.stats.kstest(t.numpy(), cdf)
    assert res.pvalue > 0.01
    # and the samples are clearly *not* uniform on [eps, 1]
    res_u = scipy.stats.kstest(t.numpy(), scipy.stats.uniform(eps, 1 - eps).cdf)
    assert res_u.pvalue < 1e-6


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_ve_proposal_is_uniform(eps):
    sde = VESDE()
    t = torch.linspace(eps, 1, 33, dtype=F64)
    torch.testing.assert_close(sde.importance_cdf(t, eps), (t - eps) / (1 - eps))
    torch.testing.assert_close(
        sde.importance_log_prob(t, eps), torch.full_like(t, -math.log(1 - eps))
    )
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(
        sde.sample_time(100, eps, generator=g1, dtype=F64),
        sde.sample_time(100, eps, generator=g2, dtype=F64, importance_sampling=False),
    )


def test_sample_time_dtype_range_and_reproducibility():
    sde = VPSDE()
    t1 = sde.sample_time(1000, generator=torch.Generator().manual_seed(3))
    t2 = sde.sample_time(1000, generator=torch.Generator().manual_seed(3))
    assert t1.dtype == torch.float32
    assert torch.equal(t1, t2)
    assert torch.all((t1 >= 1e-5) & (t1 <= 1))
    tu = sde.sample_time(
        1000, 0.1, importance_sampling=False, generator=torch.Generator().manual_seed(3)
    )
    assert torch.all((tu >= 0.1) & (tu <= 1))


def test_importance_icdf_keeps_dtype():
    sde = SubVPSDE()
    u = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float32)
    t = sde.importance_icdf(u)
    assert t.dtype == torch.float32
    assert _f(t[0]) == pytest.approx(1e-2, rel=1e-6)


# ============================================================================================
# Registry and validation
# ============================================================================================
@pytest.mark.parametrize(
    "name, cls", [("vp", VPSDE), ("VP", VPSDE), ("sub-vp", SubVPSDE), ("sub_VP", SubVPSDE),
                  ("subvp", SubVPSDE), ("ve", VESDE)]
)
def test_get_sde_names(name, cls):
    assert type(get_sde(name)) is cls


def test_get_sde_parameters_and_passthrough():
    sde = get_sde("ve", sigma_max=10.0)
    assert sde.prior_std == 10.0
    assert get_sde(sde) is sde
    assert set(_SDES) == {"ve", "vp", "subvp"}
    assert issubclass(VPSDE, SDE)


def test_get_sde_errors():
    with pytest.raises(ValueError, match="vp"):
        get_sde("nope")
    with pytest.raises(TypeError):
        get_sde(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        VPSDE(beta_min=5.0, beta_max=1.0)
    with pytest.raises(ValueError):
        VESDE(sigma_min=0.0)


@pytest.mark.parametrize("sde", ALL_SDES, ids=ALL_IDS)
def test_config_round_trip(sde):
    rebuilt = get_sde(sde.name, **sde.config())
    assert type(rebuilt) is type(sde) and rebuilt.config() == sde.config()
    assert repr(rebuilt) == repr(sde)
