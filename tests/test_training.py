"""Tests of :mod:`skscoreflow.training`: reproducibility, RNG hygiene, non-finite losses,
EMA, early stopping, warm start, the learning-rate schedule, and an end-to-end density check
on a 2-D set with a known density."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from skscoreflow.datasets import make_dataset, true_log_density
from skscoreflow.likelihood import ode_log_likelihood
from skscoreflow.nets import ScoreMLP
from skscoreflow.sde import VPSDE
from skscoreflow.training import (
    NonFiniteLossError,
    TrainState,
    _learning_rate_at,
    train_score_model,
)


def _net(seed=0, hidden=(16, 16), dropout=0.0, d=2):
    """A small ScoreMLP, initialised without touching the caller's global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ScoreMLP(d, VPSDE(), hidden_layer_sizes=hidden, dropout=dropout)


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g) * torch.tensor([0.5, 1.5]) + torch.tensor([1.0, -1.0])


def _train(model, X, seed=0, **kw):
    kw.setdefault("max_iter", 25)
    kw.setdefault("batch_size", 64)
    kw.setdefault("warmup", 5)
    return train_score_model(model, X, VPSDE(), generator=torch.Generator().manual_seed(seed), **kw)


def _params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# --------------------------------------------------------------------------------------------
# Reproducibility and RNG hygiene
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_same_seed_gives_identical_loss_curve_and_weights(dropout):
    base = _net(dropout=dropout)
    X = _data()
    a = _train(copy.deepcopy(base), X, seed=3)
    b = _train(copy.deepcopy(base), X, seed=3)
    c = _train(copy.deepcopy(base), X, seed=4)
    assert a.loss_curve == b.loss_curve
    assert _params_equal(a.model, b.model) and _params_equal(a.ema_model, b.ema_model)
    assert a.loss_curve != c.loss_curve
    assert not _params_equal(a.model, c.model)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_global_torch_rng_is_untouched(dropout):
    """All randomness comes from the generator (dropout included): the global RNG state is the
    same before and after training, and the result does not depend on it."""
    base = _net(dropout=dropout)
    X = _data()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = _train(copy.deepcopy(base), X, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # a different global state must not change the result
    b = _train(copy.deepcopy(base), X, seed=0)
    assert a.loss_curve == b.loss_curve


def test_default_generator_is_seeded():
    base = _net()
    X = _data()
    a = train_score_model(copy.deepcopy(base), X, VPSDE(), max_iter=10, batch_size=64)
    b = train_score_model(copy.deepcopy(base), X, VPSDE(), max_iter=10, batch_size=64)
    assert a.loss_curve == b.loss_curve


# --------------------------------------------------------------------------------------------
# Non-finite losses
# --------------------------------------------------------------------------------------------
def test_nan_data_raises_non_finite_loss_error():
    X = _data()
    X[5, 1] = float("nan")
    with pytest.raises(NonFiniteLossError, match="step 1"):
        _train(_net(), X, batch_size=256)
    assert issubclass(NonFiniteLossError, FloatingPointError)


class _Exploding(nn.Module):
    """Score ``-exp(w^2) x`` with ``w = 1``: finite at first, but the loss pulls ``w^2`` down,
    and one Adam step of size ~lr = 1e3 sends ``w`` to about -999, where ``exp(w^2)``
    overflows."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, t):
        return -torch.exp(self.w**2) * x


def test_huge_learning_rate_raises_non_finite_loss_error():
    X = _data()
    with pytest.raises(NonFiniteLossError, match="step 2"):
        _train(_Exploding(), X, learning_rate=1e3, warmup=0, grad_clip=None, max_iter=5)


# --------------------------------------------------------------------------------------------
# EMA, early stopping, warm start
# --------------------------------------------------------------------------------------------
def test_ema_differs_from_raw_weights():
    state = _train(_net(), _data(), max_iter=40, ema_decay=0.99)
    assert isinstance(state, TrainState)
    assert state.ema_model is not state.model
    assert not _params_equal(state.model, state.ema_model)
    assert all(not p.requires_grad for p in state.ema_model.parameters())
    assert not state.ema_model.training


def test_zero_ema_decay_tracks_raw_weights():
    state = _train(_net(), _data(), max_iter=10, ema_decay=0.0)
    for p, q in zip(state.model.parameters(), state.ema_model.parameters()):
        torch.testing.assert_close(p.detach(), q)


def test_early_stopping_stops_and_restores_best():
    scores = iter([1.0, 2.0, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0, 0.9])
    snapshots = []

    def validation_fn(ema_model):
        snapshots.append(copy.deepcopy(ema_model.state_dict()))
        return next(scores)

    state = _train(
        _net(), _data(), max_iter=200, validation_fn=validation_fn, validation_interval=5,
        early_stopping=True, n_iter_no_change=3, ema_decay=0.9,
    )
    assert state.stopped_early
    # The untrained model is validated first (step 0); best at the 2nd validation, then 3
    # without improvement -> stop after the 5th.
    assert state.validation_scores == [1.0, 2.0, 1.5, 1.4, 1.3]
    assert state.validation_iters == [0, 5, 10, 15, 20]
    assert state.n_iter == 20 and len(state.loss_curve) == 20
    assert state.best_validation_score == 2.0
    best = snapshots[1]
    final = state.ema_model.state_dict()
    assert all(torch.equal(best[k], final[k]) for k in best)
    assert not all(torch.equal(snapshots[-1][k], final[k]) for k in best)


def test_early_stopping_keeps_the_untrained_model_when_training_only_hurts():
    # The start is a candidate: if every later validation is worse, the initial weights stay.
    scores = iter([5.0, 1.0, 0.9, 0.8, 0.7])
    net = _net()
    initial = copy.deepcopy(net.state_dict())
    state = _train(
        net, _data(), max_iter=200, validation_fn=lambda m: next(scores),
        validation_interval=5, early_stopping=True, n_iter_no_change=3,
    )
    assert state.stopped_early and state.validation_iters == [0, 5, 10, 15]
    final = state.ema_model.state_dict()
    assert all(torch.equal(initial[k], final[k]) for k in initial)
    assert not all(torch.equal(initial[k], v) for k, v in state.model.state_dict().items())


def test_validation_without_early_stopping_runs_to_the_end():
    calls = []
    state = _train(
        _net(), _data(), max_iter=12, validation_fn=lambda m: calls.append(1) or -len(calls),
        validation_interval=5,
    )
    assert not state.stopped_early and state.n_iter == 12
    assert state.validation_iters == [0, 5, 10, 12]  # the start, every interval, the end


def test_warm_start_continues_n_iter():
    X = _data()
    state = _train(_net(), X, max_iter=10)
    opt, ema = state.optimizer, state.ema_model
    first_curve = list(state.loss_curve)
    state2 = _train(state.model, X, max_iter=7, state=state, seed=1)
    assert state2 is state
    assert state2.n_iter == 17 and len(state2.loss_curve) == 17
    assert state2.loss_curve[:10] == first_curve
    assert state2.optimizer is opt and state2.ema_model is ema
    # Adam's step counter continued from the first call
    steps = {int(s["step"]) for s in opt.state.values()}
    assert steps == {17}


def test_learning_rate_schedule():
    lr = 1e-3
    assert _learning_rate_at(0, 100, lr, 10) == pytest.approx(1e-4)
    assert _learning_rate_at(9, 100, lr, 10) == pytest.approx(1e-3)
    assert _learning_rate_at(10, 100, lr, 10) == pytest.approx(1e-3)
    assert _learning_rate_at(55, 100, lr, 10) == pytest.approx(lr * (0.01 + 0.99 * 0.5))
    assert _learning_rate_at(100, 100, lr, 10) == pytest.approx(1e-5)
    assert _learning_rate_at(500, 100, lr, 10) == pytest.approx(1e-5)
    values = [_learning_rate_at(s, 100, lr, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert _learning_rate_at(0, 100, lr, 0) == pytest.approx(lr)


def test_training_validation_errors():
    X = _data()
    with pytest.raises(ValueError, match="max_iter"):
        _train(_net(), X, max_iter=0)
    with pytest.raises(ValueError, match="empty"):
        _train(_net(), X[:0])
    with pytest.raises(ValueError, match="validation_fn"):
        _train(_net(), X, early_stopping=True)
    with pytest.raises(ValueError, match="likelihood_is"):
        _train(_net(), X, weighting="mle")


@pytest.mark.parametrize("weighting", ["score_matching", "likelihood", "likelihood_is"])
def test_training_reduces_loss_for_each_weighting(weighting):
    X = _data(1024)
    state = _train(_net(hidden=(32, 32)), X, max_iter=150, batch_size=256,
                   learning_rate=3e-3, weighting=weighting)
    curve = np.array(state.loss_curve)
    assert np.isfinite(curve).all()
    assert curve[-30:].mean() < curve[:10].mean()


# --------------------------------------------------------------------------------------------
# End to end: held-out log-likelihood on a 2-D set with a known density
# --------------------------------------------------------------------------------------------
def test_moons_model_reaches_true_log_likelihood():
    """ScoreMLP on standardised moons, CI-sized budget: the held-out mean ODE log-likelihood
    (with the standardisation log|det| -sum log sd) is within 0.15 nats of the true one and
    not above it beyond sampling error (a model's cross-entropy cannot beat the entropy)."""
    X = make_dataset("moons", 10_000, random_state=0)
    X_test = make_dataset("moons", 1000, random_state=1)
    mu, sd = X.mean(0), X.std(0)
    Xs = torch.as_tensor((X - mu) / sd, dtype=torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = ScoreMLP(2, VPSDE(), hidden_layer_sizes=(128, 128, 128))
    state = train_score_model(
        net, Xs, VPSDE(), max_iter=1500, batch_size=512, learning_rate=2e-3, warmup=200,
        ema_decay=0.999, generator=torch.Generator().manual_seed(0),
    )
    Xt = torch.as_tensor((X_test - mu) / sd, dtype=torch.float32)
    ll = ode_log_likelihood(state.ema_model, Xt, VPSDE()).double().numpy() - np.log(sd).sum()
    true = true_log_density("moons", X_test)
    diff = ll - true
    se = diff.std() / math.sqrt(len(diff))
    gap = float(true.mean() - ll.mean())
    assert gap < 0.15, gap
    assert gap > -3 * se, (gap, se)
