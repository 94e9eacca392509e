"""Parameters of :class:`~skscoreflow.ScoreFlowDensity`: constraints and their resolution.

The constraints use scikit-learn's declarative parameter validation (``Interval``,
``StrOptions``, ...), checked by ``_fit_context`` when ``fit`` starts; what a declaration cannot
say (the widths inside ``hidden_layer_sizes``, a device string torch understands) is checked by
the helpers here, with the same kind of message.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import warnings
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import (
    InvalidParameterError,
    Interval,
    StrOptions,
    validate_parameter_constraints,
)

from .dequantization import _DEQUANTIZATIONS
from .likelihood import _DIVERGENCES
from .nets import UNET_PRESETS, unet_defaults
from .sampling import _SAMPLERS
from .sde import SDE
from .weighting import _WEIGHTINGS

__all__: list[str] = []

#: ODE solvers accepted by ``solver``: adaptive ones use ``rtol``/``atol``; fixed-step ones take
#: ``_FIXED_STEPS`` uniform steps over the integrated interval.
_ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
_FIXED_SOLVERS = ("rk4", "midpoint", "euler")
_FIXED_STEPS = 100
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: ``fourier_features="auto"``: this many frequencies for data with at most
#: ``_AUTO_FOURIER_MAX_FEATURES`` features, none for wider data.
_AUTO_FOURIER_FEATURES = 128
_AUTO_FOURIER_MAX_FEATURES = 2
#: ``early_stopping="auto"`` is on below this many rows per feature (the user guide's
#: "Defaults that adapt to the data"): it helped every 1,000-row fit measured, was neutral at
#: 10,000 rows in 8 dimensions and cost 2-D data a little at 10,000 rows.
_EARLY_STOPPING_ROWS_PER_FEATURE = 5_000
#: ``gaussian_reference="auto"`` is "full" below this many rows per feature: with few rows per
#: feature the data's correlations are most of what can be learned (measured: better at 1,000
#: rows in 16 and 32 dimensions, worse in 8).
_FULL_REFERENCE_ROWS_PER_FEATURE = 100
#: ``dropout="auto"``: this much up to the first row count, none from the second, log-linear
#: between (0.3 helped at 1,000 rows and hurt at 10,000, where early stopping suffices).
_AUTO_DROPOUT = 0.3
_AUTO_DROPOUT_ROWS = (1_000, 10_000)
#: Early stopping validates about every this many epochs (see :func:`validation_interval`).
_VALIDATION_EPOCHS = 50
#: ``dropout="auto"`` of the U-Net: DDPM++'s CIFAR-10 value.
_AUTO_UNET_DROPOUT = 0.1
#: ``batch_size="auto"`` per network: the MLP's measured default; the paper's batch for the U-Net.
_AUTO_BATCH_SIZE = {"mlp": 1024, "unet": 128}
#: ``learning_rate="auto"``: the MLP's measured default; for the U-Net the paper's 2e-4 from its
#: 128 base channels (DDPM++), 1e-3 for the smaller networks of small images (digits, measured).
_AUTO_LEARNING_RATE = {"mlp": 2e-3, "unet": 1e-3, "unet_wide": 2e-4}


#: Parameters added with image support, at their defaults (for estimators saved before).
IMAGE_DEFAULTS: dict[str, Any] = {
    "image_shape": None, "network": "auto", "channels": "auto", "channel_mult": "auto",
    "num_res_blocks": "auto", "attn_resolutions": "auto", "augment": None,
}
#: Their fitted attributes for an estimator fitted before (which had the MLP).
IMAGE_FITTED_DEFAULTS: dict[str, Any] = {
    "network_type_": "mlp", "image_shape_": None, "unet_sizes_": None, "n_levels_": None,
}


class _Ints(Interval):
    """Ints ``>= low`` with bools excluded (a plain ``Interval(Integral, ...)`` accepts ``True``)."""

    def __init__(self, low: int) -> None:
        super().__init__(Integral, low, None, closed="left")

    def is_satisfied_by(self, val: Any) -> bool:
        return not isinstance(val, bool) and super().is_satisfied_by(val)


_positive_int = _Ints(1)
_positive_real = Interval(Real, 0, None, closed="neither")
_unit_open = Interval(Real, 0, 1, closed="neither")

PARAMETER_CONSTRAINTS: dict[str, list[Any]] = {
    # An SDE name (checked by get_sde, which also accepts "sub-vp", "VP", ...) or an instance of
    # any SDE subclass.
    "sde": [str, SDE],
    "weighting": [StrOptions(set(_WEIGHTINGS))],
    "dequantization": [StrOptions({d for d in _DEQUANTIZATIONS if d is not None}), None],
    "n_dequantization_samples": [_positive_int],
    "dequantizer_hidden_layer_sizes": ["array-like", _positive_int],
    "dequantizer_n_couplings": [_Ints(0)],
    "dequantizer_max_iter": [_positive_int],
    "hidden_layer_sizes": ["array-like", _positive_int],
    "image_shape": ["array-like", None],
    "network": [StrOptions({"auto", "mlp", "unet"} | set(UNET_PRESETS))],
    "channels": [_Ints(4), StrOptions({"auto"})],
    "channel_mult": ["array-like", StrOptions({"auto"})],
    "num_res_blocks": [_positive_int, StrOptions({"auto"})],
    "attn_resolutions": ["array-like", StrOptions({"auto"})],
    "augment": [StrOptions({"hflip"}), None],
    "fourier_features": [_Ints(0), StrOptions({"auto"})],
    "fourier_scale": [_positive_real],
    "gaussian_reference": [StrOptions({"auto", "full", "diagonal"})],
    "dropout": [Interval(Real, 0, 1, closed="left"), StrOptions({"auto"})],
    "max_iter": [_positive_int],
    "batch_size": [_positive_int, StrOptions({"auto"})],
    "learning_rate": [_positive_real, StrOptions({"auto"})],
    "ema_decay": [Interval(Real, 0, 1, closed="left")],
    "eps": [_unit_open, None],
    "rtol": [_positive_real],
    "atol": [_positive_real],
    "solver": [StrOptions(set(_ADAPTIVE_SOLVERS + _FIXED_SOLVERS))],
    "divergence": [StrOptions(set(_DIVERGENCES))],
    "early_stopping": ["boolean", StrOptions({"auto"})],
    "validation_fraction": [_unit_open],
    "n_iter_no_change": [_positive_int],
    "tol": [Interval(Real, 0, None, closed="left")],
    "warm_start": ["boolean"],
    "dtype": [StrOptions(set(_DTYPES))],
    "device": [str, torch.device],
    "random_state": ["random_state"],
    "verbose": ["verbose"],
    "checkpoint_path": [str, os.PathLike, None],
    "checkpoint_every": [_positive_int],
    "shuffle": ["boolean"],
    "standardize": ["boolean"],
    "distributed": ["boolean", StrOptions({"auto"})],
}

SAMPLE_CONSTRAINTS: dict[str, list[Any]] = {
    "n_samples": [_positive_int],
    "random_state": ["random_state"],
    "method": [StrOptions(set(_SAMPLERS))],
    "n_steps": [_positive_int],
    "corrector": ["boolean"],
}

BOUND_CONSTRAINTS: dict[str, list[Any]] = {
    "n_time_samples": [_positive_int],
    "importance_sampling": ["boolean"],
    "offset": ["boolean"],
    "random_state": ["random_state"],
}


def layer_sizes(name: str, sizes: Any) -> tuple[int, ...]:
    """``sizes`` as a non-empty tuple of positive ints (a bare int is one layer)."""
    if isinstance(sizes, Integral) and not isinstance(sizes, bool):
        sizes = (sizes,)
    if len(sizes) == 0 or not all(
        isinstance(h, Integral) and not isinstance(h, bool) and h > 0 for h in sizes
    ):
        raise InvalidParameterError(
            f"The {name!r} parameter of ScoreFlowDensity must be a non-empty sequence of "
            f"positive ints. Got {sizes!r} instead."
        )
    return tuple(int(h) for h in sizes)


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` with "auto" resolved (CUDA when available); a clear error otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise InvalidParameterError(
            f"The 'device' parameter of ScoreFlowDensity must be 'auto' or a torch device such "
            f"as 'cpu' or 'cuda:0'. Got {device!r} instead."
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available")
    return dev


def fourier_count(fourier_features: int | str, n_features: int) -> int:
    """``fourier_features`` with "auto" resolved for ``n_features`` features."""
    if isinstance(fourier_features, str):
        return _AUTO_FOURIER_FEATURES if n_features <= _AUTO_FOURIER_MAX_FEATURES else 0
    return int(fourier_features)


def resolve_early_stopping(early_stopping: bool | str, n_samples: int, n_features: int) -> bool:
    """``early_stopping`` with "auto" resolved for the shape of the training data: on with
    fewer than ``_EARLY_STOPPING_ROWS_PER_FEATURE`` rows per feature."""
    if isinstance(early_stopping, str):
        return n_samples < _EARLY_STOPPING_ROWS_PER_FEATURE * n_features
    return bool(early_stopping)


def resolve_gaussian_reference(gaussian_reference: str, n_samples: int, n_features: int) -> str:
    """``gaussian_reference`` with "auto" resolved for the shape of the training data: "full"
    with fewer than ``_FULL_REFERENCE_ROWS_PER_FEATURE`` rows per feature (and more than one
    feature), else "diagonal"."""
    if gaussian_reference == "auto":
        few = n_samples < _FULL_REFERENCE_ROWS_PER_FEATURE * n_features
        return "full" if few and n_features > 1 else "diagonal"
    return gaussian_reference


def resolve_dropout(dropout: float | str, n_samples: int, network: str = "mlp") -> float:
    """``dropout`` with "auto" resolved for ``n_samples`` training rows: for the MLP,
    ``_AUTO_DROPOUT`` up to ``_AUTO_DROPOUT_ROWS[0]`` rows, none from ``_AUTO_DROPOUT_ROWS[1]``,
    linear in ``log(n_samples)`` between (rounded to 0.01); for the U-Net
    ``_AUTO_UNET_DROPOUT``."""
    if not isinstance(dropout, str):
        return float(dropout)
    if network == "unet":
        return _AUTO_UNET_DROPOUT
    lo, hi = _AUTO_DROPOUT_ROWS
    share = (math.log(hi) - math.log(max(n_samples, 1))) / (math.log(hi) - math.log(lo))
    return round(_AUTO_DROPOUT * min(1.0, max(0.0, share)), 2)


def image_shape(shape: Any, n_features: int) -> tuple[int, int, int] | None:
    """``image_shape`` checked against the width of the rows: None, or ``(C, H, W)`` of positive
    ints with ``C * H * W == n_features``."""
    if shape is None:
        return None
    try:
        dims = tuple(shape)
        ok = len(dims) == 3 and all(
            isinstance(s, Integral) and not isinstance(s, bool) and s > 0 for s in dims)
    except TypeError:
        ok = False
    if not ok:
        raise InvalidParameterError(
            "The 'image_shape' parameter of ScoreFlowDensity must be None or (C, H, W), three "
            f"positive ints. Got {shape!r} instead.")
    dims = tuple(int(s) for s in dims)
    if math.prod(dims) != n_features:
        raise ValueError(
            f"image_shape={dims} describes rows of {math.prod(dims)} values (C*H*W), but X has "
            f"{n_features} features")
    return dims


def resolve_network(est: Any, n_features: int) -> tuple[str, tuple[int, int, int] | None,
                                                        dict[str, Any] | None]:
    """The network kind ("mlp" or "unet"), the checked image shape and the U-Net's sizes
    (a preset's, else the "auto" sizes of :func:`~skscoreflow.nets.unet_defaults` with the
    explicit ones in place)."""
    shape = image_shape(est.image_shape, n_features)
    kind = est.network
    if kind == "auto":
        kind = "mlp" if shape is None else "unet"
    if kind == "mlp":
        if est.augment is not None and shape is None:
            raise ValueError(f"augment={est.augment!r} flips images: set image_shape")
        return "mlp", shape, None
    if shape is None:
        raise ValueError(f"network={est.network!r} is a convolutional network for images: set "
                         "image_shape=(C, H, W) (rows of C*H*W values)")
    if kind in UNET_PRESETS:
        sizes = {k: v for k, v in UNET_PRESETS[kind].items() if k != "dropout"}
    else:
        mult = None if isinstance(est.channel_mult, str) else layer_sizes(
            "channel_mult", est.channel_mult)
        sizes = unet_defaults(shape, mult)
        for key in ("channels", "num_res_blocks"):
            if not isinstance(getattr(est, key), str):
                sizes[key] = int(getattr(est, key))
        if not isinstance(est.attn_resolutions, str):
            sizes["attn_resolutions"] = layer_sizes("attn_resolutions", est.attn_resolutions)
    factor = 2 ** (len(sizes["channel_mult"]) - 1)
    if shape[1] % factor or shape[2] % factor:
        raise ValueError(
            f"image_shape={shape}: both sides must be divisible by {factor} for "
            f"channel_mult={sizes['channel_mult']} (the image is halved between levels)")
    return "unet", shape, sizes


def resolve_optimizer(est: Any) -> tuple[int, float]:
    """``batch_size`` and ``learning_rate`` with "auto" resolved for the fitted network."""
    kind = getattr(est, "network_type_", "mlp") or "mlp"
    batch = _AUTO_BATCH_SIZE[kind] if isinstance(est.batch_size, str) else int(est.batch_size)
    if not isinstance(est.learning_rate, str):
        return batch, float(est.learning_rate)
    if kind == "unet" and (getattr(est, "unet_sizes_", None) or {}).get("channels", 0) >= 128:
        kind = "unet_wide"
    return batch, _AUTO_LEARNING_RATE[kind]


def seed_from(random_state: Any) -> int:
    """A 31-bit seed drawn from ``random_state`` (scikit-learn's ``check_random_state``)."""
    return int(check_random_state(random_state).randint(0, 2**31 - 1))


def solver_kwargs(solver: str, rtol: float, atol: float, span: float) -> dict[str, Any]:
    """``torchdiffeq.odeint`` options: tolerances, or ``_FIXED_STEPS`` steps over ``span``."""
    if solver in _FIXED_SOLVERS:
        return {"method": solver, "options": {"step_size": span / _FIXED_STEPS}}
    return {"method": solver, "rtol": rtol, "atol": atol}


def structure(est: Any) -> dict[str, Any]:
    """The parameters a warm start cannot change (they shape the network or its inputs)."""
    sde = est.sde if isinstance(est.sde, str) else repr(est.sde)
    return {
        "sde": sde,
        "eps": est.eps,
        "hidden_layer_sizes": list(layer_sizes("hidden_layer_sizes", est.hidden_layer_sizes)),
        "network": est.network,
        "image_shape": None if est.image_shape is None else [int(s) for s in est.image_shape],
        "unet": {k: (v if isinstance(v, str) else np.asarray(v).tolist()) for k, v in (
            ("channels", est.channels), ("channel_mult", est.channel_mult),
            ("num_res_blocks", est.num_res_blocks), ("attn_resolutions", est.attn_resolutions))},
        "fourier_features": fourier_count(est.fourier_features, est.n_features_in_),
        "fourier_scale": float(est.fourier_scale),
        "gaussian_reference": est.gaussian_reference,
        "dropout": est.dropout,
        "dequantization": est.dequantization,
        "standardize": bool(est.standardize),
        "dtype": est.dtype,
        "device": str(est.device),
    }


def validate(constraints: dict[str, list[Any]], params: dict[str, Any], caller: str) -> None:
    """Check the arguments of a method against ``constraints`` (scikit-learn's messages)."""
    validate_parameter_constraints(constraints, {k: params[k] for k in constraints}, caller)


def validation_interval(max_iter: int, n_train: int | None, batch_size: int) -> int:
    """Steps between validations: every ``_VALIDATION_EPOCHS`` epochs of the training rows,
    within ``[50, max(50, max_iter // 50)]`` steps (small data reach their best within a few
    hundred full-batch steps, so they are checked that often)."""
    longest = max(50, max_iter // 50)
    if n_train is None:
        return longest
    epoch = math.ceil(n_train / min(batch_size, n_train))
    return min(longest, max(50, _VALIDATION_EPOCHS * epoch))


def training_kwargs(est: Any, n_train: int | None = None) -> dict[str, Any]:
    """The keyword arguments of ``train_score_model`` that follow from the parameters (and the
    number of training rows, which sets the validation interval)."""
    max_iter = int(est.max_iter)
    return {
        "weighting": est.weighting,
        "max_iter": max_iter,
        "batch_size": int(est.batch_size_),
        "learning_rate": float(est.learning_rate_),
        "warmup": min(200, max(1, max_iter // 10)),
        "ema_decay": float(est.ema_decay),
        "validation_interval": validation_interval(max_iter, n_train, int(est.batch_size_)),
        "early_stopping": bool(est.early_stopping_),
        "n_iter_no_change": int(est.n_iter_no_change),
        "tol": float(est.tol),
        "verbose": int(est.verbose),
    }


def split(est: Any, n: int, rng: Any) -> tuple[Any, Any]:
    """Training and validation row indices; (None, None) without early stopping (all rows train)."""
    if not est.early_stopping_:
        return None, None
    n_val = int(math.ceil(est.validation_fraction * n))
    if n_val < 1 or n - n_val < 1:
        raise ValueError(
            f"validation_fraction={est.validation_fraction} leaves no training or no "
            f"validation rows for {n} samples"
        )
    perm = rng.permutation(n)
    return perm[n_val:], perm[:n_val]


def check_warm_start(est: Any) -> None:
    """Parameters fixed by the first fit (:func:`structure`) cannot change under a warm start."""
    fitted = getattr(est, "_fitted_structure", None)
    now = structure(est)
    # Keys a fit from an earlier version did not record cannot have changed since.
    changed = [k for k in now if fitted is not None and k in fitted and fitted[k] != now[k]]
    if changed:
        raise ValueError(
            f"warm_start=True cannot change {changed} after the first fit (fitted with "
            f"{ {k: fitted.get(k) for k in changed} }); refit with warm_start=False"
        )


def _interactive() -> bool:
    """Whether Python runs interactively (a REPL, ``python -i``, IPython or Jupyter)."""
    if hasattr(sys, "ps1") or sys.flags.interactive:
        return True
    ipython = sys.modules.get("IPython")
    return ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None


def interrupted(est: Any, state: Any, deq_state: Any, ckpt: Any) -> None:
    """After Ctrl-C: warn what the estimator holds, then stop a script, not a session."""
    if state.interrupted:
        where = (f"score-model training was interrupted after step {state.n_iter} "
                 f"(max_iter={est.max_iter})")
        held = "the weights of that step" + (", or the best ones" if est.early_stopping_ else "")
        if est.dequantization == "variational":
            held += "; the variational dequantizer was not trained (uniform dequantization)"
    else:
        where = (f"dequantizer training was interrupted after step {deq_state.n_iter} "
                 f"(dequantizer_max_iter={est.dequantizer_max_iter})")
        held = "the dequantizer of that step"
    resume = "" if ckpt is None else "; fit again with the same checkpoint_path to resume"
    message = f"{where}: the estimator is usable with {held}{resume}"
    warnings.warn(message, UserWarning, stacklevel=3)
    if not _interactive():
        raise KeyboardInterrupt(message)


def representable_limit(n_features: int, dtype: torch.dtype) -> float:
    """Largest ``|z|`` (standardised) whose squares, summed over the row, stay finite."""
    return math.sqrt(torch.finfo(dtype).max / (4 * n_features))


def representable(Z: np.ndarray, dtype: torch.dtype, warn: bool = False) -> np.ndarray:
    """Rows of standardised ``Z`` that ``dtype`` can evaluate (see :func:`representable_limit`);
    with ``warn``, a ``RuntimeWarning`` that the others get a log-density of -inf."""
    limit = representable_limit(Z.shape[1], dtype)
    keep = np.abs(Z).max(axis=1) <= limit
    if warn and not keep.all():
        warnings.warn(
            f"{int((~keep).sum())} row(s) lie so far from the training data (beyond {limit:.1e} "
            f"standard deviations) that {str(dtype).replace('torch.', '')} cannot evaluate them: "
            "their log-density is -inf",
            RuntimeWarning, stacklevel=4,
        )
    return keep


def new_network(est: Any, sizes: tuple[int, ...], seed: int) -> torch.nn.Module:
    """A freshly initialised score network for ``est`` on its device and dtype.

    Module initialisation draws from the global RNG: it runs forked (the user's state is
    untouched) and seeded (the initialisation is reproducible).
    """
    from .nets import ScoreMLP, ScoreUNet
    from .training import _seeded_global_rng

    with _seeded_global_rng(seed, est.device_):
        if est.network_type_ == "unet":
            net = ScoreUNet(est.image_shape_, est.sde_, dropout=est.dropout_, **est.unet_sizes_)
            return net.to(device=est.device_, dtype=_DTYPES[est.dtype])
        net = ScoreMLP(est.n_features_in_, est.sde_, sizes, fourier_features=est.fourier_features_,
                       fourier_scale=float(est.fourier_scale), dropout=est.dropout_,
                       reference_covariance=est.reference_covariance_)
    return net.to(device=est.device_, dtype=_DTYPES[est.dtype])


def digest(est: Any) -> str:
    """A digest of what every rank of a distributed fit must share: the standardisation and
    integer range derived from the data, and the parameters (rank 0's seed is everyone's;
    logging and file settings may differ)."""
    import hashlib
    import json

    from ._checkpoint import _fingerprint_value

    skip = {"verbose", "checkpoint_path", "checkpoint_every", "distributed", "random_state"}
    params = {k: _fingerprint_value(v) for k, v in est.get_params().items() if k not in skip}
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for value in (est.mean_, est.scale_, est.data_min_, est.data_max_):
        h.update(b"-" if value is None else np.ascontiguousarray(value, dtype=np.float64).data)
    return h.hexdigest()[:16]


def derive(est: Any, X: Any, summary: dict[str, Any] | None = None) -> None:
    """What the first ``fit`` derives from the parameters and the data (device, SDE, cutoff,
    Fourier count, standardisation, integer range)."""
    from ._preprocessing import Standardizer
    from .sde import get_sde

    est.device_ = resolve_device(est.device)
    est.sde_ = copy.deepcopy(get_sde(est.sde))  # never modify what the user passed
    eps = est.eps
    if eps is None and est.dequantization is None:
        eps = est.sde_.continuous_eps
    est.eps_ = est.sde_._resolve_eps(eps)
    est.fourier_features_ = fourier_count(est.fourier_features, X.shape[1])
    est.network_type_, est.image_shape_, est.unet_sizes_ = resolve_network(est, X.shape[1])
    deq = est.dequantization is not None
    if summary is None:  # an in-memory array (else the chunked scan of out-of-core data)
        from ._data import column_moments

        mean, var = column_moments(X)
        lo, hi = (X.min(axis=0), X.max(axis=0)) if deq else (None, None)
    else:
        mean, var, lo, hi = summary["mean"], summary["var"], summary["min"], summary["max"]
    est.n_levels_ = None
    if est.standardize and est.network_type_ == "unet":
        # One affine map for all pixels (per-pixel scales would distort the images): integer
        # levels lo..hi dequantized onto [-1, 1) as in the paper, x = 2 (v - lo) / L - 1;
        # continuous pixels by their overall mean and standard deviation.
        if deq:
            lowest = float(np.min(lo))
            est.n_levels_ = int(np.max(hi) - lowest + 1)
            centre, half = lowest + est.n_levels_ / 2, est.n_levels_ / 2
        else:
            centre = float(np.mean(mean))
            half = math.sqrt(float(np.mean(var) + np.var(mean))) or 1.0
        d = X.shape[1]
        st = Standardizer(np.full(d, centre), np.full(d, half))
    elif est.standardize:
        st = Standardizer.from_moments(mean, var, dequantized=deq)
    else:
        st = Standardizer(np.zeros(X.shape[1]), np.ones(X.shape[1]))
    est.mean_, est.scale_ = st.mean, st.scale
    est.data_min_ = np.asarray(lo, dtype=np.float64) if deq else None
    est.data_max_ = np.asarray(hi, dtype=np.float64) if deq else None
    n, d = X.shape
    est.dropout_ = resolve_dropout(est.dropout, n, est.network_type_)
    est.reference_covariance_ = None
    if est.network_type_ == "unet":  # starts from eps_hat = 0, no Gaussian reference
        est.gaussian_reference_ = None
        return
    est.gaussian_reference_ = resolve_gaussian_reference(est.gaussian_reference, n, d)
    if est.gaussian_reference_ == "full":
        from ._data import standardized_covariance

        est.reference_covariance_ = standardized_covariance(
            X, est.mean_ - (0.5 if deq else 0.0), est.scale_, dequantized=deq)


def set_score_state(est: Any, state: Any, warn: bool = True) -> None:
    """The fitted attributes of a (finished or interrupted) score-model training run."""
    from sklearn.exceptions import ConvergenceWarning

    # Only an explicit request warns: "auto" keeps the best weights of the budget silently.
    if (warn and not isinstance(est.early_stopping, str) and est.early_stopping_
            and not (state.stopped_early or state.interrupted)):
        warnings.warn(
            f"early stopping did not trigger within max_iter={est.max_iter} steps; the "
            "validation score may still be improving",
            ConvergenceWarning, stacklevel=4,
        )
    est._train_state = state
    est._fitted_structure = structure(est)
    est.network_ = state.ema_model
    est.n_iter_ = state.n_iter
    est.loss_curve_ = list(state.loss_curve)
    est.validation_scores_ = list(state.validation_scores) if est.early_stopping_ else None
    est.best_validation_score_ = state.best_validation_score if est.early_stopping_ else None
    est.fit_time_ = state.fit_time
    est.dequantizer_ = est.dequantizer_loss_curve_ = None


def validation_fn(est: Any, X_val: np.ndarray, seed: int) -> Any:
    """Early stopping's score: the mean likelihood bound (in X's units) on up to 2,000
    validation rows (uniformly dequantized for integer data), the same draws every time."""
    from .bound import _mean_bound_fn

    X_val = X_val[:2000].astype(np.float64)
    if est.dequantization is not None:
        X_val = X_val + np.random.default_rng(seed + 2).random(X_val.shape)
    st = est._standardizer
    V = torch.tensor(st.transform(X_val), dtype=_DTYPES[est.dtype], device=est.device_)
    return _mean_bound_fn(V, est.sde_, est.eps_, seed + 1, st.log_det)
