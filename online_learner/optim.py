"""Sparse updates: row-wise Adagrad for the embedding table, a dense optimizer for the rest,
and the set of rows touched since the last publish.

Why hand-rolled instead of ``nn.Embedding(sparse=True)`` + ``torch.optim.SparseAdam``/``Adagrad``:
a batch of ``B`` examples touches ``M = B * P`` table rows with many duplicates, scattered over
a table far bigger than the CPU caches. The step is organised around that:

1. :func:`unique_rows` deduplicates the batch's row ids (numba LSD radix sort;
   ``torch.unique`` on GPU) -> sorted unique ids ``[U]`` and ``inverse [M]``;
2. the forward pass reads the ``U`` rows once, in address order, into a leaf ``[U, c]`` and
   expands it with ``rows[inverse]`` (``HashedChunkTable.lookup``); autograd's backward of that
   index is an ``index_add`` -- the leaf's ``.grad`` is already the per-row *sum* of gradients;
3. :meth:`RowWiseAdagrad.step_unique` walks the ``U`` rows in address order once more.

No sparse COO tensor, no coalesce, no dense ``[num_rows, c]`` gradient, and no random DRAM
access per occurrence (on a large table that alone dominated the step;
``bench/learner_core.py`` times the alternatives).

Row-wise Adagrad (as FBGEMM/TorchRec ``ROWWISE_ADAGRAD``): one accumulator per row,
``acc_r += mean_j g_rj^2``; ``w_r -= lr * g_r / (sqrt(acc_r) + eps)``. One float of state per row
instead of ``c`` (Adagrad) or ``2c`` (Adam), and rows that were not in the batch are not read or
written at all -- they stay bit-identical, which is what lets a publisher ship only touched rows.

>>> table = torch.zeros(8, 2)
>>> opt, touched = RowWiseAdagrad(table, lr=0.1), TouchedRows(8)
>>> ids = torch.tensor([3, 5, 3])
>>> opt.step(ids, torch.ones(3, 2))  # duplicates are summed: row 3 gets [2, 2]
>>> touched.add(ids)
>>> touched.take().tolist(), bool((table[[0, 1, 2, 4, 6, 7]] == 0).all()), touched.take().tolist()
([3, 5], True, [])
>>> uniq, inverse = unique_rows(torch.tensor([7, 2, 7, 0]), num_rows=8)
>>> uniq.tolist(), inverse.tolist()
([0, 2, 7], [2, 1, 2, 0])
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any, Literal

import numba
import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["FlatAdagrad", "RowWiseAdagrad", "TouchedRows", "dense_optimizer", "unique_rows"]


_RADIX_BITS = 11


# ``cache=True``: compiled kernels are kept in __pycache__ and reused while this file keeps
# its size and mtime; they record the module's import name, so a rename must change the file
# (this note came with the move under ``ctr``: caches from before it failed to load).
@numba.njit(nogil=True, boundscheck=False, cache=True)
def _unique_inverse_cpu(ids, key_bits):
    """Sorted unique ids and inverse of ``ids`` (non-negative, < 2**key_bits): LSD radix sort of
    (id, position) pairs, 11 bits per pass, then one scan."""
    n = ids.shape[0]
    keys = ids.astype(np.int32)  # 32-bit keys and positions: half the memory traffic of int64
    pos = np.arange(n).astype(np.int32)
    keys_b = np.empty_like(keys)
    pos_b = np.empty_like(pos)
    radix = 1 << _RADIX_BITS
    shift = 0
    while shift < key_bits:
        count = np.zeros(radix + 1, np.int64)
        for i in range(n):
            count[((keys[i] >> shift) & (radix - 1)) + 1] += 1
        for d in range(radix):
            count[d + 1] += count[d]
        for i in range(n):
            d = (keys[i] >> shift) & (radix - 1)
            j = count[d]
            keys_b[j] = keys[i]
            pos_b[j] = pos[i]
            count[d] = j + 1
        keys, keys_b = keys_b, keys
        pos, pos_b = pos_b, pos
        shift += _RADIX_BITS
    uniq = np.empty(n, np.int64)
    inverse = np.empty(n, np.int64)
    u = -1
    prev = -1
    for i in range(n):
        k = keys[i]
        if k != prev:
            u += 1
            uniq[u] = k
            prev = k
        inverse[pos[i]] = u
    return uniq[: u + 1].copy(), inverse


def unique_rows(ids: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """``ids [M]`` (any int dtype, values in ``[0, num_rows)``) -> (sorted unique int64 ``[U]``,
    int64 ``inverse [M]`` with ``ids == unique[inverse]``). CPU: numba radix sort; GPU: torch."""
    flat = ids.reshape(-1)
    if flat.device.type != "cpu":
        uniq, inverse = torch.unique(flat.long(), sorted=True, return_inverse=True)
        return uniq, inverse
    if flat.numel() == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    key_bits = max(1, int(num_rows - 1).bit_length())
    if key_bits > 31 or flat.numel() >= 2**31:
        uniq, inverse = torch.unique(flat.long(), sorted=True, return_inverse=True)
        return uniq, inverse
    uniq, inverse = _unique_inverse_cpu(flat.numpy(), key_bits)
    return torch.from_numpy(uniq), torch.from_numpy(inverse)


@numba.njit(nogil=True, boundscheck=False, cache=True)
def _scatter_add_rows_cpu(out, index, grads):
    """``out[index[m]] += grads[m]`` (the backward of ``rows[index]``), faster than torch's
    ``index_add_`` on CPU (``bench/learner_core.py``)."""
    for m in range(index.shape[0]):
        r = index[m]
        for j in range(grads.shape[1]):
            out[r, j] += grads[m, j]


def scatter_add_rows(out: Tensor, index: Tensor, grads: Tensor) -> Tensor:
    """In place ``out[index[m]] += grads[m]`` for ``out [U, c]``, ``index [M]``, ``grads [M, c]``."""
    if out.device.type == "cpu" and out.dtype == grads.dtype == torch.float32 and out.is_contiguous():
        _scatter_add_rows_cpu(out.numpy(), index.numpy(), grads.contiguous().numpy())
        return out
    return out.index_add_(0, index, grads)


@numba.njit(nogil=True, boundscheck=False, cache=True, inline="always")
def _update_row(table, acc, r, g, lr, eps):
    """``acc[r] += mean(g^2)``; ``table[r] -= lr * g / (sqrt(acc[r]) + eps)``; a zero ``g`` changes nothing."""
    dim = g.shape[0]
    s = np.float32(0.0)
    for j in range(dim):
        s += g[j] * g[j]
    if s == 0.0:
        return
    a = acc[r] + s / np.float32(dim)
    acc[r] = a
    scale = lr / (np.sqrt(a) + eps)
    for j in range(dim):
        table[r, j] -= scale * g[j]


@numba.njit(nogil=True, boundscheck=False, cache=True)
def _rowwise_adagrad_unique_cpu(table, acc, ids, grads, lr, eps):
    """One row-wise Adagrad update per (unique) row ``ids[u]`` with gradient ``grads[u]``."""
    for u in range(grads.shape[0]):
        _update_row(table, acc, ids[u], grads[u], lr, eps)


@numba.njit(nogil=True, boundscheck=False, cache=True)
def _rowwise_adagrad_cpu(table, acc, scratch, ids, grads, lr, eps):
    """CPU kernel: sum duplicate rows' grads in ``scratch``, then update each row once.

    The first occurrence of a row applies the summed gradient and zeroes its scratch row;
    later occurrences then see a zero gradient, which leaves ``acc`` and the row unchanged
    (``x - 0.0 == x`` exactly), so every touched row is updated exactly once.
    """
    m_total, dim = grads.shape
    for m in range(m_total):
        r = ids[m]
        for j in range(dim):
            scratch[r, j] += grads[m, j]
    for m in range(m_total):
        r = ids[m]
        _update_row(table, acc, r, scratch[r], lr, eps)
        for j in range(dim):
            scratch[r, j] = 0.0


class RowWiseAdagrad:
    """Row-wise Adagrad on a ``[num_rows, dim]`` table, updating only the given rows.

    Args:
        table: the table tensor (a Parameter's data is fine; updated in place, no autograd).
        lr: learning rate.
        eps: added to ``sqrt(acc)``.
        initial_accumulator: starting value of every row's accumulator.
    """

    def __init__(self, table: Tensor, lr: float = 0.05, eps: float = 1e-8, initial_accumulator: float = 0.0):
        self.table = table.data if isinstance(table, nn.Parameter) else table
        self.lr = float(lr)
        self.eps = float(eps)
        self.acc = torch.full((self.table.shape[0],), float(initial_accumulator), device=self.table.device)
        self._scratch_buf: Tensor | None = None  # step() with duplicate ids only; all-zero between steps

    @property
    def _scratch(self) -> Tensor:
        if self._scratch_buf is None:
            self._scratch_buf = torch.zeros_like(self.table)
        return self._scratch_buf

    def _cpu_kernels(self) -> bool:
        return self.table.device.type == "cpu" and self.table.dtype == torch.float32 and self.table.is_contiguous()

    @torch.no_grad()
    def step_unique(self, ids: Tensor, grads: Tensor) -> None:
        """Update rows ``ids [U]`` (unique; sorted is fastest) with their summed gradients ``grads [U, dim]``."""
        if self._cpu_kernels():
            _rowwise_adagrad_unique_cpu(
                self.table.numpy(),
                self.acc.numpy(),
                ids.reshape(-1).numpy(),
                grads.float().contiguous().numpy(),
                np.float32(self.lr),
                np.float32(self.eps),
            )
            return
        ids = ids.reshape(-1).long()
        acc = self.acc.index_select(0, ids).add_(grads.square().mean(1))
        self.acc.index_copy_(0, ids, acc)
        step = grads * (self.lr / (acc.sqrt_().add_(self.eps))).unsqueeze(1)
        self.table.index_copy_(0, ids, self.table.index_select(0, ids).sub_(step))

    @torch.no_grad()
    def step(self, ids: Tensor, grads: Tensor) -> None:
        """Apply per-occurrence gradients ``grads [M, dim]`` of rows ``ids [M]`` (duplicates summed)."""
        grads = grads.reshape(ids.numel(), -1)
        if self._cpu_kernels():
            # one fused njit pass over a persistent scratch buffer instead of ~8 torch index ops
            _rowwise_adagrad_cpu(
                self.table.numpy(),
                self.acc.numpy(),
                self._scratch.numpy(),
                ids.reshape(-1).numpy(),
                grads.float().contiguous().numpy(),
                np.float32(self.lr),
                np.float32(self.eps),
            )
            return
        self._step_torch(ids.reshape(-1).long(), grads)

    def _step_torch(self, ids: Tensor, grads: Tensor) -> None:
        """Device-agnostic version (GPU): same maths with index ops; duplicates write equal values."""
        scratch = self._scratch
        scratch.index_add_(0, ids, grads)
        g = scratch.index_select(0, ids)  # [M, dim]: the row's total gradient, per occurrence
        scratch.index_fill_(0, ids, 0.0)
        acc = self.acc.index_select(0, ids).add_(g.square().mean(1))  # [M]
        # Duplicates write identical values, so the result does not depend on write order.
        self.acc.index_copy_(0, ids, acc)
        step = g.mul_((self.lr / (acc.sqrt_().add_(self.eps))).unsqueeze(1))
        self.table.index_copy_(0, ids, self.table.index_select(0, ids).sub_(step))

    def state_dict(self) -> dict[str, Any]:
        return {"acc": self.acc.clone(), "lr": self.lr, "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.acc.copy_(state["acc"])
        self.lr = float(state["lr"])
        self.eps = float(state["eps"])


class TouchedRows:
    """Rows updated since the last :meth:`take` (what the next delta must ship).

    A boolean mask over the table: :meth:`add` is one scatter per batch, :meth:`take` one
    ``nonzero`` (already sorted and unique) and a reset. Thread-safe, so a publisher thread
    may ``take()`` while the trainer thread keeps adding.
    """

    def __init__(self, num_rows: int, device: torch.device | str = "cpu") -> None:
        self._mask = torch.zeros(num_rows, dtype=torch.bool, device=device)
        self._lock = threading.Lock()

    def add(self, ids: Tensor | np.ndarray | Iterable[int]) -> None:
        """Mark rows ``ids`` (any shape, duplicates fine) as touched."""
        ids = torch.as_tensor(ids if not isinstance(ids, np.ndarray) else ids.astype(np.int64))
        with self._lock:
            self._mask.index_fill_(0, ids.reshape(-1).long().to(self._mask.device), True)

    def peek(self) -> np.ndarray:
        """Sorted unique int64 ids touched so far, without resetting."""
        with self._lock:
            return self._mask.nonzero().squeeze(1).cpu().numpy()

    def take(self) -> np.ndarray:
        """Sorted unique int64 ids touched since the last ``take()``; resets the set."""
        with self._lock:
            ids = self._mask.nonzero().squeeze(1)
            self._mask.index_fill_(0, ids, False)
        return ids.cpu().numpy()

    def __len__(self) -> int:
        with self._lock:
            return int(self._mask.sum())


class FlatAdagrad:
    """Adagrad (``torch.optim.Adagrad``'s maths, ``eps`` 1e-10) over parameters that live in one
    flat buffer.

    The parameters' ``.data`` and ``.grad`` become views of a flat ``[N]`` buffer each, so a
    step is four whole-buffer ops whatever the number of tensors, and ``zero_grad`` one fill:
    at the ~20 small tensors of this model, and the steps of one to a few dozen examples a
    fresh learner takes, torch's optimizer spent more time walking its parameter groups than
    computing. Autograd accumulates into an existing ``.grad`` in place, so the views stay.

    >>> w = nn.Parameter(torch.ones(2, 2)); b = nn.Parameter(torch.zeros(2))
    >>> opt = FlatAdagrad([w, b], lr=0.5)
    >>> (w.sum() + 2 * b.sum()).backward(); opt.step()
    >>> w.tolist(), b.tolist()
    ([[0.5, 0.5], [0.5, 0.5]], [-0.5, -0.5])
    >>> opt.zero_grad(); float(w.grad.abs().sum())
    0.0
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 0.01, eps: float = 1e-10) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("FlatAdagrad needs at least one parameter")
        first = self.params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in self.params):
            raise ValueError("FlatAdagrad needs parameters of one dtype on one device")
        self.lr, self.eps = float(lr), float(eps)
        total = sum(p.numel() for p in self.params)
        self.flat = torch.empty(total, dtype=first.dtype, device=first.device)
        self.grad = torch.zeros_like(self.flat)
        self.acc = torch.zeros_like(self.flat)
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                self.flat[offset : offset + n].copy_(p.reshape(-1))
                p.data = self.flat[offset : offset + n].view_as(p)
                p.grad = self.grad[offset : offset + n].view_as(p)
                offset += n

    def zero_grad(self) -> None:
        self.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        self.acc.addcmul_(self.grad, self.grad)
        self.flat.addcdiv_(self.grad, self.acc.sqrt().add_(self.eps), value=-self.lr)

    def state_dict(self) -> dict[str, Any]:
        return {"acc": self.acc.clone(), "lr": self.lr, "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.acc.copy_(state["acc"])
        self.lr, self.eps = float(state["lr"]), float(state["eps"])


def dense_optimizer(
    params: Iterable[nn.Parameter], lr: float = 1e-3, kind: Literal["adam", "adagrad", "sgd"] = "adam"
) -> torch.optim.Optimizer | FlatAdagrad:
    """Optimizer for everything but the table (gates, head, dense numerics).

    Adagrad: :class:`FlatAdagrad`. Adam / SGD: torch's, with ``foreach`` kernels (one
    multi-tensor launch per step instead of one per parameter).
    """
    params = list(params)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, foreach=True)
    if kind == "adagrad":
        return FlatAdagrad(params, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, foreach=True)
    raise ValueError(f"unknown dense optimizer {kind!r}")
