"""Shared test configuration.

* ``--device`` (default ``cpu``) and ``--dtype`` (default ``float64``) choose where and in which
  precision the analytic-oracle tests run (zuko-style options), exposed as the ``device`` and
  ``dtype`` fixtures.
* torch uses 2 intra-op threads so timings are comparable with CI runners
  (``SKSCOREFLOW_TEST_THREADS`` overrides).
* The hypothesis profile "ci" (no deadline, few examples) is loaded by default; pass
  ``--hypothesis-profile=<name>`` to use another one.
* Fixtures ``gaussian_oracle`` and ``spd`` give the Gaussian analytic oracle of spec §12
  (exact scores, data, marginal and ODE-model densities).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# 2 threads like the CI runners; SKSCOREFLOW_TEST_THREADS overrides (e.g. 1 on a busy machine).
torch.set_num_threads(int(os.environ.get("SKSCOREFLOW_TEST_THREADS", "2")))

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile("ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device", action="store", default="cpu", help="torch device for the tests (cpu, cuda)"
    )
    parser.addoption(
        "--dtype",
        action="store",
        default="float64",
        choices=("float32", "float64"),
        help="floating-point precision of the analytic-oracle tests",
    )


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA requested but not available")
    return dev


@pytest.fixture(scope="module")
def data():
    """Small moons train / test sets shared by the estimator and persistence tests."""
    from sklearn.datasets import make_moons

    X, _ = make_moons(200, noise=0.1, random_state=0)
    X_test, _ = make_moons(40, noise=0.1, random_state=1)
    return X, X_test


@pytest.fixture(scope="session")
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return getattr(torch, request.config.getoption("--dtype"))


# --------------------------------------------------------------------------------------------
# Gaussian analytic oracle (spec §12)
# --------------------------------------------------------------------------------------------
class GaussianOracle:
    """Exact quantities for data ``x0 ~ N(mean, cov)`` diffused by a linear SDE.

    With the kernel ``p_0t(x_t | x0) = N(alpha x0, sigma^2 I)`` the marginals are
    ``p_t = N(alpha mean, C_t)`` with ``C_t = alpha^2 cov + sigma^2 I`` (for VE ``alpha = 1``
    and ``sigma(0) = sigma_min``: the kernel starts from the clean ``x0``, so ``p_0`` itself is
    ``N(mean, cov)``).  In the eigenbasis ``cov = U diag(lam) U^T`` every ``C_t`` is diagonal
    with entries ``c_k(t) = alpha^2 lam_k + sigma^2``.

    Probability-flow map.  With the exact score, ``y = x - alpha mean`` obeys
    ``dy_k/dt = (f_coeff + g^2 / (2 c_k)) y_k`` and ``dc_k/dt = 2 f_coeff c_k + g^2`` (the
    kernel identities ``alpha' = f alpha``, ``(sigma^2)' = 2 f sigma^2 + g^2``), so
    ``d log sqrt(c_k) / dt`` is the same rate: ``y_k(T) = y_k(eps) sqrt(c_k(T) / c_k(eps))``.
    The flow ``Phi: x(eps) -> x(T)`` is affine and the ODE-model density is the prior pulled
    back through it::

        log p_ODE(x) = log pi(Phi(x)) + sum_k 1/2 log(c_k(T) / c_k(eps)).

    This differs from ``log p_eps(x)`` only through ``log pi - log p_T`` at ``Phi(x)``.
    """

    def __init__(self, sde, mean, cov):
        self.sde = sde
        self.mean = mean
        self.cov = cov
        self.d = mean.shape[0]
        self.lam, self.U = torch.linalg.eigh(cov)

    # -- kernel helpers
    def _t(self, t, like):
        return torch.as_tensor(t, dtype=like.dtype, device=like.device)

    def _coeffs(self, t):
        alpha = self.sde.mean_coeff(t)
        sigma = self.sde.std(t)
        return alpha, sigma

    def variances(self, t):
        """Eigen-variances ``c_k(t)``, shape ``t.shape + (d,)``."""
        alpha, sigma = self._coeffs(t)
        return alpha[..., None] ** 2 * self.lam + sigma[..., None] ** 2

    # -- exact score of p_t
    def score(self, x, t):
        t = self._t(t, x)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        alpha, _ = self._coeffs(t)
        y = (x - alpha[:, None] * self.mean) @ self.U
        return -(y / self.variances(t)) @ self.U.T

    # -- densities
    def log_prob(self, x, t=None):
        """``log p_t(x)``; ``t=None`` gives the data density ``N(mean, cov)``."""
        if t is None:
            c, m = self.lam, self.mean
        else:
            tt = self._t(t, x)
            c = self.variances(tt)
            m = self.sde.mean_coeff(tt) * self.mean
        y = (x - m) @ self.U
        return -0.5 * (
            self.d * math.log(2 * math.pi) + torch.log(c).sum(-1) + (y**2 / c).sum(-1)
        )

    def flow(self, x, eps):
        """The exact probability-flow map ``Phi`` from ``t = eps`` to ``t = T``."""
        e = self._t(eps, x)
        T = self._t(self.sde.T, x)
        ratio = torch.sqrt(self.variances(T) / self.variances(e))
        y = (x - self.sde.mean_coeff(e) * self.mean) @ self.U
        return self.sde.mean_coeff(T) * self.mean + (y * ratio) @ self.U.T

    def inverse_flow(self, z, eps):
        """``Phi^{-1}``: the exact probability-flow map from ``t = T`` back to ``t = eps``."""
        e = self._t(eps, z)
        T = self._t(self.sde.T, z)
        ratio = torch.sqrt(self.variances(e) / self.variances(T))
        y = (z - self.sde.mean_coeff(T) * self.mean) @ self.U
        return self.sde.mean_coeff(e) * self.mean + (y * ratio) @ self.U.T

    def expected_log_prob(self, m, s2, t):
        """``E_{y ~ N(m, s2 I)}[log p_t(y)]`` in closed form, per row of ``m``."""
        tt = self._t(t, m)
        c = self.variances(tt)
        y = (m - self.sde.mean_coeff(tt) * self.mean) @ self.U
        return -0.5 * (
            self.d * math.log(2 * math.pi)
            + torch.log(c).sum()
            + (y**2 / c).sum(-1)
            + s2 * (1 / c).sum()
        )

    def ode_log_prob(self, x, eps):
        """Exact log-density of the probability-flow ODE model (prior pushed through Phi)."""
        e = self._t(eps, x)
        T = self._t(self.sde.T, x)
        logdet = 0.5 * torch.log(self.variances(T) / self.variances(e)).sum(-1)
        return self.sde.prior_log_prob(self.flow(x, eps)) + logdet

    def prior_mismatch(self, x):
        """``E_{x_T ~ p_0T(.|x)}[log p_T(x_T) - log pi(x_T)]`` in closed form, per row.

        The Theorem-3 bound with the exact score is tight up to this term (spec §12 (b)).
        """
        T = self._t(self.sde.T, x)
        a, s = self._coeffs(T)
        m = a * x  # kernel mean; kernel variance s^2 I
        e_log_pT = self.expected_log_prob(m, s**2, T)
        v = self.sde.prior_std**2
        e_log_pi = -0.5 * self.d * math.log(2 * math.pi * v) - (
            m.pow(2).sum(-1) + self.d * s**2
        ) / (2 * v)
        return e_log_pT - e_log_pi

    def sample(self, n, generator):
        z = torch.randn(n, self.d, generator=generator, dtype=self.mean.dtype)
        z = z.to(self.mean.device)
        return self.mean + (z * self.lam.sqrt()) @ self.U.T


def random_spd(d, seed, *, low=0.3, high=2.0):
    """A random SPD matrix with eigenvalues in ``[low, high]`` and a random rotation."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = low + (high - low) * torch.rand(d, generator=g, dtype=torch.float64)
    return (q * lam) @ q.T


@pytest.fixture(scope="session")
def gaussian_oracle():
    """The :class:`GaussianOracle` class (``gaussian_oracle(sde, mean, cov)``)."""
    return GaussianOracle


@pytest.fixture(scope="session")
def spd():
    """``spd(d, seed)``: a random SPD covariance (float64, CPU)."""
    return random_spd
