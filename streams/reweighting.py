"""``ctr reweight``: the dynamic feature reweighting stage. Consumes ``training-examples``,
keeps a sliding window of the last ``window`` labelled examples, and every ``publish_every``
new examples publishes per-field weights (OutRank importance, PSI drift; the formulas are in
:mod:`ctr.streams.agents.reweighting` and ``streams/REWEIGHTING.md``) as a
:class:`~ctr.infra.schema.FieldWeights` message on ``field-weights`` (key ``b"field-weights"``,
one partition) and, with a Feast directory, as rows of the ``field_weights`` feature view.

A thin shell around :class:`~ctr.streams.agents.reweighting.FieldImportance`:

* **Input**: every partition of ``training-examples``, assigned manually (no group join).
  Malformed messages go to ``dead-letter`` (stage ``reweighting``) and the stage goes on;
  watermark markers are skipped.
* **Restart**: offsets are committed to the group (``ctr-reweighting``) after each
  publication. On start each partition is read from ``committed - ceil(2 * window /
  partitions)``: the examples before the committed offset only refill the window (no
  dead-lettering, no publication of their own), so the first publication after a restart is
  computed on a full window, not on the few examples since.
* **Versions** only increase, across restarts too: the stage reads the newest version (and
  its weights, which seed the EMA) from the tail of ``field-weights`` and continues from it.
* **Order of effects** per publication: the message is acknowledged by the broker, then the
  Feast rows are written (newest event time wins; a Feast error is logged, Kafka is the
  source of truth), then the offsets are committed. A crash in between republishes from a
  window that is at most one batch larger (at-least-once, harmless: a newer version).
* **Stop**: SIGTERM / SIGINT (or ``stop.set()``) ends the loop; pending examples get a final
  publication, offsets are committed, the producer is flushed.
* **Metrics** (Prometheus): ``ctr_reweighting_field_weight{field}``, ``..._field_importance``,
  ``..._field_psi``, ``ctr_reweighting_version``, ``ctr_reweighting_examples_total``,
  ``ctr_reweighting_publications_total``.

Run: ``python -m ctr.streams.reweighting --bootstrap HOST:PORT [--feast-dir DIR] [--window 50000]
[--publish-every 5000]`` (``--help`` lists the rest).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition
from prometheus_client import Counter, Gauge

from ctr.infra.cli_options import run_command
from ctr.infra.deadletter import DeadLetterSink
from ctr.infra.kafka_io import DeliveryTracker, flush, make_consumer, make_producer, produce, stage_consumer
from ctr.infra.schema import (
    WATERMARK_HEADER,
    FieldWeights,
    SchemaError,
    decode_field_weights,
    decode_training_example,
    encode,
)
from ctr.infra.topics import EXAMPLES_TOPIC, FIELD_WEIGHTS_KEY, FIELD_WEIGHTS_TOPIC
from ctr.infra.validate import decode_batch
from ctr.streams.agents.reweighting import FieldImportance, ReweightConfig, Snapshot

if TYPE_CHECKING:
    from ctr.features.store import FeatureWriter

log = logging.getLogger(__name__)

STAGE = "reweighting"

WEIGHT = Gauge("ctr_reweighting_field_weight", "Published field weight (mean 1 over fields)", ["field"])
IMPORTANCE = Gauge("ctr_reweighting_field_importance", "OutRank importance of the field", ["field"])
PSI = Gauge("ctr_reweighting_field_psi", "PSI of the field between the last two windows", ["field"])
VERSION = Gauge("ctr_reweighting_version", "Version of the last published field weights")
EXAMPLES = Counter("ctr_reweighting_examples_total", "New labelled examples added to the window")
PUBLICATIONS = Counter("ctr_reweighting_publications_total", "Field-weight versions published")


def last_published(bootstrap: str, group_id: str, timeout_s: float = 10.0) -> FieldWeights | None:
    """The newest :class:`FieldWeights` on ``field-weights`` (reads the tail), or None."""
    c = make_consumer(bootstrap, f"{group_id}-tail")
    try:
        tp = TopicPartition(FIELD_WEIGHTS_TOPIC, 0)
        lo, hi = c.get_watermark_offsets(tp, timeout=timeout_s)
        if hi <= lo:
            return None
        c.assign([TopicPartition(FIELD_WEIGHTS_TOPIC, 0, max(lo, hi - 50))])
        best: FieldWeights | None = None
        deadline, idle_since = time.monotonic() + timeout_s, time.monotonic()
        while time.monotonic() - idle_since < 0.5 and time.monotonic() < deadline:
            for m in c.consume(100, 0.2):
                if m.error() is not None:
                    continue
                idle_since = time.monotonic()
                try:
                    fw = decode_field_weights(m.value())
                except SchemaError:
                    continue
                if best is None or fw.version > best.version:
                    best = fw
        return best
    finally:
        c.close()


def _is_marker(m: Any) -> bool:
    headers = m.headers()
    return bool(headers) and any(k == WATERMARK_HEADER for k, _ in headers)


class Reweighter:
    """The stage: consume, window, publish. See the module doc."""

    def __init__(
        self,
        bootstrap: str,
        config: ReweightConfig,
        *,
        publish_every: int = 5_000,
        publish_interval_s: float | None = 60.0,
        feast_dir: Path | str | None = None,
        online: str | None = None,
        redis_url: str | None = None,
        group_id: str = "ctr-reweighting",
        batch_size: int = 2_000,
    ) -> None:
        if publish_every < 1:
            raise ValueError("publish_every must be >= 1")
        self.bootstrap = bootstrap
        self.config = config
        self.publish_every = publish_every
        self.publish_interval_s = publish_interval_s
        self.group_id = group_id
        self.batch_size = batch_size
        self.importance = FieldImportance(config)
        self.producer = make_producer(bootstrap)
        self.tracker = DeliveryTracker()
        self.dlq_tracker = DeliveryTracker()
        self.dlq = DeadLetterSink(
            STAGE, lambda t, k, v, h: produce(self.producer, t, v, k, self.dlq_tracker, headers=h)
        )
        previous = last_published(bootstrap, group_id)
        self.version = previous.version if previous is not None else 0
        if previous is not None:
            self.importance.seed_weights(previous.weights)
        self.writer = None
        if feast_dir is not None:
            from ctr.features.store import FeatureWriter, open_store

            self.writer = FeatureWriter(open_store(feast_dir, online, redis_url))  # type: ignore[arg-type]
        self.positions: dict[int, int] = {}
        self.replay_until: dict[int, int] = {}
        self.examples = 0  # new examples (not the replayed ones)
        self.replayed = 0
        self.pending = 0
        self.publications = 0
        self.feast_errors = 0
        self.last: FieldWeights | None = None
        self._consumer: Any = None

    # -- input ------------------------------------------------------------------------------------
    def _assign(self) -> None:
        c = self._consumer
        parts = sorted(c.list_topics(EXAMPLES_TOPIC, timeout=10).topics[EXAMPLES_TOPIC].partitions)
        committed = c.committed([TopicPartition(EXAMPLES_TOPIC, p) for p in parts], timeout=10)
        back = math.ceil(2 * self.config.window / max(1, len(parts)))
        assignment = []
        for tp in committed:
            if tp.offset >= 0:
                lo, _ = c.get_watermark_offsets(TopicPartition(EXAMPLES_TOPIC, tp.partition), timeout=10)
                self.replay_until[tp.partition] = tp.offset
                self.positions[tp.partition] = tp.offset
                assignment.append(TopicPartition(EXAMPLES_TOPIC, tp.partition, max(lo, tp.offset - back)))
            else:
                assignment.append(TopicPartition(EXAMPLES_TOPIC, tp.partition, OFFSET_BEGINNING))
        c.assign(assignment)
        log.info("reweighting: assigned %s (resuming at %s), version %d", parts, self.replay_until, self.version)

    def _split(self, msgs: Sequence[Any]) -> tuple[list, list]:
        """(replayed examples, fresh messages); records the next offset of every partition."""
        replay, fresh = [], []
        for m in msgs:
            p, off = m.partition(), m.offset()
            self.positions[p] = max(self.positions.get(p, 0), off + 1)
            if off < self.replay_until.get(p, -1):
                if _is_marker(m):
                    continue
                try:  # already dead-lettered when first read: skip silently
                    replay.append(decode_training_example(m.value()))
                except SchemaError:
                    pass
            else:
                fresh.append(m)
        return replay, fresh

    # -- output -----------------------------------------------------------------------------------
    def publish(self) -> FieldWeights:
        """Compute on the current window and publish the next version (Kafka, Feast, commit)."""
        snap = self.importance.compute()
        version = self.version + 1
        msg = FieldImportance.message(snap, version, int(time.time() * 1000))
        produce(self.producer, FIELD_WEIGHTS_TOPIC, encode(msg), FIELD_WEIGHTS_KEY, self.tracker)
        flush(self.producer, self.tracker)
        self.version, self.last, self.pending = version, msg, 0
        self.publications += 1
        if self.writer is not None:
            self._write_feast(self.writer, snap, msg)
        self._commit()
        VERSION.set(version)
        PUBLICATIONS.inc()
        for f, s in snap.fields.items():
            WEIGHT.labels(f).set(s.weight)
            IMPORTANCE.labels(f).set(s.importance)
            PSI.labels(f).set(s.psi)
        log.info("reweighting: published v%d on %d examples\n%s", version, snap.window_examples, snap.table())
        return msg

    def _write_feast(self, writer: FeatureWriter, snap: Snapshot, msg: FieldWeights) -> None:
        rows = [
            {"field": f, "weight": s.weight, "importance": s.importance, "psi": s.psi, "version": msg.version}
            for f, s in snap.fields.items()
        ]
        try:
            writer.write("field_weights", rows, event_time_ms=msg.event_time_ms or msg.computed_at_ms)
        except Exception:  # noqa: BLE001 - Feast is a view; the topic is the source of truth
            self.feast_errors += 1
            log.exception("reweighting: Feast write of v%d failed", msg.version)

    def _commit(self) -> None:
        if self.positions:
            offsets = [TopicPartition(EXAMPLES_TOPIC, p, o) for p, o in sorted(self.positions.items())]
            try:
                self._consumer.commit(offsets=offsets, asynchronous=False)
            except Exception as err:  # noqa: BLE001 - a failed commit only means more replay
                log.warning("reweighting: offset commit failed: %s", err)

    # -- the loop ---------------------------------------------------------------------------------
    def _feed(self, examples: list) -> None:
        """Add new examples, publishing each time ``publish_every`` of them have arrived."""
        i = 0
        while i < len(examples):
            take = min(len(examples) - i, self.publish_every - self.pending)
            self.importance.add(examples[i : i + take])
            self.pending += take
            self.examples += take
            EXAMPLES.inc(take)
            i += take
            if self.pending >= self.publish_every:
                self.publish()

    def run(
        self,
        stop: threading.Event | None = None,
        max_examples: int | None = None,
        idle_exit_s: float | None = None,
    ) -> dict:
        """Consume and publish until ``stop`` is set, ``max_examples`` new examples were read, or
        nothing new arrived for ``idle_exit_s``. Returns a summary."""
        stop = stop or threading.Event()
        self._consumer = stage_consumer(self.bootstrap, self.group_id)
        try:
            self._assign()
            last_data = last_publish = time.monotonic()
            while not stop.is_set():
                msgs = self._consumer.consume(self.batch_size, 0.2)
                data = []
                for m in msgs:
                    err = m.error()
                    if err is None:
                        data.append(m)
                    elif err.code() != KafkaError._PARTITION_EOF:
                        log.warning("reweighting: consumer error: %s", err)
                replay, fresh = self._split(data)
                if replay:
                    self.importance.add(replay)
                    self.replayed += len(replay)
                if fresh:
                    last_data = time.monotonic()
                    before = self.publications
                    self._feed(decode_batch(fresh, decode_training_example, self.dlq))
                    if self.publications != before:
                        last_publish = time.monotonic()
                now = time.monotonic()
                if (
                    self.pending
                    and self.publish_interval_s is not None
                    and now - last_publish >= self.publish_interval_s
                ):
                    self.publish()
                    last_publish = now
                if max_examples is not None and self.examples >= max_examples:
                    break
                if idle_exit_s is not None and now - last_data > idle_exit_s:
                    break
            if self.pending:
                self.publish()
            self._commit()
        finally:
            self._consumer.close()
            self.producer.flush(10)
        return self.summary()

    def summary(self) -> dict:
        return {
            "examples": self.examples,
            "replayed": self.replayed,
            "dead_letters": self.dlq.count,
            "dead_letter_failures": self.dlq_tracker.failed,
            "publications": self.publications,
            "version": self.version,
            "feast_errors": self.feast_errors,
            "window_examples": self.last.window_examples if self.last else 0,
            "weights": dict(self.last.weights) if self.last else {},
        }


def run_reweighter(
    bootstrap: str,
    *,
    feast_dir: Path | str | None = None,
    window: int = 50_000,
    publish_every: int = 5_000,
    fields: Sequence[str] | None = None,
    group_id: str = "ctr-reweighting",
    publish_interval_s: float | None = 60.0,
    max_values: int = 4096,
    psi_bins: int = 20,
    floor: float = 0.1,
    smoothing: float = 0.5,
    significance: float = 2.0,
    batch_size: int = 2_000,
    metrics_port: int | None = None,
    online: str | None = None,
    redis_url: str | None = None,
    stop: threading.Event | None = None,
    max_examples: int | None = None,
    idle_exit_s: float | None = None,
) -> dict:
    """Entry point of ``ctr reweight`` (see the module doc). SIGTERM/SIGINT stop it cleanly
    when called from the main thread; from another thread pass ``stop``. Returns a summary:
    ``examples``, ``replayed``, ``dead_letters`` (``dead_letter_failures``: not acknowledged),
    ``publications``, ``version``,
    ``feast_errors``, ``window_examples`` and the last ``weights``."""
    config = ReweightConfig(
        window=window,
        fields=tuple(fields) if fields else None,
        max_values=max_values,
        psi_bins=psi_bins,
        floor=floor,
        smoothing=smoothing,
        significance=significance,
    )
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=os.environ.get("CTR_BIND", "127.0.0.1"))
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        stage = Reweighter(
            bootstrap,
            config,
            publish_every=publish_every,
            publish_interval_s=publish_interval_s,
            feast_dir=feast_dir,
            online=online,
            redis_url=redis_url,
            group_id=group_id,
            batch_size=batch_size,
        )
        return stage.run(stop, max_examples=max_examples, idle_exit_s=idle_exit_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> None:
    from ctr.streams.cli import reweight_command

    run_command(reweight_command, "python -m ctr.streams.reweighting", argv)


if __name__ == "__main__":
    # run as ``python -m``: this file is ``__main__``; the command imports it by its name, which
    # would load it a second time (and register its metrics twice) -- let that name be this one
    sys.modules.setdefault("ctr.streams.reweighting", sys.modules[__name__])
    main()
