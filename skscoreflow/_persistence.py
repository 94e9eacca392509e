"""Persistence of a fitted :class:`~skscoreflow.ScoreFlowDensity`.

Two formats share one "network blob" (CPU state dicts and JSON configs, never live modules):

* pickle / joblib (``__getstate__`` / ``__setstate__``): the estimator's ``__dict__`` with the
  modules replaced by the blob, so a model trained on a GPU loads on a CPU-only machine;
* ``save`` / ``load``: a ``torch.save`` of ``{"meta": JSON text, "network": blob}``, readable
  with ``torch.load(weights_only=True)``: loading runs no code.  Only what JSON and tensors can
  hold travels, so a user-defined SDE class needs pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any

import numpy as np
import torch

from ._checkpoint import atomic_save
from ._params import _DTYPES, resolve_optimizer, structure
from .dequantization import VariationalDequantizer
from .nets import network_from_config
from .sde import SDE, get_sde
from .training import TrainState, _seeded_global_rng

__all__: list[str] = []

#: 2: an SDE-instance parameter is stored as ``{"__sde__": {name, config}}`` (1 had none).
FORMAT_VERSION = 2
#: Fitted array attributes restored from JSON lists by ``load``.
_ARRAYS = ("mean_", "scale_", "data_min_", "data_max_", "feature_names_in_",
           "reference_covariance_")


def _cpu(obj: Any) -> Any:
    """Detached CPU copies of every tensor in a nested dict / list / tuple."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _network_blob(net: torch.nn.Module, train_state: TrainState | None) -> dict[str, Any]:
    blob: dict[str, Any] = {"config": json.dumps(net.config()), "ema": _cpu(net.state_dict())}
    if train_state is not None:
        blob["raw"] = _cpu(train_state.model.state_dict())
        blob["optimizer"] = _cpu(train_state.optimizer.state_dict())
        blob["n_iter"] = int(train_state.n_iter)
        blob["loss_curve"] = [float(v) for v in train_state.loss_curve]
    return blob


def _restore_network(
    blob: dict[str, Any], sde: SDE, device: torch.device, dtype: torch.dtype, lr: float
) -> tuple[torch.nn.Module, TrainState | None]:
    # The estimator's own SDE object, which may be a user's subclass.
    cfg = json.loads(blob["config"])
    # Cast before loading: a float32-built module would round float64 weights on the way in.
    ema = network_from_config(cfg, sde=sde).to(device=device, dtype=dtype)
    ema.load_state_dict(blob["ema"])
    ema = ema.eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    if "raw" not in blob:
        return ema, None
    raw = network_from_config(cfg, sde=sde).to(device=device, dtype=dtype)
    raw.load_state_dict(blob["raw"])
    optimizer = torch.optim.Adam(raw.parameters(), lr=lr)
    optimizer.load_state_dict(blob["optimizer"])
    train_state = TrainState(
        model=raw,
        ema_model=ema,
        optimizer=optimizer,
        n_iter=int(blob.get("n_iter", 0)),
        loss_curve=list(blob.get("loss_curve", [])),
    )
    return ema, train_state


def get_state(est: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The pickled state: ``state`` (a copy of ``__dict__``) with modules as a CPU blob."""
    state = dict(state)
    # partial_fit's dequantizer optimizer: live modules (possibly CUDA); a continued
    # partial_fit after unpickling restarts that optimizer on the same weights.
    state.pop("_deq_state", None)
    if "network_" not in state:
        return state
    # Store CPU state dicts, never live (possibly CUDA) modules: a model trained on a GPU must
    # load on a CPU-only machine.
    state.pop("network_")
    blob = _network_blob(est.network_, state.pop("_train_state", None))
    deq = state.pop("dequantizer_", None)
    if deq is not None:
        blob["dequantizer"] = {"config": json.dumps(deq.config()), "state": _cpu(deq.state_dict())}
    state["_network_blob"] = blob
    state["device_"] = str(est.device_)
    return state


def restore_modules(est: Any, blob: dict[str, Any] | None) -> None:
    """Rebuild the modules of ``est`` (whose ``__dict__`` is restored) from a network blob.

    Falls back to the CPU, with a warning, for a model trained on a GPU when CUDA is missing.
    """
    if blob is None:
        return
    device = torch.device(est.device_)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            f"model was trained on {device} but CUDA is not available; loading on CPU",
            RuntimeWarning,
        )
        device = torch.device("cpu")
    est.device_ = device
    if isinstance(est.sde_, dict):  # written by save()
        sde_cfg = dict(est.sde_)
        est.sde_ = get_sde(sde_cfg.pop("name"), **sde_cfg)
    dtype = _DTYPES[est.dtype]
    # Building the modules draws initial weights (and Fourier frequencies) from the global RNG
    # before the stored values overwrite them: fork it so loading leaves it untouched.
    with _seeded_global_rng(0, torch.device("cpu")):
        est.network_, est._train_state = _restore_network(
            blob, est.sde_, device, dtype, resolve_optimizer(est)[1]
        )
        est.dequantizer_ = None
        if blob.get("dequantizer") is not None:
            deq = VariationalDequantizer(**json.loads(blob["dequantizer"]["config"]))
            deq = deq.to(device=device, dtype=dtype)
            deq.load_state_dict(blob["dequantizer"]["state"])
            est.dequantizer_ = deq.eval()


def _sde_config(sde: SDE) -> dict[str, Any]:
    """``{"name": ..., **config}`` of a built-in SDE; a ``ValueError`` for any other class."""
    try:
        rebuilt = get_sde(sde.name, **sde.config())
    except (ValueError, TypeError):
        rebuilt = None
    if type(rebuilt) is not type(sde):
        raise ValueError(
            f"save() stores only the built-in SDEs as data; {type(sde).__name__} is a "
            "user-defined SDE: persist this estimator with pickle or joblib instead"
        )
    return {"name": sde.name, **sde.config()}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, SDE):
        return {"__sde__": _sde_config(obj)}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.device):
        return str(obj)
    if isinstance(obj, np.random.RandomState):
        return None  # a generator's state is not data; the loaded estimator gets None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _from_json_param(value: Any) -> Any:
    if isinstance(value, dict) and "__sde__" in value:
        cfg = dict(value["__sde__"])
        return get_sde(cfg.pop("name"), **cfg)
    # JSON turns tuples into lists: restore them so get_params() round-trips.
    return tuple(value) if isinstance(value, list) else value


def _digest(obj: Any, h: Any) -> None:
    """Feed a canonical serialisation of a nested blob (tensors by dtype, shape, bytes) to ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=str):
            h.update(f"K{type(key).__name__}:{key}".encode())
            _digest(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{type(obj).__name__}{len(obj)}".encode())
        for value in obj:
            _digest(value, h)
    else:
        h.update(f"V{json.dumps(obj)}".encode())


def _checksum(meta: dict[str, Any], blob: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    _digest(blob, h)
    return h.hexdigest()


def save(est: Any, path: str | os.PathLike) -> None:
    """Write ``est`` (fitted) to ``path`` atomically, as tensors and JSON text with a checksum."""
    from . import __version__

    state = get_state(est, est.__dict__)
    blob = state.pop("_network_blob")
    state["sde_"] = _sde_config(est.sde_)
    meta = {
        "format_version": FORMAT_VERSION,
        "class": type(est).__name__,
        "skscoreflow_version": __version__,
        "torch_version": torch.__version__,
        "params": _jsonable(est.get_params()),
        "fitted": _jsonable({k: v for k, v in state.items() if k.endswith("_")}),
    }
    meta["checksum"] = _checksum(meta, blob)
    atomic_save({"meta": json.dumps(meta), "network": blob}, path)


def load(cls: type, path: str | os.PathLike) -> Any:
    """Read a file written by :func:`save` (``weights_only``: no code runs).

    Anything but an intact model file (a directory, a torn or altered file, a pickle, a file of
    a newer format or of another class) gives a ``ValueError`` naming the problem; a missing
    file gives ``FileNotFoundError``.
    """
    if os.path.isdir(path):
        raise ValueError(f"{path!s} is a directory, not a skscoreflow model file")
    try:
        with warnings.catch_warnings():  # torch's own remarks on a file it then refuses
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torn, not a torch file, or one holding more than tensors
        raise ValueError(
            f"{path!s} is not a readable skscoreflow model file (torch.load failed: "
            f"{type(exc).__name__})"
        ) from exc
    if not isinstance(data, dict) or "meta" not in data or "network" not in data:
        raise ValueError(f"{path!s} is not a skscoreflow model file")
    try:
        meta = json.loads(data["meta"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path!s} is not a skscoreflow model file (bad metadata)") from exc
    if not isinstance(meta, dict) or not isinstance(data["network"], dict):
        raise ValueError(f"{path!s} is not a skscoreflow model file (bad metadata)")
    if meta.get("class") != cls.__name__:
        raise ValueError(f"{path!s} holds a {meta.get('class')!r}, not a {cls.__name__}")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{path!s} is not a skscoreflow model file (bad format version)")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path!s} was written by a newer skscoreflow (format {version}); upgrade to load it"
        )
    # Files since format 2 carry a checksum of their content (format 1 files have none); an
    # altered key must not turn the check off, so any file that has one is checked too.
    if version >= 2 or "checksum" in meta:
        try:
            intact = meta.get("checksum") == _checksum(meta, data["network"])
        except Exception:  # content no model file holds (sets, bytes, sparse tensors, ...)
            intact = False
        if not intact:
            raise ValueError(f"{path!s} is corrupted (its content does not match its checksum)")
    try:
        params = {k: _from_json_param(v) for k, v in meta["params"].items()}
        est = cls(**params)
        state = dict(meta["fitted"])
        for key in _ARRAYS:
            if state.get(key) is not None:
                dtype = object if key == "feature_names_in_" else np.float64
                state[key] = np.asarray(state[key], dtype=dtype)
        # JSON has no tuples: the image shape and the U-Net's sizes are tuples when fitted.
        if state.get("image_shape_") is not None:
            state["image_shape_"] = tuple(state["image_shape_"])
        if state.get("unet_sizes_") is not None:
            state["unet_sizes_"] = {k: tuple(v) if isinstance(v, list) else v
                                    for k, v in state["unet_sizes_"].items()}
        state["_network_blob"] = data["network"]
        est.__setstate__(state)
        est._fitted_structure = structure(est)
    except Exception as exc:  # well-formed but inconsistent content
        raise ValueError(
            f"{path!s} is not a valid skscoreflow model file ({type(exc).__name__}: {exc})"
        ) from exc
    return est
