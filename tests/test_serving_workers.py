"""Model versions in shared memory for ``ctr serve --workers``: the invariant the updater relies on.

``test_a_version_held_elsewhere_is_never_rewritten``: in one process, a registry keeping its
models in shared memory never rewrites a version a reader elsewhere holds.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ctr.online_learner.delta import snapshot_tensors
from ctr.online_learner.model import CTRModel, ModelConfig
from ctr.online_learner.update_format import UpdateHeader
from ctr.serving.registry import ModelRegistry
from ctr.serving.shared import attach, segment_of, share_model, shared_copy


def test_a_version_held_elsewhere_is_never_rewritten() -> None:
    """The updater's invariant: a version a worker holds (mapped, maybe scoring) is never
    recycled as a shadow, so its mapping reads the same bytes until the worker drops it; what
    nobody holds is recycled (touched-row copies instead of a copy of the table)."""
    cfg = ModelConfig(("site",), table_bits=12)
    reg = ModelRegistry(keep=2)
    reg.place, reg.clone = share_model, shared_copy
    head = UpdateHeader(kind="snapshot", model_id="m", version=1, base_version=1, model_config=cfg.to_dict())
    reg.install_snapshot(head, snapshot_tensors(CTRModel(cfg)))
    rng = np.random.default_rng(0)
    rows = reg.current.model.table.shape[0]
    held: list[tuple] = []
    recycled = 0
    for v in range(2, 80):
        ids = np.unique(rng.integers(0, rows, 12)).astype(np.int64)
        delta = {"table.ids": ids, "table.rows": rng.normal(size=(len(ids), 4)).astype(np.float32)}
        d = reg.offer(UpdateHeader(kind="delta", model_id="m", version=v, base_version=v - 1), delta)
        assert d.outcome == "applied", d
        recycled += d.version.copied_rows >= 0
        if rng.random() < 0.4:  # a worker maps the new current version and holds it
            mv = reg.current
            reg.hold(mv)
            seg = segment_of(mv.model)
            mapped = attach(os.dup(seg.fd), seg.layout, cfg)
            held.append((mv, mapped, mapped.table.clone(), mv.model.table.clone()))
        for mv, mapped, seen, built in held:
            assert torch.equal(mapped.table, seen), f"v{mv.version} changed under a worker holding it"
            assert torch.equal(seen, built)
        if held and rng.random() < 0.35:
            reg.release(held.pop(int(rng.integers(len(held))))[0])
    # (copied_rows >= 0: built on a recycled model by copying the rows it lacked)
    assert recycled > 40, f"released versions are recycled as shadows: {recycled} of 78"
