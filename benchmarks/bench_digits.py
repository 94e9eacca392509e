"""Discrete data: sklearn digits (8x8, values 0..16) in bits/dim, against the strongest anchors.

ScoreFlowDensity on the rows as 1x8x8 images (``image_shape=(1, 8, 8)``: the U-Net) and as flat
rows (the MLP path at its defaults), both with ``dequantization="variational"``, and with the
tuned MLP settings of earlier versions (``--tuned``), against: an independent per-pixel
histogram with add-one smoothing (an exact discrete model), and a CV-tuned GaussianMixture, a
CV-tuned KernelDensity and a zuko neural spline flow (5 transforms, fresh dequantization noise
every step, early stopping) fitted to uniformly dequantized data.

For every model the reported number is an upper bound on ``-log2 P(x) / 64`` of the discrete
test rows (the histogram's is exact): ScoreFlow's dequantization bounds, and ``-log2 p(x + u)``
of the anchors' densities of ``x + u`` (by Jensen also a bound on ``-log2 P(x)``), all averaged
over the same uniform ``u``.

    python benchmarks/bench_digits.py [--quick] [--tuned] [--threads N]

Writes docs/benchmarks/digits.{csv,md} and docs/benchmarks/digits_samples.png.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys

import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, os.path.dirname(__file__))
from _common import (  # noqa: E402
    OUT_DIR, Timer, fit_gmm, fit_kde, fit_nsf, load_average, mean_se, write_table,
)

from skscoreflow import ScoreFlowDensity  # noqa: E402

D = 64
LN2 = math.log(2)


LEVELS = 17


def default_params(quick: bool) -> dict:
    """The defaults, apart from the dequantization (and a shorter budget in quick mode)."""
    params = dict(dequantization="variational", random_state=0)
    if quick:
        params.update(max_iter=1500, dequantizer_max_iter=300)
    return params


def unet_params(quick: bool) -> dict:
    """The rows as 1x8x8 images (the U-Net at its "auto" sizes), with a U-Net's batch and rate."""
    params = dict(image_shape=(1, 8, 8), dequantization="variational", batch_size=128,
                  learning_rate=1e-3, max_iter=8000, random_state=0)
    if quick:
        params.update(max_iter=600, dequantizer_max_iter=300)
    return params


def tuned_params(quick: bool) -> dict:
    """The hand-tuned settings of the earlier digits table."""
    return dict(
        dequantization="variational",
        hidden_layer_sizes=(256, 256, 256),
        max_iter=1500 if quick else 6000,
        batch_size=256,
        learning_rate=1e-3,
        early_stopping=True,
        validation_fraction=0.1,
        n_iter_no_change=10,
        dequantizer_max_iter=300 if quick else 2000,
        random_state=0,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tuned", action="store_true",
                        help="also fit the earlier hand-tuned settings")
    parser.add_argument("--part", choices=["all", "anchors", "unet", "mlp"], default="all",
                        help="run only these rows and keep them for --merge (parts of one run "
                             "may run as concurrent processes)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="PART",
                        help="write the table from the kept rows of these parts")
    parser.add_argument("--unet-params", default=None, metavar="JSON",
                        help="U-Net settings that replace unet_params' (a further variant)")
    parser.add_argument("--part-name", default=None,
                        help="the name the part's rows are kept under (default: --part)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts_dir = os.path.join(OUT_DIR, "_parts")
    tag = "digits" + ("_quick" if args.quick else "")

    X, _ = load_digits(return_X_y=True)
    X_train, X_test = train_test_split(X, test_size=0.2, random_state=0)
    if args.quick:
        # 64 exact backward passes per ODE step dominate: quick mode scores a third of the rows.
        X_test = X_test[:120]
    rng = np.random.default_rng(0)
    U_train = X_train + rng.random(X_train.shape)
    U_test = X_test + rng.random(X_test.shape)
    rows = []

    def add(model: str, logp: np.ndarray, fit: Timer | None, detail: str) -> None:
        bpd = -logp / (D * LN2)
        m, se = mean_se(bpd)
        rows.append(
            {
                "model": model,
                "detail": detail,
                "test_bits_per_dim": m,
                "se": se,
                "fit_s": fit.seconds if fit else np.nan,
                "load_1min": fit.load if fit else load_average(),
            }
        )
        print(rows[-1], flush=True)

    def kept(part: str) -> str:
        return os.path.join(parts_dir, f"{tag}_{part}.pkl")

    if args.merge:
        import pickle

        samplers, fits = [], []
        for part in args.merge:
            with open(kept(part), "rb") as f:
                got = pickle.load(f)
            rows += got["rows"]
            samplers += got["samplers"]
            fits += got.get("fits") or _fits(part, args)
        return _write(rows, fits, samplers, args)
    if args.part in ("all", "anchors"):
        _anchors(add, X_train, X_test, U_train, U_test, args)
    samplers = []
    fits = _fits(args.part, args)
    for label, params in fits:
        samplers.append(_fit_scoreflow(add, label, params, X_train, X_test))
    if args.part == "all":
        return _write(rows, fits, samplers, args)
    import pickle

    os.makedirs(parts_dir, exist_ok=True)
    with open(kept(args.part_name or args.part), "wb") as f:
        pickle.dump({"rows": rows, "samplers": samplers, "fits": fits}, f)


def _fits(part: str, args: argparse.Namespace) -> list:
    fits = []
    if part in ("all", "unet"):
        if args.unet_params:
            import json

            extra = json.loads(args.unet_params)
            fits.append((f"U-Net, 1x8x8 images, {', '.join(f'{k}={v}' for k, v in extra.items())}",
                         {**unet_params(args.quick), **extra}))
        else:
            fits.append(("U-Net, 1x8x8 images", unet_params(args.quick)))
    if part in ("all", "mlp"):
        fits.append(("MLP, defaults", default_params(args.quick)))
        if args.tuned:
            fits.append(("MLP, tuned", tuned_params(args.quick)))
    return fits


def _anchors(add, X_train, X_test, U_train, U_test, args) -> None:
    with Timer() as t:
        # Add-one smoothing: P(x_j = v) = (count_j(v) + 1) / (n + L), pixels independent.
        counts = np.stack([np.bincount(X_train[:, j].astype(int), minlength=LEVELS)
                           for j in range(D)])
        logp_table = np.log((counts + 1) / (len(X_train) + LEVELS))
    hist = logp_table[np.arange(D), X_test.astype(int)].sum(axis=1)
    add("Per-pixel histogram", hist, t, "independent pixels, add-one smoothing (exact P(x))")
    with Timer() as t:
        gmm, k = fit_gmm(U_train, components=(1, 2, 4, 8, 16, 32))
    add("GaussianMixture", gmm.score_samples(U_test), t, f"{k} full-covariance components (CV), on x+u")
    with Timer() as t:
        kde, bw = fit_kde(U_train)
    add("KernelDensity", kde.score_samples(U_test), t, f"bandwidth {bw:.3f} (CV, standardised), on x+u")
    # As many steps as the U-Net may take (early stopping may end either sooner).
    nsf_steps = 1500 if args.quick else 8000
    with Timer() as t:
        nsf, ran = fit_nsf(X_train, max_iter=nsf_steps, transforms=5, seed=0, dequantize=True)
    add("zuko NSF", nsf.score_samples(U_test), t,
        f"5 transforms, {ran} of {nsf_steps} steps (early stopping), fresh x+u every step")



def _fit_scoreflow(add, label, params, X_train, X_test) -> tuple:
    """Fit one ScoreFlow model; add its uniform, variational and bound rows."""
    if True:  # noqa: SIM108 (keeps the block's indentation)
        with Timer() as t:
            est = ScoreFlowDensity(**params).fit(X_train)
        name = f"ScoreFlowDensity ({label})"
        steps = (f"{est.n_iter_} steps, early_stopping_={est.early_stopping_}, "
                 f"+{est.get_params()['dequantizer_max_iter']} dequantizer steps")
        if est.network_type_ == "unet":
            n = sum(p.numel() for p in est.network_.parameters())
            steps += f", {n:,} parameters, {est.unet_sizes_}"
        # The MLP's "auto" divergence is exact (64 backward passes per ODE step), the U-Net's
        # Hutchinson (one): the K-draw bound is importance-weighted only with the exact one.
        exact = est.network_type_ == "mlp"
        uniform = copy.deepcopy(est)
        uniform.set_params(dequantization="uniform", n_dequantization_samples=1)
        uniform.dequantizer_ = None  # same score network, uniform q(u|x)
        with Timer() as te:
            logp = uniform.score_samples(X_test)
        add(name, logp, t, f"uniform dequantization, K=1 ({steps}; ODE {te.seconds:.0f} s)")
        for K in (1, 4) if exact else (1,):
            est.set_params(n_dequantization_samples=K)
            with Timer() as te:
                logp = est.score_samples(X_test)
            add(name, logp, t, f"variational dequantization, K={K} ({steps}; ODE "
                               f"{te.seconds:.0f} s, {'exact' if exact else 'Hutchinson'} "
                               "divergence)")
        est.set_params(n_dequantization_samples=1)
        add(name + " bound", est.bound(X_test, n_time_samples=200), t,
            "variational, Theorem-3 bound instead of the ODE")
        return label, est


def _write(rows, fits, samplers, args) -> None:
    df = pd.DataFrame(rows)
    parts = (f" Run as concurrent parts (one process each, `--part {' / '.join(args.merge)} "
             f"--threads {args.threads}`, then `--merge {' '.join(args.merge)}`); `fit_s` and "
             "`load_1min` are each part's own, on the shared 2 cores." if args.merge else "")
    write_table(
        df,
        "digits" + ("_quick" if args.quick else ""),
        "sklearn digits: held-out bits/dim (lower is better)",
        notes=(
            f"Command: `python benchmarks/bench_digits.py{' --quick' if args.quick else ''}`. "
            "Fixed split `train_test_split(test_size=0.2, random_state=0)` (1437 / 360 rows, 64 "
            f"dims, values 0..16{'; quick mode scores the first 120 test rows' if args.quick else ''}).{parts} "
            "Every number bounds -log2 P(x)/64 of the discrete test rows from above (the "
            "histogram's is exact). The MLP's ODE uses the exact divergence, so exp(log p) is "
            "unbiased and its K-sample bound is a true bound; the U-Net's uses Hutchinson's "
            "estimate (one Rademacher probe per row), an unbiased estimate of the K=1 bound. "
            "ScoreFlow parameters: "
            + "; ".join(f"{label}: " + ", ".join(f"`{k}={v!r}`" for k, v in params.items())
                        for label, params in fits)
            + ". The uniform rows reuse the variational model's score network with q(u|x) "
            "uniform. `fit_s` of a ScoreFlow row is its whole fit (score network and "
            "dequantizer)."
        ),
    )
    try:
        _plot_samples(samplers, os.path.join(OUT_DIR, f"digits{'_quick' if args.quick else ''}_samples.png"))
    except ImportError:
        print("matplotlib not installed: no sample grid", file=sys.stderr)


def _plot_samples(samplers: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grids = plt.subplots(1, len(samplers), figsize=(5 * len(samplers), 5.4))
    for grid, (label, est) in zip(np.atleast_1d(grids), samplers):
        S = est.sample(64, random_state=0)
        tiles = S.reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, 64)
        grid.imshow(tiles, cmap="gray_r", vmin=0, vmax=16)
        grid.set_title(label)
        grid.axis("off")
    fig.suptitle("ScoreFlowDensity samples (digits, integers 0..16, probability-flow ODE)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
