"""Does stopping the embedded broker lose acknowledged messages? A producer writes 5,000
msg/s; the broker is stopped (a bare SIGTERM, or :func:`ctr.infra.broker.stop_broker`: noida-db's
``stop kafka`` first) and restarted on its data dir; every acknowledged message is looked for.

``python -m bench.broker_stop --runs 12 --json bench/results/broker_stop.json``
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
import time
from pathlib import Path

from bench.common import read_to_end, report
from ctr.infra.broker import EmbeddedBroker, stop_broker
from ctr.infra.kafka_io import DeliveryTracker, make_producer, produce


def one_stop(way: str, rate: float = 5000.0) -> tuple[int, int, float]:
    """(acknowledged, lost, seconds after the stop began that the last lost one was acked)."""
    b = EmbeddedBroker(kind="noida", data_dir=Path(tempfile.mkdtemp(prefix="ctr-stop-")) / "b").start()
    acked: list[tuple[float, bytes]] = []
    lock, stop, tracker = threading.Lock(), threading.Event(), DeliveryTracker()

    def on_delivery(err, msg) -> None:  # noqa: ANN001 - librdkafka callback
        tracker(err, msg)
        if err is None:
            with lock:
                acked.append((time.monotonic(), msg.value()))

    def produce_stream() -> None:
        p, i, t0 = make_producer(b.bootstrap), 0, time.monotonic()
        while not stop.is_set():
            produce(p, "impressions", b"m-%d" % i, b"k%d" % i, on_delivery)  # type: ignore[arg-type]
            i += 1
            if i % 100 == 0:
                p.poll(0)
                time.sleep(max(0.0, i / rate - (time.monotonic() - t0)))
        p.flush(120)

    th = threading.Thread(target=produce_stream, daemon=True)
    th.start()
    try:
        time.sleep(2.0)
        t_stop = time.monotonic()
        assert b.proc is not None
        if way == "sigterm":
            b.proc.send_signal(signal.SIGTERM)
            b.proc.wait(30)
        else:
            stop_broker(b.proc, "noida", b.data_dir)
        b.proc = None
        b.start()
        time.sleep(2.0)
        stop.set()
        th.join(150)
        kept = {m.value() for m in read_to_end(b.bootstrap, "impressions", timeout_s=30)}
        lost = [(t - t_stop) for t, v in acked if v not in kept]
        return len(acked), len(lost), max(lost, default=0.0)
    finally:
        stop.set()
        b.stop()


def main(json_path: Path, runs: int) -> dict:
    rows = []
    for way in ("sigterm", "stop_broker"):
        lost_runs, lost_total, acked_total, latest = 0, 0, 0, 0.0
        for i in range(runs):
            acked, lost, last = one_stop(way)
            print(f"{way} run {i + 1}/{runs}: acked {acked}, lost {lost}", flush=True)
            acked_total += acked
            lost_total += lost
            lost_runs += lost > 0
            latest = max(latest, last)
        rows.append({"stop": "bare SIGTERM" if way == "sigterm" else "stop_broker (noida stop kafka, then SIGTERM)",
                     "runs": runs, "acked": acked_total, "lost": lost_total, "runs_with_loss": lost_runs,
                     "latest_lost_ack_after_stop_s": round(latest, 3)})  # fmt: skip
    target = {"target": "no acknowledged message lost by stop_broker", "met": rows[1]["lost"] == 0}
    return report("Broker stop: acknowledged messages lost across a restart (5,000 msg/s producer)", rows,
                  json_path, target)  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--json", type=Path, default=Path("bench/results/broker_stop.json"))
    a = ap.parse_args()
    main(a.json, a.runs)
