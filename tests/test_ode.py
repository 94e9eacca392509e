"""The ODE engine (``skscoreflow._ode``): error norms, integration variables, and what they
promise to the likelihood and the sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from skscoreflow import _ode
from skscoreflow.likelihood import ode_log_likelihood
from skscoreflow.nets import ScoreMLP
from skscoreflow.sampling import ode_sample
from skscoreflow.sde import VESDE, VPSDE, SubVPSDE

F64 = torch.float64


def _mixture_score(sde, means, std):
    """Exact score of p_t for data from an equal-weight Gaussian mixture (isotropic ``std``)."""
    mu = torch.as_tensor(means, dtype=F64)

    def score(x, t):
        a = sde.mean_coeff(t)[:, None, None]
        var = a**2 * std**2 + sde.std(t)[:, None, None] ** 2  # (n, 1, 1)
        diff = x[:, None, :] - a * mu[None]  # (n, k, d)
        logw = -(diff**2).sum(-1) / (2 * var[..., 0])
        w = torch.softmax(logw, dim=1)[..., None]
        return -(w * diff).sum(1) / var[:, 0]

    return score


def _mixture_log_density(x, sde, eps, means, std):
    mu = torch.as_tensor(means, dtype=F64)
    t = torch.tensor(eps, dtype=F64)
    var = sde.mean_coeff(t) ** 2 * std**2 + sde.std(t) ** 2
    a = sde.mean_coeff(t)
    d = x.shape[1]
    comp = -((x[:, None, :] - a * mu[None]) ** 2).sum(-1) / (2 * var) - 0.5 * d * torch.log(2 * math.pi * var)
    return torch.logsumexp(comp, 1) - math.log(len(means))


MEANS = [[-1.5, 0.0], [1.5, 0.0], [0.0, 1.2]]


# ------------------------------------------------------------------ registries
def test_row_norm_is_the_worst_row_not_the_average():
    x_err = torch.zeros(100, 2)
    x_err[7] = torch.tensor([3.0, 4.0])  # RMS over the row: sqrt(12.5)
    delta_err = torch.full((100,), 0.1)
    assert float(_ode.row_norm((x_err, delta_err))) == pytest.approx(math.sqrt(12.5))
    # torchdiffeq's mixed norm averages the bad row away.
    mixed = max(float(x_err.pow(2).mean().sqrt()), float(delta_err.pow(2).mean().sqrt()))
    assert mixed < 0.6
    # A row's log-density error counts on its own, not diluted by its coordinates.
    delta_err[3] = 2.0
    assert float(_ode.row_norm((x_err * 0, delta_err))) == pytest.approx(2.0)
    assert float(_ode.row_norm(torch.ones(4, 3))) == pytest.approx(1.0)  # a plain tensor state


@pytest.mark.parametrize("name", ["t", "log_t"])
def test_time_variables_are_inverse_maps_with_their_derivative(name):
    tv = _ode.time_variable(name)
    t = torch.tensor([1e-5, 3e-3, 0.2, 1.0], dtype=F64)
    u = torch.tensor([tv.to_u(float(v)) for v in t], dtype=F64)
    assert torch.allclose(tv.to_t(u), t, rtol=1e-12)
    h = 1e-6
    numeric = (tv.to_t(u + h) - tv.to_t(u - h)) / (2 * h)
    assert torch.allclose(tv.dt_du(t), numeric, rtol=1e-6)


def test_unknown_names_are_rejected_with_the_choices():
    with pytest.raises(ValueError, match="time_variable 'sqrt'.*log_t"):
        _ode.time_variable("sqrt")
    with pytest.raises(ValueError, match="error_norm 'max'.*mixed.*row"):
        _ode.check_error_norm("max")
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="time_variable"):
        ode_log_likelihood(lambda x, t: -x, x, VPSDE(), time_variable="sqrt")
    with pytest.raises(ValueError, match="error_norm"):
        ode_log_likelihood(lambda x, t: -x, x, VPSDE(), error_norm="max")
    with pytest.raises(ValueError, match="needs times > 0"):
        _ode.time_variable("log_t").to_u(0.0)


# ------------------------------------------------------------------ likelihood
@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("time_variable", ["t", "log_t"])
@pytest.mark.parametrize("error_norm", ["row", "mixed"])
def test_every_engine_setting_solves_the_same_ode(sde, time_variable, error_norm):
    # Gaussian data N(0, v I): the model density at eps is known in closed form; every
    # variable and norm solves the same ODE, so they agree with each other to the tolerance
    # (the remaining gap to the closed form is the prior mismatch at T, the same for all).
    v = 0.3
    score = lambda x, t: -x / (sde.mean_coeff(t)[:, None] ** 2 * v + sde.std(t)[:, None] ** 2)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=F64) * math.sqrt(v)
    eps = sde.default_eps
    ref = ode_log_likelihood(score, x, sde, eps=eps, rtol=1e-10, atol=1e-10)
    ll = ode_log_likelihood(score, x, sde, eps=eps, rtol=1e-7, atol=1e-7,
                            time_variable=time_variable, error_norm=error_norm)
    assert float((ll - ref).abs().max()) < 1e-5
    te = torch.tensor(eps, dtype=F64)
    var = sde.mean_coeff(te) ** 2 * v + sde.std(te) ** 2
    truth = -1.5 * torch.log(2 * math.pi * var) - (x**2).sum(1) / (2 * var)
    assert float((ll - truth).abs().max()) < 2e-3


def _mixture_problem(n=300, seed=0):
    sde = VPSDE()
    std = 0.15
    score = _mixture_score(sde, MEANS, std)
    g = torch.Generator().manual_seed(seed)
    # Held-out-like rows from a broader mixture: many fall in the low-density gaps between the
    # sharp modes, the rows whose flow turns fast and that need the small steps.
    k = torch.randint(0, len(MEANS), (n,), generator=g)
    x = torch.tensor(MEANS, dtype=F64)[k] + 0.3 * torch.randn(n, 2, generator=g, dtype=F64)
    return sde, score, x


def test_row_norm_holds_every_row_to_the_tolerance():
    sde, score, x = _mixture_problem()
    eps = 1e-3
    tight = ode_log_likelihood(score, x, sde, eps=eps, rtol=1e-10, atol=1e-10)
    truth = _mixture_log_density(x, sde, eps, MEANS, 0.15)
    assert float((tight - truth).abs().max()) < 0.1  # the model (up to the prior mismatch at T)
    row, info_row = ode_log_likelihood(score, x, sde, eps=eps, return_info=True)
    mixed, info_mixed = ode_log_likelihood(score, x, sde, eps=eps, error_norm="mixed",
                                           return_info=True)
    err_row = float((row - tight).abs().max())
    err_mixed = float((mixed - tight).abs().max())
    # Default tolerances (1e-5): every row within about 1e-3 nats, down to log p = -33 ...
    assert err_row < 2e-3
    # ... while the mixed norm lets the hard rows' error grow far past it (measured: 39x), and
    # the row norm pays for its guarantee with more evaluations.
    assert err_mixed > 10 * err_row
    assert info_row.total_nfe > info_mixed.total_nfe


def test_a_rows_value_does_not_depend_on_its_batch_mates_beyond_the_accuracy():
    sde, score, x = _mixture_problem(n=200, seed=1)
    eps = 1e-3
    tight = ode_log_likelihood(score, x, sde, eps=eps, rtol=1e-10, atol=1e-10)
    together = ode_log_likelihood(score, x, sde, eps=eps)
    alone = torch.cat([ode_log_likelihood(score, x[i : i + 1], sde, eps=eps) for i in range(0, 200, 7)])
    in_pairs = ode_log_likelihood(score, x[::7], sde, eps=eps, chunk_size=2)
    for other in (alone, in_pairs):
        assert float((other - together[::7]).abs().max()) < 3e-3
        assert float((other - tight[::7]).abs().max()) < 2e-3
    assert float((together - tight).abs().max()) < 2e-3


# ------------------------------------------------------------------ networks
def test_one_shared_time_is_computed_once_and_gives_the_per_row_result():
    torch.manual_seed(0)
    net = ScoreMLP(3, VPSDE(), hidden_layer_sizes=(32, 32), fourier_features=8).double()
    for p in net.parameters():  # move the residual off its zero init
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(50, 3, dtype=F64)
    shared = net(x, torch.tensor(0.37, dtype=F64).expand(50))
    per_row = net(x, torch.full((50,), 0.37, dtype=F64))
    assert torch.allclose(shared, per_row, rtol=1e-12, atol=1e-12)
    calls = []
    hook = net.emb_mlp.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    net(x, torch.tensor(0.37, dtype=F64).expand(50))
    net(x, torch.full((50,), 0.37, dtype=F64))
    hook.remove()
    assert calls == [1, 50]
    # Different times are never merged.
    t = torch.linspace(0.1, 0.9, 50, dtype=F64)
    assert torch.allclose(net(x, t), torch.cat([net(x[i : i + 1], t[i : i + 1]) for i in range(50)]))


# ------------------------------------------------------------------ sampler
def test_the_sampler_gives_the_same_samples_in_either_variable():
    # Deterministic flow from the same prior draws: the variable only moves the steps.
    sde = VPSDE()
    score = _mixture_score(sde, MEANS, 0.3)
    kw = dict(rtol=1e-8, atol=1e-8, dtype=F64, denoise_final=False)
    a = ode_sample(score, sde, 64, 2, generator=torch.Generator().manual_seed(3), time_variable="t", **kw)
    b = ode_sample(score, sde, 64, 2, generator=torch.Generator().manual_seed(3), time_variable="log_t", **kw)
    assert float((a - b).abs().max()) < 1e-5


def test_log_t_sampling_needs_far_fewer_evaluations_at_the_same_tolerance():
    # At the estimator's sampling tolerance (1e-4, ten times its likelihood tolerance).
    sde = VPSDE()
    score = _mixture_score(sde, MEANS, 0.15)
    counts = {}
    for variable in ("t", "log_t"):
        n = [0]

        def counted(x, t):
            n[0] += 1
            return score(x, t)

        ode_sample(counted, sde, 256, 2, generator=torch.Generator().manual_seed(0), dtype=F64,
                   time_variable=variable, rtol=1e-4, atol=1e-4)
        counts[variable] = n[0]
    assert counts["log_t"] < 0.6 * counts["t"]  # measured 57 vs 105


def test_estimator_fixed_step_sampler_spans_log_t():
    from skscoreflow import ScoreFlowDensity

    X = np.random.default_rng(0).normal(size=(200, 2))
    est = ScoreFlowDensity(max_iter=5, batch_size=64, solver="rk4", random_state=0).fit(X)
    kw = est._solver_kwargs(1e-3, "log_t")
    assert kw["time_variable"] == "log_t"
    assert kw["options"]["step_size"] == pytest.approx(-math.log(1e-3) / 100)
    assert est.sample(10, random_state=0).shape == (10, 2)


def test_estimator_samples_in_log_t_at_ten_times_its_tolerances(monkeypatch):
    from skscoreflow import ScoreFlowDensity
    from skscoreflow import sampling

    X = np.random.default_rng(0).normal(size=(200, 2))
    est = ScoreFlowDensity(max_iter=5, batch_size=64, rtol=2e-5, atol=3e-5, random_state=0).fit(X)
    seen = {}
    real = sampling._SAMPLERS["ode"]

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setitem(sampling._SAMPLERS, "ode", spy)
    est.sample(5, random_state=0)
    assert seen["time_variable"] == "log_t"
    assert seen["rtol"] == pytest.approx(2e-4) and seen["atol"] == pytest.approx(3e-4)
    # score_samples keeps the estimator's own tolerances, in t.
    assert est._solver_kwargs(est.eps_)["rtol"] == 2e-5
    assert est._solver_kwargs(est.eps_)["time_variable"] == "t"
