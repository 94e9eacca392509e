"""The scikit-learn estimator: thin orchestration over the functional core."""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch
from sklearn.base import BaseEstimator, DensityMixin, _fit_context
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from . import _dask, _data, _distributed, _ode, _params, _persistence
from ._checkpoint import FitCheckpoint
from ._preprocessing import Standardizer
from ._threads import fit_threads
from .bound import likelihood_bound
from .dequantization import (
    _check_integer_valued,
    _fit_to_score_model,
    dequantized_log_prob,
)
from .likelihood import _EXACT_MAX_DIM, _resolve_divergence, ode_log_likelihood
from .metrics import bits_per_dim
from .sampling import _SAMPLERS
from ._loop import _deferred_interrupt
from .training import NonFiniteLossError, train_score_model

__all__ = ["ScoreFlowDensity"]

#: ``sample``'s ODE tolerances, as a multiple of ``rtol`` / ``atol`` (see ``sample``).
_SAMPLE_TOL_FACTOR = 10.0


class ScoreFlowDensity(DensityMixin, BaseEstimator):
    """Density estimation with a score-based diffusion model trained by maximum likelihood.

    A score network ``s(x, t)`` is trained with the likelihood-weighted denoising
    score-matching loss (ScoreFlow: Song, Durkan, Murray & Ermon, NeurIPS 2021), with
    importance-sampled diffusion times by default.  ``score_samples`` returns the exact
    log-density of the probability-flow ODE model (a continuous normalising flow) and ``bound``
    the per-sample lower bound on the SDE model's log-likelihood (Theorem 3).  Data are
    standardised internally; every log-density is reported in the units of ``X``.  Measured
    defaults and trade-offs: the user guide's hyperparameter page and ``docs/benchmarks/``.

    Parameters
    ----------
    sde : {"vp", "subvp", "ve"} or SDE, default="vp"
        Forward diffusion: a built-in name or an instance of any
        :class:`~skscoreflow.sde.SDE` subclass.
    weighting : {"likelihood_is", "likelihood", "score_matching"}, default="likelihood_is"
        Likelihood weighting with importance-sampled times (the paper's choice) or uniform
        times, or the original ``sigma^2`` weighting.
    dequantization : {None, "uniform", "variational"}, default=None
        For integer-valued data: model ``x + u``, ``u`` uniform on ``[0, 1)^d`` or from a
        conditional flow ``q(u | x)`` trained after the score model.  ``score_samples`` and
        ``bound`` then bound ``log P(X = x)`` and ``sample`` returns integers.
    n_dequantization_samples : int, default=1
        Dequantization draws ``K`` per row at evaluation (see ``score_samples`` and ``bound``).
    dequantizer_hidden_layer_sizes : tuple of int, default=(64, 64)
        Conditioner widths of the variational dequantizer.
    dequantizer_n_couplings : int, default=4
        Coupling layers of the variational dequantizer.
    dequantizer_max_iter : int, default=1000
        Optimizer steps of the variational dequantizer.
    hidden_layer_sizes : tuple of int, default=(128, 128, 128)
        Widths of the residual blocks of the MLP score network.
    image_shape : tuple of (int, int, int) or None, default=None
        ``(C, H, W)`` when the rows are images flattened in C order (channel planes, each
        row-major, as CIFAR-10's files store them); ``C * H * W`` must equal the number of
        features.  The rows stay flat everywhere; the network sees images.
    network : {"auto", "mlp", "unet"} or a U-Net preset name, default="auto"
        The score network: the residual MLP (:class:`~skscoreflow.nets.ScoreMLP`) or the
        DDPM++ U-Net (:class:`~skscoreflow.nets.ScoreUNet`, needs ``image_shape``).  "auto":
        the U-Net when ``image_shape`` is set, else the MLP (``network_type_``).  A key of
        :data:`~skscoreflow.nets.UNET_PRESETS` (such as "ddpmpp_cifar10", the paper's CIFAR-10
        network) is the U-Net with that preset's sizes.  The U-Net maps all pixels with one
        affine map (integer levels ``lo..hi`` onto ``[-1, 1)``, ``n_levels_``) instead of
        standardising each column.
    channels : int or "auto", default="auto"
        U-Net base channels (a multiple of 4).  "auto" and the three sizes below: by image size,
        see :func:`~skscoreflow.nets.unet_defaults` (``unet_sizes_``).
    channel_mult : tuple of int or "auto", default="auto"
        U-Net channel multiplier per resolution level (the image is halved between levels).
    num_res_blocks : int or "auto", default="auto"
        U-Net residual blocks per level.
    attn_resolutions : tuple of int or "auto", default="auto"
        Image sides at which the U-Net has self-attention (besides its middle).
    augment : {None, "hflip"}, default=None
        "hflip": each training image is flipped left-right with probability 1/2 at every step
        (needs ``image_shape``).  Evaluation never flips.
    fourier_features : int or "auto", default="auto"
        Random Fourier frequencies of the input fed to the score network, damped by the noise
        level; 0 for none.  "auto": 128 for at most 2 features, else 0 (``fourier_features_``).
    fourier_scale : float, default=0.35
        Std (in cycles) of a standard-normal row's projection on a frequency; lower is smoother.
    gaussian_reference : {"auto", "full", "diagonal"}, default="auto"
        The Gaussian the score network learns its departure from (the untrained model's
        density, see :class:`~skscoreflow.nets.ScoreMLP`): "full", the Gaussian with the
        training rows' mean and covariance; "diagonal", the one with their column means and
        variances.  "auto": "full" with fewer than 100 rows per feature (and more than one
        feature), else "diagonal" (``gaussian_reference_``).
    dropout : float in [0, 1) or "auto", default="auto"
        Dropout in the score network's residual blocks.  "auto": for the MLP, 0.3 up to 1,000
        rows, 0 from 10,000, linear in ``log10(n_samples)`` between; 0.1 for the U-Net
        (``dropout_``).
    max_iter : int, default=10000
        Optimizer steps, the budget that dominates the likelihood (an upper bound when early
        stopping is on).
    batch_size : int or "auto", default="auto"
        Rows per optimizer step (capped at the number of training rows).  "auto": 1024 for the
        MLP, 128 for the U-Net (``batch_size_``).
    learning_rate : float or "auto", default="auto"
        Peak Adam learning rate (linear warm-up, then cosine decay).  "auto": 2e-3 for the MLP;
        for the U-Net 1e-3, or the paper's 2e-4 from 128 base channels (``learning_rate_``).
    ema_decay : float, default=0.999
        Decay of the exponential moving average of the weights used for evaluation.
    eps : float or None, default=None
        Smallest diffusion time for training and likelihood (``eps_``).  None uses the SDE's
        ``continuous_eps`` on continuous data (3e-3 for VP) and its ``default_eps`` (the
        paper's cutoff) for dequantized data.
    rtol, atol : float, default=1e-5
        Tolerances of the adaptive ODE solver of ``score_samples``, held by every row on its
        own (the solver's per-row error norm), so a row's log-density does not depend on the
        other rows passed with it beyond that accuracy.  ``sample`` steps in ``log t`` at ten
        times these tolerances.  The per-row error they give is measured in the user guide's
        "Speed and accuracy" section.
    solver : str, default="dopri5"
        Adaptive "dopri5", "dopri8", "bosh3", "adaptive_heun" or fixed-step (100 steps) "rk4",
        "midpoint", "euler".
    divergence : {"auto", "exact", "hutchinson"}, default="auto"
        ODE divergence; "auto" is exact up to 16 features and for dequantized models with the
        MLP, Hutchinson's estimate otherwise.
    early_stopping : bool or "auto", default="auto"
        Track the likelihood bound on ``validation_fraction`` of the rows, stop when it stops
        improving and restore the best weights.  "auto": on with fewer than 5,000 rows per
        feature (``early_stopping_``); only an explicit True warns when it never triggers.
    validation_fraction : float, default=0.1
        Fraction of rows held out when ``early_stopping``.
    n_iter_no_change : int, default=10
        Validations without improvement by ``tol`` before stopping.  The untrained network is
        validated first, then about every 50 epochs, within 50 and ``max(50, max_iter // 50)``
        steps.
    tol : float, default=1e-4
        Minimum improvement of the validation score (nats per row).
    warm_start : bool, default=False
        Continue training the network and its optimizer on the next ``fit`` (the schedule
        restarts, the standardisation is kept, a variational dequantizer is retrained).  The
        parameters that shape the network or its inputs cannot change.
    dtype : {"float32", "float64"}, default="float32"
        Precision of training and evaluation.
    device : str, default="auto"
        "auto" (CUDA when available), "cpu", "cuda" or "cuda:k".
    random_state : int, RandomState instance or None, default=None
        Seeds all randomness of ``fit``; an int makes it reproducible on CPU.
    verbose : int, default=0
        ``> 0``: progress (a tqdm bar on a terminal, else lines on the "skscoreflow" logger).
    checkpoint_path : str, path-like or None, default=None
        File, or folder (one file per fit), where ``fit`` keeps a checkpoint of the whole
        training state, written atomically; a later ``fit`` with the same parameters and data
        resumes from it (bit for bit on the CPU) and deletes it on completion.  None: none.
    checkpoint_every : int, default=1000
        Optimizer steps between checkpoints (also written at Ctrl-C and between phases).
    shuffle : bool, default=True
        Draw the mini-batches from a fresh permutation of the rows every epoch (``fit``) or of
        each chunk (``partial_fit``); False takes the rows in the order given.
    standardize : bool, default=True
        Standardise the columns (to zero mean and unit variance; the first ``partial_fit``
        chunk fixes the map) before the diffusion; the U-Net's single map for all pixels
        instead (see ``network``).  Log-densities are always in X's units.
    distributed : bool or "auto", default="auto"
        Data-parallel training across the processes of a ``torch.distributed`` job (DDP, e.g.
        launched by ``torchrun``).  "auto": whenever a process group with more than one process
        is initialised (never because ``RANK``/``WORLD_SIZE`` are set); True: also initialise the
        group from torchrun's environment when needed (gloo on CPU, NCCL on CUDA); False:
        never.  ``batch_size`` stays the global batch and the result does not depend on the
        number of processes; every process must call ``fit`` with the same data and parameters,
        and only rank 0 logs and writes files.  See the user guide's "Scaling past one process".

    Attributes
    ----------
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (n_features,)
        Defined only when ``X`` has string column names.
    device_ : torch.device
        Device the network lives on.
    sde_ : SDE
        The forward SDE (a copy of ``sde`` when an instance was passed).
    network_ : ScoreMLP or ScoreUNet
        The score network (EMA weights), in evaluation mode.
    network_type_ : {"mlp", "unet"}
        The kind of score network (``network`` resolved).
    image_shape_ : tuple of int or None
        ``image_shape`` as checked against the rows.
    unet_sizes_ : dict or None
        The U-Net's ``channels``, ``channel_mult``, ``num_res_blocks`` and ``attn_resolutions``
        ("auto" and presets resolved); None for the MLP.
    n_levels_ : int or None
        Number of integer levels ``L = hi - lo + 1`` of dequantized U-Net data (``lo``, ``hi``:
        the smallest and largest training value), mapped onto ``[-1, 1)``; None otherwise.
    eps_ : float
        The smallest diffusion time in use.
    fourier_features_ : int
        Fourier frequencies of the score network (``fourier_features`` with "auto" resolved).
    early_stopping_ : bool
        Whether the last ``fit`` used early stopping (``early_stopping`` resolved; False after
        ``partial_fit``).
    dropout_ : float
        Dropout of the score network (``dropout`` resolved).
    batch_size_, learning_rate_ : int, float
        ``batch_size`` and ``learning_rate`` resolved for the network.
    gaussian_reference_ : {"full", "diagonal"} or None
        The MLP's Gaussian reference (``gaussian_reference`` resolved); None for the U-Net,
        which starts from ``eps_hat = 0``.
    reference_covariance_ : ndarray of shape (n_features, n_features) or None
        Covariance of the standardised training rows (of ``x + u`` for dequantized data), the
        full reference; None for "diagonal".
    mean_, scale_ : ndarray of shape (n_features,)
        Standardisation applied before the diffusion.
    dequantizer_ : VariationalDequantizer or None
        The trained ``q(u | x)`` when ``dequantization="variational"``.
    dequantizer_loss_curve_ : list of float or None
        Its training loss of every step.
    n_iter_ : int
        Optimizer steps taken (in total, across warm starts).
    loss_curve_ : list of float
        Training loss of every step.
    validation_scores_ : list of float or None
        Mean likelihood bound (nats per row, in X's units) on the validation rows at each
        validation, when ``early_stopping_``.
    best_validation_score_ : float or None
        Best of ``validation_scores_``, when ``early_stopping_``.
    fit_time_ : float
        Seconds spent training.
    world_size_ : int
        Number of processes that trained the model (1 unless ``distributed``).

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

    _parameter_constraints: dict = _params.PARAMETER_CONSTRAINTS

    def __init__(
        self,
        *,
        sde: Any = "vp",
        weighting: str = "likelihood_is",
        dequantization: str | None = None,
        n_dequantization_samples: int = 1,
        dequantizer_hidden_layer_sizes: tuple[int, ...] = (64, 64),
        dequantizer_n_couplings: int = 4,
        dequantizer_max_iter: int = 1000,
        hidden_layer_sizes: tuple[int, ...] = (128, 128, 128),
        image_shape: tuple[int, int, int] | None = None,
        network: str = "auto",
        channels: int | str = "auto",
        channel_mult: tuple[int, ...] | str = "auto",
        num_res_blocks: int | str = "auto",
        attn_resolutions: tuple[int, ...] | str = "auto",
        augment: str | None = None,
        fourier_features: int | str = "auto",
        fourier_scale: float = 0.35,
        gaussian_reference: str = "auto",
        dropout: float | str = "auto",
        max_iter: int = 10000,
        batch_size: int | str = "auto",
        learning_rate: float | str = "auto",
        ema_decay: float = 0.999,
        eps: float | None = None,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        solver: str = "dopri5",
        divergence: str = "auto",
        early_stopping: bool | str = "auto",
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        tol: float = 1e-4,
        warm_start: bool = False,
        dtype: str = "float32",
        device: str = "auto",
        random_state: int | np.random.RandomState | None = None,
        verbose: int = 0,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 1000,
        shuffle: bool = True,
        standardize: bool = True,
        distributed: bool | str = "auto",
    ) -> None:
        self.sde = sde
        self.weighting = weighting
        self.dequantization = dequantization
        self.n_dequantization_samples = n_dequantization_samples
        self.dequantizer_hidden_layer_sizes = dequantizer_hidden_layer_sizes
        self.dequantizer_n_couplings = dequantizer_n_couplings
        self.dequantizer_max_iter = dequantizer_max_iter
        self.hidden_layer_sizes = hidden_layer_sizes
        self.image_shape = image_shape
        self.network = network
        self.channels = channels
        self.channel_mult = channel_mult
        self.num_res_blocks = num_res_blocks
        self.attn_resolutions = attn_resolutions
        self.augment = augment
        self.fourier_features = fourier_features
        self.fourier_scale = fourier_scale
        self.gaussian_reference = gaussian_reference
        self.dropout = dropout
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
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self.shuffle = shuffle
        self.standardize = standardize
        self.distributed = distributed

    # ------------------------------------------------------------------ helpers
    @property
    def _torch_dtype(self) -> torch.dtype:
        return _params._DTYPES[self.dtype]

    @property
    def _standardizer(self) -> Standardizer:
        return Standardizer(self.mean_, self.scale_)

    def _to_tensor(self, Z: np.ndarray) -> Tensor:
        # torch.tensor copies: read-only inputs (memmaps, pandas copy-on-write) are fine and
        # the caller's array is never shared with the network.
        return torch.tensor(Z, dtype=self._torch_dtype, device=self.device_)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device_).manual_seed(seed)

    def _solver_kwargs(
        self, eps: float, time_variable: str = "t", tol_factor: float = 1.0
    ) -> dict[str, Any]:
        # A fixed-step solver takes _FIXED_STEPS steps over the span in the solver's variable.
        tv = _ode.time_variable(time_variable)
        span = tv.to_u(self.sde_.T) - tv.to_u(eps)
        rtol, atol = tol_factor * self.rtol, tol_factor * self.atol
        return {**_params.solver_kwargs(self.solver, rtol, atol, span),
                "time_variable": time_variable}

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None) -> "ScoreFlowDensity":
        """Train the score network (and the variational dequantizer) on ``X``.

        Inside a ``torch.distributed`` job (see ``distributed``) the fit is data-parallel and
        the same on every process.  With ``checkpoint_path`` set, an interrupted fit resumes
        from its last checkpoint when called again with the same parameters and data.  Ctrl-C
        stops after the running step and leaves a usable estimator, with a warning; a script
        then gets the ``KeyboardInterrupt`` back, an interactive session does not (see the
        user guide).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data (numeric, finite; integer-valued when ``dequantization`` is set).  A
            ``numpy.memmap`` or another row-indexable array-like (h5py or zarr dataset, Dask
            array) is checked in chunks and read one mini-batch at a time, never whole.
        y : None
            Ignored.

        Returns
        -------
        self : ScoreFlowDensity
            The fitted estimator.
        """
        sizes = _params.layer_sizes("hidden_layer_sizes", self.hidden_layer_sizes)
        deq_sizes = _params.layer_sizes(
            "dequantizer_hidden_layer_sizes", self.dequantizer_hidden_layer_sizes
        )
        warm = self.warm_start and hasattr(self, "network_")
        start_n_iter = self.n_iter_ if warm else 0
        # An interrupted fit of this very estimator is resumed as the fit it was (its fitted
        # attributes have moved on, its checkpoint has not).
        pending = getattr(self, "_interrupted_fit", None)
        if pending is not None and FitCheckpoint.exists(self):
            warm, start_n_iter = pending
        X, summary = self._validated(X, reset=not warm)
        if warm:
            _params.check_warm_start(self)
        self.early_stopping_ = _params.resolve_early_stopping(self.early_stopping, *X.shape)
        device = _distributed.local_device(_params.resolve_device(self.device))
        group = _distributed.resolve_group(self.distributed, device)
        main = group is None or group.is_main
        seed = _params.seed_from(self.random_state)
        if group is not None:
            # random_state=None draws a seed per process, and only rank 0 may see the file of
            # an interrupted fit: rank 0's answers are everyone's.
            seed, warm, start_n_iter = group.broadcast_object((seed, warm, start_n_iter))
            group.check_same("data shape, random_state and max_iter",
                             (tuple(X.shape), seed, int(self.max_iter), self.batch_size))
        ckpt = None
        if self.checkpoint_path is not None:
            ckpt = FitCheckpoint.open(self, X, start_n_iter, group,
                                      None if summary is None else summary["digest"])
        try:
            seed = seed if ckpt is None else ckpt.seed(seed)
            if not warm:
                _params.derive(self, X, summary)
            if ckpt is not None and ckpt.phase is not None:
                ckpt.restore_derived(self)
            self.batch_size_, self.learning_rate_ = _params.resolve_optimizer(self)
            if group is not None:
                self.device_ = _distributed.local_device(self.device_)
                # Ranks given other data (each its own shard) or other parameters would train
                # different models without an error: compare what they derived.
                group.check_same("data (column moments) and parameters", _params.digest(self))
            self.world_size_ = 1 if group is None else group.world_size
            train_idx, val_idx = _params.split(self, X.shape[0], np.random.default_rng(seed))
            # All rows (no validation split): no index array of the size of the data.
            rows = None if val_idx is None else train_idx
            X_train, batch_transform = self._training_rows(X, rows)
            n_train = X.shape[0] if rows is None else len(rows)

            def loop_kwargs(phase: str, score_state: Any = None) -> dict[str, Any]:
                kwargs = {} if ckpt is None else ckpt.loop_kwargs(self, seed, phase, score_state)
                return {**kwargs, "group": group}

            verbose = int(self.verbose) if main else 0
            with fit_threads(), _deferred_interrupt() as interrupt_pending:
                if ckpt is not None and ckpt.phase == "dequantizer":
                    state = ckpt.score_state(self)
                else:
                    if warm:
                        net, state_in = self._train_state.model, self._train_state
                    else:
                        net, state_in = _params.new_network(self, sizes, seed), None
                    validation_fn = None
                    if val_idx is not None:
                        X_val = _data.read_rows(X, val_idx[:2000])
                        validation_fn = _params.validation_fn(self, X_val, seed)
                    try:
                        state = train_score_model(
                            net, X_train, self.sde_, eps=self.eps_, generator=self._generator(seed),
                            batch_transform=batch_transform, validation_fn=validation_fn,
                            state=state_in, shuffle=bool(self.shuffle),
                            **{**_params.training_kwargs(self, n_train),
                               "verbose": verbose},
                            **loop_kwargs("score"),
                        )
                    except NonFiniteLossError:
                        if warm:  # the continued state holds the last good weights: keep it whole
                            _params.set_score_state(self, self._train_state, warn=False)
                        raise
                _params.set_score_state(self, state, warn=main)
                # A Ctrl-C held between the phases ends the fit before the dequantizer.
                held = interrupt_pending(consume=True)
                state.interrupted = state.interrupted or _distributed.any_rank(group, held)
                deq_state = None
                if self.dequantization == "variational" and not state.interrupted:
                    deq_state = _fit_to_score_model(
                        self.network_, self.sde_, self.eps_, self._standardizer.transform,
                        X_train, hidden_layer_sizes=deq_sizes,
                        n_couplings=int(self.dequantizer_n_couplings),
                        max_iter=int(self.dequantizer_max_iter), seed=seed + 3,
                        verbose=verbose, **loop_kwargs("dequantizer", state),
                    )
                    self._set_dequantizer(deq_state)
                    held = interrupt_pending(consume=True)
                    deq_state.interrupted = (deq_state.interrupted
                                             or _distributed.any_rank(group, held))
            self._interrupted_fit = self._partial_rng = self._deq_state = None
            if state.interrupted or (deq_state is not None and deq_state.interrupted):
                self._interrupted_fit = (warm, start_n_iter)
                _params.interrupted(self, state, deq_state, ckpt)
            elif ckpt is not None:
                ckpt.remove()
        finally:
            if ckpt is not None:
                ckpt.release()
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X: Any, y: Any = None) -> "ScoreFlowDensity":
        """Continue training on one chunk of rows (streaming data, scikit-learn's convention).

        Each call takes ``max(1, len(X) // batch_size)`` optimizer steps over the chunk (in
        order, shuffled within the chunk when ``shuffle``), continuing the same optimizer, EMA,
        random stream and learning-rate schedule (that of a ``max_iter``-step run; past it the
        final rate is kept).  The first call (on an unfitted estimator) fixes the
        standardisation from its chunk.  Early stopping is not used.  With
        ``dequantization="variational"`` the dequantizer takes as many steps on the chunk
        against the current score model.  The "auto" settings resolve from the first chunk
        (``dropout_``, ``gaussian_reference_``).  Over chunks of ``batch_size`` rows, with
        ``shuffle=False``, ``standardize=False``, ``early_stopping=False``,
        ``gaussian_reference="diagonal"`` and a fixed ``dropout``, the calls equal one ``fit``
        on their concatenation (same ``random_state``, ``max_iter`` = number of chunks).  Inside a
        ``torch.distributed`` job (``distributed``) every process passes the same chunk and
        each step is data-parallel, as in ``fit``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            One chunk of training rows.
        y : None
            Ignored.

        Returns
        -------
        ScoreFlowDensity
            The estimator, trained on one more chunk.
        """
        first = not hasattr(self, "network_")
        X, summary = self._validated(X, reset=first)
        if not first:
            _params.check_warm_start(self)
        self.early_stopping_ = False  # a stream has no held-out rows
        seed = _params.seed_from(self.random_state)
        device = _distributed.local_device(_params.resolve_device(self.device))
        group = _distributed.resolve_group(self.distributed, device)
        if group is not None:
            seed = group.broadcast_object(seed)
            group.check_same("chunk shape", tuple(X.shape))
        if first:
            _params.derive(self, X, summary)
            if group is not None:
                self.device_ = _distributed.local_device(self.device_)
                group.check_same("first chunk (column moments) and parameters",
                                 _params.digest(self))
            sizes = _params.layer_sizes("hidden_layer_sizes", self.hidden_layer_sizes)
            net, state_in = _params.new_network(self, sizes, seed), None
        else:
            net, state_in = self._train_state.model, self._train_state
        self.world_size_ = 1 if group is None else group.world_size
        self.batch_size_, self.learning_rate_ = _params.resolve_optimizer(self)
        g = self._generator(seed)
        if getattr(self, "_partial_rng", None) is not None:
            g.set_state(self._partial_rng)
        X_train, batch_transform = self._training_rows(X, None)
        steps = max(1, X.shape[0] // min(self.batch_size_, X.shape[0]))
        kwargs = {**_params.training_kwargs(self), "max_iter": steps, "early_stopping": False,
                  "group": group}
        if group is not None and not group.is_main:
            kwargs["verbose"] = 0
        start = 0 if state_in is None else state_in.n_iter
        # Before the score step below resets the fitted dequantizer attributes.
        deq_in = None if first else self._continued_dequantizer()
        with fit_threads(), _deferred_interrupt() as interrupt_pending:
            state = train_score_model(
                net, X_train, self.sde_, eps=self.eps_, generator=g,
                batch_transform=batch_transform,
                state=state_in, shuffle=bool(self.shuffle), schedule=(start, int(self.max_iter)),
                **kwargs,
            )
            _params.set_score_state(self, state, warn=False)
            held = interrupt_pending(consume=True)
            state.interrupted = state.interrupted or _distributed.any_rank(group, held)
            deq_state = None
            if self.dequantization == "variational" and not state.interrupted:
                deq_sizes = _params.layer_sizes(
                    "dequantizer_hidden_layer_sizes", self.dequantizer_hidden_layer_sizes
                )
                deq_state = _fit_to_score_model(
                    self.network_, self.sde_, self.eps_, self._standardizer.transform, X_train,
                    hidden_layer_sizes=deq_sizes, n_couplings=int(self.dequantizer_n_couplings),
                    max_iter=steps, seed=seed + 3, verbose=kwargs["verbose"], state=deq_in,
                    generator=g, group=group,
                    # One schedule across calls, over dequantizer_max_iter steps.
                    schedule=(0 if deq_in is None else deq_in.n_iter,
                              int(self.dequantizer_max_iter)),
                )
                self._set_dequantizer(deq_state)
                self._deq_state = deq_state
        self._partial_rng = g.get_state()
        if state.interrupted:
            _params.interrupted(self, state, deq_state, None)
        return self

    def _validated(self, X: Any, reset: bool) -> tuple[Any, dict[str, Any] | None]:
        return _data.validated(self, X, reset)

    def _training_rows(self, X: Any, rows: np.ndarray | None) -> tuple[Any, Any]:
        return _data.training_rows(self, X, rows)

    def _continued_dequantizer(self) -> Any:
        """partial_fit's dequantizer training state: the live one, else (after unpickling)
        one rebuilt around the fitted dequantizer with a fresh optimizer."""
        state = getattr(self, "_deq_state", None)
        deq = getattr(self, "dequantizer_", None)
        if state is not None or deq is None:
            return state
        import copy

        from .training import TrainState

        model = copy.deepcopy(deq).requires_grad_(True).train()
        optimizer = torch.optim.Adam(model.parameters())
        return TrainState(model, deq, optimizer, n_iter=len(self.dequantizer_loss_curve_ or []),
                          loss_curve=list(self.dequantizer_loss_curve_ or []))

    def _set_dequantizer(self, deq_state: Any) -> None:
        self.dequantizer_ = deq_state.ema_model
        self.dequantizer_loss_curve_ = list(deq_state.loss_curve)

    # ------------------------------------------------------------------ evaluation
    def _in_chunks(self, method: str, X: Any, **kwargs: Any) -> np.ndarray:
        """``method`` on out-of-core ``X``, one chunk of rows at a time (bounded memory)."""
        check_is_fitted(self, "network_")
        validate_data(self, X, skip_check_array=True, reset=False)
        out = np.empty(X.shape[0])
        for rows in _data.chunks(X.shape[0]):
            out[rows] = getattr(self, method)(np.asarray(X[rows]), **kwargs)
        return out

    def _check_X(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "network_")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        if self.dequantization is not None:
            _check_integer_valued(X, getattr(self, "feature_names_in_", None))
        return X

    def _evaluate(
        self, X: np.ndarray, log_density: Callable[[Tensor], Tensor], seed: int, *, exact: bool
    ) -> np.ndarray:
        """``log_density`` (on standardised rows) in X's units; for dequantized models the
        ``K``-draw bound on ``log P(x)``, importance-weighted only when ``exact``.

        Rows too far from the training data for the network's precision get ``-inf`` (with a
        warning) and are kept out of the others' solves; a non-finite model output raises.
        """
        st = self._standardizer
        out = np.full(X.shape[0], -np.inf)
        keep = _params.representable(st.transform(X), self._torch_dtype, warn=True)
        if not keep.any():
            return out
        X = X[keep]
        if self.dequantization is None:
            ll = log_density(self._to_tensor(st.transform(X)))
        else:
            ll = dequantized_log_prob(
                log_density, self._to_tensor(X), n_samples=int(self.n_dequantization_samples),
                dequantizer=self.dequantizer_, transform=st.transform, importance_weighted=exact,
                generator=self._generator(seed),
            )
        ll = ll.detach().cpu().numpy().astype(np.float64) + st.log_det
        if np.isnan(ll).any():
            raise FloatingPointError(
                f"the model gave NaN log-densities for {int(np.isnan(ll).sum())} row(s): its "
                "network output is not finite there"
            )
        out[keep] = ll
        return out

    def score_samples(self, X: Any) -> np.ndarray:
        """Log-density of each row under the probability-flow ODE model.

        For a dequantized model, a lower bound on ``log P(X = x)`` of each integer row: with
        ``K = n_dequantization_samples`` draws ``u_k ~ q(u | x)``, the importance-weighted
        ``log (1/K) sum_k p(x + u_k) / q(u_k | x)``, which needs ``p(x + u)`` itself ("auto" is
        the exact divergence there for the MLP; a Hutchinson estimate, the U-Net's "auto", is
        averaged in log space instead).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to evaluate; a memmap or other out-of-core array-like is evaluated one chunk
            of rows at a time (bounded memory).

        Returns
        -------
        log_density : ndarray of shape (n_samples,)
            Natural-log density in the units of ``X`` (log-probability for dequantized models);
            a lazy dask array when ``X`` is one, computed block by block (equal to the NumPy
            result up to the solver's tolerance; dequantization draws and Hutchinson probes
            restart from their fixed seeds in every block).
        """
        if _dask.is_dask_collection(X):
            return _dask.lazy_rows(self, "score_samples", X)
        if _data.is_out_of_core(X):
            return self._in_chunks("score_samples", X)
        X = self._check_X(X)
        divergence = self.divergence
        if self.dequantization is not None and divergence == "auto" and (
                self.network_type_ == "mlp"):
            divergence = "exact"
        # One generator across the K dequantization draws: independent probes for each.
        probes = self._generator(0)

        def ode(Z: Tensor) -> Tensor:
            return ode_log_likelihood(
                self.network_, Z, self.sde_, eps=self.eps_, divergence=divergence,
                generator=probes, **self._solver_kwargs(self.eps_),
            )

        exact = _resolve_divergence(divergence, self.n_features_in_, _EXACT_MAX_DIM) == "exact"
        return self._evaluate(X, ode, seed=1, exact=exact)

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

        An unbiased Monte-Carlo estimate of the bound: its expectation, not every draw, lies
        below ``log p_SDE(x)``.  For a dequantized model, the mean over the
        ``n_dequantization_samples`` draws ``u ~ q(u | x)`` of ``bound(x + u) - log q(u | x)``
        (the dequantization ELBO): never importance-weighted, since a log-mean-exp of noisy
        estimates is biased upwards and can exceed ``log P(x)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to evaluate.
        n_time_samples : int, default=1000
            Monte-Carlo time samples per row (and per dequantization draw).
        importance_sampling : bool, default=True
            Draw times from ``p(t) ∝ g^2 / sigma^2`` (lower variance).
        offset : bool, default=True
            Include the ``t = eps`` decoder term.
        random_state : int, RandomState instance or None, default=0
            Seed of the Monte-Carlo estimate.

        Returns
        -------
        ndarray of shape (n_samples,)
            In nats, in the units of ``X``; a lazy dask array when ``X`` is one, each block
            drawing its own Monte-Carlo sample (seeded from ``random_state`` and its index).
        """
        _params.validate(_params.BOUND_CONSTRAINTS, locals(), "ScoreFlowDensity.bound")
        if _dask.is_dask_collection(X):
            return _dask.lazy_rows(
                self, "bound", X, n_time_samples=n_time_samples,
                importance_sampling=importance_sampling, offset=offset, random_state=random_state,
            )
        if _data.is_out_of_core(X):
            check_is_fitted(self, "network_")
            validate_data(self, X, skip_check_array=True, reset=False)
            out = np.empty(X.shape[0])
            seeds = _dask._BlockSeeds(random_state)  # as Dask blocks: one chunk is the NumPy call
            for i, rows in enumerate(_data.chunks(X.shape[0])):
                seed = seeds(i)
                out[rows] = self.bound(
                    np.asarray(X[rows]), n_time_samples=n_time_samples,
                    importance_sampling=importance_sampling, offset=offset, random_state=seed,
                )
            return out
        X = self._check_X(X)
        seed = _params.seed_from(random_state)
        g = self._generator(seed)

        def lower_bound(Z: Tensor) -> Tensor:
            with torch.no_grad():
                return likelihood_bound(
                    self.network_, Z, self.sde_, eps=self.eps_, n_time_samples=n_time_samples,
                    importance_sampling=importance_sampling, offset=offset, generator=g,
                )

        return self._evaluate(X, lower_bound, seed=seed + 1, exact=False)

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

        Both samplers run from ``T`` down to ``max(eps_, sde_.sampling_eps)`` (never below the
        times the network was trained on) and finish with a Tweedie denoising step.

        Parameters
        ----------
        n_samples : int, default=1
            Number of samples.
        random_state : int, RandomState instance or None, default=None
            Seed of the sampler (None: fresh randomness).
        method : {"ode", "sde"}, default="ode"
            Probability-flow ODE (the estimator's solver, stepping in ``log t`` at ten times
            its tolerances; a fixed-step solver takes 100 steps uniform in ``log t``) or
            reverse-SDE (Euler-Maruyama predictor) sampling.
        n_steps : int, default=1000
            Predictor steps of the ``"sde"`` sampler (ignored by ``"ode"``).
        corrector : bool, default=False
            Add one Langevin corrector step after each predictor step (``"sde"`` only).

        Returns
        -------
        ndarray of shape (n_samples, n_features)
            In the units of ``X`` (float64), or integers (int64) clipped to the training range
            for dequantized models.
        """
        check_is_fitted(self, "network_")
        _params.validate(_params.SAMPLE_CONSTRAINTS, locals(), "ScoreFlowDensity.sample")
        eps = max(self.sde_.sampling_eps, self.eps_)
        kwargs: dict[str, Any] = {
            "generator": self._generator(_params.seed_from(random_state)),
            "device": self.device_,
            "dtype": self._torch_dtype,
            "eps": eps,
        }
        if method == "ode":
            # Samples are judged as a distribution, not row by row: stepping in log t at ten
            # times the likelihood's tolerances gives samples of the same quality as the
            # likelihood's own setting in t, with under half the network evaluations
            # (docs/benchmarks/engine.md).
            kwargs.update(self._solver_kwargs(eps, "log_t", _SAMPLE_TOL_FACTOR))
        else:
            kwargs.update(n_steps=int(n_steps), corrector=bool(corrector))
        # In chunks of rows (one generator across them): memory beyond the output is bounded.
        samples = np.empty((int(n_samples), self.n_features_in_))
        for rows in _data.chunks(int(n_samples)):
            z = _SAMPLERS[method](self.network_, self.sde_, rows.stop - rows.start,
                                  self.n_features_in_, **kwargs)
            samples[rows] = self._standardizer.inverse(z.detach().cpu().numpy())
        if self.dequantization is not None:
            # x + u has x = floor(x + u); clip to the integer range seen in training.
            return np.clip(np.floor(samples), self.data_min_, self.data_max_).astype(np.int64)
        return samples

    # ------------------------------------------------------------------ persistence
    def __getstate__(self) -> dict[str, Any]:
        return _persistence.get_state(self, super().__getstate__())

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        # Estimators saved before images existed: their parameters at the defaults, and a
        # fitted one had the MLP.
        for key, value in _params.IMAGE_DEFAULTS.items():
            state.setdefault(key, value)
        if "network_" in state or "_network_blob" in state:
            for key, value in _params.IMAGE_FITTED_DEFAULTS.items():
                state.setdefault(key, value)
        blob = state.pop("_network_blob", None)
        super().__setstate__(state)
        _persistence.restore_modules(self, blob)

    def save(self, path: str | os.PathLike) -> None:
        """Save the fitted estimator to ``path`` in a format that runs no code on load.

        The file is written atomically and holds tensors and JSON text only (a ``torch.save``
        of a dict, readable with ``torch.load(path, weights_only=True)``), with the format
        version, the skscoreflow and torch versions and a checksum; load it with :meth:`load`.
        A user-defined SDE class cannot be stored as data: pickle or joblib such an estimator.
        After a distributed fit, inside its process group, only rank 0 writes: call ``save``
        on every rank or on rank 0 alone (other ranks return at once; ``barrier()`` before they
        read the file).

        Parameters
        ----------
        path : str or path-like
            File to write.
        """
        check_is_fitted(self, "network_")
        # A model trained across processes is the same on every rank: rank 0 writes it.  No
        # collective here, so calling save on rank 0 alone (the usual idiom) cannot hang.
        if getattr(self, "world_size_", 1) > 1 and _distributed.current_rank() != 0:
            return
        _persistence.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScoreFlowDensity":
        """Load an estimator written by :meth:`save` (``weights_only`` loading: no code runs).

        Anything but an intact model file (a directory, a truncated or altered file, a pickle,
        a newer format) raises a ``ValueError`` naming the problem.

        Parameters
        ----------
        path : str or path-like
            File written by :meth:`save`.

        Returns
        -------
        ScoreFlowDensity
            The fitted estimator, on the device it was saved from when available (else CPU).
        """
        return _persistence.load(cls, path)
