"""Image training speed and a short run's held-out bound, with ``train_images.py``.

Rows of the table:

* ``speed``: training images/s (median over the timed steps, after one untimed step) of a U-Net
  on random 8-bit images: the paper's DDPM++ (cont.) preset on CIFAR-10-sized input
  (3x32x32, 61.8M parameters) and the "auto" U-Net of 8x8 digits;
* ``short run``: the paper's recipe for ``--steps`` steps on digits as 1x8x8 images (17 levels,
  fixed 80/20 split), with the held-out bound in bits/dim (uniform dequantization,
  importance-sampled times) at the end.

On a GPU (``--device cuda``) the steps run under bf16 autocast with channels_last; on the CPU in
float32.  The device, its load and the torch threads are recorded beside every figure.

    python benchmarks/bench_images.py [--device cpu|cuda] [--threads N] [--batch-size 128]
        [--speed-batch-size 128] [--speed-steps 3] [--steps 2000] [--name images]

Writes docs/benchmarks/<name>.{csv,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(__file__))
import train_images  # noqa: E402
from _common import Timer, load_average, write_table  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128, help="the short run's batch")
    parser.add_argument("--speed-batch-size", type=int, default=128,
                        help="the speed rows' batch (the paper's 128; smaller for a CPU)")
    parser.add_argument("--speed-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000, help="short digits run (0: none)")
    parser.add_argument("--name", default="images")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    where = (torch.cuda.get_device_name() if device.startswith("cuda")
             else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in [
            ("DDPM++ cont. (preset), 3x32x32", ["--preset", "ddpmpp_cifar10",
                                                "--image-shape", "3", "32", "32"]),
            ("auto U-Net, 1x8x8", ["--image-shape", "1", "8", "8"]),
        ]:
            steps = args.speed_steps + 1
            with Timer() as t:
                summary = train_images.main(
                    ["--data", "random", *extra, "--speed", str(steps), "--batch-size",
                     str(args.batch_size), "--device", device, "--out", tmp,
                     "--eval-every", "1"])
            rows.append({"row": "speed", "model": label, "device": where,
                         "batch_size": args.speed_batch_size, "steps": args.speed_steps,
                         "parameters": summary["parameters"], "bf16": summary["bf16"],
                         "images_per_s": summary["images_per_s_median"],
                         "bound_bpd": float("nan"), "seconds": t.seconds, "load_1min": t.load})
            print(rows[-1], flush=True)
        if args.steps:
            out = os.path.join(tmp, "digits")
            with Timer() as t:
                summary = train_images.main(
                    ["--data", "digits", "--steps", str(args.steps), "--batch-size",
                     str(args.batch_size), "--lr", "1e-3", "--warmup", str(args.steps // 10),
                     "--ema", "0.999", "--eval-every", str(max(1, args.steps // 4)),
                     "--eval-images", "360", "--eval-time-samples", "100",
                     "--device", device, "--out", out])
            rows.append({"row": "short run", "model": "auto U-Net, 1x8x8 digits", "device": where,
                         "batch_size": args.batch_size, "steps": args.steps,
                         "parameters": summary["parameters"], "bf16": summary["bf16"],
                         "images_per_s": summary["images_per_s_median"],
                         "bound_bpd": summary["bound_bpd"], "seconds": t.seconds,
                         "load_1min": t.load})
            print(rows[-1], flush=True)
    gpu_note = ("" if device.startswith("cuda") else
                " No GPU was available for this run (the device tool lent none to the task), "
                "so these are CPU figures; on a GPU the same command with `--device cuda` "
                "measures the preset under bf16 autocast and channels_last.")
    write_table(
        pd.DataFrame(rows), args.name, "Images: U-Net training speed and a short run's bound",
        notes=(
            f"Command: `python benchmarks/bench_images.py --device {args.device} --threads "
            f"{args.threads} --batch-size {args.batch_size} --speed-batch-size "
            f"{args.speed_batch_size} --speed-steps {args.speed_steps} "
            f"--steps {args.steps}`. `speed`: median training images/s over {args.speed_steps} "
            "timed steps (after one untimed step) on random uint8 images, the paper's recipe "
            "(Adam, clipping, EMA; bf16 autocast and channels_last on CUDA only). `short run`: "
            "`train_images.py` on digits (1,437 training images as 1x8x8, L = 17), lr 1e-3 "
            "with a 10% warm-up, EMA 0.999; `bound_bpd` is the held-out Theorem-3 bound (uniform "
            "dequantization, 100 importance-sampled times per image, 360 test images), an upper "
            "bound on -log2 P(x)/64; ODE bits/dim and the anchors are in `digits.md`. "
            f"Load average {load_average():.2f} at the end." + gpu_note
        ),
    )


if __name__ == "__main__":
    main()
