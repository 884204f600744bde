"""Windowed feature agent: hopping-window impression/click counts and smoothed CTR per user,
per item and per (field, value), written to the Feast online store in micro-batches.

Data flow: the label join turns each micro-batch into count deltas per (entity, hop bucket)
and sends them, already re-keyed by entity (:func:`~ctr.streams.agents.deltas.entity_partition`),
as one :class:`~ctr.streams.agents.deltas.DeltaBatch` per feature partition to the internal
topic ``<app id>-feature-deltas`` (4 partitions, co-partitioned with everything else). This
agent sums them into per-entity buckets (:class:`FeatureShard`, pure logic, no Faust) and
writes the touched entities' current window values (``ctr.features.spec.SPEC``: impressions,
clicks and smoothed CTR for every window) to Feast.

Windows. Counts live in buckets of the finest hop (60 s by default). The value of a window of
size S and hop H "now" is the window ``[end - S, end)`` whose end is the first hop boundary
after the shard's event-time clock (the largest event time any delta batch reported): with
the default spec, the last 5 (or 60) one-minute buckets including the current one. A Feast row
holds the values as of its event timestamp (= that clock); an entity with no new events keeps
its last row until its next event (readers who care about staleness can compare the row's
``<entity>_event_time_us`` column with the current time).

Exactly-once counting under at-least-once delivery. Every delta batch carries a version
``(source partition, join seq)``; the shard keeps the last version applied per source
partition and skips anything at or below it (a replayed or re-sent batch). Each micro-batch
here becomes one changelog record (:class:`FeatureRecord`: the rows applied, the versions,
the clock, and ``feast_confirmed`` = the last record whose touched entities are known written to
Feast), acknowledged by the broker before the input offsets are acked. After a kill -9,
:meth:`FeatureShard.restore` sums the live records again and the entities touched after
``feast_confirmed`` are written again (a Feast write is an idempotent overwrite with the newest
event time winning). Records whose buckets have left every window are deleted.

The rows applied are, by default (``changelog="offsets"``), not copied into the record: it
lists the ``(offset, src, seq)`` of each delta batch it applied, and a restore reads them back
from the deltas topic (:func:`inline_deltas`), as the label join does with its impressions. A
list, not a range: duplicates and malformed batches in between were not applied, and the live
records are no contiguous suffix of the log (any record whose buckets aged out is deleted).
The deltas topic must then keep its records while the records naming them are live (the longest
window plus the hop, in event time); a restore fails loudly if they are gone. ``inline`` copies
the rows: tens of bytes per event for the broker to acknowledge before the input is acked,
against a few per micro-batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from ctr.features.spec import SPEC, FeatureSpec
from ctr.infra.config import CHANGELOG_MODES
from ctr.streams.agents.changelog_keys import partition_prefix, record_key
from ctr.streams.agents.deltas import ENTITY_KINDS, DeltaBatch, bucket_ms, decode_deltas
from ctr.streams.agents.label_join import NEG_INF

if TYPE_CHECKING:
    from faust.types import TP

    from ctr.streams.app import Batch, ChangelogRecord, Chunk, CtrApp, InputAcker, OutputProducer, StateTable

log = logging.getLogger(__name__)

EntityKey = tuple[int, str]


class FeatureRecord(msgspec.Struct, array_like=True, frozen=True):
    """One micro-batch of one feature partition, as written to the changelog.

    Its rows are either copied (``rows``) or referenced: ``deltas`` holds the ``(offset, src,
    seq)`` of each delta batch it applied, in the deltas topic's partition of the same number
    (:func:`inline_deltas`). New fields go last, with defaults: older records still decode."""

    seq: int
    applied: dict[int, int]
    clock: int
    feast_confirmed: int
    rows: list[tuple[int, str, int, int, int]]
    deltas: list[tuple[int, int, int]] = []

    @property
    def by_offsets(self) -> bool:
        """The rows are referenced by the offsets of their delta batches, not copied."""
        return bool(self.deltas)


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(FeatureRecord)


def encode_record(rec: FeatureRecord) -> bytes:
    return _enc.encode(rec)


def decode_record(data: bytes) -> FeatureRecord:
    return _dec.decode(data)


def inline_deltas(rec: FeatureRecord, batches: Mapping[int, bytes | None]) -> FeatureRecord:
    """``rec`` with the rows of the delta batches it references copied in from ``batches``
    (offset -> value, read from its partition of the deltas topic); raises if one is missing
    or is not the version the record applied.

    >>> from ctr.streams.agents.deltas import encode_deltas
    >>> b = DeltaBatch(src=2, seq=7, max_time=0, rows=[(1, "ad7", 5, 3, 1)])
    >>> rec = FeatureRecord(1, {2: 7}, 0, 0, [], deltas=[(40, 2, 7)])
    >>> inline_deltas(rec, {39: b"junk", 40: encode_deltas(b)}).rows
    [(1, 'ad7', 5, 3, 1)]
    """
    if not rec.by_offsets:
        return rec
    rows: list[tuple[int, str, int, int, int]] = []
    for offset, src, seq in rec.deltas:
        value = batches.get(offset)
        batch = decode_deltas(value) if value is not None else None
        if batch is None or (batch.src, batch.seq) != (src, seq):
            found = "nothing" if batch is None else f"version {(batch.src, batch.seq)}"
            raise RuntimeError(
                f"feature record {rec.seq}: offset {offset} holds {found}, the record applied delta batch "
                f"{(src, seq)} there (did retention take it, or was the topic rewritten?)"
            )
        rows.extend(batch.rows)
    return msgspec.structs.replace(rec, rows=rows, deltas=[])


@dataclass(frozen=True)
class WindowPlan:
    """Bucket arithmetic of the spec's windows (sizes and hops in buckets)."""

    bucket_ms: int
    windows: tuple[tuple[str, int, int], ...]  # (name, size in buckets, hop in buckets)

    @classmethod
    def of(cls, spec: FeatureSpec) -> WindowPlan:
        b = bucket_ms(spec)
        return cls(b, tuple((w.name, w.size_s * 1000 // b, w.hop_s * 1000 // b) for w in spec.windows))

    @property
    def horizon(self) -> int:
        """Buckets any window can still reach back from the current one."""
        return max(size + hop for _, size, hop in self.windows)

    def ranges(self, clock_ms: int) -> list[tuple[str, int, int]]:
        """``(name, first bucket, end bucket exclusive)`` of each window at ``clock_ms``."""
        cur = clock_ms // self.bucket_ms
        out = []
        for name, size, hop in self.windows:
            end = (cur // hop + 1) * hop
            out.append((name, end - size, end))
        return out


class FeatureShard:
    """Counts of one feature partition: entity -> bucket -> [impressions, clicks].

    >>> from ctr.streams.agents.deltas import DeltaBatch
    >>> shard = FeatureShard(0)
    >>> t = 1_700_000_000_000
    >>> b = t // 60_000
    >>> touched, rec = shard.apply([DeltaBatch(src=1, seq=1, max_time=t, rows=[(1, "ad7", b, 3, 1)])])
    >>> sorted(touched), rec.seq
    ([(1, 'ad7')], 1)
    >>> shard.apply([DeltaBatch(src=1, seq=1, max_time=t, rows=[(1, "ad7", b, 3, 1)])])[1] is None  # replay
    True
    >>> v = shard.values((1, "ad7")); v["item_impressions_5m"], v["item_clicks_1h"]
    (3, 1)
    """

    def __init__(self, partition: int, spec: FeatureSpec = SPEC) -> None:
        self.partition = partition
        self.spec = spec
        self.plan = WindowPlan.of(spec)
        self.counts: dict[EntityKey, dict[int, list[int]]] = {}
        self.applied: dict[int, int] = {}
        self.clock = NEG_INF
        self.seq = 0
        self.feast_confirmed = 0
        self.duplicates = 0
        #: batches that arrived ahead of their predecessor (held until it came)
        self.reordered = 0
        #: src -> seq -> (batch, offset): held for a missing predecessor
        self.held: dict[int, dict[int, tuple[DeltaBatch, int]]] = {}
        #: offsets of held batches applied since the agent last acked them
        self.released: list[int] = []
        self.rows_applied = 0
        #: live record seq -> newest bucket in it
        self.live: dict[int, int] = {}
        self._pruned_at = NEG_INF
        self._recorded_confirmed = 0
        self._names = {
            kind: [(name, f"{ENTITY_KINDS[kind]}_impressions_{name}", f"{ENTITY_KINDS[kind]}_clicks_{name}",
                    f"{ENTITY_KINDS[kind]}_ctr_{name}") for name, _, _ in self.plan.windows]
            for kind in range(len(ENTITY_KINDS))
        }  # fmt: skip

    def _add(self, rows: Iterable[tuple[int, str, int, int, int]], touched: set[EntityKey]) -> None:
        counts = self.counts
        for kind, key, bucket, di, dc in rows:
            ek = (kind, key)
            buckets = counts.get(ek)
            if buckets is None:
                buckets = counts[ek] = {}
            cur = buckets.get(bucket)
            if cur is None:
                buckets[bucket] = [di, dc]
            else:
                cur[0] += di
                cur[1] += dc
            touched.add(ek)

    def _offer(self, b: DeltaBatch, offset: int, ready: list[tuple[DeltaBatch, int]]) -> None:
        """Chain rule: the batches of one source apply in seq order, each once. A duplicate is
        skipped; a batch ahead of its predecessor is held until the predecessor arrives (a
        reorder); a source's first batch starts its chain."""
        last = self.applied.get(b.src)
        if last is not None and b.seq <= last:
            self.duplicates += 1
            return
        if last is not None and b.seq > last + 1:
            ahead = self.held.setdefault(b.src, {})
            if b.seq in ahead:
                self.duplicates += 1
            else:
                ahead[b.seq] = (b, offset)
                self.reordered += 1
            return
        ready.append((b, offset))
        self.applied[b.src] = b.seq
        held = self.held.get(b.src)
        while held:
            nxt = held.pop(self.applied[b.src] + 1, None)
            if nxt is None:
                break
            ready.append(nxt)
            self.applied[b.src] = nxt[0].seq
            self.released.append(nxt[1])
        if held is not None and not held:
            del self.held[b.src]

    @property
    def held_offsets(self) -> set[int]:
        """Offsets (in this partition of the deltas topic) of the batches held for a missing
        predecessor: not applied, so their input must not be acked."""
        return {off for held in self.held.values() for _, off in held.values()}

    def apply(
        self, batches: Sequence[DeltaBatch], offsets: Sequence[int] | None = None, *, reference: bool = True
    ) -> tuple[set[EntityKey], FeatureRecord | None]:
        """Apply the delta batches not applied yet, in each source's seq order; returns the
        touched entities and the changelog record (None when nothing was applied). With
        ``offsets`` (of each batch in the deltas topic) and ``reference`` the record references
        the batches applied instead of copying their rows.

        >>> from ctr.streams.agents.deltas import DeltaBatch
        >>> shard = FeatureShard(0)
        >>> batch = lambda seq: DeltaBatch(src=3, seq=seq, max_time=0, rows=[(1, "ad7", 0, seq, 0)])
        >>> shard.apply([batch(1), batch(3)], [10, 11])[1].deltas   # 3 waits for 2
        [(10, 3, 1)]
        >>> shard.held_offsets
        {11}
        >>> shard.apply([batch(2), batch(3)], [12, 13])[1].deltas   # 2 releases 3; 3 again: a duplicate
        [(12, 3, 2), (11, 3, 3)]
        >>> shard.counts[(1, "ad7")][0], shard.held_offsets, shard.released
        ([6, 0], set(), [11])
        """
        # Rows are not merged by key: a key may repeat (its impressions and its clicks, or two
        # source partitions), which the counts and a restore sum up alike -- merging first cost
        # as much as applying.
        ready: list[tuple[DeltaBatch, int]] = []
        for i, b in enumerate(batches):
            self._offer(b, -1 if offsets is None else offsets[i], ready)
        if not ready:
            return set(), None
        rows: list[tuple[int, str, int, int, int]] = []
        refs: list[tuple[int, int, int]] = []
        for b, offset in ready:
            if offsets is not None and reference:
                refs.append((offset, b.src, b.seq))
            if b.max_time > self.clock:
                self.clock = b.max_time
            rows.extend(b.rows)
        touched: set[EntityKey] = set()
        self._add(rows, touched)
        self.rows_applied += len(rows)
        self.seq += 1
        rec = FeatureRecord(self.seq, dict(self.applied), self.clock, self.feast_confirmed, [] if refs else rows, refs)
        self._recorded_confirmed = self.feast_confirmed
        self.live[self.seq] = max((r[2] for r in rows), default=NEG_INF)
        return touched, rec

    def checkpoint(self) -> FeatureRecord:
        """An empty record carrying the current versions, clock and ``feast_confirmed``."""
        self.seq += 1
        self.live[self.seq] = NEG_INF
        return FeatureRecord(self.seq, dict(self.applied), self.clock, self.feast_confirmed, [])

    @property
    def recorded_feast_confirmed(self) -> int:
        return self._recorded_confirmed

    def values(self, ek: EntityKey) -> dict[str, Any]:
        """The entity's Feast row (join key and every window's impressions, clicks, CTR)."""
        return self.rows([ek])[0]

    def rows(self, entities: Iterable[EntityKey]) -> list[dict[str, Any]]:
        """:meth:`values` of many entities at the current clock (the window ranges computed once:
        a flush after a fast replay asks for tens of thousands)."""
        from ctr.features.store import JOIN_KEYS

        join_keys = [JOIN_KEYS[e] for e in ENTITY_KINDS]
        ranges = self.plan.ranges(self.clock)
        # (lo, hi, width, names) per window, per entity kind
        plans = {
            kind: [
                (lo, hi, hi - lo, n_imp, n_clk, n_ctr)
                for (_, lo, hi), (_, n_imp, n_clk, n_ctr) in zip(ranges, names, strict=True)
            ]
            for kind, names in self._names.items()
        }
        prior_clicks = self.spec.prior_strength * self.spec.prior_ctr
        prior_n = self.spec.prior_strength
        counts = self.counts
        out = []
        for ek in entities:
            kind, key = ek
            row: dict[str, Any] = {join_keys[kind]: key}
            buckets = counts.get(ek, {})
            nb = len(buckets)
            for lo, hi, width, n_imp, n_clk, n_ctr in plans[kind]:
                imps = clicks = 0
                if nb <= width:
                    for b, (i, c) in buckets.items():
                        if lo <= b < hi:
                            imps += i
                            clicks += c
                else:
                    for b in range(lo, hi):
                        v = buckets.get(b)
                        if v is not None:
                            imps += v[0]
                            clicks += v[1]
                row[n_imp] = imps
                row[n_clk] = clicks
                row[n_ctr] = (clicks + prior_clicks) / (imps + prior_n)  # FeatureSpec.smoothed_ctr
            out.append(row)
        return out

    def prune(self) -> int:
        """Forget buckets no window can reach any more (once per hop bucket of the clock)."""
        cur = self.clock // self.plan.bucket_ms
        if cur <= self._pruned_at:
            return 0
        self._pruned_at = cur
        oldest = cur - self.plan.horizon
        dropped = 0
        for ek in list(self.counts):
            buckets = self.counts[ek]
            for b in [b for b in buckets if b < oldest]:
                del buckets[b]
                dropped += 1
            if not buckets:
                del self.counts[ek]
        return dropped

    def dead_records(self) -> list[int]:
        """Records whose buckets left every window and whose entities are written to Feast."""
        oldest = self.clock // self.plan.bucket_ms - self.plan.horizon
        dead = [s for s, newest in self.live.items() if newest < oldest and s <= self.feast_confirmed and s < self.seq]
        for s in dead:
            del self.live[s]
        return dead

    @classmethod
    def restore(
        cls, partition: int, spec: FeatureSpec, records: Iterable[FeatureRecord]
    ) -> tuple[FeatureShard, set[EntityKey]]:
        """Sum the live records again; returns the shard and the entities to write to Feast
        again (touched by records after the last ``feast_confirmed``). Records that reference
        their rows by offset must be inlined first (:func:`inline_deltas`)."""
        shard = cls(partition, spec)
        recs = sorted(records, key=lambda r: r.seq)
        if any(r.by_offsets for r in recs):
            raise ValueError("records reference delta batches by offset: inline_deltas() them first")
        rewrite: set[EntityKey] = set()
        if not recs:
            return shard, rewrite
        confirmed = recs[-1].feast_confirmed
        for rec in recs:
            touched: set[EntityKey] = set()
            shard._add(rec.rows, touched)
            if rec.seq > confirmed:
                rewrite |= touched
            shard.live[rec.seq] = max((r[2] for r in rec.rows), default=NEG_INF)
        last = recs[-1]
        shard.seq, shard.applied, shard.clock = last.seq, dict(last.applied), last.clock
        shard.feast_confirmed = shard._recorded_confirmed = confirmed
        return shard, rewrite


# ---------------------------------------------------------------------- Feast sink
class FeatureSink(Protocol):
    """Where :class:`FeastWriterLoop` writes the rows of one entity kind (:class:`FeastSink`,
    :class:`ProcessFeastSink`); returns the rows written."""

    def write(self, kind: int, rows: list[dict[str, Any]], times_ms: list[int]) -> int: ...

    def close(self) -> None: ...


class FeastSink:
    """Writes rows with :class:`ctr.features.store.FeatureWriter` (newest event time wins), in
    this process."""

    def __init__(self, feast_dir: str | None, online: str | None = None, redis_url: str | None = None) -> None:
        from ctr.features.store import FeatureWriter, open_store

        self.store = open_store(feast_dir, online=online, redis_url=redis_url)  # type: ignore[arg-type]
        self.writer = FeatureWriter(self.store)

    def write(self, kind: int, rows: list[dict[str, Any]], times_ms: list[int]) -> int:
        from ctr.features.store import STATS_VIEWS

        return self.writer.write(STATS_VIEWS[ENTITY_KINDS[kind]], rows, times_ms)

    def close(self) -> None:
        return None


_child_sink: FeastSink | None = None


def _child_init(feast_dir: str | None, online: str | None, redis_url: str | None) -> None:
    from ctr.infra.procs import die_with_parent

    die_with_parent()
    global _child_sink
    # The writer runs at the worker's priority. It used to drop to nice 5 so that under CPU
    # pressure the Kafka side kept its pace and the writer coalesced more; on a saturated
    # 2-core host (worker, broker, load generator) that starved it into a feedback loop -- a
    # slow write collects more dirty entities, so the next write is bigger and slower -- and
    # feature freshness at 2,000 events/s went to p99 7 s (1.4 s at normal priority).
    _child_sink = FeastSink(feast_dir, online, redis_url)


def _child_write(kind: int, rows: list[dict[str, Any]], times_ms: list[int]) -> int:
    assert _child_sink is not None
    return _child_sink.write(kind, rows, times_ms)


def _child_ping() -> bool:
    return _child_sink is not None


class ProcessFeastSink:
    """:class:`FeastSink` in a helper process. Feast's write path is pure Python (about 4-5k
    rows/s on SQLite here); in a thread it would hold the GIL against the event loop that
    consumes Kafka and heartbeats. The helper opens the store once (``import feast`` takes
    seconds) while the worker already consumes; writes queue behind that."""

    def __init__(self, feast_dir: str | None, online: str | None = None, redis_url: str | None = None) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")  # the worker has threads: never fork it
        self.pool = ProcessPoolExecutor(
            1, mp_context=ctx, initializer=_child_init, initargs=(feast_dir, online, redis_url)
        )
        self._t0 = time.monotonic()
        self.ready = self.pool.submit(_child_ping)
        self.ready.add_done_callback(self._on_ready)

    def _on_ready(self, fut: Any) -> None:
        if fut.cancelled():
            return
        err = fut.exception()
        if err is None:
            log.info("Feast writer process ready after %.1fs", time.monotonic() - self._t0)
        else:
            log.error("Feast writer process failed to start: %r", err)

    @property
    def state(self) -> str:
        """``starting`` (opening the store; writes queue), ``ready`` or ``failed``."""
        if not self.ready.done():
            return "starting"
        return "ready" if not self.ready.cancelled() and self.ready.exception() is None else "failed"

    def write(self, kind: int, rows: list[dict[str, Any]], times_ms: list[int]) -> int:
        return self.pool.submit(_child_write, kind, rows, times_ms).result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class FeastWriterLoop:
    """Coalescing micro-batch writer: entities touched since the last write are written once,
    with their values at that moment; one write in flight at a time, in a worker thread so the
    event loop (heartbeats, consumption) keeps running."""

    shards: dict[int, FeatureShard]
    sink: FeatureSink
    interval_s: float = 0.1
    dirty: dict[int, set[EntityKey]] = field(default_factory=dict)
    rows_written: int = 0
    write_seconds: float = 0.0
    on_written: Callable[[int], object] | None = None  # callback(rows) for metrics
    writes: int = 0
    #: entities of the write in flight (0 between writes): not in the store yet either
    in_flight: int = 0
    _task: asyncio.Task | None = None
    _busy: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def pending(self) -> int:
        """Entities waiting for their next write (the write in flight not included)."""
        return sum(map(len, list(self.dirty.values())))  # list(): also read by /metrics' thread

    def mark(self, partition: int, entities: Iterable[EntityKey]) -> None:
        self.dirty.setdefault(partition, set()).update(entities)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep the agent alive; rows stay dirty and are retried
                log.exception("Feast write failed; retrying")
                await asyncio.sleep(1.0)

    async def flush(self) -> int:
        """Write the dirty entities of every owned partition; marks ``feast_confirmed``."""
        async with self._busy:
            if not any(self.dirty.values()):
                return 0
            dirty, self.dirty = self.dirty, {}
            by_kind: dict[int, tuple[list[dict[str, Any]], list[int]]] = {}
            confirm: dict[int, int] = {}
            for p, ents in dirty.items():
                shard = self.shards.get(p)
                if shard is None:
                    continue  # partition revoked: its new owner rewrites what it restores
                confirm[p] = shard.seq
                clock = shard.clock
                for ek, row in zip(ents, shard.rows(ents), strict=True):
                    rows, times = by_kind.setdefault(ek[0], ([], []))
                    rows.append(row)
                    times.append(clock)
            t0 = time.perf_counter()
            loop = asyncio.get_running_loop()
            n = 0
            self.in_flight = sum(len(r) for r, _ in by_kind.values())
            try:
                for kind, (rows, times) in by_kind.items():
                    n += await loop.run_in_executor(None, self.sink.write, kind, rows, times)
            except BaseException:
                for p, ents in dirty.items():
                    self.mark(p, ents)
                raise
            finally:
                self.in_flight = 0
            self.write_seconds += time.perf_counter() - t0
            written = sum(len(r) for r, _ in by_kind.values())
            self.rows_written += written
            self.writes += 1
            if self.on_written is not None:
                self.on_written(written)
            for p, seq in confirm.items():
                shard = self.shards.get(p)
                if shard is not None and seq > shard.feast_confirmed:
                    shard.feast_confirmed = seq
            return n


def _metrics() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge

    from ctr.streams.metrics import metric as get

    return {
        "batches": get("ctr_features_delta_batches_total", Counter, "Feature delta batches", ["result"]),
        "rows": get("ctr_features_feast_rows_total", Counter, "Rows written to the Feast online store"),
        "entities": get("ctr_features_entities", Gauge, "Entities with counts", ["partition"]),
        # Feast lag: entities whose newest counts are not in the online store yet (queued or
        # being written: 0 means the store holds every count the agent has)
        "pending": get("ctr_features_pending_entities", Gauge, "Entities waiting for their Feast write or in it"),
        "sink_ready": get("ctr_features_sink_ready", Gauge, "1 once the Feast writer has opened the store"),
    }


class WindowedFeatureAgent:
    """The Faust side: delta batches in, :class:`FeatureShard` per owned partition, records to
    the ``feature-state`` table's changelog, Feast writes through :class:`FeastWriterLoop`."""

    def __init__(
        self,
        app: CtrApp,
        table: StateTable,
        deltas_topic: str,
        sink: FeatureSink,
        output: OutputProducer,
        spec: FeatureSpec = SPEC,
        *,
        interval_s: float = 0.1,
        changelog: str = "offsets",
        bootstrap: str | None = None,
    ) -> None:
        from ctr.infra.deadletter import DeadLetterSink
        from ctr.streams.app import BulkAgentBase

        if changelog not in CHANGELOG_MODES:
            raise ValueError(f"changelog must be one of {CHANGELOG_MODES}")
        #: changelog records reference delta batches by offset: restores read them from here
        self.by_offsets = changelog == "offsets"
        if self.by_offsets and not bootstrap:
            raise ValueError("changelog='offsets' needs the bootstrap to read delta batches back")
        self.bootstrap = bootstrap
        self.table = table
        self.spec = spec
        self.deltas_topic = deltas_topic
        self.shards: dict[int, FeatureShard] = {}
        self.writer = FeastWriterLoop(self.shards, sink, interval_s=interval_s)
        self.dlq = DeadLetterSink("windowed-features", lambda t, k, v, h: output.send(t, k, v, 0, h))
        self.output = output
        self.metrics = _metrics()
        self.writer.on_written = self.metrics["rows"].inc
        self.metrics["pending"].set_function(lambda: self.writer.pending + self.writer.in_flight)
        self.metrics["sink_ready"].set_function(lambda: float(getattr(sink, "state", "ready") == "ready"))
        outer = self

        class _Runner(BulkAgentBase):
            def owned_topic(self) -> str:
                return outer.deltas_topic

            async def build_partitions(self, partitions: set[int]) -> None:
                await outer.build(partitions)

            def drop_partitions(self, partitions: set[int]) -> None:
                for p in partitions:
                    outer.shards.pop(p, None)
                    outer.writer.dirty.pop(p, None)

            async def process(self, batch: Batch) -> None:
                await outer.process(batch, self)

            async def on_idle(self) -> None:
                await outer.checkpoint()

        self.runner = _Runner(app, app.bulk_queue([deltas_topic], maxsize=64), max_events=256, within_s=0.01)

    async def run(self) -> None:
        self.writer.start()
        await self.runner.run()

    async def build(self, partitions: set[int]) -> None:
        from ctr.streams.app import table_items

        # Finish the write in flight before the shards it may confirm change owner.
        async with self.writer._busy:
            pass
        for p in sorted(partitions):
            recs = [decode_record(v) for _, v in table_items(self.table, partition_prefix(p))]
            recs = await self._inline(p, recs)
            shard, rewrite = FeatureShard.restore(p, self.spec, recs)
            self.shards[p] = shard
            if rewrite:
                self.writer.mark(p, rewrite)
            if recs:
                log.info(
                    "feature partition %d restored from %d records (seq %d, %d entities, %d to rewrite)",
                    p,
                    len(recs),
                    shard.seq,
                    len(shard.counts),
                    len(rewrite),
                )

    async def _inline(self, p: int, recs: list[FeatureRecord]) -> list[FeatureRecord]:
        """Read back the delta batches that records reference by offset (one range read per
        partition, from the oldest live reference to the newest)."""
        from ctr.infra.kafka_io import offset_of, read_range

        ranged = [r for r in recs if r.by_offsets]
        if not ranged:
            return recs
        if not self.bootstrap:
            raise RuntimeError(f"feature partition {p}: records reference delta batches by offset; no bootstrap given")
        offsets = [o for r in ranged for o, _, _ in r.deltas]
        first, last = min(offsets), max(offsets)
        t0 = time.perf_counter()
        msgs = await asyncio.to_thread(read_range, self.bootstrap, self.deltas_topic, p, first, last)
        batches = {offset_of(m): m.value() for m in msgs}
        log.info("feature partition %d: read back %d of %d delta batches (offsets %d..%d) in %.2fs",
                 p, len(offsets), len(batches), first, last, time.perf_counter() - t0)  # fmt: skip
        return [inline_deltas(r, batches) for r in recs]

    async def process(self, batch: Batch, runner: InputAcker) -> None:
        from ctr.streams.app import send_changelog

        by_part: dict[int, list[DeltaBatch]] = {}
        offsets: dict[int, list[int]] = {}
        for c in batch.chunks:
            if c.partition not in self.shards:
                continue
            lst = by_part.setdefault(c.partition, [])
            offs = offsets.setdefault(c.partition, [])
            for r in c.records:
                try:
                    lst.append(decode_deltas(r.value))
                    offs.append(r.offset)
                except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as err:
                    self.dlq.send(
                        f"bad delta batch: {err}",
                        r.value,
                        source_topic=c.topic,
                        partition=c.partition,
                        offset=r.offset,
                        key=r.key,
                    )
        changelog: list[ChangelogRecord] = []
        for p, batches in by_part.items():
            shard = self.shards[p]
            touched, rec = shard.apply(batches, offsets[p], reference=self.by_offsets)
            self.metrics["batches"].labels("duplicate").inc(shard.duplicates)
            self.metrics["batches"].labels("reordered").inc(shard.reordered)
            if shard.reordered:
                log.warning("feature partition %d: %d delta batches arrived ahead of their predecessor; "
                            "held (%d now)", p, shard.reordered, len(shard.held_offsets))  # fmt: skip
            shard.duplicates = shard.reordered = 0
            if rec is None:
                continue
            self.metrics["batches"].labels("applied").inc(len(rec.deltas) if rec.deltas else len(batches))
            # Marked before the record is durable: a Feast row written from counts whose record
            # is then lost in a crash is rewritten with the same counts after the replay.
            self.writer.mark(p, touched)
            shard.prune()
            for s in shard.dead_records():
                changelog.append((p, record_key(p, s), None))
            changelog.append((p, record_key(p, rec.seq), encode_record(rec)))
            self.metrics["entities"].labels(str(p)).set(len(shard.counts))
        if self.dlq.count:
            await self.output.delivered()
        await send_changelog(self.table, changelog)
        self._ack(batch.chunks, runner)

    def _ack(self, chunks: Sequence[Chunk], runner: InputAcker) -> None:
        """Ack the input whose effects are recorded: everything but the batches still held for
        a missing predecessor (Faust's commit stops below the first of those, so a restart
        reads them again), plus the held batches applied in this round."""
        from faust.types import TP

        held = {p: shard.held_offsets for p, shard in self.shards.items() if shard.held}
        ranges: list[tuple[TP, int, int]] = []
        for c in chunks:
            lo = c.ack_from
            for off in sorted(o for o in held.get(c.partition, ()) if c.ack_from <= o <= c.records[-1].offset):
                ranges.append((c.tp, lo, off - 1))
                lo = off + 1
            ranges.append((c.tp, lo, c.records[-1].offset))
        for p, shard in self.shards.items():
            if shard.released:
                tp = TP(self.deltas_topic, p)
                ranges.extend((tp, off, off) for off in shard.released)
                shard.released = []
        runner.ack_ranges(ranges)

    async def checkpoint(self) -> None:
        """When idle, record ``feast_confirmed`` progress so a restart rewrites less."""
        from ctr.streams.app import send_changelog

        changelog: list[ChangelogRecord] = []
        for p, shard in self.shards.items():
            if shard.feast_confirmed > shard.recorded_feast_confirmed and not self.writer.dirty.get(p):
                rec = shard.checkpoint()
                shard._recorded_confirmed = shard.feast_confirmed
                for s in shard.dead_records():
                    changelog.append((p, record_key(p, s), None))
                changelog.append((p, record_key(p, rec.seq), encode_record(rec)))
        await send_changelog(self.table, changelog)
