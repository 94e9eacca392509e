"""Train an image score model with the paper's recipe (ScoreFlow on CIFAR-10), on a GPU or,
on tiny data, on the CPU.

The recipe (Song, Durkan, Murray & Ermon 2021; the images fact sheet §3): VP SDE, likelihood
weighting with importance-sampled times, the U-Net (``--preset ddpmpp_cifar10`` is DDPM++ cont.,
61.8M parameters), Adam 2e-4 with a linear warm-up over 5,000 steps and a constant rate after,
global gradient-norm clipping at 1, batch 128, an EMA of the weights; then a variational
dequantizer trained against the frozen score model.  The pixels are ``k = 0..L-1`` integers,
uniformly dequantized and mapped onto ``[-1, 1)`` (``x = 2 (k + u) / L - 1``); every bits/dim
figure is ``-log2 P(k) / D`` in integer units, i.e. ``NLL_x / (D ln 2) + log2(L) - 1``.

It writes into ``--out``:

* ``log.csv``: step, loss, learning rate, images/s, and every ``--eval-every`` steps the
  held-out bound in bits/dim (uniform dequantization, ``--eval-time-samples`` importance-sampled
  times, the EMA weights, ``--eval-images`` held-out images);
* ``checkpoint.pt`` every ``--checkpoint-every`` steps (network, EMA, optimizer, generator
  state, step): a rerun with the same ``--out`` resumes from it;
* ``model.pt`` at the end: the EMA network's config and weights and the dequantizer's, with
  the final figures in ``summary.json``.

On CUDA the forward and backward passes run under bf16 autocast with channels_last memory
(``--amp none`` turns both off); the loss, the optimizer and the EMA stay in float32.

Examples::

    # digits as 1x8x8 images (17 levels), a few minutes on 2 CPU cores
    python benchmarks/train_images.py --data digits --steps 2000 --out runs/digits
    # CIFAR-10 from the user's own files, the paper's network, on a GPU
    python benchmarks/train_images.py --data cifar10 --cifar-dir ~/data/cifar-10-batches-py \\
        --preset ddpmpp_cifar10 --steps 20000 --out runs/cifar10
    # throughput only: steps/s of the preset on random 8-bit images (no evaluation)
    python benchmarks/train_images.py --data random --preset ddpmpp_cifar10 --speed 50
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from skscoreflow.bound import likelihood_bound
from skscoreflow.dequantization import _fit_to_score_model
from skscoreflow.nets import ScoreUNet, unet_defaults
from skscoreflow.sde import VPSDE
from skscoreflow.weighting import dsm_loss


def load_images(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int], int]:
    """Training rows, held-out rows, the image shape and the number of levels L."""
    if args.data == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        X, _ = load_digits(return_X_y=True)
        train, test = train_test_split(X.astype(np.int64), test_size=0.2, random_state=0)
        return train, test, (1, 8, 8), 17
    if args.data == "cifar10":
        from skscoreflow.datasets import load_cifar10

        train, _ = load_cifar10(args.cifar_dir, "train")
        test, _ = load_cifar10(args.cifar_dir, "test")
        return train, test, (3, 32, 32), 256
    if args.data == "random":  # speed measurements
        shape = tuple(args.image_shape)
        rng = np.random.default_rng(0)
        d = math.prod(shape)
        return (rng.integers(0, 256, (4096, d), dtype=np.uint8),
                rng.integers(0, 256, (256, d), dtype=np.uint8), shape, 256)
    data = np.load(args.npy, mmap_mode="r")
    shape = tuple(args.image_shape)
    n_test = max(1, len(data) // 20)
    return np.asarray(data[n_test:]), np.asarray(data[:n_test]), shape, int(data.max()) + 1


def build_network(args: argparse.Namespace, shape: tuple[int, int, int], sde: VPSDE) -> ScoreUNet:
    if args.preset:
        overrides = {} if args.dropout is None else {"dropout": args.dropout}
        return ScoreUNet.from_preset(args.preset, shape, sde, **overrides)
    sizes = unet_defaults(shape)
    if args.channels:
        sizes["channels"] = args.channels
    if args.num_res_blocks:
        sizes["num_res_blocks"] = args.num_res_blocks
    return ScoreUNet(shape, sde, dropout=0.1 if args.dropout is None else args.dropout, **sizes)


def to_unit(k: torch.Tensor, u: torch.Tensor, levels: int) -> torch.Tensor:
    """Integer pixels plus dequantization noise onto [-1, 1): x = 2 (k + u) / L - 1."""
    return 2.0 * (k + u) / levels - 1.0


@torch.no_grad()
def heldout_bits_per_dim(net: ScoreUNet, test: torch.Tensor, sde: VPSDE, eps: float, levels: int,
                         n_time_samples: int, seed: int, batch: int, dequantizer=None) -> float:
    """Mean -log2 P(k) / D bound on held-out images (fixed draws): uniform dequantization, or
    ``u ~ q(u | k)`` from a variational ``dequantizer`` (minus ``log q``)."""
    g = torch.Generator(device=test.device).manual_seed(seed)
    d = test.shape[1]
    total = 0.0
    for start in range(0, test.shape[0], batch):
        k = test[start:start + batch].float()
        if dequantizer is None:
            u, log_q = torch.rand(k.shape, generator=g, device=k.device), 0.0
        else:
            u, log_q = dequantizer.sample(to_unit(k, torch.zeros_like(k), levels), g)
        lb = likelihood_bound(net, to_unit(k, u, levels), sde, eps=eps,
                              n_time_samples=n_time_samples, generator=g)
        total += float((lb.double() - log_q).sum())
    nll = -total / test.shape[0]
    return nll / (d * math.log(2)) + math.log2(levels) - 1


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=["digits", "cifar10", "npy", "random"], default="digits")
    p.add_argument("--cifar-dir", default="cifar-10-batches-py")
    p.add_argument("--npy", help="uint8 rows (n, C*H*W) for --data npy")
    p.add_argument("--image-shape", type=int, nargs=3, default=(3, 32, 32))
    p.add_argument("--preset", default=None, help="a U-Net preset, e.g. ddpmpp_cifar10")
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--num-res-blocks", type=int, default=None)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=5000)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.9999)
    p.add_argument("--ema-warmup", action="store_true",
                   help="EMA decay min(ema, (1 + step) / (10 + step)): short runs")
    p.add_argument("--eps", type=float, default=1e-5)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--eval-time-samples", type=int, default=100)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--dequantizer-steps", type=int, default=0)
    p.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed", type=int, default=0, help="only time this many steps")
    p.add_argument("--out", default="runs/images")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    amp = device.type == "cuda" and args.amp != "none" or args.amp == "bf16"
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_np, test_np, shape, levels = load_images(args)
    sde = VPSDE()
    net = build_network(args, shape, sde).to(device)
    if amp and device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    ema = build_network(args, shape, sde).to(device)
    ema.load_state_dict(net.state_dict())
    ema.eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    train = torch.as_tensor(np.asarray(train_np), device=device)
    test = torch.as_tensor(np.asarray(test_np[:args.eval_images]), device=device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    step, rows = 0, []
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not args.speed:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state["cuda_rng"].numel():
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        step, rows = int(state["step"]), list(state["rows"])
        print(f"resumed at step {step}", flush=True)
    n_params = sum(q.numel() for q in net.parameters())
    print(f"U-Net {n_params:,} parameters, {len(train)} training images {shape}, L = {levels}, "
          f"device {device}, bf16 autocast: {amp}", flush=True)

    def save_checkpoint() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        # The global RNG draws the dropout masks: saved so that a resumed run continues them.
        torch.save({"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "generator": g.get_state(), "rng": torch.get_rng_state(),
                    "cuda_rng": (torch.cuda.get_rng_state(device) if device.type == "cuda"
                                 else torch.zeros(0, dtype=torch.uint8)),
                    "step": step, "rows": rows}, tmp)
        tmp.replace(ckpt_path)

    last, t_last, speeds = step, time.perf_counter(), []
    total = args.speed or args.steps
    net.train()
    while step < total:
        idx = torch.randint(0, len(train), (args.batch_size,), generator=g, device=device)
        k = train[idx].float()
        x = to_unit(k, torch.rand(k.shape, generator=g, device=device), levels)
        # The paper's schedule: lr * min(step / warmup, 1), so the first update is at rate 0.
        for group in opt.param_groups:
            group["lr"] = args.lr * min(step / max(args.warmup, 1), 1.0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = dsm_loss(lambda y, t: net(y, t).float(), x, sde, "likelihood_is", args.eps,
                            generator=g).mean()
        if not math.isfinite(float(loss.detach())):  # before the step: the EMA stays clean
            raise FloatingPointError(f"non-finite loss at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step)) if args.ema_warmup else args.ema
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1 - decay)
        step += 1
        report = step % max(1, min(args.eval_every, 100)) == 0 or step == total
        if report:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            speed = (step - last) * args.batch_size / (now - t_last)
            speeds.append(speed)
            row = {"step": step, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"],
                   "images_per_s": speed, "bound_bpd": ""}
            if not args.speed and (step % args.eval_every == 0 or step == total):
                row["bound_bpd"] = heldout_bits_per_dim(ema, test, sde, args.eps, levels,
                                                        args.eval_time_samples, 1,
                                                        args.eval_batch)
            rows.append(row)
            print(json.dumps(row), flush=True)
            last, t_last = step, time.perf_counter()
        if not args.speed and (step % args.checkpoint_every == 0 or step == total):
            save_checkpoint()

    summary = {"parameters": n_params, "steps": step, "batch_size": args.batch_size,
               "device": str(device), "bf16": amp, "levels": levels, "image_shape": shape,
               "images_per_s_median": float(np.median(speeds[1:] or speeds)) if speeds
               else float("nan")}
    if not args.speed and rows:
        with open(out / "log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        summary["bound_bpd"] = rows[-1]["bound_bpd"]
        blob = {"config": json.dumps(ema.config()), "ema": ema.state_dict()}
        if args.dequantizer_steps:
            # Variational dequantization against the frozen EMA score model (K = 1 bound).
            state = _fit_to_score_model(
                ema, sde, args.eps, lambda v: 2.0 * v / levels - 1.0, train.float(),
                hidden_layer_sizes=(64, 64), n_couplings=4, max_iter=args.dequantizer_steps,
                seed=args.seed + 3)
            deq = state.ema_model
            blob["dequantizer"] = {"config": json.dumps(deq.config()), "state": deq.state_dict()}
            summary["variational_bound_bpd"] = heldout_bits_per_dim(
                ema, test, sde, args.eps, levels, args.eval_time_samples, 1, args.eval_batch,
                dequantizer=deq)
        torch.save(blob, out / "model.pt")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
