"""Small real tables at default settings: ScoreFlowDensity against the strongest anchors.

scikit-learn's bundled tables (no downloads): iris, wine, breast cancer and diabetes (features
only), each over 5 random 80/20 splits (``train_test_split(test_size=0.2, random_state=s)``,
s = 0..4), standardised by the training rows.  Per split and method: the mean test
log-likelihood of the standardised rows (nats per row).  Methods, side by side in one run:
``ScoreFlowDensity`` at its defaults, a CV-tuned GaussianMixture (full covariances, 1-8
components, 3-fold CV), a CV-tuned KernelDensity (bandwidth by 3-fold CV) and a zuko neural
spline flow (5 transforms, early stopping on a 10 % validation split, at most 10,000 steps).

    python benchmarks/bench_tables.py [--quick] [--splits 5]

Writes docs/benchmarks/tables{_quick}.{csv,md} (one row per table, method and split) and
tables{_quick}_summary.{csv,md} (mean over splits with its standard error, and the paired
difference to the best anchor with its standard error).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(__file__))
from _common import fit_gmm, fit_kde, fit_nsf, load_average, write_table  # noqa: E402

TABLES = ("iris", "wine", "breast_cancer", "diabetes")
ANCHORS = ("GaussianMixture (CV)", "KernelDensity (CV)", "zuko NSF")
SCOREFLOW = "ScoreFlowDensity (defaults)"


def load(name: str) -> np.ndarray:
    from sklearn import datasets

    loader = {"iris": datasets.load_iris, "wine": datasets.load_wine,
              "breast_cancer": datasets.load_breast_cancer,
              "diabetes": datasets.load_diabetes}[name]
    return np.asarray(loader().data, dtype=np.float64)


def run_split(name: str, X: np.ndarray, split: int, max_iter: int | None) -> list[dict]:
    from sklearn.model_selection import train_test_split

    from skscoreflow import ScoreFlowDensity

    Xtr, Xte = train_test_split(X, test_size=0.2, random_state=split)
    mean, scale = Xtr.mean(0), Xtr.std(0)
    Ztr, Zte = (Xtr - mean) / scale, (Xte - mean) / scale

    def scoreflow():
        params = {} if max_iter is None else {"max_iter": max_iter}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a ConvergenceWarning is recorded in the row
            est = ScoreFlowDensity(random_state=split, **params).fit(Ztr)
        return est, (f"early_stopping_={est.early_stopping_}, {est.n_iter_} steps, "
                     f"dropout_={est.dropout_}")

    def gmm():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est, k = fit_gmm(Ztr, components=(1, 2, 3, 4, 6, 8), seed=split)
        return est, f"{k} components"

    def kde():
        est, bw = fit_kde(Ztr, seed=split)
        return est, f"bandwidth {bw:.3f}"

    def nsf():
        steps = 10_000 if max_iter is None else max_iter
        est, ran = fit_nsf(Ztr, max_iter=steps, transforms=5, seed=split)
        return est, f"{ran} of {steps} steps"

    rows = []
    for method, fit in ((SCOREFLOW, scoreflow), (ANCHORS[0], gmm), (ANCHORS[1], kde),
                        (ANCHORS[2], nsf)):
        t0 = time.perf_counter()
        model, info = fit()
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ll = model.score_samples(Zte)
        rows.append({"table": name, "n_train": len(Ztr), "d": X.shape[1], "split": split,
                     "method": method, "test_loglik": float(np.mean(ll)), "setting": info,
                     "fit_s": fit_s, "eval_s": time.perf_counter() - t0, "load": load_average()})
        print(rows[-1], flush=True)
    return rows


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over splits with its SE, and each method's paired difference to the best anchor."""
    out = []
    for name, sub in df.groupby("table", sort=False):
        wide = sub.pivot(index="split", columns="method", values="test_loglik")
        k = len(wide)
        means = wide.mean()
        best = max(ANCHORS, key=lambda m: means[m])
        for method in wide.columns:
            diff = wide[method] - wide[best]
            se = float(wide[method].std(ddof=1) / np.sqrt(k))
            dse = float(diff.std(ddof=1) / np.sqrt(k))
            verdict = ""
            if method == SCOREFLOW:
                d = float(diff.mean())
                if abs(d) <= dse:
                    verdict = "tie (" + ("ahead" if d > 0 else "behind") + " within 1 SE)"
                else:
                    verdict = "better" if d > 0 else "worse"
            out.append({"table": name, "n_train": int(sub.n_train.iloc[0]),
                        "d": int(sub.d.iloc[0]), "method": method,
                        "test_loglik": float(means[method]), "se": se,
                        "best_anchor": best, "diff_to_best_anchor": float(diff.mean()),
                        "diff_se": dse, "verdict": verdict,
                        "fit_s": float(sub[sub.method == method].fit_s.median())})
    return pd.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--max-iter", type=int, default=None,
                        help="ScoreFlow and flow steps (default: ScoreFlow's default)")
    parser.add_argument("--quick", action="store_true", help="iris and wine, 2 splits, 300 steps")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    if args.quick:
        args.tables, args.splits, args.max_iter = ["iris", "wine"], 2, 300
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = [r for name in args.tables for s in range(args.splits)
            for r in run_split(name, load(name), s, args.max_iter)]
    df = pd.DataFrame(rows)
    summary = summarize(df)
    name = "tables_quick" if args.quick else "tables"
    cmd = "python " + " ".join(["benchmarks/bench_tables.py", *sys.argv[1:]])
    notes = f"""
Command: `{cmd}` ({(time.perf_counter() - t0) / 60:.1f} min, one torch thread).
scikit-learn's bundled tables, {args.splits} random 80/20 splits each
(`train_test_split(test_size=0.2, random_state=s)`), standardised by the training rows;
`test_loglik` is the mean held-out log-likelihood of the standardised rows (nats per row, higher
is better), averaged over the splits, `se` its standard error over the splits.
`diff_to_best_anchor` is the paired (same split) difference to the anchor with the best mean, with
its standard error `diff_se`; `verdict` counts a difference within one `diff_se` as a tie and
says which way it falls.  Anchors: GaussianMixture (full covariances, 1-8 components by 3-fold CV),
KernelDensity (bandwidth by 3-fold CV), zuko NSF (5 transforms, early stopping).  `fit_s` is the
median over splits on a shared 2-core machine; per-split rows with the load are in
`{name}.csv`.
"""
    out_dir = args.out_dir or os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks")
    write_table(df, name, "Small real tables: per split", notes, out_dir=out_dir)
    write_table(summary, name + "_summary", "Small real tables at default settings", notes,
                out_dir=out_dir)


if __name__ == "__main__":
    main()
