"""Fault injection: a long fit killed with SIGKILL at random moments, resumed each time.

A worker process fits ScoreFlowDensity with ``checkpoint_path`` and saves the model when it
completes.  The driver starts the worker, kills it with SIGKILL after a random delay, starts it
again (it resumes from the last checkpoint), and so on ``--kills`` times, then lets it finish.
The final model is compared with an uninterrupted fit (same parameters and data): weights,
loss curve and ``score_samples`` must be identical bit for bit.  It also reports the checkpoint
size and the time overhead of checkpointing (a fit with checkpoints against one without, same
process, medians of alternating repeats).

    python benchmarks/bench_faults.py [--quick] [--kills 5] [--max-iter 3000]

Writes docs/benchmarks/faults{_quick}.{csv,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(__file__))
from _common import load_average, write_table  # noqa: E402


def _params(args: argparse.Namespace) -> dict:
    return dict(max_iter=args.max_iter, random_state=0, device="cpu", early_stopping=True,
                n_iter_no_change=1000)


def _data(args: argparse.Namespace) -> np.ndarray:
    from skscoreflow.datasets import make_dataset

    return make_dataset("moons", args.n_rows, random_state=0)


def worker(args: argparse.Namespace) -> None:
    """Fit with checkpoints (resuming when a checkpoint exists), then save the model."""
    import warnings

    import torch

    torch.set_num_threads(1)
    from skscoreflow import ScoreFlowDensity

    est = ScoreFlowDensity(**_params(args), checkpoint_path=args.checkpoint,
                           checkpoint_every=args.every)
    resumed = os.path.exists(args.checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(_data(args))
    est.save(args.model)
    print(json.dumps({"resumed": resumed, "n_iter": est.n_iter_}), flush=True)


def _fit_seconds(args: argparse.Namespace, checkpoint: str | None) -> tuple[float, float]:
    """Seconds of one fit, and of the checkpoint writes inside it (timed around each write)."""
    import warnings

    import skscoreflow._checkpoint as ckpt_module
    from skscoreflow import ScoreFlowDensity

    X = _data(args)
    kw = {} if checkpoint is None else {"checkpoint_path": checkpoint, "checkpoint_every": args.every}
    writes = [0.0]
    real = ckpt_module.atomic_save

    def timed(*a, **k):
        t = time.perf_counter()
        real(*a, **k)
        writes[0] += time.perf_counter() - t

    ckpt_module.atomic_save = timed
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ScoreFlowDensity(**_params(args), **kw).fit(X)
        return time.perf_counter() - t0, writes[0]
    finally:
        ckpt_module.atomic_save = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 steps, 3 kills")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--max-iter", type=int, default=3000)
    parser.add_argument("--every", type=int, default=200, help="checkpoint_every")
    parser.add_argument("--n-rows", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.max_iter, args.kills, args.every = 1000, 3, 100
    import torch

    torch.set_num_threads(1)
    from skscoreflow import ScoreFlowDensity

    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="skscoreflow-faults-")
    ckpt, model = os.path.join(tmp, "ckpt.pt"), os.path.join(tmp, "model.pt")
    base = [sys.executable, __file__, "--worker", "--checkpoint", ckpt, "--model", model,
            "--max-iter", str(args.max_iter), "--every", str(args.every),
            "--n-rows", str(args.n_rows)]

    # The uninterrupted reference, and the checkpointing overhead (alternating repeats).
    plain, with_ckpt, write_s = [], [], []
    for _ in range(3):
        plain.append(_fit_seconds(args, None)[0])
        seconds, writing = _fit_seconds(args, os.path.join(tmp, "overhead.pt"))
        with_ckpt.append(seconds)
        write_s.append(writing)
    reference = ScoreFlowDensity(**_params(args)).fit(_data(args))
    t_fit = float(np.median(plain))
    print(f"fit {t_fit:.1f} s without checkpoints, {np.median(with_ckpt):.1f} s with", flush=True)

    # Kill the worker at random moments; each start resumes from the last checkpoint.  A kill
    # waits for one new checkpoint (so every start makes progress), then a random part of the
    # time between two checkpoints: kills land anywhere, mid-step or mid-write.
    rng = random.Random(args.seed)
    between = args.every * t_fit / args.max_iter
    kills, resumed_starts, ckpt_bytes, kill_times = 0, 0, [], []

    def mtime() -> float:
        return os.path.getmtime(ckpt) if os.path.exists(ckpt) else 0.0

    while True:
        proc = subprocess.Popen(base, stdout=subprocess.PIPE, text=True)
        if kills < args.kills:
            t0, seen = time.perf_counter(), mtime()
            while proc.poll() is None and mtime() <= seen:
                time.sleep(0.05)
            if proc.poll() is None:
                time.sleep(rng.uniform(0.0, between))
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                kills += 1
                kill_times.append(round(time.perf_counter() - t0, 1))
                ckpt_bytes.append(os.path.getsize(ckpt))
                print(f"kill {kills} after {kill_times[-1]} s", flush=True)
                continue
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"worker failed with exit code {proc.returncode}")
        result = json.loads(out.strip().splitlines()[-1])
        resumed_starts += int(result["resumed"])
        break
    final = ScoreFlowDensity.load(model)
    X_test = _data(args)[:2000]
    same_weights = all(
        torch.equal(a, b)
        for a, b in zip(final.network_.state_dict().values(), reference.network_.state_dict().values())
    )
    same_logp = bool(np.array_equal(final.score_samples(X_test), reference.score_samples(X_test)))
    row = {
        "max_iter": args.max_iter,
        "checkpoint_every": args.every,
        "kills": kills,
        "kill_after_s": " ".join(map(str, kill_times)),
        "final_start_resumed": bool(resumed_starts),
        "checkpoint_left_after_success": os.path.exists(ckpt),
        "same_weights": same_weights,
        "same_loss_curve": final.loss_curve_ == reference.loss_curve_,
        "same_score_samples": same_logp,
        "checkpoint_mib": (np.median(ckpt_bytes) / 2**20) if ckpt_bytes else float("nan"),
        "fit_s": t_fit,
        "checkpoint_writes_s": float(np.median(write_s)),
        "write_share": float(np.median(write_s) / np.median(with_ckpt)),
        "overhead_ratio": float(np.median(with_ckpt) / np.median(plain)),
        "load_1min": load_average(),
    }
    print(row, flush=True)
    name = "faults_quick" if args.quick else "faults"
    command = "python benchmarks/bench_faults.py" + (" --quick" if args.quick else "")
    notes = (
        f"Command: `{command}` ({(time.perf_counter() - t_start) / 60:.1f} min, 1 torch thread). "
        f"A fit of moons ({args.n_rows} rows, default network, early stopping, "
        f"{args.max_iter} steps, checkpoint every {args.every}) in a worker process, killed "
        "with SIGKILL at a random moment after each new checkpoint (`kill_after_s`: seconds "
        "after that start, imports included), restarted (it resumes from the last "
        "checkpoint), until it completes; the final model is compared "
        "with an uninterrupted fit bit for bit.  `checkpoint_writes_s`: time spent writing "
        "checkpoints within one fit (copy to the CPU, `torch.save`, `fsync`, rename), "
        "`write_share` its share of the fit, the precise overhead; `overhead_ratio`: median "
        "fit time with checkpoints / without (3 alternating repeats in one process), which "
        "on this shared machine is dominated by noise of a few percent."
    )
    write_table(pd.DataFrame([row]), name, "Fault injection: SIGKILL and resume", notes,
                out_dir=args.out_dir or os.path.join(os.path.dirname(__file__), "..", "docs",
                                                      "benchmarks"))


if __name__ == "__main__":
    main()
