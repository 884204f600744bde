"""The label join as a Faust agent: batches of chunks in, one :class:`~ctr.streams.agents.label_join.JoinPartition`
per owned partition, records to the ``join-state`` table's changelog, outputs through confluent-kafka.

Delivery guarantee (at-least-once input, idempotent/versioned effects)
--------------------------------------------------------------------------
Each micro-batch of partition *p* becomes ONE changelog record (:class:`JoinRecord`, key
``p:seq``) holding the batch's accepted inputs, the watermark before and after, the input
offsets applied (``imp_hwm``/``click_hwm``), cumulative counters and ``confirmed`` = the last
batch whose outputs are known delivered. Clicks are copied (id and time); impressions are, by
default (``changelog_impressions="offsets"``), referenced by the offset range the batch read
from the impressions topic -- the topic itself is their log, as Kafka Streams reuses a source
topic as a table's changelog -- and read back at a restore (:func:`inline_impressions`). That
keeps the impressions' bytes out of the changelog (~660 -> ~2 value bytes per event before
compression), which the broker acknowledges before any output leaves; it needs the impressions
topic to keep its records while a batch's record is live (the attribution window plus what is
unconfirmed), and a restore fails loudly if they are gone.
``inline`` copies them. The order per batch is:

1. records at or below the offsets already applied are skipped (replayed input changes nothing);
2. the record is written to the table's changelog and *acknowledged* by the broker;
3. only then the outputs go out: examples (key = impression ``event_id``, so downstream can
   drop a replayed duplicate), late clicks (key = impression id), and one feature-delta
   message per feature partition carrying ``(source partition, seq)`` -- a version the
   feature agent uses to apply each delta batch exactly once;
4. the input offsets are acked to Faust (commit happens later, never ahead of step 2);
5. before the next record is written, the outputs of this one are awaited (``confirmed``).

Records of one partition are durable in order (aiokafka keeps one in-flight batch per
partition: ``aiokafka/producer/sender.py``, muted partitions), so a record is never durable
without every earlier record of its partition. After a kill -9 the table comes back from its
changelog and :meth:`JoinPartition.restore`
re-runs the same deterministic step over the live records (a contiguous suffix of the log),
which rebuilds the pending impressions and buffered clicks exactly, and re-sends the outputs
of the records after ``confirmed`` (they may or may not have left before the kill). Consequences: no example is
lost; an example may be emitted twice, with the same key and the same label; feature deltas
are re-sent with the same version and applied once. Records are deleted (tombstones) once
everything in them is emitted and confirmed.

There is one mode: at-least-once input with idempotent, versioned effects, which gives
exactly-once *effects* (one first example per impression, one correction per late-joined
click, the true final label; each count applied once, each example learned once). Faust
transactions were offered as ``--guarantee exactly_once`` until they were measured to add no
guarantee (the outputs leave through confluent-kafka, outside the transaction) and to cost
throughput (streams/README.md), so the option was removed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from ctr.infra.kafka_io import DeliveryTracker
from ctr.infra.schema import (
    Click,
    Impression,
    SchemaError,
    decode_click,
    decode_impression,
    encode,
)
from ctr.infra.topics import CLICKS_TOPIC, EXAMPLES_TOPIC, IMPRESSIONS_TOPIC, LATE_TOPIC
from ctr.streams.agents.changelog_keys import partition_prefix, record_key
from ctr.streams.agents.deltas import encode_deltas, split_deltas
from ctr.streams.agents.join_records import JoinRecord, decode_record, encode_record, inline_impressions
from ctr.streams.agents.label_join import (
    LATE_REASON_HEADER,
    JoinConfig,
    JoinPartition,
    StepOutput,
)
from ctr.streams.watermarks import watermark_of

if TYPE_CHECKING:
    from faust.types import TP, FutureMessage

    from ctr.streams.app import Batch, ChangelogRecord, CtrApp, InputAcker, OutputProducer, StateTable

log = logging.getLogger(__name__)


def _metrics() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge

    from ctr.streams.metrics import metric as get

    return {
        "events": get("ctr_join_events_total", Counter, "Records consumed by the label join", ["topic"]),
        "examples": get("ctr_join_examples_total", Counter, "Training examples emitted", ["label"]),
        "late": get("ctr_join_late_clicks_total", Counter, "Clicks sent to late-events", ["reason"]),
        "batches": get("ctr_join_batches_total", Counter, "Join micro-batches"),
        "watermark": get("ctr_join_watermark_ms", Gauge, "Join watermark (event time)", ["partition"]),
        "pending": get("ctr_join_pending", Gauge, "Impressions waiting for their window", ["partition"]),
    }


@dataclass
class _Flight:
    """A round between "records written" and "outputs acknowledged"."""

    futures: list[FutureMessage]
    results: list[tuple[JoinPartition, StepOutput, int]]  # (partition state, its outputs, seq)
    acks: list[tuple[TP, int, int]]  # (tp, first offset, last offset)
    tracker: DeliveryTracker | None = None  # set when the outputs are sent (_finish)
    sent: int = 0


class LabelJoinAgent:
    """The Faust side of the join: batches of chunks in, :class:`JoinPartition` per owned
    partition, records to the ``join-state`` table's changelog, outputs via confluent-kafka."""

    def __init__(
        self,
        app: CtrApp,
        table: StateTable,
        output: OutputProducer,
        deltas_topic: str,
        config: JoinConfig | None = None,
        *,
        max_events: int = 8000,
        max_record_bytes: int = 900_000,
        max_inflight: int = 2,
        bootstrap: str | None = None,
    ) -> None:
        from ctr.infra.deadletter import DeadLetterSink
        from ctr.streams.app import BulkAgentBase

        self.cfg = config or JoinConfig()
        #: changelog records reference impressions by offset: restores read them from here
        self.by_offsets = self.cfg.changelog_impressions == "offsets"
        if self.by_offsets and not bootstrap:
            raise ValueError("changelog_impressions='offsets' needs the bootstrap to read impressions back")
        self.bootstrap = bootstrap
        self.table = table
        self.output = output
        self.deltas_topic = deltas_topic
        self.max_record_bytes = max_record_bytes
        self.states: dict[int, JoinPartition] = {}
        self.dlq = DeadLetterSink("label-join", lambda t, k, v, h: output.send(t, k, v, 0, h))
        self.metrics = _metrics()
        self.events = 0
        outer = self

        class _Runner(BulkAgentBase):
            def owned_topic(self) -> str:
                return IMPRESSIONS_TOPIC

            async def build_partitions(self, partitions: set[int]) -> None:
                await outer.build(partitions)

            def drop_partitions(self, partitions: set[int]) -> None:
                for p in partitions:
                    outer.states.pop(p, None)
                    outer._unconfirmed.discard(p)

            async def process(self, batch: Batch) -> None:
                await outer.process(batch, self)

            async def on_idle(self) -> None:
                await outer.checkpoint(self)

            def next_offset(self, tp: TP) -> int | None:
                jp = outer.states.get(tp.partition)
                if jp is None:
                    return None
                return (jp.imp_hwm if tp.topic == IMPRESSIONS_TOPIC else jp.click_hwm) + 1

            async def quiesce(self) -> None:
                await outer.quiesce(self)

        self.app = app
        self._unconfirmed: set[int] = set()
        self._inflight: deque[_Flight] = deque()
        self._sent: deque[_Flight] = deque()
        self.max_inflight = max_inflight
        #: wall seconds per phase of the rounds (reported by the worker's status line)
        self.timings: dict[str, float] = dict.fromkeys(("confirm", "step", "pipeline_wait", "rounds"), 0.0)
        self.runner = _Runner(app, app.bulk_queue([IMPRESSIONS_TOPIC, CLICKS_TOPIC]), max_events=max_events)

    async def run(self) -> None:
        await self.runner.run()

    # ---- (re)assignment
    async def build(self, partitions: set[int]) -> None:
        from ctr.streams.app import table_items

        for p in sorted(partitions):
            recs = [decode_record(v) for _, v in table_items(self.table, partition_prefix(p))]
            t0 = time.perf_counter()
            recs = await self._inline(p, recs)
            jp, resend = JoinPartition.restore(p, self.cfg, recs)
            self.states[p] = jp
            if recs:
                for seq, out in resend:
                    self._send_outputs(jp, out, seq)
                await self.output.delivered()
                log.info("join partition %d restored from %d records in %.2fs (seq %d, %d pending, "
                         "re-sent %d examples)", p, len(recs), time.perf_counter() - t0, jp.seq,
                         len(jp.pending), sum(len(o.examples) for _, o in resend))  # fmt: skip
            jp.mark_confirmed(jp.seq)

    async def _inline(self, p: int, recs: list[JoinRecord]) -> list[JoinRecord]:
        """Read back the impressions that records reference by offset (one range read per
        partition: the live records are a contiguous suffix of the log)."""
        from ctr.infra.kafka_io import offset_of, read_range

        ranged = [r for r in recs if r.by_offsets]
        if not ranged:
            return recs
        if not self.bootstrap:
            raise RuntimeError(f"join partition {p}: records reference impressions by offset; no bootstrap given")
        first, last = min(r.imp_first for r in ranged), max(r.imp_last for r in ranged)
        t0 = time.perf_counter()
        msgs = await asyncio.to_thread(read_range, self.bootstrap, IMPRESSIONS_TOPIC, p, first, last)
        records = [(offset_of(m), m.value(), m.headers()) for m in msgs]
        log.info("join partition %d: read back %d impressions (offsets %d..%d) in %.2fs",
                 p, len(records), first, last, time.perf_counter() - t0)  # fmt: skip
        return [inline_impressions(r, records) for r in recs]

    # ---- one micro-batch
    async def process(self, batch: Batch, runner: InputAcker) -> None:
        """Apply a batch in rounds: each round writes at most one record per partition of at
        most ``max_record_bytes`` of impressions; the remainder goes to the next round.

        Rounds are pipelined: round N+1 is computed while round N's records are on their way
        to the broker. A round's outputs leave, and its input offsets are acked, only once its
        records are acknowledged (:meth:`_complete`); a partition's ``confirmed`` advances only
        over rounds whose outputs are acknowledged, in order (:meth:`_confirm`)."""
        by_part: dict[int, list] = {}
        for c in batch.chunks:
            if c.partition in self.states:
                by_part.setdefault(c.partition, []).append([c, 0])
        while by_part:
            await self._round(by_part, runner)

    async def _round(self, by_part: dict[int, list], runner: InputAcker) -> None:
        from ctr.streams.app import send_changelog

        work = []
        acks: list[tuple[TP, int, int]] = []
        for p in list(by_part):
            jp = self.states[p]
            cursors = by_part[p]
            raws: list[bytes] = []
            imps: list[Impression] = []
            clicks: list[Click] = []
            markers: tuple[list[int], list[int]] = ([], [])
            imp_hwm = click_hwm = None
            imp_first = imp_last = -1
            skipped = dl = size = 0
            # offsets accepted so far this round, per topic: a partition's chunks can overlap
            # (a chunk fetched before a rebalance is still queued when the re-fetch from the
            # committed offset arrives; noida-db restarts generation ids at 1 after a broker
            # restart, so the stale chunk passes the generation check), and an overlap must not
            # be applied twice -- that put clicks out of order in a chaos run
            seen = {IMPRESSIONS_TOPIC: jp.imp_hwm, CLICKS_TOPIC: jp.click_hwm}
            for cur in cursors:
                c, i = cur
                recs = c.records
                is_imp = c.topic == IMPRESSIONS_TOPIC
                hwm = seen[c.topic]
                n = len(recs)
                start = i
                while i < n and size <= self.max_record_bytes:
                    r = recs[i]
                    i += 1
                    if r.offset <= hwm:
                        skipped += 1
                        continue
                    m = watermark_of(r.headers) if r.headers else None
                    if m is not None:
                        markers[0 if is_imp else 1].append(m)
                        continue
                    try:
                        if is_imp:
                            imps.append(decode_impression(r.value))
                            raws.append(r.value)
                            size += len(r.value)
                            if imp_first < 0:
                                imp_first = r.offset
                            imp_last = r.offset
                        else:
                            clicks.append(decode_click(r.value))
                    except SchemaError as err:
                        dl += 1
                        self.dlq.send(str(err), r.value, source_topic=c.topic, partition=p, offset=r.offset, key=r.key)
                if i > start:
                    last = recs[i - 1].offset
                    seen[c.topic] = max(hwm, last)
                    acks.append((c.tp, c.ack_from if start == 0 else recs[start - 1].offset + 1, last))
                    if is_imp:
                        imp_hwm = last if imp_hwm is None else max(imp_hwm, last)
                    else:
                        click_hwm = last if click_hwm is None else max(click_hwm, last)
                    self.metrics["events"].labels(c.topic).inc(i - start)
                    self.events += i - start
                cur[1] = i
            by_part[p] = [cur for cur in cursors if cur[1] < len(cur[0].records)]
            if not by_part[p]:
                del by_part[p]
            if raws or clicks or markers[0] or markers[1] or dl:
                rng = (imp_first, imp_last) if self.by_offsets and raws else None
                work.append((jp, raws, imps, clicks, markers, imp_hwm, click_hwm, dl, skipped, rng))
        t0 = time.perf_counter()
        self._confirm()
        if any(w[7] for w in work):
            await self.output.delivered()  # dead letters leave before the record covering them
        t1 = time.perf_counter()
        results = []
        changelog: list[ChangelogRecord] = []
        for jp, raws, imps, clicks, markers, imp_hwm, click_hwm, dl, skipped, rng in work:
            p = jp.partition
            out, rec = jp.process(raws, imps, clicks, markers[0], markers[1], imp_hwm, click_hwm, dl, skipped, rng)
            for s in jp.dead_records():
                changelog.append((p, record_key(p, s), None))
            changelog.append((p, record_key(p, rec.seq), encode_record(rec)))
            results.append((jp, out, rec.seq))
        t2 = time.perf_counter()
        futures = await send_changelog(self.table, changelog, wait=False)
        flight = _Flight(futures, results, acks)
        self._inflight.append(flight)
        if futures:
            # finish the round (send its outputs) as soon as its records are acknowledged,
            # not when the next round happens to run
            futures[-1].add_done_callback(lambda _f: asyncio.get_running_loop().call_soon(self._complete_ready, runner))
        await self._complete(runner, depth=self.max_inflight)
        t = self.timings
        t["confirm"] += t1 - t0
        t["step"] += t2 - t1
        t["pipeline_wait"] += time.perf_counter() - t2
        t["rounds"] += 1

    async def _complete(self, runner: InputAcker, depth: int = 0) -> None:
        """Finish the in-flight rounds whose records are acknowledged (waiting for the oldest
        while more than ``depth`` are in flight): send their outputs, ack their input."""
        inflight = self._inflight
        while inflight:
            head = inflight[0]
            if not all(f.done() for f in head.futures):
                if len(inflight) <= depth:
                    break
                await asyncio.gather(*head.futures)
                continue  # the head may have been completed meanwhile by _complete_ready
            self._finish(head, runner)
        self.output.producer.poll(0)

    def _complete_ready(self, runner: InputAcker) -> None:
        """Finish, without waiting, the in-flight rounds whose records are acknowledged."""
        inflight = self._inflight
        while inflight and all(f.done() for f in inflight[0].futures):
            self._finish(inflight[0], runner)
        self.output.producer.poll(0)

    def _finish(self, head: _Flight, runner: InputAcker) -> None:
        """The head round's records are acknowledged: send its outputs, ack its input."""
        for f in head.futures:
            f.result()  # a rejected changelog record must not let outputs leave
        assert self._inflight[0] is head
        self._inflight.popleft()
        head.tracker = DeliveryTracker()
        before = self.output.sent
        for jp, out, seq in head.results:
            self._send_outputs(jp, out, seq, head.tracker)
            if out:
                self._unconfirmed.add(jp.partition)
            self.metrics["watermark"].labels(str(jp.partition)).set(max(jp.wm, 0))
            self.metrics["pending"].labels(str(jp.partition)).set(len(jp.pending))
        head.sent = self.output.sent - before
        self._sent.append(head)
        runner.ack_ranges(head.acks)

    def _confirm(self) -> None:
        """Advance ``confirmed`` over the oldest rounds whose outputs are all acknowledged."""
        self.output.producer.poll(0)
        sent = self._sent
        while sent:
            r = sent[0]
            t = r.tracker
            assert t is not None  # a round is in _sent once its outputs are (_finish)
            if t.delivered + t.failed < r.sent:
                break
            if t.failed:
                raise RuntimeError(f"{t.failed} outputs rejected by the broker: {t.errors[:3]}")
            sent.popleft()
            for jp, _, seq in r.results:
                if self.states.get(jp.partition) is jp:
                    jp.mark_confirmed(seq)

    async def quiesce(self, runner: InputAcker) -> None:
        """Finish everything in flight and wait until every output is acknowledged."""
        await self._complete(runner, depth=0)
        await self.output.delivered()
        self._confirm()

    async def checkpoint(self, runner: InputAcker) -> None:
        """When idle: once the last outputs are acknowledged, write an empty record that says
        so (and drops dead records), so a restart re-sends at most its empty delta batches.

        Its (empty) delta batches go out too, after the record is acknowledged like any
        round's: every seq of a source reaches the feature agent, which applies a source's
        batches as an unbroken chain (a missing seq means a reordered batch, held until it
        arrives -- :meth:`FeatureShard.apply <ctr.streams.agents.windowed_features.FeatureShard.apply>`)."""
        from ctr.streams.app import send_changelog

        if not self._unconfirmed and not self._inflight:
            return
        await self.quiesce(runner)
        changelog: list[ChangelogRecord] = []
        written: list[tuple[JoinPartition, StepOutput, int]] = []
        for p in sorted(self._unconfirmed):
            jp = self.states.get(p)
            if jp is None:
                continue
            out, rec = jp.process([], [], [])
            for s in jp.dead_records():
                changelog.append((p, record_key(p, s), None))
            changelog.append((p, record_key(p, rec.seq), encode_record(rec)))
            written.append((jp, out, rec.seq))
        self._unconfirmed.clear()
        await send_changelog(self.table, changelog)
        for jp, out, seq in written:
            self._send_outputs(jp, out, seq)

    def _send_outputs(
        self, jp: JoinPartition, out: StepOutput, seq: int, tracker: DeliveryTracker | None = None
    ) -> None:
        send = partial(self.output.send, tracker=tracker)
        p = jp.partition
        pos = self.output.send_many(EXAMPLES_TOPIC, p, out.examples, tracker=tracker)
        if out.examples:
            self.metrics["examples"].labels("1").inc(pos)
            self.metrics["examples"].labels("0").inc(len(out.examples) - pos)
        for late in out.late:
            send(
                LATE_TOPIC,
                late.click.impression_id.encode(),
                encode(late.click),
                0,
                [(LATE_REASON_HEADER, late.reason.encode()), ("ctr.partition", str(p).encode())],
            )
            self.metrics["late"].labels(late.reason).inc()
        max_time = max(jp.imp_max, jp.click_max)
        for d, db in enumerate(split_deltas(p, seq, max_time, out, self.cfg.feature_partitions)):
            send(self.deltas_topic, b"%d:%d" % (p, seq), encode_deltas(db), d)
