"""Tests of :mod:`skscoreflow.datasets`: the built-in 2-D sets and their true densities."""

from __future__ import annotations

import math

import numpy as np
import pytest

from skscoreflow.datasets import DATASETS, has_true_density, make_dataset, true_log_density

WITH_DENSITY = [name for name in DATASETS if name != "pinwheel"]
# Grid spacing: below the smallest noise std in data units (rings: 0.08), where the midpoint rule
# on a Gaussian is accurate to ~1e-8; cell edges fall on the checkerboard's square edges.
H = 1 / 16
_AX = np.arange(-5 + H / 2, 5, H)
GRID = np.stack(np.meshgrid(_AX, _AX, indexing="ij"), -1).reshape(-1, 2)


@pytest.fixture(scope="module")
def grid_log_density():
    cache: dict[str, np.ndarray] = {}

    def get(name):
        if name not in cache:
            cache[name] = true_log_density(name, GRID)
        return cache[name]

    return get


@pytest.mark.parametrize("name", WITH_DENSITY)
def test_true_density_integrates_to_one(name, grid_log_density):
    """Midpoint rule on [-5, 5]^2 (the support up to > 4 noise stds)."""
    total = np.exp(grid_log_density(name)).sum() * H * H
    assert total == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name", WITH_DENSITY)
def test_sampler_matches_density(name, grid_log_density):
    """Mean log-density of samples = ∫ p log p over the grid (same distribution)."""
    lp = grid_log_density(name)
    p = np.exp(lp)
    neg_entropy = float(np.sum(p * np.where(p > 0, lp, 0.0)) * H * H)
    X = make_dataset(name, 10_000, random_state=0)
    lx = true_log_density(name, X)
    assert np.isfinite(lx).all()
    se = lx.std() / math.sqrt(len(lx))
    assert lx.mean() == pytest.approx(neg_entropy, abs=4 * se + 2e-3)


def test_checkerboard_mean_log_density_is_minus_log_32():
    X = make_dataset("checkerboard", 5000, random_state=3)
    lp = true_log_density("checkerboard", X)
    assert np.all(lp == -math.log(32))
    assert np.all(np.abs(X) <= 4)
    # outside the board (the complementary squares, or beyond the edge) the density is zero
    on = np.array([[1.0, 1.0], [-3.0, -3.0], [-1.0, -1.0], [3.0, -1.0]])
    off = np.array([[1.0, -1.0], [-1.0, 1.0], [3.0, -3.0], [5.0, 0.0], [0.5, 4.5]])
    assert np.all(np.isneginf(true_log_density("checkerboard", off)))
    assert np.all(true_log_density("checkerboard", on) == -math.log(32))


def test_eight_gaussians_density_is_exact_mixture():
    from scipy.stats import multivariate_normal

    centres = 2 * math.sqrt(2) * np.array(
        [[math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)] for k in range(8)]
    )
    std = 0.5 / math.sqrt(2)
    X = np.array([[0.0, 0.0], [2.0, 2.0], [-2.9, 0.1]])
    expected = np.log(
        sum(multivariate_normal(c, std**2 * np.eye(2)).pdf(X) for c in centres) / 8
    )
    np.testing.assert_allclose(true_log_density("8gaussians", X), expected, rtol=1e-10)


def test_pinwheel_has_no_true_density():
    assert not has_true_density("pinwheel")
    assert all(has_true_density(n) for n in WITH_DENSITY)
    with pytest.raises(ValueError, match="pinwheel"):
        true_log_density("pinwheel", np.zeros((3, 2)))
    X = make_dataset("pinwheel", 500, random_state=0)
    assert X.shape == (500, 2) and np.isfinite(X).all()


@pytest.mark.parametrize("name", list(DATASETS))
def test_samples_reproducible_for_a_seed(name):
    a = make_dataset(name, 300, random_state=7)
    b = make_dataset(name, 300, random_state=7)
    c = make_dataset(name, 300, random_state=8)
    assert a.shape == (300, 2) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    g1, g2 = np.random.default_rng(7), np.random.default_rng(7)
    np.testing.assert_array_equal(make_dataset(name, 50, g1), make_dataset(name, 50, g2))
    r1, r2 = np.random.RandomState(1), np.random.RandomState(1)
    np.testing.assert_array_equal(make_dataset(name, 50, r1), make_dataset(name, 50, r2))


@pytest.mark.parametrize("name", ["moons", "2spirals"])
def test_quadrature_nodes_converged(name):
    """The default 1024 midpoint nodes against 8192: ~1e-6 nats on average; the worst point
    is ~6e-4 nats off (2spirals, whose arc parameter sqrt(u) is singular at u = 0; moons:
    ~2e-4 at the arc ends) -- far below any sampling error in the tests that use it."""
    X = make_dataset(name, 500, random_state=0)
    err = np.abs(true_log_density(name, X) - true_log_density(name, X, n_nodes=8192))
    assert err.mean() < 2e-5
    assert err.max() < 1e-3


def test_dataset_validation():
    with pytest.raises(ValueError) as err:
        make_dataset("swissroll", 10)
    for name in DATASETS:
        assert name in str(err.value)
    with pytest.raises(ValueError):
        true_log_density("nope", np.zeros((1, 2)))
    with pytest.raises(ValueError, match="n_samples"):
        make_dataset("moons", -1)
    assert make_dataset("moons", 0).shape == (0, 2)


# ---------------------------------------------------------------------------- ProductDensity
def test_product_density_is_the_sum_of_its_pairs() -> None:
    from skscoreflow.datasets import ProductDensity

    density = ProductDensity(6, ("moons", "8gaussians"))
    assert density.pair_sets == ("moons", "8gaussians", "moons") and density.rotation_ is None
    X = density.sample(500, random_state=0)
    expected = sum(true_log_density(name, X[:, 2 * k : 2 * k + 2])
                   for k, name in enumerate(density.pair_sets))
    np.testing.assert_array_equal(density.log_density(X), expected)


def test_rotated_product_density_integrates_to_one() -> None:
    # Importance sampling from a wide Gaussian q: E_q[p / q] = 1 when p is normalised.
    from scipy.stats import multivariate_normal

    from skscoreflow.datasets import ProductDensity

    density = ProductDensity(4, ("8gaussians", "checkerboard"), rotate=True, random_state=3)
    q = multivariate_normal(np.zeros(4), 3.0**2 * np.eye(4))
    Y = q.rvs(200_000, random_state=0)
    w = np.exp(density.log_density(Y) - q.logpdf(Y))
    se = w.std() / np.sqrt(len(w))
    assert abs(w.mean() - 1) < 4 * se and se < 0.02


def test_rotated_product_samples_match_its_density() -> None:
    # The samples' mean log-density equals the sum of the pairs' (an entropy identity that a
    # rotation applied the wrong way round, or pairs out of order, would break).
    from skscoreflow.datasets import ProductDensity

    density = ProductDensity(6, ("8gaussians", "moons", "checkerboard"), rotate=True, random_state=1)
    Q = density.rotation_
    np.testing.assert_allclose(Q.T @ Q, np.eye(6), atol=1e-12)
    lp = density.log_density(density.sample(10_000, random_state=2))
    assert np.isfinite(lp).all()
    pairs = [true_log_density(name, make_dataset(name, 10_000, random_state=10 + k))
             for k, name in enumerate(density.pair_sets)]
    se = np.sqrt(lp.var() / len(lp) + sum(p.var() / len(p) for p in pairs))
    assert abs(lp.mean() - sum(p.mean() for p in pairs)) < 4 * se


def test_product_density_validation_and_seeding() -> None:
    from skscoreflow.datasets import ProductDensity

    for bad in (3, 0, 2.5):
        with pytest.raises(ValueError, match="even"):
            ProductDensity(bad)
    with pytest.raises(ValueError, match="pinwheel"):
        ProductDensity(4, ("moons", "pinwheel"))
    with pytest.raises(ValueError, match="shape"):
        ProductDensity(4).log_density(np.zeros((3, 2)))
    a, b = (ProductDensity(4, rotate=True, random_state=7) for _ in range(2))
    np.testing.assert_array_equal(a.rotation_, b.rotation_)
    np.testing.assert_array_equal(a.sample(5, random_state=0), b.sample(5, random_state=0))
