"""Thread policy: a 2-worker grid search on the machine's cores, before and after.

``GridSearchCV(ScoreFlowDensity(...), n_jobs=2)`` (2 candidates x 2 folds = 4 fits, 2 at a
time) with joblib's default process backend (loky) and with the threading backend, under
``SKSCOREFLOW_THREADS=torch`` (torch's own thread setting: the behaviour before the policy)
and the default policy (a fit uses at most the cores it can run on, and concurrent fits in one
process share them).  Each configuration runs in a fresh process; the table gives the wall
time, the torch threads a fit saw, and the ratio to the old policy in the same backend.

    python benchmarks/bench_threads.py [--quick]

Writes docs/benchmarks/threads{_quick}.{csv,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pandas as pd

sys.path.insert(0, os.path.dirname(__file__))
from _common import load_average, write_table  # noqa: E402


def one(backend: str, max_iter: int, n_rows: int, start_threads: int) -> dict:
    import warnings

    import joblib
    import torch

    if start_threads:
        torch.set_num_threads(start_threads)
    from sklearn.model_selection import GridSearchCV, KFold

    import skscoreflow._estimator as est_module
    from skscoreflow import ScoreFlowDensity
    from skscoreflow.datasets import make_dataset

    seen: list[int] = []
    real = est_module.fit_threads

    class Spy:  # record the threads a fit runs with (threading backend: this process)
        def __enter__(self):
            self.cm = real()
            n = self.cm.__enter__()
            seen.append(torch.get_num_threads())
            return n

        def __exit__(self, *exc):
            return self.cm.__exit__(*exc)

    est_module.fit_threads = Spy
    X = make_dataset("moons", n_rows, random_state=0)
    if backend == "none":  # one fit in this process
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ScoreFlowDensity(max_iter=2 * max_iter, random_state=0, device="cpu").fit(X)
        return {"seconds": time.perf_counter() - t0, "threads_in_fit": sorted(set(seen)),
                "torch_threads_outside": torch.get_num_threads()}
    search = GridSearchCV(
        ScoreFlowDensity(max_iter=max_iter, random_state=0, device="cpu"),
        {"learning_rate": [1e-3, 2e-3]},
        cv=KFold(2, shuffle=True, random_state=0),
        n_jobs=2,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings(), joblib.parallel_config(backend=backend):
        warnings.simplefilter("ignore")
        search.fit(X)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "threads_in_fit": sorted(set(seen)) or "in workers",
            "torch_threads_outside": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="150 steps per fit (else 600)")
    parser.add_argument("--one", nargs=3, metavar=("BACKEND", "POLICY", "THREADS"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--max-iter", type=int, default=None)
    parser.add_argument("--n-rows", type=int, default=5000)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    max_iter = args.max_iter or (150 if args.quick else 600)
    if args.one:
        print(json.dumps(one(args.one[0], max_iter, args.n_rows, int(args.one[2]))))
        return
    t_start = time.perf_counter()
    rows = []
    # A torch thread setting above the usable cores: what torch picks by itself in a container
    # whose CPU quota is below the host's core count (it counts the host's cores).
    over = 4 * len(os.sched_getaffinity(0))
    for backend, start in (("loky", 0), ("threading", 0), ("none", over)):
        for policy in ("torch", "auto"):
            env = dict(os.environ, SKSCOREFLOW_THREADS=policy)
            out = subprocess.run(
                [sys.executable, __file__, "--one", backend, policy, str(start), "--max-iter",
                 str(max_iter), "--n-rows", str(args.n_rows)],
                env=env, capture_output=True, text=True, check=True,
            ).stdout
            res = json.loads(out.strip().splitlines()[-1])
            what = {"none": f"one fit, torch set to {over} threads"}.get(
                backend, f"GridSearchCV n_jobs=2, {backend}")
            rows.append({"setting": what, "policy": "before (torch's setting)" if policy == "torch"
                         else "new (cores / concurrent fits)", **res, "load_1min": load_average()})
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    df["ratio_to_before"] = df["seconds"] / df.groupby("setting")["seconds"].transform("first")
    df["threads_in_fit"] = df["threads_in_fit"].astype(str)
    name = "threads_quick" if args.quick else "threads"
    notes = (
        f"Command: `python benchmarks/bench_threads.py{' --quick' if args.quick else ''}` "
        f"({(time.perf_counter() - t_start) / 60:.1f} min; {os.cpu_count()} cores, "
        f"{len(os.sched_getaffinity(0))} usable).  GridSearchCV with n_jobs=2: 2 learning rates x "
        f"2 folds of moons ({args.n_rows} rows), default network, {max_iter} steps per fit.  "
        "The last two rows: one fit of twice the steps with torch set to 4x the usable cores, as "
        "torch sets itself in a container whose CPU quota is below the host's core count.  "
        "`threads_in_fit`: torch threads the fits of the driving process ran with (loky's workers "
        "are other processes, where joblib sets OMP_NUM_THREADS to their share of the cores; "
        "the driving process refits the best candidate).  "
        "`ratio_to_before`: wall time / the old policy's in the same backend."
    )
    write_table(df, name, "Thread policy: a 2-worker grid search", notes,
                out_dir=args.out_dir or os.path.join(os.path.dirname(__file__), "..", "docs",
                                                      "benchmarks"))


if __name__ == "__main__":
    main()
