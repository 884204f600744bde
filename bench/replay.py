"""``ctr bench replay``: events/s into the embedded broker, per client, plus the full replay path.

Each client sends the same pre-encoded events (so the client is measured, not the encoder);
the "replay path" row is the real ``ctr replay`` code: synthetic generation, schema
validation, msgspec encoding, confluent-kafka produce, every delivery report checked.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from bench.common import report
from ctr.infra.broker import EmbeddedBroker
from ctr.infra.schema import Impression, decode_impression, encode
from ctr.streams.datasets import interleave_clicks, open_source
from ctr.streams.replay import replay

TARGET_EVENTS_PER_S = 50_000


def _events(n: int) -> list[tuple[str, bytes, bytes]]:
    out = []
    for e in interleave_clicks(open_source("synthetic", seed=1, events=n)):
        if isinstance(e, Impression):
            out.append(("impressions", e.event_id.encode(), encode(e)))
        else:
            out.append(("clicks", e.impression_id.encode(), encode(e)))
    return out[:n]


def _confluent(bootstrap: str, events) -> float:
    from ctr.infra.kafka_io import DeliveryTracker, flush, make_producer, produce

    p, tr = make_producer(bootstrap), DeliveryTracker()
    t = time.perf_counter()
    for i, (topic, key, value) in enumerate(events):
        produce(p, topic, value, key, tr)
        if i % 1000 == 0:
            p.poll(0)
    flush(p, tr)
    assert tr.delivered == len(events)
    return time.perf_counter() - t


def _kafka_python(bootstrap: str, events) -> float:
    from kafka import KafkaProducer

    from ctr.infra.security import kafka_security

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, batch_size=256 * 1024,
                      **kafka_security().kafka_python())
    t = time.perf_counter()
    futures = [p.send(topic, value=value, key=key) for topic, key, value in events]
    p.flush()
    for f in futures:
        f.get(timeout=30)
    dt = time.perf_counter() - t
    p.close()
    return dt


def _aiokafka(bootstrap: str, events) -> float:
    from aiokafka import AIOKafkaProducer

    from ctr.infra.security import kafka_security

    async def run() -> float:
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024,
                             **kafka_security().aiokafka())
        await p.start()
        t = time.perf_counter()
        futures = [await p.send(topic, value=value, key=key) for topic, key, value in events]
        await asyncio.gather(*futures)
        dt = time.perf_counter() - t
        await p.stop()
        return dt

    return asyncio.run(run())


def _serialisation(events) -> list[dict]:
    values = [v for topic, _, v in events if topic == "impressions"][:20_000]
    objs = [decode_impression(v) for v in values]
    rows = []
    t = time.perf_counter()
    for o in objs:
        encode(o)
    rows.append({"stage": "encode msgspec (validated struct)", "events_per_s": len(objs) / (time.perf_counter() - t)})
    t = time.perf_counter()
    for v in values:
        decode_impression(v)
    rows.append({"stage": "decode+validate msgspec", "events_per_s": len(values) / (time.perf_counter() - t)})
    t = time.perf_counter()
    for v in values:
        json.loads(v)
    rows.append(
        {"stage": "decode stdlib json (no validation)", "events_per_s": len(values) / (time.perf_counter() - t)}
    )
    return rows


def main(json_path: Path, events: int = 100_000, kind: str = "noida", bootstrap: str | None = None) -> dict:
    data = _events(events)
    rows = []
    for name, fn in [("confluent-kafka", _confluent), ("aiokafka", _aiokafka), ("kafka-python", _kafka_python)]:
        broker = None if bootstrap else EmbeddedBroker(kind=kind).start()
        try:
            dt = fn(bootstrap or broker.bootstrap, data)
        finally:
            if broker:
                broker.stop()
        rows.append(
            {
                "stage": f"produce {name}",
                "events": len(data),
                "seconds": round(dt, 3),
                "events_per_s": round(len(data) / dt),
            }
        )
    broker = None if bootstrap else EmbeddedBroker(kind=kind).start()
    try:
        # The source counts impressions; clicks come on top, so ask for fewer impressions.
        s = replay(open_source("synthetic", seed=2, events=int(events * 0.9)), bootstrap or broker.bootstrap)
    finally:
        if broker:
            broker.stop()
    rows.append(
        {
            "stage": "replay path (generate+validate+encode+produce)",
            "events": s.events,
            "seconds": round(s.seconds, 3),
            "events_per_s": round(s.events_per_s),
        }
    )
    rows += [{**r, "events_per_s": round(r["events_per_s"])} for r in _serialisation(data)]
    replay_rate = rows[3]["events_per_s"]
    return report(
        f"replay into the embedded broker ({kind})",
        rows,
        json_path,
        {
            "broker": kind,
            "target_events_per_s": TARGET_EVENTS_PER_S,
            "replay_path_events_per_s": replay_rate,
            "meets_target": replay_rate >= TARGET_EVENTS_PER_S,
        },
    )
