"""Embedding tables: the unified (multiplexed) table, its per-field baseline, dense numerics.

Both hashed tables share one storage layout -- a single ``[num_rows, chunk_dim]`` parameter --
and one interface, so the optimizer, the touched-row tracker and the delta publisher never need
to know which one is in use:

* ``bucket_ids(keys)``: uint64 keys ``[B, F]`` -> int32 row ids ``[B, P]`` (``P = sum_f k_f``);
* ``forward(ids)``: ``[B, P]`` -> ``[B, P * chunk_dim]`` (field ``f`` = its ``k_f`` chunks,
  contiguous, in field order);
* ``lookup(ids)``: the same, for training -- a :class:`RowLookup` holding the batch's *unique*
  rows as a leaf ``[U, chunk_dim]`` whose ``.grad`` (after backward) is the summed gradient per
  row that the sparse optimizer consumes (no dense ``[num_rows, c]`` gradient anywhere).

What differs is only the *addressing*:

* :class:`UnifiedEmbedding` (feature multiplexing, Coleman et al. 2023): every probe of every
  field hashes independently into the whole table;
* :class:`PerFieldHashEmbedding`: field ``f`` owns a private block of the same table and hashes
  once into it; its ``k_f`` chunks are ``k_f`` consecutive rows. Same parameter count (it *is*
  the same tensor shape), same field widths, no sharing between fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctr.online_learner.hashing import MAX_TABLE_BITS, ProbeLayout, hash_buckets
from ctr.online_learner.optim import scatter_add_rows, unique_rows

__all__ = [
    "DenseNumericEmbedding",
    "HashedChunkTable",
    "PerFieldHashEmbedding",
    "RowLookup",
    "UnifiedEmbedding",
    "signed_log1p",
]


def _as_key_tensor(keys: np.ndarray | Tensor) -> np.ndarray | Tensor:
    return keys if isinstance(keys, Tensor | np.ndarray) else np.asarray(keys, dtype=np.uint64)


class _ExpandCtx(Protocol):
    """What :class:`_ExpandRows` keeps on autograd's context (torch types the context ``Any``)."""

    num_rows: int

    def save_for_backward(self, *tensors: Tensor) -> None: ...

    @property
    def saved_tensors(self) -> tuple[Tensor, ...]: ...


class _ExpandRows(torch.autograd.Function):
    """``rows [U, c] -> rows[inverse] [M, c]``; backward sums the ``M`` gradients per row
    (numba scatter-add on CPU, faster than ``index_select``'s ``index_add_`` backward)."""

    @staticmethod
    def forward(ctx: _ExpandCtx, rows: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.num_rows = rows.shape[0]
        return rows.index_select(0, inverse)

    @staticmethod
    def backward(ctx: _ExpandCtx, grad: Tensor) -> tuple[Tensor, None]:
        (inverse,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.num_rows, grad.shape[1])
        return scatter_add_rows(out, inverse, grad), None


@dataclass
class RowLookup:
    """One batch's table rows for a sparse training step.

    Attributes:
        ids: int64 ``[U]`` sorted unique row ids of the batch (what the step touches).
        rows: ``[U, chunk_dim]`` detached copy of those rows, a leaf that requires grad; after
            ``backward()`` its ``.grad`` holds the per-row sum of the batch's gradients.
        chunks: ``[B, P, chunk_dim]`` = ``rows[inverse]``, the model input (differentiable).
    """

    ids: Tensor
    rows: Tensor
    chunks: Tensor


class HashedChunkTable(nn.Module):
    """Base: one ``[num_rows, chunk_dim]`` table looked up ``P`` times per example.

    Args:
        layout: fields and probe counts ``k_f`` (``layout.table_bits`` sizes the unified table).
        chunk_dim: width ``c`` of one chunk; field ``f``'s embedding is ``k_f * c`` wide.
        init_std: rows start ``N(0, init_std^2)``.
    """

    # buffers (register_buffer): declared so they type as Tensor, not as nn.Module.__getattr__'s union
    probe_seed: Tensor

    def __init__(self, layout: ProbeLayout, chunk_dim: int, num_rows: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.layout = layout
        self.chunk_dim = int(chunk_dim)
        self.table = nn.Parameter(torch.empty(num_rows, self.chunk_dim).normal_(0.0, init_std))
        # Part of the checkpoint so a reader can check it hashes the same way.
        self.register_buffer("probe_seed", torch.from_numpy(layout.probe_seed.view(np.int64).copy()))

    @property
    def num_rows(self) -> int:
        return self.table.shape[0]

    @property
    def total_probes(self) -> int:
        return self.layout.total_probes

    @property
    def output_dim(self) -> int:
        return self.layout.total_probes * self.chunk_dim

    @property
    def field_widths(self) -> list[int]:
        """Width ``k_f * chunk_dim`` of each field's embedding, in field order."""
        return [k * self.chunk_dim for k in self.layout.probes]

    def bucket_ids(self, keys: np.ndarray | Tensor) -> Tensor:
        """uint64 keys ``[B, F]`` -> int32 row ids ``[B, P]`` (on the keys' device)."""
        raise NotImplementedError

    def forward(self, ids: Tensor) -> Tensor:
        """Row ids ``[B, P]`` -> concatenated field embeddings ``[B, P * chunk_dim]`` (autograd)."""
        return F.embedding(ids, self.table).flatten(1)

    def lookup(self, ids: Tensor) -> RowLookup:
        """Row ids ``[B, P]`` -> :class:`RowLookup` (unique rows read once, in address order)."""
        uniq, inverse = unique_rows(ids, self.num_rows)
        rows = self.table.detach().index_select(0, uniq).requires_grad_(True)
        chunks = _ExpandRows.apply(rows, inverse).view(*ids.shape, self.chunk_dim)
        return RowLookup(uniq, rows, chunks)


class UnifiedEmbedding(HashedChunkTable):
    """One table shared by all fields; probe ``p`` of field ``f`` -> ``bucket(key, seed_fp)``.

    Table ``[2**table_bits, chunk_dim]``. Field ``f`` with ``k_f`` probes gets the concatenation of
    ``k_f`` independently hashed chunks: a collision on one probe perturbs only ``1/k_f`` of the
    field embedding, and because every field reads the same rows the capacity goes where the
    traffic is (hot fields/values) instead of being split up front.

    >>> from ctr.online_learner.hashing import ProbeLayout
    >>> emb = UnifiedEmbedding(ProbeLayout.build(["site", "ad"], probes={"site": 1, "ad": 3}, table_bits=8), 4)
    >>> ids = emb.bucket_ids(np.array([[1, 2], [3, 4]], dtype=np.uint64))
    >>> ids.shape, emb(ids).shape, emb.field_widths
    (torch.Size([2, 4]), torch.Size([2, 16]), [4, 12])
    """

    def __init__(self, layout: ProbeLayout, chunk_dim: int, init_std: float = 0.01) -> None:
        super().__init__(layout, chunk_dim, layout.num_buckets, init_std)

    def bucket_ids(self, keys: np.ndarray | Tensor) -> Tensor:
        ids = hash_buckets(_as_key_tensor(keys), self.layout)
        return torch.from_numpy(ids) if isinstance(ids, np.ndarray) else ids


def allocate_field_rows(probes: tuple[int, ...], num_rows: int) -> tuple[list[int], int]:
    """Split ``num_rows`` chunk rows into per-field blocks of ``rows_f`` field-rows (``k_f`` chunks each).

    Equal field-rows per field (``num_rows // sum(k)``), then the leftover chunk rows go one
    field-row at a time to the narrowest fields. Returns ``(rows_f, unused_chunk_rows)``;
    ``unused < min(k_f)`` (0 whenever ``gcd(k) | num_rows``, e.g. power-of-two sizes and k's).

    >>> allocate_field_rows((2, 2, 1), 16)
    ([3, 3, 4], 0)
    """
    total = sum(probes)
    if num_rows < total:
        raise ValueError(f"{num_rows} rows cannot hold one row per probe ({total})")
    rows = [num_rows // total] * len(probes)
    left = num_rows - sum(r * k for r, k in zip(rows, probes, strict=True))
    order = sorted(range(len(probes)), key=lambda f: (probes[f], f))
    progressed = True
    while progressed:
        progressed = False
        for f in order:
            if probes[f] <= left:
                rows[f] += 1
                left -= probes[f]
                progressed = True
    return rows, left


class PerFieldHashEmbedding(HashedChunkTable):
    """Baseline: a private hashed table per field, same total parameter budget as the unified one.

    Storage is the same ``[2**table_bits, chunk_dim]`` tensor, cut into per-field blocks;
    field ``f`` has ``rows_f`` rows of width ``k_f * chunk_dim`` (stored as ``k_f`` consecutive
    chunks). One hash per field (the field's first-probe seed, 31-bit) picks the row:
    ``row = offset_f + (h % rows_f) * k_f + j`` for chunk ``j``.

    >>> from ctr.online_learner.hashing import ProbeLayout
    >>> layout = ProbeLayout.build(["site", "ad"], probes={"site": 1, "ad": 3}, table_bits=8)
    >>> pf, ue = PerFieldHashEmbedding(layout, 4), UnifiedEmbedding(layout, 4)
    >>> pf.table.numel() == ue.table.numel(), pf(pf.bucket_ids(np.ones((2, 2), np.uint64))).shape
    (True, torch.Size([2, 16]))
    """

    # buffers (register_buffer): declared so they type as Tensor, not as nn.Module.__getattr__'s union
    _rows: Tensor
    _k: Tensor
    _offset: Tensor
    _probe_field: Tensor
    _probe_index: Tensor

    def __init__(self, layout: ProbeLayout, chunk_dim: int, init_std: float = 0.01) -> None:
        super().__init__(layout, chunk_dim, layout.num_buckets, init_std)
        self.field_rows, self.unused_rows = allocate_field_rows(layout.probes, layout.num_buckets)
        offsets = np.concatenate([[0], np.cumsum(np.multiply(self.field_rows, layout.probes))])
        self.hash_layout = ProbeLayout(layout.fields, (1,) * layout.num_fields, MAX_TABLE_BITS, layout.hash_seed)
        probe_index = np.concatenate([np.arange(k) for k in layout.probes])
        self.register_buffer("_rows", torch.tensor(self.field_rows, dtype=torch.int64), persistent=False)
        self.register_buffer("_k", torch.tensor(layout.probes, dtype=torch.int64), persistent=False)
        self.register_buffer("_offset", torch.from_numpy(offsets[:-1].astype(np.int64)), persistent=False)
        self.register_buffer("_probe_field", torch.from_numpy(layout.probe_field.astype(np.int64)), persistent=False)
        self.register_buffer("_probe_index", torch.from_numpy(probe_index.astype(np.int64)), persistent=False)

    def bucket_ids(self, keys: np.ndarray | Tensor) -> Tensor:
        h = hash_buckets(_as_key_tensor(keys), self.hash_layout)  # [B, F] in [0, 2**31)
        h = (torch.from_numpy(h) if isinstance(h, np.ndarray) else h).long()
        base = self._offset + (h % self._rows) * self._k  # [B, F] first chunk row of the field-row
        return (base.index_select(1, self._probe_field) + self._probe_index).int()


def signed_log1p(x: Tensor) -> Tensor:
    """``sign(x) log1p|x|`` elementwise (heavy-tailed counts), missing (NaN / inf) as 0:
    ``[B, F] -> [B, F]``."""
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    return torch.sign(x) * torch.log1p(x.abs())


class DenseNumericEmbedding(nn.Module):
    """Numeric fields as dense per-field embeddings (the alternative to bucketising them).

    ``e_f = t(x_f) * w_f + b_f`` with ``t(x) = sign(x) log1p(|x|)`` (heavy-tailed counts);
    a missing value (NaN) gets a learned ``m_f`` instead.

    Args:
        num_fields: ``F_num``.
        width: embedding width per numeric field.

    Shapes: ``x [B, F_num]`` (float, NaN = missing) -> ``[B, F_num * width]``.

    >>> DenseNumericEmbedding(3, 8)(torch.tensor([[1.0, float("nan"), -2.0]])).shape
    torch.Size([1, 24])
    """

    def __init__(self, num_fields: int, width: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.num_fields = num_fields
        self.width = width
        self.weight = nn.Parameter(torch.empty(num_fields, width).normal_(0.0, init_std))
        self.bias = nn.Parameter(torch.zeros(num_fields, width))
        self.missing = nn.Parameter(torch.empty(num_fields, width).normal_(0.0, init_std))

    @property
    def output_dim(self) -> int:
        return self.num_fields * self.width

    def forward(self, x: Tensor) -> Tensor:
        present = torch.isfinite(x)
        e = signed_log1p(x).unsqueeze(-1) * self.weight + self.bias  # [B, F_num, width]
        e = torch.where(present.unsqueeze(-1), e, self.missing)
        return e.flatten(1)
