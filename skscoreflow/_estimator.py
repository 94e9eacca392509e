"""The scikit-learn estimator: thin orchestration over the functional core."""

from __future__ import annotations

import copy
import json
import math
import numbers
import warnings
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from .bound import likelihood_bound, nll_bound_estimate
from .dequantization import (
    DEQUANTIZATIONS,
    VariationalDequantizer,
    check_integer_valued,
    train_dequantizer,
    uniform_dequantize,
)
from .likelihood import DIVERGENCES, ode_log_likelihood
from .nets import ScoreMLP
from .sampling import SAMPLERS, SAMPLING_EPS
from .sde import SDES, get_sde
from .training import seeded_global_rng, train_score_model
from .weighting import WEIGHTINGS

__all__ = ["ScoreFlowDensity"]

#: ODE solvers accepted by ``solver``: adaptive ones use ``rtol``/``atol``; fixed-step ones take
#: ``FIXED_STEPS`` uniform steps over ``[eps, T]`` (for bitwise-reproducibility checks).
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
FIXED_SOLVERS = ("rk4", "midpoint", "euler")
FIXED_STEPS = 100
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_FORMAT_VERSION = 1
#: ``eps=None`` for the VP SDE on continuous data (finest noise std 0.02 of the standardised data).
CONTINUOUS_VP_EPS = 3e-3
#: ``fourier_features="auto"``: this many frequencies for data with at most
#: ``AUTO_FOURIER_MAX_FEATURES`` features, none for wider data.
AUTO_FOURIER_FEATURES = 128
AUTO_FOURIER_MAX_FEATURES = 2


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available")
    return dev


class ScoreFlowDensity(DensityMixin, BaseEstimator):
    """Density estimation with a score-based diffusion model trained by maximum likelihood.

    A score network ``s(x, t)`` is trained with the likelihood-weighted denoising
    score-matching loss (ScoreFlow: Song, Durkan, Murray & Ermon, NeurIPS 2021), with
    importance-sampled diffusion times by default.  ``score_samples`` returns the exact
    log-density of the probability-flow ODE model (a continuous normalising flow) and ``bound``
    the per-sample lower bound on the SDE model's log-likelihood (Theorem 3).  Data are
    standardised internally; every log-density is reported in the units of ``X`` (the
    standardisation's log-determinant is added).

    Parameters
    ----------
    sde : {"vp", "subvp", "ve"}, default="vp"
        Forward diffusion.
    weighting : {"likelihood_is", "likelihood", "score_matching"}, default="likelihood_is"
        Loss weighting: likelihood weighting with importance-sampled times (the paper's
        choice), likelihood weighting with uniform times, or the original ``sigma^2`` weighting.
    dequantization : {None, "uniform", "variational"}, default=None
        For integer-valued data (counts, pixel intensities, Likert scales): model ``x + u``
        with ``u`` uniform on ``[0, 1)^d`` ("uniform") or drawn from a learned conditional flow
        ``q(u | x)`` ("variational", trained after the score model with the score model
        frozen).  ``score_samples`` and ``bound`` then return lower bounds on
        ``log P(X = x)`` and ``sample`` returns integers.
    n_dequantization_samples : int, default=1
        Dequantization draws ``K`` per row when evaluating a dequantized model; ``K > 1`` gives
        the importance-weighted bound ``log (1/K) sum_k p(x + u_k) / q(u_k | x)``, tighter than
        the ``K = 1`` ELBO.
    dequantizer_hidden_layer_sizes : tuple of int, default=(64, 64)
        Conditioner widths of the variational dequantizer.
    dequantizer_n_couplings : int, default=4
        Coupling layers of the variational dequantizer.
    dequantizer_max_iter : int, default=1000
        Optimizer steps of the variational dequantizer.
    hidden_layer_sizes : tuple of int, default=(128, 128, 128)
        Widths of the residual blocks of the score network.
    fourier_features : int or "auto", default="auto"
        Random Fourier frequencies of the (standardised) input fed to the score network beside
        the coordinates (:class:`~skscoreflow.nets.FourierFeatures`, damped by the noise level);
        0 feeds the coordinates alone.  "auto" uses 128 for data with at most
        2 features and 0 above: on low-dimensional
        coordinates a plain MLP learns sharp or oscillating densities very slowly (four narrow
        concentric rings, 3,000 steps at ``eps=3e-3``: 0.351 nats from the truth without,
        0.032 with 128 frequencies), while for wider tables it is untested.  The resolved count is
        ``fourier_features_``.
    fourier_scale : float, default=0.35
        Scale of those frequencies: the projection ``B^T x`` of a standard-normal row has this
        standard deviation (in cycles) in any dimension.  Lower is smoother: at 20,000 rows 0.35
        beat 0.5 on five 2-D sets and tied on checkerboard (e.g. moons 0.0057 vs 0.0068 and
        rings 0.0086 vs 0.0105 nats from the truth).
    max_iter : int, default=10000
        Number of optimizer steps.  The training budget dominates the likelihood: the default
        fits 2-D data in about 3.5 minutes on one CPU thread (see
        ``docs/benchmarks/quality.md``).  On small data (hundreds of rows) combine it with
        ``early_stopping=True``: 10,000 steps overfit them.
    batch_size : int, default=1024
        Rows per optimizer step (capped at the number of training rows).
    learning_rate : float, default=2e-3
        Peak Adam learning rate (linear warm-up, then cosine decay).
    ema_decay : float, default=0.999
        Decay of the exponential moving average of the weights used for evaluation.
    eps : float or None, default=None
        Smallest diffusion time for training and likelihood (``eps_``).  None uses
        3e-3 for the VP SDE on continuous data
        (``dequantization=None``) and the SDE's default otherwise (1e-5 for VP and VE, 1e-2 for
        sub-VP, the paper's values for dequantized images).  At 3e-3 the finest VP noise level
        is 0.02 standard deviations of the standardised data; the paper's 1e-5 (0.001) spends
        most importance-sampled training times on noise far below anything 10,000 rows can
        resolve.  Measured on 2-D sets (10,000 rows, 3,000 steps): moons 0.0081 -> 0.0049,
        circles 0.0152 -> 0.0086 nats from the truth.
    rtol, atol : float, default=1e-5
        Tolerances of the adaptive ODE solver used by ``score_samples`` and ``sample``.
    solver : str, default="dopri5"
        ODE solver: adaptive "dopri5", "dopri8", "bosh3", "adaptive_heun", or fixed-step
        "rk4", "midpoint", "euler" (100 uniform steps).
    divergence : {"auto", "exact", "hutchinson"}, default="auto"
        Divergence estimator of the ODE likelihood; "auto" is exact up to 16 features (and
        always for dequantized models, whose bounds need ``p(x + u)`` without the upward bias
        that exponentiating a Hutchinson estimate adds).
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the rows, track the likelihood bound on them, stop
        when it stops improving and restore the best weights.
    validation_fraction : float, default=0.1
        Fraction of rows held out when ``early_stopping``.
    n_iter_no_change : int, default=10
        Validations (every ``max(50, max_iter // 50)`` steps) without improvement by ``tol``
        before stopping.
    tol : float, default=1e-4
        Minimum improvement of the validation score (nats per row).
    warm_start : bool, default=False
        Continue training the fitted network (and its optimizer state) on the next ``fit``
        instead of starting afresh; the learning-rate warm-up and cosine schedule restart over
        the new ``max_iter``, the standardisation is kept, and a variational dequantizer is
        retrained on the continued score model.  ``sde``, ``eps``, ``hidden_layer_sizes``,
        ``fourier_features``, ``fourier_scale``, ``dequantization``, ``dtype`` and ``device``
        cannot change under a warm start.
    dtype : {"float32", "float64"}, default="float32"
        Precision of training and evaluation.
    device : str, default="auto"
        "auto" (CUDA when available), "cpu", "cuda" or "cuda:k".
    random_state : int, RandomState instance or None, default=None
        Seeds network initialisation, mini-batches, diffusion noise and the validation split.
        An int makes ``fit``, ``score_samples`` and ``sample`` reproducible on CPU.
    verbose : int, default=0
        ``> 0`` shows a progress bar (tqdm, when installed) and logs to the "skscoreflow"
        logger.

    Attributes
    ----------
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (n_features,)
        Defined only when ``X`` has string column names.
    device_ : torch.device
        Device the network lives on.
    sde_ : SDE
        The forward SDE.
    network_ : ScoreMLP
        The score network (EMA weights), in evaluation mode.
    eps_ : float
        The smallest diffusion time in use.
    fourier_features_ : int
        Fourier frequencies of the score network (``fourier_features`` with "auto" resolved).
    mean_, scale_ : ndarray of shape (n_features,)
        Standardisation applied before the diffusion.
    n_iter_ : int
        Optimizer steps taken (in total, across warm starts).
    loss_curve_ : list of float
        Training loss of every step.
    validation_scores_ : list of float or None
        Mean likelihood bound (nats per row, in X's units) on the validation rows at each
        validation, when ``early_stopping``.
    best_validation_score_ : float or None
        Best of ``validation_scores_``, when ``early_stopping``.
    fit_time_ : float
        Seconds spent training.

    See Also
    --------
    sklearn.mixture.GaussianMixture : Gaussian mixture density (the usual baseline).
    sklearn.neighbors.KernelDensity : Kernel density estimate.

    References
    ----------
    Y. Song, C. Durkan, I. Murray and S. Ermon, "Maximum Likelihood Training of Score-Based
    Diffusion Models", NeurIPS 2021.

    Examples
    --------
    >>> from sklearn.datasets import make_moons
    >>> from skscoreflow import ScoreFlowDensity
    >>> X, _ = make_moons(500, noise=0.1, random_state=0)
    >>> est = ScoreFlowDensity(hidden_layer_sizes=(32, 32), max_iter=100, random_state=0)
    >>> est = est.fit(X)
    >>> est.score_samples(X[:3]).shape
    (3,)
    >>> est.sample(4, random_state=0).shape
    (4, 2)
    """

    def __init__(
        self,
        *,
        sde: str = "vp",
        weighting: str = "likelihood_is",
        dequantization: str | None = None,
        n_dequantization_samples: int = 1,
        dequantizer_hidden_layer_sizes: tuple[int, ...] = (64, 64),
        dequantizer_n_couplings: int = 4,
        dequantizer_max_iter: int = 1000,
        hidden_layer_sizes: tuple[int, ...] = (128, 128, 128),
        fourier_features: int | str = "auto",
        fourier_scale: float = 0.35,
        max_iter: int = 10000,
        batch_size: int = 1024,
        learning_rate: float = 2e-3,
        ema_decay: float = 0.999,
        eps: float | None = None,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        solver: str = "dopri5",
        divergence: str = "auto",
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        tol: float = 1e-4,
        warm_start: bool = False,
        dtype: str = "float32",
        device: str = "auto",
        random_state: int | np.random.RandomState | None = None,
        verbose: int = 0,
    ) -> None:
        self.sde = sde
        self.weighting = weighting
        self.dequantization = dequantization
        self.n_dequantization_samples = n_dequantization_samples
        self.dequantizer_hidden_layer_sizes = dequantizer_hidden_layer_sizes
        self.dequantizer_n_couplings = dequantizer_n_couplings
        self.dequantizer_max_iter = dequantizer_max_iter
        self.hidden_layer_sizes = hidden_layer_sizes
        self.fourier_features = fourier_features
        self.fourier_scale = fourier_scale
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.ema_decay = ema_decay
        self.eps = eps
        self.rtol = rtol
        self.atol = atol
        self.solver = solver
        self.divergence = divergence
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.warm_start = warm_start
        self.dtype = dtype
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ validation
    def _validate_params(self) -> None:
        def choice(name: str, options: tuple | list) -> None:
            value = getattr(self, name)
            if value not in options:
                raise ValueError(
                    f"{name}={value!r} is not valid; expected one of {list(options)}"
                )

        def number(name: str, low: float, high: float = math.inf, *, integer: bool = False,
                   low_open: bool = False, high_open: bool = False) -> None:
            value = getattr(self, name)
            kind = numbers.Integral if integer else numbers.Real
            if isinstance(value, bool) or not isinstance(value, kind):
                raise TypeError(
                    f"{name} must be {'an int' if integer else 'a real number'}, "
                    f"got {value!r} of type {type(value).__name__}"
                )
            too_low = value <= low if low_open else value < low
            too_high = value >= high if high_open else value > high
            if too_low or too_high or (not integer and not math.isfinite(value)):
                lo = "(" if low_open else "["
                hi = ")" if high_open else "]"
                raise ValueError(f"{name}={value!r} is out of range; expected {lo}{low}, {high}{hi}")

        if not isinstance(self.sde, str) or self.sde.lower().replace("-", "").replace(
            "_", ""
        ) not in SDES:
            raise ValueError(f"sde={self.sde!r} is not valid; expected one of {sorted(SDES)}")
        choice("weighting", sorted(WEIGHTINGS))
        choice("dequantization", DEQUANTIZATIONS)
        choice("solver", ADAPTIVE_SOLVERS + FIXED_SOLVERS)
        choice("divergence", DIVERGENCES)
        choice("dtype", tuple(_DTYPES))

        def layer_sizes(name: str) -> None:
            sizes = getattr(self, name)
            if isinstance(sizes, numbers.Integral) and not isinstance(sizes, bool):
                sizes = (sizes,)
            if (
                not isinstance(sizes, (tuple, list))
                or len(sizes) == 0
                or not all(
                    isinstance(h, numbers.Integral) and not isinstance(h, bool) and h > 0
                    for h in sizes
                )
            ):
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not valid; expected a non-empty tuple "
                    "of positive ints"
                )

        layer_sizes("hidden_layer_sizes")
        layer_sizes("dequantizer_hidden_layer_sizes")
        if isinstance(self.fourier_features, str):
            if self.fourier_features != "auto":
                raise ValueError(
                    f"fourier_features={self.fourier_features!r} is not valid; expected an int "
                    ">= 0 or 'auto'"
                )
        else:
            number("fourier_features", 0, integer=True)
        number("fourier_scale", 0, low_open=True)
        number("max_iter", 1, integer=True)
        number("n_dequantization_samples", 1, integer=True)
        number("dequantizer_n_couplings", 0, integer=True)
        number("dequantizer_max_iter", 1, integer=True)
        number("batch_size", 1, integer=True)
        number("learning_rate", 0, low_open=True)
        number("ema_decay", 0, 1, high_open=True)
        if self.eps is not None:
            number("eps", 0, 1, low_open=True, high_open=True)
        number("rtol", 0, low_open=True)
        number("atol", 0, low_open=True)
        number("validation_fraction", 0, 1, low_open=True, high_open=True)
        number("n_iter_no_change", 1, integer=True)
        number("tol", 0)
        number("verbose", 0, integer=True)
        for flag in ("early_stopping", "warm_start"):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if not isinstance(self.device, (str, torch.device)):
            raise TypeError(f"device must be a string such as 'cpu' or 'cuda', got {self.device!r}")
        if isinstance(self.device, str) and self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError) as exc:
                raise ValueError(f"device={self.device!r} is not a valid torch device") from exc

    def _hidden_sizes(self) -> tuple[int, ...]:
        return _as_sizes(self.hidden_layer_sizes)

    # ------------------------------------------------------------------ helpers
    @property
    def _torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def _to_tensor(self, Z: np.ndarray) -> torch.Tensor:
        # torch.tensor copies: read-only inputs (memmaps, pandas copy-on-write) are fine and
        # the caller's array is never shared with the network.
        return torch.tensor(Z, dtype=self._torch_dtype, device=self.device_)

    def _standardize(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_

    @property
    def _log_det(self) -> float:
        """``log |d z / d x|`` of the standardisation, added to every log-density."""
        return float(-np.log(self.scale_).sum())

    def _solver_kwargs(self, eps: float | None = None) -> dict[str, Any]:
        if self.solver in FIXED_SOLVERS:
            # FIXED_STEPS uniform steps over the interval actually integrated.
            step = (self.sde_.T - (self.eps_ if eps is None else eps)) / FIXED_STEPS
            return {"method": self.solver, "options": {"step_size": step}}
        return {"method": self.solver, "rtol": self.rtol, "atol": self.atol}

    def _seed_from(self, random_state: Any) -> int:
        return int(check_random_state(random_state).randint(0, 2**31 - 1))

    def _validation_fn(self, V: torch.Tensor, seed: int):
        def fn(net: torch.nn.Module) -> float:
            g = torch.Generator(device=V.device).manual_seed(seed)
            with torch.no_grad():
                lb = likelihood_bound(
                    net, V, self.sde_, eps=self.eps_, n_time_samples=64, generator=g
                )
            return float(lb.double().mean()) + self._log_det

        return fn

    # ------------------------------------------------------------------ fit
    def fit(self, X: Any, y: Any = None) -> "ScoreFlowDensity":
        """Train the score network on ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data (numeric, finite).
        y : None
            Ignored.

        Returns
        -------
        self : ScoreFlowDensity
            The fitted estimator.
        """
        self._validate_params()
        warm = self.warm_start and hasattr(self, "network_")
        X = validate_data(
            self, X, dtype=[np.float64, np.float32], ensure_min_samples=2, reset=not warm
        )
        seed = self._seed_from(self.random_state)
        rng = np.random.default_rng(seed)

        if warm:
            self._check_warm_start_compatible()
        if self.dequantization is not None:
            check_integer_valued(X, getattr(self, "feature_names_in_", None))
        if not warm:
            self.device_ = _resolve_device(str(self.device))
            self.sde_ = get_sde(self.sde)
            self.eps_ = float(self._default_eps() if self.eps is None else self.eps)
            self.fourier_features_ = self._fourier_count()
            X64 = X.astype(np.float64, copy=False)
            mean, var = X64.mean(axis=0), X64.var(axis=0)
            self.data_min_ = self.data_max_ = None
            if self.dequantization is not None:
                # Moments of x + u with u ~ U[0, 1): shifted by 1/2, variance + 1/12.
                mean, var = mean + 0.5, var + 1.0 / 12.0
                self.data_min_ = X64.min(axis=0)
                self.data_max_ = X64.max(axis=0)
            self.mean_ = mean
            scale = np.sqrt(var)
            # Constant columns keep unit scale (no log-det blow-up).
            self.scale_ = np.where(scale > 1e-12 * np.maximum(1.0, np.abs(mean)), scale, 1.0)

        n = X.shape[0]
        val_idx = None
        if self.early_stopping:
            n_val = int(math.ceil(self.validation_fraction * n))
            if n_val < 1 or n - n_val < 1:
                raise ValueError(
                    f"validation_fraction={self.validation_fraction} leaves no training or no "
                    f"validation rows for {n} samples"
                )
            perm = rng.permutation(n)
            val_idx, train_idx = perm[:n_val], perm[n_val:]
        else:
            train_idx = np.arange(n)

        generator = torch.Generator(device=self.device_).manual_seed(seed)
        batch_transform = None
        if self.dequantization is None:
            X_train = self._to_tensor(self._standardize(X[train_idx]))
        else:
            # Fresh uniform dequantization noise for every mini-batch (the score model is
            # trained on uniformly dequantized data for both dequantization modes).
            X_train = self._to_tensor(X[train_idx])
            mean_t, scale_t = self._to_tensor(self.mean_), self._to_tensor(self.scale_)

            def batch_transform(batch: torch.Tensor, g: torch.Generator) -> torch.Tensor:
                return (batch + uniform_dequantize(batch, g)[0] - mean_t) / scale_t

        if not warm:
            # Module initialisation draws from the global RNG: fork it so the user's state is
            # untouched, and seed it so the initialisation is reproducible.
            with self._forked_rng(seed):
                net = ScoreMLP(
                    self.n_features_in_,
                    self.sde_,
                    self._hidden_sizes(),
                    fourier_features=self.fourier_features_,
                    fourier_scale=float(self.fourier_scale),
                )
            net = net.to(device=self.device_, dtype=self._torch_dtype)
            self._train_state = None
            state_in = None
        else:
            net = self._train_state.model
            state_in = self._train_state

        validation_fn = None
        if val_idx is not None:
            X_val = X[val_idx[:2000]].astype(np.float64)
            if self.dequantization is not None:
                X_val = X_val + np.random.default_rng(seed + 2).random(X_val.shape)
            V = self._to_tensor(self._standardize(X_val))
            validation_fn = self._validation_fn(V, seed + 1)

        state = train_score_model(
            net,
            X_train,
            self.sde_,
            weighting=self.weighting,
            eps=self.eps_,
            max_iter=int(self.max_iter),
            batch_size=int(self.batch_size),
            learning_rate=float(self.learning_rate),
            warmup=min(200, max(1, int(self.max_iter) // 10)),
            ema_decay=float(self.ema_decay),
            generator=generator,
            batch_transform=batch_transform,
            validation_fn=validation_fn,
            validation_interval=max(50, int(self.max_iter) // 50),
            early_stopping=bool(self.early_stopping),
            n_iter_no_change=int(self.n_iter_no_change),
            tol=float(self.tol),
            state=state_in,
            verbose=int(self.verbose),
        )
        if self.early_stopping and not state.stopped_early:
            warnings.warn(
                f"early stopping did not trigger within max_iter={self.max_iter} steps; the "
                "validation score may still be improving",
                ConvergenceWarning,
            )
        self._train_state = state
        self._fitted_structure = self._structure()
        self.network_ = state.ema_model
        self.n_iter_ = state.n_iter
        self.loss_curve_ = list(state.loss_curve)
        if self.early_stopping:
            self.validation_scores_ = list(state.validation_scores)
            self.best_validation_score_ = state.best_validation_score
        else:
            self.validation_scores_ = None
            self.best_validation_score_ = None
        self.fit_time_ = state.fit_time

        self.dequantizer_ = None
        self.dequantizer_loss_curve_ = None
        if self.dequantization == "variational":
            self._fit_dequantizer(X[train_idx], seed)
        return self

    def _check_warm_start_compatible(self) -> None:
        """Parameters fixed by the first fit cannot change under ``warm_start``."""
        fitted = getattr(self, "_fitted_structure", None)
        if fitted is None:
            return
        now = self._structure()
        changed = [k for k in now if fitted.get(k) != now[k]]
        if changed:
            raise ValueError(
                f"warm_start=True cannot change {changed} after the first fit (fitted with "
                f"{ {k: fitted.get(k) for k in changed} }); refit with warm_start=False"
            )

    def _default_eps(self) -> float:
        if self.sde_.name == "vp" and self.dequantization is None:
            return CONTINUOUS_VP_EPS
        return float(self.sde_.default_eps)

    def _fourier_count(self) -> int:
        """``fourier_features`` with "auto" resolved for the fitted number of features."""
        if isinstance(self.fourier_features, str):
            return AUTO_FOURIER_FEATURES if self.n_features_in_ <= AUTO_FOURIER_MAX_FEATURES else 0
        return int(self.fourier_features)

    def _structure(self) -> dict[str, Any]:
        return {
            "sde": self.sde,
            "eps": self.eps,
            "hidden_layer_sizes": list(self._hidden_sizes()),
            "fourier_features": self._fourier_count(),
            "fourier_scale": float(self.fourier_scale),
            "dequantization": self.dequantization,
            "dtype": self.dtype,
            "device": str(self.device),
        }

    def _forked_rng(self, seed: int) -> Any:
        return seeded_global_rng(seed, self.device_)

    def _fit_dequantizer(self, X_train: np.ndarray, seed: int) -> None:
        """Train ``q(u | x)`` with the (EMA) score network frozen (ScoreFlow's schedule)."""
        with self._forked_rng(seed + 3):
            deq = VariationalDequantizer(
                self.n_features_in_,
                _as_sizes(self.dequantizer_hidden_layer_sizes),
                int(self.dequantizer_n_couplings),
            )
        deq = deq.to(device=self.device_, dtype=self._torch_dtype)
        mean_t, scale_t = self._to_tensor(self.mean_), self._to_tensor(self.scale_)
        net, sde, eps = self.network_, self.sde_, self.eps_
        for p in net.parameters():
            p.requires_grad_(False)

        def nll_fn(x: torch.Tensor, u: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            # Bound on -log p(x + u) in standardised units; the log-det is a constant.
            return nll_bound_estimate(net, (x + u - mean_t) / scale_t, sde, eps=eps, generator=g)

        g = torch.Generator(device=self.device_).manual_seed(seed + 4)
        ema, curve = train_dequantizer(
            deq,
            self._to_tensor(X_train),
            nll_fn,
            condition=lambda x: (x - mean_t) / scale_t,
            max_iter=int(self.dequantizer_max_iter),
            generator=g,
        )
        self.dequantizer_ = ema
        self.dequantizer_loss_curve_ = curve

    # ------------------------------------------------------------------ evaluation
    def _check_X(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "network_")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        if self.dequantization is not None:
            check_integer_valued(X, getattr(self, "feature_names_in_", None))
        return X

    def _evaluate(self, X: np.ndarray, log_density: Any, seed: int) -> np.ndarray:
        """``log_density(Z) -> (n,)`` on standardised rows, in X's units; for dequantized
        models the K-sample (importance-weighted) dequantization bound on ``log P(x)``."""
        if self.dequantization is None:
            ll = log_density(self._to_tensor(self._standardize(X)))
            return ll.detach().cpu().numpy().astype(np.float64) + self._log_det
        g = torch.Generator(device=self.device_).manual_seed(seed)
        x = self._to_tensor(X)
        mean_t, scale_t = self._to_tensor(self.mean_), self._to_tensor(self.scale_)
        terms = []
        for _ in range(int(self.n_dequantization_samples)):
            with torch.no_grad():
                if self.dequantizer_ is None:
                    u, log_q = uniform_dequantize(x, g)
                else:
                    u, log_q = self.dequantizer_.sample((x - mean_t) / scale_t, g)
            ll = log_density((x + u - mean_t) / scale_t)
            terms.append((ll.detach() - log_q).double().cpu())
        stacked = torch.stack(terms)
        lme = torch.logsumexp(stacked, 0) - math.log(stacked.shape[0])
        return lme.numpy() + self._log_det

    def score_samples(self, X: Any) -> np.ndarray:
        """Log-density of each row under the probability-flow ODE model.

        For a dequantized model (``dequantization`` set), a lower bound on the log-probability
        ``log P(X = x)`` of each integer row: ``log p(x + u) - log q(u | x)`` averaged over
        ``n_dequantization_samples`` draws of ``u`` in the log-mean-exp (importance-weighted)
        sense.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to evaluate.

        Returns
        -------
        log_density : ndarray of shape (n_samples,)
            Natural-log density in the units of ``X`` (log-probability for dequantized models).
        """
        X = self._check_X(X)

        # A dequantization bound needs p(x + u) itself: exp of a Hutchinson log-density is
        # biased upwards, so "auto" means the exact divergence for dequantized models.
        divergence = self.divergence
        if self.dequantization is not None and divergence == "auto":
            divergence = "exact"
        probes = torch.Generator(device=self.device_).manual_seed(0)

        def ode(Z: torch.Tensor) -> torch.Tensor:
            # One generator across the K dequantization draws: independent probes for each.
            return ode_log_likelihood(
                self.network_,
                Z,
                self.sde_,
                eps=self.eps_,
                divergence=divergence,
                generator=probes,
                **self._solver_kwargs(),
            )

        return self._evaluate(X, ode, seed=1)

    def score(self, X: Any, y: Any = None) -> float:
        """Mean log-likelihood of ``X`` (probability-flow ODE), the GridSearchCV criterion.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to evaluate.
        y : None
            Ignored.

        Returns
        -------
        float
            Mean log-likelihood in nats (higher is better).
        """
        return float(np.mean(self.score_samples(X)))

    def bound(
        self,
        X: Any,
        *,
        n_time_samples: int = 1000,
        importance_sampling: bool = True,
        offset: bool = True,
        random_state: Any = 0,
    ) -> np.ndarray:
        """Lower bound on the SDE model's log-likelihood of each row (Theorem 3).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to evaluate.
        n_time_samples : int, default=1000
            Monte-Carlo time samples per row.
        importance_sampling : bool, default=True
            Draw times from ``p(t) ∝ g^2 / sigma^2`` (lower variance).
        offset : bool, default=True
            Include the ``t = eps`` decoder term.
        random_state : int, RandomState instance or None, default=0
            Seed of the Monte-Carlo estimate.

        Returns
        -------
        ndarray of shape (n_samples,)
            In nats, in the units of ``X``.  For dequantized models, a lower bound on
            ``log P(X = x)`` built from the bound on ``log p(x + u)`` (see ``score_samples``).
        """
        X = self._check_X(X)
        seed = self._seed_from(random_state)
        g = torch.Generator(device=self.device_).manual_seed(seed)

        def lower_bound(Z: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return likelihood_bound(
                    self.network_,
                    Z,
                    self.sde_,
                    eps=self.eps_,
                    n_time_samples=n_time_samples,
                    importance_sampling=importance_sampling,
                    offset=offset,
                    generator=g,
                )

        return self._evaluate(X, lower_bound, seed=seed + 1)

    def bits_per_dim(self, X: Any) -> float:
        """Mean ``-score_samples(X) / (d ln 2)``: bits per dimension of the rows of ``X``.

        For dequantized models this is an upper bound on the discrete code length
        ``-log2 P(x) / d``; for continuous data it is in the units of ``X`` and may be
        negative (see :mod:`skscoreflow.metrics` for the conventions).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to evaluate.

        Returns
        -------
        float
            Bits per dimension (lower is better).
        """
        from .metrics import bits_per_dim

        return bits_per_dim(self.score_samples(X), self.n_features_in_)

    def sample(
        self,
        n_samples: int = 1,
        random_state: Any = None,
        method: str = "ode",
        *,
        n_steps: int = 1000,
        corrector: bool = False,
    ) -> np.ndarray:
        """Draw samples from the model.

        Both samplers run from ``T`` down to ``max(eps_, s)`` with the sampling cutoff ``s``
        of :data:`skscoreflow.sampling.SAMPLING_EPS` (1e-3 for VP, as in the paper), never below
        the times the network was trained on, and finish with a Tweedie denoising step.

        Parameters
        ----------
        n_samples : int, default=1
            Number of samples.
        random_state : int, RandomState instance or None, default=None
            Seed of the sampler (None: fresh randomness).
        method : {"ode", "sde"}, default="ode"
            Probability-flow ODE (the estimator's solver and tolerances) or reverse-SDE
            (Euler-Maruyama predictor) sampling.
        n_steps : int, default=1000
            Predictor steps of the ``"sde"`` sampler (ignored by ``"ode"``).
        corrector : bool, default=False
            Add one Langevin corrector step after each predictor step (``"sde"`` only;
            predictor-corrector sampling, twice the network evaluations).

        Returns
        -------
        ndarray of shape (n_samples, n_features)
            In the units of ``X`` (float64), or integers (int64) clipped to the training range
            for dequantized models.
        """
        check_is_fitted(self, "network_")
        if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        if method not in SAMPLERS:
            raise ValueError(f"method={method!r} is not valid; expected one of {sorted(SAMPLERS)}")
        if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
        if not isinstance(corrector, (bool, np.bool_)):
            raise TypeError(f"corrector must be a bool, got {corrector!r}")
        g = torch.Generator(device=self.device_).manual_seed(self._seed_from(random_state))
        eps = max(SAMPLING_EPS.get(self.sde_.name, self.eps_), self.eps_)
        kwargs: dict[str, Any] = {
            "generator": g,
            "device": self.device_,
            "dtype": self._torch_dtype,
            "eps": eps,
        }
        if method == "ode":
            kwargs.update(self._solver_kwargs(eps))
        else:
            kwargs.update(n_steps=int(n_steps), corrector=bool(corrector))
        z = SAMPLERS[method](self.network_, self.sde_, int(n_samples), self.n_features_in_, **kwargs)
        samples = z.detach().cpu().numpy().astype(np.float64) * self.scale_ + self.mean_
        if self.dequantization is not None:
            # x + u has x = floor(x + u); clip to the integer range seen in training.
            return np.clip(np.floor(samples), self.data_min_, self.data_max_).astype(np.int64)
        return samples

    # ------------------------------------------------------------------ persistence
    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        if "network_" in state:
            # Store CPU state dicts, never live (possibly CUDA) modules: a model trained on a
            # GPU must load on a CPU-only machine.
            state.pop("network_")
            ts = state.pop("_train_state", None)
            blob = _network_blob(self.network_, ts)
            deq = state.pop("dequantizer_", None)
            if deq is not None:
                blob["dequantizer"] = {
                    "config": json.dumps(deq.config()),
                    "state": {k: v.detach().cpu().clone() for k, v in deq.state_dict().items()},
                }
            state["_network_blob"] = blob
            state["device_"] = str(self.device_)
            state["sde_"] = {"name": self.sde_.name, **self.sde_.config()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        blob = state.pop("_network_blob", None)
        super().__setstate__(state)
        if blob is None:
            return
        device = torch.device(state["device_"])
        if device.type == "cuda" and not torch.cuda.is_available():
            warnings.warn(
                f"model was trained on {device} but CUDA is not available; loading on CPU",
                RuntimeWarning,
            )
            device = torch.device("cpu")
        self.device_ = device
        sde_cfg = dict(state["sde_"])
        self.sde_ = get_sde(sde_cfg.pop("name"), **sde_cfg)
        # Building the modules draws initial weights (and Fourier frequencies) from the global
        # RNG before the stored values overwrite them: fork it so loading leaves it untouched.
        with torch.random.fork_rng(devices=[]):
            self.network_, self._train_state = _restore_network(
                blob, self.sde_, device, _DTYPES[self.dtype], self.learning_rate
            )
            self.dequantizer_ = None
            if blob.get("dequantizer") is not None:
                cfg = json.loads(blob["dequantizer"]["config"])
                deq = VariationalDequantizer(**cfg)
                deq.load_state_dict(blob["dequantizer"]["state"])
                self.dequantizer_ = deq.to(device=device, dtype=_DTYPES[self.dtype]).eval()

    def save(self, path: str) -> None:
        """Save the fitted estimator to ``path`` in a format that runs no code on load.

        The file holds tensors and JSON text only (a ``torch.save`` of a dict), readable with
        ``torch.load(path, weights_only=True)``; load it with :meth:`load`.

        Parameters
        ----------
        path : str or path-like
            File to write.
        """
        check_is_fitted(self, "network_")
        state = self.__getstate__()
        blob = state.pop("_network_blob")
        meta = {
            "format_version": _FORMAT_VERSION,
            "class": type(self).__name__,
            "params": _jsonable(self.get_params()),
            "fitted": _jsonable({k: v for k, v in state.items() if k.endswith("_")}),
        }
        torch.save({"meta": json.dumps(meta), "network": blob}, path)

    @classmethod
    def load(cls, path: str) -> "ScoreFlowDensity":
        """Load an estimator written by :meth:`save` (``weights_only`` loading: no code runs).

        Parameters
        ----------
        path : str or path-like
            File written by :meth:`save`.

        Returns
        -------
        ScoreFlowDensity
            The fitted estimator, on the device it was saved from when available (else CPU).
        """
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as exc:  # not a torch file, or one holding more than tensors
            raise ValueError(
                f"{path!s} is not a skscoreflow model file (torch.load failed: "
                f"{type(exc).__name__})"
            ) from exc
        if not isinstance(data, dict) or "meta" not in data or "network" not in data:
            raise ValueError(f"{path!s} is not a skscoreflow model file")
        try:
            meta = json.loads(data["meta"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path!s} is not a skscoreflow model file (bad metadata)") from exc
        if not isinstance(meta, dict):
            raise ValueError(f"{path!s} is not a skscoreflow model file (bad metadata)")
        if meta.get("class") != cls.__name__:
            raise ValueError(f"{path!s} holds a {meta.get('class')!r}, not a {cls.__name__}")
        if meta.get("format_version", 0) > _FORMAT_VERSION:
            raise ValueError(
                f"{path!s} was written by a newer skscoreflow (format "
                f"{meta['format_version']}); upgrade to load it"
            )
        # JSON turns tuples into lists: restore every list-valued parameter (hidden_layer_sizes,
        # dequantizer_hidden_layer_sizes) so get_params() round-trips.
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["params"].items()}
        est = cls(**params)
        fitted = meta["fitted"]
        for key in ("mean_", "scale_", "data_min_", "data_max_", "feature_names_in_"):
            if key in fitted and fitted[key] is not None:
                fitted[key] = np.asarray(fitted[key], dtype=object if key == "feature_names_in_" else np.float64)
        state = dict(fitted)
        state.update(params)
        state["_network_blob"] = data["network"]
        est.__setstate__(state)
        est._fitted_structure = est._structure()
        return est


def _as_sizes(sizes: Any) -> tuple[int, ...]:
    """Layer widths as a tuple of ints (a bare int means one layer)."""
    if isinstance(sizes, numbers.Integral):
        return (int(sizes),)
    return tuple(int(h) for h in sizes)


def _network_blob(net: torch.nn.Module, train_state: Any) -> dict[str, Any]:
    def cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in sd.items()}

    blob: dict[str, Any] = {"config": json.dumps(net.config()), "ema": cpu(net.state_dict())}
    if train_state is not None:
        blob["raw"] = cpu(train_state.model.state_dict())
        opt = train_state.optimizer.state_dict()
        blob["optimizer"] = _optimizer_to_cpu(opt)
        blob["n_iter"] = int(train_state.n_iter)
        blob["loss_curve"] = [float(v) for v in train_state.loss_curve]
    return blob


def _optimizer_to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _optimizer_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_optimizer_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_optimizer_to_cpu(v) for v in obj)
    return obj


def _restore_network(
    blob: dict[str, Any], sde: Any, device: torch.device, dtype: torch.dtype, lr: float
) -> tuple[torch.nn.Module, Any]:
    from .training import TrainState

    cfg = json.loads(blob["config"])
    cfg.pop("sde", None)
    ema = ScoreMLP(sde=sde, **cfg)
    ema.load_state_dict(blob["ema"])
    ema = ema.to(device=device, dtype=dtype).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    train_state = None
    if "raw" in blob:
        raw = ScoreMLP(sde=sde, **cfg)
        raw.load_state_dict(blob["raw"])
        raw = raw.to(device=device, dtype=dtype)
        optimizer = torch.optim.Adam(raw.parameters(), lr=lr)
        try:
            optimizer.load_state_dict(blob["optimizer"])
        except (ValueError, KeyError):  # pragma: no cover - optimizer class changed
            pass
        train_state = TrainState(
            model=raw,
            ema_model=ema,
            optimizer=optimizer,
            n_iter=int(blob.get("n_iter", 0)),
            loss_curve=list(blob.get("loss_curve", [])),
        )
    return ema, train_state


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    if isinstance(obj, np.random.RandomState):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)
