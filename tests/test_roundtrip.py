"""Replay -> broker -> consume back: nothing lost, nothing duplicated, event-time order kept."""

from __future__ import annotations

from collections import Counter

import pytest

from ctr.infra.schema import decode_click, decode_impression
from ctr.infra.topics import CLICKS_TOPIC, IMPRESSIONS_TOPIC
from ctr.streams.datasets import interleave_clicks
from ctr.streams.replay import replay
from tests.kafka_helpers import make_records, read_topic_confluent, read_topic_kafka_python

N = 5_000


@pytest.mark.compat
@pytest.mark.parametrize("client", ["confluent-kafka", "kafka-python"])
def test_replay_round_trip(any_broker, group_id: str, client: str) -> None:
    records = make_records(N, seed=3)
    summary = replay(records, any_broker.bootstrap)
    n_clicks = sum(r.clicked for r in records)
    assert (summary.impressions, summary.clicks, summary.failed) == (N, n_clicks, 0)
    assert summary.delivered == N + n_clicks

    read = read_topic_confluent if client == "confluent-kafka" else read_topic_kafka_python
    imps = read(any_broker.bootstrap, IMPRESSIONS_TOPIC, N, group_id)
    clicks = read(any_broker.bootstrap, CLICKS_TOPIC, n_clicks, group_id + "-c")
    value = (lambda m: m.value()) if client == "confluent-kafka" else (lambda m: m.value)
    imp_ids = Counter(decode_impression(value(m)).event_id for m in imps)
    click_ids = Counter(decode_click(value(m)).impression_id for m in clicks)
    assert len(imp_ids) == N and max(imp_ids.values()) == 1, "impressions lost or duplicated"
    assert set(click_ids) == {r.impression.event_id for r in records if r.clicked}
    assert max(click_ids.values()) == 1, "clicks duplicated"


@pytest.mark.compat
def test_click_lands_on_its_impressions_partition(any_broker, group_id: str) -> None:
    """librdkafka's default partitioner differs from Java/aiokafka; ours must co-partition."""
    records = make_records(2_000, click_rate=0.5, seed=4)
    replay(records, any_broker.bootstrap)
    n_clicks = sum(r.clicked for r in records)
    imp_part = {
        decode_impression(m.value()).event_id: m.partition()
        for m in read_topic_confluent(any_broker.bootstrap, IMPRESSIONS_TOPIC, 2_000, group_id)
    }
    for m in read_topic_confluent(any_broker.bootstrap, CLICKS_TOPIC, n_clicks, group_id + "-c"):
        assert imp_part[decode_click(m.value()).impression_id] == m.partition()
    assert len(set(imp_part.values())) == 4, "keys should spread over all partitions"


def test_aiokafka_agrees_on_partitions(broker) -> None:
    """Faust produces with aiokafka: its partition for a key must equal the replay's."""
    from aiokafka.partitioner import DefaultPartitioner

    records = make_records(500, seed=5)
    replay(records, broker.bootstrap)
    part = DefaultPartitioner()
    msgs = read_topic_confluent(broker.bootstrap, IMPRESSIONS_TOPIC, 500, "aio-check")
    for m in msgs:
        assert part(m.key(), [0, 1, 2, 3], [0, 1, 2, 3]) == m.partition()


def test_event_stream_is_in_event_time_order() -> None:
    records = make_records(3_000, click_rate=0.3, seed=6)
    times = [e.event_time_ms for e in interleave_clicks(records)]
    assert times == sorted(times)
    assert len(times) == 3_000 + sum(r.clicked for r in records)


def test_rate_limit_paces_the_replay(broker) -> None:
    summary = replay(make_records(300, click_rate=0.0), broker.bootstrap, rate=1_000)
    assert 0.25 <= summary.seconds < 5.0
