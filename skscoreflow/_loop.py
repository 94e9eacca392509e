"""The one optimisation loop behind every trained module of the package.

``_optimize`` runs ``max_iter`` steps of a loss on mini-batches: epochs of a seeded
permutation, linear warm-up then cosine decay, gradient clipping, a fused EMA of the weights,
validation with early stopping, a non-finite-loss guard, checkpoints of the whole loop state
(weights, EMA, optimizer, RNG streams, batch position, curves) and clean interruption.  The
public entry points are :func:`skscoreflow.training.train_score_model` and
:func:`skscoreflow.dequantization.train_dequantizer`.
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

__all__ = ["NonFiniteLossError", "TrainState"]

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
    >>> from skscoreflow.training import train_score_model
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
    interrupted : bool, default=False
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
    interrupted : bool
        Whether an interrupt (Ctrl-C, ``KeyboardInterrupt``) ended training early; the weights
        are those of the last completed step (the best ones with early stopping).
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
    interrupted: bool = False
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
def _global_rng_from(generator: torch.Generator, device: torch.device, rank: int = 0) -> Any:
    """Run a block with the global RNG of ``device`` seeded from ``generator``, then restore it.

    Modules that draw from the global RNG (``nn.Dropout``) then become reproducible from
    ``generator`` and leave the caller's global RNG untouched.  The seed is drawn from a copy
    of ``generator``, so ``generator``'s own stream (batches, times, noise) is unchanged; each
    rank of a distributed fit offsets it by its rank (its rows get their own dropout masks).
    """
    probe = torch.Generator(device=generator.device)
    probe.set_state(generator.get_state())
    seed = int(torch.randint(0, 2**62, (1,), generator=probe, device=generator.device)) + rank
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


def _say(message: str) -> None:
    """A progress line: to the "skscoreflow" logger when anything handles it, else stderr."""
    import sys

    log = logger
    while log is not None:
        if any(not isinstance(h, logging.NullHandler) for h in log.handlers):
            logger.info(message)
            return
        log = log.parent if log.propagate else None
    print(f"skscoreflow: {message}", file=sys.stderr, flush=True)


def _tqdm_wanted() -> bool:
    """A tqdm bar where it renders: a terminal, or a notebook (whose stderr is no terminal)."""
    import sys

    return sys.stderr.isatty() or "ipykernel" in sys.modules


class _Progress:
    """Progress of a training run: a tqdm bar on a terminal or in a notebook, else lines.

    Lines (step, loss, elapsed time and an estimate of the time left, at most every
    ``interval`` seconds) go to the "skscoreflow" logger when it has a handler (the command
    line installs one), else to stderr.
    """

    def __init__(self, total: int, verbose: int, name: str, start: int = 0,
                 interval: float = 10.0) -> None:
        self.total, self.name, self.interval = total, name, interval
        self.bar = None
        self.enabled = verbose > 0
        self.t0 = self.last = time.perf_counter()
        self.start = start
        if not self.enabled or not _tqdm_wanted():
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:  # optional dependency: fall back to lines
            return
        self.bar = tqdm(total=total, initial=start, desc=f"skscoreflow {name}", leave=False)

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if step % 50 == 0:
                self.bar.set_postfix(loss=f"{loss:.4f}")
            return
        now = time.perf_counter()
        if now - self.last < self.interval and step != self.total:
            return
        self.last = now
        elapsed = now - self.t0
        rate = (step - self.start) / max(elapsed, 1e-9)
        left = (self.total - step) / rate if rate > 0 else math.inf
        _say(
            f"{self.name}: step {step}/{self.total} ({100 * step // self.total}%), loss "
            f"{loss:.4f}, {_duration(elapsed)} elapsed, ~{_duration(left)} left"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class _Interrupts:
    """Ctrl-C (SIGINT) held to safe points, shared by nested blocks (a fit and its loops)."""

    depth = 0
    pending = False
    previous: Any = None


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[Callable[[bool], bool]]:
    """Hold Ctrl-C until the running training step (or fit phase) has finished.

    Yields ``pending(consume=False)``: whether an interrupt arrived (``consume`` clears it,
    for the block that acts on it).  A second Ctrl-C interrupts at once.  The outermost block
    installs the handler and restores the previous one; nested blocks share it, so an
    interrupt between two loops of one fit is not lost.  Nothing is installed outside the main
    thread (a ``KeyboardInterrupt`` then arrives where it is raised) or where SIGINT is ignored.
    """
    import signal
    import threading

    def pending(consume: bool = False) -> bool:
        hit = _Interrupts.pending
        if consume:
            _Interrupts.pending = False
        return hit

    if _Interrupts.depth == 0:
        if threading.current_thread() is not threading.main_thread():
            yield lambda consume=False: False
            return
        previous = signal.getsignal(signal.SIGINT)
        if previous is signal.SIG_IGN:  # e.g. a background job: Ctrl-C is not ours to take
            yield lambda consume=False: False
            return

        def handler(signum: int, frame: Any) -> None:
            if _Interrupts.pending:
                raise KeyboardInterrupt
            _Interrupts.pending = True

        # None: a handler installed outside Python; restore the default afterwards.
        _Interrupts.previous = signal.default_int_handler if previous is None else previous
        _Interrupts.pending = False
        signal.signal(signal.SIGINT, handler)
    _Interrupts.depth += 1
    try:
        yield pending
    finally:
        _Interrupts.depth -= 1
        if _Interrupts.depth == 0:
            signal.signal(signal.SIGINT, _Interrupts.previous)


def _cpu_copy(obj: Any) -> Any:
    """Detached CPU copies of every tensor in a nested dict / list / tuple."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def _global_rng_states(device: torch.device) -> dict[str, Tensor]:
    states = {"cpu": torch.random.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_global_rng_states(states: dict[str, Tensor], device: torch.device) -> None:
    torch.random.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _take(X: Any, idx: Tensor) -> Tensor:
    """Rows ``idx`` of the training data: a tensor, or a row source read batch by batch."""
    return X[idx] if isinstance(X, Tensor) else X.take(idx)


def _optimize(
    model: nn.Module,
    X: Any,
    loss_fn: Callable[[nn.Module, Tensor, torch.Generator, slice], Tensor],
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
    callback: Callable[[TrainState], None] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: int = 1000,
    resume: dict[str, Any] | None = None,
    group: Any = None,
    shard: bool = True,
    shuffle: bool = True,
    schedule: tuple[int, int] | None = None,
) -> TrainState:
    """The one optimisation loop: ``max_iter`` steps of ``loss_fn(model, batch, generator, rows)``.

    Mini-batches are drawn without replacement, epoch by epoch, from a permutation of the rows
    drawn from ``generator``; ``loss_fn`` draws its own noise from the same generator, for the
    whole batch, and returns the per-row losses of the rows ``rows`` of the batch, so a seeded
    generator makes the whole run reproducible.  ``X`` is a tensor or a row source with
    ``shape`` and ``take(indices)`` (out-of-core data, read one batch at a time).

    With a process ``group`` (:mod:`skscoreflow._distributed`) every rank draws the same batches
    and noise; ``shard=True`` trains data-parallel (DDP; rank ``r`` computes rows ``r::W`` of the
    global batch and the gradients are averaged), ``shard=False`` replicates the computation on
    every rank (rank 0's weights are broadcast at the end).  Either way the run does not depend
    on the number of ranks, and every rank stops at the same step (losses, interrupts and
    validation scores are agreed through collectives); only the caller decides who logs and
    writes checkpoints.

    ``shuffle=False`` takes the rows in order (no permutation is drawn); ``schedule=(offset,
    total)`` evaluates the learning-rate schedule of a ``total``-step run from step ``offset``
    (``partial_fit``: one schedule across calls).  Modules drawing from the global RNG
    (``nn.Dropout``) run under a global RNG seeded from (a copy of) ``generator`` and restored
    afterwards.

    ``checkpoint(loop_state)`` is called every ``checkpoint_every`` steps and at an interrupt
    with everything the loop needs to continue (CPU copies: weights, EMA, optimizer, RNG
    streams, batch position, curves, validation state); ``resume=loop_state`` continues from
    it, bit for bit on the CPU.  Ctrl-C is held until the running step has finished, then ends
    training like early stopping does (``state.interrupted``); ``callback(state)`` runs after
    every step.  See :func:`~skscoreflow.training.train_score_model` for the other parameters.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    n = X.shape[0]
    if n < 1:
        raise ValueError("cannot train on an empty data set")
    batch_size = min(int(batch_size), n)
    device = X.device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    world = 1 if group is None else group.world_size
    rank = 0 if group is None else group.rank
    sharded = group is not None and shard
    if sharded and batch_size < world:
        raise ValueError(
            f"distributed fit: batch_size={batch_size} (the global batch) is smaller than the "
            f"{world} processes; every process needs at least one row per step"
        )
    rows = slice(rank, None, world) if sharded else slice(None)
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
    # Flags of this run (a continued state may carry them from an earlier one).
    state.interrupted = state.stopped_early = False

    first, no_improve, pos = 0, 0, 0
    def permutation() -> Tensor:
        if not shuffle:
            return torch.arange(n, device=device)
        return torch.randperm(n, generator=generator, device=device)

    offset, total = (0, max_iter) if schedule is None else schedule
    perm = permutation()
    if resume is not None:
        if resume["max_iter"] != max_iter or resume["n_rows"] != n:
            raise ValueError(
                f"cannot resume: the checkpoint is of a {resume['max_iter']}-step run on "
                f"{resume['n_rows']} rows, not {max_iter} steps on {n} rows"
            )
        first, no_improve, pos = resume["step"], resume["no_improve"], resume["pos"]
        perm = resume["perm"].to(device)
        generator.set_state(resume["generator"])
        model.load_state_dict(resume["model"])
        ema_model.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        for key in ("n_iter", "best_validation_score", "best_state", "fit_time"):
            setattr(state, key, resume[key])
        for key in ("loss_curve", "validation_scores", "validation_iters"):
            setattr(state, key, list(resume[key]))

    start = time.perf_counter()
    fit_time0 = state.fit_time

    def loop_state(step: int) -> dict[str, Any]:
        return _cpu_copy({
            "step": step, "max_iter": max_iter, "n_rows": n, "perm": perm, "pos": pos,
            "no_improve": no_improve, "generator": generator.get_state(),
            "global_rng": _global_rng_states(device), "model": model.state_dict(),
            "ema": ema_model.state_dict(), "optimizer": optimizer.state_dict(),
            "n_iter": state.n_iter, "loss_curve": list(state.loss_curve),
            "validation_scores": list(state.validation_scores),
            "validation_iters": list(state.validation_iters),
            "best_validation_score": state.best_validation_score,
            "best_state": state.best_state,
            "fit_time": fit_time0 + time.perf_counter() - start,
        })

    def validate() -> bool:
        """Score the EMA weights on the validation rows; whether early stopping stops now."""
        nonlocal no_improve
        ema_model.eval()
        score = float(validation_fn(ema_model))
        if group is not None:  # one decision for all ranks: rank 0's score
            score = float(group.broadcast_object(score))
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
        return early_stopping and no_improve >= n_iter_no_change

    if validation_fn is not None and resume is None and state.n_iter == 0:
        # The untrained model is the first candidate (for the score networks, their Gaussian
        # reference): early stopping never keeps weights that score worse on the validation
        # rows than the start.  The validation draws its own seeded randomness, so the
        # training stream is unchanged.
        validate()
    progress = _Progress(max_iter, verbose, name, start=first)
    # The training forward passes go through DDP (wrapped after any resumed weights are in);
    # everything else uses the plain module.
    train_model = group.wrap(model) if sharded else model
    train_model.train()
    try:
        with _global_rng_from(generator, device, rank), _deferred_interrupt() as interrupt_pending:
            if resume is not None:
                # Dropout's global stream, exactly where the interrupted run left it.
                _set_global_rng_states(resume["global_rng"], device)
            completed = first  # steps of this run whose updates are all done
            for it in range(first, max_iter):
                try:
                    if pos + batch_size > n:
                        perm = permutation()
                        pos = 0
                    batch = _take(X, perm[pos : pos + batch_size])
                    pos += batch_size

                    lr = _learning_rate_at(offset + it, total, learning_rate, warmup)
                    for param_group in optimizer.param_groups:
                        param_group["lr"] = lr
                    per_row = loss_fn(train_model, batch, generator, rows)
                    stop_now = False
                    if group is None:
                        loss = per_row.mean()
                        value = loss.detach()
                    else:
                        # DDP averages the ranks' gradients: scaling each rank's sum by W / B
                        # makes that average the gradient of the global batch mean.
                        loss = per_row.sum() * (world / batch_size) if sharded else per_row.mean()
                        if sharded:
                            local = per_row.detach().sum() / batch_size
                        else:
                            local = loss.detach() / world
                        held = torch.tensor(float(interrupt_pending()), dtype=torch.float64)
                        agreed = group.all_reduce_sum(torch.stack([local.double().cpu(), held]))
                        value, stop_now = agreed[0], bool(agreed[1] > 0)
                    if not torch.isfinite(value):
                        raise NonFiniteLossError(
                            f"{name} loss became {value.item()} at step {state.n_iter + 1}; try a "
                            "smaller learning_rate, gradient clipping, or a larger eps"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if grad_clip is not None and grad_clip > 0:
                        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                    optimizer.step()
                    # Early in training a plain average is better than a long EMA (warm-up of
                    # the decay, as in many diffusion codebases).
                    decay = min(ema_decay, (1 + state.n_iter) / (10 + state.n_iter))
                    _ema_update(ema_model, model, decay)
                    state.n_iter += 1
                    state.loss_curve.append(float(value))
                    progress.update(it + 1, state.loss_curve[-1])

                    last = it == max_iter - 1
                    if validation_fn is not None and ((it + 1) % validation_interval == 0 or last):
                        if validate():
                            state.stopped_early = True
                            break
                    completed = it + 1
                    if callback is not None:
                        callback(state)
                    # Distributed: only an interrupt every rank agreed on at this step counts
                    # (a rank stopping alone would hang the others' next collective).
                    if (interrupt_pending(consume=True) if group is None else stop_now):
                        interrupt_pending(consume=True)
                        raise KeyboardInterrupt
                    if checkpoint is not None and (it + 1) % checkpoint_every == 0 and not last:
                        checkpoint(loop_state(it + 1))
                except KeyboardInterrupt:
                    state.interrupted = True
                    # After a completed step (Ctrl-C is held until the step ends; a callback may
                    # raise it too) the loop state is consistent and can be resumed from.  An
                    # interrupt inside a step (outside the main thread) keeps the last periodic
                    # checkpoint instead.
                    if checkpoint is not None and completed == it + 1:
                        checkpoint(loop_state(completed))
                    break
            if group is None and interrupt_pending(consume=True):  # held through the last step
                state.interrupted = True
    finally:
        progress.close()
        del train_model  # the DDP wrapper holds the process group: never let it outlive fit
    if early_stopping and state.best_state is not None:
        ema_model.load_state_dict(state.best_state)
    if group is not None and not sharded:
        # Replicated training is identical on every rank up to non-deterministic kernels:
        # rank 0's weights make it exact.
        group.broadcast_module(model)
        group.broadcast_module(ema_model)
    ema_model.eval()
    state.fit_time = fit_time0 + time.perf_counter() - start
    return state
