"""Nested state (model, optimizers, trainer bookkeeping) to and from the update format.

Checkpoints and snapshots never use pickle (``torch.save``/``torch.load`` would): tensors go
into the checksummed, dtype-whitelisted update format of :mod:`ctr.online_learner.update_format`
and everything else into its JSON header. Files are written atomically (temp file, fsync,
rename, fsync of the directory), so a ``kill -9`` leaves either the old file or the new one.

>>> import torch
>>> state = {"step": 3, "w": torch.ones(2, 2), "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}], "by_id": {0: 1.5}}
>>> tensors, meta = flatten_state(state)
>>> sorted(tensors), unflatten_state(tensors, meta)["by_id"]
(['w'], {0: 1.5})
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctr.online_learner.update_format import UpdateHeader, decode_update, encode_update

_TENSOR = "__tensor__"
_DICT = "__dict__"
_TUPLE = "__tuple__"


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, np.ndarray], Any]:
    """Split ``obj`` into named numpy tensors and a JSON-able skeleton that references them."""
    tensors: dict[str, np.ndarray] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            arr = x.detach().cpu()
            if arr.dtype == torch.bfloat16:
                arr = arr.float()
            tensors[path] = arr.numpy().copy() if arr.dim() else arr.reshape(1).numpy().copy()
            return {_TENSOR: path, "scalar": arr.dim() == 0, "dtype": str(x.dtype).removeprefix("torch.")}
        if isinstance(x, np.ndarray):
            tensors[path] = np.ascontiguousarray(x)
            return {_TENSOR: path, "numpy": True}
        if isinstance(x, dict):
            return {_DICT: [[k, walk(v, f"{path}.{k}" if path else str(k))] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {_TUPLE: [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store {type(x).__name__} at {path!r} in a checkpoint")

    return tensors, walk(obj, prefix)


def unflatten_state(tensors: dict[str, np.ndarray], meta: Any) -> Any:
    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if _TENSOR in x:
                arr = tensors[x[_TENSOR]]
                if x.get("numpy"):
                    return arr
                t = torch.from_numpy(arr.copy()).to(getattr(torch, x.get("dtype", "float32")))
                return t.reshape(()) if x.get("scalar") else t
            if _DICT in x:
                return {k: walk(v) for k, v in x[_DICT]}
            if _TUPLE in x:
                return tuple(walk(v) for v in x[_TUPLE])
            raise ValueError("malformed state skeleton")
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(meta)


def atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def save_state(path: Path, header: UpdateHeader, state: Any) -> int:
    """Write ``state`` (nested dicts of tensors and plain values) atomically; returns bytes."""
    tensors, meta = flatten_state(state)
    import msgspec

    header = msgspec.structs.replace(header, model_config={**header.model_config, "state": meta})
    data = encode_update(header, tensors)
    atomic_write(path, data)
    return len(data)


def load_state(path: Path) -> tuple[UpdateHeader, Any]:
    """Read and fully validate a file written by :func:`save_state`."""
    header, tensors = decode_update(Path(path).read_bytes())
    return header, unflatten_state(tensors, header.model_config.get("state"))
