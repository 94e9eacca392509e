"""Data-parallel training across processes: ``torch.distributed`` (DDP, launched by torchrun).

The design makes a fit independent of the number of processes: ``batch_size`` is the global
batch; every rank draws the same permutation and the same noise for the whole global batch and
keeps its rows ``rank, rank + W, ...``; gradients are averaged by DDP with each rank's loss
scaled so that the average is the 1-process gradient.  Everything else (clipping, Adam, the
EMA) is a deterministic function of those gradients, so every rank holds the same weights.
Evaluation (validation, likelihoods, sampling) runs on the unwrapped module, never through
DDP: an adaptive ODE solve makes a data-dependent number of forward passes, which would issue
a different number of collectives on each rank.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Internal helpers of the estimator and the training loop: nothing here is public API.
__all__: list[str] = []

#: The variables torchrun sets in every worker (``distributed=True`` needs them).
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Group:
    """The default process group as seen by one rank of a data-parallel fit.

    Parameters
    ----------
    rank : int
        This process's global rank.
    world_size : int
        Number of processes.
    device : torch.device
        The device this rank trains on (collectives on NCCL need CUDA tensors).
    """

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one rank that logs and writes files."""
        return self.rank == 0

    def _comm_device(self) -> torch.device:
        # NCCL only moves CUDA tensors; gloo moves CPU ones.
        backend = torch.distributed.get_backend()
        return self.device if backend == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks of a small float64 tensor (returned on the CPU)."""
        buf = values.detach().to(device=self._comm_device(), dtype=torch.float64).clone()
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        return buf.cpu()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; for small control data and checkpoints)."""
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def broadcast_module(self, module: nn.Module) -> None:
        """Overwrite ``module``'s parameters and buffers with rank 0's, in place."""
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                buf = tensor.detach().to(self._comm_device()).clone()
                torch.distributed.broadcast(buf, src=0)
                tensor.copy_(buf.to(tensor.device))

    def barrier(self) -> None:
        """Wait for every rank."""
        if torch.distributed.get_backend() == "nccl" and self.device.type == "cuda":
            torch.distributed.barrier(device_ids=[self.device.index or 0])
        else:
            torch.distributed.barrier()

    def check_same(self, what: str, value: Any) -> None:
        """Raise on every rank when ranks were given different ``value`` (a clear error instead
        of a hang or a silently wrong fit)."""
        values: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            raise ValueError(
                f"distributed fit: every rank must call fit with the same {what}; got "
                + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            )

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` wrapped in ``DistributedDataParallel`` for the training forward passes.

        DDP broadcasts rank 0's weights (and buffers) at construction, not at each forward:
        the package's networks keep no running statistics.  The EMA and the optimizer state
        are not synced: every rank loads the same ones (the same checkpoint or warm start).
        """
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index or 0] if self.device.type == "cuda" else None
        # torch 2.13 renamed the switch (and deprecated the old name); older releases only
        # know broadcast_buffers.
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                   else {"broadcast_buffers": False})
        return DistributedDataParallel(module, device_ids=device_ids, **no_sync)


def any_rank(group: Group | None, flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (``flag`` itself without a group): one answer on
    every rank, for decisions that must not differ (a Ctrl-C between two training phases)."""
    if group is None:
        return flag
    return bool(group.all_reduce_sum(torch.tensor([float(flag)]))[0] > 0)


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def current_rank() -> int:
    """This process's rank in the default process group (0 outside one)."""
    return torch.distributed.get_rank() if _initialized() else 0


def _init_from_environment(device: torch.device) -> None:
    """``init_process_group`` from torchrun's variables (gloo on CPU, NCCL on CUDA)."""
    if not torch.distributed.is_available():
        raise RuntimeError("distributed=True: this torch build has no torch.distributed")
    missing = [v for v in _TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"distributed=True needs a torchrun launch (or an initialised process group); the "
            f"environment lacks {', '.join(missing)}.  Launch with e.g. `torchrun "
            "--standalone --nproc_per_node=2 script.py`"
        )
    if device.type == "cuda":
        import inspect

        torch.cuda.set_device(device)
        # device_id binds the communicator to this GPU at once (errors surface here), where
        # this torch supports it.
        params = inspect.signature(torch.distributed.init_process_group).parameters
        kwargs = {"device_id": device} if "device_id" in params else {}
        torch.distributed.init_process_group("nccl", **kwargs)
    else:
        torch.distributed.init_process_group("gloo")
    # The group this package created is torn down at exit (NCCL warns otherwise); one created
    # by the user stays theirs.
    atexit.register(lambda: _initialized() and torch.distributed.destroy_process_group())


def local_device(device: torch.device) -> torch.device:
    """A CUDA device without an index means this rank's GPU (``LOCAL_RANK``) under torchrun."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def resolve_group(distributed: bool | str, device: torch.device) -> Group | None:
    """The process group a fit trains across, or None for a 1-process fit.

    ``"auto"``: an initialised default group with more than one process (never the mere
    presence of ``RANK``/``WORLD_SIZE``, which joblib workers inherit from a torchrun job);
    ``True``: that group, initialised from torchrun's environment when needed (any world size,
    1 included); ``False``: never.
    """
    if distributed is False:
        return None
    if distributed == "auto":
        if not _initialized() or torch.distributed.get_world_size() < 2:
            return None
    elif not _initialized():
        _init_from_environment(device)
    if device.type == "cuda" and torch.distributed.get_backend() == "nccl":
        # NCCL's object collectives use the current device: this rank's GPU, not cuda:0.
        torch.cuda.set_device(device)
    return Group(torch.distributed.get_rank(), torch.distributed.get_world_size(), device)
