"""Label join: every impression becomes one first training example (plus a correction iff it
was clicked after that one left), together carrying its true label.

The rules (pure logic in :class:`JoinPartition`, no Faust needed to test it):

* **Partition-local.** Impressions (keyed by ``event_id``) and clicks (keyed by
  ``impression_id``) are co-partitioned, so partition *p* of both topics is joined by one
  :class:`JoinPartition` on one worker.
* **Attribution window** (event time, default 30 s): a click counts for its impression when
  ``0 <= click_time - impression_time <= window_ms``. The label is 1 iff such a click exists.
  Only the first attributed click counts; later ones are counted as ``duplicate_clicks``.
* **Watermark per partition**: ``W = min(side(impressions), side(clicks))``, never
  decreasing, where ``side(topic) = max(max event time seen - allowed_lateness_ms, marker)``.
  Taking the minimum of both topics means a click topic that is consumed behind the
  impression topic never closes windows early: if each topic is in event-time order per
  partition (the replay guarantees it), a click with ``click_time <= W`` has already been
  consumed, so labels do not depend on how the two topics' fetches interleave -- a fast replay
  and a live stream give the same examples. ``marker`` comes from *watermark control
  messages*: a record with the header ``ctr.watermark`` (event time in ms, decimal) on a
  partition of a topic says "no more events before this time here"; producers send one per
  partition when a stream ends or pauses (:func:`send_watermark`), because an idle topic
  carries no event time, and a watermark taken from the wall clock would make results depend
  on timing.
* **Emission** (``JoinConfig.emission``), three orders of the same labels:

  - ``provisional`` (the default): an impression leaves once ``W >= impression_time +
    negative_after_ms`` (default 5 s) -- positive if its click is already joined,
    else as a *provisional negative*. A click attributed after that sends a *correction*
    (the impression again, label 1, ``correction: true``). Every impression reaches the
    learner at its own time and every click at its click: nothing is ordered by label, so the
    model serves what it would with labels known at once (fake negatives, Ktena et al. 2019;
    ``negative_after_ms`` > 0 is ES-DFM's elapsed-time wait, Yang et al. 2021). Per impression:
    one first example, plus one correction iff it was clicked after the first left.
  - ``click``: a positive leaves at its click, a negative when ``W >= impression_time +
    window_ms``. Fresh clicks, but for a window the learner sees a value's clicks without its
    non-clicks: the served model over-rates whatever was shown recently
    (``bench/served_bias.py``).
  - ``window``: every example when its window closes: unbiased, but a click reaches the model
    a window late.

  In every mode the impression stays pending until its window closes, so a second click is
  still a ``duplicate_click``. An impression that arrives when the window is already closed
  (out of order by more than the allowed lateness) is emitted at once, final, with whatever
  clicks were buffered for it, and counted as ``late_impressions``.
* **Early clicks** (consumed before their impression -- the two topics are fetched
  independently) are buffered until ``W >= click_time``; by then their impression must have
  arrived if it exists.
* **Late clicks** go to ``late-events`` with a reason header and are counted, never dropped
  silently: ``after_window`` (delay > window), ``before_impression`` (negative delay),
  ``no_impression`` (no pending impression by the time ``W`` passed the click: its impression
  was emitted already, or never existed). *Which* clicks are late is deterministic; the reason
  of an after-window click is not always (``after_window`` if it arrives while its impression
  is still pending, ``no_impression`` after the impression was emitted).
* **Order is the input's contract**: each topic partition must be in event-time order up to
  ``allowed_lateness_ms``. A click behind the newest click seen by more than that is counted
  as ``out_of_order_clicks`` (impressions likewise): the click side of the watermark may have
  closed its window already, so its label depends on fetch timing. Found the hard way: a test
  that replayed a stream in two halves flushed the first half's pending (future) clicks at the
  split, and under CPU load, when the click fetch lagged, 64-158 clicked impressions came out
  as negatives. Replays keep the order (:func:`ctr.streams.replay.replay_events` resumes a stream
  at any event); producers are idempotent, so a retried batch cannot land after its successor.

Windowed-count deltas for the feature agent are produced here, because only the join knows a
click's impression: an impression adds 1 impression to its user, item and (field, value)
entities in the hop bucket of its event time; an *attributed* click adds 1 click to the same
entities in the bucket of the click's event time (at once, not when the window closes). Late
clicks are not counted as clicks (their impression is gone).

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
~25 % throughput, so the option was removed.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial, reduce
from typing import Any, NamedTuple

import msgspec

from ctr.features.spec import SPEC, FeatureSpec, field_value_key
from ctr.infra.config import CHANGELOG_MODES, EMISSIONS
from ctr.infra.kafka_io import DeliveryTracker
from ctr.infra.schema import (
    WATERMARK_HEADER,
    Click,
    Impression,
    SchemaError,
    decode_click,
    decode_impression,
    encode,
)
from ctr.infra.topics import CLICKS_TOPIC, EXAMPLES_TOPIC, IMPRESSIONS_TOPIC, LATE_TOPIC

log = logging.getLogger(__name__)

NEG_INF = -(1 << 62)
DEFAULT_WINDOW_MS = 30_000
LATE_REASON_HEADER = "ctr.late.reason"
#: Entity kinds, indexed as in :data:`DeltaRow` (0 user, 1 item, 2 field_value).
ENTITY_KINDS: tuple[str, ...] = ("user", "item", "field_value")
COUNTERS: tuple[str, ...] = (
    "impressions", "clicks", "examples", "positives", "provisional", "corrections", "attributed_clicks", "late_clicks",
    "late_after_window", "late_before_impression", "late_no_impression", "late_impressions",
    "duplicate_impressions", "duplicate_clicks", "dead_letters", "markers", "skipped_replayed",
    "out_of_order_impressions", "out_of_order_clicks",
)  # fmt: skip

#: ``(kind index, entity key, hop bucket, impressions delta, clicks delta)``
DeltaRow = tuple[int, str, int, int, int]


@dataclass(frozen=True)
class JoinConfig:
    """Knobs of the join. ``bucket_ms`` is the finest hop of the feature spec's windows."""

    window_ms: int = DEFAULT_WINDOW_MS
    allowed_lateness_ms: int = 0
    #: when examples leave: ``provisional`` | ``click`` | ``window`` (module docstring)
    emission: str = "provisional"
    #: ``provisional``: how long after its impression (event time) an unclicked first example
    #: leaves. 0 sends every impression at once; a few seconds lets most clicks make the first
    #: example positive: in ``bench/served_bias.py`` waiting 0 left the calibration trusting
    #: the network too little (its first scores are learned from negatives alone). At or
    #: above ``window_ms`` this is the ``click`` order.
    negative_after_ms: int = 5_000
    spec: FeatureSpec = SPEC
    feature_partitions: int = 4
    #: how a changelog record holds its impressions: ``offsets`` (the range it consumed from the
    #: impressions topic, read back at restore) or ``inline`` (a copy of every impression)
    changelog_impressions: str = "offsets"

    def __post_init__(self) -> None:
        if self.window_ms <= 0 or self.allowed_lateness_ms < 0:
            raise ValueError("window_ms must be > 0 and allowed_lateness_ms >= 0")
        if self.emission not in EMISSIONS:
            raise ValueError(f"emission must be one of {EMISSIONS}, not {self.emission!r}")
        if self.negative_after_ms < 0:
            raise ValueError("negative_after_ms must be >= 0")
        if self.changelog_impressions not in CHANGELOG_MODES:
            raise ValueError(f"changelog_impressions must be one of {CHANGELOG_MODES}")

    @property
    def bucket_ms(self) -> int:
        return bucket_ms(self.spec)


def bucket_ms(spec: FeatureSpec) -> int:
    """Width of the count buckets: the gcd of every window's hop (60 s for the default spec)."""
    return 1000 * reduce(math.gcd, (w.hop_s for w in spec.windows))


def impression_entities(imp: Impression, fields: Sequence[str]) -> list[tuple[int, str]]:
    """The entities an impression counts for: its user, its item, and ``field=value`` for each
    configured field present in ``imp.categorical``."""
    out = [(0, imp.user_id), (1, imp.item_id)]
    cat = imp.categorical
    for f in fields:
        v = cat.get(f)
        if v is not None:
            out.append((2, field_value_key(f, v)))
    return out


class LateClick(NamedTuple):
    click: Click
    reason: str


class JoinRecord(msgspec.Struct, array_like=True, frozen=True):
    """One micro-batch of one partition, as written to the join table's changelog.

    Its impressions are either copied (``impressions``) or referenced: ``imp_first..imp_last``
    is the offset range of the impressions partition the batch consumed, whose decodable
    non-control records are its ``imp_count`` impressions (:func:`impressions_in`). New
    fields go last, with defaults: records written by an older version still decode."""

    seq: int
    wm_before: int
    wm: int
    imp_max: int
    click_max: int
    imp_marker: int
    click_marker: int
    imp_hwm: int
    click_hwm: int
    confirmed: int
    impressions: list[bytes]
    clicks: list[tuple[str, int]]
    counters: dict[str, int]
    imp_first: int = -1
    imp_last: int = -1
    imp_count: int = 0

    @property
    def by_offsets(self) -> bool:
        """The impressions are referenced by offset, not copied into the record."""
        return self.imp_count > 0 and not self.impressions


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(JoinRecord)
_json = msgspec.json.Encoder()


def encode_record(rec: JoinRecord) -> bytes:
    return _record_encoder.encode(rec)


def decode_record(data: bytes) -> JoinRecord:
    return _record_decoder.decode(data)


def impressions_in(records: Iterable[tuple[int, bytes | None, Any]], first: int, last: int) -> list[bytes]:
    """The impressions a batch accepted from ``(offset, value, headers)`` records of its
    partition: those in ``first..last`` that are neither watermark control messages nor
    malformed (dead-lettered) -- the same test the agent applies, so re-reading a range gives
    back exactly the batch's impressions.

    >>> imp = encode(Impression(event_id="e1", event_time_ms=1, user_id="u", item_id="a"))
    >>> impressions_in([(4, imp, None), (5, b"{", None), (6, b"", [(WATERMARK_HEADER, b"9")]),
    ...                 (7, imp, None)], 4, 6) == [imp]
    True
    """
    out = []
    for offset, value, headers in records:
        if offset < first or offset > last or (headers and watermark_of(headers) is not None):
            continue
        try:
            decode_impression(value)
        except SchemaError:
            continue
        out.append(value)  # type: ignore[arg-type]
    return out


def inline_impressions(rec: JoinRecord, records: Iterable[tuple[int, bytes | None, Any]]) -> JoinRecord:
    """``rec`` with its offset-referenced impressions copied in from ``records`` (read from
    its partition); raises if they are not the ones it consumed."""
    if not rec.by_offsets:
        return rec
    raws = impressions_in(records, rec.imp_first, rec.imp_last)
    if len(raws) != rec.imp_count:
        raise RuntimeError(
            f"join record {rec.seq}: impressions offsets {rec.imp_first}..{rec.imp_last} hold {len(raws)} "
            f"impressions now, the record consumed {rec.imp_count} (was the topic rewritten?)"
        )
    return msgspec.structs.replace(rec, impressions=raws)


def record_key(partition: int, seq: int) -> bytes:
    return b"%03d:%012d" % (partition, seq)


def partition_prefix(partition: int) -> bytes:
    return b"%03d:" % partition


@dataclass
class StepOutput:
    """What one step emits: examples ``(key, value, label)``, late clicks, and the
    ``(kind, entity, bucket)`` keys of every impression / attributed click (counted in C by
    :attr:`deltas`, instead of one Python dict update per entity and event)."""

    examples: list[tuple[bytes, bytes, int]] = field(default_factory=list)
    late: list[LateClick] = field(default_factory=list)
    imp_keys: list[tuple[int, str, int]] = field(default_factory=list)
    click_keys: list[tuple[int, str, int]] = field(default_factory=list)

    @property
    def deltas(self) -> dict[tuple[int, str, int], list[int]]:
        """``(kind, entity, bucket) -> [impressions, clicks]``"""
        out = {k: [n, 0] for k, n in Counter(self.imp_keys).items()}
        for k, n in Counter(self.click_keys).items():
            cur = out.get(k)
            if cur is None:
                out[k] = [0, n]
            else:
                cur[1] += n
        return out

    def __bool__(self) -> bool:
        return bool(self.examples or self.late or self.imp_keys or self.click_keys)

    def extend(self, other: StepOutput) -> None:
        self.examples.extend(other.examples)
        self.late.extend(other.late)
        self.imp_keys.extend(other.imp_keys)
        self.click_keys.extend(other.click_keys)


class _Pending:
    __slots__ = ("imp", "raw", "click_ms", "seq", "emitted", "provisional")

    def __init__(self, imp: Impression, raw: bytes, seq: int) -> None:
        self.imp = imp
        self.raw = raw
        self.seq = seq  # the record it arrived in
        self.click_ms: int | None = None
        self.emitted = False  # its first example left (at its click, or provisionally)
        self.provisional = False  # ... as a provisional negative: its click sends a correction


def example_bytes(
    event_id: str, label: int, raw_impression: bytes, click_ms: int | None, flag: bytes | None = None
) -> bytes:
    """A :class:`~ctr.infra.schema.TrainingExample` as JSON, splicing the impression's validated
    bytes instead of re-encoding it (same JSON a ``encode(TrainingExample(...))`` decodes to).
    ``flag``: ``b"provisional"`` or ``b"correction"``."""
    tail = b"" if click_ms is None else b',"click_time_ms":%d' % click_ms
    if flag is not None:
        tail += b',"%s":true' % flag
    return b'{"example_id":%s,"label":%d,"impression":%s%s}' % (_json.encode(event_id), label, raw_impression, tail)


class JoinPartition:
    """The join state of one partition and the one deterministic step that advances it.

    >>> from ctr.infra.schema import Impression, Click, decode_training_example
    >>> jp = JoinPartition(0, JoinConfig(window_ms=1000))
    >>> imp = Impression(event_id="e1", event_time_ms=10_000, user_id="u", item_id="a")
    >>> out, rec = jp.process([encode(imp)], [imp], [Click(impression_id="e1", event_time_ms=10_400)])
    >>> ex = decode_training_example(out.examples[0][1]); ex.example_id, ex.label, ex.click_time_ms
    ('e1', 1, 10400)
    >>> imp2 = Impression(event_id="e2", event_time_ms=10_500, user_id="u", item_id="b")
    >>> out, rec = jp.process([encode(imp2)], [imp2], [])
    >>> out.examples, rec.seq                    # no click yet, window still open: nothing emitted
    ([], 2)
    >>> out, rec = jp.process([], [], [], imp_markers=[20_000], click_markers=[20_000])
    >>> [(decode_training_example(v).example_id, label) for _, v, label in out.examples]  # e1 not again
    [('e2', 0)]
    """

    def __init__(self, partition: int, config: JoinConfig | None = None) -> None:
        self.partition = partition
        self.cfg = config or JoinConfig()
        self._fields = tuple(self.cfg.spec.stat_fields)
        self._prefixes = tuple((f, field_value_key(f, "")) for f in self._fields)
        self._bucket = self.cfg.bucket_ms
        self.pending: dict[str, _Pending] = {}
        self._deadlines: list[tuple[int, str]] = []
        #: ``provisional`` emission: (impression time, id) of impressions whose first example
        #: has not left yet
        self._firsts: list[tuple[int, str]] = []
        self._on_click = self.cfg.emission != "window"
        self._first_after = self.cfg.negative_after_ms if self.cfg.emission == "provisional" else None
        self.orphans: dict[str, list[int]] = {}
        self._orphan_heap: list[tuple[int, str]] = []
        self.imp_max = NEG_INF
        self.click_max = NEG_INF
        self.imp_marker = NEG_INF
        self.click_marker = NEG_INF
        self.wm = NEG_INF
        self.imp_hwm = -1
        self.click_hwm = -1
        self.seq = 0
        self.confirmed = 0
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        #: live record seq -> (time after which nothing in it can matter, watermark after it)
        self.live: dict[int, tuple[int, int]] = {}
        self._confirmed_wm = NEG_INF

    # ------------------------------------------------------------------ the step
    def _count(self, keys: list, imp: Impression, t: int) -> None:
        """Append the ``(kind, entity, bucket)`` keys ``imp`` counts for at time ``t``
        (same entities as :func:`impression_entities`)."""
        b = t // self._bucket
        append = keys.append
        append((0, imp.user_id, b))
        append((1, imp.item_id, b))
        cat = imp.categorical
        if cat:
            for f, prefix in self._prefixes:
                v = cat.get(f)
                if v is not None:
                    append((2, prefix + v, b))

    def _late(self, click: Click, reason: str, out: StepOutput) -> None:
        c = self.counters
        c["late_clicks"] += 1
        c["late_" + reason] += 1
        out.late.append(LateClick(click, reason))

    def _extend(self, seq: int, death: int) -> None:
        """Keep record ``seq`` alive at least until ``death`` (a click linked to one of its
        impressions), so a record and the records it interacted with die together."""
        entry = self.live.get(seq)
        if entry is None:
            self.live[seq] = (death, NEG_INF)
        elif death > entry[0]:
            self.live[seq] = (death, entry[1])

    def _attach(self, p: _Pending, click: Click, out: StepOutput) -> None:
        self._extend(p.seq, click.event_time_ms + self.cfg.window_ms)
        d = click.event_time_ms - p.imp.event_time_ms
        if d < 0:
            self._late(click, "before_impression", out)
        elif d > self.cfg.window_ms:
            self._late(click, "after_window", out)
        elif p.click_ms is not None:
            self.counters["duplicate_clicks"] += 1
        else:
            p.click_ms = click.event_time_ms
            self.counters["attributed_clicks"] += 1
            self._count(out.click_keys, p.imp, click.event_time_ms)
            if self._first_after is not None and not p.emitted and d > self._first_after:
                # fetched before the watermark reached the impression's first-example time: the
                # first example is what it would have been then, so timing changes nothing
                p.click_ms = None
                self._emit(p, out, provisional=True)
                p.click_ms = click.event_time_ms
            if p.provisional:
                self._correct(p, out)
            elif self._on_click:
                self._emit(p, out)

    def _emit(self, p: _Pending, out: StepOutput, provisional: bool = False) -> None:
        """The impression's first example: final, or (``provisional``, unclicked) a provisional
        negative."""
        if p.emitted:
            return
        p.emitted = True
        label = 0 if p.click_ms is None else 1
        p.provisional = provisional and not label
        eid = p.imp.event_id
        flag = b"provisional" if p.provisional else None
        out.examples.append((eid.encode(), example_bytes(eid, label, p.raw, p.click_ms, flag), label))
        c = self.counters
        c["examples"] += 1
        c["positives"] += label
        c["provisional"] += p.provisional

    def _correct(self, p: _Pending, out: StepOutput) -> None:
        """The click of a provisional negative: the impression again, label 1."""
        eid = p.imp.event_id
        out.examples.append((eid.encode(), example_bytes(eid, 1, p.raw, p.click_ms, b"correction"), 1))
        self.counters["corrections"] += 1
        self.counters["positives"] += 1

    def computed_watermark(self) -> int:
        lateness = self.cfg.allowed_lateness_ms
        imp_side = max(self.imp_max - lateness if self.imp_max > NEG_INF else NEG_INF, self.imp_marker)
        click_side = max(self.click_max - lateness if self.click_max > NEG_INF else NEG_INF, self.click_marker)
        return max(self.wm, min(imp_side, click_side))

    def _step(
        self,
        seq: int,
        raws: Sequence[bytes],
        imps: Sequence[Impression],
        clicks: Sequence[Click],
        imp_markers: Iterable[int] = (),
        click_markers: Iterable[int] = (),
        wm_after: int | None = None,
    ) -> StepOutput:
        out = StepOutput()
        window = self.cfg.window_ms
        c = self.counters
        pending = self.pending
        wm_before = self.wm
        lateness = self.cfg.allowed_lateness_ms
        for raw, imp in zip(raws, imps, strict=True):
            eid = imp.event_id
            if eid in pending:
                c["duplicate_impressions"] += 1
                continue
            ti = imp.event_time_ms
            if ti > self.imp_max:
                self.imp_max = ti
            elif ti < self.imp_max - lateness:
                c["out_of_order_impressions"] += 1
            c["impressions"] += 1
            self._count(out.imp_keys, imp, ti)
            p = _Pending(imp, raw, seq)
            early = self.orphans.pop(eid, None)
            if early:
                for tc in sorted(early):
                    self._attach(p, Click(impression_id=eid, event_time_ms=tc), out)
            if ti + window <= wm_before:
                c["late_impressions"] += 1
                self._emit(p, out)
            else:
                pending[eid] = p
                heapq.heappush(self._deadlines, (ti, eid))
                if self._first_after is not None and not p.emitted:
                    heapq.heappush(self._firsts, (ti, eid))
        for click in clicks:
            tc = click.event_time_ms
            if tc > self.click_max:
                self.click_max = tc
            elif tc < self.click_max - lateness:
                # the topic broke the event-time order this join relies on: the click side of
                # the watermark may already have closed this click's window (see the docstring)
                c["out_of_order_clicks"] += 1
            c["clicks"] += 1
            p = pending.get(click.impression_id)
            if p is not None:
                self._attach(p, click, out)
            elif tc <= wm_before:
                self._late(click, "no_impression", out)
            else:
                self.orphans.setdefault(click.impression_id, []).append(tc)
                heapq.heappush(self._orphan_heap, (tc, click.impression_id))
        for m in imp_markers:
            c["markers"] += 1
            if m > self.imp_marker:
                self.imp_marker = m
        for m in click_markers:
            c["markers"] += 1
            if m > self.click_marker:
                self.click_marker = m
        self.wm = self.computed_watermark() if wm_after is None else wm_after
        wm = self.wm
        if self._first_after is not None:
            # every click at or before ti + negative_after_ms is consumed by now (the watermark's
            # contract), so whether the first example is positive does not depend on timing
            firsts, after = self._firsts, self._first_after
            while firsts and firsts[0][0] + after <= wm:
                _, eid = heapq.heappop(firsts)
                p = pending.get(eid)
                if p is not None:
                    self._emit(p, out, provisional=True)
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] + window <= wm:
            _, eid = heapq.heappop(deadlines)
            p = pending.pop(eid, None)
            if p is not None:
                self._emit(p, out)
        oh = self._orphan_heap
        while oh and oh[0][0] <= wm:
            tc, iid = heapq.heappop(oh)
            lst = self.orphans.get(iid)
            if lst and tc in lst:
                lst.remove(tc)
                if not lst:
                    del self.orphans[iid]
                self._late(Click(impression_id=iid, event_time_ms=tc), "no_impression", out)
        return out

    # ------------------------------------------------------------------ batches and records
    def process(
        self,
        raws: Sequence[bytes],
        imps: Sequence[Impression],
        clicks: Sequence[Click],
        imp_markers: Iterable[int] = (),
        click_markers: Iterable[int] = (),
        imp_hwm: int | None = None,
        click_hwm: int | None = None,
        dead_letters: int = 0,
        skipped: int = 0,
        imp_range: tuple[int, int] | None = None,
    ) -> tuple[StepOutput, JoinRecord]:
        """Apply one micro-batch (impressions with their raw bytes, clicks, watermark markers
        seen on each topic) and return its outputs and the changelog record that makes it
        durable. With ``imp_range`` (the first and last offset of the impressions it accepted)
        the record references the impressions instead of copying them."""
        wm_before = self.wm
        out = self._step(self.seq + 1, raws, imps, clicks, imp_markers, click_markers)
        self.seq += 1
        if imp_hwm is not None:
            self.imp_hwm = max(self.imp_hwm, imp_hwm)
        if click_hwm is not None:
            self.click_hwm = max(self.click_hwm, click_hwm)
        self.counters["dead_letters"] += dead_letters
        self.counters["skipped_replayed"] += skipped
        rec = JoinRecord(
            seq=self.seq, wm_before=wm_before, wm=self.wm, imp_max=self.imp_max, click_max=self.click_max,
            imp_marker=self.imp_marker, click_marker=self.click_marker, imp_hwm=self.imp_hwm,
            click_hwm=self.click_hwm, confirmed=self.confirmed,
            impressions=[] if imp_range else list(raws), clicks=[(c.impression_id, c.event_time_ms) for c in clicks],
            counters=dict(self.counters), imp_first=imp_range[0] if imp_range else -1,
            imp_last=imp_range[1] if imp_range else -1, imp_count=len(raws),
        )  # fmt: skip
        self._track(rec, imps)
        return out, rec

    def _track(self, rec: JoinRecord, imps: Sequence[Impression]) -> None:
        window = self.cfg.window_ms
        death = NEG_INF
        for imp in imps:
            death = max(death, imp.event_time_ms + window)
        for _, tc in rec.clicks:
            death = max(death, tc + window)
        linked = self.live.get(rec.seq)
        self.live[rec.seq] = (death if linked is None else max(death, linked[0]), rec.wm)

    def mark_confirmed(self, seq: int) -> None:
        """The outputs of every record up to ``seq`` are acknowledged by the broker."""
        if seq > self.confirmed:
            entry = self.live.get(seq)
            self._confirmed_wm = entry[1] if entry else self.wm
            self.confirmed = seq

    def dead_records(self) -> list[int]:
        """Seqs of records nothing depends on any more (everything in them emitted or resolved,
        and confirmed); removes them from :attr:`live`. Only a *prefix* of the log dies, so
        :meth:`restore` always re-runs a contiguous suffix of steps: a click in a live record
        whose impression sat in a dead one (or the reverse) then resolves exactly as it did the
        first time, within the replayed steps. The newest record never dies (it carries the
        offsets and counters)."""
        wm = self._confirmed_wm
        dead = []
        for s in sorted(self.live):
            death = self.live[s][0]
            if s > self.confirmed or s >= self.seq or death > wm:
                break
            dead.append(s)
        for s in dead:
            del self.live[s]
        return dead

    @classmethod
    def restore(
        cls, partition: int, config: JoinConfig | None, records: Iterable[JoinRecord]
    ) -> tuple[JoinPartition, list[tuple[int, StepOutput]]]:
        """Rebuild the state from the live changelog records, by re-running the step on each
        with its recorded watermark; returns the state and ``(seq, outputs)`` of the records
        after the last ``confirmed`` (to send again, with the same versions)."""
        jp = cls(partition, config)
        recs = sorted(records, key=lambda r: r.seq)
        resend: list[tuple[int, StepOutput]] = []
        if not recs:
            return jp, resend
        if any(r.by_offsets for r in recs):
            raise ValueError("records reference impressions by offset: inline_impressions() them first")
        confirmed = recs[-1].confirmed
        for rec in recs:
            jp.wm = rec.wm_before
            imps = [decode_impression(r) for r in rec.impressions]
            clicks = [Click(impression_id=i, event_time_ms=t) for i, t in rec.clicks]
            out = jp._step(rec.seq, rec.impressions, imps, clicks, wm_after=rec.wm)
            jp.imp_max, jp.click_max = rec.imp_max, rec.click_max
            jp.imp_marker, jp.click_marker = rec.imp_marker, rec.click_marker
            jp.imp_hwm, jp.click_hwm, jp.seq = rec.imp_hwm, rec.click_hwm, rec.seq
            jp.counters = {**dict.fromkeys(COUNTERS, 0), **rec.counters}
            jp._track(rec, imps)
            if rec.seq > confirmed:
                resend.append((rec.seq, out))
        jp.confirmed = 0
        jp.mark_confirmed(confirmed)
        return jp, resend

    def stats(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "seq": self.seq,
            "watermark": self.wm,
            "pending": len(self.pending),
            "orphans": sum(len(v) for v in self.orphans.values()),
            "live_records": len(self.live),
            **self.counters,
        }


# ---------------------------------------------------------------------- feature-delta messages
class DeltaBatch(msgspec.Struct, array_like=True, frozen=True):
    """Count deltas of one join batch for the entities of one feature partition.
    ``(src, seq)`` is the version: the feature agent applies each at most once."""

    src: int
    seq: int
    max_time: int
    rows: list[tuple[int, str, int, int, int]]


_delta_encoder = msgspec.msgpack.Encoder()
_delta_decoder = msgspec.msgpack.Decoder(DeltaBatch)


def encode_deltas(batch: DeltaBatch) -> bytes:
    return _delta_encoder.encode(batch)


def decode_deltas(data: bytes) -> DeltaBatch:
    return _delta_decoder.decode(data)


_partition_caches: dict[int, tuple[dict[str, int], ...]] = {}


def entity_partition(kind: int, key: str, partitions: int) -> int:
    """Feature partition of an entity: CRC-32 of the key seeded with the kind -- stable across
    processes and restarts (Python's ``hash`` is salted per process). Cached (bounded)."""
    caches = _partition_caches.get(partitions)
    if caches is None:
        caches = _partition_caches[partitions] = tuple({} for _ in ENTITY_KINDS)
    cache = caches[kind]
    d = cache.get(key)
    if d is None:
        if len(cache) > 1_000_000:
            cache.clear()
        d = cache[key] = zlib.crc32(key.encode(), kind) % partitions
    return d


def split_deltas(src: int, seq: int, max_time: int, out: StepOutput, partitions: int) -> list[DeltaBatch]:
    """One :class:`DeltaBatch` per feature partition (empty ones too: each carries the
    source's progress, ``max_time``). A key may appear twice in a batch (once with its
    impressions, once with its clicks); the feature agent adds them up."""
    rows: list[list[DeltaRow]] = [[] for _ in range(partitions)]
    appenders = [r.append for r in rows]
    entity_partition(0, "", partitions)
    caches = _partition_caches[partitions]
    for keys, which in ((out.imp_keys, 0), (out.click_keys, 1)):
        if not keys:
            continue
        for (kind, key, bucket), n in Counter(keys).items():
            d = caches[kind].get(key)
            if d is None:
                d = entity_partition(kind, key, partitions)
            appenders[d]((kind, key, bucket, n, 0) if which == 0 else (kind, key, bucket, 0, n))
    return [DeltaBatch(src, seq, max_time, r) for r in rows]


# ---------------------------------------------------------------------- control messages
def send_watermark(
    bootstrap: str, time_ms: int, topics: Sequence[str] = ("impressions", "clicks"), partitions: int = 4
) -> None:
    """Send a watermark control message (header ``ctr.watermark``) to every partition of
    ``topics``: the join treats event time as having reached ``time_ms`` there. A replay sends
    one after its last event so the last windows close without waiting for more data."""
    from ctr.infra.kafka_io import DeliveryTracker, flush, make_producer

    p = make_producer(bootstrap)
    tracker = DeliveryTracker()
    for topic in topics:
        for part in range(partitions):
            p.produce(
                topic,
                value=b"",
                key=None,
                partition=part,
                on_delivery=tracker,
                headers=[(WATERMARK_HEADER, str(int(time_ms)).encode())],
            )
    flush(p, tracker)


def watermark_of(headers: Any) -> int | None:
    """The marker time of a control message, or None for a data record."""
    if not headers:
        return None
    for k, v in headers:
        if k == WATERMARK_HEADER:
            try:
                return int(v)
            except (TypeError, ValueError):
                return None
    return None


# ---------------------------------------------------------------------- the Faust agent


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

    futures: list
    results: list  # (JoinPartition, StepOutput, seq)
    acks: list  # (tp, first offset, last offset)
    tracker: Any = None
    sent: int = 0


class LabelJoinAgent:
    """The Faust side of the join: batches of chunks in, :class:`JoinPartition` per owned
    partition, records to the ``join-state`` table's changelog, outputs via confluent-kafka."""

    def __init__(
        self,
        app: Any,
        table: Any,
        output: Any,
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

            async def process(self, batch: Any) -> None:
                await outer.process(batch, self)

            async def on_idle(self) -> None:
                await outer.checkpoint(self)

            def next_offset(self, tp: Any) -> int | None:
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
        from ctr.infra.kafka_io import read_range

        ranged = [r for r in recs if r.by_offsets]
        if not ranged:
            return recs
        if not self.bootstrap:
            raise RuntimeError(f"join partition {p}: records reference impressions by offset; no bootstrap given")
        first, last = min(r.imp_first for r in ranged), max(r.imp_last for r in ranged)
        t0 = time.perf_counter()
        msgs = await asyncio.to_thread(read_range, self.bootstrap, IMPRESSIONS_TOPIC, p, first, last)
        records = [(m.offset(), m.value(), m.headers()) for m in msgs]
        log.info("join partition %d: read back %d impressions (offsets %d..%d) in %.2fs",
                 p, len(records), first, last, time.perf_counter() - t0)  # fmt: skip
        return [inline_impressions(r, records) for r in recs]

    # ---- one micro-batch
    async def process(self, batch: Any, runner: Any) -> None:
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

    async def _round(self, by_part: dict[int, list], runner: Any) -> None:
        from ctr.streams.app import send_changelog

        work = []
        acks: list[tuple[Any, int, int]] = []
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
        changelog = []
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

    async def _complete(self, runner: Any, depth: int = 0) -> None:
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

    def _complete_ready(self, runner: Any) -> None:
        """Finish, without waiting, the in-flight rounds whose records are acknowledged."""
        inflight = self._inflight
        while inflight and all(f.done() for f in inflight[0].futures):
            self._finish(inflight[0], runner)
        self.output.producer.poll(0)

    def _finish(self, head: _Flight, runner: Any) -> None:
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
            if t.delivered + t.failed < r.sent:
                break
            if t.failed:
                raise RuntimeError(f"{t.failed} outputs rejected by the broker: {t.errors[:3]}")
            sent.popleft()
            for jp, _, seq in r.results:
                if self.states.get(jp.partition) is jp:
                    jp.mark_confirmed(seq)

    async def quiesce(self, runner: Any) -> None:
        """Finish everything in flight and wait until every output is acknowledged."""
        await self._complete(runner, depth=0)
        await self.output.delivered()
        self._confirm()

    async def checkpoint(self, runner: Any) -> None:
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
        changelog = []
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

    def _send_outputs(self, jp: JoinPartition, out: StepOutput, seq: int, tracker: Any = None) -> None:
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
