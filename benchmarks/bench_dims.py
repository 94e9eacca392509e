"""Quality as the dimension grows: the known-truth family ``datasets.ProductDensity``.

For each dimension ``d`` (independent pairs of the built-in 2-D sets, mixed by a random
orthogonal rotation) and each training size ``n``, fits side by side in one run: the
ScoreFlowDensity defaults, a CV-tuned GaussianMixture, a CV-tuned KernelDensity and a zuko
neural spline flow (5 transforms, early stopping, as many steps as ScoreFlow's budget), and
reports each model's gap to the true density per dimension on held-out rows,
``(mean log p_true - mean log p_model) / d`` (nats/dim, lower is better), with its paired
standard error, and the fit and evaluation times.

    python benchmarks/bench_dims.py [--dims 2 4 8 16 32] [--n 1000 10000] [--quick]

Writes docs/benchmarks/dims{_quick}.{csv,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(__file__))
from _common import fit_gmm, fit_kde, fit_nsf, load_average, write_table  # noqa: E402


def run(d: int, n: int, n_test: int, max_iter: int | None, seed: int) -> list[dict]:
    from skscoreflow import ScoreFlowDensity
    from skscoreflow.datasets import ProductDensity

    density = ProductDensity(d, rotate=True, random_state=seed)
    X = density.sample(n, random_state=seed + 1)
    X_test = density.sample(n_test, random_state=seed + 2)
    truth = density.log_density(X_test)

    def scoreflow():
        params = {} if max_iter is None else {"max_iter": max_iter}
        est = ScoreFlowDensity(random_state=seed, **params).fit(X)
        return est, (f"{est.n_iter_} of {est.max_iter} steps, early_stopping_="
                     f"{est.early_stopping_}, dropout_={est.dropout_}, "
                     f"gaussian_reference_={est.gaussian_reference_!r}")

    def gmm():
        est, k = fit_gmm(X, components=(1, 2, 4, 8, 16, 32, 64, 128), seed=seed)
        return est, f"{k} components"

    def kde():
        est, bw = fit_kde(X, seed=seed)
        return est, f"bandwidth {bw:.3f} (standardised)"

    def nsf():
        steps = 10_000 if max_iter is None else max_iter
        est, ran = fit_nsf(X, max_iter=steps, transforms=5, seed=seed)
        return est, f"{ran} of {steps} steps"

    rows = []
    for name, fit in (("ScoreFlow (defaults)", scoreflow), ("GaussianMixture (CV)", gmm),
                      ("KernelDensity (CV)", kde), ("zuko NSF", nsf)):
        t0 = time.perf_counter()
        model, info = fit()
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ll = model.score_samples(X_test)
        eval_s = time.perf_counter() - t0
        diff = truth - ll  # per row; paired with the truth
        rows.append({
            "d": d, "n_train": n, "method": name,
            "gap_per_dim": float(diff.mean() / d),
            "se_per_dim": float(diff.std(ddof=1) / np.sqrt(len(diff)) / d),
            "true_ll_per_dim": float(truth.mean() / d),
            "fit_s": fit_s, "eval_s": eval_s, "setting": info, "load": load_average(),
        })
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--n", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--n-test", type=int, default=5_000)
    parser.add_argument("--max-iter", type=int, default=None,
                        help="ScoreFlow and flow steps (default: ScoreFlow's default)")
    parser.add_argument("--quick", action="store_true", help="d = 2, 4; n = 1,000; 300 steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--name", default=None, help="output name (default dims / dims_quick)")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    if args.quick:
        args.dims, args.n, args.n_test, args.max_iter = [2, 4], [1_000], 1_000, 300
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows: list[dict] = []
    name = args.name or ("dims_quick" if args.quick else "dims")
    for d in args.dims:
        for n in args.n:
            rows += run(d, n, args.n_test, args.max_iter, args.seed)
            # Written after every (d, n): a long run leaves its finished part behind.
            write(pd.DataFrame(rows), name, args, time.perf_counter() - t0)


def write(df: pd.DataFrame, name: str, args: argparse.Namespace, seconds: float) -> None:
    cmd = "python " + " ".join(["benchmarks/bench_dims.py", *sys.argv[1:]])
    notes = f"""
Known-truth family `skscoreflow.datasets.ProductDensity(d, rotate=True)`: independent pairs of
the built-in 2-D sets (checkerboard, 8gaussians, moons, circles, rings, 2spirals, cycled), mixed
by a random orthogonal rotation.  `gap_per_dim`: (mean true log-density - mean model
log-density) / d on {args.n_test:,} held-out rows, nats per dimension (lower is better; 0 is
the truth), `se_per_dim` its paired standard error.  Fit and evaluation seconds on this shared
2-core machine, with the load.  Command: `{cmd}` ({seconds / 60:.1f} min).
"""
    write_table(df, name, "Quality as the dimension grows (known-truth product densities)",
                notes, out_dir=args.out_dir or os.path.join(os.path.dirname(__file__), "..",
                                                            "docs", "benchmarks"))


if __name__ == "__main__":
    main()
