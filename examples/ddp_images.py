"""Data-parallel fit of images as integer pixel rows with torchrun.

    torchrun --standalone --nproc_per_node=2 examples/ddp_images.py --out digits.skf

Images are flat rows of L-level integer pixels (C-order, as CIFAR-10's python files store
them).  The default data are scikit-learn's 8 x 8 digits (17 grey levels; no download), fitted
as 1 x 8 x 8 images with the U-Net; ``--data`` takes a ``.npy`` file of uint8 rows
(memory-mapped, read one batch at a time) with ``--image-shape C H W`` (without it the rows are
modelled flat, by the MLP).  The score network is trained data-parallel on uniformly dequantized
pixels, then the variational dequantizer (replicated on every process, which end with rank 0's
weights); rank 0 reports the held-out bits/dim (an upper bound on ``-log2 P(x) / D``) and
writes the model.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch.distributed as dist
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from skscoreflow import ScoreFlowDensity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help=".npy file of uint8 image rows (memory-mapped)")
    parser.add_argument("--max-iter", type=int, default=4_000)
    parser.add_argument("--dequantizer-max-iter", type=int, default=1_000)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--image-shape", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                        help="image rows (the U-Net); digits: 1 8 8")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--eval-rows", type=int, default=200, help="held-out images scored")
    parser.add_argument("--out", default=None, help="model file (written by rank 0)")
    args = parser.parse_args()

    if args.data:
        X = np.load(args.data, mmap_mode="r")
        X_train, X_test = X[: -len(X) // 10], np.asarray(X[-len(X) // 10 :][:1_000])
    else:
        X = load_digits().data.astype(np.int64)
        X_train, X_test = train_test_split(X, test_size=0.2, random_state=0)
        args.image_shape = args.image_shape or (1, 8, 8)
    est = ScoreFlowDensity(
        dequantization="variational", max_iter=args.max_iter, batch_size=args.batch_size,
        learning_rate=args.learning_rate, dequantizer_max_iter=args.dequantizer_max_iter,
        image_shape=None if args.image_shape is None else tuple(args.image_shape),
        device=args.device, random_state=0, distributed=True, verbose=1,
    )
    est.fit(X_train)
    bpd = est.bits_per_dim(X_test[: args.eval_rows])
    if dist.get_rank() == 0:
        print(f"{est.world_size_} processes, {est.n_iter_} steps in {est.fit_time_:.1f} s; "
              f"held-out {bpd:.3f} bits/dim ({min(args.eval_rows, len(X_test))} images)")
    if args.out:
        est.save(args.out)


if __name__ == "__main__":
    main()
