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

How the Faust agent makes this durable (changelog records, exactly-once effects):
:mod:`ctr.streams.agents.label_join_agent`. Its records: :mod:`~ctr.streams.agents.join_records`;
the feature-delta messages: :mod:`~ctr.streams.agents.deltas`.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from ctr.features.spec import SPEC, FeatureSpec, field_value_key
from ctr.infra.config import CHANGELOG_MODES, EMISSIONS
from ctr.infra.schema import (
    Click,
    Impression,
    decode_impression,
)
from ctr.streams.agents.deltas import bucket_ms
from ctr.streams.agents.join_records import JoinRecord

NEG_INF = -(1 << 62)
DEFAULT_WINDOW_MS = 30_000
LATE_REASON_HEADER = "ctr.late.reason"
COUNTERS: tuple[str, ...] = (
    "impressions", "clicks", "examples", "positives", "provisional", "corrections", "attributed_clicks", "late_clicks",
    "late_after_window", "late_before_impression", "late_no_impression", "late_impressions",
    "duplicate_impressions", "duplicate_clicks", "dead_letters", "markers", "skipped_replayed",
    "out_of_order_impressions", "out_of_order_clicks",
)  # fmt: skip


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


class LateClick(NamedTuple):
    click: Click
    reason: str


_json = msgspec.json.Encoder()


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

    >>> from ctr.infra.schema import Impression, Click, decode_training_example, encode
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
            new = _Pending(imp, raw, seq)
            early = self.orphans.pop(eid, None)
            if early:
                for tc in sorted(early):
                    self._attach(new, Click(impression_id=eid, event_time_ms=tc), out)
            if ti + window <= wm_before:
                c["late_impressions"] += 1
                self._emit(new, out)
            else:
                pending[eid] = new
                heapq.heappush(self._deadlines, (ti, eid))
                if self._first_after is not None and not new.emitted:
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
