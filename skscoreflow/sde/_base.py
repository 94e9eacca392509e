"""The :class:`SDE` base class: kernel, dynamics, prior, importance sampling, reference."""

from __future__ import annotations

import math
import weakref
from abc import ABC, abstractmethod
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

__all__ = ["SDE"]

_V = TypeVar("_V")
#: Per-instance memo of :meth:`SDE._cached`, keyed by ``id`` (user SDEs, e.g. dataclasses, need
#: not be hashable) with a weak reference that guards against a reused ``id``; a finalizer drops
#: the entry with its SDE.
_CONSTANTS: dict[int, tuple[weakref.ref, dict]] = {}


def _log_expm1(x: Tensor) -> Tensor:
    """``log(exp(x) - 1)`` for ``x > 0``, accurate for small and large ``x``."""
    # For large x, exp(x) - 1 overflows; log(exp(x) - 1) = x + log1p(-exp(-x)).
    return torch.where(x > 20.0, x + torch.log1p(-torch.exp(-x)), torch.log(torch.expm1(x)))


def _batch_view(t: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample times ``t`` (shape ``(n,)`` or scalar) to broadcast against ``x``."""
    if t.ndim == 0:
        return t
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


class SDE(ABC):
    """Base class of the forward SDEs.

    A subclass implements the kernel (:meth:`log_mean_coeff`, :meth:`std`), the dynamics
    (:meth:`diffusion_squared`, :meth:`drift_coeff`, :meth:`drift_divergence_integral`) and an
    antiderivative of ``g^2 / sigma^2`` with its inverse (:meth:`cum_weight`,
    :meth:`inverse_cum_weight`); everything else (probability-flow drift, prior, importance
    sampling, Gaussian reference) is derived here.  Methods taking a time ``t`` (a tensor of
    times in ``[0, T]``: a scalar or one time per row, shape ``(n,)``) return a tensor of the
    same shape unless their docstring says otherwise.

    Attributes
    ----------
    T : float
        End time of the diffusion (1).
    default_eps : float
        Lower time cutoff for training, the likelihood and the bound.
    sampling_eps : float
        Final time of the samplers: ``default_eps`` unless a subclass overrides this read-only
        property (with a class attribute or a property).
    continuous_eps : float
        The estimator's default cutoff for standardised continuous data: ``default_eps`` unless
        a subclass overrides it (likewise).
    name : str
        Registry key ("ve", "vp" or "subvp"; used to save and rebuild built-in SDEs).
    prior_std : float
        Standard deviation of the Gaussian prior ``pi = N(0, prior_std^2 I)``.

    See Also
    --------
    VPSDE, SubVPSDE, VESDE : The concrete SDEs.
    get_sde : Build one by name.

    Examples
    --------
    >>> import torch
    >>> sde = VPSDE()  # any subclass
    >>> t = torch.tensor([1e-5, 0.5, 1.0], dtype=torch.float64)
    >>> [round(v, 4) for v in sde.std(t).tolist()]
    [0.001, 0.9597, 1.0]
    >>> x = sde.perturb(torch.ones(3, 2, dtype=torch.float64), t, torch.zeros(3, 2, dtype=torch.float64))
    >>> x.shape
    torch.Size([3, 2])
    """

    T: float = 1.0
    default_eps: float = 1e-5
    name: str = ""
    prior_std: float = 1.0

    @property
    def sampling_eps(self) -> float:
        """Final time of the samplers; :attr:`default_eps` unless a subclass overrides it."""
        return self.default_eps

    @property
    def continuous_eps(self) -> float:
        """Default cutoff for standardised continuous data; :attr:`default_eps` by default."""
        return self.default_eps

    # ------------------------------------------------------------------ kernel and dynamics
    @abstractmethod
    def log_mean_coeff(self, t: Tensor) -> Tensor:  # numpydoc ignore=PR01,RT01
        """``log alpha(t)``, the log of the kernel's mean coefficient."""

    def mean_coeff(self, t: Tensor) -> Tensor:  # numpydoc ignore=PR01,RT01
        """``alpha(t)``: ``E[x_t | x_0] = alpha(t) x_0``."""
        return torch.exp(self.log_mean_coeff(t))

    @abstractmethod
    def std(self, t: Tensor) -> Tensor:  # numpydoc ignore=PR01,RT01
        """``sigma(t)``: the std of the perturbation kernel ``p_0t``."""

    @abstractmethod
    def diffusion_squared(self, t: Tensor) -> Tensor:  # numpydoc ignore=PR01,RT01
        """``g(t)^2``, the squared diffusion coefficient."""

    @abstractmethod
    def drift_coeff(self, t: Tensor) -> Tensor:  # numpydoc ignore=PR01,RT01
        """Coefficient of the linear drift ``f(x, t) = drift_coeff(t) * x``."""

    @abstractmethod
    def drift_divergence_integral(self, eps: float, dim: int) -> float:
        """``∫_eps^T div f dt`` in closed form (used by the bound).

        Parameters
        ----------
        eps : float
            Lower end of the integral.
        dim : int
            Data dimension ``d``.

        Returns
        -------
        float
            The integral (0 for VE).
        """

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """Drift ``f(x, t) = drift_coeff(t) * x``.

        Parameters
        ----------
        x : Tensor of shape (n, ...)
            States.
        t : Tensor
            Time: a scalar or shape ``(n,)``.

        Returns
        -------
        Tensor
            Same shape as ``x``.
        """
        return _batch_view(self.drift_coeff(t), x) * x

    def perturb(self, x0: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """Diffuse clean data to time ``t``: ``x_t = alpha(t) x0 + sigma(t) z``.

        Parameters
        ----------
        x0 : Tensor of shape (n, ...)
            Clean data.
        t : Tensor
            Time: a scalar or shape ``(n,)``.
        z : Tensor
            Standard normal noise, shaped like ``x0``.

        Returns
        -------
        Tensor
            ``x_t``, shaped like ``x0``.
        """
        return _batch_view(self.mean_coeff(t), x0) * x0 + _batch_view(self.std(t), x0) * z

    def ode_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Probability-flow ODE drift ``f(x, t) - g(t)^2 score / 2``.

        Parameters
        ----------
        x : Tensor of shape (n, ...)
            States.
        t : Tensor
            Time: a scalar or shape ``(n,)``.
        score : Tensor
            The score ``s(x, t)`` at ``x``.

        Returns
        -------
        Tensor
            ``dx/dt`` of the probability-flow ODE, shaped like ``x``.
        """
        return self.drift(x, t) - 0.5 * _batch_view(self.diffusion_squared(t), x) * score

    def ode_drift_divergence(self, t: Tensor, dim: int, score_divergence: Tensor) -> Tensor:
        """``div_x`` of :meth:`ode_drift`: ``dim * drift_coeff(t) - g(t)^2 div s / 2``.

        The drift is linear, so its divergence does not depend on ``x``; only the score's
        divergence has to be estimated.

        Parameters
        ----------
        t : Tensor
            Time: a scalar or shape ``(n,)``.
        dim : int
            Data dimension ``d``.
        score_divergence : Tensor of shape (n,)
            ``div_x s(x, t)`` (exact or an unbiased estimate).

        Returns
        -------
        Tensor of shape (n,)
            The divergence of the probability-flow drift.
        """
        return self.drift_coeff(t) * dim - 0.5 * self.diffusion_squared(t) * score_divergence

    # ------------------------------------------------------------------ prior
    def prior_sample(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw from the prior ``N(0, prior_std^2 I)``.

        Parameters
        ----------
        shape : tuple of int
            Shape of the sample, e.g. ``(n, d)``.
        generator : torch.Generator, optional
            Source of randomness.
        device : torch.device or str, optional
            Device of the sample.
        dtype : torch.dtype, optional
            Floating-point type of the sample.

        Returns
        -------
        Tensor
            Of the requested ``shape``.
        """
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return self.prior_std * z

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """Log-density of the prior, summed over all but the first axis.

        Parameters
        ----------
        z : Tensor of shape (n, ...)
            Points at ``t = T``.

        Returns
        -------
        Tensor of shape (n,)
            ``log pi(z)`` in nats.
        """
        d = z[0].numel()
        sq = z.reshape(z.shape[0], -1).pow(2).sum(-1)
        v = self.prior_std**2
        return -0.5 * d * math.log(2 * math.pi * v) - sq / (2 * v)

    def expected_prior_nll(self, x0: Tensor) -> Tensor:
        """``E_{x_T ~ p_0T(.|x0)}[-log pi(x_T)]`` in closed form, per row of ``x0``.

        Parameters
        ----------
        x0 : Tensor of shape (n, ...)
            Clean data.

        Returns
        -------
        Tensor of shape (n,)
            The expected prior negative log-density (the prior term of the bound), in nats.
        """
        d = x0[0].numel()
        T = torch.as_tensor(self.T, dtype=x0.dtype, device=x0.device)
        a2 = self.mean_coeff(T) ** 2
        s2 = self.std(T) ** 2
        sq = x0.reshape(x0.shape[0], -1).pow(2).sum(-1)
        v = self.prior_std**2
        return 0.5 * d * math.log(2 * math.pi * v) + (a2 * sq + d * s2) / (2 * v)

    # ------------------------------------------------------------------ Gaussian reference
    def reference_variance(self, t: Tensor) -> Tensor:  # numpydoc ignore=PR01,RT01
        """``alpha(t)^2 + sigma(t)^2``: the variance of ``p_t`` for ``N(0, I)`` data."""
        return self.mean_coeff(t) ** 2 + self.std(t) ** 2

    def reference_noise(self, x: Tensor, t: Tensor) -> Tensor:
        """Exact noise prediction for ``N(0, I)`` data: ``sigma x / (alpha^2 + sigma^2)``.

        The score of that reference is ``-x / (alpha^2 + sigma^2)``, i.e. minus this divided
        by ``sigma(t)``.  Standardised data look like it at large ``t``: the score networks
        learn their departure from it, and the likelihood bound uses it as a control variate.

        Parameters
        ----------
        x : Tensor of shape (n, ...)
            Noisy points ``x_t``.
        t : Tensor
            Time: a scalar or shape ``(n,)``.

        Returns
        -------
        Tensor
            Shaped like ``x``.

        Examples
        --------
        >>> import torch
        >>> sde = VPSDE()
        >>> x, t = torch.ones(2, 3, dtype=torch.float64), torch.tensor([0.1, 1.0], dtype=torch.float64)
        >>> score = -sde.reference_noise(x, t) / sde.std(t)[:, None]
        >>> bool(torch.allclose(score, -x / sde.reference_variance(t)[:, None]))
        True
        """
        sigma = _batch_view(self.std(t), x)
        var = _batch_view(self.mean_coeff(t), x) ** 2 + sigma**2
        return sigma * x / var

    def _cached(self, key: Any, compute: Callable[[], _V]) -> _V:
        """Memoise a constant derived from this SDE (e.g. the bound's quadratures).

        The cache belongs to this instance (held beside it, not in its ``__dict__``, so state
        comparisons and pickles are unaffected; the instance need not be hashable) and its key
        includes :meth:`config`: a subclass or an SDE with other parameters never reuses
        another SDE's numbers.
        """
        entry = _CONSTANTS.get(id(self))
        if entry is None or entry[0]() is not self:
            # SDE defines no __slots__, so every subclass instance is weak-referenceable.
            entry = _CONSTANTS[id(self)] = (weakref.ref(self), {})
            weakref.finalize(self, _CONSTANTS.pop, id(self), None)
        cache = entry[1]
        full_key = (key, tuple(sorted(self.config().items())))
        if full_key not in cache:
            cache[full_key] = compute()
        return cache[full_key]

    def _resolve_eps(self, eps: float | None) -> float:
        """``eps`` as a float, :attr:`default_eps` when None; must lie in ``(0, T)``."""
        eps = self.default_eps if eps is None else float(eps)
        if not 0 < eps < self.T:
            raise ValueError(f"eps must lie in (0, {self.T}), got {eps}")
        return eps

    # ------------------------------------------------------------------ importance sampling
    @abstractmethod
    def cum_weight(self, t: Tensor) -> Tensor:  # numpydoc ignore=PR01,RT01
        """An antiderivative ``G(t)`` of ``g^2 / sigma^2`` (called in float64).

        With :meth:`inverse_cum_weight` it gives the importance-sampling proposal in closed
        form: CDF ``(G(t) - G(eps)) / Z`` and inverse CDF.
        """

    @abstractmethod
    def inverse_cum_weight(self, c: Tensor) -> Tensor:  # numpydoc ignore=PR01,RT01
        """Inverse of :meth:`cum_weight`: the time ``t`` with ``G(t) = c`` (called in float64)."""

    def likelihood_weight_ratio(self, t: Tensor) -> Tensor:  # numpydoc ignore=PR01,RT01
        """``g(t)^2 / sigma(t)^2``, the unnormalised importance-sampling density."""
        return self.diffusion_squared(t) / self.std(t) ** 2

    def importance_normalizer(self, eps: float | None = None) -> Tensor:
        """``Z = ∫_eps^T g^2 / sigma^2 dt``, the normaliser of the importance-sampling density.

        Parameters
        ----------
        eps : float, optional
            Lower cutoff; :attr:`default_eps` when None.

        Returns
        -------
        Tensor
            A float64 scalar.
        """
        eps = self.default_eps if eps is None else eps
        e = torch.tensor(eps, dtype=torch.float64)
        T = torch.tensor(self.T, dtype=torch.float64)
        return self.cum_weight(T) - self.cum_weight(e)

    def importance_cdf(self, t: Tensor, eps: float | None = None) -> Tensor:
        """CDF of ``p_IS`` on ``[eps, T]``.

        Parameters
        ----------
        t : Tensor
            Times in ``[eps, T]``.
        eps : float, optional
            Lower cutoff; :attr:`default_eps` when None.

        Returns
        -------
        Tensor
            Values in ``[0, 1]``, same shape and dtype as ``t``.
        """
        eps = self.default_eps if eps is None else eps
        t64 = t.to(torch.float64)
        e = torch.tensor(eps, dtype=torch.float64, device=t64.device)
        z = self.importance_normalizer(eps).to(t64.device)
        return ((self.cum_weight(t64) - self.cum_weight(e)) / z).to(t.dtype)

    def importance_icdf(self, u: Tensor, eps: float | None = None) -> Tensor:
        """Inverse CDF of ``p_IS``: maps ``u in [0, 1]`` to ``t in [eps, T]`` (closed form).

        Parameters
        ----------
        u : Tensor
            Probabilities in ``[0, 1]``.
        eps : float, optional
            Lower cutoff; :attr:`default_eps` when None.

        Returns
        -------
        Tensor
            Times in ``[eps, T]``, same shape and dtype as ``u``.
        """
        eps = self.default_eps if eps is None else eps
        u64 = u.to(torch.float64)
        e = torch.tensor(eps, dtype=torch.float64, device=u64.device)
        z = self.importance_normalizer(eps).to(u64.device)
        t = self.inverse_cum_weight(u64 * z + self.cum_weight(e))
        return t.clamp(eps, self.T).to(u.dtype)

    def importance_log_prob(self, t: Tensor, eps: float | None = None) -> Tensor:
        """Log-density of ``p_IS`` at ``t`` (``-inf`` outside ``[eps, T]``).

        Parameters
        ----------
        t : Tensor
            Times.
        eps : float, optional
            Lower cutoff; :attr:`default_eps` when None.

        Returns
        -------
        Tensor
            Same shape and dtype as ``t``.
        """
        eps = self.default_eps if eps is None else eps
        t64 = t.to(torch.float64)
        lp = torch.log(self.likelihood_weight_ratio(t64)) - torch.log(
            self.importance_normalizer(eps).to(t64.device)
        )
        lp = torch.where((t64 >= eps) & (t64 <= self.T), lp, torch.full_like(lp, -math.inf))
        return lp.to(t.dtype)

    def sample_time(
        self,
        n: int,
        eps: float | None = None,
        *,
        importance_sampling: bool = True,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw ``n`` times on ``[eps, T]``: from ``p_IS ∝ g^2 / sigma^2`` or uniformly.

        Parameters
        ----------
        n : int
            Number of times.
        eps : float, optional
            Lower cutoff; :attr:`default_eps` when None.
        importance_sampling : bool, default=True
            Draw from ``p_IS`` by inverse CDF (else uniformly).
        generator : torch.Generator, optional
            Source of randomness (one float64 uniform per time either way).
        device : torch.device or str, optional
            Device of the result.
        dtype : torch.dtype, default=torch.float32
            Floating-point type of the result.

        Returns
        -------
        Tensor of shape (n,)
            Times in ``[eps, T]``.
        """
        eps = self.default_eps if eps is None else eps
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        if importance_sampling:
            return self.importance_icdf(u, eps).to(dtype)
        return (eps + (self.T - eps) * u).to(dtype)

    # ------------------------------------------------------------------ sampling helpers
    def langevin_alpha(self, t: Tensor, dt: float) -> Tensor:
        """Step-size factor of the Langevin corrector (1 for VE, ``exp(-beta dt)`` otherwise).

        Parameters
        ----------
        t : Tensor
            Time(s) in ``[0, T]``.
        dt : float
            Step of the predictor.

        Returns
        -------
        Tensor
            Same shape as ``t``.
        """
        return torch.ones_like(t)

    def config(self) -> dict[str, Any]:
        """Constructor parameters, JSON-serialisable.

        Returns
        -------
        dict
            Keyword arguments that rebuild this SDE with :func:`get_sde`.
        """
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"
