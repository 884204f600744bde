"""Prediction logging: what a replica served for a named impression, on ``served-scores``.

A /predict candidate may carry the ``impression_id`` under which the caller will show it. The
replica then logs a :class:`~ctr.infra.schema.ServedScore` (the probability and the version
that produced it), keyed by the impression id. The learner joins these to the impressions'
labels (:class:`ctr.online_learner.served.ServedQuality`): the online log loss and AUC of what was
actually served -- the number that predict-then-learn metrics over-state when positives reach
the learner at their click and negatives only when the attribution window closes.

Producing is asynchronous (librdkafka's queue): the request path does not wait for the broker,
and a lost score only means one impression fewer in the online metric, never a wrong one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import Counter

from ctr.infra.kafka_io import DeliveryTracker, make_producer, produce
from ctr.infra.schema import ServedScore, encode
from ctr.infra.topics import SERVED_SCORES_TOPIC

LOGGED = Counter("ctr_serving_scores_logged_total", "Served scores logged to served-scores")


class ScoreLog:
    """A producer of :class:`ServedScore` records (one per named candidate)."""

    def __init__(self, bootstrap: str, topic: str = SERVED_SCORES_TOPIC) -> None:
        self.topic = topic
        # a short linger batches the scores of one request (and of concurrent ones)
        self.producer = make_producer(bootstrap, **{"linger.ms": 50})
        self.tracker = DeliveryTracker()

    def log(self, model_id: str, version: int, impressions: Sequence[tuple[str, float]]) -> None:
        """Enqueue ``(impression_id, p_click)`` pairs scored by ``model_id`` at ``version``."""
        now = int(time.time() * 1000)
        for impression_id, p in impressions:
            record = ServedScore(impression_id=impression_id, model_id=model_id, version=version,
                                 p_click=min(1.0, max(0.0, p)), served_at_ms=now)
            produce(self.producer, self.topic, encode(record), impression_id.encode(), self.tracker)
        self.producer.poll(0)
        LOGGED.inc(len(impressions))

    def close(self, timeout_s: float = 5.0) -> None:
        self.producer.flush(timeout_s)
