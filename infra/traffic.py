"""A steady prediction client for the demo: real HTTP requests to ``/predict`` at a fixed rate,
recording latency and the model version that scored each response."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx

from streams.datasets import open_source


@dataclass
class TrafficLog:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    latency_ms: list[float] = field(default_factory=list)
    #: (unix time s, model version) of every 2xx response
    versions: list[tuple[float, int]] = field(default_factory=list)


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
