"""The serving tier's Prometheus metrics, and the gauges bound to a replica's registry."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

if TYPE_CHECKING:
    from ctr.serving.registry import ModelRegistry


_LAT_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0)
REQUEST_SECONDS = Histogram("ctr_serving_request_seconds", "HTTP request latency in the server (first byte "
                            "received -> response sent)", ["endpoint"], buckets=_LAT_BUCKETS)
SCORE_SECONDS = Histogram("ctr_serving_score_seconds", "Encode + model forward per /predict",
                          buckets=_LAT_BUCKETS)
REQUESTS = Counter("ctr_serving_requests_total", "HTTP requests", ["endpoint", "status"])
BATCH_REQUESTS = Histogram("ctr_serving_batch_requests", "Requests scored together in one forward (dynamic batching)",
                           buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64))
CANDIDATE_SCAN_DECLINED = Counter("ctr_serving_candidate_scan_declined_total",
                                  "Requests whose candidates' fields could not be keyed from the bytes (escapes, "
                                  "non-ASCII, a field named twice...) and were decoded fully instead", ["reason"])
CANDIDATES = Histogram("ctr_serving_candidates", "Candidates per /predict",
                       buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
MODEL_VERSION = Gauge("ctr_serving_model_version", "Model version: current (serving), head (newest applied), "
                      "learner (newest seen on model-updates)", ["which"])
VERSIONS_BEHIND = Gauge("ctr_serving_versions_behind", "Learner version seen minus head version applied")
MODEL_AGE = Gauge("ctr_serving_model_age_seconds", "Now minus the serving version's created_ms (learner clock)")
EVENT_LAG = Gauge("ctr_serving_event_lag_seconds", "Now minus the newest event time the serving version "
                  "was trained on (freshness hook)")
PINNED = Gauge("ctr_serving_pinned", "1 while a rolled-back version is pinned")
READY = Gauge("ctr_serving_ready", "1 when /readyz answers 200")

ENDPOINTS = {"/predict", "/model", "/model/rollback", "/model/unpin", "/healthz", "/readyz", "/metrics"}


def observe(endpoint: str, status: int, t0: float) -> None:
    REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - t0)
    REQUESTS.labels(endpoint, str(status)).inc()


def bind_gauges(reg: ModelRegistry) -> None:
    def version(which: str) -> Callable[[], float]:
        def get() -> float:
            if which == "current":
                mv = reg.current
                return float(mv.version) if mv else -1.0
            got = reg.head_version() if which == "head" else reg.learner_version()
            return float(got) if got is not None else -1.0
        return get

    for which in ("current", "head", "learner"):
        MODEL_VERSION.labels(which).set_function(version(which))

    def behind() -> float:
        head, learner = reg.head_version(), reg.learner_version()
        return float(learner - head) if head is not None and learner is not None else 0.0

    def age() -> float:
        mv = reg.current
        return max(0.0, time.time() - mv.created_ms / 1000) if mv and mv.created_ms else 0.0

    def event_lag() -> float:
        mv = reg.current
        return max(0.0, time.time() - mv.event_time_ms / 1000) if mv and mv.event_time_ms else 0.0

    VERSIONS_BEHIND.set_function(behind)
    MODEL_AGE.set_function(age)
    EVENT_LAG.set_function(event_lag)
    PINNED.set_function(lambda: 1.0 if reg.pinned is not None else 0.0)


def merge_expositions(texts: dict[str, bytes]) -> bytes:
    """Prometheus text expositions of several processes as one, each sample labelled
    ``worker=<key>`` (``*_created`` series are left out: each process has its own)."""
    families: dict[str, Metric] = {}
    for worker, text in texts.items():
        for fam in text_string_to_metric_families(text.decode()):
            if fam.name.endswith("_created"):
                continue
            out = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            out.samples += [Sample(s.name, {**s.labels, "worker": worker}, s.value, s.timestamp, s.exemplar)
                            for s in fam.samples if not s.name.endswith("_created")]

    class Gathered:
        def collect(self) -> list[Metric]:
            return list(families.values())

    return generate_latest(Gathered())
