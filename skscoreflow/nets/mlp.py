"""The residual MLP score network (tabular data).

:class:`ScoreMLP` is a residual MLP conditioned on the noise level through sinusoidal
features of ``log sigma(t)``.  It predicts the noise ``eps_hat(x_t, t)`` and returns the score
``s(x, t) = -eps_hat / sigma(t)`` (the noise-prediction parameterisation of Score-SDE and
ScoreFlow), so the likelihood-weighted loss with importance sampling is the plain noise MSE.

The network is preconditioned so that an untrained (zero-initialised output) model is already
a sensible density: the residual is added to the SDE's Gaussian reference
(:meth:`~skscoreflow.sde.SDE.reference_noise`, the exact noise prediction when the standardised
data are ``N(0, I)``).  Training therefore learns the departure from a Gaussian, and the
probability-flow ODE of the untrained model is well behaved.

Examples
--------
>>> import torch
>>> from skscoreflow.sde import VPSDE
>>> net = ScoreMLP(2, VPSDE(), hidden_layer_sizes=(32, 32))
>>> net(torch.zeros(5, 2), torch.full((5,), 0.5)).shape
torch.Size([5, 2])
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..sde import SDE, get_sde

__all__ = ["ScoreMLP"]

#: Floor of the eigenvalues of a full reference covariance (in standardised units).
_MIN_REFERENCE_EIGENVALUE = 1e-4


class _NoiseLevelEmbedding(nn.Module):
    """Sinusoidal features (sin and cos) of ``log sigma`` at geometric frequencies.

    Parameters
    ----------
    dim : int
        Number of output features (even).
    max_frequency : float
        Highest angular frequency, per unit of ``log sigma``.

    Examples
    --------
    >>> import torch
    >>> emb = _NoiseLevelEmbedding(8)
    >>> emb(torch.log(torch.tensor([1e-3, 0.5, 1.0]))).shape
    torch.Size([3, 8])
    """

    def __init__(self, dim: int = 32, max_frequency: float = 16.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"embedding dim must be an even number >= 2, got {dim}")
        half = dim // 2
        freqs = torch.exp(torch.linspace(math.log(0.25), math.log(max_frequency), half))
        self.register_buffer("freqs", freqs)
        self.dim = dim

    def forward(self, log_sigma: Tensor) -> Tensor:
        """Embed noise levels.

        Parameters
        ----------
        log_sigma : Tensor of shape (n,)
            Log of the kernel std ``sigma(t)``.

        Returns
        -------
        Tensor of shape (n, dim)
            ``[sin(f_k log_sigma), cos(f_k log_sigma)]``.
        """
        arg = log_sigma[:, None] * self.freqs[None, :]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class _FourierFeatures(nn.Module):
    """Fixed random Fourier features ``[x, sin(2 pi B^T x), cos(2 pi B^T x)]`` of the input.

    A plain MLP on low-dimensional coordinates learns high-frequency structure slowly (spectral
    bias; Tancik et al., 2020), so narrow, oscillating densities such as concentric rings need
    very long training (measurements: the user guide's ``fourier_features`` notes).  Random
    sinusoids of the (unit-variance) input give the
    first layer those frequencies directly.  ``B`` has i.i.d. ``N(0, scale^2 / d)`` entries, so
    ``B^T x`` has standard deviation ``scale`` for standard-normal ``x`` in any dimension.

    :class:`ScoreMLP` passes the noise level: each sinusoid is multiplied by its expected
    attenuation under the diffusion noise, ``exp(-2 pi^2 |b|^2 sigma^2 / (alpha^2 + sigma^2))``,
    so a frequency fades out at the noise levels that have washed it out of the data (undamped,
    the network fits that noise).

    Parameters
    ----------
    n_features : int
        Input dimension ``d``.
    n_frequencies : int
        Number of random frequencies ``m``; the output has ``d + 2 m`` features.
    scale : float
        Frequency scale (cycles per unit of the standardised input, summed over dimensions).

    Notes
    -----
    ``B`` is drawn from the global torch RNG at construction (like ``nn.Linear``'s weights;
    :class:`~skscoreflow.ScoreFlowDensity` seeds a forked RNG) and stored as a buffer, so it is
    saved and restored with the state dict.

    Examples
    --------
    >>> import torch
    >>> ff = _FourierFeatures(2, n_frequencies=16, scale=0.7)
    >>> ff(torch.zeros(3, 2)).shape
    torch.Size([3, 34])
    """

    def __init__(self, n_features: int, n_frequencies: int, scale: float) -> None:
        super().__init__()
        if n_frequencies < 1:
            raise ValueError(f"n_frequencies must be >= 1, got {n_frequencies}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.n_features = int(n_features)
        self.n_frequencies = int(n_frequencies)
        self.scale = float(scale)
        B = torch.randn(self.n_features, self.n_frequencies) * (self.scale / math.sqrt(self.n_features))
        self.register_buffer("B", B)

    @property
    def out_features(self) -> int:
        """``d + 2 m``."""
        return self.n_features + 2 * self.n_frequencies

    def forward(self, x: Tensor, noise_fraction: Tensor | None = None) -> Tensor:
        """Features of ``x``, damped by the noise level when ``noise_fraction`` is given.

        Parameters
        ----------
        x : Tensor of shape (n, d)
            Input (standardised by the network).
        noise_fraction : Tensor of shape (n, 1) or None
            Share of the input's variance that is diffusion noise, ``sigma^2 / (alpha^2 +
            sigma^2)`` for the network's scaled input.  Frequency ``b`` is multiplied by
            ``exp(-2 pi^2 |b|^2 noise_fraction)``.

        Returns
        -------
        Tensor of shape (n, d + 2 m)
            ``[x, damped sin, damped cos]``.
        """
        proj = (2 * math.pi) * (x @ self.B.to(x.dtype))
        sin, cos = torch.sin(proj), torch.cos(proj)
        if noise_fraction is not None:
            # For x = clean + Gaussian noise of variance r, E[sin(2 pi b.x) | clean] =
            # exp(-2 pi^2 |b|^2 r) sin(2 pi b.clean): at noise levels that have washed a frequency
            # out, its feature is mostly noise, and undamped it lets the network fit that noise.
            damp = torch.exp((-2 * math.pi**2) * noise_fraction * (self.B.to(x.dtype) ** 2).sum(0))
            sin, cos = damp * sin, damp * cos
        return torch.cat([x, sin, cos], dim=-1)


def _per_row_time(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` as a tensor of shape ``(n,)`` matching ``x``'s rows, dtype and device."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def _shared_time(t: Tensor) -> Tensor:
    """One row of ``t`` when every row has the same time (a broadcast view), else ``t``.

    The ODE solvers evaluate all rows at one time and pass ``t.expand(n)``: the time features
    (noise-level embedding, its MLP, each block's projection of it) are then computed once and
    broadcast over the rows instead of ``n`` times.  Only a stride-0 view qualifies, so the
    check costs nothing and can never merge rows whose times differ.
    """
    if t.ndim == 1 and t.shape[0] > 1 and t.stride(0) == 0:
        return t[:1]
    return t


class _ResBlock(nn.Module):
    def __init__(self, width_in: int, width: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width_in)
        self.lin1 = nn.Linear(width_in, width)
        self.emb = nn.Linear(emb_dim, width)
        self.lin2 = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.skip = nn.Identity() if width_in == width else nn.Linear(width_in, width)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        y = self.lin1(nn.functional.silu(self.norm(h))) + self.emb(emb)
        y = self.lin2(self.drop(nn.functional.silu(y)))
        return self.skip(h) + y


class ScoreMLP(nn.Module):
    """Residual MLP score network ``s_theta(x, t) = -eps_theta(x, t) / sigma(t)``.

    Parameters
    ----------
    n_features : int
        Data dimension ``d``.
    sde : SDE or str
        The forward SDE (gives ``alpha(t)`` and ``sigma(t)`` for the parameterisation).
    hidden_layer_sizes : sequence of int
        Width of each residual block.
    embedding_dim : int
        Number of noise-level features.
    dropout : float
        Dropout inside the residual blocks.
    fourier_features : int
        Number of random Fourier frequencies of the input (random sinusoids of the input, damped by the noise level); 0 feeds
        the coordinates alone.
    fourier_scale : float
        Their frequency scale.
    reference_covariance : array-like of shape (n_features, n_features), optional
        Covariance ``C`` of a full Gaussian reference ``N(0, C)`` (symmetric; eigenvalues below
        1e-4 are raised to it).  The untrained network is then the exact score of ``N(0, C)``
        data, ``-(alpha^2 C + sigma^2 I)^-1 x``, instead of that of ``N(0, I)``.

    Notes
    -----
    ``forward(x, t)`` returns the score; :meth:`noise` returns ``eps_theta``.  Input is scaled
    by ``1 / sqrt(alpha^2 + sigma^2)`` so that every noise level sees unit-variance input for
    standardised data.

    Examples
    --------
    >>> import torch
    >>> from skscoreflow.sde import VPSDE
    >>> net = ScoreMLP(3, VPSDE(), hidden_layer_sizes=(16, 16))
    >>> x, t = torch.randn(4, 3), torch.full((4,), 0.3)
    >>> net(x, t).shape
    torch.Size([4, 3])
    >>> # Untrained, the network is the exact score of N(0, I) data: -x / (alpha^2 + sigma^2).
    >>> sde = VPSDE()
    >>> ref = -x / (sde.mean_coeff(t) ** 2 + sde.std(t) ** 2)[:, None]
    >>> bool(torch.allclose(net(x, t), ref, atol=1e-5))
    True
    >>> # With a full reference: the exact score of N(0, C) data.
    >>> C = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 1.0]])
    >>> net = ScoreMLP(3, sde, hidden_layer_sizes=(16,), reference_covariance=C)
    >>> a2, s2 = sde.mean_coeff(t) ** 2, sde.std(t) ** 2
    >>> ref = -torch.linalg.solve(a2[:, None, None] * C + s2[:, None, None] * torch.eye(3),
    ...                           x[:, :, None])[:, :, 0]
    >>> bool(torch.allclose(net(x, t), ref, atol=1e-5))
    True
    """

    def __init__(
        self,
        n_features: int,
        sde: SDE | str = "vp",
        hidden_layer_sizes: Sequence[int] = (256, 256, 256),
        embedding_dim: int = 64,
        dropout: float = 0.0,
        fourier_features: int = 0,
        fourier_scale: float = 0.35,
        reference_covariance: Any = None,
    ) -> None:
        super().__init__()
        sizes = tuple(int(h) for h in hidden_layer_sizes)
        if not sizes or min(sizes) < 1:
            raise ValueError(f"hidden_layer_sizes must be positive ints, got {hidden_layer_sizes}")
        self.sde = get_sde(sde) if isinstance(sde, str) else sde
        self.n_features = int(n_features)
        self.hidden_layer_sizes = sizes
        self.embedding_dim = int(embedding_dim)
        self.dropout = float(dropout)
        self.fourier_features = int(fourier_features)
        self.fourier_scale = float(fourier_scale)
        if self.fourier_features < 0:
            raise ValueError(f"fourier_features must be >= 0, got {fourier_features}")

        self.embed = _NoiseLevelEmbedding(embedding_dim)
        emb_hidden = 2 * embedding_dim
        self.emb_mlp = nn.Sequential(
            nn.Linear(embedding_dim, emb_hidden), nn.SiLU(), nn.Linear(emb_hidden, emb_hidden)
        )
        self.fourier = (
            _FourierFeatures(self.n_features, self.fourier_features, self.fourier_scale)
            if self.fourier_features
            else None
        )
        n_in = self.n_features + 2 * self.fourier_features
        self.inp = nn.Linear(n_in, sizes[0])
        widths = (sizes[0],) + sizes
        self.blocks = nn.ModuleList(
            _ResBlock(widths[i], widths[i + 1], emb_hidden, dropout) for i in range(len(sizes))
        )
        # A full-covariance Gaussian reference, kept as its eigendecomposition (buffers, so
        # they travel with the state dict): the score of N(0, C) diffused is
        # -(alpha^2 C + sigma^2 I)^-1 x, i.e. 1 / (alpha^2 lambda + sigma^2) on C's eigenvectors.
        self.full_reference = reference_covariance is not None
        if self.full_reference:
            cov = torch.as_tensor(reference_covariance, dtype=torch.float64)
            if cov.shape != (self.n_features, self.n_features):
                raise ValueError(f"reference_covariance must have shape ({self.n_features}, "
                                 f"{self.n_features}), got {tuple(cov.shape)}")
            if not bool(torch.isfinite(cov).all()):
                raise ValueError("reference_covariance must be finite")
            eigvals, eigvecs = torch.linalg.eigh((cov + cov.T) / 2)
            # Collinear or constant columns give (near-)zero eigenvalues: floored so that the
            # reference stays a proper density with a bounded score at every noise level.
            eigvals = eigvals.clamp_min(_MIN_REFERENCE_EIGENVALUE)
            self.register_buffer("ref_eigvals", eigvals.float())
            self.register_buffer("ref_eigvecs", eigvecs.float())
        self.out_norm = nn.LayerNorm(sizes[-1])
        self.out = nn.Linear(sizes[-1], self.n_features)
        # Zero output: the untrained model is the Gaussian reference (see module docstring).
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable) to rebuild this network.

        Returns
        -------
        dict
            Accepted by :meth:`from_config`.
        """
        return {
            "n_features": self.n_features,
            "sde": {"name": self.sde.name, **self.sde.config()},
            "hidden_layer_sizes": list(self.hidden_layer_sizes),
            "embedding_dim": self.embedding_dim,
            "dropout": self.dropout,
            "fourier_features": self.fourier_features,
            "fourier_scale": self.fourier_scale,
            "full_reference": self.full_reference,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], sde: SDE | None = None) -> "ScoreMLP":
        """Build an (untrained) network from :meth:`config` output.

        Parameters
        ----------
        config : dict
            As returned by :meth:`config`.
        sde : SDE, optional
            The SDE to use instead of rebuilding the built-in one named in ``config`` (a
            user-defined SDE cannot be rebuilt from its name).

        Returns
        -------
        ScoreMLP
            A new network with freshly initialised weights.
        """
        cfg = dict(config)
        sde_cfg = dict(cfg.pop("sde"))
        if sde is None:
            sde = get_sde(sde_cfg.pop("name"), **sde_cfg)
        if cfg.pop("full_reference", False):
            # A placeholder of the right shape: the state dict brings the real one.
            cfg["reference_covariance"] = torch.eye(int(cfg["n_features"]))
        return cls(sde=sde, **cfg)

    def reference_noise(self, x: Tensor, t: Tensor) -> Tensor:
        """The Gaussian reference's exact noise prediction (what the untrained network predicts).

        ``sigma (alpha^2 C + sigma^2 I)^-1 x`` for the full reference covariance ``C``, else
        the SDE's ``N(0, I)`` reference (:meth:`~skscoreflow.sde.SDE.reference_noise`).

        Parameters
        ----------
        x : Tensor of shape (n, d)
            Noisy inputs ``x_t``.
        t : Tensor of shape (n,)
            Time.

        Returns
        -------
        Tensor of shape (n, d)
            The reference's noise prediction.
        """
        if not self.full_reference:
            return self.sde.reference_noise(x, t)
        sigma = self.sde.std(t)[:, None]
        alpha2 = self.sde.mean_coeff(t)[:, None] ** 2
        vecs = self.ref_eigvecs.to(x.dtype)
        coef = sigma / (alpha2 * self.ref_eigvals.to(x.dtype) + sigma**2)
        return ((x @ vecs) * coef) @ vecs.T

    def noise(self, x: Tensor, t: Tensor) -> Tensor:
        """Predicted noise ``eps_theta(x_t, t)``.

        Parameters
        ----------
        x : Tensor of shape (n, d)
            Noisy inputs ``x_t``.
        t : Tensor or float
            Time: a scalar or shape ``(n,)``.

        Returns
        -------
        Tensor of shape (n, d)
            The predicted noise.
        """
        t = _shared_time(_per_row_time(t, x))
        sigma = self.sde.std(t)[:, None]
        var = self.sde.reference_variance(t)[:, None]
        x_in = x * torch.rsqrt(var)
        emb = self.emb_mlp(self.embed(torch.log(sigma[:, 0])))
        feats = x_in if self.fourier is None else self.fourier(x_in, sigma**2 / var)
        h = self.inp(feats)
        for block in self.blocks:
            h = block(h, emb)
        residual = self.out(nn.functional.silu(self.out_norm(h)))
        # The SDE's Gaussian reference plus the learned departure from it.
        return self.reference_noise(x, t) + residual

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Score ``s_theta(x, t) = -eps_theta(x, t) / sigma(t)``.

        Parameters
        ----------
        x : Tensor of shape (n, d)
            Noisy inputs ``x_t``.
        t : Tensor or float
            Time: a scalar or shape ``(n,)``.

        Returns
        -------
        Tensor of shape (n, d)
            The score.
        """
        t = _shared_time(_per_row_time(t, x))
        return -self.noise(x, t) / self.sde.std(t)[:, None]
