"""Model state <-> update tensors, and applying a delta: one implementation shared by the
learner's publisher (which keeps a copy of the *served* model) and the serving tier.

Tensor names: ``table`` (snapshot, ``[num_rows, chunk_dim]``), ``table.ids`` / ``table.rows``
(delta: touched rows), ``dense.<state_dict key>`` (every non-table parameter and buffer).
"""

from __future__ import annotations

import numpy as np
import torch

from ctr.online_learner.model import CTRModel
from ctr.online_learner.update_format import UpdateError

DENSE = "dense."
#: Buffers that are part of the hash definition (the model file format), never updated.
HASH_DEFINING = frozenset({"embedding.probe_seed"})


def dense_tensors(model: CTRModel) -> dict[str, np.ndarray]:
    return {DENSE + k: v.detach().cpu().numpy().copy() for k, v in model.dense_state_dict().items()}


def snapshot_tensors(model: CTRModel) -> dict[str, np.ndarray]:
    return {"table": model.table.detach().cpu().numpy().copy(), **dense_tensors(model)}


def delta_tensors(
    model: CTRModel, touched: np.ndarray, *, with_dense: bool = True, fp16: bool = False
) -> dict[str, np.ndarray]:
    idx = torch.as_tensor(touched, dtype=torch.int64, device=model.table.device)
    rows = model.table.detach().index_select(0, idx).cpu().numpy()
    out = {
        "table.ids": np.asarray(touched, dtype=np.int64),
        "table.rows": rows.astype(np.float16 if fp16 else np.float32),
    }
    if with_dense:
        out.update(dense_tensors(model))
    return out


def check_compatible(model: CTRModel, tensors: dict[str, np.ndarray]) -> None:
    """Raise :class:`UpdateError` unless every tensor fits ``model`` exactly (names, shapes,
    row ids in range) — checked before anything is written, so nothing is half-applied."""
    dense = model.dense_state_dict()
    rows, width = model.table.shape
    for name, arr in tensors.items():
        if name == "table":
            if tuple(arr.shape) != (rows, width):
                raise UpdateError(f"table shape {arr.shape} != model {(rows, width)}")
        elif name == "table.ids":
            if arr.ndim != 1 or arr.dtype != np.int64:
                raise UpdateError("table.ids must be 1-d int64")
            if arr.size and (arr.min() < 0 or arr.max() >= rows):
                raise UpdateError("table.ids out of range")
        elif name == "table.rows":
            if arr.ndim != 2 or arr.shape[1] != width or arr.shape[0] != tensors.get("table.ids", arr).shape[0]:
                raise UpdateError(f"table.rows shape {arr.shape} does not match ids / chunk width {width}")
            if not np.isfinite(arr).all():
                raise UpdateError("table.rows has non-finite values")
        elif name.startswith(DENSE):
            key = name[len(DENSE) :]
            if key not in dense:
                raise UpdateError(f"unknown dense tensor {key}")
            if tuple(arr.shape) != tuple(dense[key].shape):
                raise UpdateError(f"dense {key}: shape {arr.shape} != {tuple(dense[key].shape)}")
            if key in HASH_DEFINING and not np.array_equal(arr, dense[key].cpu().numpy()):
                raise UpdateError(f"{key} defines the hash and cannot change in an update")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise UpdateError(f"dense {key} has non-finite values")
        else:
            raise UpdateError(f"unknown tensor {name}")
    if ("table.ids" in tensors) != ("table.rows" in tensors):
        raise UpdateError("table.ids and table.rows come together")


@torch.no_grad()
def apply_tensors(model: CTRModel, tensors: dict[str, np.ndarray]) -> None:
    """Write a snapshot's or a delta's tensors into ``model`` (validate first)."""
    check_compatible(model, tensors)
    table = model.table
    if "table" in tensors:
        table.copy_(torch.from_numpy(tensors["table"]).to(table.device, table.dtype))
    if "table.ids" in tensors and len(tensors["table.ids"]):
        idx = torch.from_numpy(tensors["table.ids"]).to(table.device)
        table.index_copy_(0, idx, torch.from_numpy(tensors["table.rows"].astype(np.float32)).to(table.device))
    dense = {k[len(DENSE) :]: v for k, v in tensors.items() if k.startswith(DENSE)}
    if dense:
        state = model.dense_state_dict()
        for k, v in dense.items():
            state[k].copy_(torch.from_numpy(v).to(state[k].device, state[k].dtype))
