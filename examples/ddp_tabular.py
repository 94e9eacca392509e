"""Data-parallel fit of a table with torchrun (DDP; gloo on CPUs, NCCL on GPUs).

    torchrun --standalone --nproc_per_node=2 examples/ddp_tabular.py --out moons.skf

Every process runs this script with the same data and parameters.  ``distributed=True``
initialises the process group from torchrun's environment (on GPUs: one GPU per process,
``cuda:LOCAL_RANK``); ``batch_size`` is the global batch, split across the processes, so the
model does not depend on their number.  Only rank 0 prints and writes the model file.  The
data may be a ``.npy`` file of float rows (``--data``; opened as a memmap: each process scans
it once in chunks and then reads one global batch per step, never the whole file) or a
built-in 2-D set.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch.distributed as dist

from skscoreflow import ScoreFlowDensity
from skscoreflow.datasets import make_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help=".npy file of float rows (memory-mapped)")
    parser.add_argument("--dataset", default="moons", help="built-in set when no --data")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--max-iter", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=1024, help="global batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--eval-rows", type=int, default=500, help="held-out rows scored")
    parser.add_argument("--out", default=None, help="model file (written by rank 0)")
    args = parser.parse_args()

    if args.data:
        X = np.load(args.data, mmap_mode="r")
    else:
        X = make_dataset(args.dataset, args.rows, random_state=0)  # the same on every rank
    est = ScoreFlowDensity(max_iter=args.max_iter, batch_size=args.batch_size,
                           device=args.device, random_state=0, distributed=True, verbose=1)
    est.fit(X)
    held_out = make_dataset(args.dataset, 2_000, random_state=1) if not args.data else X[:2_000]
    # Evaluation runs on each rank's own copy of the (identical) model: no collectives.
    score = est.score(held_out[: args.eval_rows])
    if dist.get_rank() == 0:
        print(f"{est.world_size_} processes, {est.n_iter_} steps in {est.fit_time_:.1f} s; "
              f"held-out log-likelihood {score:.4f} nats/row")
    if args.out:
        est.save(args.out)  # rank 0 writes; every rank returns once the file is complete


if __name__ == "__main__":
    main()
