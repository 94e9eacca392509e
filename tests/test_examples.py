"""The torchrun example scripts run end to end (2 CPU processes, a few steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from skscoreflow import ScoreFlowDensity

EXAMPLES = Path(__file__).parent.parent / "examples"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def torchrun(script: str, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", SKSCOREFLOW_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(EXAMPLES / script), "--device", "cpu", *args],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_tabular_example_on_a_memmapped_npy(tmp_path) -> None:
    X = np.random.default_rng(0).normal(size=(600, 3))
    np.save(tmp_path / "X.npy", X)
    out = torchrun("ddp_tabular.py", "--data", str(tmp_path / "X.npy"), "--max-iter", "10",
                   "--batch-size", "64", "--eval-rows", "20", "--out", str(tmp_path / "m.skf"))
    assert out.count("2 processes, 10 steps") == 1  # rank 0 alone prints
    est = ScoreFlowDensity.load(tmp_path / "m.skf")
    assert est.world_size_ == 2 and est.n_features_in_ == 3


def test_image_example_on_digits(tmp_path) -> None:
    out = torchrun("ddp_images.py", "--max-iter", "6", "--dequantizer-max-iter", "3",
                   "--eval-rows", "3", "--out", str(tmp_path / "d.skf"))
    assert out.count("bits/dim") == 1
    est = ScoreFlowDensity.load(tmp_path / "d.skf")
    assert est.dequantizer_ is not None and est.n_features_in_ == 64
    assert est.network_type_ == "unet" and est.image_shape_ == (1, 8, 8)
