"""Dask: ``score_samples`` rows/s on a chunked Dask array, in-process and in worker processes.

One default-network 2-D model (moons, ``--max-iter`` steps, default tolerances) scores the same
``--n-rows`` rows four ways: the NumPy call in this process, and a Dask array of
``--chunk``-row blocks with Dask's threaded scheduler (2 threads) and its processes scheduler
with 1 and 2 worker processes.  Every block runs the estimator's NumPy path, so the table also
gives the largest difference from the NumPy result (the adaptive solver picks its steps per
batch: the blocks differ within its tolerance).

    python benchmarks/bench_dask.py [--quick]

Torch threads: one per solve everywhere (``--threads``; ``SKSCOREFLOW_THREADS`` and
``torch.set_num_threads`` in this process and in each worker's initializer), so 2 workers fill
the 2 cores without oversubscribing them: the fit, the NumPy call, each block of the threaded
scheduler (2 scheduler threads) and each worker process use 1 thread.  Small networks scale
poorly across threads, so two one-thread solves side by side beat one two-thread solve; the
in-process call with 2 torch threads is timed once, on a twentieth of the rows, for
comparison.  The worker pools are created once per configuration and started by a 2-row
compute, reported as ``cold_seconds`` (spawning the workers, importing torch and skscoreflow,
unpickling the model); rows/s are medians of ``--repeats`` alternating repeats on the warm
pools.  Dask's processes scheduler
pickles the model with every block (each task carries its inputs); ``dask.distributed`` would
ship it once per worker.  Every timing has the 1-minute load average beside it.

Writes docs/benchmarks/dask{_quick}.{csv,md}.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(__file__))
from _common import OUT_DIR, load_average, write_table


def _init_worker(threads: int) -> None:
    """Worker-process initializer: its share of the cores, for torch and the thread policy."""
    os.environ["SKSCOREFLOW_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    import skscoreflow  # noqa: F401  (imported here so the cold start is all in one place)


def _timed_compute(lazy, **compute_kwargs) -> tuple[np.ndarray, float, float]:
    t0 = time.perf_counter()
    out = lazy.compute(**compute_kwargs)
    return out, time.perf_counter() - t0, load_average()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="4,000 rows, 300 steps (else 20,000 rows, 1,000 steps)")
    parser.add_argument("--n-rows", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=None,
                        help="rows per Dask block (default: n_rows / 8)")
    parser.add_argument("--max-iter", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per solve")
    parser.add_argument("--out-dir", default=OUT_DIR)
    args = parser.parse_args()
    n_rows = args.n_rows or (4_000 if args.quick else 20_000)
    chunk = args.chunk or max(1, n_rows // 8)
    max_iter = args.max_iter or (300 if args.quick else 1000)
    repeats = args.repeats or 2  # 3 take 11 minutes on 2 cores
    t_start = time.perf_counter()

    import dask
    import dask.array as da
    import torch

    from skscoreflow import ScoreFlowDensity
    from skscoreflow._threads import effective_cpus
    from skscoreflow.datasets import make_dataset

    cores = effective_cpus()
    threads = args.threads
    # Before any fit or score: the thread policy caps every block (and the fit) at this budget.
    os.environ["SKSCOREFLOW_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    X_train = make_dataset("moons", 10_000, random_state=0)
    X = make_dataset("moons", n_rows, random_state=1)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = ScoreFlowDensity(max_iter=max_iter, random_state=0, device="cpu").fit(X_train)
    fit_seconds = time.perf_counter() - t0
    model_mib = len(pickle.dumps(est)) / 2**20
    print(f"fit {fit_seconds:.1f} s, pickled model {model_mib:.1f} MiB", flush=True)
    dX = da.from_array(X, chunks=(chunk, X.shape[1]))

    configs: dict[str, dict] = {
        "NumPy, this process": {"workers": 1, "threads": threads},
        "dask threaded": {"workers": cores, "threads": threads},
    }
    pools = {}
    for n in (1, 2):
        name = f"dask processes, {n} worker{'s' if n > 1 else ''}"
        configs[name] = {"workers": n, "threads": threads}
        pools[name] = ProcessPoolExecutor(
            n, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
            initargs=(threads,),
        )

    def run(name: str, data=dX) -> tuple[np.ndarray, float, float]:
        if name.startswith("NumPy"):
            t = time.perf_counter()
            out = est.score_samples(X)
            return out, time.perf_counter() - t, load_average()
        lazy = est.score_samples(data)  # building the graph is part of the timing
        if name == "dask threaded":
            t = time.perf_counter()
            out = lazy.compute(scheduler="threads", num_workers=cores)
            return out, time.perf_counter() - t, load_average()
        t = time.perf_counter()
        # chunksize=1: one block per submission, so the 2 workers share the blocks evenly
        # (the default batches 6 blocks per submission).
        out = lazy.compute(scheduler="processes", pool=pools[name], chunksize=1)
        return out, time.perf_counter() - t, load_average()

    # Cold starts: a first, 2-row compute on each fresh pool (n workers get one row each).
    cold: dict[str, float] = {}
    tiny = da.from_array(X[:2], chunks=(1, X.shape[1]))
    for name in pools:
        _, cold[name], _ = run(name, tiny)
        print(f"{name}: cold {cold[name]:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in configs}
    loads: dict[str, list[float]] = {name: [] for name in configs}
    outs: dict[str, np.ndarray] = {}
    for r in range(repeats):
        for name in configs:  # alternating: a load spike hits every configuration alike
            out, seconds, load = run(name)
            outs[name] = out
            times[name].append(seconds)
            loads[name].append(load)
            print(f"repeat {r}: {name}: {seconds:.1f} s ({n_rows / seconds:.0f} rows/s, "
                  f"load {load:.2f})", flush=True)
    for pool in pools.values():
        pool.shutdown()
    # Reference: the in-process call with 2 torch threads, once, on a twentieth of the rows.
    n_side = max(1, n_rows // 20)
    os.environ["SKSCOREFLOW_THREADS"] = "2"
    torch.set_num_threads(2)
    t = time.perf_counter()
    side = est.score_samples(X[:n_side])
    side_seconds, side_load = time.perf_counter() - t, load_average()
    torch.set_num_threads(threads)
    print(f"NumPy, 2 torch threads, {n_side} rows: {side_seconds:.1f} s", flush=True)

    ref = outs["NumPy, this process"]
    base = float(np.median(times["NumPy, this process"]))
    rows = []
    for name, cfg in configs.items():
        seconds = float(np.median(times[name]))
        rows.append({
            "configuration": name,
            "n_rows": n_rows,
            "workers": cfg["workers"],
            "torch_threads_per_worker": cfg["threads"],
            "chunk_rows": "" if name.startswith("NumPy") else chunk,
            "seconds_median": seconds,
            "rows_per_s": n_rows / seconds,
            "speedup_vs_numpy": base / seconds,
            "cold_seconds": cold.get(name, float("nan")),
            "max_abs_diff_vs_numpy": float(np.abs(outs[name] - ref).max()),
            "load_1min": float(np.median(loads[name])),
            "repeats": ", ".join(f"{t:.1f}" for t in times[name]),
        })
    rows.append({
        "configuration": "NumPy, this process, 2 torch threads (reference, 1 run)",
        "n_rows": n_side, "workers": 1, "torch_threads_per_worker": 2, "chunk_rows": "",
        "seconds_median": side_seconds, "rows_per_s": n_side / side_seconds,
        "speedup_vs_numpy": (n_side / side_seconds) / (n_rows / base), "cold_seconds": np.nan,
        "max_abs_diff_vs_numpy": float(np.abs(side - ref[:n_side]).max()),
        "load_1min": side_load, "repeats": f"{side_seconds:.1f}",
    })
    df = pd.DataFrame(rows)
    name = "dask_quick" if args.quick else "dask"
    notes = (
        f"Command: `python benchmarks/bench_dask.py{' --quick' if args.quick else ''}` "
        f"({(time.perf_counter() - t_start) / 60:.1f} min; {os.cpu_count()} cores, {cores} "
        f"usable; dask {dask.__version__}).  Model: default `ScoreFlowDensity` (3 x 128 "
        f"network, 128 Fourier features, float32, dopri5 at rtol = atol = 1e-5) fitted on "
        f"10,000 moons rows for {max_iter} steps ({fit_seconds:.0f} s; pickled: "
        f"{model_mib:.1f} MiB).  Scored: {n_rows:,} other moons rows; Dask blocks of "
        f"{chunk:,} rows ({-(-n_rows // chunk)} blocks).  `seconds_median` and `rows_per_s`: "
        f"median of {repeats} alternating repeats (`repeats`: each one's seconds), graph "
        f"construction included.  `torch_threads_per_worker`: {threads} per solve everywhere "
        f"(`SKSCOREFLOW_THREADS={threads}` and `torch.set_num_threads({threads})` in this "
        "process and in each worker's initializer; the threaded scheduler runs one block per "
        "core); the last row is the in-process call with 2 torch threads, once, on the first "
        f"{max(1, n_rows // 20):,} rows (`speedup_vs_numpy` there compares rows/s; the "
        "adaptive solver's cost per row depends a little on the batch).  "
        "`cold_seconds`: a first, 2-row compute on a fresh pool of worker processes (spawning "
        "them, importing torch and skscoreflow, unpickling the model); "
        "`.compute(scheduler=\"processes\")` without a `pool` pays it on every call.  "
        "`max_abs_diff_vs_numpy`: largest |difference| of the log-densities from the NumPy "
        "call (the adaptive solver picks its steps per batch).  `load_1min`: median 1-minute "
        "load average after each repeat; the machine is shared."
    )
    write_table(df, name, "Dask: score_samples on a chunked Dask array", notes,
                out_dir=args.out_dir)
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
