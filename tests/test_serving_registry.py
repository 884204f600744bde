"""Serving registry, pure logic (no Kafka, no HTTP): chains, gaps, parts, K versions, rollback,
atomic swaps under concurrent readers, and the update consumer's re-sync decisions."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from ctr.online_learner.delta import delta_tensors, snapshot_tensors
from ctr.online_learner.learner import OnlineCTR
from ctr.online_learner.model import CTRModel, ModelConfig
from ctr.online_learner.update_format import UpdateHeader, decode_update, encode_update, split_delta
from ctr.serving.registry import ModelRegistry, RegistryError
from ctr.serving.updates import UpdateConsumer

CFG = ModelConfig(("site", "ad", "user_id"), ("price",), table_bits=8, mlp_dims=(16,), cross_rank=4)
ROWS = [{"site": f"s{i % 3}", "ad": f"a{i % 5}", "user_id": f"u{i}", "price": float(i)} for i in range(16)]


class Learner:
    """A stand-in learner that publishes like ctr.online_learner.publisher (deltas on v-1)."""

    def __init__(self, model_id: str = "m1", seed: int = 0) -> None:
        self.ctr = OnlineCTR(CFG, seed=seed, device="cpu")
        self.model_id, self.version = model_id, 1
        self.rng = np.random.default_rng(seed)

    def snapshot(self) -> tuple[UpdateHeader, dict[str, np.ndarray]]:
        header = UpdateHeader(kind="snapshot", model_id=self.model_id, version=self.version,
                              base_version=self.version, model_config=CFG.to_dict(), created_ms=1000 * self.version)
        return header, snapshot_tensors(self.ctr.model)

    def step(self) -> tuple[UpdateHeader, dict[str, np.ndarray]]:
        self.ctr.learn_many(ROWS, self.rng.integers(0, 2, len(ROWS)))
        touched = self.ctr.take_touched()
        self.version += 1
        header = UpdateHeader(kind="delta", model_id=self.model_id, version=self.version,
                              base_version=self.version - 1, created_ms=1000 * self.version)
        return header, delta_tensors(self.ctr.model, touched)

    def proba(self) -> np.ndarray:
        return self.ctr.predict_proba_many(ROWS)


def _started(keep: int = 5, **kw) -> tuple[ModelRegistry, Learner]:
    reg, learner = ModelRegistry(keep=keep), Learner(**kw)
    reg.install_snapshot(*learner.snapshot())
    return reg, learner


def _proba(reg: ModelRegistry) -> np.ndarray:
    mv = reg.current
    return mv.predict(mv.encoder.encode(ROWS))


def test_a_delta_chain_reproduces_the_learner() -> None:
    reg, learner = _started()
    for _ in range(4):
        d = reg.offer(*learner.step())
        assert d.outcome == "applied", d
    assert reg.current.version == learner.version == 5
    np.testing.assert_allclose(_proba(reg), learner.proba(), rtol=0, atol=1e-6)
    assert reg.status()["versions_behind"] == 0


def test_versions_are_immutable_and_swapped_whole() -> None:
    reg, learner = _started()
    before = reg.current
    table_before = before.model.table.detach().clone()
    reg.offer(*learner.step())
    assert reg.current is not before and reg.current.version == before.version + 1
    assert torch.equal(before.model.table, table_before), "a delta must never touch a served model"


def test_retired_models_are_recycled_only_when_no_request_holds_them() -> None:
    reg, learner = _started(keep=2)
    held = reg.acquire()  # a slow request on v1
    frozen = held.model.table.detach().clone()
    models = {id(held.model)}
    for _ in range(6):
        reg.offer(*learner.step())
        models.add(id(reg.current.model))
    assert torch.equal(held.model.table, frozen), "a version in use must never be recycled"
    assert len(models) < 7, "retired models that nobody holds are reused as shadows"
    reg.release(held)
    for _ in range(6):
        reg.offer(*learner.step())
    np.testing.assert_allclose(_proba(reg), learner.proba(), rtol=0, atol=1e-6)
    assert reg._inflight == {}


def test_gap_out_of_order_stale_and_lineage_are_not_applied() -> None:
    reg, learner = _started()
    v2 = learner.step()
    v3 = learner.step()
    v4 = learner.step()
    d = reg.offer(*v3)  # v3 on base v2, head is v1: a gap
    assert (d.outcome, d.reason, d.resync) == ("rejected", "gap", True)
    assert reg.current.version == 1
    assert reg.offer(*v2).outcome == "applied"
    assert reg.offer(*v3).outcome == "applied"
    # a fork: v5 built on v3 while the head is v4
    assert reg.offer(*v4).outcome == "applied"
    fork = UpdateHeader(kind="delta", model_id="m1", version=5, base_version=3)
    d = reg.offer(fork, v4[1])
    assert (d.outcome, d.reason, d.resync) == ("rejected", "out_of_order", True)
    # replays / duplicates of applied versions: skipped, no re-sync
    d = reg.offer(*v2)
    assert (d.outcome, d.reason, d.resync) == ("skipped", "stale", False)
    # another learner's delta
    other = UpdateHeader(kind="delta", model_id="m2", version=5, base_version=4)
    d = reg.offer(other, v4[1])
    assert (d.outcome, d.reason, d.resync) == ("rejected", "lineage", True)
    assert reg.current.version == 4
    np.testing.assert_allclose(_proba(reg), learner.proba(), rtol=0, atol=1e-6)


def test_no_model_yet_and_bad_tensors() -> None:
    reg = ModelRegistry()
    learner = Learner()
    d = reg.offer(*learner.step())
    assert (d.outcome, d.reason, d.resync) == ("rejected", "no_base", True)
    reg.install_snapshot(*learner.snapshot())
    header = UpdateHeader(kind="delta", model_id="m1", version=reg.current.version + 1,
                          base_version=reg.current.version)
    bad = {"table.ids": np.array([1, 2], np.int64), "table.rows": np.ones((2, 7), np.float32)}
    d = reg.offer(header, bad)
    assert (d.outcome, d.reason) == ("rejected", "incompatible")
    assert reg.current.source == "snapshot"


def test_multi_part_versions_apply_only_when_complete() -> None:
    reg, learner = _started()
    header, tensors = learner.step()
    parts = [decode_update(p) for p in split_delta(header, tensors, max_bytes=4096 + 64 * 20)]
    assert len(parts) >= 3
    for i, (h, t) in enumerate(parts[:-1]):
        d = reg.offer(h, t)
        assert d.outcome == "buffered", d
        assert reg.current.version == 1, "no request may see a half-applied version"
        if i == 1:
            assert reg.offer(h, t).reason == "duplicate_part"
    assert reg.status()["pending"]["parts"] == len(parts) - 1
    assert reg.offer(*parts[-1]).outcome == "applied"
    assert reg.current.version == 2 and reg.current.parts == len(parts)
    np.testing.assert_allclose(_proba(reg), learner.proba(), rtol=0, atol=1e-6)


def test_parts_in_any_order_and_an_abandoned_version() -> None:
    reg, learner = _started()
    header, tensors = learner.step()
    parts = [decode_update(p) for p in split_delta(header, tensors, max_bytes=4096 + 64 * 20)]
    for h, t in reversed(parts):
        d = reg.offer(h, t)
    assert d.outcome == "applied" and reg.current.version == 2
    # a version whose last part never comes, then the learner re-syncs everyone with a snapshot
    h3, t3 = learner.step()
    p3 = [decode_update(p) for p in split_delta(h3, t3, max_bytes=4096 + 64 * 20)]
    reg.offer(*p3[0])
    h4, t4 = learner.step()
    assert reg.offer(h4, t4).reason == "gap"
    reg.install_snapshot(*learner.snapshot())
    assert reg.status()["pending"] is None and reg.current.version == 4


def test_keeps_k_versions_rollback_pins_unpin_returns_to_head() -> None:
    reg, learner = _started(keep=3)
    probas = {1: _proba(reg)}
    for _ in range(4):
        reg.offer(*learner.step())
        probas[reg.current.version] = _proba(reg)
    assert [v.version for v in reg.kept()] == [3, 4, 5]
    with pytest.raises(RegistryError) as err:
        reg.rollback(1)
    assert err.value.status == 404
    mv = reg.rollback()  # the previous version
    assert mv.version == 4 and reg.current is mv and reg.pinned is mv
    np.testing.assert_array_equal(_proba(reg), probas[4])
    mv = reg.rollback(3)
    assert reg.current.version == 3
    # the stream keeps advancing the head while the pin holds
    for _ in range(3):
        assert reg.offer(*learner.step()).outcome == "applied"
    assert reg.head.version == 8 and reg.current.version == 3
    assert 3 in [v.version for v in reg.kept()], "a pinned version is kept even beyond K"
    st = reg.status()
    assert st["pinned"] and st["pinned_version"] == 3 and st["head_version"] == 8
    assert reg.unpin().version == 8 and reg.current is reg.head and reg.pinned is None
    np.testing.assert_allclose(_proba(reg), learner.proba(), rtol=0, atol=1e-6)


def test_rollback_needs_an_older_version() -> None:
    reg, _ = _started()
    with pytest.raises(RegistryError) as err:
        reg.rollback()
    assert err.value.status == 409
    with pytest.raises(RegistryError) as err:
        ModelRegistry().rollback()
    assert err.value.status == 503


def test_snapshot_announcements() -> None:
    reg, learner = _started()
    reg.offer(*learner.step())
    old = UpdateHeader(kind="snapshot", model_id="m1", version=2, base_version=2, snapshot_uri="/x/s2")
    assert reg.classify(old).outcome == "skipped"
    new = UpdateHeader(kind="snapshot", model_id="m1", version=9, base_version=9, snapshot_uri="/x/s9")
    d = reg.classify(new)
    assert (d.outcome, d.resync, d.snapshot_uri) == ("announce", True, "/x/s9")
    assert reg.status()["learner_version"] == 9 and reg.status()["versions_behind"] == 7


def test_field_weights_shipped_in_a_delta_are_used() -> None:
    reg, learner = _started()
    learner.ctr.set_field_weights({"site": 3.0, "ad": 0.2})
    header, tensors = learner.step()
    reg.offer(header, tensors)
    np.testing.assert_allclose(_proba(reg), learner.proba(), rtol=0, atol=1e-6)


def test_readers_never_see_a_half_applied_version() -> None:
    """Every version sets EVERY table row to its own number: a reader that acquired a version
    must find a uniform table equal to the version it names, whatever the writer is doing
    (with keep=2, retired models are recycled as shadows all the time)."""
    cfg = ModelConfig(("a",), table_bits=12)
    reg = ModelRegistry(keep=2)
    model = CTRModel(cfg)
    with torch.no_grad():
        model.table.fill_(1.0)
    reg.install_snapshot(UpdateHeader(kind="snapshot", model_id="m", version=1, base_version=1,
                                      model_config=cfg.to_dict()), snapshot_tensors(model))
    ids = np.arange(model.table.shape[0], dtype=np.int64)
    stop, bad, seen = threading.Event(), [], set()

    def reader() -> None:
        while not stop.is_set():
            mv = reg.acquire()
            t = mv.model.table
            if not (float(t.min()) == float(t.max()) == float(mv.version)):
                bad.append(mv.version)
            seen.add(mv.version)
            reg.release(mv)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for v in range(2, 60):
        rows = np.full((len(ids), cfg.chunk_dim), float(v), np.float32)
        head = UpdateHeader(kind="delta", model_id="m", version=v, base_version=v - 1)
        for h, tens in (decode_update(p) for p in split_delta(head, {"table.ids": ids, "table.rows": rows},
                                                               max_bytes=30_000)):
            reg.offer(h, tens)
    stop.set()
    for t in threads:
        t.join()
    assert not bad and reg.current.version == 59 and len(seen) > 3


# --------------------------------------------------------------------------- re-sync decisions
class FakeConsumer:
    def __init__(self, high: int = 100, batches: list | None = None) -> None:
        self.assigned: list[int] = []
        self.times: list[int] = []
        self.high, self.batches, self.unassigned = high, list(batches or []), 0

    def consume(self, n, timeout):
        return self.batches.pop(0) if self.batches else []

    def unassign(self) -> None:
        self.unassigned += 1

    def offsets_for_times(self, tps, timeout=None):
        self.times.append(tps[0].offset)
        tps[0].offset = 42
        return tps

    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        return 0, self.high

    def assign(self, tps) -> None:
        self.assigned.append(tps[0].offset)


def _write_snapshot(path: Path, learner: Learner) -> Path:
    header, tensors = learner.snapshot()
    path.mkdir(parents=True, exist_ok=True)
    f = path / f"snapshot-{header.version:012d}.ctru"
    f.write_bytes(encode_update(header, tensors))
    return f


def test_gap_resyncs_from_the_newest_snapshot_and_seeks_back(tmp_path: Path) -> None:
    reg, learner = _started()
    snaps = tmp_path / "snapshots"
    _write_snapshot(snaps, learner)  # v1, what we hold
    uc = UpdateConsumer(reg, "unused:9092", snapshot_dir=snaps, seek_margin_ms=500)
    uc._consumer = FakeConsumer()
    for _ in range(3):
        learner.step()
    _write_snapshot(snaps, learner)  # v4: the learner's newer snapshot (announcement missed)
    gap = learner.step()  # v5 on v4
    assert uc._handle(encode_update(*gap)) is True  # rejected, re-synced, repositioned
    assert reg.current.version == 4 and reg.current.source == "snapshot"
    assert uc._consumer.times == [4000 - 500] and uc.pos == 42
    assert uc._handle(encode_update(*gap)) is False  # replayed after the seek: now it chains
    assert reg.current.version == 5
    np.testing.assert_allclose(_proba(reg), learner.proba(), rtol=0, atol=1e-6)
    assert uc.last_resync["reason"] == "gap" and uc.last_resync["version"] == 4


def test_nothing_newer_stalls_then_a_snapshot_ends_it(tmp_path: Path) -> None:
    reg, learner = _started()
    snaps = tmp_path / "snapshots"
    _write_snapshot(snaps, learner)
    uc = UpdateConsumer(reg, "unused:9092", snapshot_dir=snaps)
    uc._consumer = FakeConsumer()
    learner.step()
    lost = learner.step()
    assert uc._handle(encode_update(*lost)) is False
    assert uc.state == "stalled" and reg.current.version == 1 and uc.pos == 0
    assert uc._handle(b"CTRU garbage") is False and uc.last_rejection["reason"] == "invalid"
    f = _write_snapshot(snaps, learner)  # the learner's next snapshot, announced on the topic
    header, _ = learner.snapshot()
    announce = UpdateHeader(kind="snapshot", model_id="m1", version=header.version, base_version=header.version,
                            snapshot_uri=str(f))
    assert uc._handle(encode_update(announce, {})) is True
    assert reg.current.version == 3 and uc.state == "catching_up"


def test_a_corrupt_snapshot_is_skipped_for_an_older_good_one(tmp_path: Path) -> None:
    reg = ModelRegistry()
    learner = Learner()
    snaps = tmp_path / "snapshots"
    _write_snapshot(snaps, learner)
    learner.step()
    bad = _write_snapshot(snaps, learner)
    data = bytearray(bad.read_bytes())
    data[-40] ^= 0xFF
    bad.write_bytes(bytes(data))
    uc = UpdateConsumer(reg, "unused:9092", snapshot_dir=snaps)
    uc._consumer = FakeConsumer()
    assert uc._resync(uc_decision("startup")) is True
    assert reg.current.version == 1


def uc_decision(reason: str):
    from ctr.serving.registry import Decision

    return Decision("rejected", reason, "test")


def test_apply_matches_a_fresh_load() -> None:
    """Snapshot + deltas in the registry == load_state_dict of the learner's model (independent path)."""
    reg, learner = _started()
    for _ in range(3):
        reg.offer(*learner.step())
    ref = CTRModel(CFG)
    ref.load_state_dict(learner.ctr.model.state_dict())
    ref.eval()
    mv = reg.current
    enc = mv.encoder.encode(ROWS)
    ids = ref.bucket_ids(torch.from_numpy(enc.keys.view(np.int64)))
    with torch.no_grad():
        want = torch.sigmoid(ref(ids, None if enc.numeric is None else torch.from_numpy(enc.numeric))).numpy()
    np.testing.assert_allclose(mv.predict(enc), want, rtol=0, atol=1e-6)


class FakeMessage:
    def __init__(self, offset: int, value: bytes) -> None:
        self._offset, self._value = offset, value

    def error(self):
        return None

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value


def test_fetching_stops_only_when_caught_up() -> None:
    """A slow (big) fetch returns nothing for a while: stay assigned until the end offset;
    once caught up, unassign and poll the end offset instead (no spinning fetch)."""
    reg, learner = _started()
    msgs = [FakeMessage(i, encode_update(*learner.step())) for i in range(3)]
    uc = UpdateConsumer(reg, "unused:9092")
    uc._consumer = FakeConsumer(high=3, batches=[[], [], msgs[:2], [], msgs[2:]])
    uc.pos = 0
    uc._step()
    assert uc._assigned and uc._consumer.assigned == [0]  # assigned: there is data to read
    uc._step()
    uc._step()
    assert uc._assigned and reg.current.version == 3 and uc.pos == 2
    uc._step()
    assert uc._assigned, "an empty consume before the end offset is a fetch in flight"
    uc._step()
    assert not uc._assigned and uc._consumer.unassigned == 1 and reg.current.version == 4
    uc.state = "catching_up"
    uc._step()  # caught up: polls the end offset, does not assign
    assert uc.state == "live" and uc._consumer.assigned == [0]


def test_a_recycled_model_copies_only_the_rows_that_changed_and_equals_the_learner() -> None:
    """Once versions retire, a new version is built on a retired model: it copies the rows the
    versions since it changed (not the table) and must still equal the learner exactly."""
    reg, learner = _started(keep=2)
    reg.max_scattered_rows = 1.0  # this test's table is tiny: copy rows whenever the history allows
    rows = learner.ctr.model.table.shape[0]
    built = []
    for _ in range(12):
        d = reg.offer(*learner.step())
        assert d.outcome == "applied", d
        built.append(d.version)
        for got, want in zip(reg.current.model.state_dict().values(), learner.ctr.model.state_dict().values(),
                             strict=True):
            assert torch.equal(got, want)
    recycled = [v for v in built if v.copied_rows >= 0]
    assert recycled, "no version was built on a retired model"
    assert all(v.copied_rows < 4 * rows for v in recycled)  # rows since the recycled version, repeats included
    np.testing.assert_allclose(_proba(reg), learner.proba(), atol=1e-6)


def test_without_history_a_recycled_model_copies_the_whole_table() -> None:
    reg, learner = _started(keep=2)
    reg.max_scattered_rows = 1.0
    for _ in range(4):
        reg.offer(*learner.step())
    reg._changes.clear()  # history gone (or a snapshot in between): nothing says which rows differ
    d = reg.offer(*learner.step())
    assert d.outcome == "applied" and d.version.copied_rows == -1
    for got, want in zip(reg.current.model.state_dict().values(), learner.ctr.model.state_dict().values(),
                         strict=True):
        assert torch.equal(got, want)
