"""GPU figures: the quality benchmark's default fits trained and evaluated on a CUDA device, and a
GPU-trained model reloaded in a CPU-only process.

    python benchmarks/bench_gpu.py [--quick] [--jobs 4] [--datasets moons,rings] [--out-dir DIR]

1. **Quality on the GPU.** For each 2-D set of ``bench_quality.py`` (the same 20,000 / 20,000
   draws, seeds 0 and 1), ``ScoreFlowDensity(random_state=0, device="cuda")`` with every other
   parameter at its default: held-out log-likelihood ± se, gap to the true density, fit and
   ``score_samples`` seconds. Beside it, from ``docs/benchmarks/quality.csv`` (same rows, same
   seed, trained on the CPU), the CPU defaults' log-likelihood and the best anchor's. CPU and GPU
   draw different random streams, so the two fits are different draws of the same procedure.
   Sets run in ``--jobs`` processes sharing the GPU: their fit times are under that contention
   (the clean single-process training speed is in ``speed_gpu.md``).
2. **GPU model on a CPU-only machine.** The first set's GPU model is pickled and written with
   ``save``; a fresh process with ``CUDA_VISIBLE_DEVICES=""`` (no GPU visible) loads both, checks
   the ``RuntimeWarning`` and ``device_``, and scores 2,000 test rows on the CPU. Reported: the
   largest difference from the GPU's log-densities of the same rows (float32 kernels differ
   between the devices; the ODE solver's tolerance is 1e-5).

Writes ``gpu.{csv,md}`` into ``--out-dir`` (default ``docs/benchmarks``), after each set, so a
run stopped early keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(__file__))
from _common import OUT_DIR, device_label, load_average, markdown_table, mean_se, write_table  # noqa: E402
from bench_quality import TWO_D, _load  # noqa: E402

RELOAD_ROWS = 2000

_RELOAD_SCRIPT = """
import json, pickle, sys, warnings
import numpy as np
import torch
from skscoreflow import ScoreFlowDensity

assert not torch.cuda.is_available(), "the reload process must not see a GPU"
X = np.load(sys.argv[1])
out = {}
for how in ("pickle", "save"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "pickle":
            with open(sys.argv[2], "rb") as fh:
                est = pickle.load(fh)
        else:
            est = ScoreFlowDensity.load(sys.argv[3])
    out[how] = {
        "device": str(est.device_),
        "warning": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "logp": est.score_samples(X).tolist(),
    }
print(json.dumps(out))
"""


def run_set(name: str, n_train: int, n_test: int, device: str, quick: bool, save_dir: str | None) -> dict:
    """Fit the defaults on ``device`` and score the test rows (in a worker process)."""
    import pickle

    import torch

    torch.set_num_threads(1)
    from skscoreflow import ScoreFlowDensity

    X, Xt, truth = _load(name, n_train, n_test)
    est = ScoreFlowDensity(random_state=0, device=device, **({"max_iter": 1000} if quick else {}))
    t0 = time.perf_counter()
    est.fit(X)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logp = est.score_samples(Xt)
    eval_s = time.perf_counter() - t0
    m, se = mean_se(logp)
    row = {
        "dataset": name,
        "device": device_label(device),
        "test_loglik": m,
        "se": se,
        "gap_to_truth": float(truth.mean() - m) if truth is not None else np.nan,
        "fit_s": fit_s,
        "eval_s": eval_s,
        "steps": est.n_iter_,
        "load_1min": load_average(),
    }
    if save_dir is not None:
        with open(os.path.join(save_dir, "model.pkl"), "wb") as fh:
            pickle.dump(est, fh)
        est.save(os.path.join(save_dir, "model.pt"))
        np.save(os.path.join(save_dir, "rows.npy"), Xt[:RELOAD_ROWS])
        # Scored again on their own: the CPU process solves these rows as one chunk, and the
        # adaptive step is shared by the rows of a chunk (a 20,000-row call uses other chunks).
        np.save(os.path.join(save_dir, "logp_gpu.npy"), est.score_samples(Xt[:RELOAD_ROWS]))
    print(f"[{name}] {device}: {m:.4f} ± {se:.4f}, fit {fit_s:.1f}s, eval {eval_s:.1f}s", flush=True)
    return row


def reload_on_cpu(save_dir: str) -> list[dict[str, Any]]:
    """Load the saved GPU model in a process that sees no GPU; compare its log-densities."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, os.path.join(save_dir, "rows.npy"),
         os.path.join(save_dir, "model.pkl"), os.path.join(save_dir, "model.pt")],
        env=env, capture_output=True, text=True, check=True,
    )
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = np.load(os.path.join(save_dir, "logp_gpu.npy"))
    rows = []
    for how, r in res.items():
        diff = np.abs(np.asarray(r["logp"]) - ref)
        rows.append({
            "check": f"GPU model -> {how} -> CPU-only process",
            "device_after_load": r["device"],
            "runtime_warning": "; ".join(r["warning"]) or "none",
            "rows": len(ref),
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
        })
        print(f"reload via {how}: device {r['device']}, max |Δ log p| {diff.max():.2e}", flush=True)
    return rows


def _cpu_reference(names: list[str], quick: bool = False) -> pd.DataFrame:
    """The CPU run's defaults and best anchor per set, from ``quality[_quick].csv`` (if present)."""
    path = os.path.join(OUT_DIR, "quality_quick.csv" if quick else "quality.csv")
    if not os.path.exists(path):
        return pd.DataFrame({"dataset": names})
    q = pd.read_csv(path)
    out = []
    for name in names:
        d = q[q.dataset == name]
        sf = d[d.model == "ScoreFlowDensity"]
        anchors = d[d.model.isin(["GaussianMixture", "KernelDensity", "zuko NSF"])]
        best = anchors.loc[anchors.test_loglik.idxmax()] if len(anchors) else None
        out.append({
            "dataset": name,
            "cpu_defaults_loglik": float(sf.test_loglik.iloc[0]) if len(sf) else np.nan,
            "best_anchor": best.model if best is not None else "",
            "best_anchor_loglik": float(best.test_loglik) if best is not None else np.nan,
        })
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> None:
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing as mp

    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 steps and 2,000-row sets")
    parser.add_argument("--datasets", default=",".join(TWO_D))
    parser.add_argument("--jobs", type=int, default=4, help="processes sharing the GPU")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out-dir", default=OUT_DIR)
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available: run this on a machine with a GPU (or --device cpu)")
    n = 2000 if args.quick else 20_000
    names = args.datasets.split(",")
    label = device_label(args.device)
    cmd = "python benchmarks/bench_gpu.py" + (" --quick" if args.quick else "") + f" --jobs {args.jobs}"
    cmd += "" if args.datasets == ",".join(TWO_D) else f" --datasets {args.datasets}"
    cmd += "" if args.device == "cuda" else f" --device {args.device}"

    rows: list[dict[str, Any]] = []
    reload_rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def write() -> None:
        df = pd.DataFrame(rows)
        if len(df):
            df = df.merge(_cpu_reference(names, args.quick), on="dataset", how="left")
            df["gpu_minus_cpu"] = df.test_loglik - df.cpu_defaults_loglik
        notes = (
            f"Command: `{cmd}` ({(time.perf_counter() - t0) / 60:.1f} min wall, {args.jobs} "
            f"processes sharing one {label}). {n:,} train / {n:,} test rows per 2-D set, the "
            f"draws of `bench_quality.py`; `ScoreFlowDensity(random_state=0, device='{args.device}')`, "
            "other parameters at their defaults. `cpu_defaults_loglik` and the best anchor come "
            "from `quality.csv` (same rows; CPU). CPU and GPU use different random streams, so "
            "`gpu_minus_cpu` is the spread between two draws of the same procedure, not a device "
            "effect. `fit_s` is under the contention of the other processes."
        )
        if reload_rows:
            notes += "\n\nGPU-trained model reloaded in a CPU-only process:\n\n" + markdown_table(
                pd.DataFrame(reload_rows)
            )
        write_table(df, "gpu" + ("_quick" if args.quick else ""), f"ScoreFlowDensity on {label}",
                    notes=notes, out_dir=args.out_dir, device=args.device)
        if reload_rows:
            pd.DataFrame(reload_rows).to_csv(
                os.path.join(args.out_dir, "gpu_reload" + ("_quick" if args.quick else "") + ".csv"), index=False
            )

    with tempfile.TemporaryDirectory() as save_dir:
        ctx = mp.get_context("spawn")  # CUDA cannot be forked
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = {
                pool.submit(run_set, name, n, n, args.device, args.quick, save_dir if i == 0 else None): name
                for i, name in enumerate(names)
            }
            for fut in as_completed(futures):
                rows.append(fut.result())
                rows.sort(key=lambda r: names.index(r["dataset"]))
                write()
        if os.path.exists(os.path.join(save_dir, "model.pkl")):
            reload_rows = reload_on_cpu(save_dir)
            write()
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
