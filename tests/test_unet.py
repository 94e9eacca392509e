"""Tests of :mod:`skscoreflow.nets.unet`: the DDPM++ U-Net score network."""

from __future__ import annotations

import json
import math

import pytest
import torch

from skscoreflow.nets import UNET_PRESETS, ScoreUNet, network_from_config, unet_defaults
from skscoreflow.sde import VESDE, VPSDE, SubVPSDE

F64 = torch.float64
SMALL = {"channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1}


def _n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _randomise_last_layers(net: ScoreUNet, seed: int = 0) -> ScoreUNet:
    """Give the near-zero layers real weights, so outputs depend on the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("weight") and ("conv1" in name or name.startswith("out.")
                                            or ".out." in name):
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


@pytest.mark.parametrize("preset, count", [("ddpmpp_cifar10", 61_804_419),
                                           ("ddpmpp_deep_cifar10", 106_632_579)])
def test_preset_parameter_count_is_the_papers(preset, count):
    """DDPM++ (cont.) and its deep variant at 3x32x32: the official networks' counts."""
    assert _n_params(ScoreUNet.from_preset(preset, (3, 32, 32))) == count


def test_smaller_layouts_match_the_reference_counts():
    """Counts of the reference implementation at other sizes (the images fact sheet)."""
    assert _n_params(ScoreUNet((1, 8, 8), channels=16, channel_mult=(1, 2), num_res_blocks=1,
                               attn_resolutions=(4,))) == 188_769
    assert _n_params(ScoreUNet((1, 8, 8), channels=32, channel_mult=(1, 2), num_res_blocks=2,
                               attn_resolutions=(4,))) == 1_032_353
    assert _n_params(ScoreUNet.from_preset("ddpmpp_cifar10", (3, 32, 32), channels=64,
                                           num_res_blocks=2)) == 9_864_771


@pytest.mark.parametrize("shape, sizes", [
    ((1, 8, 8), SMALL),
    ((3, 8, 8), SMALL),
    ((1, 28, 28), {"channels": 8, "channel_mult": (1, 2, 2), "num_res_blocks": 1}),
    ((2, 4, 12), {"channels": 8, "channel_mult": (1, 1), "num_res_blocks": 2}),
    ((3, 32, 32), {"channels": 4, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 1,
                   "attn_resolutions": (16,)}),
])
def test_output_shape_is_the_flat_input_shape(shape, sizes):
    d = math.prod(shape)
    net = ScoreUNet(shape, "vp", **sizes)
    x, t = torch.randn(3, d), torch.rand(3)
    assert net(x, t).shape == (3, d)
    assert net.noise(x, t).shape == (3, d)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_untrained_network_predicts_zero_noise(sde):
    """The near-zero last layers make eps_hat ~ 0 (the paper's init_scale = 0)."""
    torch.manual_seed(0)
    net = ScoreUNet((1, 8, 8), sde, **SMALL)
    x = torch.randn(16, 64) * 3
    t = torch.linspace(1e-3, 1, 16)
    assert float(net.noise(x, t).detach().abs().max()) < 1e-3
    # ... while the network is not degenerate: the near-zero layers have a gradient.
    (net.noise(x, t) - x).pow(2).sum().backward()
    assert float(net.out.weight.grad.abs().max()) > 0
    _randomise_last_layers(net)
    assert float(net.noise(x, t).detach().abs().max()) > 1e-2


def test_score_is_minus_noise_over_sigma():
    sde = VPSDE()
    net = _randomise_last_layers(ScoreUNet((1, 8, 8), sde, **SMALL)).double().eval()
    x, t = torch.randn(5, 64, dtype=F64), torch.rand(5, dtype=F64) * 0.9 + 0.05
    torch.testing.assert_close(net(x, t), -net.noise(x, t) / sde.std(t)[:, None])


def test_rows_are_independent_of_their_batch():
    """GroupNorm only: a row's output does not depend on the other rows (batch-invariance),
    nor on a shared time passed as a broadcast view."""
    torch.manual_seed(0)
    net = _randomise_last_layers(ScoreUNet((2, 8, 8), "vp", **SMALL)).double().eval()
    x, t = torch.randn(6, 128, dtype=F64), torch.rand(6, dtype=F64)
    full = net(x, t)
    for i in range(6):
        torch.testing.assert_close(net(x[i:i + 1], t[i:i + 1]), full[i:i + 1],
                                   rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(net(x[[3, 0, 5]], t[[3, 0, 5]]), full[[3, 0, 5]],
                               rtol=1e-10, atol=1e-12)
    shared = torch.tensor(0.4, dtype=F64)
    rowwise = torch.stack([net(x[i:i + 1], shared.reshape(1))[0] for i in range(6)])
    torch.testing.assert_close(net(x, shared.expand(6)), rowwise, rtol=1e-10, atol=1e-12)


def test_no_batchnorm_anywhere():
    net = ScoreUNet.from_preset("ddpmpp_cifar10", (3, 32, 32))
    kinds = {type(m).__name__ for m in net.modules()}
    assert "GroupNorm" in kinds and not any("BatchNorm" in k for k in kinds)
    groups = {m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {32}  # min(C // 4, 32) for 128 and 256 channels


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    net = _randomise_last_layers(ScoreUNet((1, 8, 8), "vp", dropout=0.5, **SMALL))
    x, t = torch.randn(4, 64), torch.rand(4)
    net.train()
    assert not torch.equal(net(x, t), net(x, t))
    net.eval()
    assert torch.equal(net(x, t), net(x, t))


def test_config_round_trip_rebuilds_the_same_layout():
    net = ScoreUNet((3, 8, 8), SubVPSDE(), channels=8, channel_mult=(1, 2), num_res_blocks=2,
                    attn_resolutions=(8, 4), dropout=0.2)
    cfg = json.loads(json.dumps(net.config()))
    rebuilt = network_from_config(cfg)
    assert isinstance(rebuilt, ScoreUNet) and rebuilt.config() == net.config()
    rebuilt.load_state_dict(net.state_dict())
    x, t = torch.randn(2, 192), torch.rand(2)
    torch.testing.assert_close(rebuilt.eval()(x, t), net.eval()(x, t))


@pytest.mark.parametrize("kwargs, match", [
    ({"image_shape": (1, 8)}, "image_shape"),
    ({"image_shape": (1, 6, 6), "channel_mult": (1, 2, 2)}, "divisible by 4"),
    ({"image_shape": (1, 8, 8), "channels": 6}, "multiple of 4"),
    ({"image_shape": (1, 8, 8), "num_res_blocks": 0}, "num_res_blocks"),
    ({"image_shape": (1, 8, 8), "channel_mult": ()}, "channel_mult"),
])
def test_bad_sizes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScoreUNet(**kwargs)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="ddpmpp_cifar10"):
        ScoreUNet.from_preset("ddpm", (3, 32, 32))


@pytest.mark.parametrize("shape, expected", [
    ((1, 8, 8), {"channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
                 "attn_resolutions": (4,)}),
    ((1, 28, 28), {"channels": 64, "channel_mult": (1, 2, 2), "num_res_blocks": 2,
                   "attn_resolutions": (7,)}),
    ((3, 32, 32), {k: v for k, v in UNET_PRESETS["ddpmpp_cifar10"].items() if k != "dropout"}),
    ((1, 5, 5), {"channels": 32, "channel_mult": (1,), "num_res_blocks": 1,
                 "attn_resolutions": (5,)}),
])
def test_default_sizes_by_image_size(shape, expected):
    sizes = unet_defaults(shape)
    assert sizes == expected
    ScoreUNet(shape, **sizes)  # always a valid layout


def test_time_embedding_follows_the_noise_label():
    """The network sees 999 t / T: the same input at different times gives different output."""
    net = _randomise_last_layers(ScoreUNet((1, 8, 8), "vp", **SMALL)).eval()
    x = torch.randn(1, 64).expand(2, 64)
    out = net.noise(x, torch.tensor([0.1, 0.6]))
    assert not torch.allclose(out[0], out[1])
