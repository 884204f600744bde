"""``ctr demo``: the main job on the embedded default.

Stage 1 of the pipeline as it stands: start the embedded broker, replay the synthetic
drifting stream (or a user's data) with progress, read every topic back through the
validating consumer (malformed messages -> dead-letter), and report what went through.
Later stages (Faust agents, learner, serving) plug into :func:`run_demo` as they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from infra.broker import EmbeddedBroker
from streams.datasets import open_source
from streams.deadletter import DeadLetterSink
from streams.kafka_io import DeliveryTracker, flush, make_consumer, make_producer, produce
from streams.replay import CLICKS_TOPIC, IMPRESSIONS_TOPIC, replay
from streams.schema import decode_click, decode_impression
from streams.validate import decode_batch


def read_back(bootstrap: str, expect: int, timeout_s: float = 60.0) -> dict:
    """Consume impressions and clicks through the validating decoder; count what came back."""
    producer, tracker = make_producer(bootstrap), DeliveryTracker()
    sink = DeadLetterSink("demo-reader", lambda t, k, v, h: produce(producer, t, v, k, tracker, headers=h))
    consumer = make_consumer(bootstrap, f"demo-reader-{time.time_ns()}")
    consumer.subscribe([IMPRESSIONS_TOPIC, CLICKS_TOPIC])
    impressions = clicks = seen = 0
    ids: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while seen < expect and time.monotonic() < deadline:
        msgs = [m for m in consumer.consume(5000, 0.2) if m.error() is None]
        for imp in decode_batch([m for m in msgs if m.topic() == IMPRESSIONS_TOPIC], decode_impression, sink):
            ids.add(imp.event_id)
            impressions += 1
        clicks += len(decode_batch([m for m in msgs if m.topic() == CLICKS_TOPIC], decode_click, sink))
        seen = impressions + clicks + sink.count  # data messages (watermark markers are skipped)
    consumer.close()
    flush(producer, tracker)
    return {
        "read": seen,
        "impressions": impressions,
        "unique_impressions": len(ids),
        "clicks": clicks,
        "dead_letters": sink.count,
    }


def run_demo(
    out: Path,
    data: str = "synthetic",
    mapping: Path | None = None,
    events: int = 200_000,
    rate: float | None = None,
    kind: str = "noida",
    bootstrap: str | None = None,
    seed: int = 0,
) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    broker = None if bootstrap else EmbeddedBroker(kind=kind, data_dir=out / "broker").start()
    bs = bootstrap or broker.bootstrap
    console.print(f"[bold]broker[/] {kind if broker else 'external'} at {bs}; run folder {out}")
    try:
        with Progress(
            TextColumn("replay"),
            BarColumn(),
            TextColumn("{task.completed:,.0f} impressions"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("replay", total=events, rate="")
            summary = replay(
                open_source(data, mapping=mapping, seed=seed, events=events),
                bs,
                rate=rate,
                on_progress=lambda s: progress.update(
                    task, completed=s.impressions, rate=f"{s.events_per_s:,.0f} events/s"
                ),
            )
        t = time.perf_counter()
        back = read_back(bs, summary.events)
        read_s = time.perf_counter() - t
    finally:
        if broker:
            broker.stop(keep_data=True)
    result = {
        "data": data,
        "events": summary.events,
        "impressions": summary.impressions,
        "clicks": summary.clicks,
        "ctr": round(summary.clicks / max(1, summary.impressions), 4),
        "bytes": summary.bytes,
        "events_per_s": round(summary.events_per_s),
        "read_back_events_per_s": round(back["read"] / read_s),
        "lost": summary.impressions - back["unique_impressions"],
        "duplicated": back["impressions"] - back["unique_impressions"],
        "dead_letters": back["dead_letters"],
    }
    table = Table(title="ctr demo: replay -> Kafka -> validated read-back")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.items():
        table.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    console.print(table)
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out / 'summary.json'}")
    return result
