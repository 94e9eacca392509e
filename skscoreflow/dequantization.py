"""Dequantization of integer-valued data: uniform and variational (Flow++-style).

A continuous density ``p`` on ``x + u`` (``x`` integer, ``u in [0, 1)^d``) gives a lower bound on
the probability of the discrete value ``P(X = x)`` for any ``q(u | x)`` on the unit cube:

    log P(x) >= E_{u ~ q(.|x)}[log p(x + u) - log q(u | x)],

and, with ``K`` samples, the tighter importance-weighted bound
``E[log (1/K) sum_k p(x + u_k) / q(u_k | x)]`` (Burda et al. 2016).  Uniform dequantization is
``q = U[0, 1)^d`` (``log q = 0``); variational dequantization learns ``q_phi(u | x)`` (Ho et al.
2019, "Flow++"; used by ScoreFlow) after the score model, with the score model frozen, by
minimising ``E_q[L(x + u) + log q_phi(u | x)]`` where ``L`` is the DSM bound on ``-log p``.

:class:`VariationalDequantizer` is a conditional flow: logistic base noise, an
``x``-conditioned elementwise affine layer, alternating affine coupling layers conditioned on
``x``, and a final sigmoid onto ``(0, 1)^d``.  With the logistic base, zero-initialised
conditioners make the untrained flow exactly uniform, so training starts from uniform
dequantization.

Examples
--------
>>> import torch
>>> deq = VariationalDequantizer(3)
>>> x = torch.randint(0, 5, (4, 3)).double()
>>> u, log_q = deq.to(torch.float64).sample(x, generator=torch.Generator().manual_seed(0))
>>> bool(((u > 0) & (u < 1)).all()), bool(log_q.abs().max() < 1e-6)  # untrained: uniform
(True, True)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .bound import nll_bound_estimate
from .sde import SDE
from .training import TrainState, _optimize, _seeded_global_rng

__all__ = ["VariationalDequantizer", "train_dequantizer", "dequantized_log_prob"]

#: Values accepted by ``ScoreFlowDensity(dequantization=...)``.
_DEQUANTIZATIONS = (None, "uniform", "variational")


def _check_integer_valued(X: Any, feature_names: Sequence[str] | None = None) -> None:
    """Raise a ``ValueError`` naming the first column of ``X`` holding a non-integer value.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Data to check (values within 1e-9 of an integer pass).
    feature_names : sequence of str, optional
        Column names used in the message.

    Raises
    ------
    ValueError
        If any value is not an integer.

    Examples
    --------
    >>> import numpy as np
    >>> _check_integer_valued(np.array([[0, 3], [16, 2]]))  # passes silently
    >>> _check_integer_valued(np.array([[0, 3], [16, 2.5]]), feature_names=["a", "b"])
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: dequantization needs integer-valued data, but column 'b' holds the non-integer value ...2.5... (row 1)
    """
    import numpy as np

    X = np.asarray(X)
    bad = ~np.isclose(X, np.round(X), rtol=0, atol=1e-9)
    if bad.any():
        col = int(np.argmax(bad.any(axis=0)))
        row = int(np.argmax(bad[:, col]))
        name = (
            repr(str(feature_names[col])) if feature_names is not None else f"{col}"
        )
        raise ValueError(
            f"dequantization needs integer-valued data, but column {name} holds the "
            f"non-integer value {X[row, col]!r} (row {row})"
        )


def _uniform_dequantize(x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Uniform dequantization noise: ``u ~ U[0, 1)^d`` and ``log q(u | x) = 0``.

    Parameters
    ----------
    x : Tensor of shape (n, d)
        Integer-valued data (as floats); only its shape, dtype and device are used.
    generator : torch.Generator, optional
        Source of randomness.

    Returns
    -------
    u : Tensor of shape (n, d)
        The noise, to be added to ``x``.
    log_q : Tensor of shape (n,)
        Zeros.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[0.0, 3.0], [16.0, 2.0]])
    >>> u, log_q = _uniform_dequantize(x, torch.Generator().manual_seed(0))
    >>> bool(((u >= 0) & (u < 1)).all()), log_q.tolist()
    (True, [0.0, 0.0])
    """
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return u, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


def _mlp(n_in: int, sizes: Sequence[int], n_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = n_in
    for h in sizes:
        layers += [nn.Linear(prev, h), nn.SiLU()]
        prev = h
    last = nn.Linear(prev, n_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


class VariationalDequantizer(nn.Module):
    """Conditional flow ``q_phi(u | x)`` on ``(0, 1)^d``.

    Parameters
    ----------
    n_features : int
        Data dimension ``d``.
    hidden_layer_sizes : sequence of int
        Widths of each conditioner MLP.
    n_couplings : int
        Number of affine coupling layers (masks alternate between even and odd features).
    max_log_scale : float
        Bound on the coupling log-scales (``tanh``-squashed), for stability.

    Notes
    -----
    ``x`` is passed in already standardised (the conditioning only needs a well-scaled input).

    Examples
    --------
    >>> import torch
    >>> deq = VariationalDequantizer(3, hidden_layer_sizes=(16,), n_couplings=2)
    >>> x = torch.randint(0, 5, (4, 3)).float()
    >>> u, log_q = deq.sample(x, generator=torch.Generator().manual_seed(0))
    >>> u.shape, log_q.shape
    (torch.Size([4, 3]), torch.Size([4]))
    """

    def __init__(
        self,
        n_features: int,
        hidden_layer_sizes: Sequence[int] = (64, 64),
        n_couplings: int = 4,
        max_log_scale: float = 3.0,
    ) -> None:
        super().__init__()
        if n_couplings < 0:
            raise ValueError(f"n_couplings must be >= 0, got {n_couplings}")
        self.n_features = int(n_features)
        self.hidden_layer_sizes = tuple(int(h) for h in hidden_layer_sizes)
        self.n_couplings = int(n_couplings)
        self.max_log_scale = float(max_log_scale)
        d = self.n_features
        self.base = _mlp(d, self.hidden_layer_sizes, 2 * d)
        masks = []
        for i in range(self.n_couplings):
            m = (torch.arange(d) % 2 == i % 2).to(torch.get_default_dtype())
            if d == 1:
                m = torch.zeros(1)  # nothing to condition on but x
            masks.append(m)
        self.register_buffer(
            "masks", torch.stack(masks) if masks else torch.zeros(0, d), persistent=False
        )
        self.couplings = nn.ModuleList(
            _mlp(2 * d, self.hidden_layer_sizes, 2 * d) for _ in range(self.n_couplings)
        )

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable) to rebuild this flow.

        Returns
        -------
        dict
            Keyword arguments of :class:`VariationalDequantizer`.
        """
        return {
            "n_features": self.n_features,
            "hidden_layer_sizes": list(self.hidden_layer_sizes),
            "n_couplings": self.n_couplings,
            "max_log_scale": self.max_log_scale,
        }

    def _affine(self, params: Tensor) -> tuple[Tensor, Tensor]:
        log_s, b = params.chunk(2, dim=-1)
        return self.max_log_scale * torch.tanh(log_s / self.max_log_scale), b

    def sample(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``u ~ q(u | x)`` (reparameterised) and return ``(u, log q(u | x))``.

        Parameters
        ----------
        x : Tensor of shape (n, d)
            Conditioning input (the standardised integer rows).
        generator : torch.Generator, optional
            Source of the base noise.

        Returns
        -------
        u : Tensor of shape (n, d)
            Dequantization noise in ``(0, 1)^d``; differentiable in the flow's parameters.
        log_q : Tensor of shape (n,)
            ``log q(u | x)``.
        """
        v = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        v = v.clamp(1e-6, 1 - 1e-6)
        h = torch.log(v) - torch.log1p(-v)  # logistic base noise
        # log density of the standard logistic: -h - 2 softplus(-h)
        log_q = (-h - 2 * nn.functional.softplus(-h)).sum(-1)
        log_s, b = self._affine(self.base(x))
        h = h * torch.exp(log_s) + b
        log_q = log_q - log_s.sum(-1)
        for mask, net in zip(self.masks, self.couplings):
            mask = mask.to(x.dtype)
            log_s, b = self._affine(net(torch.cat([h * mask, x], dim=-1)))
            log_s = log_s * (1 - mask)
            h = h * mask + (1 - mask) * (h * torch.exp(log_s) + b)
            log_q = log_q - log_s.sum(-1)
        u = torch.sigmoid(h)
        # log |du/dh| = log sigmoid(h) + log sigmoid(-h)
        log_q = log_q + (nn.functional.softplus(-h) + nn.functional.softplus(h)).sum(-1)
        return u, log_q


def train_dequantizer(
    dequantizer: VariationalDequantizer,
    X: Tensor,
    nll_fn: Callable[[Tensor, Tensor, torch.Generator], Tensor],
    *,
    condition: Callable[[Tensor], Tensor] | None = None,
    max_iter: int = 1000,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    warmup: int | None = None,
    ema_decay: float = 0.99,
    grad_clip: float = 1.0,
    generator: torch.Generator | None = None,
    state: TrainState | None = None,
    verbose: int = 0,
    callback: Callable[[TrainState], None] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: int = 1000,
    resume: dict[str, Any] | None = None,
    group: Any = None,
    schedule: tuple[int, int] | None = None,
) -> TrainState:
    """Train ``q_phi(u | x)`` with the score model frozen (ScoreFlow's sequential schedule).

    The loss of a step is the batch mean of ``L(x + u) + log q(u | x)`` with ``u ~ q(. | x)``
    (reparameterised), an upper bound on ``-log P(x)``.  It runs in the package's one training
    loop (the one behind :func:`~skscoreflow.training.train_score_model`): mini-batches drawn
    epoch by epoch, linear warm-up then cosine decay, gradient clipping, an EMA of the weights
    and the non-finite-loss guard, with the same checkpoints, resume and clean interruption.

    Parameters
    ----------
    dequantizer : VariationalDequantizer
        The flow to train (in place).
    X : Tensor of shape (n, d)
        Integer-valued training data (as floats).
    nll_fn : callable
        ``nll_fn(x, u, generator) -> (n,)``: a differentiable (in ``u``) stochastic estimate of
        the bound ``L(x + u)`` on ``-log p(x + u)``, e.g. from
        :func:`~skscoreflow.bound.nll_bound_estimate`.
    condition : callable, optional
        Maps ``x`` to the dequantizer's conditioning input (e.g. standardisation).
    max_iter : int
        Optimizer steps.
    batch_size : int
        Rows per step (capped at ``n``).
    learning_rate : float
        Peak Adam learning rate.
    warmup : int, optional
        Linear warm-up steps; ``min(100, max_iter // 10)`` when None.
    ema_decay : float
        Decay of the exponential moving average of the weights.
    grad_clip : float
        Global gradient-norm clipping threshold.
    generator : torch.Generator, optional
        Source of mini-batches and noise (seeded with 0 when None).
    state : TrainState, optional
        Continue from this state instead of creating a new optimizer and EMA.
    verbose : int
        ``> 0`` shows progress.
    callback : callable, optional
        ``callback(state)`` after every step (as for
        :func:`~skscoreflow.training.train_score_model`).
    checkpoint : callable, optional
        ``checkpoint(loop_state)`` every ``checkpoint_every`` steps and at an interrupt.
    checkpoint_every : int
        Steps between checkpoints.
    resume : dict, optional
        A ``loop_state`` from ``checkpoint`` to continue from.
    group : object, optional
        A process group (internal, from the estimator's ``distributed`` parameter): the
        training is replicated on every rank, which all end with rank 0's weights.
    schedule : tuple of (int, int), optional
        ``(offset, total)`` of the learning-rate schedule (see
        :func:`~skscoreflow.training.train_score_model`).

    Returns
    -------
    TrainState
        ``ema_model`` is the EMA of the trained flow (in evaluation mode); ``loss_curve`` the
        per-step loss (nats per row).

    Raises
    ------
    NonFiniteLossError
        If the loss becomes NaN or infinite.

    Examples
    --------
    >>> import torch
    >>> from skscoreflow.bound import nll_bound_estimate
    >>> from skscoreflow.sde import VPSDE
    >>> X = torch.randint(0, 3, (64, 2)).double()
    >>> def nll_fn(x, u, g):  # bound on -log p(x + u) under a fixed N(1.5, I) "model"
    ...     return nll_bound_estimate(lambda y, t: -y, x + u - 1.5, VPSDE(), generator=g)
    >>> deq = VariationalDequantizer(2, (8,), 1).double()
    >>> state = train_dequantizer(deq, X, nll_fn, max_iter=5, batch_size=16)
    >>> len(state.loss_curve), state.ema_model.training
    (5, False)
    """

    def loss_fn(flow: nn.Module, x: Tensor, g: torch.Generator, rows: slice) -> Tensor:
        # Never sharded (rows is the whole batch): a distributed fit replicates this phase.
        u, log_q = flow.sample(condition(x) if condition else x, g)
        return nll_fn(x, u, g) + log_q

    return _optimize(
        dequantizer,
        X,
        loss_fn,
        max_iter=max_iter,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup=min(100, max_iter // 10) if warmup is None else warmup,
        grad_clip=grad_clip,
        ema_decay=ema_decay,
        generator=generator,
        state=state,
        verbose=verbose,
        name="dequantizer",
        callback=callback,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
        group=group,
        shard=False,
        schedule=schedule,
    )


def dequantized_log_prob(
    log_density: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    n_samples: int = 1,
    dequantizer: VariationalDequantizer | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    importance_weighted: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Lower bound on ``log P(X = x)`` of integer rows from a density on ``x + u``.

    Draws ``K = n_samples`` dequantizations ``u_k ~ q(u | x)`` (uniform, or the variational
    ``dequantizer``) and combines ``w_k = log p(x + u_k) - log q(u_k | x)``:

    * ``importance_weighted=True``: ``log (1/K) sum_k exp(w_k)``, the importance-weighted bound
      (tighter as ``K`` grows; ``K = 1`` is the ELBO).  Valid only when ``log_density`` is the
      log-density itself: exponentiating a noisy *estimate* (a Monte-Carlo bound, a Hutchinson
      divergence) biases the average upwards (Jensen), possibly above ``log P(x)``.
    * ``importance_weighted=False``: ``(1/K) sum_k w_k``, the ELBO averaged over ``K`` draws.
      Use it when ``log_density`` is an unbiased estimate of a lower bound on ``log p``: the
      result is then an unbiased estimate of a lower bound on ``log P(x)``.

    Parameters
    ----------
    log_density : callable
        ``log_density(y) -> (n,)``: ``log p`` at ``y = transform(x + u)`` in the model's units.
    x : Tensor of shape (n, d)
        Integer-valued rows (as floats).
    n_samples : int, default=1
        Dequantization draws ``K`` per row.
    dequantizer : VariationalDequantizer, optional
        ``q(u | x)``, conditioned on ``transform(x)``; uniform dequantization when None.
    transform : callable, optional
        Maps data units to the model's units (e.g. standardisation); its log-determinant is
        not included.
    importance_weighted : bool, default=True
        Combine the draws by log-mean-exp (True) or by their mean (False), see above.
    generator : torch.Generator, optional
        Source of the dequantization noise.

    Returns
    -------
    Tensor of shape (n,)
        float64, in nats, on ``x``'s device.

    Examples
    --------
    >>> import math, torch
    >>> x = torch.zeros(3, 1, dtype=torch.float64)
    >>> log_p = lambda y: torch.zeros(y.shape[0], dtype=y.dtype)  # U[0, 1) on the cube
    >>> dequantized_log_prob(log_p, x, n_samples=4).tolist()  # P(x = 0) = 1
    [0.0, 0.0, 0.0]
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    transform = transform if transform is not None else (lambda y: y)
    terms = []
    for _ in range(int(n_samples)):
        with torch.no_grad():
            if dequantizer is None:
                u, log_q = _uniform_dequantize(x, generator)
            else:
                u, log_q = dequantizer.sample(transform(x), generator)
        ll = log_density(transform(x + u))
        terms.append((ll.detach() - log_q).double())
    stacked = torch.stack(terms)
    if importance_weighted:
        return torch.logsumexp(stacked, 0) - math.log(stacked.shape[0])
    return stacked.mean(0)


def _fit_to_score_model(
    score_fn: Callable[[Tensor, Tensor], Tensor],
    sde: SDE,
    eps: float,
    transform: Callable[[Tensor], Tensor],
    X: Tensor,
    *,
    hidden_layer_sizes: Sequence[int],
    n_couplings: int,
    max_iter: int,
    seed: int,
    verbose: int = 0,
    state: TrainState | None = None,
    generator: torch.Generator | None = None,
    **loop_kwargs: Any,
) -> TrainState:
    """Build and train ``q(u | x)`` for integer rows ``X`` against a frozen score model.

    ScoreFlow's sequential schedule: the score model (in the units ``transform`` maps to) is
    trained first and stays fixed; the flow minimises ``E_q[L(x + u) + log q(u | x)]`` with
    ``L`` the one-sample bound of :func:`~skscoreflow.bound.nll_bound_estimate`.  ``seed``
    seeds the flow's initialisation and its training; the caller's global RNG is untouched.
    ``state`` continues an earlier run (``partial_fit``), with noise from ``generator``.
    """
    if state is not None:
        deq = state.model
    else:
        with _seeded_global_rng(seed, X.device):
            deq = VariationalDequantizer(X.shape[1], hidden_layer_sizes, n_couplings)
        deq = deq.to(device=X.device, dtype=X.dtype)
    if isinstance(score_fn, nn.Module):
        for p in score_fn.parameters():
            p.requires_grad_(False)

    def nll_fn(x: Tensor, u: Tensor, g: torch.Generator) -> Tensor:
        # Bound on -log p(x + u) in the model's units; the transform's log-det is a constant.
        return nll_bound_estimate(score_fn, transform(x + u), sde, eps=eps, generator=g)

    return train_dequantizer(
        deq,
        X,
        nll_fn,
        condition=transform,
        max_iter=max_iter,
        generator=(torch.Generator(device=X.device).manual_seed(seed + 1)
                   if generator is None else generator),
        verbose=verbose,
        state=state,
        **loop_kwargs,  # callback, checkpoint, checkpoint_every, resume
    )
