"""Data-parallel training (DDP over gloo): 2 CPU processes launched by torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from skscoreflow import ScoreFlowDensity

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from ddp_worker import CASES, COMMON, PARTIAL, data, flat, partial_fit_chunks  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def launch(*args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", SKSCOREFLOW_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(HERE / "ddp_worker.py"), *args],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """Run the worker on 2 processes once; the per-rank results."""
    out = tmp_path_factory.mktemp("ddp")
    launch(str(out))
    return out, [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_hold_identical_weights(ranks, case: str) -> None:
    _, (r0, r1) = ranks
    keys = [k for k in r0 if k.startswith(case + "/")]
    assert f"{case}/params" in keys and f"{case}/ema" in keys
    for key in keys:
        assert np.array_equal(r0[key], r1[key]), key  # bitwise, not approximately
    assert int(r0[f"{case}/world"]) == 2


@pytest.mark.parametrize("case", list(CASES))
def test_equals_one_process_fit_at_the_same_global_batch(ranks, case: str) -> None:
    _, (r0, _) = ranks
    est = ScoreFlowDensity(**COMMON, **CASES[case], distributed=False).fit(data(case))
    assert est.world_size_ == 1
    assert est.n_iter_ == int(r0[f"{case}/n_iter"])
    np.testing.assert_allclose(r0[f"{case}/params"], flat(est._train_state.model), rtol=0, atol=1e-10)
    np.testing.assert_allclose(r0[f"{case}/ema"], flat(est.network_), rtol=0, atol=1e-10)
    np.testing.assert_allclose(r0[f"{case}/loss"], est.loss_curve_, rtol=0, atol=1e-10)
    if case == "variational":
        np.testing.assert_allclose(r0[f"{case}/deq"], flat(est.dequantizer_), rtol=0, atol=1e-10)


def test_partial_fit_is_data_parallel_and_equals_one_process(ranks) -> None:
    _, (r0, r1) = ranks
    for key in ("partial/params", "partial/ema", "partial/loss"):
        assert np.array_equal(r0[key], r1[key]), key
    assert int(r0["partial/world"]) == 2
    est = partial_fit_chunks(ScoreFlowDensity(**COMMON, **PARTIAL, distributed=False))
    assert est.n_iter_ == 6
    np.testing.assert_allclose(r0["partial/params"], flat(est._train_state.model), rtol=0, atol=1e-10)
    np.testing.assert_allclose(r0["partial/loss"], est.loss_curve_, rtol=0, atol=1e-10)


def test_early_stopping_ends_on_all_ranks_at_the_same_step(ranks) -> None:
    _, (r0, r1) = ranks
    assert bool(r0["early/stopped"]) and bool(r1["early/stopped"])
    assert int(r0["early/n_iter"]) == int(r1["early/n_iter"]) < CASES["early"]["max_iter"]


def test_an_interrupt_on_one_rank_stops_every_rank_after_the_same_step(ranks) -> None:
    _, (r0, r1) = ranks
    assert bool(r0["interrupt/interrupted"]) and bool(r1["interrupt/interrupted"])
    # Ctrl-C on rank 1 during step 3 is agreed at step 4's all-reduce.
    assert int(r0["interrupt/n_iter"]) == int(r1["interrupt/n_iter"]) == 4


def test_only_rank_zero_writes_files(ranks) -> None:
    out, (r0, r1) = ranks
    for case in CASES:
        assert (out / f"{case}-rank0.skf").exists()
        assert not (out / f"{case}-rank1.skf").exists()
    # Rank 0: two periodic checkpoints (steps 10 and 20 of 30) and three models; rank 1: none.
    assert int(r0["writes"]) == 5 and int(r1["writes"]) == 0
    assert not list(out.glob("skscoreflow-checkpoint-*"))  # removed once the fit completed


@pytest.mark.parametrize("case", list(CASES))
def test_saved_model_reloads_in_a_plain_process_and_scores_the_same(ranks, case: str) -> None:
    out, (r0, _) = ranks
    est = ScoreFlowDensity.load(out / f"{case}-rank0.skf")
    assert est.world_size_ == 2
    np.testing.assert_allclose(est.score_samples(data(case)[:20]), r0[f"{case}/score"],
                               rtol=0, atol=1e-10)
    est.save(out / f"{case}-again.skf")  # outside a process group: an ordinary save
    assert (out / f"{case}-again.skf").exists()


def test_auto_ignores_torchrun_variables_without_a_process_group(monkeypatch) -> None:
    # joblib workers of a torchrun job inherit these: they must not switch DDP on.
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    est = ScoreFlowDensity(hidden_layer_sizes=(8,), max_iter=2, random_state=0).fit(data("plain"))
    assert est.world_size_ == 1
    assert not torch.distributed.is_initialized()


def test_distributed_true_outside_torchrun_says_how_to_launch(monkeypatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    est = ScoreFlowDensity(hidden_layer_sizes=(8,), max_iter=2, distributed=True)
    with pytest.raises(RuntimeError, match="torchrun"):
        est.fit(data("plain"))


def test_a_one_process_checkpoint_resumes_on_two_processes(tmp_path, monkeypatch) -> None:
    # The fit does not depend on the number of processes, so neither does its checkpoint:
    # rank 0 reads it and broadcasts it; the result equals the uninterrupted 1-process fit.
    import skscoreflow._estimator as estimator_module
    import skscoreflow._params as params_module

    monkeypatch.setattr(params_module, "_interactive", lambda: True)  # warn, do not re-raise
    params = dict(COMMON, **CASES["plain"], distributed=False)
    reference = ScoreFlowDensity(**params).fit(data("plain"))
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    est = ScoreFlowDensity(**params, checkpoint_path=str(checkpoints) + "/", checkpoint_every=10)
    real = estimator_module.train_score_model

    def interrupted_at_17(*args, **kwargs):
        def callback(state):
            if state.n_iter == 17:
                raise KeyboardInterrupt

        return real(*args, callback=callback, **kwargs)

    monkeypatch.setattr(estimator_module, "train_score_model", interrupted_at_17)
    with pytest.warns(UserWarning, match="after step 17"):
        est.fit(data("plain"))
    assert len(list(checkpoints.glob("*.pt"))) == 1
    launch(str(tmp_path), "resume", str(checkpoints))
    results = [np.load(tmp_path / f"resume-rank{r}.npz") for r in range(2)]
    for key in ("params", "ema", "loss"):
        assert np.array_equal(results[0][key], results[1][key]), key
    assert int(results[0]["n_iter"]) == 30
    np.testing.assert_allclose(results[0]["ema"], flat(reference.network_), rtol=0, atol=1e-10)
    np.testing.assert_allclose(results[0]["loss"], reference.loss_curve_, rtol=0, atol=1e-10)
    assert not list(checkpoints.glob("*.pt"))  # removed by rank 0 once the fit completed
