"""Persistence: pickle, joblib and ``save``/``load`` round trips, CPU-only state, ``clone``.

scikit-learn's ``check_estimators_pickle`` only compares the methods it knows for a density
estimator on one pickle; these tests cover ``bound`` and ``sample`` (with their own seeds),
joblib, the ``weights_only`` file format, warm starts across a pickle and bad model files.
"""

from __future__ import annotations

import io
import pickle

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from numpy.testing import assert_array_equal
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from skscoreflow import ScoreFlowDensity

# device="cpu": these tests check CPU contracts (bitwise reproducibility, exact subset
# invariance, device_), which must hold on a machine with a GPU too; the CUDA path has its own
# tests (skipped without CUDA).
# early_stopping=False: a trained network, not the untrained one early stopping may keep.
TINY = dict(hidden_layer_sizes=(16,), max_iter=30, batch_size=64, random_state=0, device="cpu",
            early_stopping=False)


@pytest.fixture(scope="module")
def fitted(data):
    X, _ = data
    return ScoreFlowDensity(**TINY).fit(X)


@pytest.fixture(scope="module")
def reference(fitted, data):
    """Outputs of the original estimator: score_samples, bound (seed 3), sample (seed 5)."""
    _, X_test = data
    return {
        "score_samples": fitted.score_samples(X_test),
        "bound": fitted.bound(X_test, n_time_samples=50, random_state=3),
        "sample": fitted.sample(25, random_state=5),
    }


def _outputs(est, X_test):
    return {
        "score_samples": est.score_samples(X_test),
        "bound": est.bound(X_test, n_time_samples=50, random_state=3),
        "sample": est.sample(25, random_state=5),
    }


def _pickle_round_trip(est):
    return pickle.loads(pickle.dumps(est))


def _joblib_round_trip(est):
    buf = io.BytesIO()
    joblib.dump(est, buf)
    buf.seek(0)
    return joblib.load(buf)


def _save_load_round_trip(est, tmp_path):
    path = tmp_path / "model.pt"
    est.save(path)
    return ScoreFlowDensity.load(path)


@pytest.mark.parametrize("how", ["pickle", "joblib", "save_load"])
def test_loading_leaves_the_global_rng_untouched(how, fitted, tmp_path):
    """Rebuilding the modules draws initial weights: that must not advance the user's RNG."""
    buf = pickle.dumps(fitted)
    if how == "save_load":
        fitted.save(tmp_path / "m.pt")
    state = torch.random.get_rng_state()
    if how == "pickle":
        pickle.loads(buf)
    elif how == "joblib":
        _joblib_round_trip(fitted)
    else:
        ScoreFlowDensity.load(tmp_path / "m.pt")
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("how", ["pickle", "joblib", "save_load"])
def test_round_trip_gives_identical_outputs(how, fitted, reference, data, tmp_path):
    _, X_test = data
    if how == "pickle":
        loaded = _pickle_round_trip(fitted)
    elif how == "joblib":
        loaded = _joblib_round_trip(fitted)
    else:
        loaded = _save_load_round_trip(fitted, tmp_path)
    assert isinstance(loaded, ScoreFlowDensity)
    assert loaded.get_params() == fitted.get_params()
    assert loaded.n_features_in_ == fitted.n_features_in_
    assert loaded.n_iter_ == fitted.n_iter_
    assert loaded.loss_curve_ == fitted.loss_curve_
    assert_array_equal(loaded.mean_, fitted.mean_)
    assert_array_equal(loaded.scale_, fitted.scale_)
    assert loaded.device_ == torch.device("cpu")
    out = _outputs(loaded, X_test)
    for key, expected in reference.items():
        assert_array_equal(out[key], expected, err_msg=key)


def test_round_trip_does_not_change_the_original(fitted, reference, data):
    _, X_test = data
    pickle.dumps(fitted)
    joblib.dump(fitted, io.BytesIO())
    out = _outputs(fitted, X_test)
    for key, expected in reference.items():
        assert_array_equal(out[key], expected, err_msg=key)


def _tensors(obj, path="state"):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]")


def test_pickled_state_holds_cpu_tensors_and_no_modules(fitted):
    state = fitted.__getstate__()
    assert "network_" not in state, "live modules must not be pickled"
    assert "_train_state" not in state
    blob = state["_network_blob"]
    tensors = list(_tensors(blob))
    # EMA weights, raw weights and the Adam moments all travel with the model.
    assert {"ema", "raw", "optimizer"} <= set(blob)
    assert len(tensors) > 0
    for where, t in tensors:
        assert t.device.type == "cpu", where
    for value in state.values():
        assert not isinstance(value, (torch.nn.Module, torch.optim.Optimizer))
    # The device is stored as plain text, so unpickling needs no CUDA.
    assert isinstance(state["device_"], str)


def test_clone_of_fitted_is_unfitted(fitted, data):
    X, _ = data
    cloned = clone(fitted)
    assert cloned.get_params() == fitted.get_params()
    for attr in ("network_", "n_features_in_", "n_iter_", "loss_curve_", "mean_", "sde_"):
        assert not hasattr(cloned, attr), attr
    with pytest.raises(NotFittedError):
        cloned.score_samples(X[:3])
    with pytest.raises(NotFittedError):
        cloned.sample(2)


def test_unfitted_estimator_pickles_and_cannot_be_saved(tmp_path):
    est = ScoreFlowDensity(**TINY)
    loaded = _pickle_round_trip(est)
    assert loaded.get_params() == est.get_params()
    assert not hasattr(loaded, "network_")
    with pytest.raises(NotFittedError):
        est.save(tmp_path / "unfitted.pt")


def test_warm_start_survives_pickle(data):
    """Continuing after a pickle round trip equals continuing in memory (optimizer state,
    raw and EMA weights, step counter and loss curve are all restored)."""
    X, X_test = data
    params = dict(TINY, max_iter=20, warm_start=True)
    a = ScoreFlowDensity(**params).fit(X)
    b = _pickle_round_trip(a)
    a.fit(X)
    b.fit(X)
    assert a.n_iter_ == b.n_iter_ == 40
    assert len(b.loss_curve_) == 40
    assert b.loss_curve_ == a.loss_curve_
    assert_array_equal(b.score_samples(X_test), a.score_samples(X_test))


def test_warm_start_survives_save_load(data, tmp_path):
    X, X_test = data
    params = dict(TINY, max_iter=20, warm_start=True)
    a = ScoreFlowDensity(**params).fit(X)
    b = _save_load_round_trip(a, tmp_path)
    a.fit(X)
    b.fit(X)
    assert a.n_iter_ == b.n_iter_ == 40
    assert b.loss_curve_ == a.loss_curve_
    assert_array_equal(b.score_samples(X_test), a.score_samples(X_test))


def test_save_writes_a_weights_only_file(fitted, tmp_path):
    path = tmp_path / "model.pt"
    fitted.save(path)
    data = torch.load(path, weights_only=True)  # no code runs: tensors and text only
    assert isinstance(data, dict)
    assert {"meta", "network"} <= set(data)
    assert isinstance(data["meta"], str)
    for where, t in _tensors(data["network"]):
        assert t.device.type == "cpu", where


def test_save_load_keeps_feature_names(data, tmp_path):
    X, X_test = data
    est = ScoreFlowDensity(**TINY).fit(pd.DataFrame(X, columns=["a", "b"]))
    loaded = _save_load_round_trip(est, tmp_path)
    assert_array_equal(loaded.feature_names_in_, ["a", "b"])
    df_test = pd.DataFrame(X_test, columns=["a", "b"])
    assert_array_equal(loaded.score_samples(df_test), est.score_samples(df_test))
    with pytest.raises(ValueError, match="feature names"):
        loaded.score_samples(pd.DataFrame(X_test, columns=["b", "a"]))


def test_save_load_of_random_state_instance(data, tmp_path):
    """A RandomState random_state cannot be stored as data: it loads as None."""
    X, X_test = data
    est = ScoreFlowDensity(**dict(TINY, random_state=np.random.RandomState(0))).fit(X)
    loaded = _save_load_round_trip(est, tmp_path)
    assert loaded.random_state is None
    assert_array_equal(loaded.score_samples(X_test), est.score_samples(X_test))


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda p: p.write_text("a,b\n1,2\n3,4\n"), id="csv"),
        pytest.param(
            lambda p: p.write_bytes(pickle.dumps({"meta": "x"})),
            id="plain-pickle",
            marks=pytest.mark.filterwarnings("ignore:Detected pickle protocol"),
        ),
        pytest.param(lambda p: torch.save({"weights": torch.zeros(3)}, p), id="other-torch-file"),
        pytest.param(lambda p: torch.save([torch.zeros(3)], p), id="torch-list"),
        pytest.param(
            lambda p: torch.save({"meta": "not json", "network": {}}, p), id="bad-metadata"
        ),
        pytest.param(
            lambda p: torch.save({"meta": '{"class": "GaussianMixture"}', "network": {}}, p),
            id="other-class",
        ),
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
    ],
)
def test_load_rejects_non_model_files(content, tmp_path):
    path = tmp_path / "not_a_model.pt"
    content(path)
    with pytest.raises(ValueError, match="not_a_model.pt") as info:
        ScoreFlowDensity.load(path)
    assert "\n" not in str(info.value)


def test_load_rejects_newer_format(fitted, tmp_path):
    import json

    path = tmp_path / "model.pt"
    fitted.save(path)
    data = torch.load(path, weights_only=True)
    meta = json.loads(data["meta"])
    meta["format_version"] = 10**6
    data["meta"] = json.dumps(meta)
    torch.save(data, path)
    with pytest.raises(ValueError, match="newer skscoreflow"):
        ScoreFlowDensity.load(path)


def test_load_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        ScoreFlowDensity.load(tmp_path / "missing.pt")


def test_model_trained_on_gpu_loads_on_cpu_only_machine(fitted, reference, data, monkeypatch):
    """A pickle written on a CUDA machine (``device_`` "cuda:0", tensors already on CPU in
    the blob) loads on a machine without CUDA: a RuntimeWarning, and the model runs on CPU."""
    _, X_test = data
    state = fitted.__getstate__()
    state["device_"] = "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    est = ScoreFlowDensity.__new__(ScoreFlowDensity)
    with pytest.warns(RuntimeWarning, match="CUDA is not available; loading on CPU"):
        est.__setstate__(state)
    assert est.device_ == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in est.network_.parameters())
    assert_array_equal(est.score_samples(X_test), reference["score_samples"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fit_pickles_to_cpu_tensors(data):
    X, X_test = data
    est = ScoreFlowDensity(**dict(TINY, device="cuda")).fit(X)
    assert est.device_.type == "cuda"
    for where, t in _tensors(est.__getstate__()["_network_blob"]):
        assert t.device.type == "cpu", where
    loaded = _pickle_round_trip(est)
    assert loaded.device_.type == "cuda"
    assert_array_equal(loaded.score_samples(X_test), est.score_samples(X_test))


_CPU_ONLY_LOAD = """
import json, pickle, sys, warnings
import numpy as np
import torch
from skscoreflow import ScoreFlowDensity

assert not torch.cuda.is_available()
X = np.load(sys.argv[1])
out = {}
for how in ("pickle", "save"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "pickle":
            with open(sys.argv[2], "rb") as fh:
                est = pickle.load(fh)
        else:
            est = ScoreFlowDensity.load(sys.argv[3])
    out[how] = {"device": str(est.device_), "warnings": [str(w.message) for w in caught],
                "logp": est.score_samples(X).tolist()}
print(json.dumps(out))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_model_loads_in_cpu_only_process(data, tmp_path):
    """The real thing: a model fitted on the GPU, loaded by a process that sees no GPU
    (``CUDA_VISIBLE_DEVICES=""``) through pickle and through ``save``/``load``, runs on the CPU
    and agrees with the GPU's log-densities to the float32/ODE tolerance (kernels differ)."""
    import json
    import os
    import subprocess
    import sys

    X, X_test = data
    est = ScoreFlowDensity(**dict(TINY, device="cuda")).fit(X)
    gpu = est.score_samples(X_test)
    with open(tmp_path / "m.pkl", "wb") as fh:
        pickle.dump(est, fh)
    est.save(tmp_path / "m.pt")
    np.save(tmp_path / "rows.npy", X_test)
    proc = subprocess.run(
        [sys.executable, "-c", _CPU_ONLY_LOAD, str(tmp_path / "rows.npy"), str(tmp_path / "m.pkl"),
         str(tmp_path / "m.pt")],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for how in ("pickle", "save"):
        assert out[how]["device"] == "cpu"
        assert any("CUDA is not available; loading on CPU" in w for w in out[how]["warnings"])
        np.testing.assert_allclose(out[how]["logp"], gpu, rtol=0, atol=1e-4)


@pytest.mark.parametrize("round_trip", ["pickle", "save"])
def test_float64_weights_survive_bit_for_bit(data, tmp_path, round_trip):
    """The modules are cast to float64 before their weights load: building them in float32
    first rounded every weight to float32 (log-densities moved by ~1e-8)."""
    X, X_test = data
    est = ScoreFlowDensity(**dict(TINY, dtype="float64", fourier_features=0)).fit(X)
    if round_trip == "pickle":
        loaded = _pickle_round_trip(est)
    else:
        loaded = _save_load_round_trip(est, tmp_path)
    for key, value in est.network_.state_dict().items():
        assert torch.equal(loaded.network_.state_dict()[key], value), key
    assert_array_equal(loaded.score_samples(X_test), est.score_samples(X_test))
