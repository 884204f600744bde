"""Kafka clients for the hot paths (confluent-kafka / librdkafka) with the project's defaults.

Why these settings:

* ``partitioner=murmur2_random`` — the Java client, kafka-python and aiokafka (hence Faust)
  hash keys with murmur2; librdkafka's default (crc32) would put a click on a different
  partition than its impression and break the partition-local label join.
* ``acks=all`` and delivery reports on every message — a producer never reports success
  for a message the broker did not accept (:class:`DeliveryTracker`).
* session timeout 10 s — some Kafka-protocol brokers make group joins wait for the full
  session timeout; 10 s keeps restarts quick without false rebalances.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, Message, Producer

PRODUCER_DEFAULTS: dict[str, object] = {
    "partitioner": "murmur2_random",
    "acks": "all",
    "linger.ms": 5,
    "batch.num.messages": 10_000,
    "queue.buffering.max.messages": 200_000,
    "message.max.bytes": 1_000_000,
    "enable.idempotence": False,  # not every Kafka-protocol broker has it; effects are keyed instead
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


def make_producer(bootstrap: str, **overrides: object) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, **PRODUCER_DEFAULTS, **overrides})


def make_consumer(bootstrap: str, group_id: str, **overrides: object) -> Consumer:
    return Consumer({"bootstrap.servers": bootstrap, "group.id": group_id, **CONSUMER_DEFAULTS, **overrides})


def produce(
    producer: Producer,
    topic: str,
    value: bytes,
    key: bytes | None,
    on_delivery: DeliveryTracker,
    headers: list[tuple[str, bytes]] | None = None,
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
