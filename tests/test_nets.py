"""Tests of :mod:`skscoreflow.nets`: the residual score MLP and its noise-level embedding."""

from __future__ import annotations

import json

import pytest
import torch

from skscoreflow.nets import _FourierFeatures, _NoiseLevelEmbedding, ScoreMLP
from skscoreflow.sde import VESDE, VPSDE, SubVPSDE

F64 = torch.float64
ALL_SDES = [VPSDE(), SubVPSDE(), VESDE()]
ALL_IDS = ["vp", "subvp", "ve"]


def _randomise_output(net: ScoreMLP, seed: int = 0) -> ScoreMLP:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.out.weight.copy_(0.1 * torch.randn(net.out.weight.shape, generator=g))
        net.out.bias.copy_(0.1 * torch.randn(net.out.bias.shape, generator=g))
    return net


@pytest.mark.parametrize("sde", ALL_SDES, ids=ALL_IDS)
def test_untrained_model_is_standard_normal_score(sde):
    """Zero-initialised output: the score is -x / (alpha^2 + sigma^2), exact for N(0, I) data."""
    torch.manual_seed(0)
    net = ScoreMLP(3, sde, hidden_layer_sizes=(16, 16), fourier_features=8).double()
    x = torch.randn(8, 3, dtype=F64)
    t = torch.linspace(1e-5, 1, 8, dtype=F64)
    var = sde.mean_coeff(t) ** 2 + sde.std(t) ** 2
    torch.testing.assert_close(net(x, t), -x / var[:, None], rtol=1e-12, atol=0)


@pytest.mark.parametrize("sde", ALL_SDES, ids=ALL_IDS)
def test_score_is_minus_noise_over_sigma(sde):
    torch.manual_seed(0)
    net = _randomise_output(ScoreMLP(2, sde, hidden_layer_sizes=(16,)).double())
    x = torch.randn(6, 2, dtype=F64)
    t = torch.linspace(1e-3, 1, 6, dtype=F64)
    torch.testing.assert_close(net(x, t), -net.noise(x, t) / sde.std(t)[:, None])
    # the residual changes the output once the last layer is non-zero
    var = sde.mean_coeff(t) ** 2 + sde.std(t) ** 2
    assert not torch.allclose(net(x, t), -x / var[:, None])


def test_shapes_scalar_time_and_dtype():
    torch.manual_seed(0)
    net = ScoreMLP(2, "vp", hidden_layer_sizes=(8, 8))
    x = torch.randn(5, 2)
    out = net(x, torch.tensor(0.5))
    assert out.shape == (5, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out, net(x, torch.full((5,), 0.5)))
    torch.testing.assert_close(out, net(x, 0.5))
    net64 = ScoreMLP(4, VPSDE(), hidden_layer_sizes=(8,)).double()
    assert net64(torch.randn(3, 4, dtype=F64), torch.rand(3, dtype=F64)).dtype == F64


def test_rows_are_independent():
    """A row's output does not depend on the other rows (needed by the batched divergence)."""
    torch.manual_seed(0)
    net = _randomise_output(ScoreMLP(3, VPSDE(), hidden_layer_sizes=(16, 16)).double())
    x = torch.randn(7, 3, dtype=F64)
    t = torch.rand(7, dtype=F64)
    full = net(x, t)
    for i in range(7):
        torch.testing.assert_close(full[i : i + 1], net(x[i : i + 1], t[i : i + 1]))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = _randomise_output(ScoreMLP(2, VPSDE(), hidden_layer_sizes=(8, 12)))
    loss = net(torch.randn(16, 2), torch.rand(16)).pow(2).sum()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_config_round_trip():
    torch.manual_seed(0)
    net = ScoreMLP(
        3,
        SubVPSDE(0.2, 15.0),
        hidden_layer_sizes=(8, 16),
        embedding_dim=10,
        dropout=0.1,
        fourier_features=5,
        fourier_scale=1.3,
    )
    cfg = json.loads(json.dumps(net.config()))  # JSON-serialisable
    rebuilt = ScoreMLP.from_config(cfg)
    assert rebuilt.config() == net.config()
    assert isinstance(rebuilt.sde, SubVPSDE) and rebuilt.sde.config() == net.sde.config()
    rebuilt.load_state_dict(net.state_dict())
    net.eval()
    rebuilt.eval()
    x, t = torch.randn(4, 3), torch.rand(4)
    torch.testing.assert_close(rebuilt(x, t), net(x, t))


def test_dropout_active_only_in_train_mode():
    torch.manual_seed(0)
    net = _randomise_output(ScoreMLP(2, VPSDE(), hidden_layer_sizes=(32,), dropout=0.5))
    x, t = torch.randn(64, 2), torch.rand(64)
    net.eval()
    torch.testing.assert_close(net(x, t), net(x, t))
    net.train()
    assert not torch.equal(net(x, t), net(x, t))


@pytest.mark.parametrize("sizes", [(), (0,), (8, -1)])
def test_invalid_hidden_sizes(sizes):
    with pytest.raises(ValueError, match="hidden_layer_sizes"):
        ScoreMLP(2, VPSDE(), hidden_layer_sizes=sizes)


class TestNoiseLevelEmbedding:
    def test_shape_and_bounds(self):
        emb = _NoiseLevelEmbedding(12)
        out = emb(torch.linspace(-12, 4, 9))
        assert out.shape == (9, 12)
        # sin^2 + cos^2 = 1 per frequency
        torch.testing.assert_close(out[:, :6] ** 2 + out[:, 6:] ** 2, torch.ones(9, 6))

    def test_distinguishes_noise_levels(self):
        emb = _NoiseLevelEmbedding(32)
        log_sigma = torch.log(VPSDE().std(torch.logspace(-5, 0, 50)))
        out = emb(log_sigma)
        d = torch.cdist(out, out) + torch.eye(50) * 1e3
        assert d.min() > 1e-3

    @pytest.mark.parametrize("dim", [0, 1, 7])
    def test_invalid_dim(self, dim):
        with pytest.raises(ValueError):
            _NoiseLevelEmbedding(dim)


@pytest.mark.parametrize("d", [1, 2, 16, 64])
def test_fourier_projection_has_the_stated_scale_in_any_dimension(d):
    """B ~ N(0, scale^2 / d): B^T x has standard deviation ``scale`` for x ~ N(0, I_d)."""
    torch.manual_seed(0)
    ff = _FourierFeatures(d, n_frequencies=4000, scale=0.7)
    x = torch.randn(1, d, dtype=F64)
    x = x / x.norm() * d**0.5  # |x|^2 = d exactly: then B^T x ~ N(0, 0.7^2) per frequency
    proj = x @ ff.B.double()
    assert abs(float(proj.std()) - 0.7) < 0.7 * 4 / 4000**0.5


def test_fourier_features_values_and_shape():
    torch.manual_seed(0)
    ff = _FourierFeatures(2, n_frequencies=3, scale=1.0)
    x = torch.randn(5, 2, dtype=F64)
    out = ff(x)
    assert out.shape == (5, 2 + 6) and ff.out_features == 8
    arg = 2 * torch.pi * x @ ff.B.double()
    torch.testing.assert_close(out, torch.cat([x, arg.sin(), arg.cos()], -1))


@pytest.mark.parametrize("r", [0.0, 0.05, 0.3])
def test_fourier_damping_is_the_expected_feature_under_gaussian_noise(r):
    """Damped features = E[features(clean + sqrt(r) z)] over z ~ N(0, I) (Monte Carlo oracle)."""
    torch.manual_seed(0)
    ff = _FourierFeatures(2, n_frequencies=5, scale=1.0)
    clean = torch.randn(3, 2, dtype=F64)
    damped = ff(clean, torch.full((3, 1), r, dtype=F64))
    g = torch.Generator().manual_seed(1)
    z = torch.randn(200_000, 1, 2, generator=g, dtype=F64)
    mc = ff(clean + r**0.5 * z).mean(0)
    torch.testing.assert_close(damped[:, 2:], mc[:, 2:], atol=6e-3, rtol=0)
    torch.testing.assert_close(damped[:, :2], clean)  # the raw coordinates are never damped


def test_score_mlp_fourier_features_fade_with_the_noise_level():
    """At t = T (pure noise) the sinusoids of large frequencies are switched off."""
    torch.manual_seed(0)
    net = ScoreMLP(2, VPSDE(), (8,), fourier_features=64, fourier_scale=2.0)
    x = torch.randn(4, 2)
    seen = {}
    net.inp.register_forward_hook(lambda m, inp, out: seen.__setitem__("in", inp[0]))
    net.noise(x, torch.full((4,), 1e-5))
    small_t = seen["in"][:, 2:].abs().mean()
    net.noise(x, torch.ones(4))
    large_t = seen["in"][:, 2:].abs().mean()
    assert small_t > 0.4 and large_t < 0.1 * small_t


def test_fourier_frequencies_are_part_of_the_state_dict():
    torch.manual_seed(0)
    a = ScoreMLP(2, VPSDE(), (8,), fourier_features=4)
    torch.manual_seed(1)
    b = ScoreMLP(2, VPSDE(), (8,), fourier_features=4)
    assert not torch.equal(a.fourier.B, b.fourier.B)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.fourier.B, a.fourier.B)


@pytest.mark.parametrize("kwargs", [{"fourier_features": -1}, {"fourier_features": 2, "fourier_scale": 0.0}])
def test_invalid_fourier_options(kwargs):
    with pytest.raises(ValueError, match="must be"):
        ScoreMLP(2, VPSDE(), (8,), **kwargs)
