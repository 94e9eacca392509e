"""Out-of-core data: peak memory of ``fit`` / ``partial_fit`` / evaluation on a large memmap.

Writes a float32 memmap of ``--gb`` gigabytes (``--d`` columns of correlated Gaussian rows)
and runs, each in a fresh process: ``fit`` on the memmap (read one batch at a time), the same
``fit`` on the array loaded into memory (the comparison), ``partial_fit`` over chunks read from
the memmap, and ``score_samples`` / ``bound`` / ``sample`` on memmap rows.  For each it records
the wall time, the peak resident memory (``VmHWM``: includes the memmap's file pages, which
are page cache the kernel can drop) and the peak anonymous memory (``RssAnon`` sampled every
2 ms: what the process itself allocated), against the size of the data.

    python benchmarks/bench_streaming.py [--gb 1.0] [--d 32] [--quick]

Writes docs/benchmarks/streaming{_quick}.{csv,md}; the memmap goes to a temporary folder
(``--tmp``) and is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(__file__))
from _common import load_average, write_table  # noqa: E402


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakAnon:
    """Peak ``RssAnon`` of this process, sampled by a thread every 2 ms."""

    def __enter__(self) -> PeakAnon:
        self.peak, self._stop = _status_kb("RssAnon"), False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, _status_kb("RssAnon"))
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, _status_kb("RssAnon"))


def write_memmap(path: str, n: int, d: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    X = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, d))
    for start in range(0, n, 1 << 18):
        stop = min(n, start + (1 << 18))
        X[start:stop] = (rng.normal(size=(stop - start, d)) @ mix).astype(np.float32)
    X.flush()
    del X


def one(task: str, path: str, n: int, d: int, max_iter: int) -> dict:
    from skscoreflow import ScoreFlowDensity

    X = np.memmap(path, dtype=np.float32, mode="r", shape=(n, d))
    params = dict(hidden_layer_sizes=(128, 128), max_iter=max_iter, batch_size=1024,
                  random_state=0, device="cpu")
    baseline = _status_kb("RssAnon")
    t0 = time.perf_counter()
    with PeakAnon() as peak:
        if task == "fit (memmap)":
            est = ScoreFlowDensity(**params).fit(X)
            rows = n
        elif task == "fit (in memory)":
            est = ScoreFlowDensity(**params).fit(np.array(X))
            rows = n
        elif task == "partial_fit (memmap chunks)":
            est = ScoreFlowDensity(**params)
            chunk = n // 20
            for start in range(0, 20 * chunk, chunk):
                est.partial_fit(X[start : start + chunk])
            rows = 20 * chunk
        else:
            est = ScoreFlowDensity(**dict(params, max_iter=50)).fit(X[:100_000])
            baseline = _status_kb("RssAnon")
            t0 = time.perf_counter()
            peak.peak = baseline
            if task == "score_samples (memmap)":
                rows = 70_000  # more than one chunk of 65,536 rows
                est.score_samples(X[:rows])
            elif task == "bound (memmap)":
                rows = 200_000
                est.bound(X[:rows], n_time_samples=10)
            else:  # sample: the output array is the only thing that grows with n
                rows = 500_000
                est.sample(rows, random_state=0, method="sde", n_steps=20)
    seconds = time.perf_counter() - t0
    return {
        "task": task, "rows": rows, "seconds": seconds,
        "steps": int(est.n_iter_),
        "peak_anon_mb": peak.peak / 1024, "anon_growth_mb": (peak.peak - baseline) / 1024,
        "peak_rss_mb": _status_kb("VmHWM") / 1024, "load": load_average(),
    }


TASKS = ("fit (memmap)", "fit (in memory)", "partial_fit (memmap chunks)",
         "score_samples (memmap)", "bound (memmap)", "sample (chunks)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the memmap")
    parser.add_argument("--d", type=int, default=32, help="columns")
    parser.add_argument("--max-iter", type=int, default=300, help="steps of each fit")
    parser.add_argument("--quick", action="store_true", help="0.1 GB, 100 steps")
    parser.add_argument("--tmp", default=None, help="folder for the memmap")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    if args.one:
        task, path, n, d, max_iter = args.one
        print(json.dumps(one(task, path, int(n), int(d), int(max_iter))))
        return
    gb, max_iter = (0.1, 100) if args.quick else (args.gb, args.max_iter)
    n = int(gb * 1e9 / (4 * args.d))
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = os.path.join(tmp, "X.f32")
        t0 = time.perf_counter()
        write_memmap(path, n, args.d)
        size_mb = os.path.getsize(path) / 2**20
        print(f"memmap: {n} x {args.d} float32, {size_mb:.0f} MiB, written in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        env = dict(os.environ, SKSCOREFLOW_THREADS=os.environ.get("SKSCOREFLOW_THREADS", "2"))
        for task in TASKS:
            out = subprocess.run(
                [sys.executable, __file__, "--one", task, path, str(n), str(args.d), str(max_iter)],
                env=env, capture_output=True, text=True,
            )
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-3000:])
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res["data_mb"] = size_mb
            res["anon_growth_vs_data"] = res["anon_growth_mb"] / size_mb
            print(res, flush=True)
            rows.append(res)
    df = pd.DataFrame(rows)[["task", "rows", "steps", "seconds", "anon_growth_mb", "peak_anon_mb",
                             "peak_rss_mb", "data_mb", "anon_growth_vs_data", "load"]]
    name = "streaming_quick" if args.quick else "streaming"
    notes = f"""
Data: a {size_mb:.0f} MiB float32 memmap ({n:,} rows x {args.d} columns); network (128, 128),
batch 1024, {max_iter} steps per fit, 2 torch threads.  `anon_growth_mb`: the peak of the
process's anonymous memory during the call minus its value before (what the call allocated);
`peak_rss_mb` also counts the memmap's file pages, which are page cache the kernel can drop.
Evaluation rows use a model fitted on the first 100,000 rows for 50 steps.
`python benchmarks/bench_streaming.py{' --quick' if args.quick else ''}`.
"""
    write_table(df, name, "Out-of-core data: memory of fit and evaluation on a memmap", notes,
                out_dir=args.out_dir or os.path.join(os.path.dirname(__file__), "..", "docs",
                                                      "benchmarks"))


if __name__ == "__main__":
    main()
