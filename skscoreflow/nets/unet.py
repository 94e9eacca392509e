"""The U-Net score network for images (the DDPM++ family of Score-SDE and ScoreFlow).

:class:`ScoreUNet` takes flat rows (the scikit-learn contract: ``(n, C*H*W)`` in C order) and
reshapes them to images.  Its layout is DDPM++ (cont.) (Song et al., 2021, "Score-Based
Generative Modeling through SDEs"; the network ScoreFlow trains on CIFAR-10):

* a sinusoidal embedding of the noise label ``999 t / T`` followed by a two-layer MLP, projected
  into every residual block as a per-channel bias;
* BigGAN residual blocks (GroupNorm, SiLU, 3x3 convolutions, dropout; down- and up-sampling by
  2x2 average pooling and nearest-neighbour doubling inside the blocks), every residual sum
  divided by ``sqrt(2)``;
* single-head self-attention at the chosen resolutions and in the middle;
* skip connections from every down-path block to the up path (concatenated);
* GroupNorm only, never BatchNorm, so every row is computed on its own: ``score_samples`` of a
  row does not depend on the rows passed with it;
* the last layer of every residual branch, of every attention block and the output convolution
  start near zero, so the untrained network predicts ``eps_hat = 0`` (score 0).

It predicts the noise ``eps_hat(x_t, t)`` and returns the score ``-eps_hat / sigma(t)``.

Examples
--------
>>> import torch
>>> net = ScoreUNet((1, 8, 8), "vp", channels=16, channel_mult=(1, 2), num_res_blocks=1)
>>> net(torch.zeros(3, 64), torch.full((3,), 0.5)).shape
torch.Size([3, 64])
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..sde import SDE, get_sde
from .mlp import _per_row_time, _shared_time

__all__ = ["ScoreUNet", "UNET_PRESETS", "unet_defaults"]

#: Named U-Net sizes.  ``"ddpmpp_cifar10"`` is the DDPM++ (cont.) network of Score-SDE and
#: ScoreFlow for CIFAR-10 (61,804,419 parameters at ``image_shape=(3, 32, 32)``);
#: ``"ddpmpp_deep_cifar10"`` its deep variant (106,632,579).
#:
#: Examples
#: --------
#: >>> UNET_PRESETS["ddpmpp_cifar10"]["channel_mult"]
#: (1, 2, 2, 2)
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "ddpmpp_cifar10": {"channels": 128, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 4,
                       "attn_resolutions": (16,), "dropout": 0.1},
    "ddpmpp_deep_cifar10": {"channels": 128, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 8,
                            "attn_resolutions": (16,), "dropout": 0.1},
}

#: The untrained network's last layers are drawn at this variance scale (the reference's
#: ``init_scale=0``, which it maps to 1e-10): effectively zero, yet not a degenerate init.
_NEAR_ZERO = 1e-10


def unet_defaults(image_shape: Sequence[int], channel_mult: Sequence[int] | None = None
                  ) -> dict[str, Any]:
    """U-Net sizes picked by image size (what the estimator's "auto" sizes resolve to).

    The image is halved while both sides stay even and at least 8, at most three times (four
    levels, as DDPM++ at 32x32); channels double after the first level.  Base channels and
    residual blocks per level grow with the image: 32 and 1 up to 16 pixels a side (sized for a
    CPU), 64 and 2 up to 31, 128 and 4 (DDPM++) from 32.  Attention is at the coarsest
    resolution that is at most 16 (and always in the middle).

    Parameters
    ----------
    image_shape : sequence of int
        ``(C, H, W)``.
    channel_mult : sequence of int, optional
        Levels chosen by the caller: the attention resolution is then picked among theirs.

    Returns
    -------
    dict
        ``channels``, ``channel_mult``, ``num_res_blocks`` and ``attn_resolutions``.

    Examples
    --------
    >>> unet_defaults((1, 8, 8))
    {'channels': 32, 'channel_mult': (1, 2), 'num_res_blocks': 1, 'attn_resolutions': (4,)}
    >>> unet_defaults((3, 32, 32))["channel_mult"]
    (1, 2, 2, 2)
    >>> unet_defaults((1, 8, 8), channel_mult=(1, 2, 2))["attn_resolutions"]
    (2,)
    """
    _, h, w = (int(s) for s in image_shape)
    levels, hh, ww = 1, h, w
    while levels < 4 and hh % 2 == 0 and ww % 2 == 0 and min(hh, ww) >= 8:
        hh, ww, levels = hh // 2, ww // 2, levels + 1
    mult = (1,) + (2,) * (levels - 1) if channel_mult is None else tuple(channel_mult)
    side = min(h, w)
    channels, blocks = (32, 1) if side <= 16 else (64, 2) if side < 32 else (128, 4)
    resolutions = [side // 2**i for i in range(len(mult))]
    low = [r for r in resolutions if r <= 16]
    attn = (low[0] if side >= 32 and low else resolutions[-1],)
    return {"channels": channels, "channel_mult": mult, "num_res_blocks": blocks,
            "attn_resolutions": attn}


def _variance_scaling_(weight: Tensor, scale: float) -> Tensor:
    """DDPM's default init: uniform with variance ``scale / fan_avg``."""
    receptive = weight[0, 0].numel() if weight.ndim > 2 else 1
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    bound = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def _conv(c_in: int, c_out: int, kernel: int, scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
    _variance_scaling_(conv.weight, scale)
    nn.init.zeros_(conv.bias)
    return conv


def _linear(n_in: int, n_out: int, scale: float = 1.0) -> nn.Linear:
    lin = nn.Linear(n_in, n_out)
    _variance_scaling_(lin.weight, scale)
    nn.init.zeros_(lin.bias)
    return lin


def _norm(channels: int) -> nn.GroupNorm:
    # Per-sample statistics only (rows never interact), groups of about four channels: at most
    # 32 (DDPM++), the largest count that divides the channels.
    groups = min(channels // 4, 32)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _timestep_embedding(label: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of the noise label: sines and cosines at ``10000^(-i / (dim/2-1))``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=label.dtype, device=label.device)
                      * (-math.log(10000.0) / (half - 1)))
    arg = label[:, None] * freqs[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class _ResBlock(nn.Module):
    """BigGAN residual block: GN, SiLU, (resample), conv, + time, GN, SiLU, dropout, conv."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float,
                 resample: str | None = None) -> None:
        super().__init__()
        self.norm0 = _norm(c_in)
        self.conv0 = _conv(c_in, c_out, 3)
        self.emb = _linear(emb_dim, c_out)
        self.norm1 = _norm(c_out)
        self.drop = nn.Dropout(dropout)
        self.conv1 = _conv(c_out, c_out, 3, scale=_NEAR_ZERO)
        self.resample = resample
        self.skip = _conv(c_in, c_out, 1) if (c_in != c_out or resample) else None

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return nn.functional.avg_pool2d(x, 2)
        if self.resample == "up":
            return nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self._resample(nn.functional.silu(self.norm0(x)))
        x = self._resample(x)
        h = self.conv0(h) + self.emb(emb)[:, :, None, None]
        h = self.conv1(self.drop(nn.functional.silu(self.norm1(h))))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) / math.sqrt(2.0)


class _AttnBlock(nn.Module):
    """Single-head self-attention over the pixels, residual and rescaled by ``1/sqrt(2)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v = (_conv(channels, channels, 1, scale=0.1) for _ in range(3))
        self.out = _conv(channels, channels, 1, scale=_NEAR_ZERO)

    def forward(self, x: Tensor) -> Tensor:
        n, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (f(h).reshape(n, c, hh * ww) for f in (self.q, self.k, self.v))
        weights = torch.softmax(torch.einsum("nci,ncj->nij", q, k) / math.sqrt(c), dim=-1)
        h = torch.einsum("nij,ncj->nci", weights, v).reshape(n, c, hh, ww)
        return (x + self.out(h)) / math.sqrt(2.0)


class ScoreUNet(nn.Module):
    """U-Net score network ``s_theta(x, t) = -eps_theta(x, t) / sigma(t)`` for images.

    Parameters
    ----------
    image_shape : tuple of int
        ``(C, H, W)``; rows are ``C*H*W`` values in C order (channel planes, each row-major).
    sde : SDE or str
        The forward SDE (gives ``sigma(t)`` and the time horizon ``T``).
    channels : int
        Base channels (multiple of 4, for GroupNorm's groups of four).
    channel_mult : sequence of int
        Channel multiplier per resolution level; the image is halved between levels, so each
        side must be divisible by ``2 ** (len(channel_mult) - 1)``.
    num_res_blocks : int
        Residual blocks per level on the down path (the up path has one more).
    attn_resolutions : sequence of int
        Image sides (of the smaller dimension) at which attention follows each block; the
        middle always has one.
    dropout : float
        Dropout inside the residual blocks.

    Notes
    -----
    The input is divided by ``sqrt(alpha^2 + sigma^2)`` (1 for VP), so every noise level sees
    input of about unit scale.  Under :data:`UNET_PRESETS` ``"ddpmpp_cifar10"`` on
    ``(3, 32, 32)`` the parameter count is the paper's 61,804,419.

    Examples
    --------
    >>> import torch
    >>> net = ScoreUNet((1, 8, 8), "vp", channels=16, channel_mult=(1, 2), num_res_blocks=1)
    >>> x, t = torch.randn(4, 64), torch.full((4,), 0.3)
    >>> float(net.noise(x, t).abs().max()) < 1e-3   # untrained: eps_hat ~ 0
    True
    >>> sum(p.numel() for p in ScoreUNet.from_preset("ddpmpp_cifar10", (3, 32, 32)).parameters())
    61804419
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        sde: SDE | str = "vp",
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attn_resolutions: Sequence[int] | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) of positive ints, got {image_shape}")
        mult = tuple(int(m) for m in channel_mult)
        if not mult or min(mult) < 1:
            raise ValueError(f"channel_mult must be positive ints, got {channel_mult}")
        channels, num_res_blocks = int(channels), int(num_res_blocks)
        if channels < 4 or channels % 4:
            raise ValueError(f"channels must be a positive multiple of 4, got {channels}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        factor = 2 ** (len(mult) - 1)
        c_img, h, w = shape
        if h % factor or w % factor:
            raise ValueError(
                f"image_shape {shape}: both sides must be divisible by {factor} to be halved "
                f"{len(mult) - 1} time(s) (channel_mult={mult}); use fewer levels"
            )
        resolutions = [min(h, w) // 2**i for i in range(len(mult))]
        attn = tuple(int(r) for r in attn_resolutions) if attn_resolutions is not None else (
            resolutions[-1],)
        self.sde = get_sde(sde) if isinstance(sde, str) else sde
        self.image_shape = shape
        self.n_features = c_img * h * w
        self.channels, self.channel_mult = channels, mult
        self.num_res_blocks, self.attn_resolutions = num_res_blocks, attn
        self.dropout = float(dropout)

        emb_dim = 4 * channels
        self.emb_mlp = nn.Sequential(_linear(channels, emb_dim), nn.SiLU(),
                                     _linear(emb_dim, emb_dim))
        self.inp = _conv(c_img, channels, 3)
        # Down path: every block's output is kept for the up path.
        self.down = nn.ModuleList()
        skips, c = [channels], channels
        for level, m in enumerate(mult):
            for _ in range(num_res_blocks):
                block = nn.ModuleList([_ResBlock(c, channels * m, emb_dim, dropout)])
                c = channels * m
                if resolutions[level] in attn:
                    block.append(_AttnBlock(c))
                self.down.append(block)
                skips.append(c)
            if level < len(mult) - 1:
                self.down.append(nn.ModuleList([_ResBlock(c, c, emb_dim, dropout, "down")]))
                skips.append(c)
        self.mid = nn.ModuleList([_ResBlock(c, c, emb_dim, dropout), _AttnBlock(c),
                                  _ResBlock(c, c, emb_dim, dropout)])
        # Up path: each block takes the concatenation with one kept output.
        self.up = nn.ModuleList()
        for level in reversed(range(len(mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList(
                    [_ResBlock(c + skips.pop(), channels * mult[level], emb_dim, dropout)]))
                c = channels * mult[level]
            if resolutions[level] in attn:
                self.up[-1].append(_AttnBlock(c))
            if level > 0:
                self.up.append(nn.ModuleList([_ResBlock(c, c, emb_dim, dropout, "up")]))
        self.out_norm = _norm(c)
        self.out = _conv(c, c_img, 3, scale=_NEAR_ZERO)

    @classmethod
    def from_preset(cls, name: str, image_shape: Sequence[int], sde: SDE | str = "vp",
                    **overrides: Any) -> "ScoreUNet":
        """A network with the sizes of a named preset (:data:`UNET_PRESETS`).

        Parameters
        ----------
        name : str
            A key of :data:`UNET_PRESETS`.
        image_shape : sequence of int
            ``(C, H, W)``.
        sde : SDE or str
            The forward SDE.
        **overrides
            Sizes that replace the preset's (e.g. ``dropout``).

        Returns
        -------
        ScoreUNet
            A new, untrained network.

        Examples
        --------
        >>> net = ScoreUNet.from_preset("ddpmpp_cifar10", (3, 32, 32))
        >>> net.num_res_blocks, net.attn_resolutions
        (4, (16,))
        """
        if name not in UNET_PRESETS:
            raise ValueError(f"unknown U-Net preset {name!r}; expected one of {sorted(UNET_PRESETS)}")
        return cls(image_shape, sde, **{**UNET_PRESETS[name], **overrides})

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable) to rebuild this network.

        Returns
        -------
        dict
            Accepted by :meth:`from_config`.

        Examples
        --------
        >>> ScoreUNet((1, 8, 8), channels=8).config()["image_shape"]
        [1, 8, 8]
        """
        return {
            "network": "unet",
            "image_shape": list(self.image_shape),
            "sde": {"name": self.sde.name, **self.sde.config()},
            "channels": self.channels,
            "channel_mult": list(self.channel_mult),
            "num_res_blocks": self.num_res_blocks,
            "attn_resolutions": list(self.attn_resolutions),
            "dropout": self.dropout,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], sde: SDE | None = None) -> "ScoreUNet":
        """Build an (untrained) network from :meth:`config` output.

        Parameters
        ----------
        config : dict
            As returned by :meth:`config`.
        sde : SDE, optional
            The SDE to use instead of rebuilding the built-in one named in ``config``.

        Returns
        -------
        ScoreUNet
            A new network with freshly initialised weights.

        Examples
        --------
        >>> net = ScoreUNet((1, 8, 8), channels=8)
        >>> ScoreUNet.from_config(net.config()).image_shape
        (1, 8, 8)
        """
        cfg = dict(config)
        cfg.pop("network", None)
        sde_cfg = dict(cfg.pop("sde"))
        if sde is None:
            sde = get_sde(sde_cfg.pop("name"), **sde_cfg)
        return cls(sde=sde, **cfg)

    def noise(self, x: Tensor, t: Tensor) -> Tensor:
        """Predicted noise ``eps_theta(x_t, t)``.

        Parameters
        ----------
        x : Tensor of shape (n, C*H*W)
            Noisy inputs ``x_t`` as flat rows.
        t : Tensor or float
            Time: a scalar or shape ``(n,)``.

        Returns
        -------
        Tensor of shape (n, C*H*W)
            The predicted noise, flat.

        Examples
        --------
        >>> import torch
        >>> net = ScoreUNet((1, 4, 4), channels=8, channel_mult=(1,))
        >>> net.noise(torch.randn(2, 16), 0.5).shape
        torch.Size([2, 16])
        """
        n = x.shape[0]
        t = _shared_time(_per_row_time(t, x))
        scale = torch.rsqrt(self.sde.reference_variance(t))
        h = x.reshape(n, *self.image_shape) * scale.reshape(-1, 1, 1, 1)
        label = (999.0 / float(self.sde.T)) * t
        emb = self.emb_mlp(_timestep_embedding(label, self.channels))
        emb = nn.functional.silu(emb)  # every block projects SiLU(embedding)
        hs = [self.inp(h)]
        for block in self.down:
            h = block[0](hs[-1], emb)
            for attn in block[1:]:
                h = attn(h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](hs[-1], emb)), emb)
        for block in self.up:
            if block[0].resample == "up":
                h = block[0](h, emb)
                continue
            h = block[0](torch.cat([h, hs.pop()], dim=1), emb)
            for attn in block[1:]:
                h = attn(h)
        out = self.out(nn.functional.silu(self.out_norm(h)))
        return out.reshape(n, self.n_features)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Score ``s_theta(x, t) = -eps_theta(x, t) / sigma(t)``.

        Parameters
        ----------
        x : Tensor of shape (n, C*H*W)
            Noisy inputs ``x_t`` as flat rows.
        t : Tensor or float
            Time: a scalar or shape ``(n,)``.

        Returns
        -------
        Tensor of shape (n, C*H*W)
            The score, flat.

        Examples
        --------
        >>> import torch
        >>> net = ScoreUNet((1, 4, 4), channels=8, channel_mult=(1,))
        >>> net(torch.randn(2, 16), torch.tensor([0.1, 0.9])).shape
        torch.Size([2, 16])
        """
        t = _shared_time(_per_row_time(t, x))
        return -self.noise(x, t) / self.sde.std(t)[:, None]
