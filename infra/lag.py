"""``ctr_consumer_lag``: how many records each stage's consumer trails the end of its input
partitions by, for the "consumer lag growing" alert (infra/docker/prometheus/alerts.yml).

Each stage measures its own lag in process, from what its client already knows, so no request
goes to the broker for it: librdkafka's cached high watermark (updated by every fetch response)
minus the consumer's position (learner, reweighter: :class:`LagReporter`, called from
:class:`~ctr.infra.kafka_io.PacedConsumer`), or aiokafka's highwater minus the last record a
Faust worker queued (``ctr.streams.app``). A stage whose loop stops calling its consumer stops
updating the gauge (it keeps its last value): a stalled stage shows up as "stage down" or as
lag in the stage downstream of it, not here.
"""

from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import Gauge

CONSUMER_LAG = Gauge(
    "ctr_consumer_lag",
    "Records between the end of a partition and the consumer's position",
    ["group", "topic", "partition"],
)


def set_lag(group: str, topic: str, partition: int, lag: int) -> None:
    CONSUMER_LAG.labels(group, topic, str(partition)).set(max(0, lag))


class LagReporter:
    """Sets ``ctr_consumer_lag`` for a confluent-kafka consumer's assigned partitions, at most
    every ``every_s`` (consume() runs thousands of times a second in the learner; a scrape
    every few seconds needs nothing finer)."""

    def __init__(self, group: str, every_s: float = 1.0) -> None:
        self.group, self.every_s = group, every_s
        self._next = 0.0

    def report(self, consumer: Consumer) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every_s
        try:
            positions: list[TopicPartition] = consumer.position(consumer.assignment())
            for tp in positions:
                if tp.offset < 0:  # nothing consumed yet from this partition: position unknown
                    continue
                _, high = consumer.get_watermark_offsets(tp, cached=True)
                if high >= 0:  # known once a fetch answered for the partition
                    set_lag(self.group, tp.topic, tp.partition, high - tp.offset)
        except KafkaException:
            pass  # a closed consumer or an assignment in flux: the next call tries again
