"""Tests of :mod:`skscoreflow.likelihood`: the probability-flow ODE log-likelihood against the
Gaussian analytic oracle of spec §12, the Hutchinson estimator, chunking and diagnostics."""

from __future__ import annotations

import math

import pytest
import torch

from skscoreflow.likelihood import (
    _DIVERGENCES,
    _divergence,
    _make_probes,
    ode_log_likelihood,
)
from skscoreflow.nets import ScoreMLP
from skscoreflow.sde import VESDE, VPSDE, SubVPSDE

F64 = torch.float64
SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}


def _gaussian(gaussian_oracle, spd, sde, case, dtype, device):
    """Data distributions of the oracle tests.

    ``case`` is ``d`` (1, 2 or 5: diagonal, non-isotropic covariance, non-zero mean) or
    ``"full3"`` (d = 3, random SPD covariance with off-diagonal terms, non-zero mean).
    """
    if case == "full3":
        cov = spd(3, 1)
        mean = torch.tensor([0.8, -0.5, 1.2], dtype=F64)
    else:
        d = int(case)
        cov = torch.diag(torch.linspace(0.4, 1.5, d, dtype=F64))
        mean = torch.linspace(-0.6, 0.9, d, dtype=F64) if d > 1 else torch.tensor([0.7], dtype=F64)
    return gaussian_oracle(sde, mean.to(device, dtype), cov.to(device, dtype))


def _rows(oracle, n, seed=0):
    return oracle.sample(n, torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Analytic oracle: exact ODE-model density
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("case", [1, 2, 5, "full3"])
def test_exact_divergence_matches_ode_model_density(
    name, case, gaussian_oracle, spd, dtype, device
):
    """ODE likelihood with the exact score == log pi(Phi(x)) + log|det dPhi| within 1e-3 nats.

    The target is the prior pushed through the exact affine flow (see ``GaussianOracle``), not
    ``log p_eps(x)``; the two differ by the p_T-vs-pi mismatch, checked loosely below.
    """
    sde = SDES[name]
    oracle = _gaussian(gaussian_oracle, spd, sde, case, dtype, device)
    x = _rows(oracle, 48)
    eps = sde.default_eps
    ll, info = ode_log_likelihood(oracle.score, x, sde, divergence="exact", return_info=True)
    assert ll.shape == (48,) and ll.dtype == dtype
    target = oracle.ode_log_prob(x, eps)
    assert float((ll - target).abs().max()) < 1e-3
    # close to the eps-marginal log-density too, up to the (small) prior mismatch
    assert float((ll - oracle.log_prob(x, eps)).abs().max()) < 0.15
    assert info.divergence == "exact" and info.total_nfe > 0


def test_untrained_score_mlp_is_standard_normal_flow():
    """The zero-initialised network is the exact N(0, I) score; under VP the flow is the
    identity, so the ODE log-density is log N(x; 0, I) (float32, network in the loop)."""
    torch.manual_seed(0)
    sde = VPSDE()
    net = ScoreMLP(2, sde, hidden_layer_sizes=(16, 16))
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(3))
    ll = ode_log_likelihood(net, x, sde)
    expected = -math.log(2 * math.pi) - 0.5 * x.pow(2).sum(-1)
    torch.testing.assert_close(ll, expected, rtol=0, atol=2e-4)


# --------------------------------------------------------------------------------------------
# Hutchinson estimator
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("n_probes", [1, 4])
def test_hutchinson_is_unbiased(probe, n_probes, gaussian_oracle, spd, device, dtype):
    """Averaged over many rows the Hutchinson log-density equals the exact one.

    With a full (non-diagonal) covariance the score's Jacobian has off-diagonal entries, so even
    Rademacher probes have variance: the per-row error is ``v^T M v - tr M`` for a fixed matrix
    ``M`` (the score is linear), which is zero-mean.
    """
    sde = VPSDE()
    oracle = _gaussian(gaussian_oracle, spd, sde, "full3", dtype, device)
    n = 600
    x = _rows(oracle, n, seed=1)
    exact = ode_log_likelihood(oracle.score, x, sde, divergence="exact")
    hutch = ode_log_likelihood(
        oracle.score,
        x,
        sde,
        divergence="hutchinson",
        probe=probe,
        n_probes=n_probes,
        generator=torch.Generator(device=device).manual_seed(11),
    )
    err = hutch - exact
    sd = float(err.std())
    assert sd > 1e-3  # a meaningful test: the estimator is noisy per row
    assert abs(float(err.mean())) < 4 * sd / math.sqrt(n) + 2e-4


def test_hutchinson_variance_falls_with_more_probes(gaussian_oracle, spd):
    sde = SubVPSDE()
    oracle = _gaussian(gaussian_oracle, spd, sde, "full3", F64, "cpu")
    x = _rows(oracle, 300, seed=2)
    exact = ode_log_likelihood(oracle.score, x, sde, divergence="exact")
    sds = []
    for k in (1, 16):
        h = ode_log_likelihood(
            oracle.score, x, sde, divergence="hutchinson", n_probes=k,
            generator=torch.Generator().manual_seed(0),
        )
        sds.append(float((h - exact).std()))
    # variance ~ 1/k: sd ratio ~ 4; demand at least 2.5
    assert sds[0] > 2.5 * sds[1]


def test_rademacher_is_exact_for_diagonal_jacobian(gaussian_oracle, spd):
    """For a diagonal covariance the linear score has a diagonal Jacobian and v^T J v = tr J
    for every Rademacher v; Gaussian probes still have variance."""
    sde = VPSDE()
    oracle = _gaussian(gaussian_oracle, spd, sde, 5, F64, "cpu")
    x = _rows(oracle, 40)
    exact = ode_log_likelihood(oracle.score, x, sde, divergence="exact")
    rad = ode_log_likelihood(oracle.score, x, sde, divergence="hutchinson", probe="rademacher")
    gau = ode_log_likelihood(oracle.score, x, sde, divergence="hutchinson", probe="gaussian")
    assert float((rad - exact).abs().max()) < 1e-4
    assert float((gau - exact).abs().max()) > 1e-2


def test_probes_fixed_per_solve_and_deterministic(gaussian_oracle, spd):
    """Results depend only on the generator: same seed -> identical; default is seeded."""
    sde = VPSDE()
    oracle = _gaussian(gaussian_oracle, spd, sde, "full3", F64, "cpu")
    x = _rows(oracle, 30)

    def run(gen):
        return ode_log_likelihood(oracle.score, x, sde, divergence="hutchinson", generator=gen)

    a = run(torch.Generator().manual_seed(5))
    b = run(torch.Generator().manual_seed(5))
    c = run(torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(run(None), run(None))


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_error_is_that_of_one_fixed_probe(name, probe, gaussian_oracle, spd):
    """Per row, the Hutchinson error is exactly v^T M v - tr M for the row's probe v.

    The exact score is linear with Jacobian -C_t^-1, so the log-density integrand's divergence
    error is (g^2/2)(v^T C_t^-1 v - tr C_t^-1) and, for a probe held fixed over the solve, the
    integrated error is v^T M v - tr M with M = 1/2 ∫ g^2 C_t^-1 dt = U diag(m) U^T,
    m_k = 1/2 log(c_k(T)/c_k(eps)) - ∫ f dt (from dc/dt = 2 f c + g^2).  A probe redrawn at
    each solver step would average the error away.  The probes are regenerated here with
    ``_make_probes`` from the same seed (a single chunk draws them first).
    """
    sde = SDES[name]
    oracle = _gaussian(gaussian_oracle, spd, sde, "full3", F64, "cpu")
    n, eps = 40, sde.default_eps
    x = _rows(oracle, n, seed=4)
    exact = ode_log_likelihood(oracle.score, x, sde, divergence="exact")
    hutch = ode_log_likelihood(
        oracle.score, x, sde, divergence="hutchinson", probe=probe, n_probes=2,
        generator=torch.Generator().manual_seed(21),
    )
    v = _make_probes(n, 3, probe, 2, generator=torch.Generator().manual_seed(21), dtype=F64)
    e, T = torch.tensor(eps, dtype=F64), torch.tensor(sde.T, dtype=F64)
    m = 0.5 * torch.log(oracle.variances(T) / oracle.variances(e))
    m = m - sde.drift_divergence_integral(eps, 1)
    M = (oracle.U * m) @ oracle.U.T
    predicted = (torch.einsum("kni,ij,knj->kn", v, M, v) - m.sum()).mean(0)
    err = hutch - exact
    assert float(err.std()) > 1e-2
    torch.testing.assert_close(err, predicted, rtol=0, atol=2e-3)


def test_auto_divergence_switches_on_dimension(gaussian_oracle, spd):
    sde = VPSDE()
    oracle = _gaussian(gaussian_oracle, spd, sde, "full3", F64, "cpu")
    x = _rows(oracle, 10)
    _, info = ode_log_likelihood(oracle.score, x, sde, return_info=True)
    assert info.divergence == "exact"
    _, info = ode_log_likelihood(oracle.score, x, sde, exact_max_dim=2, return_info=True)
    assert info.divergence == "hutchinson"


# --------------------------------------------------------------------------------------------
# Chunking and diagnostics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_chunking_invariance_and_info(name, gaussian_oracle, spd):
    sde = SDES[name]
    oracle = _gaussian(gaussian_oracle, spd, sde, "full3", F64, "cpu")
    x = _rows(oracle, 30)
    full, info_full = ode_log_likelihood(oracle.score, x, sde, return_info=True)
    chunked, info = ode_log_likelihood(oracle.score, x, sde, chunk_size=7, return_info=True)
    # rows share the adaptive step within a chunk, so agreement is up to solver tolerance
    torch.testing.assert_close(chunked, full, rtol=0, atol=2e-4)
    assert len(info.nfe) == math.ceil(30 / 7) and all(k > 0 for k in info.nfe)
    assert info.total_nfe == sum(info.nfe) > 0
    assert len(info_full.nfe) == 1
    torch.testing.assert_close(info.prior_log_prob + info.delta_log_prob, chunked)
    torch.testing.assert_close(info.prior_log_prob, sde.prior_log_prob(oracle.flow(x, 1e-5)),
                               rtol=0, atol=2e-3)


def test_fixed_step_solver_and_tighter_tolerance(gaussian_oracle, spd):
    sde = SubVPSDE()
    oracle = _gaussian(gaussian_oracle, spd, sde, 2, F64, "cpu")
    x = _rows(oracle, 10)
    target = oracle.ode_log_prob(x, sde.default_eps)
    tight = ode_log_likelihood(oracle.score, x, sde, rtol=1e-9, atol=1e-9)
    assert float((tight - target).abs().max()) < 1e-6
    rk4 = ode_log_likelihood(
        oracle.score, x, sde, method="rk4", options={"step_size": 0.002}
    )
    assert float((rk4 - target).abs().max()) < 1e-3


def test_empty_input_and_validation():
    sde = VPSDE()

    def score(x, t):
        return -x

    assert ode_log_likelihood(score, torch.zeros(0, 2), sde).shape == (0,)
    with pytest.raises(ValueError, match="shape"):
        ode_log_likelihood(score, torch.zeros(3), sde)
    with pytest.raises(ValueError, match="probe"):
        ode_log_likelihood(score, torch.zeros(3, 2), sde, probe="uniform")
    with pytest.raises(ValueError, match="n_probes"):
        ode_log_likelihood(score, torch.zeros(3, 2), sde, n_probes=0)
    with pytest.raises(ValueError, match="eps"):
        ode_log_likelihood(score, torch.zeros(3, 2), sde, eps=0.0)
    with pytest.raises(ValueError) as err:
        ode_log_likelihood(score, torch.zeros(3, 2), sde, divergence="trace")
    for option in _DIVERGENCES:
        assert option in str(err.value)


# --------------------------------------------------------------------------------------------
# _divergence() and _make_probes()
# --------------------------------------------------------------------------------------------
def _nonlinear(x, t):
    return torch.stack(
        [torch.sin(x[:, 0] * x[:, 1]) + t, x[:, 0] ** 2 * x[:, 2], torch.tanh(x.sum(-1)) * t],
        dim=-1,
    )


def test_exact_divergence_is_jacobian_trace():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g, dtype=F64)
    t = torch.rand(6, generator=g, dtype=F64)
    probes = _make_probes(6, 3, "exact", dtype=F64)
    assert probes.shape == (3, 6, 3)
    value, div = _divergence(_nonlinear, x, t, probes, exact=True)
    torch.testing.assert_close(value, _nonlinear(x, t))
    for i in range(6):
        row_fn = lambda r: _nonlinear(r[None], t[i : i + 1])[0]  # noqa: E731, B023
        jac = torch.autograd.functional.jacobian(row_fn, x[i])
        assert float(div[i]) == pytest.approx(float(torch.trace(jac)), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_divergence_unbiased(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, dtype=F64)
    t = torch.rand(4, generator=g, dtype=F64)
    _, exact = _divergence(_nonlinear, x, t, _make_probes(4, 3, "exact", dtype=F64), exact=True)
    probes = _make_probes(4, 3, kind, 20_000, generator=g, dtype=F64)
    _, est = _divergence(_nonlinear, x, t, probes)
    torch.testing.assert_close(est, exact, rtol=0, atol=0.06)


def test_make_probes():
    g = torch.Generator().manual_seed(0)
    r = _make_probes(5, 4, "rademacher", 3, generator=g)
    assert r.shape == (3, 5, 4) and set(r.unique().tolist()) == {-1.0, 1.0}
    n = _make_probes(5, 4, "gaussian", 2, generator=g, dtype=F64)
    assert n.shape == (2, 5, 4) and n.dtype == F64
    with pytest.raises(ValueError):
        _make_probes(5, 4, "sphere")


def test_divergence_create_graph_allows_backprop():
    w = torch.tensor(2.0, dtype=F64, requires_grad=True)
    x = torch.randn(5, 3, dtype=F64)
    t = torch.zeros(5, dtype=F64)
    _, div = _divergence(
        lambda a, b: w * a**2, x, t, _make_probes(5, 3, "exact", dtype=F64), exact=True,
        create_graph=True,
    )
    (grad,) = torch.autograd.grad(div.sum(), w)
    # div(w x^2) = 2 w sum(x), d/dw = 2 sum(x)
    assert float(grad) == pytest.approx(float(2 * x.sum()), rel=1e-12)


class _SquareWithBranchyBackward(torch.autograd.Function):
    """``x**2`` whose backward branches on the data: it cannot be vmapped."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if bool((grad != 0).any()):  # data-dependent control flow
            return 2 * x * grad
        return torch.zeros_like(x)


def test_divergence_handles_a_backward_that_cannot_be_vectorised():
    x = torch.randn(6, 3, dtype=F64)
    t = torch.zeros(6, dtype=F64)
    fn = lambda a, b: _SquareWithBranchyBackward.apply(a)  # noqa: E731
    value, div = _divergence(fn, x, t, _make_probes(6, 3, "exact", dtype=F64), exact=True)
    assert torch.allclose(value, x**2)
    assert torch.allclose(div, 2 * x.sum(-1))  # div(x^2) = 2 sum(x)


@pytest.mark.parametrize("exact", [True, False])
def test_stacked_and_vectorised_divergence_agree(monkeypatch, exact):
    # CPUs share one forward pass among the probes, GPUs push stacked copies (the faster way on
    # each, _vectorise_probes); both must give the same numbers.
    import skscoreflow.likelihood as lik

    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    fn = lambda a, b: net(torch.cat([a, b[:, None]], -1))  # noqa: E731
    x, t = torch.randn(7, 3, generator=g, dtype=F64), torch.rand(7, generator=g, dtype=F64)
    probes = _make_probes(7, 3, "exact" if exact else "rademacher", n_probes=1 if exact else 4,
                         generator=g, dtype=F64)
    assert lik._vectorise_probes(torch.device("cpu"))
    assert not lik._vectorise_probes(torch.device("cuda", 0))
    v1, d1 = _divergence(fn, x, t, probes, exact=exact)
    monkeypatch.setattr(lik, "_vectorise_probes", lambda device: False)
    v2, d2 = _divergence(fn, x, t, probes, exact=exact)
    assert torch.allclose(v1, v2) and torch.allclose(d1, d2, atol=1e-12)
