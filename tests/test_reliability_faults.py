"""Faults while the whole pipeline runs: the broker stopped and restarted, a serving replica
kill -9'd mid-replay — and the end state equals an uninterrupted run.

Real processes throughout: the embedded broker, a Faust worker, ``ctr learn`` and a serving
replica (``python -m ctr.serving``), all on free loopback ports, stopped in teardown. Worker and
learner kill -9 recovery have their own tests (test_stream_agents, test_trainer).

What the broker fault promises (see docs/reliability.md):

* ``noida`` (default), clean stop (SIGTERM) and restart on the same port and data dir: every
  acknowledged message is kept; clients reconnect on their own and carry on.
* While the broker is down, a producer never reports success: with a bounded
  ``message.timeout.ms`` every message produced in the outage gets a failed delivery report
  and is not on the topic afterwards (``flush`` raises). The pipeline's own producers use
  librdkafka's default (300 s) and simply deliver after the restart.
* ``tansu`` keeps nothing across a restart (memory storage only): topics are recreated
  empty, consumers reconnect, a new (idempotent) producer is needed, and new data flows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from ctr.infra.broker import EmbeddedBroker
from ctr.infra.kafka_io import DeliveryTracker, flush, make_consumer, make_producer, produce
from ctr.infra.procs import die_with_parent
from ctr.streams.datasets import open_source
from ctr.streams.datasets.base import interleave_clicks
from ctr.streams.replay import replay_events
from ctr.streams.watermarks import send_watermark
from tests.test_serving import Replica
from tests.test_stream_agents import END_MARKER, SMALL, Worker, check_examples, read_examples, topic_size, truth_labels

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CATEGORICAL = tuple(f"C{i}" for i in range(1, 9))
NUMERIC = tuple(f"I{i}" for i in range(1, 5))


class Learner:
    """``ctr learn`` as a child process; its last stdout line is the final summary (JSON)."""

    def __init__(self, bootstrap: str, tmp: Path) -> None:
        self.state = tmp / "learner"
        self.out = tmp / "learner.out"
        self.args = [sys.executable, "-m", "ctr.cli", "learn", "--bootstrap", bootstrap, "--state-dir",
                     str(self.state), "--batch-size", "256", "--publish-interval", "0.5", "--checkpoint-interval",
                     "1", "--table-bits", "14", "--gate-margin", "1.0", "--categorical", ",".join(CATEGORICAL),
                     "--numeric", ",".join(NUMERIC)]
        self.proc: subprocess.Popen | None = None

    def start(self) -> Learner:
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    def last(self) -> dict:
        path = self.state / "learner_metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return json.loads(lines[-1]) if lines else {}

    def stop(self) -> dict:
        """SIGTERM: the learner publishes its last delta, checkpoints and prints its summary."""
        if self.proc is None or self.proc.poll() is not None:
            return {}
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        tail = self.out.read_text().strip().splitlines()
        return json.loads(tail[-1]) if tail and tail[-1].startswith("{") else {}


def wait_for(pred, timeout_s: float, what: str, *alive) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        for proc in alive:
            assert proc.poll() is None, f"{what}: a process exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def count_messages(bootstrap: str, topic: str, timeout_s: float = 5.0) -> int:
    """Messages actually readable from the beginning of every partition (not end offsets:
    tansu reports the start of the last batch)."""
    c = make_consumer(bootstrap, f"count-{uuid.uuid4().hex[:6]}", **{"enable.partition.eof": True})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    n, eof, deadline = 0, set(), time.monotonic() + timeout_s
    while len(eof) < len(parts) and time.monotonic() < deadline:
        for m in c.consume(1000, 0.2):
            if m.error() is None:
                n += 1
            elif m.error().code() == -191:  # _PARTITION_EOF
                eof.add(m.partition())
    c.close()
    return n


def produce_while_down(bootstrap: str, n: int) -> DeliveryTracker:
    """``n`` messages to a broker that is not there, with a bounded delivery timeout."""
    p, tr = make_producer(bootstrap, **{"message.timeout.ms": 1500}), DeliveryTracker()
    for i in range(n):
        produce(p, "dead-letter", b"outage-%d" % i, b"outage", tr)
    with pytest.raises(RuntimeError, match="rejected by the broker"):
        flush(p, tr, timeout_s=30)
    return tr


# ----------------------------------------------------------------------------- noida: the whole pipeline
def test_broker_restart_and_serving_kill9_mid_replay_lose_nothing(broker: EmbeddedBroker, tmp_path: Path) -> None:
    if broker.kind != "noida":
        pytest.skip("the no-loss promise is noida's (tansu keeps nothing across a restart: see the tansu test)")
    bs = broker.bootstrap
    # 150 events/s of event time: phase A spans 40 s, past the 30 s attribution window, so
    # examples and model versions flow before the fault
    records = list(open_source("synthetic", seed=31, events=12_000, events_per_second=150.0, **SMALL))
    truth = truth_labels(records)
    # split the event stream, not the records: replaying records[:half] would flush the clicks
    # still pending at the cut (event times up to 45 s ahead), and phase B's clicks would then
    # break the clicks topic's event-time order -- the cause of the wrong labels seen under load
    events = list(interleave_clicks(records))
    half = len(events) // 2
    worker = Worker(bs, tmp_path, "ctr-rel").start()
    learner = Learner(bs, tmp_path).start()
    replica = Replica(tmp_path, "r", bs, learner.state / "snapshots", tmp_path / "feast")
    try:
        # phase A: half the stream, live, with more to come (no end-of-stream marker)
        replay_events(events[:half], bs, rate=4000, close_after_ms=None)
        wait_for(lambda: learner.last().get("examples", 0) > 500, 240, "the learner training", learner.proc)
        replica.start()
        ready = replica.wait_ready(timeout_s=120)
        sizes = {t: topic_size(bs, t) for t in ("impressions", "clicks", "training-examples", "model-updates")}

        # the broker goes away: a producer with a bounded timeout is told every message failed
        broker.stop(keep_data=True)
        outage = produce_while_down(bs, 50)
        assert (outage.delivered, outage.failed) == (0, 50)
        time.sleep(2)  # clients notice and retry
        broker.start()  # same port, same data dir
        after = {t: topic_size(bs, t) for t in sizes}
        assert all(after[t] >= sizes[t] for t in sizes), (sizes, after)  # a clean stop keeps everything
        assert count_messages(bs, "dead-letter") == 0, "a message reported failed reached the topic"

        # phase B: the rest of the stream; serving is kill -9'd half-way and restarted
        done = threading.Event()
        threading.Thread(target=lambda: (replay_events(events[half:], bs, rate=4000), done.set()), daemon=True).start()
        wait_for(lambda: topic_size(bs, "impressions") > sizes["impressions"] + 1500, 60, "phase B input")
        os.kill(replica.proc.pid, signal.SIGKILL)
        replica.proc.wait(10)
        replica.start()
        wait_for(done.is_set, 120, "the replay of phase B")
        send_watermark(bs, END_MARKER)

        # every impression -> an example (duplicates only with the same key and label)
        examples = read_examples(bs, truth, timeout_s=180, worker=worker)
        ids = check_examples(examples, truth)
        # the learner trains each example once, whatever the duplicates
        wait_for(lambda: learner.last().get("examples", 0) >= len(truth), 180, "the learner to catch up",
                 learner.proc)
        assert worker.alive(), worker.text()[-3000:]
        result = learner.stop()
        assert result["examples"] == len(truth), result
        final = max(learner.last()["version"], result.get("version", 0))
        # the restarted replica comes back and follows the learner to its last version
        replica.wait_ready(timeout_s=120)
        info = replica.wait_version(final, timeout_s=60)
        assert info["version"] > ready["version"]
        dupes = sum(n - 1 for n in ids.values())
        print(f"\nexamples {len(examples)} for {len(truth)} impressions ({dupes} duplicates), learner "
              f"{result['examples']} trained ({result.get('duplicates')} dropped), serving at v{final}")
    finally:
        replica.stop()
        learner.stop()
        worker.stop()


# ----------------------------------------------------------------------------- tansu: nothing kept
def test_tansu_restart_loses_everything_but_clients_carry_on(tmp_path: Path) -> None:
    broker = EmbeddedBroker(kind="tansu", data_dir=tmp_path / "broker").start()
    try:
        bs = broker.bootstrap
        producer, tracker = make_producer(bs), DeliveryTracker()
        consumer = make_consumer(bs, f"g-{uuid.uuid4().hex[:6]}")
        consumer.subscribe(["training-examples"])
        for i in range(200):
            produce(producer, "training-examples", b"before-%d" % i, b"k%d" % i, tracker)
        flush(producer, tracker)
        got = []
        wait_for(lambda: got.extend(m.value() for m in consumer.consume(500, 0.2) if m.error() is None)
                 or len(got) >= 200, 60, "the first 200")
        broker.restart()  # memory storage: topics come back empty (EmbeddedBroker recreates them)
        assert count_messages(bs, "training-examples") == 0
        # The same consumer object reconnects. The producers are idempotent: Tansu forgets their
        # producer ids with everything else and answers "unknown producer id" to every epoch
        # bump librdkafka tries, so a producer from before the restart must be recreated (a
        # restarted process does that); Kafka and noida-db keep producer state across restarts.
        producer.purge()
        producer = make_producer(bs)
        for i in range(100):
            produce(producer, "training-examples", b"after-%d" % i, b"k%d" % i, tracker)
        flush(producer, tracker, timeout_s=60)
        later: list[bytes] = []
        wait_for(lambda: later.extend(m.value() for m in consumer.consume(500, 0.2) if m.error() is None)
                 or len({v for v in later if v.startswith(b"after-")}) >= 100, 90, "new data after the restart")
        assert tracker.failed == 0 and tracker.delivered == 300
        consumer.close()
    finally:
        broker.stop()



def test_chaos_result_ran_the_issues_schedule() -> None:
    """The README's chaos table (generated, checked by ``tests/test_bench_report.py``) comes from
    a run with one core busy, five seeds of >= 200,000 impressions (a seed that did not finish
    is a row with its error) and a verdict that follows from the rows."""
    import json

    from bench.report import ROOT

    doc = json.loads((ROOT / "bench/results/chaos.json").read_text())
    assert doc["busy_cores"] == 1 and len(doc["rows"]) >= 5 and doc["events"] >= 200_000
    assert all(r["events"] >= 200_000 or r.get("error") for r in doc["rows"])
    assert doc["met"] == all(r["discrepancies"] == 0 for r in doc["rows"])
