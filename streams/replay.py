"""Replay producer: a dataset becomes impressions and (delayed) clicks on Kafka, in event-time
order, at a chosen rate.

Clicks are released just before the first impression later than them
(:func:`~ctr.streams.datasets.base.interleave_clicks`), so the topic order is the order a live
system would see; memory is bounded by the clicks pending inside the delay horizon.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from ctr.infra.kafka_io import DeliveryTracker, flush, make_producer, produce
from ctr.infra.schema import Click, Impression, encode
from ctr.infra.topics import CLICKS_TOPIC, IMPRESSIONS_TOPIC
from ctr.streams.datasets.base import interleave_clicks


@dataclass
class ReplaySummary:
    events: int = 0
    impressions: int = 0
    clicks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    delivered: int = 0
    failed: int = 0
    #: event time of the newest event handed to the producer (the stream's clock, for probes)
    last_event_ms: int = 0

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


def replay(records: Iterable, bootstrap: str, **options: object) -> ReplaySummary:
    """Replay labelled impressions: their impressions and clicks, interleaved in event-time
    order (:func:`~ctr.streams.datasets.base.interleave_clicks`). Options as :func:`replay_events`.

    To replay one stream in parts (a pause, a fault in between), split the *events*, not the
    records: ``evs = list(interleave_clicks(records)); replay_events(evs[:n], ...)`` and later
    ``replay_events(evs[n:], ...)``. Replaying ``records[:n]`` flushes the clicks still pending
    at the cut -- clicks from the future -- and the next part's clicks then break the clicks
    topic's event-time order."""
    return replay_events(interleave_clicks(records), bootstrap, **options)  # type: ignore[arg-type]


def replay_events(
    events: Iterable[Impression | Click],
    bootstrap: str,
    *,
    rate: float | None = None,
    on_progress: Callable[[ReplaySummary], None] | None = None,
    producer_config: dict | None = None,
    close_after_ms: int | None = 60_000,
) -> ReplaySummary:
    """Write impressions and clicks to Kafka in the given (event-time) order; returns only
    after every message was acknowledged by the broker (raises if any was rejected). Limit the
    count at the source (``open_source(..., events=N)``) so every replayed impression keeps
    its click.

    After the last event a watermark marker at ``last event time + close_after_ms`` goes to
    every impressions/clicks partition, so the label join closes the last attribution windows
    instead of waiting for more data (event time only ever comes from the data). Pass None
    when more data will follow (a replay resumed later, a live producer)."""
    producer = make_producer(bootstrap, **(producer_config or {}))
    tracker = DeliveryTracker()
    summary = ReplaySummary()
    limiter = RateLimiter(rate)
    start = time.perf_counter()
    for event in events:
        value = encode(event)
        last_ms = event.event_time_ms
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
                summary.last_event_ms = last_ms
                on_progress(summary)
        limiter.wait(summary.events)
    flush(producer, tracker)
    if close_after_ms is not None and summary.events:
        from ctr.streams.watermarks import send_watermark

        send_watermark(bootstrap, last_ms + close_after_ms, producer_config=producer_config)
    summary.seconds = time.perf_counter() - start
    summary.delivered, summary.failed = tracker.delivered, tracker.failed
    summary.last_event_ms = last_ms if summary.events else 0
    if on_progress is not None:
        on_progress(summary)
    return summary
