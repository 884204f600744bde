"""Fetch pacing and compression against the real embedded brokers.

noida-db answers an empty fetch at once instead of holding it for ``fetch.wait.max.ms``, so
unpaced consumers re-fetch thousands of times a second. ``PacedConsumer`` (confluent-kafka)
and ``install_fetch_backoff`` (aiokafka, hence Faust) pace them; these tests check that pacing
loses, repeats and reorders nothing, and that an idle consumer really goes quiet.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from ctr.infra.config import kafka_compression
from ctr.infra.kafka_io import DeliveryTracker, flush, make_consumer, make_producer, produce

TOPIC = "impressions"  # 4 partitions, created by the broker fixture


def _bursts(bootstrap: str, bursts: int, per_burst: int, gap_s: float) -> dict[int, list[bytes]]:
    """Send ``bursts`` bursts with idle gaps; returns the values sent per partition, in order."""
    p, tracker = make_producer(bootstrap), DeliveryTracker()
    sent: dict[int, list[bytes]] = {q: [] for q in range(4)}
    n = 0
    for _ in range(bursts):
        time.sleep(gap_s)
        for _ in range(per_burst):
            value = json.dumps({"n": n, "pad": "x" * (n % 97)}).encode()
            p.produce(TOPIC, value, partition=n % 4, on_delivery=tracker)
            sent[n % 4].append(value)
            n += 1
        p.poll(0)
        flush(p, tracker)
    return sent


@pytest.mark.integration
@pytest.mark.compat
@pytest.mark.parametrize("mode", ["assign", "subscribe"])
def test_paced_consumer_reads_everything_in_order(any_broker, group_id: str, mode: str) -> None:
    c = make_consumer(any_broker.bootstrap, group_id, **{"session.timeout.ms": 6000})
    assert c.backoff_s > 0, "pacing is on by default"
    if mode == "assign":
        c.assign([TopicPartition(TOPIC, q, OFFSET_BEGINNING) for q in range(4)])
    else:
        c.subscribe([TOPIC])
    # idle first (an empty topic: the state pacing is for), then bursts separated by gaps
    idle_until = time.monotonic() + (1.5 if mode == "assign" else 12.0)  # tansu joins take seconds
    while time.monotonic() < idle_until:
        assert c.consume(100, 0.2) == []
    result: dict[int, list[bytes]] = {}
    sender = threading.Thread(target=lambda: result.update(_bursts(any_broker.bootstrap, 5, 2000, 0.3)))
    sender.start()
    got: dict[int, list[tuple[int, bytes]]] = {q: [] for q in range(4)}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (sender.is_alive() or sum(map(len, got.values())) < 10_000):
        for m in c.consume(1000, 0.2):
            assert m.error() is None, m.error()
            got[m.partition()].append((m.offset(), m.value()))
    sender.join()
    for m in c.consume(1000, 0.5):  # anything beyond would be a duplicate
        got[m.partition()].append((m.offset(), m.value()))
    c.close()
    for q in range(4):
        offsets = [o for o, _ in got[q]]
        assert offsets == list(range(len(result[q]))), f"partition {q}: offsets skipped, repeated or reordered"
        assert [v for _, v in got[q]] == result[q]


def _fetch_requests(stats: list[dict]) -> int:
    return sum(b.get("req", {}).get("Fetch", 0) for b in stats[-1]["brokers"].values()) if stats else 0


@pytest.mark.integration
def test_idle_paced_consumer_stays_quiet(broker, group_id: str) -> None:
    """Count the Fetch requests librdkafka itself reports while idle on an empty topic."""
    stats: list[dict] = []
    c = make_consumer(
        broker.bootstrap, group_id, **{"statistics.interval.ms": 500, "stats_cb": lambda s: stats.append(json.loads(s))}
    )
    c.assign([TopicPartition(TOPIC, q, OFFSET_BEGINNING) for q in range(4)])
    t_end = time.monotonic() + 1.5  # settle (offset lookup), then measure
    while time.monotonic() < t_end:
        c.consume(10, 0.1)
    before, t0 = _fetch_requests(stats), time.monotonic()
    while time.monotonic() < t0 + 3.0:
        c.consume(10, 0.1)
    per_s = (_fetch_requests(stats) - before) / (time.monotonic() - t0)
    c.close()
    # measured ~300/s (a few per 10 ms pause while unpaused for ~1 ms); unpaced on noida ~27,000/s
    assert 0 < per_s < 1500, f"{per_s:.0f} fetch requests/s while idle"


@pytest.mark.integration
def test_aiokafka_fetch_backoff_paces_an_idle_consumer(broker) -> None:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.consumer.fetcher import Fetcher
    from aiokafka.structs import TopicPartition as AioTopicPartition

    from ctr.streams.app import install_fetch_backoff

    assert install_fetch_backoff() > 0
    calls = 0
    paced = Fetcher._proc_fetch_request

    async def counting(self, *args, **kwargs):  # noqa: ANN001, ANN202
        nonlocal calls
        calls += 1
        return await paced(self, *args, **kwargs)

    async def run() -> tuple[float, list[bytes]]:
        c = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=1500)
        await c.start()
        c.assign([AioTopicPartition(TOPIC, q) for q in range(4)])
        await c.seek_to_beginning()
        await asyncio.sleep(1.0)
        n0, t0 = calls, time.monotonic()
        await asyncio.sleep(2.0)
        per_s = (calls - n0) / (time.monotonic() - t0)
        # data produced after the idle spell still arrives (compressed with the default codec)
        sent = _bursts(broker.bootstrap, 1, 400, 0.0)
        got: list[bytes] = []
        deadline = time.monotonic() + 20
        while len(got) < 400 and time.monotonic() < deadline:
            for recs in (await c.getmany(timeout_ms=200)).values():
                got.extend(r.value for r in recs)
        await c.stop()
        return per_s, sorted(got) == sorted(v for vs in sent.values() for v in vs)

    Fetcher._proc_fetch_request = counting  # type: ignore[method-assign]
    try:
        per_s, complete = asyncio.run(run())
    finally:
        Fetcher._proc_fetch_request = paced  # type: ignore[method-assign]
    assert 0 < per_s < 250, f"{per_s:.0f} fetches/s while idle"
    assert complete, "records produced after the idle spell were not all delivered"


@pytest.mark.integration
def test_aiokafka_consumer_stops_cleanly_while_paced(broker) -> None:
    """``Fetcher.close`` cancels the fetch task and awaits it without suppressing the error: a
    backoff sleep that let CancelledError out made every worker hang at SIGTERM (found by the
    demo: the worker needed SIGKILL)."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition as AioTopicPartition

    from ctr.streams.app import install_fetch_backoff

    install_fetch_backoff(0.5)  # long enough that stop() lands inside the sleep

    async def run() -> None:
        c = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
        await c.start()
        c.assign([AioTopicPartition(TOPIC, q) for q in range(4)])
        await c.seek_to_beginning()
        await asyncio.sleep(1.2)  # idle: the fetcher is sleeping after an empty fetch
        await asyncio.wait_for(c.stop(), timeout=10)

    try:
        asyncio.run(run())
    finally:
        install_fetch_backoff()


@pytest.mark.integration
@pytest.mark.compat
def test_default_codec_round_trips_through_every_client(any_broker) -> None:
    """Producers compress with zstd by default; confluent-kafka, aiokafka and kafka-python read it."""
    from tests.kafka_helpers import read_topic_confluent, read_topic_kafka_python

    assert kafka_compression() == "zstd"
    p, tracker = make_producer(any_broker.bootstrap), DeliveryTracker()
    values = [json.dumps({"i": i, "categorical": {f"C{k}": f"{(i * k) % 13:08x}" for k in range(26)}}).encode()
              for i in range(500)]  # fmt: skip
    for i, v in enumerate(values):
        produce(p, TOPIC, v, str(i).encode(), tracker)
    flush(p, tracker)
    got = read_topic_confluent(any_broker.bootstrap, TOPIC, 500, "codec-confluent")
    assert sorted(m.value() for m in got) == sorted(values)
    got = read_topic_kafka_python(any_broker.bootstrap, TOPIC, 500, "codec-kafka-python")
    assert sorted(r.value for r in got) == sorted(values)
