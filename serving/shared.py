"""Model versions in shared memory, for ``ctr serve --workers N`` (:mod:`ctr.serving.workers`).

The updater keeps every model its registry builds in ONE shared-memory segment per model
(:func:`share_model`): an anonymous ``memfd`` holding all of its parameters and buffers, which
are views of it, so the registry's in-place writes (a delta's rows, a recycled shadow's
touched rows) land in the segment. A worker receives the segment's file descriptor (SCM_RIGHTS,
:mod:`ctr.serving.channel`) with its :class:`Layout` and :func:`attach`-es it: a model built on
the meta device (no memory, no init) whose tensors are views of a READ-ONLY mapping -- the
worker's copy costs page tables, not the table, and a stray write would fault instead of
corrupting what another process serves.

Why a memfd and not torch's own sharing (``share_memory_()`` + ``torch.multiprocessing``): torch
shares each storage by its own file descriptor, and the receiving process caches that fd (the
``file_descriptor`` strategy, whose docs warn of the fd limit) or leaves a named file in
/dev/shm that leaks when a process is killed (``file_system``). Here a model is one memfd:
the updater holds it while the model lives (plus the duplicate Python's ``mmap`` keeps while
mapped), a worker only while it maps that version (its ``mmap``'s duplicate) -- fds per live
version, never per version applied or per tensor. An unnamed memfd is freed by the kernel when
its last fd and mapping are gone, however the processes ended: nothing can be left in /dev/shm.

>>> import numpy as np
>>> from ctr.online_learner.model import CTRModel, ModelConfig
>>> model = CTRModel(ModelConfig(("site",), table_bits=6))
>>> before = model.table.detach().clone()
>>> share_model(model)
>>> seg = segment_of(model)
>>> copy = attach(os.dup(seg.fd), seg.layout, model.config)
>>> bool(torch.equal(copy.table, before))
True
>>> with torch.no_grad():
...     _ = model.table.add_(1.0)  # the updater writes in place: the worker's view sees it
>>> bool(torch.equal(copy.table, before + 1.0))
True
>>> twin = shared_copy(model)  # the registry's fresh shadow: a new segment, the same values
>>> bool(torch.equal(twin.table, model.table)), segment_of(twin) is not seg
(True, True)
"""

from __future__ import annotations

import mmap
import os
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ctr.online_learner.model import CTRModel, ModelConfig

__all__ = ["Layout", "Segment", "attach", "segment_of", "share_model", "shared_copy"]

#: byte alignment of each tensor in a segment (a cache line; views of any dtype stay aligned)
ALIGN = 64


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a model lives in its segment: ``(name, dtype, shape, byte offset)``
    per parameter and buffer (``named_parameters``/``named_buffers`` names), and the size."""

    size: int
    entries: tuple[tuple[str, str, tuple[int, ...], int], ...]


class Segment:
    """One model's shared memory: a memfd, its writable mapping, and the layout."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.fd = os.memfd_create("ctr-model", os.MFD_CLOEXEC)
        # closed when the segment is collected (with its model): the kernel frees the memory
        # once the workers' mappings are gone too
        self._close = weakref.finalize(self, os.close, self.fd)
        os.ftruncate(self.fd, layout.size)
        self.map = mmap.mmap(self.fd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


_SEGMENTS: weakref.WeakKeyDictionary[CTRModel, Segment] = weakref.WeakKeyDictionary()


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    # buffers not in the state dict too (index tables built from the config): a worker's
    # meta-device model has none of its own
    return [*model.named_parameters(), *model.named_buffers()]


def _view(base: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    return base[offset:offset + nbytes].view(dtype).view(shape)


def _layout(tensors: list[tuple[str, torch.Tensor]]) -> Layout:
    entries, end = [], 0
    for name, t in tensors:
        offset = -(-end // ALIGN) * ALIGN
        entries.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
        end = offset + t.numel() * t.element_size()
    return Layout(max(end, 1), tuple(entries))


def share_model(model: CTRModel) -> None:
    """Move every tensor of ``model`` into a new segment, in place: the parameter and buffer
    objects stay the same (``.data`` now views the segment), so code holding them -- the
    registry's tensor lists, optimizers -- keeps working. One copy of the model."""
    tensors = _tensors(model)
    seg = Segment(_layout(tensors))
    base = torch.frombuffer(seg.map, dtype=torch.uint8)
    with torch.no_grad():
        for (_, t), (_, _, shape, offset) in zip(tensors, seg.layout.entries, strict=True):
            view = _view(base, t.dtype, shape, offset)
            view.copy_(t)
            t.data = view
    _SEGMENTS[model] = seg


def shared_copy(model: CTRModel) -> CTRModel:
    """A copy of ``model`` (eval mode) in a new segment: what the registry builds a shadow on
    when no retired model is free, instead of a ``deepcopy`` -- which would walk the module's
    objects and, for buffers, copy the whole segment they view. One copy, straight into shared
    memory."""
    tensors = _tensors(model)
    seg = Segment(_layout(tensors))
    twin = _over(seg.map, seg.layout, model.config)
    with torch.no_grad():
        for (_, dst), (_, src) in zip(_tensors(twin), tensors, strict=True):
            dst.copy_(src)
    twin.gate.note_prior()
    _SEGMENTS[twin] = seg
    return twin


def segment_of(model: CTRModel) -> Segment:
    """The segment :func:`share_model` put ``model`` in (KeyError: it was not shared)."""
    return _SEGMENTS[model]


def attach(fd: int, layout: Layout, config: ModelConfig) -> CTRModel:
    """A model (eval mode) whose tensors are read-only views of the segment behind ``fd``,
    which is closed here (the mapping keeps the memory)."""
    try:
        # MAP_POPULATE: the page tables are filled now, not by page faults on the request path
        mapped = mmap.mmap(fd, layout.size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ)
    finally:
        os.close(fd)
    model = _over(mapped, layout, config)
    model.gate.note_prior()  # Python state derived from the buffers, computed by reading them
    return model


def _over(buffer: mmap.mmap, layout: Layout, config: ModelConfig) -> CTRModel:
    """A model (eval mode, no gradients) built on the meta device -- no memory, no init -- whose
    parameters and buffers are views of ``buffer`` as ``layout`` says. Its other tensors (the
    calibration's prior precision, read only when training) stay on the meta device: these
    models are never trained."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only mapping: "not writable" is the point
        base = torch.frombuffer(buffer, dtype=torch.uint8)
    with torch.device("meta"):
        model = CTRModel(config)
    for name, dtype, shape, offset in layout.entries:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        view = _view(base, getattr(torch, dtype), shape, offset)
        # setattr on a registered name replaces the parameter / buffer (nn.Module.__setattr__)
        setattr(module, leaf, nn.Parameter(view, requires_grad=False) if leaf in module._parameters else view)
    left = [n for n, t in _tensors(model) if t.is_meta]
    if left:
        raise ValueError(f"segment layout lacks {left[:5]}: built from another model shape?")
    return model.eval()
