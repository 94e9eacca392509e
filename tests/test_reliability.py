"""Reliability: checkpoints and bit-identical resume, clean interruption, atomic and hardened
model files, extreme inputs, the solver step cap, concurrent evaluation and the thread policy.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_array_equal

import skscoreflow._estimator as estimator_module
import skscoreflow._params as params_module
import skscoreflow.dequantization as dequantization_module
from skscoreflow import ScoreFlowDensity
from skscoreflow._threads import effective_cpus, fit_threads
from skscoreflow.training import NonFiniteLossError

TINY = dict(hidden_layer_sizes=(16, 16), batch_size=64, random_state=0, device="cpu")


@pytest.fixture(scope="module")
def X():
    from sklearn.datasets import make_moons

    return make_moons(300, noise=0.1, random_state=0)[0]


@pytest.fixture(scope="module")
def D():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 400)
    return np.stack([a, np.clip(a + rng.integers(-1, 2, 400), 0, 4)], 1)


class Crash(Exception):
    """Stands for a killed process: training stops mid-run, nothing is cleaned up."""


def _inject(monkeypatch, module, name, at, exc):
    """Make ``module.name``'s training raise ``exc`` after step ``at`` (once)."""
    real = getattr(module, name)
    fired = []

    def wrapped(*args, **kwargs):
        def callback(state):
            if state.n_iter == at and not fired:
                fired.append(True)
                raise exc

        return real(*args, callback=callback, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return fired


def _same_model(a, b, X):
    for (ka, va), (kb, vb) in zip(a.network_.state_dict().items(), b.network_.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert a.loss_curve_ == b.loss_curve_
    assert a.n_iter_ == b.n_iter_
    assert a.validation_scores_ == b.validation_scores_
    assert_array_equal(a.score_samples(X[:20]), b.score_samples(X[:20]))


# --------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------
def test_crash_and_resume_equals_the_uninterrupted_fit(X, tmp_path, monkeypatch):
    params = dict(TINY, max_iter=60, early_stopping=True, n_iter_no_change=50)
    reference = ScoreFlowDensity(**params).fit(X)
    path = tmp_path / "ckpt.pt"
    est = ScoreFlowDensity(**params, checkpoint_path=str(path), checkpoint_every=10)
    with monkeypatch.context() as m:
        _inject(m, estimator_module, "train_score_model", 37, Crash())
        with pytest.raises(Crash):
            est.fit(X)
    assert path.exists()
    assert not hasattr(est, "network_")  # a crashed fit leaves no fitted estimator behind
    resumed = ScoreFlowDensity(**params, checkpoint_path=str(path), checkpoint_every=10).fit(X)
    _same_model(resumed, reference, X)
    assert not path.exists()  # a completed fit removes its checkpoint


def test_resume_in_the_dequantizer_phase_skips_the_score_model(D, tmp_path, monkeypatch):
    params = dict(TINY, fourier_features=0, max_iter=30, dequantization="variational",
                  dequantizer_max_iter=40)
    reference = ScoreFlowDensity(**params).fit(D)
    folder = tmp_path / "ckpts"
    folder.mkdir()
    est = ScoreFlowDensity(**params, checkpoint_path=str(folder), checkpoint_every=10)
    with monkeypatch.context() as m:
        _inject(m, dequantization_module, "train_dequantizer", 25, Crash())
        with pytest.raises(Crash):
            est.fit(D)
    assert len(list(folder.glob("skscoreflow-checkpoint-*.pt"))) == 1
    calls = []
    real = estimator_module.train_score_model
    monkeypatch.setattr(estimator_module, "train_score_model",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = ScoreFlowDensity(**params, checkpoint_path=str(folder), checkpoint_every=10).fit(D)
    assert calls == []  # the finished score model came from the checkpoint
    _same_model(resumed, reference, D)
    assert resumed.dequantizer_loss_curve_ == reference.dequantizer_loss_curve_
    for a, b in zip(resumed.dequantizer_.state_dict().values(),
                    reference.dequantizer_.state_dict().values()):
        assert torch.equal(a, b)


def test_a_checkpoint_of_other_data_or_parameters_is_refused(X, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    params = dict(TINY, max_iter=30, checkpoint_path=str(path), checkpoint_every=10)
    with monkeypatch.context() as m:
        _inject(m, estimator_module, "train_score_model", 15, Crash())
        with pytest.raises(Crash):
            ScoreFlowDensity(**params).fit(X)
    with pytest.raises(ValueError, match="other data.*delete it"):
        ScoreFlowDensity(**params).fit(X[:-1])
    with pytest.raises(ValueError, match="other params"):
        ScoreFlowDensity(**dict(params, learning_rate=1e-3)).fit(X)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="no readable skscoreflow checkpoint"):
        ScoreFlowDensity(**params).fit(X)


# --------------------------------------------------------------------------------------------
# Interruption (Ctrl-C)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interactive", [True, False])
def test_ctrl_c_leaves_a_usable_estimator_and_resumes(X, tmp_path, monkeypatch, interactive):
    """A real SIGINT during a step is held until the step ends; the estimator keeps that
    step's weights with a warning; a script gets the KeyboardInterrupt back, a session does
    not; the checkpoint written at the interrupt resumes to the uninterrupted result."""
    params = dict(TINY, max_iter=40, checkpoint_every=100)
    reference = ScoreFlowDensity(**params).fit(X)
    path = tmp_path / "ckpt.pt"
    est = ScoreFlowDensity(**params, checkpoint_path=str(path))
    monkeypatch.setattr(params_module, "_interactive", lambda: interactive)

    def sigint(*args, **kwargs):
        def callback(state):
            if state.n_iter == 17:
                os.kill(os.getpid(), signal.SIGINT)  # arrives inside the loop: deferred

        return real(*args, callback=callback, **kwargs)

    real = estimator_module.train_score_model
    with monkeypatch.context() as m:
        m.setattr(estimator_module, "train_score_model", sigint)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if interactive:
                est.fit(X)
            else:
                with pytest.raises(KeyboardInterrupt):
                    est.fit(X)
    message = " ".join(str(w.message) for w in caught)
    assert "interrupted after step 17 (max_iter=40)" in message and "resume" in message
    assert est.n_iter_ == 17 and len(est.loss_curve_) == 17
    assert np.isfinite(est.score_samples(X[:5])).all()  # usable
    resumed = ScoreFlowDensity(**params, checkpoint_path=str(path)).fit(X)
    _same_model(resumed, reference, X)


def test_interrupting_the_dequantizer_keeps_it(D, monkeypatch):
    monkeypatch.setattr(params_module, "_interactive", lambda: True)
    params = dict(TINY, fourier_features=0, max_iter=20, dequantization="variational",
                  dequantizer_max_iter=40)
    est = ScoreFlowDensity(**params)
    _inject(monkeypatch, dequantization_module, "train_dequantizer", 12, KeyboardInterrupt())
    with pytest.warns(UserWarning, match="dequantizer training was interrupted after step 12"):
        est.fit(D)
    assert len(est.dequantizer_loss_curve_) == 12 and est.dequantizer_ is not None
    assert (est.score_samples(D[:5]) < 0).all()


def test_non_finite_dequantizer_loss_names_the_step(D, monkeypatch):
    real = dequantization_module.nll_bound_estimate
    calls = []

    def nan_after_five(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return out * float("nan") if len(calls) > 5 else out

    monkeypatch.setattr(dequantization_module, "nll_bound_estimate", nan_after_five)
    est = ScoreFlowDensity(**dict(TINY, fourier_features=0, max_iter=5,
                                  dequantization="variational", dequantizer_max_iter=20))
    with pytest.raises(NonFiniteLossError, match="dequantizer loss became nan at step 6"):
        est.fit(D)


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------
_WRITER = """
import sys, torch
from skscoreflow._checkpoint import atomic_save
i = 0
while True:
    atomic_save({"i": i, "w": torch.full((2_000_000,), float(i))}, sys.argv[1])
    i += 1
    print(i, flush=True)
"""


def test_killing_the_writer_mid_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "model.pt"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        for _ in range(3):  # let it complete a few saves, then kill it mid-write
            proc.stdout.readline()
    finally:
        proc.kill()
        proc.wait()
    data = torch.load(path, weights_only=True)  # the last complete file, never a torn one
    assert torch.equal(data["w"], torch.full((2_000_000,), float(data["i"])))


# --------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(X, tmp_path_factory):
    est = ScoreFlowDensity(**dict(TINY, max_iter=10)).fit(X)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    est.save(path)
    return est, path.read_bytes()


def test_saved_file_records_versions_and_checksum(saved):
    import json

    import skscoreflow

    data = torch.load(io.BytesIO(saved[1]), weights_only=True)
    meta = json.loads(data["meta"])
    assert meta["format_version"] == 2
    assert meta["skscoreflow_version"] == skscoreflow.__version__
    assert meta["torch_version"] == torch.__version__
    assert len(meta["checksum"]) == 64


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_model_files_are_refused_or_intact(saved, X, tmp_path, data):
    """Truncation, flipped bytes or swapped tensors: ``load`` raises ``ValueError``, or (a flip
    in bytes that carry no content, e.g. zip padding) returns the very same model."""
    est, blob = saved
    kind = data.draw(st.sampled_from(["truncate", "flip", "swap"]))
    raw = bytearray(blob)
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    else:  # swap two tensors of the same size inside the archive
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            members = {n: zf.read(n) for n in zf.namelist()}
        tensors = sorted(n for n in members if "/data/" in n)
        a, b = data.draw(st.permutations(tensors))[:2]
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            for name, content in members.items():
                swap = {a: members[b], b: members[a]}.get(name, content)
                zf.writestr(name, swap)
        raw = bytearray(out.getvalue())
    path = tmp_path / "mutated.pt"
    path.write_bytes(bytes(raw))
    try:
        loaded = ScoreFlowDensity.load(path)
    except ValueError:
        return
    assert_array_equal(loaded.score_samples(X[:10]), est.score_samples(X[:10]))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_smuggling_code_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for write in (
        lambda p: p.write_bytes(pickle.dumps({"meta": "{}", "network": _Payload()})),
        lambda p: torch.save({"meta": "{}", "network": _Payload()}, p),
    ):
        path = tmp_path / "evil.pt"
        write(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match="not a readable skscoreflow model file"):
                ScoreFlowDensity.load(path)
        assert not (tmp_path / "pwned").exists()


def test_a_directory_or_random_bytes_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        ScoreFlowDensity.load(tmp_path)
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="not a readable skscoreflow model file"):
        ScoreFlowDensity.load(path)


def test_save_of_a_changed_file_on_disk_is_atomic(saved, X, tmp_path):
    """``save`` over an existing model replaces it in one step (no temporary files left)."""
    est, _ = saved
    path = tmp_path / "m.pt"
    est.save(path)
    est.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    assert_array_equal(ScoreFlowDensity.load(path).score_samples(X[:5]), est.score_samples(X[:5]))


# --------------------------------------------------------------------------------------------
# Extreme inputs and the solver cap
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(X):
    return ScoreFlowDensity(**dict(TINY, max_iter=30)).fit(X)


@pytest.mark.parametrize("value", [1e3, 1e10, 1e25, 1e300, -1e300, 5e-324, -5e-324, 1e-300])
@pytest.mark.parametrize("method", ["score_samples", "bound"])
def test_extreme_finite_inputs_give_finite_or_minus_inf(fitted, value, method):
    Z = np.array([[0.5, 0.2], [value, 0.0], [0.0, value]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = getattr(fitted, method)(Z)
    assert not np.isnan(out).any()
    assert np.isfinite(out[0])
    far = ~np.isfinite(out)
    assert (out[far] == -np.inf).all()
    assert far.any() == any("-inf" in str(w.message) for w in caught)
    if abs(value) <= 1e10:
        assert np.isfinite(out).all()


def test_far_rows_do_not_change_the_others(fitted):
    near = np.array([[0.5, 0.2], [1.0, -0.3]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        both = fitted.score_samples(np.vstack([near, [[1e30, 0.0]]]))
    assert_array_equal(both[:2], fitted.score_samples(near))


def test_solver_step_cap_raises_clearly():
    from skscoreflow.likelihood import ode_log_likelihood
    from skscoreflow.sde import VPSDE

    def wiggly(x, t):  # oscillates a thousand times in t: the solver needs many steps
        return -x + 100 * torch.sin(1e4 * t)[:, None]

    x = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="ODE solver failed on rows 0..3.*max_num_steps"):
        ode_log_likelihood(wiggly, x, VPSDE(), max_num_steps=20)
    assert torch.isfinite(ode_log_likelihood(wiggly, x, VPSDE(), rtol=1e-2, atol=1e-2)).all()


# --------------------------------------------------------------------------------------------
# Concurrency and threads
# --------------------------------------------------------------------------------------------
def test_concurrent_score_samples_equal_serial_calls(fitted, X):
    rows = [X[i * 20 : (i + 1) * 20] for i in range(4)]
    serial = [fitted.score_samples(r) for r in rows]
    results = [None] * 4

    def run(i):
        results[i] = fitted.score_samples(rows[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, expected in zip(results, serial):
        assert_array_equal(got, expected)


def test_thread_policy_caps_and_shares_the_budget(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("SKSCOREFLOW_THREADS", raising=False)
    with fit_threads() as n1:
        assert n1 == max(1, min(before, effective_cpus()))
        with fit_threads() as n2:  # a second concurrent fit takes its share
            assert n2 == max(1, min(n1, effective_cpus()) // 2)
        assert torch.get_num_threads() == n1
    assert torch.get_num_threads() == before
    seen = []

    def other_thread():
        with fit_threads():
            seen.append(torch.get_num_threads())

    t = threading.Thread(target=other_thread)
    with fit_threads():
        t.start()
        t.join()
    assert seen == [max(1, min(torch.get_num_threads(), effective_cpus()) // 2)]
    assert torch.get_num_threads() == before  # each fit restores its own thread's setting
    monkeypatch.setenv("SKSCOREFLOW_THREADS", "torch")
    with fit_threads() as n:
        assert n == before
    monkeypatch.setenv("SKSCOREFLOW_THREADS", "1")
    with fit_threads() as n:
        assert n == 1
    assert torch.get_num_threads() == before


def test_cgroup_quota_caps_the_cores(monkeypatch):
    import skscoreflow._threads as threads_module

    monkeypatch.setattr(threads_module, "_cgroup_cpus", lambda: 1.5)
    assert effective_cpus() == 1
    monkeypatch.setattr(threads_module, "_cgroup_cpus", lambda: None)
    assert effective_cpus() == len(os.sched_getaffinity(0))


def test_checkpoints_work_with_a_user_sde_and_need_an_existing_folder(X, tmp_path, monkeypatch):
    from skscoreflow.sde import VPSDE

    class MyVP(VPSDE):
        name = "my-vp"

    params = dict(TINY, max_iter=30, sde=MyVP(beta_max=10.0), checkpoint_every=10)
    reference = ScoreFlowDensity(**params).fit(X)
    path = tmp_path / "ckpt.pt"
    with monkeypatch.context() as m:
        _inject(m, estimator_module, "train_score_model", 25, Crash())
        with pytest.raises(Crash):
            ScoreFlowDensity(**params, checkpoint_path=str(path)).fit(X)
    resumed = ScoreFlowDensity(**params, checkpoint_path=str(path)).fit(X)
    _same_model(resumed, reference, X)
    with pytest.raises(ValueError, match="does not exist"):
        ScoreFlowDensity(**params, checkpoint_path=str(tmp_path / "no" / "c.pt")).fit(X)


def test_a_failed_warm_start_keeps_the_last_good_weights_consistently(X, monkeypatch):
    est = ScoreFlowDensity(**dict(TINY, max_iter=10, warm_start=True)).fit(X)
    real = estimator_module.train_score_model

    def nan_at_step_14(*args, **kwargs):
        def callback(state):
            if state.n_iter == 13:  # the next step's loss becomes NaN
                state.model.out.bias.data.fill_(float("nan"))

        return real(*args, callback=callback, **kwargs)

    monkeypatch.setattr(estimator_module, "train_score_model", nan_at_step_14)
    with pytest.raises(NonFiniteLossError, match="at step 14"):
        est.fit(X)
    assert est.n_iter_ == 13 and len(est.loss_curve_) == 13
    assert all(torch.isfinite(p).all() for p in est.network_.parameters())  # EMA of good steps
    assert np.isfinite(est.score_samples(X[:5])).all()



def test_a_second_warm_start_after_an_interrupt_is_not_interrupted(X, monkeypatch):
    monkeypatch.setattr(params_module, "_interactive", lambda: True)
    est = ScoreFlowDensity(**dict(TINY, max_iter=20, warm_start=True))
    with monkeypatch.context() as m:
        _inject(m, estimator_module, "train_score_model", 7, KeyboardInterrupt())
        with pytest.warns(UserWarning, match="interrupted"):
            est.fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "interrupted" warning from a completed fit
        est.fit(X)
    assert est.n_iter_ == 27


def test_an_interrupted_warm_start_fit_resumes_in_the_same_process(X, tmp_path, monkeypatch):
    monkeypatch.setattr(params_module, "_interactive", lambda: True)
    params = dict(TINY, max_iter=30, warm_start=True)
    reference = ScoreFlowDensity(**params).fit(X)
    est = ScoreFlowDensity(**params, checkpoint_path=str(tmp_path), checkpoint_every=10)
    with monkeypatch.context() as m:
        _inject(m, estimator_module, "train_score_model", 17, KeyboardInterrupt())
        with pytest.warns(UserWarning, match="after step 17"):
            est.fit(X)
    est.fit(X)  # the same estimator: resumes the interrupted first fit
    _same_model(est, reference, X)
    assert list(tmp_path.iterdir()) == []


def test_fits_sharing_a_folder_get_their_own_checkpoints(X, tmp_path, monkeypatch):
    for lr in (1e-3, 2e-3):
        with monkeypatch.context() as m:
            _inject(m, estimator_module, "train_score_model", 15, Crash())
            with pytest.raises(Crash):
                ScoreFlowDensity(**TINY, max_iter=30, learning_rate=lr, checkpoint_every=10,
                                 checkpoint_path=str(tmp_path)).fit(X)
    files = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt")
    assert len(files) == 2 and all(f.startswith("skscoreflow-checkpoint-") for f in files)
    ScoreFlowDensity(**TINY, max_iter=30, learning_rate=1e-3, checkpoint_every=10,
                     checkpoint_path=str(tmp_path)).fit(X)
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".pt"]) == 1


def test_a_checkpoint_in_use_is_refused(X, tmp_path):
    from skscoreflow._checkpoint import FitCheckpoint

    est = ScoreFlowDensity(**TINY, max_iter=5, checkpoint_path=str(tmp_path / "c.pt"))
    est._validate_params()
    holder = FitCheckpoint(est, X, 0)  # a fit of these data holds the file
    try:
        with pytest.raises(ValueError, match="in use by another running fit"):
            est.fit(X)
    finally:
        holder.release()
    est.fit(X)  # free again


def test_cli_ctrl_c_and_solver_failures_are_one_line(tmp_path, X, monkeypatch, capsys):
    from skscoreflow.cli import main

    est = ScoreFlowDensity(**dict(TINY, max_iter=5)).fit(X)
    with torch.no_grad():
        est.network_.out.bias.fill_(float("nan"))  # a model whose network gives NaN
    est.save(tmp_path / "bad.pt")
    np.savetxt(tmp_path / "x.csv", X[:5], delimiter=",", header="a,b", comments="")
    for argv in (["score", str(tmp_path / "bad.pt"), str(tmp_path / "x.csv")],
                 ["score", str(tmp_path / "bad.pt"), str(tmp_path / "x.csv"), "--bound"],
                 ["sample", str(tmp_path / "bad.pt"), "-n", "3"]):
        assert main(argv) == 3
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and "failed" in err[0], err

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ScoreFlowDensity, "fit", interrupt)
    code = main(["-q", "fit", "moons", "--n-samples", "50", "-o", str(tmp_path / "m.pt")])
    assert code == 130
    assert capsys.readouterr().err.strip() == "skscoreflow fit: interrupted"


def test_load_refuses_unusual_content_with_value_error(saved, tmp_path):
    import json

    data = torch.load(io.BytesIO(saved[1]), weights_only=True)
    data["network"]["extra"] = {1, 2}  # a set: weights_only allows it, no model file has one
    torch.save(data, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="corrupted"):
        ScoreFlowDensity.load(tmp_path / "odd.pt")
    meta = json.loads(data["meta"])
    del meta["format_version"]
    data["meta"] = json.dumps(meta)
    torch.save(data, tmp_path / "noversion.pt")
    with pytest.raises(ValueError, match="bad format version"):
        ScoreFlowDensity.load(tmp_path / "noversion.pt")
