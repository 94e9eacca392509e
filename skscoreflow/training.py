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

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .sde import SDE
from .weighting import _check_weighting, dsm_loss

__all__ = ["train_score_model", "TrainState", "NonFiniteLossError"]

logger = logging.getLogger("skscoreflow")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite.

    Raised by the training loop (:func:`train_score_model`, and the variational dequantizer's
    :func:`~skscoreflow.dequantization.train_dequantizer`) as soon as a step's loss is not finite, with the step number in the message.  Usual fixes: a
    smaller ``learning_rate``, gradient clipping, a larger ``eps``, or checking the data for
    extreme values.  It subclasses :class:`FloatingPointError`.

    Examples
    --------
    >>> import torch
    >>> from skscoreflow.sde import VPSDE
    >>> class BrokenScore(torch.nn.Module):  # a score model that outputs NaN
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = torch.nn.Parameter(torch.zeros(()))
    ...     def forward(self, x, t):
    ...         return x * float("nan") + self.w
    >>> try:
    ...     train_score_model(BrokenScore(), torch.zeros(8, 2), VPSDE(), max_iter=1)
    ... except NonFiniteLossError as exc:
    ...     print(str(exc).split(";")[0])
    training loss became nan at step 1
    """


@dataclass
class TrainState:
    """Everything needed to continue training.

    Returned by :func:`train_score_model`; pass it back as ``state=`` to continue training.

    Parameters
    ----------
    model, ema_model : nn.Module
        See Attributes.
    optimizer : torch.optim.Optimizer
        See Attributes.
    n_iter : int, default=0
        See Attributes.
    loss_curve, validation_scores, validation_iters : list, optional
        See Attributes.
    best_validation_score : float or None, default=None
        See Attributes.
    best_state : dict or None, default=None
        See Attributes.
    stopped_early : bool, default=False
        See Attributes.
    fit_time : float, default=0.0
        See Attributes.

    Attributes
    ----------
    model : nn.Module
        The trained network (raw weights).
    ema_model : nn.Module
        Exponential moving average of the weights (use this one for evaluation).
    optimizer : torch.optim.Optimizer
    n_iter : int
        Optimizer steps taken in total.
    loss_curve : list of float
        Mean training loss of each step.
    validation_scores : list of float
        Validation score (higher is better) at each validation.
    validation_iters : list of int
        Step at which each validation score was taken.
    best_validation_score : float or None
    best_state : dict or None
        EMA weights at the best validation score (when early stopping).
    stopped_early : bool
        Whether early stopping ended training before ``max_iter`` steps.
    fit_time : float
        Seconds spent in the loop.

    Examples
    --------
    >>> import copy, torch
    >>> model = torch.nn.Linear(2, 2)
    >>> state = TrainState(model, copy.deepcopy(model), torch.optim.Adam(model.parameters()))
    >>> state.n_iter, state.loss_curve, state.best_validation_score
    (0, [], None)
    """

    model: nn.Module
    ema_model: nn.Module
    optimizer: torch.optim.Optimizer
    n_iter: int = 0
    loss_curve: list[float] = field(default_factory=list)
    validation_scores: list[float] = field(default_factory=list)
    validation_iters: list[int] = field(default_factory=list)
    best_validation_score: float | None = None
    best_state: dict[str, Tensor] | None = None
    stopped_early: bool = False
    fit_time: float = 0.0


def _learning_rate_at(step: int, max_iter: int, learning_rate: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 1 % of ``learning_rate``.

    Parameters
    ----------
    step : int
        Zero-based step index.
    max_iter : int
        Total number of steps of the schedule.
    learning_rate : float
        Peak learning rate.
    warmup : int
        Number of warm-up steps.

    Returns
    -------
    float
        The learning rate at ``step``.

    Examples
    --------
    >>> [round(_learning_rate_at(s, 100, 1e-3, 10), 6) for s in (0, 9, 10, 55, 99)]
    [0.0001, 0.001, 0.001, 0.000505, 1e-05]
    """
    if warmup > 0 and step < warmup:
        return learning_rate * (step + 1) / warmup
    span = max(1, max_iter - warmup)
    progress = min(1.0, (step - warmup) / span)
    return learning_rate * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    # Fused over all tensors: one kernel launch per step on a GPU instead of one per tensor.
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    buffers = list(ema.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(model.buffers()))


@contextlib.contextmanager
def _global_rng_from(generator: torch.Generator, device: torch.device) -> Any:
    """Run a block with the global RNG of ``device`` seeded from ``generator``, then restore it.

    Modules that draw from the global RNG (``nn.Dropout``) then become reproducible from
    ``generator`` and leave the caller's global RNG untouched.  The seed is drawn from a copy
    of ``generator``, so ``generator``'s own stream (batches, times, noise) is unchanged.
    """
    probe = torch.Generator(device=generator.device)
    probe.set_state(generator.get_state())
    seed = int(torch.randint(0, 2**62, (1,), generator=probe, device=generator.device))
    with _seeded_global_rng(seed, device):
        yield


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with the global CPU RNG (and ``device``'s CUDA RNG) seeded with ``seed``.

    Only those generators are touched, and both are restored afterwards, so the caller's
    global random state is unchanged (``torch.manual_seed`` would also reseed every other
    accelerator generator).

    Parameters
    ----------
    seed : int
        Seed of the block's global generators.
    device : torch.device
        A CUDA device also gets its global generator seeded (and restored).

    Yields
    ------
    None
        The block runs with the seeded generators.

    Examples
    --------
    >>> import torch
    >>> before = torch.random.get_rng_state()
    >>> with _seeded_global_rng(0, torch.device("cpu")):
    ...     a = torch.rand(2)
    >>> with _seeded_global_rng(0, torch.device("cpu")):
    ...     b = torch.rand(2)
    >>> bool(torch.equal(a, b)), bool(torch.equal(before, torch.random.get_rng_state()))
    (True, True)
    """
    cuda = device.type == "cuda"
    index = device.index
    if cuda and index is None:
        index = torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _progress(total: int, verbose: int, name: str) -> Any:
    if verbose <= 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - optional dependency
        return None
    return tqdm(total=total, desc=f"skscoreflow {name}", leave=False)


def _optimize(
    model: nn.Module,
    X: Tensor,
    loss_fn: Callable[[nn.Module, Tensor, torch.Generator], Tensor],
    *,
    max_iter: int,
    batch_size: int,
    learning_rate: float,
    warmup: int,
    grad_clip: float | None = 1.0,
    ema_decay: float = 0.999,
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
    validation_fn: Callable[[nn.Module], float] | None = None,
    validation_interval: int = 200,
    early_stopping: bool = False,
    n_iter_no_change: int = 10,
    tol: float = 1e-4,
    state: TrainState | None = None,
    verbose: int = 0,
    name: str = "training",
) -> TrainState:
    """The one optimisation loop: ``max_iter`` steps of ``loss_fn(model, batch, generator)``.

    Mini-batches are drawn without replacement, epoch by epoch, from a permutation of the rows
    drawn from ``generator``; ``loss_fn`` draws its own noise from the same generator, so a
    seeded generator makes the whole run reproducible.  Modules drawing from the global RNG
    (``nn.Dropout``) run under a global RNG seeded from (a copy of) ``generator`` and restored
    afterwards.  See :func:`train_score_model` for the other parameters.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    n = X.shape[0]
    if n < 1:
        raise ValueError("cannot train on an empty data set")
    batch_size = min(int(batch_size), n)
    if generator is None:
        generator = torch.Generator(device=X.device).manual_seed(0)
    if early_stopping and validation_fn is None:
        raise ValueError("early_stopping needs a validation_fn")

    if state is None:
        opt_cls = torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
        kwargs = {"weight_decay": weight_decay} if weight_decay > 0 else {}
        optimizer = opt_cls(model.parameters(), lr=learning_rate, **kwargs)
        ema_model = copy.deepcopy(model)
        for p in ema_model.parameters():
            p.requires_grad_(False)
        state = TrainState(model=model, ema_model=ema_model, optimizer=optimizer)
    optimizer = state.optimizer
    ema_model = state.ema_model

    start = time.perf_counter()
    bar = _progress(max_iter, verbose, name)
    perm = torch.randperm(n, generator=generator, device=X.device)
    pos = 0
    no_improve = 0
    model.train()
    try:
        with _global_rng_from(generator, X.device):
            for it in range(max_iter):
                if pos + batch_size > n:
                    perm = torch.randperm(n, generator=generator, device=X.device)
                    pos = 0
                batch = X[perm[pos : pos + batch_size]]
                pos += batch_size

                lr = _learning_rate_at(it, max_iter, learning_rate, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = loss_fn(model, batch, generator)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"{name} loss became {loss.item()} at step {state.n_iter + 1}; try a "
                        "smaller learning_rate, gradient clipping, or a larger eps"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None and grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                # Early in training a plain average is better than a long EMA (warm-up of the
                # decay, as in many diffusion codebases).
                decay = min(ema_decay, (1 + state.n_iter) / (10 + state.n_iter))
                _ema_update(ema_model, model, decay)
                state.n_iter += 1
                state.loss_curve.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
                    if it % 50 == 0:
                        bar.set_postfix(loss=f"{state.loss_curve[-1]:.4f}")

                last = it == max_iter - 1
                if validation_fn is not None and ((it + 1) % validation_interval == 0 or last):
                    ema_model.eval()
                    score = float(validation_fn(ema_model))
                    state.validation_scores.append(score)
                    state.validation_iters.append(state.n_iter)
                    if verbose > 0:
                        logger.info("step %d: validation score %.5f", state.n_iter, score)
                    best = state.best_validation_score
                    if best is None or score > best + tol:
                        state.best_validation_score = score
                        state.best_state = copy.deepcopy(ema_model.state_dict())
                        no_improve = 0
                    else:
                        no_improve += 1
                    if early_stopping and no_improve >= n_iter_no_change:
                        state.stopped_early = True
                        break
    finally:
        if bar is not None:
            bar.close()
    if early_stopping and state.best_state is not None:
        ema_model.load_state_dict(state.best_state)
    ema_model.eval()
    state.fit_time += time.perf_counter() - start
    return state


def train_score_model(
    model: nn.Module,
    X: Tensor,
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
) -> TrainState:
    """Train a score network with the weighted denoising score-matching loss.

    Parameters
    ----------
    model : nn.Module
        ``model(x, t)`` returns the score; trained in place.
    X : Tensor of shape (n, d)
        Training data, already on the training device and dtype.
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
        ``> 0`` shows a progress bar (tqdm, when installed) and logs validations.

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

    def loss_fn(net: nn.Module, batch: Tensor, g: torch.Generator) -> Tensor:
        if batch_transform is not None:
            batch = batch_transform(batch, g)
        return dsm_loss(net, batch, sde, weighting, eps, generator=g).mean()

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
    )
