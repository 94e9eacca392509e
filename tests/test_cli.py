"""The command line, end to end: ``fit`` -> ``score`` -> ``sample`` on a CSV and on a built-in
dataset, error handling (non-zero exit code and one clear line on stderr), ``demo``, and one
run through ``python -m skscoreflow`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.datasets import make_moons

from skscoreflow import ScoreFlowDensity
from skscoreflow.cli import main

TINY_OPTS = ["--max-iter", "30", "--hidden-layer-sizes", "16", "--random-state", "0"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    X, _ = make_moons(150, noise=0.1, random_state=0)
    pd.DataFrame(X, columns=["alpha", "beta"]).to_csv(d / "train.csv", index=False)
    X_test, _ = make_moons(25, noise=0.1, random_state=1)
    pd.DataFrame(X_test, columns=["alpha", "beta"]).to_csv(d / "test.csv", index=False)
    (d / "text.csv").write_text("alpha,beta\n1.0,one\n2.0,two\n3.0,three\n")
    (d / "missing_value.csv").write_text("alpha,beta\n1.0,2.0\n,3.0\n4.0,5.0\n")
    (d / "empty.csv").write_text("alpha,beta\n")
    return d


@pytest.fixture(scope="module")
def model(workdir):
    """A model fitted through the CLI (in-process)."""
    path = workdir / "model.pt"
    assert main(["fit", str(workdir / "train.csv"), "-o", str(path), *TINY_OPTS]) == 0
    return path


def _one_line_error(capsys, command: str, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"skscoreflow {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- happy path
def test_fit_writes_a_loadable_model(model, workdir):
    est = ScoreFlowDensity.load(model)
    assert est.n_iter_ == 30
    assert est.get_params()["hidden_layer_sizes"] == (16,)
    assert est.get_params()["random_state"] == 0
    assert_array_equal(est.feature_names_in_, ["alpha", "beta"])
    # same options through the Python API give the same model
    X = pd.read_csv(workdir / "train.csv")
    ref = ScoreFlowDensity(hidden_layer_sizes=(16,), max_iter=30, random_state=0).fit(X)
    assert est.loss_curve_ == ref.loss_curve_


def test_score_writes_log_density_per_row(model, workdir, capsys):
    out = workdir / "scores.csv"
    assert main(["score", str(model), str(workdir / "test.csv"), "-o", str(out)]) == 0
    assert "mean log-likelihood" in capsys.readouterr().err
    scores = pd.read_csv(out)
    assert list(scores.columns) == ["log_density"]
    assert len(scores) == 25
    assert np.all(np.isfinite(scores["log_density"]))
    expected = ScoreFlowDensity.load(model).score_samples(pd.read_csv(workdir / "test.csv"))
    assert_allclose(scores["log_density"].to_numpy(), expected, rtol=1e-12, atol=0)


def test_score_bound_to_stdout(model, workdir, capsys):
    assert main(["score", str(model), str(workdir / "test.csv"), "--bound"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "log_density"
    values = np.array([float(v) for v in out[1:]])
    assert values.shape == (25,) and np.all(np.isfinite(values))
    expected = ScoreFlowDensity.load(model).bound(pd.read_csv(workdir / "test.csv"))
    assert_allclose(values, expected, rtol=1e-12)


def test_score_to_npy(model, workdir):
    out = workdir / "scores.npy"
    assert main(["score", str(model), str(workdir / "test.csv"), "-o", str(out)]) == 0
    arr = np.load(out)
    assert arr.shape == (25, 1) and np.all(np.isfinite(arr))


def test_sample_writes_n_rows_with_column_names(model, workdir):
    out = workdir / "samples.csv"
    assert main(["sample", str(model), "-n", "17", "--seed", "3", "-o", str(out)]) == 0
    samples = pd.read_csv(out)
    assert list(samples.columns) == ["alpha", "beta"]
    assert len(samples) == 17
    assert np.all(np.isfinite(samples.to_numpy()))
    expected = ScoreFlowDensity.load(model).sample(17, random_state=3)
    assert_allclose(samples.to_numpy(), expected, rtol=1e-12)
    # the seed makes the output reproducible
    again = workdir / "samples2.csv"
    assert main(["sample", str(model), "-n", "17", "--seed", "3", "-o", str(again)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(again), samples)


def test_builtin_dataset_as_data(workdir, capsys):
    path = workdir / "moons.pt"
    assert main(["fit", "moons", "--n-samples", "300", "-o", str(path), *TINY_OPTS]) == 0
    assert "fitted 300 rows x 2 features" in capsys.readouterr().err
    est = ScoreFlowDensity.load(path)
    assert est.n_features_in_ == 2
    assert not hasattr(est, "feature_names_in_")
    out = workdir / "moons_scores.csv"
    assert main(["score", str(path), "moons", "--n-samples", "40", "-o", str(out)]) == 0
    scores = pd.read_csv(out)
    assert len(scores) == 40 and np.all(np.isfinite(scores["log_density"]))
    smp = workdir / "moons_samples.csv"
    assert main(["sample", str(path), "-n", "5", "-o", str(smp)]) == 0
    assert list(pd.read_csv(smp).columns) == ["x0", "x1"]


def test_npy_data(workdir):
    X, _ = make_moons(120, noise=0.1, random_state=0)
    np.save(workdir / "train.npy", X)
    path = workdir / "npy_model.pt"
    assert main(["fit", str(workdir / "train.npy"), "-o", str(path), *TINY_OPTS]) == 0
    assert ScoreFlowDensity.load(path).n_features_in_ == 2


# ----------------------------------------------------------------------------- errors
def test_missing_data_file(workdir, capsys):
    code = main(["fit", str(workdir / "nope.csv"), "-o", str(workdir / "x.pt")])
    assert code != 0
    _one_line_error(capsys, "fit", "nope.csv", "no such file")
    assert not (workdir / "x.pt").exists()


def test_non_numeric_csv(workdir, model, capsys):
    assert main(["fit", str(workdir / "text.csv"), "-o", str(workdir / "x.pt")]) != 0
    _one_line_error(capsys, "fit", "text.csv", "non-numeric column", "beta")
    assert main(["score", str(model), str(workdir / "text.csv")]) != 0
    _one_line_error(capsys, "score", "text.csv", "non-numeric")


def test_csv_with_missing_value(workdir, capsys):
    assert main(["fit", str(workdir / "missing_value.csv"), "-o", str(workdir / "x.pt")]) != 0
    _one_line_error(capsys, "fit", "NaN")


def test_csv_without_rows(workdir, capsys):
    assert main(["fit", str(workdir / "empty.csv"), "-o", str(workdir / "x.pt")]) != 0
    _one_line_error(capsys, "fit", "empty.csv", "no data rows")


def test_csv_given_as_model(workdir, capsys):
    assert main(["score", str(workdir / "train.csv"), str(workdir / "test.csv")]) != 0
    _one_line_error(capsys, "score", "train.csv", "not a skscoreflow model")
    assert main(["sample", str(workdir / "train.csv"), "-n", "3"]) != 0
    _one_line_error(capsys, "sample", "train.csv", "not a skscoreflow model")


def test_missing_model_file(workdir, capsys):
    assert main(["sample", str(workdir / "nomodel.pt")]) != 0
    _one_line_error(capsys, "sample", "nomodel.pt", "no such model file")


def test_wrong_width_data_for_model(workdir, model, capsys):
    pd.DataFrame(np.zeros((4, 3)), columns=["alpha", "beta", "gamma"]).to_csv(
        workdir / "wide.csv", index=False
    )
    assert main(["score", str(model), str(workdir / "wide.csv")]) != 0
    _one_line_error(capsys, "score", "score failed")


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--sde", "vpp", "unknown sde 'vpp'"),
        ("--weighting", "foo", "The 'weighting' parameter of ScoreFlowDensity must be"),
        ("--dtype", "float16", "The 'dtype' parameter of ScoreFlowDensity must be"),
        ("--max-iter", "0", "The 'max_iter' parameter of ScoreFlowDensity must be"),
    ],
)
def test_unknown_option_value(option, value, needle, workdir, capsys):
    out = workdir / "bad_option.pt"
    assert main(["fit", str(workdir / "train.csv"), "-o", str(out), option, value]) != 0
    _one_line_error(capsys, "fit", needle)
    assert not out.exists()


def test_unparseable_option_value_is_a_usage_error(workdir, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", str(workdir / "train.csv"), "-o", "x.pt", "--max-iter", "abc"])
    assert info.value.code == 2
    assert "invalid int value: 'abc'" in capsys.readouterr().err.splitlines()[-1]
    with pytest.raises(SystemExit) as info:
        main(["sample", "model.pt", "--method", "bogus"])
    assert info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err.splitlines()[-1]


def test_bad_sample_count(model, capsys):
    assert main(["sample", str(model), "-n", "0"]) != 0
    _one_line_error(capsys, "sample", "-n must be a positive int")


def test_unwritable_output(workdir, model, capsys):
    missing_dir = workdir / "no" / "such" / "dir"
    assert main(["fit", str(workdir / "train.csv"), "-o", str(missing_dir / "m.pt"),
                 "--max-iter", "2", "--hidden-layer-sizes", "8"]) != 0
    _one_line_error(capsys, "fit", "cannot write the model")
    assert main(["score", str(model), str(workdir / "test.csv"), "-o",
                 str(missing_dir / "s.csv")]) != 0
    _one_line_error(capsys, "score", "cannot write the output")


# ----------------------------------------------------------------------------- demo
def test_demo_prints_baselines_and_writes_plot(tmp_path, capsys, monkeypatch):
    """``demo`` at its smallest.  The demo fits ScoreFlowDensity at its default network size;
    for speed this test shrinks the default width to (16,) for its duration only, and runs
    BLAS on one thread (the GaussianMixture grid search is 10-20x slower with two BLAS
    threads on a busy 2-core machine)."""
    from threadpoolctl import threadpool_limits

    monkeypatch.setitem(ScoreFlowDensity.__init__.__kwdefaults__, "hidden_layer_sizes", (16,))
    with threadpool_limits(limits=1, user_api="blas"):
        _run_demo(tmp_path, capsys)


def _run_demo(tmp_path, capsys):
    try:
        import matplotlib  # noqa: F401

        has_mpl = True
    except ImportError:
        has_mpl = False
    png = tmp_path / "demo.png"
    argv = ["demo", "--max-iter", "20", "--n-samples", "400", "--n-test", "200"]
    if has_mpl:
        argv += ["--plot", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("GaussianMixture", "KernelDensity", "ScoreFlowDensity"):
        lines = [ln for ln in out.splitlines() if name in ln]
        assert len(lines) == 1, out
        assert "nats" in lines[0]
        value = float(lines[0].split("nats")[0].split("±")[0].split()[-1])
        assert np.isfinite(value)
    assert "ScoreFlowDensity (20 steps)" in out
    if has_mpl:
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plot written to {png}" in out


# ----------------------------------------------------------------------------- subprocess
def _run(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "skscoreflow", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_module_entry_point_end_to_end(workdir, model):
    out = workdir / "sub_model.pt"
    proc = _run("fit", "moons", "--n-samples", "300", "-o", str(out), *TINY_OPTS, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "model written to" in proc.stderr
    assert ScoreFlowDensity.load(out).n_iter_ == 30

    proc = _run("score", str(model), str(workdir / "nope.csv"), cwd=workdir)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "nope.csv" in lines[0] and "no such file" in lines[0], proc.stderr


def test_layer_size_flags_parse_as_tuples():
    from skscoreflow.cli import build_parser

    args = build_parser().parse_args(
        ["fit", "moons", "-o", "m.pt", "--hidden-layer-sizes", "32,16",
         "--dequantizer-hidden-layer-sizes", "8,8"]
    )
    assert args.hidden_layer_sizes == (32, 16)
    assert args.dequantizer_hidden_layer_sizes == (8, 8)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [(["--early-stopping", "auto"], {"early_stopping": "auto"}),
     (["--early-stopping", "false"], {"early_stopping": False}),
     (["--dropout", "0.1"], {"dropout": 0.1}),
     (["--dropout", "auto", "--gaussian-reference", "full"],
      {"dropout": "auto", "gaussian_reference": "full"}),
     (["--image-shape", "1,8,8", "--network", "unet", "--channels", "16",
       "--channel-mult", "1,2", "--num-res-blocks", "auto", "--attn-resolutions", "auto",
       "--augment", "hflip"],
      {"image_shape": (1, 8, 8), "network": "unet", "channels": 16, "channel_mult": (1, 2),
       "num_res_blocks": "auto", "attn_resolutions": "auto", "augment": "hflip"})],
)
def test_auto_flags_parse_to_the_estimator_types(argv, expected):
    from skscoreflow.cli import build_parser

    args = build_parser().parse_args(["fit", "moons", "-o", "m.pt", *argv])
    assert {k: getattr(args, k) for k in expected} == expected


def test_bad_auto_flag_is_a_usage_error():
    from skscoreflow.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "moons", "-o", "m.pt", "--dropout", "high"])


# ----------------------------------------------------------------------------- progress
def test_fit_shows_progress_by_default_and_q_silences_it(workdir, capsys):
    out = workdir / "progress.pt"
    assert main(["fit", str(workdir / "train.csv"), "-o", str(out), *TINY_OPTS]) == 0
    err = capsys.readouterr().err
    assert "training: step 30/30 (100%), loss" in err and "elapsed" in err and "left" in err
    assert main(["-q", "fit", str(workdir / "train.csv"), "-o", str(out), *TINY_OPTS]) == 0
    err = capsys.readouterr().err
    assert "training: step" not in err and "fitted 150 rows" in err


def test_python_api_stays_silent(workdir, capsys):
    X = pd.read_csv(workdir / "train.csv").to_numpy()
    ScoreFlowDensity(max_iter=5, hidden_layer_sizes=(8,), random_state=0).fit(X)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# ----------------------------------------------------------------------------- fuzzing
_OPTION_VALUES = {
    "--max-iter": ["1", "2", "0", "-3", "x", "1e3"],
    "--hidden-layer-sizes": ["8", "4,4", "0", ",", "a,b"],
    "--sde": ["vp", "subvp", "VP", "nope", ""],
    "--eps": ["0.01", "0", "2", "nan", "inf"],
    "--batch-size": ["16", "0", "-1"],
    "--dequantization": ["uniform", "variational", "none", "bogus"],
    "--n-samples": ["20", "0", "-5", "abc"],
    "-n": ["3", "0", "-1", "x"],
    "--seed": ["0", "-1", "x"],
    "--method": ["ode", "sde", "bad"],
}


@pytest.fixture(scope="module")
def fuzz_files(workdir, model):
    d = workdir / "fuzz"
    d.mkdir(exist_ok=True)
    (d / "random.bin").write_bytes(np.random.default_rng(1).bytes(512))
    (d / "ints.csv").write_text("a,b\n1,2\n3,4\n5,6\n0,1\n")
    np.save(d / "arr.npy", np.random.default_rng(2).normal(size=(30, 2)))
    np.save(d / "arr3d.npy", np.zeros((2, 2, 2)))
    (d / "nonutf8.csv").write_bytes(b"a,b\n\xff\xfe,1\n")
    return {
        "data": [str(workdir / "train.csv"), str(workdir / "text.csv"), str(workdir / "empty.csv"),
                 str(workdir / "missing_value.csv"), str(d / "random.bin"), str(d / "ints.csv"),
                 str(d / "arr.npy"), str(d / "arr3d.npy"), str(d / "nonutf8.csv"), "moons",
                 str(d / "absent.csv"), str(d)],
        "model": [str(model), str(d / "random.bin"), str(workdir / "train.csv"), str(d),
                  str(d / "absent.pt")],
        "out": [str(d / "out.csv"), str(d / "out.npy"), str(d / "m.pt"), str(d / "no" / "o.csv"),
                str(d)],
    }


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_command_lines_fail_cleanly(fuzz_files, data, capsys):
    """Any argument list: exit code 0, 2 (usage) or 3 (data/model), never a traceback; the
    library's own errors are one line."""
    command = data.draw(st.sampled_from(["fit", "score", "sample", "bogus", ""]))
    argv = [command] if command else []
    if command == "fit":
        argv += [data.draw(st.sampled_from(fuzz_files["data"])), "-o",
                 data.draw(st.sampled_from(fuzz_files["out"])), "--max-iter", "1",
                 "--hidden-layer-sizes", "4"]
        keys = ["--max-iter", "--hidden-layer-sizes", "--sde", "--eps", "--batch-size",
                "--dequantization", "--n-samples"]
    elif command == "score":
        argv += [data.draw(st.sampled_from(fuzz_files["model"])),
                 data.draw(st.sampled_from(fuzz_files["data"])), "--n-samples", "20",
                 "-o", data.draw(st.sampled_from(fuzz_files["out"]))]
        keys = ["--n-samples"]
    elif command == "sample":
        argv += [data.draw(st.sampled_from(fuzz_files["model"])), "-o",
                 data.draw(st.sampled_from(fuzz_files["out"]))]
        keys = ["-n", "--seed", "--method"]
    else:
        keys = list(_OPTION_VALUES)
    for key in data.draw(st.lists(st.sampled_from(keys), max_size=3)):
        argv += [key, data.draw(st.sampled_from(_OPTION_VALUES[key]))]
    if command == "sample" and "-n" not in argv:
        argv += ["-n", "3"]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage errors exit with 2
        code = exc.code
    err = capsys.readouterr().err
    from hypothesis import event

    event(f"exit code {code}")
    assert code in (0, 2, 3), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    errors = [ln for ln in err.splitlines() if ln.startswith("skscoreflow ") and ": error: " in ln]
    if code == 3:
        assert len(errors) == 1, (argv, err)
