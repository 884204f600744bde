"""Kafka clients for the hot paths (confluent-kafka / librdkafka) with the project's defaults.

Why these settings:

* ``partitioner=murmur2_random`` — the Java client, kafka-python and aiokafka (hence Faust)
  hash keys with murmur2; librdkafka's default (crc32) would put a click on a different
  partition than its impression and break the partition-local label join.
* ``acks=all`` and delivery reports on every message — a producer never reports success
  for a message the broker did not accept (:class:`DeliveryTracker`).
* ``enable.idempotence`` — per-partition order survives retries (below).
* ``compression.type`` from :func:`ctr.infra.config.kafka_compression` (zstd unless
  ``CTR_KAFKA_COMPRESSION`` says otherwise): a third of the bytes on the wire and in the broker.
* ``linger.ms=20`` -- at the demo's rate a shorter linger sends batches of a few records,
  which compress poorly and cost the broker a request each; feature freshness improved with
  the longer linger (streams/README.md). A message waits at most 20 ms more.
* :class:`PacedConsumer` -- after a fetch that found nothing it pauses its partitions for
  :func:`ctr.infra.config.fetch_backoff_s`: noida-db answers empty fetches at once instead of
  holding them, and librdkafka then re-fetches in a tight loop that keeps a core busy per idle
  consumer (README "Embedded broker" has the measurement); new data waits at most one backoff.
* session timeout 10 s — some Kafka-protocol brokers make group joins wait for the full
  session timeout; 10 s keeps restarts quick without false rebalances.
* security (SASL, TLS) from :func:`ctr.infra.security.kafka_security` in every config built
  here (:func:`client_config`), so no client of the pipeline connects in the clear by omission.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from ctr.infra.config import fetch_backoff_s, kafka_compression
from ctr.infra.lag import LagReporter
from ctr.infra.security import KafkaSecurity, kafka_security

PRODUCER_DEFAULTS: dict[str, object] = {
    "partitioner": "murmur2_random",
    "acks": "all",
    "linger.ms": 20,
    "batch.num.messages": 10_000,
    "queue.buffering.max.messages": 200_000,
    "message.max.bytes": 1_000_000,
    # Without idempotence librdkafka keeps up to 1M requests in flight and a retried batch can
    # land after its successor: the clicks topic then leaves event-time order (labels depend on
    # timing) and a delta batch arrives after a newer version of its source. Idempotence keeps
    # each partition in send order across retries (<= 5 in flight) and drops retry duplicates;
    # noida-db, Tansu and Apache Kafka all accept it.
    "enable.idempotence": True,
}

CONSUMER_DEFAULTS: dict[str, object] = {
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    "session.timeout.ms": 10_000,
    "heartbeat.interval.ms": 1_000,
    "fetch.max.bytes": 16 * 1024 * 1024,
}


@dataclass
class DeliveryTracker:
    """Counts broker acknowledgements. ``failed`` holds the first errors for the report."""

    delivered: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        with self._lock:
            if err is None:
                self.delivered += 1
            else:
                self.failed += 1
                if len(self.errors) < 20:
                    self.errors.append(f"{msg.topic()}: {err}")


def client_config(bootstrap: str, security: KafkaSecurity | None = None) -> dict[str, Any]:
    """What every librdkafka client of the project starts from: the address and the security
    settings (``security``, else this process's :func:`~ctr.infra.security.kafka_security`)."""
    return {"bootstrap.servers": bootstrap.split("://", 1)[-1], **(security or kafka_security()).librdkafka()}


def producer_config(
    bootstrap: str, overrides: Mapping[str, object] | None = None, security: KafkaSecurity | None = None
) -> dict[str, Any]:
    return {**client_config(bootstrap, security), **PRODUCER_DEFAULTS, "compression.type": kafka_compression(),
            **(overrides or {})}  # fmt: skip


def make_producer(bootstrap: str, **overrides: object) -> Producer:
    return Producer(producer_config(bootstrap, overrides))


class PacedConsumer(Consumer):
    """A confluent-kafka ``Consumer`` whose :meth:`consume` paces fetching when idle.

    librdkafka fetches in a background thread as long as its local queue is short; it relies on
    the broker to hold an empty fetch for ``fetch.wait.max.ms``. noida-db answers at once, so an
    idle consumer re-fetches thousands of times a second. When nothing is queued,
    :meth:`consume` pauses the assigned partitions (which stops the fetcher), sleeps the
    backoff, resumes them, wakes the fetcher (:meth:`_wake`) and waits ``window_s`` for the
    fetch that follows, until ``timeout``.
    Pause/resume only stop and restart fetching from the consumer's position: nothing is
    skipped or repeated, and a fetch answered while paused is kept (``tests/test_kafka_pacing.py``
    checks order and completeness through idle spells and bursts).
    Rebalance callbacks still run inside ``consume``, never between a pause and its resume.
    ``lag``: report the consumer's lag as ``ctr_consumer_lag`` (:mod:`ctr.infra.lag`) -- a
    stage's input consumer, not the short-lived readers of a topic's tail.
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        backoff_s: float | None = None,
        window_s: float = 0.0005,
        settle_s: float = 0.5,
        lag: LagReporter | None = None,
    ) -> None:
        super().__init__(config)
        self.lag = lag
        self.backoff_s = fetch_backoff_s() if backoff_s is None else backoff_s
        self.window_s = window_s
        self.settle_s = settle_s
        self._assignment: frozenset[tuple[str, int]] = frozenset()
        self._assigned_at = 0.0

    def _wake(self, tp: TopicPartition) -> None:
        """Make librdkafka fetch now: a resumed partition otherwise waits for its broker
        thread's next wake-up, about a second later; any request to that broker (a cheap
        ListOffsets here) wakes it and the fetch follows at once. One broker,
        as on the embedded default; with several, the others' partitions wait up to a second --
        Apache Kafka honours ``fetch.wait.max.ms``, so set ``CTR_FETCH_BACKOFF_MS=0`` there."""
        try:
            self.get_watermark_offsets(tp, timeout=1.0, cached=False)
        except KafkaException:
            pass  # the fetch still starts, on the broker thread's own schedule

    def _settling(self, parts: list[TopicPartition]) -> bool:
        """Whether ``parts`` became the assignment less than ``settle_s`` ago."""
        key = frozenset((tp.topic, tp.partition) for tp in parts)
        now = time.monotonic()
        if key != self._assignment:
            self._assignment, self._assigned_at = key, now
        return now - self._assigned_at < self.settle_s

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        msgs = self._consume(num_messages, timeout)
        if self.lag is not None:
            self.lag.report(self)
        return msgs

    def _consume(self, num_messages: int, timeout: float) -> list[Message]:
        msgs = super().consume(num_messages, 0)
        if msgs or timeout == 0 or self.backoff_s <= 0:
            return msgs if msgs or timeout == 0 else super().consume(num_messages, timeout)
        deadline = time.monotonic() + (timeout if timeout > 0 else math.inf)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return msgs
            parts = self.assignment()
            if not parts or self._settling(parts):
                # joining a group (the callbacks that assign run inside consume()), or a fresh
                # assignment whose start offsets are still being looked up: a pause now would
                # cancel that lookup, and the partitions would never start fetching
                return super().consume(num_messages, min(remaining, self.settle_s))
            self.pause(parts)
            try:
                time.sleep(min(self.backoff_s, remaining))
            finally:
                self.resume(parts)
            self._wake(parts[0])
            msgs = super().consume(num_messages, max(0.0, min(self.window_s, deadline - time.monotonic())))
            if msgs:
                return msgs


def consumer_config(
    bootstrap: str, group_id: str, overrides: Mapping[str, object] | None = None, security: KafkaSecurity | None = None
) -> dict[str, Any]:
    return {**client_config(bootstrap, security), "group.id": group_id, **CONSUMER_DEFAULTS, **(overrides or {})}


def make_consumer(bootstrap: str, group_id: str, **overrides: object) -> PacedConsumer:
    return PacedConsumer(consumer_config(bootstrap, group_id, overrides))


def stage_consumer(bootstrap: str, group_id: str) -> PacedConsumer:
    """A stage's input consumer: :func:`make_consumer` reporting its lag (``ctr_consumer_lag``)."""
    consumer = make_consumer(bootstrap, group_id)
    consumer.lag = LagReporter(group_id)
    return consumer


def produce(
    producer: Producer,
    topic: str,
    value: bytes,
    key: bytes | None,
    on_delivery: DeliveryTracker,
    headers: list[tuple[str, str | bytes | None]] | None = None,
) -> None:
    """Enqueue one message, waiting for room instead of failing when the local queue is full."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, on_delivery=on_delivery, headers=headers)
            return
        except BufferError:
            producer.poll(0.05)


def flush(producer: Producer, tracker: DeliveryTracker, timeout_s: float = 60.0) -> None:
    """Wait for every delivery report; raise if any message was not acknowledged."""
    remaining = producer.flush(timeout_s)
    if remaining:
        raise RuntimeError(f"{remaining} messages still unacknowledged after {timeout_s}s")
    if tracker.failed:
        raise RuntimeError(f"{tracker.failed} messages were rejected by the broker: {tracker.errors[:3]}")


def consume_batches(consumer: Consumer, batch_size: int = 1000, timeout_s: float = 0.1) -> Iterator[list[Message]]:
    """Yield lists of data messages (never empty); partition-EOF and other events are skipped.

    Runs forever: the caller breaks out. An empty poll yields nothing but lets the caller's
    loop check its own deadline through the generator protocol (``send`` is not needed)."""
    while True:
        msgs = consumer.consume(batch_size, timeout_s)
        data = [m for m in msgs if m.error() is None]
        for m in msgs:
            err = m.error()
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                raise RuntimeError(f"consumer error: {err}")
        yield data


class OffsetsGone(RuntimeError):
    """Records a reader needs are no longer in the partition (retention or compaction took them)."""


def _partition_reader(bootstrap: str, group: str) -> Consumer:
    """A consumer for ``assign``-ed reads of one partition (no group joined, nothing committed)
    that reports the partition's end as an event."""
    return Consumer(consumer_config(bootstrap, group, {"enable.partition.eof": True}))


def offset_of(m: Message) -> int:
    """The offset of a record a consumer returned (confluent-kafka types it optional: a message
    built for producing has none yet)."""
    offset = m.offset()
    assert offset is not None
    return offset


def read_range(
    bootstrap: str, topic: str, partition: int, first: int, last: int, timeout_s: float = 60.0
) -> list[Message]:
    """The records of one partition at offsets ``first..last`` (inclusive), in order.

    For state that keeps *offsets* into a source topic instead of copies of its records (the
    label join's changelog, like Kafka Streams' source-topic changelogs). No consumer group is
    joined (``assign``), nothing is committed; ``read_committed`` as the agents read. Raises
    :class:`OffsetsGone` when the partition no longer starts at or before ``first``, and
    ``TimeoutError`` when ``last`` is not reached in time.
    """
    c = _partition_reader(bootstrap, "ctr-range-reader")
    out: list[Message] = []
    try:
        c.assign([TopicPartition(topic, partition, first)])
        deadline = time.monotonic() + timeout_s
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}[{partition}]: offsets {first}..{last} not read within {timeout_s}s")
            for m in c.consume(10_000, 0.2):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        raise OffsetsGone(f"{topic}[{partition}] ends at {m.offset()}, before offset {last}")
                    raise KafkaException(err)
                offset = m.offset()
                assert offset is not None  # a consumed record always has one
                if not out and offset > first:
                    raise OffsetsGone(f"{topic}[{partition}] starts at {offset} now; offset {first} is gone")
                if offset > last:
                    return out
                out.append(m)
                if m.offset() == last:
                    return out
    finally:
        c.close()


def first_offset_from(bootstrap: str, topic: str, partition: int, offset: int, timeout_s: float = 30.0) -> int | None:
    """The offset of the first record the partition holds at or after ``offset`` (``None``: none
    yet), as a ``read_committed`` reader sees it.

    For an agent whose input jumped past the offset its state expects: if the broker's first
    record from there is the one the consumer delivered, the offsets between hold no records
    (compaction, retention, transaction markers) and the jump is real; otherwise the consumer's
    position was wrong. Before the log start it answers the log start (``auto.offset.reset``
    earliest)."""
    c = _partition_reader(bootstrap, "ctr-gap-probe")
    try:
        c.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for m in c.consume(1, 0.2):
                err = m.error()
                if err is None:
                    return m.offset()
                if err.code() == KafkaError._PARTITION_EOF:
                    return None
                raise KafkaException(err)
        raise TimeoutError(f"{topic}[{partition}]: no answer from offset {offset} within {timeout_s}s")
    finally:
        c.close()
