"""Tests of :mod:`skscoreflow.sampling`: reverse-SDE (with and without the Langevin
corrector) and probability-flow ODE samplers with the exact score of a Gaussian."""

from __future__ import annotations


import pytest
import torch

from skscoreflow.sampling import _SAMPLERS, _denoise, ode_sample, sde_sample
from skscoreflow.sde import VESDE, VPSDE, SubVPSDE

F64 = torch.float64
SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}
MEAN = torch.tensor([1.0, -0.5], dtype=F64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=F64)
N = 3000


def _assert_moments(x, mean, cov, n, bias=0.03):
    """Sample mean and covariance within ~4 standard errors (+ a small discretisation bias)."""
    assert x.shape == (n, 2) and torch.isfinite(x).all()
    x = x.double().cpu()
    mean, cov = mean.double().cpu(), cov.double().cpu()
    se_mean = (cov.diagonal() / n).sqrt()
    assert torch.all((x.mean(0) - mean).abs() < 4 * se_mean + bias), (x.mean(0), mean)
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    emp = torch.cov(x.T)
    assert torch.all((emp - cov).abs() < 4 * se_cov + bias), (emp, cov)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize(
    "sampler, kwargs",
    [
        ("ode", {}),
        ("sde", {"n_steps": 300}),
        ("sde", {"n_steps": 300, "corrector": True}),
    ],
    ids=["ode", "sde", "sde+corrector"],
)
def test_samplers_reproduce_gaussian_moments(
    name, sampler, kwargs, gaussian_oracle, device, dtype
):
    """All samplers, all SDEs (including the sub-VP Langevin corrector, which fails in the
    reference implementations), reproduce N(mean, cov) within sampling error."""
    sde = SDES[name]
    oracle = gaussian_oracle(sde, MEAN.to(device, dtype), COV.to(device, dtype))
    gen = torch.Generator(device=device).manual_seed(0)
    x = _SAMPLERS[sampler](
        oracle.score, sde, N, 2, generator=gen, device=device, dtype=dtype, **kwargs
    )
    assert x.dtype == dtype
    _assert_moments(x, MEAN, COV, N)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_ode_sample_is_exact_inverse_flow_then_denoise(name, gaussian_oracle):
    """The ODE sampler maps its prior draws through the exact inverse flow (to solver
    tolerance) and then applies the Tweedie denoiser at eps."""
    sde = SDES[name]
    oracle = gaussian_oracle(sde, MEAN, COV)
    eps = {"vp": 1e-3, "subvp": 1e-2, "ve": 1e-5}[name]  # the sampling cutoffs
    z = sde.prior_sample((50, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    x_eps = oracle.inverse_flow(z, eps)
    raw = ode_sample(
        oracle.score, sde, 50, 2, generator=torch.Generator().manual_seed(3), dtype=F64,
        denoise_final=False, rtol=1e-8, atol=1e-8,
    )
    torch.testing.assert_close(raw, x_eps, rtol=0, atol=1e-5)
    den = ode_sample(
        oracle.score, sde, 50, 2, generator=torch.Generator().manual_seed(3), dtype=F64,
        rtol=1e-8, atol=1e-8,
    )
    torch.testing.assert_close(den, _denoise(oracle.score, x_eps, sde, eps), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_denoise_is_gaussian_posterior_mean(name, gaussian_oracle):
    """Tweedie: (x + sigma^2 s) / alpha = E[x0 | x_t] = mu + Sigma alpha C_t^-1 (x - alpha mu)."""
    sde = SDES[name]
    oracle = gaussian_oracle(sde, MEAN, COV)
    t = 0.3
    xt = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    tt = torch.tensor(t, dtype=F64)
    alpha, sigma = sde.mean_coeff(tt), sde.std(tt)
    C = alpha**2 * COV + sigma**2 * torch.eye(2, dtype=F64)
    post = MEAN + (alpha * (xt - alpha * MEAN)) @ torch.linalg.solve(C, COV)
    torch.testing.assert_close(_denoise(oracle.score, xt, sde, t), post)


def test_sde_sampler_discretisation_error_shrinks():
    """Euler-Maruyama bias: the variance error with 20 steps exceeds that with 400 steps."""
    sde = VPSDE()
    cov1 = torch.tensor([[0.25]], dtype=F64)
    errs = []
    for steps in (20, 400):
        x = sde_sample(
            lambda y, t: -y / (sde.mean_coeff(t)[:, None] ** 2 * 0.25 + sde.std(t)[:, None] ** 2),
            sde, 20_000, 1, n_steps=steps, generator=torch.Generator().manual_seed(0), dtype=F64,
        )
        errs.append(abs(float(x.var()) - float(cov1)))
    assert errs[0] > 2 * errs[1]


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_samplers_reproducible_and_float32_default(sampler):
    sde = VPSDE()

    def score(y, t):
        return -y

    kw = {"n_steps": 20} if sampler == "sde" else {}
    a = _SAMPLERS[sampler](score, sde, 10, 3, generator=torch.Generator().manual_seed(1), **kw)
    b = _SAMPLERS[sampler](score, sde, 10, 3, generator=torch.Generator().manual_seed(1), **kw)
    c = _SAMPLERS[sampler](score, sde, 10, 3, generator=torch.Generator().manual_seed(2), **kw)
    assert a.dtype == torch.float32 and a.shape == (10, 3)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_corrector_changes_samples_and_global_rng_untouched():
    sde = SubVPSDE()

    def score(y, t):
        return -y / (sde.mean_coeff(t)[:, None] ** 2 + sde.std(t)[:, None] ** 2)

    state = torch.get_rng_state()
    a = sde_sample(score, sde, 200, 2, n_steps=50, generator=torch.Generator().manual_seed(0))
    b = sde_sample(
        score, sde, 200, 2, n_steps=50, corrector=True, n_corrector_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.isfinite(b).all() and not torch.allclose(a, b)


def test_sde_sample_validation():
    with pytest.raises(ValueError, match="n_steps"):
        sde_sample(lambda y, t: -y, VPSDE(), 5, 2, n_steps=0)
    assert set(_SAMPLERS) == {"ode", "sde"}


def test_sde_sampler_runs_from_prior_scale_to_data_scale():
    """Time direction (VE): one step from T without denoising stays at the prior scale (50),
    the full run contracts to the data scale (N(0, 0.1^2) data)."""
    sde = VESDE()

    def score(y, t):
        return -y / (0.01 + sde.std(t)[:, None] ** 2)

    x1 = sde_sample(score, sde, 2000, 1, n_steps=1, denoise_final=False,
                    generator=torch.Generator().manual_seed(0), dtype=F64)
    x = sde_sample(score, sde, 2000, 1, n_steps=200,
                   generator=torch.Generator().manual_seed(0), dtype=F64)
    assert float(x1.std()) > 10
    assert float(x.std()) == pytest.approx(0.1, rel=0.1)


@pytest.mark.parametrize("n_steps", [5, 12, 1000])
def test_langevin_alpha_is_positive_and_matches_score_sde_for_fine_steps(n_steps):
    """alpha = exp(-beta dt): Score-SDE's 1 - beta_i at N = 1000, positive for coarse steps."""
    from skscoreflow.sde import VPSDE

    sde = VPSDE()
    t = torch.linspace(1e-3, 1, 50, dtype=torch.float64)
    dt = 1.0 / n_steps
    alpha = sde.langevin_alpha(t, dt)
    assert (alpha > 0).all() and (alpha <= 1).all()
    if n_steps == 1000:
        torch.testing.assert_close(alpha, 1 - sde.beta(t) * dt, atol=2.1e-4, rtol=0)
