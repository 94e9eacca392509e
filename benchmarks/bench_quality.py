"""Density quality: ScoreFlowDensity against the anchors, same splits and seeds, one run.

2-D sets (``--n-train`` / ``--n-test`` independent draws, seeds 0 and 1, default 20,000 each):
the true density (oracle row, where it is known), GaussianMixture (components by 3-fold CV),
KernelDensity (bandwidth by 3-fold CV), a zuko neural spline flow, ScoreFlowDensity with its
defaults, and ScoreFlowDensity "grid": the best of ``GRID`` chosen on a validation split of the
training rows (never on the test rows).

Tabular sets (sklearn ``load_wine``, ``load_breast_cancer``): fixed 80/20 split, standardised with
the training rows' mean and std; the same anchors; ScoreFlow defaults and the best of
``TABULAR_GRID`` (early stopping), chosen on a validation split.

    python benchmarks/bench_quality.py [--quick] [--datasets rings,moons] [--jobs 2]

Datasets run in ``--jobs`` worker processes with one torch thread each (on 2 cores this is much
faster than one process with 2 threads: small networks scale poorly across threads). Writes
``docs/benchmarks/quality.{csv,md}``, ``quality_<dataset>.png`` (true samples / ScoreFlow density /
ScoreFlow samples / best anchor density) and ``quality_curves.png`` (loss and validation curves).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(__file__))
from _common import OUT_DIR, Timer, fit_gmm, fit_kde, fit_nsf, load_average, mean_se, write_table  # noqa: E402

TWO_D = ["8gaussians", "checkerboard", "2spirals", "pinwheel", "rings", "moons", "circles"]
TABULAR = ["wine", "breast_cancer"]

# The small grid for 2-D sets (only with --grid-2d: it doubles the suite's dominant cost, the
# score-model fits): the defaults (128 damped Fourier features on 2-D data) and the plain
# network, which can be better on smooth densities.
GRID: list[dict[str, Any]] = [
    {},
    {"fourier_features": 0},
]
# Small standardised tables: regularisation by early stopping and network size.
TABULAR_GRID: list[dict[str, Any]] = [
    {"early_stopping": True, "hidden_layer_sizes": (64, 64), "max_iter": 5000, "batch_size": 128},
    {"early_stopping": True, "hidden_layer_sizes": (128, 128, 128), "max_iter": 5000, "batch_size": 128},
    {"early_stopping": True, "hidden_layer_sizes": (128, 128, 128), "max_iter": 5000, "batch_size": 128,
     "learning_rate": 5e-4},
]


def _load(name: str, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    from skscoreflow.datasets import has_true_density, make_dataset, true_log_density

    if name in TABULAR:
        from sklearn import datasets
        from sklearn.model_selection import train_test_split

        X = getattr(datasets, f"load_{name}")().data
        X_train, X_test = train_test_split(X, test_size=0.2, random_state=0)
        mu, sd = X_train.mean(0), X_train.std(0)
        return (X_train - mu) / sd, (X_test - mu) / sd, None
    X = make_dataset(name, n_train, random_state=0)
    Xt = make_dataset(name, n_test, random_state=1)
    return X, Xt, true_log_density(name, Xt) if has_true_density(name) else None


def run_dataset(
    name: str, n_train: int, n_test: int, quick: bool, grid_2d: bool = False, grid_only: bool = False
) -> dict[str, Any]:
    """Fit every model on one dataset (in a worker process with one torch thread).

    ``grid_only``: the oracle row and the ScoreFlow grid alone (2-D sets; ``--grid-only``).
    """
    import torch

    torch.set_num_threads(1)
    from skscoreflow import ScoreFlowDensity

    X, Xt, truth = _load(name, n_train, n_test)
    tabular = name in TABULAR
    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}

    def add(model: str, logp: np.ndarray, fit: Timer | None, detail: str, eval_s: float = 0.0) -> None:
        m, se = mean_se(logp)
        rows.append(
            {
                "dataset": name,
                "model": model,
                "detail": detail,
                "test_loglik": m,
                "se": se,
                "gap_to_truth": float(truth.mean() - m) if truth is not None else np.nan,
                "paired_se": float(np.std(truth - logp, ddof=1) / np.sqrt(len(logp)))
                if truth is not None
                else np.nan,
                "fit_s": fit.seconds if fit else 0.0,
                "eval_s": eval_s,
                "load_1min": fit.load if fit else load_average(),
            }
        )
        print(f"[{name}] {model:28s} {m:9.4f} ± {se:.4f}  {detail}", flush=True)

    def evaluate(model: str, est: Any, fit: Timer, detail: str) -> np.ndarray:
        t0 = time.perf_counter()
        logp = est.score_samples(Xt)
        add(model, logp, fit, detail, time.perf_counter() - t0)
        models[model] = est
        return logp

    if truth is not None:
        add("true density", truth, None, "oracle")
    base: dict[str, Any] = {"random_state": 0}
    if quick:
        base["max_iter"] = 1000
    curves: dict[str, Any] = {}
    if grid_only:
        return _run_grid(name, X, Xt, base, GRID, quick, evaluate, rows, curves, models, tabular)
    components = (1, 2, 3, 4, 6, 8) if tabular else ((8, 32, 128) if quick else (4, 8, 16, 32, 64, 128))
    with Timer() as t:
        gmm, k = fit_gmm(X, components=components)
    evaluate("GaussianMixture", gmm, t, f"{k} components (3-fold CV)")
    with Timer() as t:
        kde, bw = fit_kde(X)
    evaluate("KernelDensity", kde, t, f"bandwidth {bw:.3f} (3-fold CV, standardised)")
    nsf_iter = 1000 if quick else 5000
    with Timer() as t:
        nsf, steps = fit_nsf(X, max_iter=nsf_iter, batch_size=min(512, len(X)))
    evaluate("zuko NSF", nsf, t, f"4 transforms, 2x128 hidden, {steps} steps (early stopping)")

    with Timer() as t:
        est = ScoreFlowDensity(**base).fit(X)
    evaluate("ScoreFlowDensity", est, t, f"defaults, {est.n_iter_} steps")
    curves["defaults"] = (est.loss_curve_, [])

    grid = TABULAR_GRID if tabular else (GRID if grid_2d else [])
    if not grid:
        return {"rows": rows, "curves": curves, "plot": _plot_data(name, X, Xt, models, rows)}
    return _run_grid(name, X, Xt, base, grid, quick, evaluate, rows, curves, models, tabular)


def _run_grid(
    name: str, X: np.ndarray, Xt: np.ndarray, base: dict[str, Any], grid: list[dict[str, Any]],
    quick: bool, evaluate: Any, rows: list, curves: dict, models: dict, tabular: bool,
) -> dict[str, Any]:
    from skscoreflow import ScoreFlowDensity

    if quick:
        grid = [{**g, "max_iter": min(g.get("max_iter", 1000), 1000)} for g in grid[:2]]
    # Choose on a validation split of the training rows; report the chosen fit on the test rows.
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(X))
    n_val = max(1, len(X) // 10)
    X_fit, X_val = X[perm[n_val:]], X[perm[:n_val]]
    best = None
    with Timer() as t:
        for i, params in enumerate(grid):
            cand = ScoreFlowDensity(**{**base, **params}).fit(X_fit)
            val = float(np.mean(cand.score_samples(X_val)))
            print(f"[{name}] grid {i} {params}: validation {val:.4f} ({cand.n_iter_} steps)", flush=True)
            if best is None or val > best[0]:
                best = (val, i, params, cand)
    assert best is not None
    _, i_best, p_best, cand = best
    detail = f"grid #{i_best} {p_best or 'defaults'}, {cand.n_iter_} steps, chosen on validation"
    evaluate("ScoreFlowDensity (grid)", cand, t, detail)
    curves["grid"] = (cand.loss_curve_, list(cand.validation_scores_ or []))

    out: dict[str, Any] = {"rows": rows, "curves": curves}
    if not tabular and "ScoreFlowDensity" in models:
        out["plot"] = _plot_data(name, X, Xt, models, rows)
    return out


def _plot_data(name: str, X: np.ndarray, Xt: np.ndarray, models: dict[str, Any], rows: list) -> dict:
    """Grid densities and samples for the 4-panel figure (computed in the worker)."""
    lo, hi = np.quantile(Xt, 0.001, axis=0), np.quantile(Xt, 0.999, axis=0)
    pad = 0.1 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    n = 64
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n))
    G = np.column_stack([gx.ravel(), gy.ravel()])
    sf = models["ScoreFlowDensity"]
    anchors = [r for r in rows if r["model"] in ("GaussianMixture", "KernelDensity", "zuko NSF")]
    best_anchor = max(anchors, key=lambda r: r["test_loglik"])["model"]
    return {
        "extent": (lo[0], hi[0], lo[1], hi[1]),
        "true": Xt[:5000],
        "sf_density": np.exp(sf.score_samples(G)).reshape(n, n),
        "sf_samples": sf.sample(5000, random_state=0),
        "anchor": best_anchor,
        "anchor_density": np.exp(models[best_anchor].score_samples(G)).reshape(n, n),
    }


def _plot(name: str, data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ext = data["extent"]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
    hist_kw = dict(bins=120, range=[ext[:2], ext[2:]], cmap="viridis")
    axes[0].hist2d(*data["true"].T, **hist_kw)
    axes[0].set_title("true samples")
    axes[1].imshow(data["sf_density"], origin="lower", extent=ext, aspect="auto", cmap="viridis")
    axes[1].set_title("ScoreFlow density")
    axes[2].hist2d(*data["sf_samples"].T, **hist_kw)
    axes[2].set_title("ScoreFlow samples (ODE)")
    axes[3].imshow(data["anchor_density"], origin="lower", extent=ext, aspect="auto", cmap="viridis")
    axes[3].set_title(f"best anchor: {data['anchor']}")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def _plot_curves(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for name, res in results.items():
        loss = np.asarray(res["curves"]["defaults"][0], dtype=float)
        if len(loss) > 50:  # moving average over 1% of the run: the raw curve is DSM noise
            w = max(1, len(loss) // 100)
            loss = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax1.plot(loss, label=name, lw=1)
        val = res["curves"].get("grid", ([], []))[1]
        if len(val):
            ax2.plot(val, label=name, marker=".")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("training loss (defaults, moving average)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("validation check")
    ax2.set_ylabel("validation log-likelihood (early-stopping fits)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def _write_grid_only(df: pd.DataFrame, suffix: str, wall: float, args: Any, n_train: int, n_test: int) -> None:
    """``quality_grid2d``: the grid rows, with the defaults and anchors of ``quality.csv``."""
    full = os.path.join(OUT_DIR, f"quality{suffix}.csv")
    rows = [df]
    if os.path.exists(full):
        ref = pd.read_csv(full)
        ref = ref[ref.dataset.isin(df.dataset) & (ref.model != "true density")]
        rows.append(ref.assign(detail=ref.detail + " [quality.csv]"))
    out = pd.concat(rows, ignore_index=True)
    order = {n: i for i, n in enumerate(df.dataset.unique())}
    out = out.sort_values("dataset", key=lambda c: c.map(order), kind="stable")
    cmd = "python benchmarks/bench_quality.py --grid-only" + (" --quick" if args.quick else "")
    grid_txt = ", ".join(repr(g) if g else "defaults" for g in GRID)
    write_table(
        out,
        "quality_grid2d" + suffix,
        "2-D sets: ScoreFlowDensity's small grid beside the defaults and the anchors",
        notes=(
            f"Command: `{cmd}` ({wall / 60:.1f} min wall, {args.jobs} worker processes with one "
            f"torch thread each). The grid ({grid_txt}) is fitted on 90% of the {n_train:,} "
            "training rows and chosen on the other 10%; the chosen fit is scored on the "
            f"{n_test:,} test rows. Rows marked [quality.csv] are that table's (the same splits "
            "and seeds, from `python benchmarks/bench_quality.py`); the grid is not part of the "
            "default suite because it doubles its dominant cost, the score-model fits."
        ),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small budgets and 2,000-row sets")
    parser.add_argument("--datasets", default=",".join(TWO_D + TABULAR))
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--grid-2d", action="store_true", help="also run the 2-D grid (doubles the cost)")
    parser.add_argument(
        "--grid-only", action="store_true",
        help="only the 2-D grid, written to quality_grid2d.{csv,md} beside quality.csv's rows "
        "(the same splits and seeds)",
    )
    args = parser.parse_args(argv)
    if args.grid_only:
        if args.datasets == ",".join(TWO_D + TABULAR):
            args.datasets = ",".join(TWO_D)
        if any(n in TABULAR for n in args.datasets.split(",")):
            parser.error("--grid-only is for the 2-D sets (the tabular grid runs in every suite)")
    n_train = args.n_train or (2000 if args.quick else 20_000)
    n_test = args.n_test or (2000 if args.quick else 20_000)
    names = args.datasets.split(",")

    from joblib import Parallel, delayed

    t0 = time.perf_counter()
    outs = Parallel(n_jobs=args.jobs, backend="loky")(
        delayed(run_dataset)(name, n_train, n_test, args.quick, args.grid_2d, args.grid_only)
        for name in names
    )
    results = dict(zip(names, outs))
    wall = time.perf_counter() - t0
    df = pd.DataFrame([r for res in outs for r in res["rows"]])
    suffix = "_quick" if args.quick else ""
    if args.grid_only:
        _write_grid_only(df, suffix, wall, args, n_train, n_test)
        print(f"done in {wall / 60:.1f} min")
        return
    cmd = "python benchmarks/bench_quality.py" + (" --quick" if args.quick else "")
    write_table(
        df,
        "quality" + suffix,
        "Held-out log-likelihood: ScoreFlowDensity vs GaussianMixture, KernelDensity, zuko NSF",
        notes=(
            f"Command: `{cmd}` ({wall / 60:.1f} min wall, {args.jobs} worker processes with one "
            f"torch thread each). 2-D sets: {n_train:,} train / {n_test:,} test rows, independent "
            "draws (seeds 0 and 1); `gap_to_truth` = true mean log-density minus the model's "
            "(lower is better; `paired_se` its standard error). Tabular sets: sklearn's data, "
            "80/20 split (`random_state=0`), standardised by the training rows (log-likelihood of "
            "the standardised rows). `ScoreFlowDensity (grid)`: the best of the documented grid "
            "in `benchmarks/bench_quality.py`, chosen on a 10% validation split of the training rows "
            "and fitted on the other 90% (tabular sets always; 2-D sets only with `--grid-2d`). "
            "zuko NSF: at most 5,000 Adam steps (batch 512, lr 1e-3, cosine), best validation "
            "weights kept. `fit_s` includes the anchors' CV searches; `load_1min` is "
            "the machine's load when the fit ended."
        ),
    )
    try:
        for name, res in results.items():
            if "plot" in res:
                _plot(name, res["plot"], os.path.join(OUT_DIR, f"quality{suffix}_{name}.png"))
        _plot_curves(results, os.path.join(OUT_DIR, f"quality{suffix}_curves.png"))
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
    print(f"done in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
