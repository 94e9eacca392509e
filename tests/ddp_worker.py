"""One rank of the data-parallel tests (launched by ``torch.distributed.run``; not a test file).

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node=W ddp_worker.py OUT``.
Each rank fits the estimators of ``CASES`` and writes what the tests compare to
``OUT/rank{r}.npz``; rank-0-only file writes are probed with per-rank paths.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from skscoreflow import ScoreFlowDensity

#: Shared by the worker and the tests: the data and the estimators fitted in each case.
N_ROWS = 300  # not a multiple of the global batch nor of the world size


def data(case: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if case == "variational":
        return rng.integers(0, 4, size=(200, 3)).astype(np.float64)
    return rng.normal(size=(N_ROWS, 2)) * [1.0, 3.0] + [0.5, -1.0]


CASES = {
    # Plain: DDP over the global batch; checkpoints every 10 steps.
    "plain": dict(hidden_layer_sizes=(16, 16), max_iter=30, batch_size=64, early_stopping=False),
    # Early stopping: validation every 50 steps, stops after one validation without progress.
    "early": dict(hidden_layer_sizes=(16,), max_iter=400, batch_size=50, early_stopping=True,
                  n_iter_no_change=1, tol=10.0),
    # Variational dequantization: the dequantizer phase is replicated across ranks.
    "variational": dict(hidden_layer_sizes=(16,), max_iter=20, batch_size=40, early_stopping=False,
                        dequantization="variational", dequantizer_max_iter=10,
                        dequantizer_hidden_layer_sizes=(8,), dequantizer_n_couplings=2),
}
# No dropout: its masks are drawn per process, so only a dropout-free fit is the same at every
# world size.
COMMON = dict(random_state=0, dtype="float64", device="cpu", fourier_features=0, dropout=0.0)
PARTIAL = dict(hidden_layer_sizes=(16,), max_iter=6, batch_size=50)


def partial_fit_chunks(est: ScoreFlowDensity) -> ScoreFlowDensity:
    """Three chunks of 100 rows: two steps each."""
    X = data("plain")
    for start in range(0, 300, 100):
        est.partial_fit(X[start : start + 100])
    return est


def flat(module: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).numpy()


def interrupt_on_one_rank(rank: int) -> dict[str, np.ndarray]:
    import os
    import signal

    from skscoreflow._distributed import resolve_group
    from skscoreflow.nets import ScoreMLP
    from skscoreflow.sde import VPSDE
    from skscoreflow.training import train_score_model

    torch.manual_seed(0)
    net = ScoreMLP(2, VPSDE(), hidden_layer_sizes=(8,)).double()

    def callback(state) -> None:
        if rank == 1 and state.n_iter == 3:
            os.kill(os.getpid(), signal.SIGINT)

    state = train_score_model(
        net, torch.tensor(data("plain")), VPSDE(), max_iter=10, batch_size=32,
        generator=torch.Generator().manual_seed(0), callback=callback,
        group=resolve_group("auto", torch.device("cpu")),
    )
    return {"interrupt/n_iter": np.asarray(state.n_iter),
            "interrupt/interrupted": np.asarray(state.interrupted)}


def main(out: Path) -> None:
    import skscoreflow._checkpoint as checkpoint_module
    import skscoreflow._persistence as persistence_module

    # Count this rank's checkpoint and model-file writes (both go through atomic_save).
    writes: list[str] = []
    atomic_save = checkpoint_module.atomic_save

    def counting_save(obj: object, path: object) -> None:
        writes.append(str(path))
        atomic_save(obj, path)

    checkpoint_module.atomic_save = counting_save
    if hasattr(persistence_module, "atomic_save"):
        persistence_module.atomic_save = counting_save

    results: dict[str, np.ndarray] = {}
    for case, params in CASES.items():
        if case == "plain":
            # distributed=True initialises the group from torchrun's environment.
            params = dict(params, distributed=True, checkpoint_path=str(out) + "/",
                          checkpoint_every=10)
        est = ScoreFlowDensity(**COMMON, **params)
        X = data(case)
        est.fit(X)
        rank = torch.distributed.get_rank()
        results[f"{case}/params"] = flat(est._train_state.model)
        results[f"{case}/ema"] = flat(est.network_)
        results[f"{case}/loss"] = np.asarray(est.loss_curve_)
        results[f"{case}/n_iter"] = np.asarray(est.n_iter_)
        results[f"{case}/world"] = np.asarray(est.world_size_)
        results[f"{case}/score"] = est.score_samples(X[:20])
        if case == "early":
            results[f"{case}/validation"] = np.asarray(est.validation_scores_)
            results[f"{case}/stopped"] = np.asarray(est._train_state.stopped_early)
        if case == "variational":
            results[f"{case}/deq"] = flat(est.dequantizer_)
            results[f"{case}/deq_loss"] = np.asarray(est.dequantizer_loss_curve_)
        # Every rank asks to save (to its own path, to tell them apart): only rank 0 writes.
        est.save(out / f"{case}-rank{rank}.skf")
    # Streaming: partial_fit on chunks, each step data-parallel.
    est = partial_fit_chunks(ScoreFlowDensity(**COMMON, **PARTIAL))
    results["partial/params"] = flat(est._train_state.model)
    results["partial/ema"] = flat(est.network_)
    results["partial/loss"] = np.asarray(est.loss_curve_)
    results["partial/world"] = np.asarray(est.world_size_)
    # A Ctrl-C on rank 1 alone (a real SIGINT, held to the step boundary): every rank stops
    # after the same step.
    results.update(interrupt_on_one_rank(rank))
    results["writes"] = np.asarray(len(writes))
    np.savez(out / f"rank{rank}.npz", **results)


def resume(out: Path, checkpoints: Path) -> None:
    """Continue a 1-process fit's checkpoint on every rank (rank 0 reads it)."""
    est = ScoreFlowDensity(**COMMON, **CASES["plain"], distributed=True,
                           checkpoint_path=str(checkpoints) + "/", checkpoint_every=10)
    est.fit(data("plain"))
    rank = torch.distributed.get_rank()
    np.savez(out / f"resume-rank{rank}.npz", params=flat(est._train_state.model),
             ema=flat(est.network_), loss=np.asarray(est.loss_curve_),
             n_iter=np.asarray(est.n_iter_))


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[2] == "resume":
        resume(Path(sys.argv[1]), Path(sys.argv[3]))
    else:
        main(Path(sys.argv[1]))
