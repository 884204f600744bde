"""Replay producer: a dataset becomes impressions and (delayed) clicks on Kafka, in event-time
order, at a chosen rate.

Clicks are held in a heap keyed by their event time and released just before the first
impression that is later than them, so the topic order is the order a live system would see.
Memory is bounded by the clicks pending inside the delay horizon, not by the dataset.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

from streams.kafka_io import DeliveryTracker, flush, make_producer, produce
from streams.schema import Click, Impression, encode

IMPRESSIONS_TOPIC = "impressions"
CLICKS_TOPIC = "clicks"


def event_stream(records: Iterable) -> Iterator[Impression | Click]:
    """Merge ``LabeledImpression`` records (time-ordered) with their delayed clicks.

    >>> from streams.datasets.base import LabeledImpression
    >>> imp = lambda i, t: Impression(event_id=f"e{i}", event_time_ms=t, user_id="u", item_id="a")
    >>> recs = [LabeledImpression(imp(0, 0), True, 1500), LabeledImpression(imp(1, 1000), False, None),
    ...         LabeledImpression(imp(2, 2000), False, None)]
    >>> [(type(e).__name__, e.event_time_ms) for e in event_stream(recs)]
    [('Impression', 0), ('Impression', 1000), ('Click', 1500), ('Impression', 2000)]
    """
    pending: list[tuple[int, int, Click]] = []
    seq = 0
    for rec in records:
        imp = rec.impression
        while pending and pending[0][0] <= imp.event_time_ms:
            yield heapq.heappop(pending)[2]
        yield imp
        if rec.clicked:
            t = imp.event_time_ms + int(rec.click_delay_ms or 0)
            heapq.heappush(pending, (t, seq, Click(impression_id=imp.event_id, event_time_ms=t)))
            seq += 1
    while pending:
        yield heapq.heappop(pending)[2]


@dataclass
class ReplaySummary:
    events: int = 0
    impressions: int = 0
    clicks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    delivered: int = 0
    failed: int = 0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "events_per_s": round(self.events_per_s, 1)}


class RateLimiter:
    """Paces a loop at ``rate`` events/s of wall time (``None`` = as fast as possible);
    checks the clock once per ``chunk`` events so pacing costs almost nothing."""

    def __init__(self, rate: float | None, chunk: int = 100) -> None:
        self.rate, self.chunk = rate, chunk
        self.start = time.perf_counter()

    def wait(self, done: int) -> None:
        if self.rate and done % self.chunk == 0:
            ahead = done / self.rate - (time.perf_counter() - self.start)
            if ahead > 0:
                time.sleep(ahead)


def replay(
    records: Iterable,
    bootstrap: str,
    *,
    rate: float | None = None,
    on_progress: Callable[[ReplaySummary], None] | None = None,
    producer_config: dict | None = None,
) -> ReplaySummary:
    """Write the records' impressions and clicks to Kafka; returns only after every message
    was acknowledged by the broker (raises if any was rejected). Limit the count at the
    source (``open_source(..., events=N)``) so every replayed impression keeps its click."""
    producer = make_producer(bootstrap, **(producer_config or {}))
    tracker = DeliveryTracker()
    summary = ReplaySummary()
    limiter = RateLimiter(rate)
    start = time.perf_counter()
    for event in event_stream(records):
        value = encode(event)
        if isinstance(event, Impression):
            produce(producer, IMPRESSIONS_TOPIC, value, event.event_id.encode(), tracker)
            summary.impressions += 1
        else:
            produce(producer, CLICKS_TOPIC, value, event.impression_id.encode(), tracker)
            summary.clicks += 1
        summary.events += 1
        summary.bytes += len(value)
        if summary.events % 1000 == 0:
            producer.poll(0)
            if on_progress is not None:
                summary.seconds = time.perf_counter() - start
                on_progress(summary)
        limiter.wait(summary.events)
    flush(producer, tracker)
    summary.seconds = time.perf_counter() - start
    summary.delivered, summary.failed = tracker.delivered, tracker.failed
    if on_progress is not None:
        on_progress(summary)
    return summary
