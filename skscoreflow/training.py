"""The training loop: Adam, warm-up, cosine decay, clipping, EMA, early stopping.

One optimisation loop (``_optimize``) trains every module of the package: the score network
(:func:`train_score_model`, the loop behind :class:`~skscoreflow.ScoreFlowDensity`, usable on
its own with any ``nn.Module`` whose ``forward(x, t)`` returns the score) and the variational
dequantizer (:func:`~skscoreflow.dequantization.train_dequantizer`).  It owns the mini-batches
(epochs of a seeded permutation), the learning-rate schedule, gradient clipping, the EMA of the
weights, validation with early stopping and the non-finite-loss guard.  All randomness comes
from the ``torch.Generator`` passed in; the global torch RNG is never used.  Training state
(optimizer, EMA weights, step count, curves) is returned in a :class:`TrainState` so that
training can be continued (``warm_start``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._loop import (  # noqa: F401 - re-exported helpers used across the package
    NonFiniteLossError,
    TrainState,
    _learning_rate_at,
    _optimize,
    _seeded_global_rng,
)
from .sde import SDE
from .weighting import _check_weighting, _sample_time, dsm_loss

__all__ = ["train_score_model", "TrainState", "NonFiniteLossError"]

# Documented (and pickled) under their public path, wherever they are defined.
for _cls in (TrainState, NonFiniteLossError):
    _cls.__module__ = __name__
del _cls


def train_score_model(
    model: nn.Module,
    X: Any,
    sde: SDE,
    *,
    weighting: str = "likelihood_is",
    eps: float | None = None,
    max_iter: int = 1000,
    batch_size: int = 512,
    learning_rate: float = 1e-3,
    warmup: int = 100,
    grad_clip: float | None = 1.0,
    ema_decay: float = 0.999,
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
    batch_transform: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    validation_fn: Callable[[nn.Module], float] | None = None,
    validation_interval: int = 200,
    early_stopping: bool = False,
    n_iter_no_change: int = 10,
    tol: float = 1e-4,
    state: TrainState | None = None,
    verbose: int = 0,
    callback: Callable[[TrainState], None] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: int = 1000,
    resume: dict[str, Any] | None = None,
    group: Any = None,
    shuffle: bool = True,
    schedule: tuple[int, int] | None = None,
) -> TrainState:
    """Train a score network with the weighted denoising score-matching loss.

    Ctrl-C ends training cleanly after the running step, like early stopping
    (``state.interrupted``; the weights of the last completed step, or the best ones with
    early stopping).

    Parameters
    ----------
    model : nn.Module
        ``model(x, t)`` returns the score; trained in place.
    X : Tensor of shape (n, d) or row source
        Training data, already on the training device and dtype (or an object with ``shape``,
        ``device`` and ``take(indices) -> Tensor``, read one batch at a time).
    sde : SDE
        The forward SDE.
    weighting : {"likelihood_is", "likelihood", "score_matching"}
        Loss weighting (see :mod:`skscoreflow.weighting`).
    eps : float, optional
        Smallest diffusion time; the SDE's default when None.
    max_iter : int
        Optimizer steps in this call.
    batch_size : int
        Rows per step (capped at ``n``); mini-batches are drawn without replacement, epoch by
        epoch, from ``generator``.
    learning_rate : float
        Peak Adam learning rate.
    warmup : int
        Linear warm-up steps, followed by cosine decay.
    grad_clip : float or None
        Global gradient-norm clipping threshold.
    ema_decay : float
        Decay of the exponential moving average of the weights (0 disables it).
    weight_decay : float
        Decoupled weight decay (AdamW); 0 gives plain Adam.
    generator : torch.Generator, optional
        Source of all randomness (a generator seeded with 0 when None).
    batch_transform : callable, optional
        ``batch_transform(batch, generator) -> batch`` applied to every mini-batch (e.g. fresh
        dequantization noise and standardisation).
    validation_fn : callable, optional
        ``validation_fn(ema_model) -> float``, higher is better; called every
        ``validation_interval`` steps and at the end.
    validation_interval : int
        Steps between validations.
    early_stopping : bool
        Stop when the validation score has not improved by ``tol`` for ``n_iter_no_change``
        validations, and restore the best EMA weights.
    n_iter_no_change : int
        Validations without improvement before stopping.
    tol : float
        Minimum improvement of the validation score.
    state : TrainState, optional
        Continue from this state (warm start) instead of creating a new optimizer and EMA.
    verbose : int
        ``> 0`` shows progress (a tqdm bar on a terminal when tqdm is installed, else lines on
        the "skscoreflow" logger) and logs validations.
    callback : callable, optional
        ``callback(state)`` after every step; raising ``KeyboardInterrupt`` from it ends
        training like Ctrl-C, any other exception propagates.
    checkpoint : callable, optional
        ``checkpoint(loop_state)`` every ``checkpoint_every`` steps and at an interrupt: a dict
        of CPU tensors and plain values (``torch.save``-able, ``weights_only``-loadable) with
        everything the loop needs to continue.
    checkpoint_every : int
        Steps between checkpoints.
    resume : dict, optional
        A ``loop_state`` from ``checkpoint``: continue that run (same data, model, generator
        device and settings); on the CPU the result equals the uninterrupted run bit for bit.
    group : object, optional
        Train data-parallel across the ranks of this process group (internal: the estimator's
        ``distributed`` parameter creates it); the result does not depend on the number of
        ranks.
    shuffle : bool
        Draw the mini-batches from a permutation of the rows each epoch; False takes them in
        order (no permutation is drawn).
    schedule : tuple of (int, int), optional
        ``(offset, total)``: follow the learning-rate schedule of a ``total``-step run from step
        ``offset`` (default ``(0, max_iter)``); steps past ``total`` keep its final rate.

    Returns
    -------
    TrainState
        The trained networks, the optimizer and the training history.

    Raises
    ------
    NonFiniteLossError
        If the loss becomes NaN or infinite.

    Examples
    --------
    >>> import torch
    >>> from skscoreflow.sde import VPSDE
    >>> from skscoreflow.nets import ScoreMLP
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(256, 2, generator=g)
    >>> net = ScoreMLP(2, VPSDE(), hidden_layer_sizes=(16,))
    >>> state = train_score_model(net, X, VPSDE(), max_iter=20, batch_size=64, generator=g)
    >>> state.n_iter, len(state.loss_curve), state.ema_model.training
    (20, 20, False)
    >>> state = train_score_model(net, X, VPSDE(), max_iter=5, batch_size=64, generator=g,
    ...                           state=state)  # continue: same optimizer and EMA
    >>> state.n_iter
    25
    """
    _check_weighting(weighting)

    def loss_fn(net: nn.Module, batch: Tensor, g: torch.Generator, rows: slice) -> Tensor:
        if batch_transform is not None:
            batch = batch_transform(batch, g)
        # Times and noise for the whole batch, in dsm_loss's order, then this process's rows:
        # a distributed fit draws exactly what a 1-process fit draws.
        t = _sample_time(sde, batch.shape[0], weighting, eps, generator=g, device=batch.device,
                         dtype=batch.dtype)
        z = torch.randn(batch.shape, generator=g, device=batch.device, dtype=batch.dtype)
        return dsm_loss(net, batch[rows], sde, weighting, eps, t=t[rows], z=z[rows])

    return _optimize(
        model,
        X,
        loss_fn,
        max_iter=max_iter,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup=warmup,
        grad_clip=grad_clip,
        ema_decay=ema_decay,
        weight_decay=weight_decay,
        generator=generator,
        validation_fn=validation_fn,
        validation_interval=validation_interval,
        early_stopping=early_stopping,
        n_iter_no_change=n_iter_no_change,
        tol=tol,
        state=state,
        verbose=verbose,
        callback=callback,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
        group=group,
        shuffle=shuffle,
        schedule=schedule,
    )
