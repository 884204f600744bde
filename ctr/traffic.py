"""A steady prediction client for the demo: real HTTP requests to ``/predict`` at a fixed rate,
recording latency and the model version that scored each response."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from ctr.infra.schema import Impression
from ctr.streams.datasets import open_source


@dataclass
class TrafficLog:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    latency_ms: list[float] = field(default_factory=list)
    #: (unix time s, model version) of every 2xx response
    versions: list[tuple[float, int]] = field(default_factory=list)


def impression_request(imp: Impression) -> dict[str, Any]:
    """The /predict body that scores one impression as it is shown, naming it (so the replica
    logs its score on ``served-scores``)."""
    return {
        "user_id": imp.user_id,
        "context": {"categorical": dict(imp.categorical), "numeric": dict(imp.numeric)},
        "candidates": [{"item_id": imp.item_id, "position": imp.position, "impression_id": imp.event_id}],
    }


def requests_from_stream(n: int, candidates: int = 10, seed: int = 99) -> list[dict]:
    """Request bodies shaped like the replayed traffic: a user, its context fields, candidate ads."""
    imps = [r.impression for r in open_source("synthetic", seed=seed, events=n * candidates)]
    out = []
    for i in range(n):
        group = imps[i * candidates : (i + 1) * candidates]
        ctx = group[0]
        out.append(
            {
                "user_id": ctx.user_id,
                "context": {"categorical": dict(ctx.categorical), "numeric": dict(ctx.numeric)},
                "candidates": [{"item_id": imp.item_id} for imp in group],
            }
        )
    return out


class SteadyClient(threading.Thread):
    """Sends ``rate`` requests/s (open loop, one connection) until ``stop`` is set."""

    def __init__(self, url: str, rate: float = 20.0, candidates: int = 10) -> None:
        super().__init__(name="prediction-client", daemon=True)
        self.url, self.rate = url, rate
        self.bodies = requests_from_stream(200, candidates)
        self.log = TrafficLog()
        self.stop = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        with httpx.Client(timeout=5.0) as client:
            while not self.stop.is_set():
                body = self.bodies[self.log.sent % len(self.bodies)]
                t = time.perf_counter()
                try:
                    r = client.post(self.url, json=body)
                    ms = (time.perf_counter() - t) * 1000
                    self.log.sent += 1
                    if r.status_code == 200:
                        self.log.ok += 1
                        self.log.latency_ms.append(ms)
                        self.log.versions.append((time.time(), r.json()["model_version"]))
                    else:
                        self.log.errors += 1
                except httpx.HTTPError:
                    self.log.sent += 1
                    self.log.errors += 1
                next_at = start + self.log.sent / self.rate
                self.stop.wait(max(0.0, next_at - time.monotonic()))


class ServedImpressions(threading.Thread):
    """Scores a sample of the replayed impressions *as they are shown*: one /predict each,
    naming the impression, so the replica logs what it served (``served-scores``) and the
    learner can join it to the label. Impressions are offered from the replay thread
    (:meth:`offer`); when the scorer falls behind they are dropped, never scored late."""

    def __init__(self, url: str, every: int = 40, backlog: int = 50) -> None:
        super().__init__(name="served-impressions", daemon=True)
        self.url, self.every = url, every
        self.queue: queue.Queue = queue.Queue(maxsize=backlog)
        self.offered = self.scored = self.dropped = self.errors = 0
        self.stop = threading.Event()

    def offer(self, impression: Impression) -> None:
        self.offered += 1
        if self.offered % self.every:
            return
        try:
            self.queue.put_nowait(impression)
        except queue.Full:
            self.dropped += 1

    def run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self.stop.is_set():
                try:
                    imp = self.queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                try:
                    ok = client.post(self.url, json=impression_request(imp)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.scored += ok
                self.errors += not ok
