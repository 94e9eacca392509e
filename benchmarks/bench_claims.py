"""The paper's claims: SDE (VE, VP, sub-VP) x weighting (score matching, likelihood, likelihood
with importance sampling), on two 2-D sets and on digits.

For each cell: held-out ODE log-likelihood, the Theorem-3 bound, their gap,
and, for the trained likelihood-weighted models, the variance of the one-sample estimator of the
likelihood-weighted objective ``∫ g^2 E||s + z/sigma||^2 dt`` with uniform times versus times
from ``p_IS ∝ g^2/sigma^2`` (same model, same data, 20,000 draws): the variance ratio is what
importance sampling buys. Every cell trains with the same budget, seed and network.

The 2-D cells evaluate the ODE with the exact divergence. The digits cells (uniform dequantization,
one draw of ``u``) use the Hutchinson estimator with a fixed Rademacher probe: its log-density is
unbiased, so the mean over rows is an unbiased estimate of the same K=1 dequantization bound
(its noise is inside ``ode_se``), at about 1/30 of the cost of 64 exact backward passes per step.

    python benchmarks/bench_claims.py [--quick] [--jobs 2]

Writes ``docs/benchmarks/claims.{csv,md}`` and ``claims_samples.png`` (samples of each cell).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(__file__))
from _common import OUT_DIR, Timer, mean_se, write_table  # noqa: E402

SDES = ["ve", "vp", "subvp"]
WEIGHTINGS = ["score_matching", "likelihood", "likelihood_is"]
SETS_2D = ["checkerboard", "2spirals"]


def _budget(name: str, quick: bool) -> dict[str, Any]:
    if name == "digits":
        return dict(
            dequantization="uniform",
            hidden_layer_sizes=(256, 256, 256),
            max_iter=300 if quick else 1500,
            batch_size=256,
            learning_rate=1e-3,
        )
    return dict(max_iter=300 if quick else 2000)


def _data(name: str, quick: bool) -> tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        X, _ = load_digits(return_X_y=True)
        X_train, X_test = train_test_split(X, test_size=0.2, random_state=0)
        return X_train, X_test[:100] if quick else X_test
    from skscoreflow.datasets import make_dataset

    n_train, n_test = (1000, 500) if quick else (5000, 1000)
    return make_dataset(name, n_train, random_state=0), make_dataset(name, n_test, random_state=1)


def is_variance_ratio(est: Any, X: np.ndarray, n: int = 20_000, seed: int = 0) -> tuple[float, float]:
    """Var(uniform-time estimator) / Var(IS estimator) of the likelihood-weighted objective.

    Both one-sample estimators are unbiased for the same integral ``∫_eps^T g^2 E||s + z/sigma||^2
    dt / d``: ``(T - eps) g(t)^2 ||s + z/sigma||^2 / d`` with ``t ~ U`` and
    ``Z ||sigma s + z||^2 / d`` with ``t ~ p_IS``. Returns (ratio, relative difference of means).
    """
    import torch

    from skscoreflow.weighting import dsm_loss

    g = torch.Generator().manual_seed(seed)
    rows = torch.as_tensor(np.asarray(X, dtype=np.float64))
    idx = torch.randint(len(rows), (n,), generator=g)
    x = rows[idx]
    if est.dequantization is not None:
        x = x + torch.rand(x.shape, generator=g, dtype=x.dtype)
    x0 = torch.as_tensor((x.numpy() - est.mean_) / est.scale_, dtype=torch.float32)
    sde, eps, net = est.sde_, est.eps_, est.network_.cpu()
    with torch.no_grad():
        uni = dsm_loss(net, x0, sde, "likelihood", eps, generator=g) * (sde.T - eps)
        imp = dsm_loss(net, x0, sde, "likelihood_is", eps, generator=g) * float(sde.importance_normalizer(eps))
    uni, imp = uni.double().numpy(), imp.double().numpy()
    return float(uni.var() / imp.var()), float(abs(uni.mean() - imp.mean()) / imp.mean())


def run_cell(name: str, sde: str, weighting: str, quick: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from skscoreflow import ScoreFlowDensity

    X, Xt = _data(name, quick)
    d = X.shape[1]
    with Timer() as t:
        est = ScoreFlowDensity(sde=sde, weighting=weighting, random_state=0, **_budget(name, quick)).fit(X)
    if d > 2:
        # K=1 bound: only its mean is reported, and the Hutchinson log-density is unbiased.
        est.set_params(divergence="hutchinson")
    t0 = time.perf_counter()
    ll = est.score_samples(Xt)
    eval_s = time.perf_counter() - t0
    bnd = est.bound(Xt, n_time_samples=100 if quick else 200)
    m, se = mean_se(ll)
    mb, seb = mean_se(bnd)
    row: dict[str, Any] = {
        "dataset": name,
        "sde": sde,
        "weighting": weighting,
        "ode_loglik": m,
        "ode_se": se,
        "bound": mb,
        "bound_se": seb,
        "bound_gap": m - mb,
        "ode_bits_per_dim": -m / (d * math.log(2)),
        "bound_bits_per_dim": -mb / (d * math.log(2)),
        "is_variance_ratio": np.nan,
        "fit_s": t.seconds,
        "eval_s": eval_s,
        "load_1min": t.load,
    }
    if weighting in ("likelihood", "likelihood_is"):
        row["is_variance_ratio"], _ = is_variance_ratio(est, X, n=2000 if quick else 20_000)
    print(f"[{name}] {sde:5s} {weighting:14s} ode {m:.4f} bound {mb:.4f} ratio {row['is_variance_ratio']:.3g}",
          flush=True)
    samples = est.sample(2000 if d == 2 else 16, random_state=0)
    return {"row": row, "samples": samples}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--datasets", default=",".join(SETS_2D + ["digits"]))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    names = args.datasets.split(",")
    cells = [(n, s, w) for n in names for s in SDES for w in WEIGHTINGS]

    from joblib import Parallel, delayed

    t0 = time.perf_counter()
    outs = Parallel(n_jobs=args.jobs, backend="loky")(delayed(run_cell)(*c, args.quick) for c in cells)
    wall = time.perf_counter() - t0
    df = pd.DataFrame([o["row"] for o in outs])
    suffix = "_quick" if args.quick else ""
    budgets = "; ".join(
        f"{n}: " + ", ".join(f"`{k}={v!r}`" for k, v in _budget(n, args.quick).items()) for n in names
    )
    write_table(
        df,
        "claims" + suffix,
        "The paper's claims: SDE x weighting, ODE likelihood, bound, importance-sampling variance",
        notes=(
            f"Command: `python benchmarks/bench_claims.py{' --quick' if args.quick else ''}` "
            f"({wall / 60:.1f} min wall, {args.jobs} workers x 1 thread). Same seed, network and "
            f"budget in every cell ({budgets}); 2-D sets 5,000 train / 1,000 test rows, digits "
            "the fixed 80/20 split with uniform dequantization (log-likelihoods of the discrete "
            "rows: ODE = one-sample dequantized value, a bound on log P, with the Hutchinson divergence, "
            "unbiased for its mean; 2-D cells use the exact divergence). `bound` is the Theorem-3 "
            "lower bound (200 importance-sampled times per row); `bound_gap` = ODE − bound. "
            "`is_variance_ratio` = Var(uniform-time) / Var(importance-sampled) one-sample estimates "
            "of the likelihood-weighted objective on the trained model (20,000 draws; > 1 means "
            "importance sampling reduces variance)."
        ),
    )
    try:
        _plot(names, cells, outs, os.path.join(OUT_DIR, f"claims{suffix}_samples.png"))
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
    print(f"done in {wall / 60:.1f} min")


def _plot(names: list[str], cells: list, outs: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(names), len(SDES) * len(WEIGHTINGS)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.9 * n_cols, 2.0 * n_rows), squeeze=False)
    for (name, sde, w), out, ax in zip(cells, outs, axes.ravel()):
        S = out["samples"]
        if S.shape[1] == 2:
            ax.hist2d(S[:, 0], S[:, 1], bins=80, cmap="viridis")
        else:  # digits: a 4x4 mosaic of 8x8 samples
            tiles = S[:16].reshape(4, 4, 8, 8).transpose(0, 2, 1, 3).reshape(32, 32)
            ax.imshow(tiles, cmap="gray_r", vmin=0, vmax=16)
        ax.set_title(f"{name}\n{sde} / {w}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


if __name__ == "__main__":
    main()
