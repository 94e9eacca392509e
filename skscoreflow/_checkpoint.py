"""Checkpoints of :meth:`ScoreFlowDensity.fit <skscoreflow.ScoreFlowDensity.fit>`.

With ``checkpoint_path`` set, ``fit`` writes the whole training state every ``checkpoint_every``
steps, at the switch from the score model to the variational dequantizer, and at an interrupt:
the loop state of the running phase (weights, EMA, optimizer, RNG streams, batch position,
curves, validation state), the finished score model once the dequantizer trains, what ``fit``
derived from the data (standardisation, ``eps_``, ...) and its seed.  Files are written
atomically (a temporary file in the same folder, ``fsync``, ``os.replace``), so a crash never
leaves a torn checkpoint, and read with ``torch.load(weights_only=True)``.

A later ``fit`` with the same ``checkpoint_path``, parameters and data resumes from the file
(on the CPU the result equals the uninterrupted fit bit for bit) and deletes it when it
completes.  A file written for other parameters or data is refused with a ``ValueError``
rather than silently overwritten or resumed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__: list[str] = []

FILE_STEM = "skscoreflow-checkpoint"
FILE_NAME = f"{FILE_STEM}.pt"
FORMAT = 1
#: Parameters that do not change what ``fit`` computes.
# A fit does not depend on the number of processes: a checkpoint of a distributed fit resumes
# on any number of them.
_NOT_FINGERPRINTED = ("verbose", "checkpoint_path", "checkpoint_every", "distributed")
#: Fitted attributes ``fit`` derives from the parameters and the data before training.
_DERIVED = ("mean_", "scale_", "data_min_", "data_max_", "eps_", "fourier_features_",
            "dropout_", "gaussian_reference_", "reference_covariance_", "network_type_",
            "image_shape_", "unet_sizes_", "n_levels_")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partly written ``path`` behind.

    The bytes go to a temporary file in the same folder, are flushed to disk, and replace
    ``path`` in one ``os.replace``; a crash at any point leaves the old file (or none).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(path.parent))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover - filesystems that refuse it
        pass
    finally:
        os.close(dir_fd)


def _data_digest(X: np.ndarray, feature_names: Any) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([list(X.shape), str(X.dtype), _jsonable(feature_names)]).encode())
    h.update(np.ascontiguousarray(X).data)  # hashed in place, no copy of the data
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    from ._persistence import _jsonable as jsonable

    return jsonable(obj)


def _fingerprint_value(value: Any) -> Any:
    """A parameter as JSON; an SDE instance (built-in or a user's class) by class and config."""
    from .sde import SDE

    if isinstance(value, SDE):
        cls = type(value)
        return {"sde": f"{cls.__module__}.{cls.__qualname__}", "config": _jsonable(value.config())}
    return _jsonable(value)


class FitCheckpoint:
    """The checkpoint file of one ``fit`` call: where it lives, what it must match, its state.

    Parameters
    ----------
    est : ScoreFlowDensity
        The estimator being fitted (its parameters and ``checkpoint_path``).
    X : ndarray
        The validated training data.
    start_n_iter : int
        Steps the network had before this fit (non-zero under ``warm_start``).
    digest : str, optional
        The data's digest when already computed (the chunked scan of out-of-core data).
    """

    follower = False  # a rank > 0 of a distributed fit: reads rank 0's payload, writes nothing

    @classmethod
    def open(cls, est: Any, X: Any, start_n_iter: int, group: Any = None,
             digest: str | None = None) -> "FitCheckpoint":
        """The fit's checkpoint; in a distributed fit only rank 0 touches the file and every
        rank gets its payload (or its error) through a broadcast."""
        if group is None:
            return cls(est, X, start_n_iter, digest)
        ckpt, error = None, None
        if group.is_main:
            try:
                ckpt = cls(est, X, start_n_iter, digest)
            except (ValueError, OSError) as exc:
                error = exc
        mine = None
        if group.is_main:
            mine = (str(error), None) if error is not None else (None, (ckpt.path, ckpt.payload, ckpt.fingerprint))
        shared = group.broadcast_object(mine)
        if shared[0] is not None:
            if error is not None:
                raise error
            raise ValueError(f"rank 0 could not open the checkpoint: {shared[0]}")
        if group.is_main:
            return ckpt
        follower = cls.__new__(cls)
        follower.follower, follower._lock_file = True, None
        follower.path, follower.payload, follower.fingerprint = shared[1]
        return follower

    def __init__(self, est: Any, X: Any, start_n_iter: int, digest: str | None = None) -> None:
        from ._params import resolve_device

        params = {k: v for k, v in est.get_params().items() if k not in _NOT_FINGERPRINTED}
        self.fingerprint = {
            "params": {k: _fingerprint_value(v) for k, v in params.items()},
            "data": digest or _data_digest(X, getattr(est, "feature_names_in_", None)),
            "start_n_iter": int(start_n_iter),
            "device": resolve_device(est.device).type,
        }
        digest = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode())
        self.path = self.file(est, digest.hexdigest()[:16])
        if not self.path.parent.is_dir():  # fail now, not at the first checkpoint of a long fit
            raise ValueError(
                f"checkpoint_path={str(est.checkpoint_path)!r}: the folder "
                f"{str(self.path.parent)!r} does not exist"
            )
        self._lock()
        try:
            self.payload = self._load()
        except BaseException:
            self.release()
            raise

    @staticmethod
    def file(est: Any, digest: str | None = None) -> Path:
        """The checkpoint file: ``checkpoint_path`` itself, or in a folder one file per fit
        (parameters and data), so that fits sharing a folder (a grid search) never collide."""
        path = Path(est.checkpoint_path)
        if not (path.is_dir() or str(est.checkpoint_path).endswith(os.sep)):
            return path
        path.mkdir(parents=True, exist_ok=True)
        return path / (FILE_NAME if digest is None else f"{FILE_STEM}-{digest}.pt")

    @staticmethod
    def exists(est: Any) -> bool:
        """Whether ``est`` has a checkpoint on disk (in a folder: any of its fits')."""
        if est.checkpoint_path is None:
            return False
        path = Path(est.checkpoint_path)
        if path.is_dir():
            return any(path.glob(f"{FILE_STEM}-*.pt"))
        return path.exists()

    def _lock(self) -> None:
        """Hold an exclusive lock on the checkpoint while fitting (released when the process
        ends, however it ends): two fits never write one checkpoint."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks
            self._lock_file = None
            return
        self._lock_file = open(f"{self.path}.lock", "a")  # noqa: SIM115 - held for the fit
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise ValueError(
                f"the checkpoint {str(self.path)!r} is in use by another running fit; give "
                "each concurrent fit its own checkpoint_path (or one folder)"
            ) from None

    def release(self) -> None:
        """Drop the lock (the fit is over)."""
        if getattr(self, "_lock_file", None) is not None:
            self._lock_file.close()
            Path(f"{self.path}.lock").unlink(missing_ok=True)
            self._lock_file = None

    def _load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
            meta = json.loads(payload["meta"])
        except Exception as exc:  # a torn or foreign file: refuse, never guess
            raise ValueError(
                f"checkpoint_path {str(self.path)!r} holds no readable skscoreflow checkpoint "
                f"({type(exc).__name__}); delete it or choose another checkpoint_path"
            ) from exc
        if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint:
            changed = [
                k for k in self.fingerprint
                if (meta.get("fingerprint") or {}).get(k) != self.fingerprint[k]
            ]
            raise ValueError(
                f"the checkpoint at {str(self.path)!r} was written by a fit with other "
                f"{' and '.join(changed) or 'format'}; delete it or choose another "
                "checkpoint_path to start afresh"
            )
        payload["meta"] = meta
        return payload

    # ---------------------------------------------------------------- reading a resumed fit
    @property
    def phase(self) -> str | None:
        """"score" or "dequantizer" when resuming, None for a fresh fit."""
        return None if self.payload is None else self.payload["meta"]["phase"]

    def seed(self, default: int) -> int:
        """The resumed fit's seed (so its split and initialisation match), else ``default``."""
        return default if self.payload is None else int(self.payload["meta"]["seed"])

    def restore_derived(self, est: Any) -> None:
        """Set what ``fit`` derived before training, exactly as the interrupted fit had it."""
        for key, value in self.payload["derived"].items():
            if isinstance(value, torch.Tensor):
                value = value.numpy()
            setattr(est, key, value)

    def loop(self, phase: str) -> dict[str, Any] | None:
        """The loop state to resume ``phase`` from (None: that phase starts afresh)."""
        if self.payload is None or self.phase != phase:
            return None
        return self.payload.get("loop")

    def score_state(self, est: Any) -> Any:
        """The finished score model's ``TrainState`` of a checkpoint in the dequantizer phase."""
        from ._params import resolve_optimizer
        from ._persistence import _restore_network

        score = self.payload["score"]
        _, state = _restore_network(
            score["blob"], est.sde_, est.device_, est._torch_dtype,
            resolve_optimizer(est)[1]
        )
        info = json.loads(score["info"])
        for key, value in info.items():
            setattr(state, key, value)
        state.best_state = score.get("best_state")
        return state

    # ---------------------------------------------------------------- writing
    def writer(
        self, est: Any, seed: int, phase: str, score_state: Any = None
    ) -> Callable[[dict[str, Any] | None], None]:
        """``write(loop_state)``: a checkpoint of ``phase`` at that loop state."""
        from ._persistence import _network_blob

        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "phase": phase, "seed": seed}
        derived = {}
        for key in _DERIVED:
            value = getattr(est, key)
            derived[key] = torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value
        score = None
        if score_state is not None:
            info = {
                k: getattr(score_state, k)
                for k in ("validation_scores", "validation_iters", "best_validation_score",
                          "stopped_early", "interrupted", "fit_time")
            }
            score = {
                "blob": _network_blob(score_state.ema_model, score_state),
                "info": json.dumps(info),
                "best_state": score_state.best_state,
            }

        def write(loop_state: dict[str, Any] | None) -> None:
            if self.follower:
                return
            payload = {"meta": json.dumps(meta), "derived": derived, "loop": loop_state}
            if score is not None:
                payload["score"] = score
            atomic_save(payload, self.path)

        return write

    def loop_kwargs(self, est: Any, seed: int, phase: str, score_state: Any = None) -> dict[str, Any]:
        """The training loop's ``checkpoint``, ``checkpoint_every`` and ``resume`` for ``phase``."""
        write = self.writer(est, seed, phase, score_state)
        resume = self.loop(phase)
        if phase == "dequantizer" and resume is None:
            write(None)  # the score model is done: never train it again on resume
        return {"checkpoint": None if self.follower else write,
                "checkpoint_every": int(est.checkpoint_every), "resume": resume}

    def remove(self) -> None:
        """Delete the file (the fit it belonged to has completed)."""
        if not self.follower:
            self.path.unlink(missing_ok=True)
