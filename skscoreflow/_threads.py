"""How many torch threads a fit uses.

torch starts with one intra-op thread per core of the machine, ignoring a container's CPU quota
(cgroups), and every fit running in one process shares that setting.  A fit therefore uses at
most the cores it can actually run on (CPU affinity and cgroup quota), never more than torch was
set to (``torch.set_num_threads``, ``OMP_NUM_THREADS``; joblib's loky workers set the latter to
their share of the cores), and a fit that starts while others run in the same process (threads,
e.g. joblib's threading backend) takes its share of that budget.  Each fit restores its thread's
setting when it ends.  ``SKSCOREFLOW_THREADS`` overrides it: an int fixes the budget, ``"torch"`` leaves torch's
setting alone (the behaviour before this policy).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from pathlib import Path
from typing import Iterator

import torch

__all__: list[str] = []

_lock = threading.Lock()
_active = 0


def _cgroup_cpus() -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max`` or v1 CFS), None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def effective_cpus() -> int:
    """Cores this process can run on: its CPU affinity, capped by the cgroup quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        n = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def _budget(current: int) -> int | None:
    mode = os.environ.get("SKSCOREFLOW_THREADS", "auto").strip().lower()
    if mode == "torch":
        return None
    if mode.isdigit() and int(mode) > 0:
        return int(mode)
    return min(current, effective_cpus())


@contextlib.contextmanager
def fit_threads() -> Iterator[int]:
    """Run a fit with its share of the thread budget; yields the number of threads set.

    torch's thread setting belongs to the calling thread, so each fit sets (and afterwards
    restores) its own: a fit that starts while others run in the process takes
    ``budget // (fits running)``, fits already running keep theirs.
    """
    global _active
    current = torch.get_num_threads()
    budget = _budget(current)
    with _lock:
        _active += 1
        share = None if budget is None else max(1, budget // _active)
    if share is not None:
        torch.set_num_threads(share)
    try:
        yield torch.get_num_threads()
    finally:
        if share is not None:
            torch.set_num_threads(current)
        with _lock:
            _active -= 1
