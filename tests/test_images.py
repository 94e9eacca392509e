"""Images through the estimator: ``image_shape``, the U-Net, L-level pixels and bits/dim, flips,
persistence, and the CIFAR-10 loader."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.utils._param_validation import InvalidParameterError

from skscoreflow import ScoreFlowDensity
from skscoreflow import _data, _params
from skscoreflow.datasets import load_cifar10
from skscoreflow.dequantization import _uniform_dequantize
from skscoreflow.likelihood import ode_log_likelihood
from skscoreflow.nets import UNET_PRESETS, ScoreMLP, ScoreUNet

SHAPE = (1, 4, 4)
D = 16
UNET = {"image_shape": SHAPE, "channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1,
        "max_iter": 15, "batch_size": 32, "learning_rate": 1e-3, "early_stopping": False,
        "rtol": 1e-3, "atol": 1e-3, "random_state": 0}


def _pixels(n: int = 96, levels: int = 5, seed: int = 0) -> np.ndarray:
    """Integer images 0..levels-1 with a left-right asymmetry (bright left column)."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, levels - 1, size=(n, *SHAPE))
    X[..., 0] = levels - 1
    return X.reshape(n, D)


@pytest.fixture(scope="module")
def fitted() -> ScoreFlowDensity:
    return ScoreFlowDensity(dequantization="uniform", **UNET).fit(_pixels())


# ----------------------------------------------------------------------------- choosing the net
def test_auto_network_is_the_unet_for_images_and_the_mlp_otherwise(fitted):
    assert fitted.network_type_ == "unet" and isinstance(fitted.network_, ScoreUNet)
    assert fitted.image_shape_ == SHAPE
    assert fitted.unet_sizes_ == {"channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1,
                                  "attn_resolutions": (2,)}
    assert fitted.gaussian_reference_ is None and fitted.dropout_ == 0.1
    flat = ScoreFlowDensity(max_iter=2, early_stopping=False, random_state=0).fit(
        _pixels().astype(float))
    assert flat.network_type_ == "mlp" and isinstance(flat.network_, ScoreMLP)
    assert flat.image_shape_ is None and flat.unet_sizes_ is None


def test_network_mlp_forces_the_mlp_on_images():
    est = ScoreFlowDensity(image_shape=SHAPE, network="mlp", max_iter=2, early_stopping=False,
                           random_state=0).fit(_pixels().astype(float))
    assert isinstance(est.network_, ScoreMLP)
    # ... with the MLP's per-column standardisation.
    assert len(set(np.round(est.scale_, 6))) > 1


def test_unet_without_image_shape_is_refused():
    with pytest.raises(ValueError, match="image_shape"):
        ScoreFlowDensity(network="unet").fit(np.random.default_rng(0).normal(size=(20, 16)))


@pytest.mark.parametrize("shape", [(1, 4, 5), (2, 4, 4), (16,)])
def test_wrong_image_shape_names_both_numbers(shape):
    X = np.random.default_rng(0).normal(size=(20, 16))
    est = ScoreFlowDensity(image_shape=shape, max_iter=1)
    if len(shape) != 3:
        with pytest.raises(InvalidParameterError, match="C, H, W"):
            est.fit(X)
        return
    with pytest.raises(ValueError, match=rf"{math.prod(shape)}.*16 features"):
        est.fit(X)


@pytest.mark.parametrize("shape", [(1, 4, 4.0), (0, 4, 4), (True, 4, 4), "1x4x4"])
def test_malformed_image_shape_is_refused(shape):
    with pytest.raises((InvalidParameterError, ValueError), match="image_shape"):
        ScoreFlowDensity(image_shape=shape).fit(np.random.default_rng(0).normal(size=(20, 16)))


def test_sizes_that_do_not_halve_are_refused():
    X = np.random.default_rng(0).normal(size=(20, 36))
    with pytest.raises(ValueError, match="divisible by 4"):
        ScoreFlowDensity(image_shape=(1, 6, 6), channel_mult=(1, 2, 2), max_iter=1).fit(X)


def test_preset_resolves_to_the_papers_sizes():
    est = ScoreFlowDensity(image_shape=(3, 32, 32), network="ddpmpp_cifar10")
    kind, shape, sizes = _params.resolve_network(est, 3072)
    assert (kind, shape) == ("unet", (3, 32, 32))
    preset = UNET_PRESETS["ddpmpp_cifar10"]
    assert sizes == {k: v for k, v in preset.items() if k != "dropout"}
    net = ScoreUNet((3, 32, 32), **sizes, dropout=_params.resolve_dropout("auto", 10, kind))
    assert sum(p.numel() for p in net.parameters()) == 61_804_419


def test_explicit_sizes_override_auto():
    est = ScoreFlowDensity(image_shape=(1, 8, 8), channels=12, attn_resolutions=(8, 4))
    _, _, sizes = _params.resolve_network(est, 64)
    assert sizes == {"channels": 12, "channel_mult": (1, 2), "num_res_blocks": 1,
                     "attn_resolutions": (8, 4)}


def test_get_params_keeps_auto_and_clone_works(fitted):
    params = clone(fitted).get_params()
    assert params["network"] == "auto" and params["image_shape"] == SHAPE
    assert params["augment"] is None


# ----------------------------------------------------------------------------- L-level pixels
def test_levels_are_mapped_onto_minus_one_one(fitted):
    """One affine map for every pixel: k + u in [0, L) onto [-1, 1), L = 5 levels here."""
    assert fitted.n_levels_ == 5
    np.testing.assert_array_equal(fitted.mean_, np.full(D, 2.5))
    np.testing.assert_array_equal(fitted.scale_, np.full(D, 2.5))
    z = fitted._standardizer.transform(np.array([[0.0] * D, [5.0] * D]))
    np.testing.assert_array_equal(z, [[-1.0] * D, [1.0] * D])


def test_levels_start_at_the_smallest_value():
    X = _pixels(levels=4) + 10  # levels 10..13
    est = ScoreFlowDensity(dequantization="uniform", **{**UNET, "max_iter": 1}).fit(X)
    assert est.n_levels_ == 4
    np.testing.assert_array_equal(est.mean_, np.full(D, 12.0))


def test_continuous_images_share_one_mean_and_scale():
    X = np.random.default_rng(0).normal(3.0, 2.0, size=(200, D))
    est = ScoreFlowDensity(**{**UNET, "max_iter": 1}).fit(X)
    assert est.n_levels_ is None
    assert np.ptp(est.mean_) == 0 and np.ptp(est.scale_) == 0
    assert est.mean_[0] == pytest.approx(X.mean(), rel=1e-9)
    assert est.scale_[0] == pytest.approx(X.std(), rel=1e-9)


def test_bits_per_dim_is_the_papers_convention(fitted):
    """On one fitted model: -log2 P(x) / D (in integer units) equals
    NLL_[-1,1] / (D ln 2) + log2(L) - 1, where NLL_[-1,1] is the ODE negative log-density of
    x = 2 (k + u) / L - 1 (the paper's "+7" for L = 256)."""
    X = _pixels(6, seed=1)
    est = clone(fitted).set_params(divergence="exact")
    est.__dict__.update({k: v for k, v in fitted.__dict__.items() if k.endswith("_")})
    per_row = -est.score_samples(X) / (D * math.log(2))
    # The same dequantization draw as score_samples (its generator seed 1, K = 1).
    x = torch.tensor(X, dtype=torch.float32)
    u, _ = _uniform_dequantize(x, torch.Generator().manual_seed(1))
    L = est.n_levels_
    x_pm1 = 2 * (x + u) / L - 1
    # The network's input is that point (to rounding; the solve is then the same one: an
    # adaptive solver would turn a rounding difference into one of the order of its tolerance).
    z = est._standardizer.transform(x + u)
    torch.testing.assert_close(z, x_pm1, rtol=0, atol=1e-6)
    nll = -ode_log_likelihood(est.network_, z, est.sde_, eps=est.eps_, divergence="exact",
                              **est._solver_kwargs(est.eps_)).double().numpy()
    paper = nll / (D * math.log(2)) + math.log2(L) - 1
    np.testing.assert_allclose(per_row, paper, rtol=1e-10)
    assert est.bits_per_dim(X) == pytest.approx(per_row.mean(), rel=1e-12)
    # A non-trivial number: the offset for L = 5 is log2(5) - 1 = 1.32 bits.
    assert 0 < per_row.mean() < 20


def test_variational_dequantization_with_the_unet():
    X = _pixels()
    est = ScoreFlowDensity(dequantization="variational", dequantizer_max_iter=10,
                           dequantizer_hidden_layer_sizes=(16,), **UNET).fit(X)
    bpd = est.bits_per_dim(X[:8])
    assert np.isfinite(bpd) and bpd > 0  # -log2 P(x) of a discrete row is >= 0
    S = est.sample(5, random_state=0)
    assert S.shape == (5, D) and S.dtype == np.int64 and S.min() >= 0 and S.max() <= 4


def test_unet_on_other_sdes_fits_and_scores():
    X = _pixels()
    for sde in ("subvp", "ve"):
        est = ScoreFlowDensity(sde=sde, dequantization="uniform", **{**UNET, "max_iter": 5})
        assert np.isfinite(est.fit(X).score_samples(X[:3])).all()


# ----------------------------------------------------------------------------- flips
def test_hflip_mirrors_about_half_of_the_rows():
    flip = _data.hflip((2, 3, 4))
    batch = torch.arange(400 * 24, dtype=torch.float64).reshape(400, 24)
    out = flip(batch, torch.Generator().manual_seed(0))
    images, flipped = batch.reshape(400, 2, 3, 4), out.reshape(400, 2, 3, 4)
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    same = (flipped == images).flatten(1).all(1)
    assert bool((mirrored ^ same).all())  # each row is either mirrored or untouched
    assert 150 < int(mirrored.sum()) < 250
    again = flip(batch, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded: reproducible


def test_augment_changes_training_not_evaluation():
    X = _pixels()
    plain = ScoreFlowDensity(dequantization="uniform", **UNET).fit(X)
    flipped = ScoreFlowDensity(dequantization="uniform", augment="hflip", **UNET).fit(X)
    assert plain.loss_curve_ != flipped.loss_curve_
    again = ScoreFlowDensity(dequantization="uniform", augment="hflip", **UNET).fit(X)
    assert flipped.loss_curve_ == again.loss_curve_
    # Continuous data are flipped in X's units, whatever the standardisation.
    Xc = X + np.random.default_rng(1).random(X.shape)
    est = ScoreFlowDensity(augment="hflip", **UNET).fit(Xc)
    assert np.isfinite(est.loss_curve_).all()


def test_augment_needs_images():
    with pytest.raises(ValueError, match="image_shape"):
        ScoreFlowDensity(augment="hflip", max_iter=1).fit(np.zeros((10, 4)) + np.arange(4))


# ----------------------------------------------------------------------------- persistence
def test_pickle_and_save_load_round_trip(fitted, tmp_path):
    X = _pixels(6, seed=2)
    expected = fitted.score_samples(X)
    restored = pickle.loads(pickle.dumps(fitted))
    assert isinstance(restored.network_, ScoreUNet)
    np.testing.assert_array_equal(restored.score_samples(X), expected)
    fitted.save(tmp_path / "images.pt")
    loaded = ScoreFlowDensity.load(tmp_path / "images.pt")
    assert isinstance(loaded.network_, ScoreUNet) and loaded.n_levels_ == 5
    assert loaded.image_shape_ == SHAPE and loaded.unet_sizes_ == fitted.unet_sizes_
    np.testing.assert_allclose(loaded.score_samples(X), expected, rtol=1e-6)
    np.testing.assert_array_equal(loaded.sample(4, random_state=3),
                                  fitted.sample(4, random_state=3))


def test_warm_start_and_partial_fit_continue_the_unet():
    X = _pixels()
    est = ScoreFlowDensity(dequantization="uniform", warm_start=True, **UNET).fit(X)
    before = [p.detach().clone() for p in est.network_.parameters()]
    est.fit(X)
    assert est.n_iter_ == 30 and isinstance(est.network_, ScoreUNet)
    assert any(not torch.equal(a, b) for a, b in zip(before, est.network_.parameters()))
    with pytest.raises(ValueError, match="channels"):
        est.set_params(channels=12).fit(X)
    stream = ScoreFlowDensity(dequantization="uniform", **UNET)
    stream.partial_fit(X[:48]).partial_fit(X[48:])
    assert stream.network_type_ == "unet" and stream.n_iter_ == 2


def test_checkpoint_resume_of_an_image_fit(tmp_path):
    """A fit stopped by an exception resumes from its checkpoint to the uninterrupted result."""
    X = _pixels()
    params = {**UNET, "dequantization": "uniform", "checkpoint_every": 5}
    reference = ScoreFlowDensity(**params).fit(X)
    path = tmp_path / "ckpt"
    est = ScoreFlowDensity(**params, checkpoint_path=path)
    calls = {"n": 0}
    original = _params.training_kwargs

    def failing(est_, n_train=None):
        kwargs = original(est_, n_train)
        def callback(state):
            calls["n"] += 1
            if calls["n"] == 8:
                raise RuntimeError("simulated crash")
        return {**kwargs, "callback": callback}

    _params.training_kwargs = failing
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            est.fit(X)
    finally:
        _params.training_kwargs = original
    resumed = ScoreFlowDensity(**params, checkpoint_path=path).fit(X)
    assert resumed.loss_curve_ == reference.loss_curve_
    for a, b in zip(resumed.network_.parameters(), reference.network_.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- CIFAR-10 files
def _write_batch(path, data, labels, protocol=2):
    with open(path, "wb") as f:
        pickle.dump({"batch_label": "testing batch", "labels": list(labels), "data": data,
                     "filenames": [f"img_{i}.png" for i in range(len(labels))]}, f,
                    protocol=protocol)


def test_load_cifar10_round_trip(tmp_path):
    """Files in the "python version" format read back byte for byte, batches in order."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [rng.integers(0, 256, size=(7, 3072), dtype=np.uint8) for _ in range(6)]
    labels = [rng.integers(0, 10, size=7) for _ in range(6)]
    for i in range(5):
        _write_batch(folder / f"data_batch_{i + 1}", batches[i], labels[i])
    _write_batch(folder / "test_batch", batches[5], labels[5], protocol=4)
    X, y = load_cifar10(folder)  # the folder itself ...
    np.testing.assert_array_equal(X, np.concatenate(batches[:5]))
    np.testing.assert_array_equal(y, np.concatenate(labels[:5]))
    assert X.dtype == np.uint8 and y.dtype == np.int64 and X.shape == (35, 3072)
    Xt, yt = load_cifar10(tmp_path, split="test")  # ... or its parent
    np.testing.assert_array_equal(Xt, batches[5])
    np.testing.assert_array_equal(yt, labels[5])
    # Rows are C-order images: row.reshape(3, 32, 32)[c] is channel plane c.
    np.testing.assert_array_equal(Xt[0].reshape(3, 32, 32)[1].ravel(), batches[5][0, 1024:2048])


def test_load_cifar10_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, split="validation")
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1],
                     "evil": pickle.loads}, f)  # a file that would import code
    with pytest.raises(ValueError, match="not a CIFAR-10"):
        load_cifar10(tmp_path, split="test")
    _write_batch(tmp_path / "test_batch", np.zeros((2, 100), np.uint8), [0, 1])
    with pytest.raises(ValueError, match="3072"):
        load_cifar10(tmp_path, split="test")


def test_cifar10_rows_fit_an_image_model(tmp_path):
    """The loader's rows go into the estimator unchanged (uint8, 3x32x32, 256 levels)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(16, 3072), dtype=np.uint8)
    data[0, 0], data[0, 1] = 0, 255
    _write_batch(folder / "test_batch", data, np.zeros(16, int))
    X, _ = load_cifar10(folder, split="test")
    est = ScoreFlowDensity(image_shape=(3, 32, 32), dequantization="uniform", channels=4,
                           channel_mult=(1, 2), num_res_blocks=1, max_iter=2, batch_size=8,
                           early_stopping=False, random_state=0).fit(X)
    assert est.n_levels_ == 256 and est.mean_[0] == 128.0


# ----------------------------------------------------------------------------- training script
def _train_images_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "train_images.py"
    spec = importlib.util.spec_from_file_location("train_images", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_images_script_runs_resumes_and_saves_on_cpu(tmp_path):
    """The paper-recipe script on tiny data: logs the held-out bound, checkpoints, resumes where
    it stopped, trains the dequantizer and writes a model the networks module rebuilds."""
    import csv
    import json

    from skscoreflow.nets import network_from_config

    script = _train_images_module()
    common = ["--data", "digits", "--channels", "8", "--batch-size", "16", "--eval-every", "2",
              "--eval-images", "8", "--eval-time-samples", "4", "--checkpoint-every", "2",
              "--warmup", "2", "--lr", "1e-3", "--device", "cpu", "--out", str(tmp_path)]
    first = script.main(["--steps", "4", *common])
    assert first["steps"] == 4 and first["levels"] == 17 and first["image_shape"] == (1, 8, 8)
    assert (tmp_path / "checkpoint.pt").exists()
    resumed = script.main(["--steps", "6", "--dequantizer-steps", "2", *common])
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]  # continued, not restarted
    assert all(float(r["bound_bpd"]) > 0 for r in rows)
    assert float(rows[0]["lr"]) == pytest.approx(0.5e-3)  # warm-up: lr * step / warmup
    assert resumed["steps"] == 6 and resumed["variational_bound_bpd"] > 0
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    net = network_from_config(json.loads(blob["config"]))
    net.load_state_dict(blob["ema"])
    assert isinstance(net, ScoreUNet) and "dequantizer" in blob
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["bound_bpd"] == pytest.approx(float(rows[-1]["bound_bpd"]))


# ----------------------------------------------------------------------------- optimizer "auto"
@pytest.mark.parametrize("params, expected", [
    ({}, (1024, 2e-3)),
    ({"image_shape": (1, 8, 8)}, (128, 1e-3)),
    ({"image_shape": (3, 32, 32)}, (128, 2e-4)),  # DDPM++'s 128 channels: the paper's rate
    ({"image_shape": (1, 8, 8), "channels": 128}, (128, 2e-4)),
    ({"image_shape": (1, 8, 8), "batch_size": 64, "learning_rate": 5e-4}, (64, 5e-4)),
    ({"batch_size": 7}, (7, 2e-3)),
])
def test_auto_batch_size_and_learning_rate_follow_the_network(params, expected):
    est = ScoreFlowDensity(**params)
    d = math.prod(params.get("image_shape", (4,)))
    est.network_type_, _, est.unet_sizes_ = _params.resolve_network(est, d)
    assert _params.resolve_optimizer(est) == expected


def test_fit_records_the_resolved_optimizer_settings(fitted):
    assert (fitted.batch_size_, fitted.learning_rate_) == (32, 1e-3)
    est = ScoreFlowDensity(image_shape=SHAPE, dequantization="uniform", channels=8,
                           max_iter=2, early_stopping=False, random_state=0).fit(_pixels())
    assert (est.batch_size_, est.learning_rate_) == (128, 1e-3)
    assert est.get_params()["batch_size"] == "auto"


def test_estimators_saved_before_images_still_score_and_continue():
    """An MLP estimator pickled by an earlier version (no image parameters or attributes)."""
    X = np.random.default_rng(0).normal(size=(60, 3))
    est = ScoreFlowDensity(max_iter=3, early_stopping=False, warm_start=True, random_state=0)
    est.fit(X)
    expected = est.score_samples(X[:4])
    state = est.__getstate__()
    for key in (*_params.IMAGE_DEFAULTS, *_params.IMAGE_FITTED_DEFAULTS):
        state.pop(key)
    for key in ("network", "image_shape", "unet"):
        state["_fitted_structure"].pop(key)
    old = ScoreFlowDensity.__new__(ScoreFlowDensity)
    old.__setstate__(pickle.loads(pickle.dumps(state)))
    assert old.network_type_ == "mlp" and old.get_params()["network"] == "auto"
    np.testing.assert_allclose(old.score_samples(X[:4]), expected, rtol=1e-6)
    old.fit(X)  # warm start: nothing counts as changed
    assert old.n_iter_ == 6


@pytest.mark.parametrize("channels", [36, 48, 68])
def test_channel_counts_that_32_groups_do_not_divide(channels):
    net = ScoreUNet((1, 8, 8), channels=channels, channel_mult=(1, 2), num_res_blocks=1)
    assert net(torch.randn(2, 64), torch.rand(2)).shape == (2, 64)
    for m in net.modules():
        if isinstance(m, torch.nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0 and m.num_groups <= 32


def test_augment_after_a_fit_without_images_is_refused():
    X = np.random.default_rng(0).normal(size=(40, 4))
    est = ScoreFlowDensity(max_iter=2, early_stopping=False, warm_start=True, random_state=0)
    est.fit(X)
    with pytest.raises(ValueError, match="without image_shape"):
        est.set_params(augment="hflip").fit(X)
