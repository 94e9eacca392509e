"""Command line: ``skscoreflow fit | score | sample | demo``.

Examples
--------
Fit on a CSV with a header (or a ``.npy`` file, or a built-in dataset name), score and sample::

    skscoreflow fit data.csv -o model.pt --max-iter 4000
    skscoreflow score model.pt data.csv -o logp.csv
    skscoreflow sample model.pt -n 1000 -o samples.csv
    skscoreflow demo                      # moons: ScoreFlow vs GaussianMixture vs KDE
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_INTERRUPTED = 130  # the shell's code for a program stopped by Ctrl-C


class CLIError(Exception):
    """An error reported to the user as one line, with a non-zero exit code."""

    def __init__(self, message: str, code: int = EXIT_DATA) -> None:
        super().__init__(message)
        self.code = code


def _load_data(spec: str, n_samples: int = 10_000, random_state: int = 0) -> tuple[np.ndarray, list[str] | None]:
    """Read a CSV (with header) or ``.npy`` file, or draw a built-in dataset by name.

    Parameters
    ----------
    spec : str
        Path of a CSV file with a header row or of a ``.npy`` file, or the name of a built-in
        dataset (see :data:`skscoreflow.datasets.DATASETS`; an existing file wins).
    n_samples : int
        Rows to draw for a built-in dataset.
    random_state : int
        Seed for a built-in dataset.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
        The data (float64 for CSV files).
    columns : list of str or None
        The CSV header; None for ``.npy`` and built-in data.

    Raises
    ------
    CLIError
        If the file is missing, unreadable or holds non-numeric columns.

    Examples
    --------
    >>> X, columns = _load_data("moons", n_samples=100)
    >>> X.shape, columns
    ((100, 2), None)
    """
    from .datasets import DATASETS, make_dataset

    if spec in DATASETS and not os.path.exists(spec):
        return make_dataset(spec, n_samples, random_state=random_state), None
    if not os.path.exists(spec):
        raise CLIError(
            f"{spec}: no such file, and not a built-in dataset ({', '.join(sorted(DATASETS))})"
        )
    if spec.endswith(".npy"):
        try:
            arr = np.load(spec, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise CLIError(f"{spec}: cannot read as .npy ({exc})") from exc
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2:
            raise CLIError(f"{spec}: expected a 2-D array, got shape {arr.shape}")
        return arr, None
    import pandas as pd

    try:
        df = pd.read_csv(spec)
    except (ValueError, OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise CLIError(f"{spec}: cannot read as CSV ({exc})") from exc
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise CLIError(f"{spec}: the file holds no data rows")
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise CLIError(f"{spec}: non-numeric column(s) {bad}; only numeric data can be modelled")
    return df.to_numpy(dtype=np.float64), [str(c) for c in df.columns]


def _estimator_options(parser: argparse.ArgumentParser) -> None:
    from ._estimator import ScoreFlowDensity

    sig = inspect.signature(ScoreFlowDensity.__init__)
    group = parser.add_argument_group("estimator options (see ScoreFlowDensity)")
    for name, param in sig.parameters.items():
        if name in ("self", "verbose"):
            continue
        flag = "--" + name.replace("_", "-")
        default = param.default
        if isinstance(default, bool):
            group.add_argument(flag, type=_parse_bool, default=None, metavar="{true,false}")
        elif name == "early_stopping":
            group.add_argument(flag, type=_parse_bool_or_auto, default=None,
                               metavar="{true,false,auto}")
        elif name == "dropout":
            group.add_argument(flag, type=_parse_float_or_auto, default=None, metavar="{P,auto}")
        elif name.endswith("hidden_layer_sizes"):
            group.add_argument(flag, type=_parse_sizes, default=None, metavar="W[,W...]")
        elif name == "image_shape":
            group.add_argument(flag, type=_parse_sizes, default=None, metavar="C,H,W")
        elif name in ("channel_mult", "attn_resolutions"):
            group.add_argument(flag, type=_parse_sizes_or_auto, default=None,
                               metavar="{N[,N...],auto}")
        elif name == "learning_rate":
            group.add_argument(flag, type=_parse_float_or_auto, default=None,
                               metavar="{LR,auto}")
        elif name in ("fourier_features", "channels", "num_res_blocks", "batch_size"):
            group.add_argument(flag, type=_parse_int_or_auto, default=None, metavar="{N,auto}")
        elif isinstance(default, int):
            group.add_argument(flag, type=int, default=None)
        elif isinstance(default, float) or name == "eps":
            group.add_argument(flag, type=float, default=None)
        elif name == "random_state":
            group.add_argument(flag, type=int, default=None)
        else:
            group.add_argument(flag, type=str, default=None)


def _parse_int_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'auto', got {text!r}") from None


def _parse_float_or_auto(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _parse_bool_or_auto(text: str) -> bool | str:
    return text if text == "auto" else _parse_bool(text)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from exc
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one width")
    return sizes


def _parse_sizes_or_auto(text: str) -> tuple[int, ...] | str:
    return text if text == "auto" else _parse_sizes(text)


def _collect_params(args: argparse.Namespace) -> dict[str, Any]:
    from ._estimator import ScoreFlowDensity

    names = [n for n in inspect.signature(ScoreFlowDensity.__init__).parameters if n != "self"]
    params = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    params["verbose"] = args.verbose
    return params


def _write_table(path: str | None, columns: dict[str, np.ndarray]) -> None:
    import pandas as pd

    df = pd.DataFrame(columns)
    try:
        if path is None or path == "-":
            df.to_csv(sys.stdout, index=False)
        elif path.endswith(".npy"):
            np.save(path, df.to_numpy())
        else:
            df.to_csv(path, index=False)
    except OSError as exc:
        raise CLIError(f"{path}: cannot write the output ({exc})") from exc


def _load_model(path: str) -> Any:
    from ._estimator import ScoreFlowDensity

    if not os.path.exists(path):
        raise CLIError(f"{path}: no such model file")
    try:
        return ScoreFlowDensity.load(path)
    except Exception as exc:  # any unreadable file is a user error here
        raise CLIError(f"{path}: not a skscoreflow model ({exc})") from exc


# ----------------------------------------------------------------------------- commands
def cmd_fit(args: argparse.Namespace) -> int:
    from ._estimator import ScoreFlowDensity

    X, columns = _load_data(args.data, args.n_samples, args.data_seed)
    # Before a possibly long fit: the model must be writable where it was asked for.
    folder = os.path.dirname(os.path.abspath(args.output))
    if os.path.isdir(args.output) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise CLIError(f"{args.output}: cannot write the model there (no such writable folder, "
                       "or it is a folder)")
    try:
        est = ScoreFlowDensity(**_collect_params(args))
        if columns is not None:
            import pandas as pd

            est.fit(pd.DataFrame(X, columns=columns))
        else:
            est.fit(X)
    except (ValueError, TypeError, FloatingPointError, RuntimeError) as exc:
        raise CLIError(f"fit failed: {exc}") from exc
    try:
        est.save(args.output)
    except (OSError, RuntimeError) as exc:  # torch.save raises RuntimeError for a missing dir
        raise CLIError(f"{args.output}: cannot write the model ({exc})") from exc
    print(
        f"fitted {X.shape[0]} rows x {X.shape[1]} features in {est.fit_time_:.1f} s "
        f"({est.n_iter_} steps); model written to {args.output}",
        file=sys.stderr,
    )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    est = _load_model(args.model)
    X, columns = _load_data(args.data, args.n_samples, args.data_seed)
    if columns is not None and getattr(est, "feature_names_in_", None) is not None:
        import pandas as pd

        X = pd.DataFrame(X, columns=columns)
    try:
        logp = est.bound(X) if args.bound else est.score_samples(X)
    except (ValueError, TypeError, RuntimeError, FloatingPointError) as exc:
        raise CLIError(f"score failed: {exc}") from exc
    _write_table(args.output, {"log_density": logp})
    print(f"mean log-likelihood: {logp.mean():.5f} nats ({len(logp)} rows)", file=sys.stderr)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    est = _load_model(args.model)
    if args.n < 1:
        raise CLIError(f"-n must be a positive int, got {args.n}", EXIT_USAGE)
    try:
        S = est.sample(args.n, random_state=args.seed, method=args.method)
    except (ValueError, TypeError, RuntimeError, FloatingPointError) as exc:
        raise CLIError(f"sample failed: {exc}") from exc
    names = getattr(est, "feature_names_in_", None)
    cols = [str(c) for c in names] if names is not None else [f"x{i}" for i in range(S.shape[1])]
    _write_table(args.output, {c: S[:, i] for i, c in enumerate(cols)})
    print(f"wrote {args.n} samples", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sklearn.mixture import GaussianMixture
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.neighbors import KernelDensity

    from ._estimator import ScoreFlowDensity
    from .datasets import has_true_density, make_dataset, true_log_density

    X = make_dataset(args.dataset, args.n_samples, random_state=0)
    X_test = make_dataset(args.dataset, args.n_test, random_state=1)
    print(f"dataset {args.dataset}: {len(X)} train / {len(X_test)} test rows, 2 features")
    rows: list[tuple[str, float, float, float]] = []

    def report(name: str, logp: np.ndarray, seconds: float) -> None:
        se = logp.std(ddof=1) / np.sqrt(len(logp))
        rows.append((name, float(logp.mean()), float(se), seconds))
        print(f"  {name:<34s} {logp.mean():9.4f} ± {se:.4f} nats   ({seconds:6.1f} s)", flush=True)

    print("held-out mean log-likelihood (higher is better):")
    if has_true_density(args.dataset):
        report("true density (oracle)", true_log_density(args.dataset, X_test), 0.0)
    cv = KFold(3, shuffle=True, random_state=0)
    t0 = time.perf_counter()
    gmm = GridSearchCV(
        GaussianMixture(covariance_type="full", random_state=0, max_iter=200),
        {"n_components": [4, 8, 16, 32, 64]},
        cv=cv,
    ).fit(X)
    report(f"GaussianMixture (CV: {gmm.best_params_['n_components']} comp.)",
           gmm.best_estimator_.score_samples(X_test), time.perf_counter() - t0)
    t0 = time.perf_counter()
    kde = GridSearchCV(
        KernelDensity(), {"bandwidth": np.geomspace(0.02, 0.5, 8)}, cv=cv
    ).fit(X)
    report(f"KernelDensity (CV: bw {kde.best_params_['bandwidth']:.3f})",
           kde.best_estimator_.score_samples(X_test), time.perf_counter() - t0)
    params = {"random_state": 0, "verbose": args.verbose}
    if args.max_iter is not None:
        params["max_iter"] = args.max_iter
    est = ScoreFlowDensity(**params)
    t0 = time.perf_counter()
    est.fit(X)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logp = est.score_samples(X_test)
    report(f"ScoreFlowDensity ({est.n_iter_} steps)", logp, fit_s + time.perf_counter() - t0)

    if args.plot:
        try:
            _demo_plot(args.plot, args.dataset, X, est, gmm.best_estimator_)
            print(f"plot written to {args.plot}")
        except ImportError:
            print("matplotlib is not installed: no plot written", file=sys.stderr)
    return 0


def _demo_plot(path: str, name: str, X: np.ndarray, est: Any, gmm: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = np.percentile(X, 0.5, axis=0) - 0.5, np.percentile(X, 99.5, axis=0) + 0.5
    xs, ys = np.linspace(lo[0], hi[0], 120), np.linspace(lo[1], hi[1], 120)
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    dens = np.exp(est.score_samples(grid)).reshape(120, 120)
    gdens = np.exp(gmm.score_samples(grid)).reshape(120, 120)
    samples = est.sample(min(5000, len(X)), random_state=0)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    extent = (lo[0], hi[0], lo[1], hi[1])
    axes[0].scatter(*X[:5000].T, s=1, alpha=0.4)
    axes[0].set_title(f"{name}: data")
    axes[1].imshow(dens, origin="lower", extent=extent, aspect="auto")
    axes[1].set_title("ScoreFlowDensity density")
    axes[2].scatter(*samples.T, s=1, alpha=0.4, color="C1")
    axes[2].set_title("ScoreFlowDensity samples")
    axes[3].imshow(gdens, origin="lower", extent=extent, aspect="auto")
    axes[3].set_title("GaussianMixture density")
    for ax in axes:
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .datasets import DATASETS

    parser = argparse.ArgumentParser(
        prog="skscoreflow",
        description="Score-based diffusion density estimation (ScoreFlow) from the shell.",
    )
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="count", default=1,
                       help="more output (progress is on by default)")
    noise.add_argument("-q", "--quiet", action="store_const", const=0, dest="verbose",
                       help="no progress output")
    sub = parser.add_subparsers(dest="command", required=True)

    def data_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--n-samples", type=int, default=10_000,
                       help="rows to draw when DATA is a built-in dataset (default 10000)")
        p.add_argument("--data-seed", type=int, default=0,
                       help="seed when DATA is a built-in dataset (default 0)")

    p = sub.add_parser("fit", help="fit a model and save it")
    p.add_argument("data", help=f"CSV with header, .npy, or one of {sorted(DATASETS)}")
    p.add_argument("-o", "--output", required=True, help="model file to write")
    data_opts(p)
    _estimator_options(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("score", help="per-row log-density of DATA under MODEL")
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("-o", "--output", default=None, help="CSV/.npy to write (default stdout)")
    p.add_argument("--bound", action="store_true", help="the likelihood bound instead of the ODE")
    data_opts(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("sample", help="draw samples from MODEL")
    p.add_argument("model")
    p.add_argument("-n", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("-o", "--output", default=None, help="CSV/.npy to write (default stdout)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--method", choices=["ode", "sde"], default="ode")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="fit a built-in dataset and compare with GMM and KDE")
    p.add_argument("--dataset", default="moons", choices=sorted(DATASETS))
    p.add_argument("--n-samples", type=int, default=10_000)
    p.add_argument("--n-test", type=int, default=5_000)
    p.add_argument("--max-iter", type=int, default=None, help="optimizer steps (default: the estimator's)")
    p.add_argument("--plot", default=None, help="PNG to write (needs matplotlib)")
    p.set_defaults(func=cmd_demo)
    return parser


def _log_to_stderr(verbose: int) -> Callable[[], None]:
    """Progress and validation lines of the "skscoreflow" logger go to stderr (not with -q);
    returns the function that undoes it (``main`` leaves the logger as it found it)."""
    import logging

    logger = logging.getLogger("skscoreflow")
    if verbose <= 0:
        return lambda: None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("skscoreflow: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(level)

    return restore


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``skscoreflow`` console script; returns the exit code.

    Parameters
    ----------
    argv : sequence of str, optional
        Command-line arguments without the program name (``sys.argv[1:]`` when None).

    Returns
    -------
    int
        0 on success, 2 for a usage error, 3 for a data or model error, 130 after Ctrl-C.

    Examples
    --------
    >>> import os, tempfile
    >>> tmp = tempfile.mkdtemp()
    >>> model = os.path.join(tmp, "model.pt")
    >>> main(["fit", "moons", "--n-samples", "200", "--max-iter", "20",
    ...       "--hidden-layer-sizes", "16", "--random-state", "0", "-o", model])
    0
    >>> main(["sample", model, "-n", "3", "--seed", "0", "-o", os.path.join(tmp, "s.csv")])
    0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    restore = _log_to_stderr(args.verbose)
    try:
        return int(args.func(args))
    except CLIError as exc:
        # One line: library messages (e.g. scikit-learn's NaN message) may contain newlines.
        message = " ".join(str(exc).split())
        print(f"skscoreflow {args.command}: error: {message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:  # fit has already stopped cleanly and said where (a warning)
        print(f"skscoreflow {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        restore()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
