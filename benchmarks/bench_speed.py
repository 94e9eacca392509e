"""Speed: likelihood evaluation against a reference-style SciPy loop, exact vs Hutchinson cost as
the dimension grows, time and peak memory as the number of rows grows, and the overhead of the
training loop against a minimal hand-written PyTorch loop.

    python benchmarks/bench_speed.py [--quick]

1. ``score_samples`` rows/second on one fitted 2-D network (moons, 2,000 steps) at
   ``rtol = atol = 1e-5`` against the paper's evaluation loop: ``scipy.integrate.solve_ivp``
   (RK45) over the flattened batch as a float64 numpy state, the drift and its divergence from
   autograd on each call (ScoreFlow's ``likelihood.py``: its ``div_fn`` summed over the basis
   probes, so the same exact divergence, each probe paying a forward and a backward pass). Ratio
   and NFE from the same run, and the largest difference of the two log-densities.
2. Exact vs Hutchinson (one Rademacher probe) ``ode_log_likelihood`` time per row for
   ``d = 2 ... 64`` on a ScoreMLP with random weights (a non-trivial flow), same tolerance.
3. ``score_samples`` time and peak resident memory for 1k ... 100k rows, each size in a fresh
   process (``ru_maxrss`` growth during the call), ``rtol = atol = 1e-3`` to keep 100k rows
   affordable on 2 cores.
4. Optimizer steps/second of ``ScoreFlowDensity.fit`` vs a minimal loop (same ScoreMLP, batch,
   Adam, importance-sampled likelihood-weighted loss), medians of 3 alternating repeats.

Writes ``docs/benchmarks/speed.{csv,md}``. On the CPU, parts 1-2 and parts 3-4 run in two worker
processes side by side (``--jobs 2``, the default; each has one torch thread, ``--threads``, so
the two cores are not oversubscribed); every ratio is timed within one process, and every row
records the load average.

``--device cuda`` runs every part on the GPU (the reference loop then moves its float64 numpy
state to the GPU and back on each call, as the paper's code does) and writes
``speed_gpu.{csv,md}`` labelled with the card; the scaling part adds 300k and 1M rows and
records the peak GPU memory allocated by the call instead of the resident set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(__file__))
from _common import OUT_DIR, device_label, load_average, write_table  # noqa: E402


def _sync() -> None:
    """Wait for queued CUDA work, so a timer measures it (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    _sync()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    _sync()
    return out, time.perf_counter() - t0


def scipy_reference_loglik(est: Any, X: np.ndarray, rtol: float, atol: float) -> tuple[np.ndarray, int]:
    """The paper's evaluation loop: solve_ivp(RK45) on a flattened float64 numpy state.

    The divergence is the paper's ``div_fn`` (``likelihood.py``: the gradient of
    ``sum(fn(x, t) * v)`` dotted with ``v``) summed over the ``d`` basis probes, i.e. ``d``
    stacked copies of the batch, each paying a forward and a backward pass: skscoreflow's
    fallback path ``_divergence_stacked`` (ours shares one forward pass, see ``_divergence``).
    """
    import torch
    from scipy import integrate

    from skscoreflow.likelihood import _divergence_stacked, _make_probes

    net, sde, eps, device = est.network_, est.sde_, est.eps_, est.device_
    Z = (X - est.mean_) / est.scale_
    n, d = Z.shape
    probes = _make_probes(n, d, "exact", device=device)
    nfe = 0

    def drift(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sde.ode_drift(x, t, net(x, t))

    def ode_func(t: float, state: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        x = torch.as_tensor(state[: n * d].reshape(n, d), dtype=torch.float32, device=device)
        vec_t = torch.full((n,), t, dtype=torch.float32, device=device)
        value, div = _divergence_stacked(drift, x, vec_t, probes, True, False)
        return np.concatenate([value.cpu().numpy().ravel(), div.cpu().numpy()]).astype(np.float64)

    init = np.concatenate([Z.ravel(), np.zeros(n)])
    sol = integrate.solve_ivp(ode_func, (eps, sde.T), init, rtol=rtol, atol=atol, method="RK45")
    zT = torch.as_tensor(sol.y[: n * d, -1].reshape(n, d))
    delta = sol.y[n * d :, -1]
    return sde.prior_log_prob(zT).numpy() + delta - np.log(est.scale_).sum(), nfe


def part_reference(rows: list, quick: bool, device: str) -> None:
    import torch

    from skscoreflow import ScoreFlowDensity
    from skscoreflow.datasets import make_dataset
    from skscoreflow.likelihood import ode_log_likelihood

    X = make_dataset("moons", 5000, random_state=0)
    est = ScoreFlowDensity(max_iter=300 if quick else 2000, random_state=0, device=device).fit(X)
    Xt = make_dataset("moons", 200 if quick else 1000, random_state=1)
    ours_t, ref_t = [], []
    for _ in range(3):  # alternate, take medians: the machine is shared
        ours, t1 = _timed(est.score_samples, Xt)
        ref, t2 = _timed(scipy_reference_loglik, est, Xt, est.rtol, est.atol)
        ours_t.append(t1)
        ref_t.append(t2)
    ref_ll, ref_nfe = ref
    Zt = torch.as_tensor((Xt - est.mean_) / est.scale_, dtype=torch.float32, device=est.device_)
    _, info = ode_log_likelihood(est.network_, Zt, est.sde_, eps=est.eps_, return_info=True)
    t_ours, t_ref = float(np.median(ours_t)), float(np.median(ref_t))
    common = {"part": "likelihood vs SciPy RK45", "n_rows": len(Xt), "d": 2, "load_1min": load_average()}
    rows.append({**common, "method": "skscoreflow score_samples (dopri5, torch)", "seconds": t_ours,
                 "rows_per_s": len(Xt) / t_ours, "nfe": info.total_nfe, "ratio": t_ref / t_ours,
                 "note": f"max |Δ log p| vs reference {np.max(np.abs(ours - ref_ll)):.2e}"})
    rows.append({**common, "method": "reference solve_ivp RK45 (float64 numpy state)", "seconds": t_ref,
                 "rows_per_s": len(Xt) / t_ref, "nfe": ref_nfe, "ratio": 1.0, "note": "paper-style loop"})


def part_divergence(rows: list, quick: bool, device: str) -> None:
    import torch

    from skscoreflow.likelihood import ode_log_likelihood
    from skscoreflow.nets import ScoreMLP
    from skscoreflow.sde import VPSDE

    sde = VPSDE()
    n = 100 if quick else 500
    for d in (2, 4, 8, 16, 32, 64):
        torch.manual_seed(0)
        net = ScoreMLP(d, sde, (128, 128))
        torch.nn.init.normal_(net.out.weight, std=0.1)  # a non-trivial flow (zero-init is Gaussian)
        net = net.to(device)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, d, generator=g, device=device)
        res = {}
        if d == 2:  # warm up kernels (and CUDA's libraries) outside the timings
            ode_log_likelihood(net, x[:10], sde, divergence="exact")
        for div in ("exact", "hutchinson"):
            (ll, info), sec = _timed(
                ode_log_likelihood, net, x, sde, divergence=div, generator=g, return_info=True
            )
            res[div] = (ll, sec, info.total_nfe)
        ex, hu = res["exact"], res["hutchinson"]
        for div, (ll, sec, nfe) in res.items():
            rows.append({"part": "exact vs Hutchinson", "method": div, "n_rows": n, "d": d,
                         "seconds": sec, "rows_per_s": n / sec, "nfe": nfe,
                         "ratio": ex[1] / hu[1] if div == "hutchinson" else 1.0,
                         "note": (f"Hutchinson error std {float((hu[0] - ex[0]).std()):.3f} nats/row"
                                  if div == "hutchinson" else ""),
                         "load_1min": load_average()})
        print(f"d={d}: exact {ex[1]:.2f}s hutchinson {hu[1]:.2f}s", flush=True)


def _scaling_worker(n: int, rtol: float, device: str) -> dict[str, Any]:
    import resource

    import torch

    torch.set_num_threads(1)
    from skscoreflow import ScoreFlowDensity
    from skscoreflow.datasets import make_dataset

    est = ScoreFlowDensity(max_iter=300, random_state=0, rtol=rtol, atol=rtol, device=device).fit(
        make_dataset("moons", 2000, random_state=0)
    )
    X = make_dataset("moons", n, random_state=1)
    est.score_samples(X[:100])  # warm up allocator and kernels
    cuda = est.device_.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(est.device_)
        base = torch.cuda.memory_allocated(est.device_)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, sec = _timed(est.score_samples, X)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"seconds": sec, "peak_growth_mib": (after - before) / 1024, "rss_mib": after / 1024}
    if cuda:
        out["gpu_peak_mib"] = (torch.cuda.max_memory_allocated(est.device_) - base) / 2**20
    return out


def part_scaling(rows: list, quick: bool, device: str) -> None:
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    sizes = (1000, 3000, 10_000) if quick else (1000, 3000, 10_000, 30_000, 100_000)
    if device.startswith("cuda") and not quick:
        sizes += (300_000, 1_000_000)
    ctx = mp.get_context("spawn")
    for n in sizes:
        if device.startswith("cuda"):
            # The peak GPU memory is reset per call, so no fresh process is needed (and a CUDA
            # start-up per size would dominate the part).
            res = _scaling_worker(n, 1e-3, device)
        else:
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:  # fresh process: clean peak RSS
                res = pool.submit(_scaling_worker, n, 1e-3, device).result()
        note = f"peak RSS growth {res['peak_growth_mib']:.0f} MiB (process {res['rss_mib']:.0f} MiB)"
        if "gpu_peak_mib" in res:  # host RSS says little when the work is on the GPU
            note = f"peak GPU memory of the call {res['gpu_peak_mib']:.0f} MiB"
        rows.append({"part": "rows scaling", "method": "score_samples (rtol=atol=1e-3)", "n_rows": n, "d": 2,
                     "seconds": res["seconds"], "rows_per_s": n / res["seconds"], "nfe": np.nan,
                     "ratio": np.nan, "note": note, "load_1min": load_average()})
        print(f"n={n}: {res}", flush=True)


def hand_loop(X: np.ndarray, steps: int, batch_size: int, seed: int = 0, device: str = "cpu") -> float:
    """Minimal training loop: same network, loss and optimizer, nothing else. Returns seconds."""
    import torch

    from skscoreflow.nets import ScoreMLP
    from skscoreflow.sde import VPSDE

    torch.manual_seed(seed)
    sde = VPSDE()
    eps = 3e-3  # the estimator's default for VP on continuous data
    Z = torch.as_tensor((X - X.mean(0)) / X.std(0), dtype=torch.float32, device=device)
    net = ScoreMLP(2, sde, (128, 128, 128), fourier_features=128).to(device)  # "auto" for 2 features
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        x0 = Z[torch.randint(len(Z), (batch_size,), device=device)]
        t = sde.sample_time(batch_size, eps, device=device).float()
        z = torch.randn_like(x0)
        xt = sde.mean_coeff(t)[:, None] * x0 + sde.std(t)[:, None] * z
        loss = (net.noise(xt, t) - z).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync()
    return time.perf_counter() - t0


def part_training(rows: list, quick: bool, device: str) -> None:
    from skscoreflow import ScoreFlowDensity
    from skscoreflow.datasets import make_dataset

    X = make_dataset("moons", 10_000, random_state=0)
    steps = 200 if quick else 1000
    ours_t, hand_t = [], []
    for rep in range(3):
        est = ScoreFlowDensity(
            max_iter=steps, random_state=rep, batch_size=1024, ema_decay=0.999, device=device
        ).fit(X)
        ours_t.append(est.fit_time_)
        hand_t.append(hand_loop(X, steps, 1024, seed=rep, device=device))
    t_ours, t_hand = float(np.median(ours_t)), float(np.median(hand_t))
    common = {"part": "training loop", "n_rows": len(X), "d": 2, "nfe": np.nan, "load_1min": load_average()}
    rows.append({**common, "method": "ScoreFlowDensity.fit (EMA, clipping, schedule, bookkeeping)",
                 "seconds": t_ours, "rows_per_s": steps / t_ours, "ratio": t_ours / t_hand,
                 "note": f"{steps} steps, batch 1024; rows_per_s = steps/s"})
    rows.append({**common, "method": "minimal hand-written PyTorch loop", "seconds": t_hand,
                 "rows_per_s": steps / t_hand, "ratio": 1.0, "note": "same network, loss, Adam"})


PART_NAMES = {"reference": "likelihood vs SciPy RK45", "divergence": "exact vs Hutchinson",
              "scaling": "rows scaling", "training": "training loop"}
PARTS = {"reference": part_reference, "divergence": part_divergence, "scaling": part_scaling,
         "training": part_training}


def _run_parts(parts: list[str], quick: bool, device: str, threads: int) -> list[dict[str, Any]]:
    """Run some parts in this process (a worker of ``--jobs``) and return their rows."""
    import torch

    torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    for part in parts:
        PARTS[part](rows, quick, device)
    return rows


def main(argv: list[str] | None = None) -> None:
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing as mp

    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--jobs", type=int, default=2,
        help="worker processes on the CPU: 2 runs reference+divergence beside scaling+training "
        "(each ratio is timed within one process); always 1 on a GPU",
    )
    parser.add_argument("--device", default="cpu", help="torch device of every part (cpu, cuda)")
    parser.add_argument("--out-dir", default=OUT_DIR, help="where the tables go (docs/benchmarks)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gpu = torch.device(args.device).type == "cuda"
    jobs = 1 if gpu else max(1, args.jobs)
    parts = args.parts.split(",")
    for part in parts:
        if part not in PARTS:
            parser.error(f"unknown part {part!r}; expected some of {list(PARTS)}")
    # Two balanced groups (about 4 minutes each on one CPU thread).
    groups = [parts] if jobs == 1 else [[p for p in parts if p in ("reference", "divergence")],
                                        [p for p in parts if p in ("scaling", "training")]]
    groups = [g for g in groups if g]
    suffix = ("_gpu" if gpu else "") + ("_quick" if args.quick else "")
    cmd = "python benchmarks/bench_speed.py" + (" --quick" if args.quick else "")
    cmd += f" --device {args.device}" if gpu else ""
    where = (f"on {device_label(args.device)}" if gpu
             else f"CPU, {len(groups)} worker process(es) side by side")
    cols = ["part", "method", "n_rows", "d", "seconds", "rows_per_s", "nfe", "ratio", "note", "load_1min"]
    done: dict[str, list[dict[str, Any]]] = {}
    t0 = time.perf_counter()

    def write() -> None:
        # Written after every group: a run stopped early keeps what it finished.
        rows = [r for p in parts if p in done for r in done[p]]
        wall = time.perf_counter() - t0
        write_table(
            pd.DataFrame(rows)[cols],
            "speed" + suffix,
            "Speed: likelihood evaluation, divergence estimators, scaling, training loop"
            + (f" ({device_label(args.device)})" if gpu else ""),
            notes=(
                f"Command: `{cmd}` ({wall / 60:.1f} min, {args.threads} torch thread(s) per "
                f"process, {where}). `ratio`: for the SciPy "
                "comparison, reference time / ours (> 1: ours faster); for Hutchinson, exact time / "
                "Hutchinson time; for the training loop, our time / hand loop time (the overhead, "
                "1.0 = none). Timings are medians of 3 alternating repeats where stated; compare only "
                "within a part (the machine is shared: see `load_1min`)."
            ),
            out_dir=args.out_dir,
            device=args.device,
        )

    if jobs == 1:
        for part in parts:
            done[part] = _run_parts([part], args.quick, args.device, args.threads)
            write()
    else:
        with ProcessPoolExecutor(len(groups), mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_parts, g, args.quick, args.device, args.threads): g for g in groups}
            for fut in as_completed(futures):
                rows = fut.result()
                for part in futures[fut]:
                    name = PART_NAMES[part]
                    done[part] = [r for r in rows if r["part"] == name]
                write()
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
