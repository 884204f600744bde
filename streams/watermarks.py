"""Watermark control messages: a record with the header ``ctr.watermark`` on a partition says "no
more events before this time here" (the label join's rule: :mod:`ctr.streams.agents.label_join`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ctr.infra.schema import WATERMARK_HEADER
from ctr.infra.topics import CLICKS_TOPIC, IMPRESSIONS_TOPIC


def send_watermark(
    bootstrap: str,
    time_ms: int,
    topics: Sequence[str] = (IMPRESSIONS_TOPIC, CLICKS_TOPIC),
    partitions: int = 4,
    producer_config: dict | None = None,
) -> None:
    """Send a watermark control message (header ``ctr.watermark``) to every partition of
    ``topics``: the join treats event time as having reached ``time_ms`` there. A replay sends
    one after its last event so the last windows close without waiting for more data.
    ``producer_config``: extra producer settings (the Flink job reads lz4, not zstd:
    ``ctr.streams.flink.KAFKA_PRODUCER_CONFIG``)."""
    from ctr.infra.kafka_io import DeliveryTracker, flush, make_producer

    p = make_producer(bootstrap, **(producer_config or {}))
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
