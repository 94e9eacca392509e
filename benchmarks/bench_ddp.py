"""Data-parallel training (DDP under torchrun): throughput and equality with one process.

Fits the same model (20,000 rows of ``moons``, network (128, 128, 128), global batch 1024,
``--max-iter`` steps, float64 so the comparison is exact) in one plain process and under
``torch.distributed.run --standalone --nproc_per_node=W`` for each ``W`` of ``--nproc``; each
run is a fresh launch.  Records the fit time and steps/s of rank 0, the torch threads per
process, the machine load, and the largest difference of the weights from the 1-process fit.
On CPU the processes use gloo; with ``--device cuda`` they use NCCL, one GPU per process (on a
one-GPU machine ``--nproc 1`` runs the NCCL path end to end at world size 1).

    python benchmarks/bench_ddp.py [--nproc 1 2] [--device cpu|cuda] [--max-iter 300]

Writes docs/benchmarks/ddp{_cuda}.{csv,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(__file__))
from _common import load_average, write_table  # noqa: E402


def fit(out: str, device: str, max_iter: int, distributed: bool) -> None:
    import torch

    from skscoreflow import ScoreFlowDensity
    from skscoreflow.datasets import make_dataset

    X = make_dataset("moons", 20_000, random_state=0)
    est = ScoreFlowDensity(hidden_layer_sizes=(128, 128, 128), max_iter=max_iter,
                           batch_size=1024, dtype="float64", device=device, random_state=0,
                           distributed=distributed)
    t0 = time.perf_counter()
    est.fit(X)
    wall = time.perf_counter() - t0
    rank = torch.distributed.get_rank() if distributed else 0
    if rank == 0:
        weights = torch.cat([p.detach().reshape(-1).cpu() for p in est.network_.parameters()])
        np.save(out + ".npy", weights.numpy())
        with open(out + ".json", "w") as fh:
            json.dump({"fit_time": est.fit_time_, "wall": wall, "world": est.world_size_,
                       "threads": torch.get_num_threads(), "load": load_average(),
                       "backend": torch.distributed.get_backend() if distributed else "none"}, fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--worker", nargs=2, metavar=("OUT", "DISTRIBUTED"), help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    if args.worker:
        fit(args.worker[0], args.device, args.max_iter, args.worker[1] == "1")
        return
    import tempfile

    cores = len(os.sched_getaffinity(0))
    runs = [("1 process (no DDP)", None, cores)]
    runs += [(f"torchrun, {w} process{'es' if w > 1 else ''}", w, max(1, cores // w))
             for w in args.nproc]
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for label, world, threads in runs:
            out = os.path.join(tmp, f"run{len(rows)}")
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), SKSCOREFLOW_THREADS=str(threads))
            worker = [__file__, "--device", args.device, "--max-iter", str(args.max_iter),
                      "--worker", out]
            if world is None:
                cmd = [sys.executable, *worker, "0"]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={world}", *worker, "1"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            res = json.load(open(out + ".json"))
            weights = np.load(out + ".npy")
            if reference is None:
                reference = weights
            rows.append({
                "run": label, "device": args.device, "backend": res["backend"],
                "processes": res["world"], "torch_threads_per_process": res["threads"],
                "steps": args.max_iter, "fit_seconds": res["fit_time"],
                "steps_per_s": args.max_iter / res["fit_time"],
                "rows_per_s": args.max_iter * 1024 / res["fit_time"],
                "max_abs_weight_diff_vs_1_process": float(np.abs(weights - reference).max()),
                "load": res["load"],
            })
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    df["speedup_vs_1_process"] = df["fit_seconds"].iloc[0] / df["fit_seconds"]
    col = "max_abs_weight_diff_vs_1_process"
    df[col] = df[col].map(lambda v: f"{v:.1e}")  # far below the tables' 4 decimals
    name = "ddp" if args.device == "cpu" else f"ddp_{args.device.split(':')[0]}"
    notes = f"""
20,000 `moons` rows, network (128, 128, 128), global batch 1024, {args.max_iter} steps, float64,
`random_state=0`; each run a fresh launch (`python benchmarks/bench_ddp.py`), the processes
sharing the machine's {cores} cores (`torch_threads_per_process` = cores / processes).
`fit_seconds`: rank 0's `fit_time_` (the training loop, after start-up).
`max_abs_weight_diff_vs_1_process`: largest difference of the EMA weights from the plain
1-process fit (the same global batches and noise: only the summation order differs).
Data-parallel training pays off with one device (GPU or several cores) per process; on a
2-core CPU the processes only split the same two cores.
"""
    write_table(df, name, "Data-parallel training (DDP): throughput and equality", notes,
                out_dir=args.out_dir or os.path.join(os.path.dirname(__file__), "..", "docs",
                                                      "benchmarks"), device=args.device)


if __name__ == "__main__":
    main()
