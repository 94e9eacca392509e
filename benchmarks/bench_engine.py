"""The likelihood/sampling engine: per-row accuracy against a tight solve, evaluations, rows/s.

    python benchmarks/bench_engine.py [--quick] [--baseline-rev REV]

One process, one torch thread, every row with the machine's load beside it.

1. ``contract``: a **default** ``ScoreFlowDensity`` fitted on 10,000 moons rows; 10,000
   held-out rows scored by every solver setting, each row's error measured against a tight
   float64 solve (``rtol = atol = 1e-9``, the float64 copy of the same network): max, 99th
   percentile and mean per-row error, network evaluations (NFE) per row, rows/s.  Settings:
   today's engine (the package at ``--baseline-rev``, run in a subprocess on the same saved
   model: mixed error norm, per-row time embedding, vectorised backward), the new engine at
   several tolerances, error norms and integration variables, and the paper-style SciPy RK45
   loop of ``bench_speed.py`` at several tolerances, so that it can be matched to our
   measured accuracy.
2. ``digits``: the same at ``d = 64`` on a digits model (1,597 training rows with uniform
   jitter, 3,000 steps), 200 held-out rows, exact divergence.
3. ``overhead``: time per network evaluation inside the solver against one bare forward pass
   plus exact divergence on the same chunk of rows (the design's lower bound), 2-D and d = 64.
4. ``sample``: the ODE sampler in ``t`` (today) and ``log t`` (new) at the estimator's
   tolerance and looser: NFE and sample quality on the 2-D model (MMD with four RBF scales and
   the held-out log-likelihood of a KernelDensity fitted on the samples, 5,000 samples, 3 seeds).

Writes ``docs/benchmarks/engine{,_quick}.{csv,md}``.
"""

from __future__ import annotations

import argparse
import copy
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
from _common import OUT_DIR, load_average, machine, markdown_table  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Run by the baseline worker: today's package (on sys.path first) scores the saved model.
_BASELINE_WORKER = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from skscoreflow import ScoreFlowDensity
from skscoreflow.likelihood import ode_log_likelihood
model, rows, out, tol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
est = ScoreFlowDensity.load(model)
Z = torch.as_tensor(np.load(rows), dtype=torch.float32)
ode_log_likelihood(est.network_, Z[:64], est.sde_, eps=est.eps_, divergence="exact")  # warm-up
t0 = time.perf_counter()
ll, info = ode_log_likelihood(est.network_, Z, est.sde_, eps=est.eps_, divergence="exact",
                              rtol=tol, atol=tol, return_info=True)
seconds = time.perf_counter() - t0
np.save(out, ll.double().numpy())
print(json.dumps({"seconds": seconds, "nfe": info.nfe}))
"""


def _errors(ll: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    e = np.abs(np.asarray(ll, dtype=np.float64) - ref)
    return {"err_max": float(e.max()), "err_p99": float(np.quantile(e, 0.99)),
            "err_mean": float(e.mean())}


def _nfe_per_row(nfe: list[int], n: int, chunk: int) -> float:
    """Network evaluations per row: each chunk's evaluations, weighted by its rows."""
    sizes = [min(chunk, n - s) for s in range(0, n, chunk)]
    return float(sum(k * m for k, m in zip(nfe, sizes)) / n)


def _baseline(rev: str, model: str, Z: np.ndarray, tol: float, workdir: str) -> dict[str, Any]:
    """Today's engine: the package at ``rev`` scoring ``Z`` in a subprocess."""
    pkg = os.path.join(workdir, f"baseline-{rev}")
    if not os.path.isdir(pkg):
        os.makedirs(pkg)
        archive = subprocess.run(["git", "-C", REPO, "archive", rev, "skscoreflow"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", pkg], input=archive, check=True)
    rows = os.path.join(workdir, "rows.npy")
    out = os.path.join(workdir, "baseline_ll.npy")
    np.save(rows, Z)
    env = {**os.environ, "PYTHONPATH": pkg, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _BASELINE_WORKER, model, rows, out, str(tol)],
                          check=True, capture_output=True, text=True, env=env, cwd=workdir)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ll": np.load(out), **info}


def _ours(net: Any, sde: Any, eps: float, Zt: Any, **kw: Any) -> tuple[np.ndarray, float, list[int]]:
    from skscoreflow.likelihood import ode_log_likelihood

    ode_log_likelihood(net, Zt[:64], sde, eps=eps, divergence="exact", **kw)  # warm-up
    t0 = time.perf_counter()
    ll, info = ode_log_likelihood(net, Zt, sde, eps=eps, divergence="exact", return_info=True, **kw)
    return ll.double().numpy(), time.perf_counter() - t0, info.nfe


def _scipy(est: Any, X: np.ndarray, tol: float) -> tuple[np.ndarray, float, int]:
    from bench_speed import scipy_reference_loglik

    t0 = time.perf_counter()
    ll, nfe = scipy_reference_loglik(est, X, tol, tol)
    # Back to the standardised units of the other rows (the loop adds the scaler's log-det).
    return ll + np.log(est.scale_).sum(), time.perf_counter() - t0, nfe


def _likelihood_part(part: str, est: Any, X: np.ndarray, model: str, args: Any,
                     settings: list[tuple[str, dict[str, Any]]], scipy_tols: list[float],
                     baseline_tols: list[float], workdir: str) -> list[dict[str, Any]]:
    import torch

    from skscoreflow.likelihood import _default_chunk_size, ode_log_likelihood

    Z = est._standardizer.transform(X).astype(np.float32)
    Zt = torch.as_tensor(Z)
    n, d = Z.shape
    net, sde, eps = est.network_, est.sde_, est.eps_
    t0 = time.perf_counter()
    ref = ode_log_likelihood(copy.deepcopy(net).double(), Zt.double(), sde, eps=eps,
                             divergence="exact", rtol=1e-9, atol=1e-9).numpy()
    print(f"[{part}] tight reference: {time.perf_counter() - t0:.0f} s", flush=True)
    common = {"part": part, "n_rows": n, "d": d}
    rows: list[dict[str, Any]] = []
    for tol in baseline_tols:
        load = load_average()
        b = _baseline(args.baseline_rev, model, Z, tol, workdir)
        rows.append({**common, "engine": f"today ({args.baseline_rev})", "setting":
                     f"dopri5, mixed norm, t, rtol=atol={tol:g}", "seconds": b["seconds"],
                     "nfe_per_row": _nfe_per_row(b["nfe"], n, 16384 // d),
                     **_errors(b["ll"], ref), "load_1min": load})
        print(rows[-1], flush=True)
    chunk = _default_chunk_size(d, "cpu")
    for name, kw in settings:
        load = load_average()
        ll, sec, nfe = _ours(net, sde, eps, Zt, **kw)
        rows.append({**common, "engine": "new", "setting": name, "seconds": sec,
                     "nfe_per_row": _nfe_per_row(nfe, n, chunk), **_errors(ll, ref),
                     "load_1min": load})
        print(rows[-1], flush=True)
    for tol in scipy_tols:
        load = load_average()
        ll, sec, nfe = _scipy(est, X, tol)
        rows.append({**common, "engine": "SciPy RK45 loop (paper-style)", "setting":
                     f"RK45, float64 flattened state, rtol=atol={tol:g}", "seconds": sec,
                     "nfe_per_row": float(nfe), **_errors(ll, ref), "load_1min": load})
        print(rows[-1], flush=True)
    for r in rows:
        r["rows_per_s"] = r["n_rows"] / r["seconds"]
    return rows


def _fit(name: str, X: np.ndarray, workdir: str, **params: Any) -> tuple[Any, str, float]:
    from skscoreflow import ScoreFlowDensity

    est = ScoreFlowDensity(random_state=0, **params)
    t0 = time.perf_counter()
    est.fit(X)
    seconds = time.perf_counter() - t0
    path = os.path.join(workdir, f"{name}.skf")
    est.save(path)
    return est, path, seconds


def part_contract(args: Any, workdir: str) -> tuple[list[dict[str, Any]], Any]:
    from skscoreflow.datasets import make_dataset

    n = 2000 if args.quick else 10_000
    params = {"max_iter": 1000} if args.quick else {}
    est, path, fit_s = _fit("moons", make_dataset("moons", n, random_state=0), workdir, **params)
    print(f"[contract] fit {fit_s:.0f} s", flush=True)
    X = make_dataset("moons", n, random_state=1)
    settings = [
        ("dopri5, row norm, t, rtol=atol=1e-5 (default)", {}),
        ("dopri5, row norm, t, rtol=atol=1e-4", {"rtol": 1e-4, "atol": 1e-4}),
        ("dopri5, row norm, t, rtol=atol=3e-6", {"rtol": 3e-6, "atol": 3e-6}),
        ("dopri5, row norm, log t, rtol=atol=1e-5", {"time_variable": "log_t"}),
        ("dopri5, mixed norm, t, rtol=atol=1e-5", {"error_norm": "mixed"}),
        ("dopri5, mixed norm, t, rtol=atol=1e-6", {"error_norm": "mixed", "rtol": 1e-6,
                                                    "atol": 1e-6}),
    ]
    scipy_tols = [1e-5, 1e-6] if args.quick else [1e-5, 1e-6, 1e-7]
    if "contract" not in args.parts.split(","):
        return [], est
    rows = _likelihood_part("contract (2-D moons, default fit)", est, X, path, args, settings,
                            scipy_tols, [1e-5], workdir)
    return rows, est


def part_digits(args: Any, workdir: str) -> list[dict[str, Any]]:
    from sklearn.datasets import load_digits

    X = load_digits().data.astype(np.float64)
    X = X + np.random.default_rng(0).uniform(size=X.shape)
    n_test = 50 if args.quick else 200
    est, path, fit_s = _fit("digits", X[:-n_test], workdir, max_iter=300 if args.quick else 3000)
    print(f"[digits] fit {fit_s:.0f} s", flush=True)
    settings = [
        ("dopri5, row norm, t, rtol=atol=1e-5 (default)", {}),
        ("dopri5, row norm, t, rtol=atol=1e-6", {"rtol": 1e-6, "atol": 1e-6}),
        ("dopri5, mixed norm, t, rtol=atol=1e-5", {"error_norm": "mixed"}),
    ]
    return _likelihood_part("d = 64 (digits, exact divergence)", est, X[-n_test:], path, args,
                            settings, [], [1e-5, 1e-6], workdir)


def part_overhead(args: Any, models: dict[str, Any]) -> list[dict[str, Any]]:
    """Seconds per evaluation inside the solver vs one bare forward + exact divergence."""
    import torch

    from skscoreflow.likelihood import _default_chunk_size, _divergence, _make_probes, ode_log_likelihood

    rows = []
    for name, est in models.items():
        d = est.n_features_in_
        m = _default_chunk_size(d, "cpu")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, d, generator=g)
        probes = _make_probes(m, d, "exact")
        t = torch.tensor(0.3).expand(m)
        _divergence(est.network_, x, t, probes, exact=True)
        bare = []
        for _ in range(5):
            t0 = time.perf_counter()
            _divergence(est.network_, x, t, probes, exact=True)
            bare.append(time.perf_counter() - t0)
        load = load_average()
        solve = []
        for _ in range(3):
            t0 = time.perf_counter()
            _, info = ode_log_likelihood(est.network_, x, est.sde_, eps=est.eps_,
                                         divergence="exact", return_info=True)
            solve.append((time.perf_counter() - t0) / info.total_nfe)
        rows.append({"part": "overhead", "model": name, "d": d, "chunk_rows": m,
                     "bare_forward_divergence_s": float(np.median(bare)),
                     "solver_s_per_nfe": float(np.median(solve)),
                     "ratio": float(np.median(solve) / np.median(bare)), "load_1min": load})
        print(rows[-1], flush=True)
    return rows


def _mmd(a: np.ndarray, b: np.ndarray, scales: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5)) -> float:
    import torch

    a, b = torch.as_tensor(a[:3000], dtype=torch.float64), torch.as_tensor(b[:3000], dtype=torch.float64)

    def k(x: Any, y: Any) -> Any:
        d2 = torch.cdist(x, y) ** 2
        return sum(torch.exp(-d2 / (2 * s * s)) for s in scales)

    return float(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())


def part_sample(args: Any, est: Any) -> list[dict[str, Any]]:
    import torch
    from sklearn.neighbors import KernelDensity

    from skscoreflow.datasets import make_dataset
    from skscoreflow.sampling import ode_sample

    n = 1000 if args.quick else 5000
    seeds = [0, 1] if args.quick else [0, 1, 2]
    Xte = est._standardizer.transform(make_dataset("moons", n, random_state=7))
    eps = max(est.sde_.sampling_eps, est.eps_)
    rows = []
    for variable, tol in [("t", 1e-5), ("log_t", 1e-5), ("log_t", 1e-4), ("t", 1e-3), ("log_t", 1e-3)]:
        nfes, mmds, kdes, secs = [], [], [], []
        load = load_average()
        for seed in seeds:
            nfe = [0]

            def score(x: Any, t: Any) -> Any:
                nfe[0] += 1
                return est.network_(x, t)

            g = torch.Generator().manual_seed(seed)
            t0 = time.perf_counter()
            s = ode_sample(score, est.sde_, n, 2, eps=eps, rtol=tol, atol=tol, generator=g,
                           time_variable=variable).numpy()
            secs.append(time.perf_counter() - t0)
            nfes.append(nfe[0] - 1)  # minus the final denoising evaluation
            mmds.append(_mmd(s, Xte))
            kdes.append(KernelDensity(bandwidth=0.05).fit(s).score_samples(Xte).mean())
        rows.append({"part": "sample", "setting": f"dopri5, {variable}, rtol=atol={tol:g}"
                     + (" (today's sample)" if (variable, tol) == ("t", 1e-5) else "")
                     + (" (new sample: 10x tolerances)" if (variable, tol) == ("log_t", 1e-4) else ""),
                     "n_samples": n, "seeds": len(seeds), "nfe": float(np.mean(nfes)),
                     "seconds": float(np.mean(secs)), "mmd": float(np.mean(mmds)),
                     "mmd_se": float(np.std(mmds, ddof=1) / np.sqrt(len(seeds))),
                     "kde_loglik": float(np.mean(kdes)),
                     "kde_loglik_se": float(np.std(kdes, ddof=1) / np.sqrt(len(seeds))),
                     "load_1min": load})
        print(rows[-1], flush=True)
    return rows


def _fmt(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for c in out.columns:
        if c.startswith("err_") or c in ("mmd", "mmd_se", "bare_forward_divergence_s", "solver_s_per_nfe"):
            out[c] = [f"{v:.2e}" if isinstance(v, float) and np.isfinite(v) else "" for v in out[c]]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small models and row counts (smoke test)")
    ap.add_argument("--baseline-rev", default="75bb8a9", help="git revision of today's engine")
    ap.add_argument("--parts", default="contract,digits,overhead,sample")
    ap.add_argument("--out-dir", default=OUT_DIR)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    parts = args.parts.split(",")
    start = time.perf_counter()
    tables: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        models: dict[str, Any] = {}
        if {"contract", "overhead", "sample"} & set(parts):
            rows, models["moons (2-D default)"] = part_contract(args, workdir)
            if "contract" in parts:
                tables["likelihood"] = rows
        if "digits" in parts:
            tables.setdefault("likelihood", []).extend(part_digits(args, workdir))
            from skscoreflow import ScoreFlowDensity

            models["digits (d = 64)"] = ScoreFlowDensity.load(os.path.join(workdir, "digits.skf"))
        if "overhead" in parts:
            tables["overhead"] = part_overhead(args, models)
        if "sample" in parts:
            tables["sample"] = part_sample(args, models["moons (2-D default)"])
    minutes = (time.perf_counter() - start) / 60
    name = "engine_quick" if args.quick else "engine"
    os.makedirs(args.out_dir, exist_ok=True)
    cmd = "python benchmarks/bench_engine.py" + (" --quick" if args.quick else "")
    with open(os.path.join(args.out_dir, f"{name}.md"), "w") as fh:
        fh.write("# Engine: per-row accuracy, evaluations and rows/s of the likelihood; sampler evaluations\n\n")
        fh.write(f"Machine: {machine('cpu')}.\n\n")
        fh.write(f"Command: `{cmd}` ({minutes:.1f} min, one process, 1 torch thread). "
                 "Per-row errors are against a tight float64 solve of the same network "
                 "(`rtol = atol = 1e-9`); `nfe_per_row` counts network evaluations (forward + "
                 "exact divergence) per row; `today` is the package at the baseline revision, "
                 "run on the same saved model in a subprocess. Compare timings only within a "
                 "part (see `load_1min`).\n\n")
        for key, rows in tables.items():
            df = pd.DataFrame(rows)
            df.to_csv(os.path.join(args.out_dir, f"{name}_{key}.csv"), index=False)
            fh.write(f"## {key}\n\n" + markdown_table(_fmt(df)) + "\n")
    print(f"wrote {name}.md in {minutes:.1f} min")


if __name__ == "__main__":
    main()
