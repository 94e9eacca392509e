"""Compute the measured numbers quoted in the user guide (and its importance-sampling figure).

Run from the repository root (about a minute on one CPU thread)::

    OMP_NUM_THREADS=1 python docs/scripts/guide_numbers.py

It fits one small model (300 steps, for speed) on the built-in ``moons`` set and prints

* the spread of the per-batch training loss and gradient norm with uniform vs importance-
  sampled times, for VP and sub-VP (figure ``docs/_static/is_variance.png``);
* the ODE log-likelihood beside the Theorem-3 bound on held-out rows;
* the rescaled training loss beside the bound;
* the cost of the ODE likelihood for several tolerances and both divergence estimators.

The analytic numbers of the guide are doctests inside the guide itself (tests/test_docs.py).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from skscoreflow import ScoreFlowDensity
from skscoreflow.datasets import make_dataset, true_log_density
from skscoreflow.likelihood import ode_log_likelihood
from skscoreflow.nets import ScoreMLP
from skscoreflow.sde import get_sde
from skscoreflow.weighting import dsm_loss

OUT = Path(__file__).resolve().parents[1] / "_static" / "is_variance.png"


def objective_samples(net, X, sde, weighting, n_batches, batch_size, seed):
    """Per-batch estimates of the same objective (the likelihood-weighted DSM integral).

    ``likelihood`` (uniform t) is scaled by ``T - eps`` and ``likelihood_is`` by ``Z``, so both
    estimate ``∫ g^2 E||s + z/sigma||^2 dt / d`` and their spreads are comparable.
    """
    g = torch.Generator().manual_seed(seed)
    eps = sde.default_eps
    scale = (sde.T - eps) if weighting == "likelihood" else float(sde.importance_normalizer(eps))
    losses, norms = [], []
    params = [p for p in net.parameters() if p.requires_grad]
    for _ in range(n_batches):
        idx = torch.randint(0, X.shape[0], (batch_size,), generator=g)
        loss = scale * dsm_loss(net, X[idx], sde, weighting, generator=g).mean()
        grads = torch.autograd.grad(loss, params)
        losses.append(float(loss.detach()))
        norms.append(float(torch.sqrt(sum((gr**2).sum() for gr in grads))))
    return np.array(losses), np.array(norms)


def main() -> None:
    torch.set_num_threads(1)
    X = make_dataset("moons", 4000, random_state=0)
    X_test = make_dataset("moons", 500, random_state=1)
    truth = float(true_log_density("moons", X_test).mean())

    t0 = time.perf_counter()
    # The guide's numbers were measured with the paper's VP cutoff and the plain network (the
    # estimator's defaults before eps=3e-3 and Fourier features became the 2-D defaults).
    est = ScoreFlowDensity(max_iter=300, random_state=0, eps=1e-5, fourier_features=0).fit(X)
    fit_s = time.perf_counter() - t0
    print(f"fit: 300 steps in {fit_s:.1f} s; final training loss {est.loss_curve_[-1]:.4f}")

    # --- Q1: ODE likelihood (p_ODE) beside the Theorem-3 bound (p_SDE), same network.
    t0 = time.perf_counter()
    ode = est.score_samples(X_test)
    ode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lb = est.bound(X_test)
    lb_s = time.perf_counter() - t0
    print(f"true mean log-density        {truth:.4f}")
    print(f"ODE log-likelihood (p_ODE)   {ode.mean():.4f} ± {ode.std(ddof=1)/math.sqrt(len(ode)):.4f}  ({ode_s:.1f} s)")
    print(f"bound on log p_SDE           {lb.mean():.4f} ± {lb.std(ddof=1)/math.sqrt(len(lb)):.4f}  ({lb_s:.1f} s)")
    print(f"paired difference ODE-bound  {(ode - lb).mean():.4f} ± {(ode - lb).std(ddof=1)/math.sqrt(len(lb)):.4f}")

    # --- Q4: rescaled training loss vs the bound (standardised units, then + log-det).
    sde, eps = est.sde_, est.eps_
    Z = float(sde.importance_normalizer(eps))
    d = X.shape[1]
    Zt = torch.tensor((X_test - est.mean_) / est.scale_, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([dsm_loss(est.network_, Zt, sde, "likelihood_is", generator=g)
                             for _ in range(1000)]).double()
        L = draws.mean(0)
        L_se = float(draws.mean(1).std() / math.sqrt(draws.shape[0]))
        prior = sde.expected_prior_nll(Zt.double())
    drift = -sde.drift_divergence_integral(eps, d)
    nll_from_loss = 0.5 * Z * d * (L - 1) + prior + drift
    approx = -(nll_from_loss.numpy()) - np.log(est.scale_).sum()
    print(f"Z = {Z:.4f}, Z d / 2 = {Z * d / 2:.3f}, drift term = {drift:.3f}")
    print(f"held-out training loss L     {float(L.mean()):.4f} ± {L_se:.4f}")
    print(f"-(Zd/2 (L-1) + prior + drift) + log-det = {approx.mean():.4f} ± {0.5 * Z * d * L_se:.4f}"
          "  (bound without offset)")
    lb_no = est.bound(X_test, offset=False)
    print(f"bound with offset=False      {lb_no.mean():.4f}")

    # --- Q2: spread of the per-batch objective and gradient norm, uniform vs IS times.
    rows = []
    Xs = torch.tensor((X - est.mean_) / est.scale_, dtype=torch.float32)
    for name in ("vp", "subvp"):
        s = get_sde(name)
        torch.manual_seed(0)
        net = ScoreMLP(2, s, (128, 128, 128))  # untrained: the N(0, I) reference score
        for w in ("likelihood", "likelihood_is"):
            loss, norm = objective_samples(net, Xs, s, w, 200, 512, seed=1)
            rows.append((name, w, loss, norm))
            print(f"{name:6s} {w:14s} loss mean {loss.mean():9.4f} sd {loss.std(ddof=1):9.4f}   "
                  f"grad-norm median {np.median(norm):9.4f} sd {norm.std(ddof=1):9.4f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        labels = [f"{n}\n{'IS' if w.endswith('_is') else 'uniform t'}" for n, w, _, _ in rows]
        axes[0].boxplot([r[2] for r in rows], showfliers=True)
        axes[0].set_xticks(range(1, len(rows) + 1), labels)
        axes[0].set_yscale("log")
        axes[0].set_title("per-batch estimate of the likelihood-weighted loss")
        axes[1].boxplot([r[3] for r in rows], showfliers=True)
        axes[1].set_xticks(range(1, len(rows) + 1), labels)
        axes[1].set_yscale("log")
        axes[1].set_title("per-batch gradient norm")
        fig.suptitle("standardised moons, batch 512, 200 batches; same untrained network "
                     "(the Gaussian reference) and objective")
        fig.tight_layout()
        OUT.parent.mkdir(exist_ok=True)
        fig.savefig(OUT, dpi=90)
        print(f"figure written to {OUT}")
    except ImportError:
        print("matplotlib not installed: no figure")

    # --- slow likelihoods: cost vs tolerance and divergence estimator (same 500 rows).
    Zt = Zt.to(torch.float32)
    results = {}
    for div in ("exact", "hutchinson"):
        for tol in (1e-5, 1e-3):
            t0 = time.perf_counter()
            ll, info = ode_log_likelihood(est.network_, Zt, sde, eps=eps, rtol=tol, atol=tol,
                                          divergence=div, return_info=True)
            sec = time.perf_counter() - t0
            results[div, tol] = ll.double()
            print(f"divergence={div:10s} rtol=atol={tol:g}: {info.total_nfe:4d} NFE, {sec:5.2f} s, "
                  f"mean log-lik {float(ll.double().mean()) - np.log(est.scale_).sum():.4f}")
    diff = results["hutchinson", 1e-5] - results["exact", 1e-5]
    print(f"Hutchinson - exact (paired, 1e-5): {float(diff.mean()):.4f} ± "
          f"{float(diff.std() / math.sqrt(len(diff))):.4f}; per-row sd {float(diff.std()):.3f}")


if __name__ == "__main__":
    main()
