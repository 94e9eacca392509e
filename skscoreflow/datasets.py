"""Built-in 2-D toy densities, with their true log-density where it is known.

The usual benchmark sets of the normalising-flow literature (FFJORD's ``toy_data``), written as
continuous distributions so that the true density can be evaluated: where a set is "points on
a curve plus Gaussian noise", the curve parameter is drawn at random (not on a grid) and the
density is the curve's mixture integrated by quadrature.

========== ============================================= ==========================
name       definition                                    true log-density
========== ============================================= ==========================
checkerb.  uniform on 8 squares of side 2 (area 32)      exact: -ln 32 inside
8gaussians 8 Gaussians on a circle of radius 2√2         exact mixture
moons      two half circles + N(0, 0.1²) noise           quadrature (1024 nodes)
circles    circles of radius 1 and 0.5 + N(0, 0.05²)     quadrature
rings      4 circles, radii 0.5..2 + N(0, 0.08²)         quadrature
2spirals   two spiral arms + N(0, 0.2²) noise            quadrature
pinwheel   5 curved Gaussian arms (FFJORD)               not available
========== ============================================= ==========================

:class:`ProductDensity` builds densities in any even dimension from these sets (independent
pairs, optionally rotated), with the true log-density still known.

Examples
--------
>>> X = make_dataset("checkerboard", 1000, random_state=0)
>>> X.shape
(1000, 2)
>>> float(true_log_density("checkerboard", X[:3]).round(4)[0])
-3.4657
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.special import logsumexp

__all__ = ["DATASETS", "ProductDensity", "make_dataset", "true_log_density", "has_true_density",
           "load_cifar10"]

_RAD8 = 2 * math.sqrt(2)


def _rng(random_state: int | np.random.Generator | None) -> np.random.Generator:
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, np.random.RandomState):
        return np.random.default_rng(random_state.randint(2**31))
    return np.random.default_rng(random_state)


# ----------------------------------------------------------------------------- samplers
def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x1 = rng.random(n) * 4 - 2
    x2_ = rng.random(n) - rng.integers(0, 2, n) * 2
    x2 = x2_ + (np.floor(x1) % 2)
    return np.stack([x1, x2], 1) * 2


def _eight_centers() -> np.ndarray:
    ang = np.arange(8) * np.pi / 4
    return _RAD8 * np.stack([np.cos(ang), np.sin(ang)], 1)


_STD8 = 0.5 / math.sqrt(2)


def _eightgaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    c = _eight_centers()[rng.integers(0, 8, n)]
    return c + _STD8 * rng.standard_normal((n, 2))


def _moon_curves(theta: np.ndarray) -> list[np.ndarray]:
    up = np.stack([np.cos(theta), np.sin(theta)], -1)
    down = np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], -1)
    return [up, down]


def _circle_curves(theta: np.ndarray, radii: tuple[float, ...]) -> list[np.ndarray]:
    return [r * np.stack([np.cos(theta), np.sin(theta)], -1) for r in radii]


def _spiral_curves(u: np.ndarray) -> list[np.ndarray]:
    # Arc parameter n = sqrt(u) * 3 pi (denser towards the outside, as in FFJORD), scaled /3.
    n = np.sqrt(u) * 3 * np.pi
    arm = np.stack([-np.cos(n) * n, np.sin(n) * n], -1) / 3
    return [arm, -arm]


_CURVES: dict[str, tuple[Callable[[np.ndarray], list[np.ndarray]], float, float]] = {
    # name: (curves(parameter in [0, 1)) , noise std, scale)
    "moons": (lambda u: _moon_curves(np.pi * u), 0.1, 1.0),
    "circles": (lambda u: _circle_curves(2 * np.pi * u, (1.0, 0.5)), 0.05, 2.0),
    "rings": (lambda u: _circle_curves(2 * np.pi * u, (0.5, 1.0, 1.5, 2.0)), 0.08, 1.0),
    "2spirals": (_spiral_curves, 0.2, 1.0),
}


def _curve_sampler(name: str) -> Callable[[int, np.random.Generator], np.ndarray]:
    curves, noise, scale = _CURVES[name]

    def sample(n: int, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(n)
        which = rng.integers(0, len(curves(np.zeros(1))), n)
        pts = np.stack(curves(u), 0)[which, np.arange(n)]
        return scale * (pts + noise * rng.standard_normal((n, 2)))

    return sample


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    rads = np.linspace(0, 2 * np.pi, num_classes, endpoint=False)
    features = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    features[:, 0] += 1.0
    labels = rng.integers(0, num_classes, n)
    angles = rads[labels] + rate * np.exp(features[:, 0])
    c, s = np.cos(angles), np.sin(angles)
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    return 2 * np.einsum("ti,tij->tj", features, rot)


#: The built-in 2-D datasets: name -> sampler ``(n, numpy Generator) -> (n, 2) array``.
#:
#: Examples
#: --------
#: >>> sorted(DATASETS)
#: ['2spirals', '8gaussians', 'checkerboard', 'circles', 'moons', 'pinwheel', 'rings']
DATASETS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "checkerboard": _checkerboard,
    "8gaussians": _eightgaussians,
    "moons": _curve_sampler("moons"),
    "circles": _curve_sampler("circles"),
    "rings": _curve_sampler("rings"),
    "2spirals": _curve_sampler("2spirals"),
    "pinwheel": _pinwheel,
}


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return name


def make_dataset(
    name: str, n_samples: int = 10_000, random_state: int | np.random.Generator | None = None
) -> np.ndarray:
    """Draw ``n_samples`` rows of a built-in 2-D dataset (float64 array of shape (n, 2)).

    Parameters
    ----------
    name : str
        One of ``DATASETS``.
    n_samples : int
        Number of rows.
    random_state : int, numpy Generator or None
        Seed or generator of the draw.

    Returns
    -------
    ndarray of shape (n_samples, 2)
        The rows (float64).

    Examples
    --------
    >>> X = make_dataset("moons", 500, random_state=0)
    >>> X.shape, X.dtype
    ((500, 2), dtype('float64'))
    """
    _check_name(name)
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    return DATASETS[name](int(n_samples), _rng(random_state)).astype(np.float64)


def has_true_density(name: str) -> bool:
    """Whether :func:`true_log_density` is available for ``name``.

    Parameters
    ----------
    name : str
        One of ``DATASETS``.

    Returns
    -------
    bool
        False only for "pinwheel".

    Examples
    --------
    >>> has_true_density("moons"), has_true_density("pinwheel")
    (True, False)
    """
    return _check_name(name) != "pinwheel"


def true_log_density(name: str, X: np.ndarray, n_nodes: int = 1024) -> np.ndarray:
    """True log-density (nats) of a built-in dataset at the rows of ``X``.

    Exact for "checkerboard" and "8gaussians"; for the curve-plus-noise sets the integral over
    the curve parameter uses the midpoint rule with ``n_nodes`` nodes (at the default, errors of
    order 1e-6 nats on average and below 1e-3 nats at single points).  Not available for
    "pinwheel" (its density has no closed form).

    Parameters
    ----------
    name : str
        One of ``DATASETS`` except "pinwheel".
    X : array-like of shape (n_samples, 2)
        Points at which to evaluate.
    n_nodes : int
        Quadrature nodes per curve.

    Returns
    -------
    ndarray of shape (n_samples,)
        ``log p(x)`` in nats (``-inf`` off the support of "checkerboard").

    Examples
    --------
    >>> X = make_dataset("checkerboard", 1000, random_state=0)
    >>> round(float(true_log_density("checkerboard", X).mean()), 4)  # -ln 32 everywhere
    -3.4657
    >>> X = make_dataset("moons", 2000, random_state=0)
    >>> round(float(true_log_density("moons", X).mean()), 2)  # what a perfect model scores
    -1.0
    """
    _check_name(name)
    X = np.asarray(X, dtype=np.float64)
    if name == "checkerboard":
        y = X / 2
        inside = (np.abs(y[:, 0]) <= 2) & (np.abs(y[:, 1]) <= 2)
        on_board = (np.floor(y[:, 0]) + np.floor(y[:, 1])) % 2 == 0
        return np.where(inside & on_board, -math.log(32.0), -np.inf)
    if name == "8gaussians":
        d2 = ((X[:, None, :] - _eight_centers()[None]) ** 2).sum(-1)
        comp = -d2 / (2 * _STD8**2) - math.log(2 * math.pi * _STD8**2)
        return logsumexp(comp, axis=1) - math.log(8)
    if name == "pinwheel":
        raise ValueError("the pinwheel density has no closed form; no true density available")
    curves, noise, scale = _CURVES[name]
    u = (np.arange(n_nodes) + 0.5) / n_nodes
    pts = np.concatenate(curves(u), 0)  # (n_curves * n_nodes, 2)
    Y = X / scale
    out = np.empty(len(Y))
    for start in range(0, len(Y), 2048):
        y = Y[start : start + 2048]
        d2 = ((y[:, None, :] - pts[None]) ** 2).sum(-1)
        comp = -d2 / (2 * noise**2) - math.log(2 * math.pi * noise**2)
        out[start : start + 2048] = logsumexp(comp, axis=1) - math.log(len(pts))
    return out - 2 * math.log(scale)


class ProductDensity:
    """A density in any even dimension with a known log-density, built from the 2-D sets.

    The coordinates come in independent pairs, pair ``k`` drawn from the built-in 2-D set
    ``sets[k % len(sets)]``, so the log-density is the sum of the pairs' true log-densities;
    with ``rotate=True`` the vector is then mixed by a random orthogonal matrix ``Q``
    (``x = z Q^T``, ``log |det Q| = 0``), so no coordinate pair is independent of the others
    and ``log p(x) = sum_k log p_k(z_k)`` with ``z = x Q``.  A benchmark family for the way
    density estimators degrade with the number of features.

    Parameters
    ----------
    n_features : int
        Dimension, even and at least 2.
    sets : sequence of str, optional
        The 2-D sets of the pairs, cycled; default: every set with a true density, in the order
        of ``DATASETS``.
    rotate : bool, default=False
        Mix the coordinates with a random orthogonal matrix.
    random_state : int, numpy Generator or None, default=0
        Seed of the rotation (the samples have their own seed).

    Attributes
    ----------
    rotation_ : ndarray of shape (n_features, n_features) or None
        ``Q`` when ``rotate``.

    Examples
    --------
    >>> density = ProductDensity(4, rotate=True, random_state=0)
    >>> X = density.sample(1000, random_state=1)
    >>> X.shape
    (1000, 4)
    >>> density.pair_sets
    ('checkerboard', '8gaussians')
    >>> bool(np.isfinite(density.log_density(X)).all())
    True
    """

    def __init__(self, n_features: int, sets: tuple[str, ...] | list[str] | None = None, *,
                 rotate: bool = False,
                 random_state: int | np.random.Generator | None = 0) -> None:
        if int(n_features) != n_features or n_features < 2 or n_features % 2:
            raise ValueError(f"n_features must be an even integer >= 2, got {n_features!r}")
        if sets is None:
            sets = tuple(name for name in DATASETS if has_true_density(name))
        sets = tuple(sets)
        if not sets:
            raise ValueError("sets must name at least one 2-D set")
        for name in sets:
            if not has_true_density(name):
                raise ValueError(f"the {name!r} set has no true density to build on")
        self.n_features = int(n_features)
        self.pair_sets = tuple(sets[k % len(sets)] for k in range(self.n_features // 2))
        self.rotation_ = None
        if rotate:
            # Haar-random orthogonal matrix: QR of a Gaussian matrix, signs fixed by R's diagonal.
            g = _rng(random_state).standard_normal((self.n_features, self.n_features))
            q, r = np.linalg.qr(g)
            self.rotation_ = q * np.sign(np.diag(r))

    def sample(self, n_samples: int,
               random_state: int | np.random.Generator | None = None) -> np.ndarray:
        """Draw ``n_samples`` rows.

        Parameters
        ----------
        n_samples : int
            Number of rows.
        random_state : int, numpy Generator or None
            Seed or generator of the draw.

        Returns
        -------
        ndarray of shape (n_samples, n_features)
            The rows (float64).
        """
        rng = _rng(random_state)
        Z = np.concatenate([make_dataset(name, n_samples, rng) for name in self.pair_sets], 1)
        return Z if self.rotation_ is None else Z @ self.rotation_.T

    def log_density(self, X: np.ndarray) -> np.ndarray:
        """True log-density (nats) at the rows of ``X``: the sum of the pairs' log-densities.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Points at which to evaluate.

        Returns
        -------
        ndarray of shape (n_samples,)
            ``log p(x)`` (``-inf`` off the support of a "checkerboard" pair).
        """
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X must have shape (n, {self.n_features}), got {X.shape}")
        Z = X if self.rotation_ is None else X @ self.rotation_
        return sum(true_log_density(name, Z[:, 2 * k : 2 * k + 2])
                   for k, name in enumerate(self.pair_sets))


# ----------------------------------------------------------------------------- CIFAR-10
#: The files of each split of the CIFAR-10 "python version" (``cifar-10-batches-py``).
_CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
#: What a CIFAR-10 batch pickle may reference: NumPy's array (and scalar) reconstruction only.
_CIFAR10_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches only: any other global (code a tampered file could run) is
    refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR10_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: not a CIFAR-10 batch file (only NumPy arrays, "
                "lists and strings are expected)")
        return super().find_class(module, name)


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            batch = _BatchUnpickler(f, encoding="latin1").load()
        except Exception as exc:  # any malformed pickle is "not a batch file"
            raise ValueError(f"{path} is not a CIFAR-10 python batch file: {exc}") from exc
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 python batch file (no 'data'/'labels')")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must be uint8 of shape (n, 3072), got {data.dtype} "
                         f"{data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    return data, labels


def load_cifar10(path: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10 from the "python version" files you already have (never downloads).

    Parameters
    ----------
    path : str or path-like
        The ``cifar-10-batches-py`` folder (``data_batch_1`` ... ``data_batch_5``,
        ``test_batch``), or the folder that contains it.
    split : {"train", "test"}, default="train"
        The 50,000 training images (batches 1-5, in order) or the 10,000 test images.

    Returns
    -------
    X : ndarray of shape (n_images, 3072), dtype uint8
        One image per row in C order, as the files store it: the red plane, then green, then
        blue, each 32x32 row-major.  This is ``ScoreFlowDensity(image_shape=(3, 32, 32))``'s
        layout, so the rows are used unchanged (``dequantization`` for the 256 levels).
    y : ndarray of shape (n_images,), dtype int64
        Class labels 0-9.

    Raises
    ------
    FileNotFoundError
        If a batch file of ``split`` is missing.
    ValueError
        If a file is not a CIFAR-10 python batch.  The files are read with an unpickler that
        accepts NumPy arrays only, never arbitrary objects.

    Examples
    --------
    >>> import pickle, tempfile, numpy as np
    >>> folder = Path(tempfile.mkdtemp()) / "cifar-10-batches-py"
    >>> folder.mkdir()
    >>> images = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    >>> with open(folder / "test_batch", "wb") as f:
    ...     pickle.dump({"data": images, "labels": [3, 7]}, f, protocol=2)
    >>> X, y = load_cifar10(folder.parent, split="test")
    >>> X.shape, X.dtype, y.tolist()
    ((2, 3072), dtype('uint8'), [3, 7])
    """
    if split not in _CIFAR10_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(path)
    if not (folder / _CIFAR10_FILES[split][0]).exists() and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    missing = [name for name in _CIFAR10_FILES[split] if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 {split} files {missing} not found in {folder} (expected the extracted "
            "'cifar-10-batches-py' folder of cifar-10-python.tar.gz)")
    parts = [_read_cifar10_batch(folder / name) for name in _CIFAR10_FILES[split]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
