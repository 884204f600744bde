"""Test helpers: read whole topics back with either client, make small labelled streams."""

from __future__ import annotations

import random
import time

from confluent_kafka import TopicPartition

from ctr.infra.kafka_io import make_consumer
from ctr.infra.schema import WATERMARK_HEADER, Impression
from ctr.streams.datasets.base import LabeledImpression


def _is_marker(headers) -> bool:
    """Watermark control messages (sent after a replay) are not data."""
    return bool(headers) and any(k == WATERMARK_HEADER for k, _ in headers)


def make_records(
    n: int, click_rate: float = 0.2, seed: int = 0, start_ms: int = 1_700_000_000_000, max_delay_ms: int = 20_000
) -> list[LabeledImpression]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        clicked = rng.random() < click_rate
        imp = Impression(
            event_id=f"t{seed}-{i}",
            event_time_ms=start_ms + i * 10,
            user_id=f"u{rng.randrange(50)}",
            item_id=f"ad{rng.randrange(20)}",
            position=rng.randrange(3),
            categorical={"site": f"s{rng.randrange(5)}"},
            numeric={"I1": float(i % 7)},
        )
        out.append(LabeledImpression(imp, clicked, rng.randrange(max_delay_ms) if clicked else None))
    return out


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    c = make_consumer(bootstrap, "end-offsets")
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    c.close()
    return ends


def read_topic_confluent(bootstrap: str, topic: str, expect: int, group: str, timeout_s: float = 30.0) -> list:
    """All messages of ``topic`` (as confluent Message objects), waiting for ``expect`` of them.

    Assigns every partition from the beginning (no group join, so it is quick on every broker);
    the group protocol itself is exercised by :func:`read_topic_kafka_python`."""
    from confluent_kafka import OFFSET_BEGINNING

    c = make_consumer(bootstrap, group)
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out: list = []
    deadline = time.monotonic() + timeout_s
    while len(out) < expect and time.monotonic() < deadline:
        out += [m for m in c.consume(1000, 0.2) if m.error() is None and not _is_marker(m.headers())]
    # Drain a little longer: more than `expect` would mean duplicates.
    out += [m for m in c.consume(1000, 0.5) if m.error() is None and not _is_marker(m.headers())]
    c.close()
    return out


def read_topic_kafka_python(bootstrap: str, topic: str, expect: int, group: str, timeout_s: float = 30.0) -> list:
    from kafka import KafkaConsumer

    c = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
    )
    out: list = []
    deadline = time.monotonic() + timeout_s
    while len(out) < expect and time.monotonic() < deadline:
        for recs in c.poll(timeout_ms=200, max_records=5000).values():
            out.extend(r for r in recs if not _is_marker(r.headers))
    for recs in c.poll(timeout_ms=500).values():
        out.extend(r for r in recs if not _is_marker(r.headers))
    c.close()
    return out
