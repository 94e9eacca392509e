"""Run the whole benchmark suite: one command, tables and plots into ``docs/benchmarks/``.

    python benchmarks/run_suite.py            # the full suite (see benchmarks/README.md for times)
    python benchmarks/run_suite.py --quick    # small budgets: minutes, for a smoke test
    python benchmarks/run_suite.py --parts speed,claims
    python benchmarks/run_suite.py --device cuda   # on a GPU machine: speed and gpu parts

Parts, in this order (speed first, while no other part runs: its two worker processes have a
core each, and each of its ratios is timed within one process):

=========  ===================================================================================
speed      likelihood speed vs a SciPy RK45 reference loop, exact vs Hutchinson for d = 2..64,
           time and memory for 1k..100k rows, training-loop overhead (``bench_speed.py``)
quality    held-out log-likelihood on 7 2-D sets (20k/20k) and wine / breast cancer against
           GaussianMixture, KernelDensity and a zuko NSF; plots (``bench_quality.py``)
claims     VE/VP/sub-VP x three weightings on two 2-D sets and digits: ODE likelihood, bound,
           importance-sampling variance ratio (``bench_claims.py``)
digits     bits/dim with uniform and variational dequantization vs GMM and KDE, sample grid
           (``bench_digits.py``)
gpu        (``--device cuda`` only) the 7 default 2-D fits trained and scored on the GPU, and a
           GPU model reloaded in a CPU-only process (``bench_gpu.py``)
=========  ===================================================================================

With ``--device cuda`` the suite runs ``speed`` on the GPU (``speed_gpu.*``) and ``gpu``; the
anchors of the other parts are CPU methods, and their ScoreFlow rows are the CPU figures.

Each part writes ``docs/benchmarks/<part>[_quick].{csv,md}`` (and its PNGs); ``suite[_quick].md``
records the wall time of each part and the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import bench_claims  # noqa: E402
import bench_digits  # noqa: E402
import bench_gpu  # noqa: E402
import bench_quality  # noqa: E402
import bench_speed  # noqa: E402
from _common import OUT_DIR, load_average, machine  # noqa: E402

PARTS = {
    "speed": bench_speed.main,
    "quality": bench_quality.main,
    "claims": bench_claims.main,
    "digits": bench_digits.main,
}
GPU_PARTS = {"speed": bench_speed.main, "gpu": bench_gpu.main}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small budgets (minutes)")
    parser.add_argument("--parts", default=None, help="comma-separated subset of " + ",".join(PARTS))
    parser.add_argument("--device", default="cpu", help="'cuda': the GPU parts (speed, gpu) on the GPU")
    args = parser.parse_args(argv)
    extra = ["--quick"] if args.quick else []
    gpu = args.device.startswith("cuda")
    parts = GPU_PARTS if gpu else PARTS
    if args.parts is None:
        args.parts = ",".join(parts)
    if gpu:
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine")
        extra += ["--device", args.device]
    host = machine(args.device).split(" (")[0]  # the parts set their own thread counts
    log = []
    t_all = time.perf_counter()
    for part in args.parts.split(","):
        if part not in parts:
            parser.error(f"unknown part {part!r} for --device {args.device}; expected some of {list(parts)}")
        print(f"=== {part} ===", flush=True)
        t0 = time.perf_counter()
        parts[part](extra)
        log.append((part, (time.perf_counter() - t0) / 60, load_average()))
    total = (time.perf_counter() - t_all) / 60
    suffix = ("_gpu" if gpu else "") + ("_quick" if args.quick else "")
    with open(os.path.join(OUT_DIR, f"suite{suffix}.md"), "w") as fh:
        fh.write(f"# Benchmark suite run{' (quick)' if args.quick else ''}\n\n")
        fh.write(f"Command: `python benchmarks/run_suite.py{' --quick' if args.quick else ''}"
                 f"{' --device ' + args.device if gpu else ''}"
                 f"{'' if args.parts == ','.join(parts) else ' --parts ' + args.parts}`. "
                 f"Machine: {host}; "
                 + ("the GPU parts run speed in one process and the gpu fits in worker processes "
                    "sharing the card.\n\n" if gpu else
                    "speed, quality and claims use 1 torch thread per worker process, digits 2.\n\n"))
        fh.write("| part | wall minutes | load (1 min) at end |\n|---|---|---|\n")
        for part, minutes, load in log:
            fh.write(f"| {part} | {minutes:.1f} | {load:.2f} |\n")
        fh.write(f"| **total** | **{total:.1f}** | |\n")
    print(f"suite done in {total:.1f} min")


if __name__ == "__main__":
    main()
