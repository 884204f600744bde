"""Freshness probe: how long from a click entering Kafka until a served score reflects it.

One trial, all through the real pipeline (broker, ``ctr worker``, ``ctr learn``, ``ctr serve``):

1. two ads nobody has seen: the *target* and a *control*; ``/predict`` scores both for the same
   user and context, several times over ``baseline_s``: the target-minus-control difference
   before the burst, and how much it wobbles while other versions land (the noise);
2. a burst of ``impressions`` impressions of the target, then a click on each (a new ad that
   suddenly performs), produced to ``impressions``/``clicks`` with the event time of the stream
   (``event_clock``), acknowledged by the broker; the clock starts when the clicks are handed
   to the producer. The impressions are shown to new users in contexts taken from
   ``templates`` -- impressions of the stream being served, so the contexts are ones the model
   knows (contexts it never saw except in bursts would learn "always clicks" and saturate the
   next trial at p ~ 1) -- and the score is read for one more new user in the first context;
3. ``/predict`` is polled every ``poll_s`` until the target's score, *relative to the
   control's*, rose by more than ``max(min_move, noise_factor * noise)`` over its median before
   the burst, where ``noise`` is the largest deviation seen before it (versions keep landing
   meanwhile): that moment minus the start is the trial's freshness. A trial that never moves
   within ``timeout_s`` reports ``None`` (counted, not hidden).

Scores are compared in log-odds (:func:`log_odds_gap`): the same evidence moves a score by
``p (1 - p)`` times as much in probability, so a threshold in probability missed every trial
whose context the model scores low (README, "Freshness"). ``min_move`` 0.05 in log-odds is
the old 0.005 in probability at the stream's ~10 % click rate.

Why relative to a control: every version that lands moves every score (dense weights, shared
context rows), by as much as 0.1 on this stream, which would hide or fake a burst's effect; the
difference of two ads scored for the same user in the same request cancels that, and is left
with what is specific to the target -- its embedding rows. (The burst also lifts the shared
rows, so the target's own score usually rises more: ``moved`` reports it.)

>>> ProbeResult(trial=0, fresh_s=None, specific=0.0, threshold=0.05, version=None).ok
False
"""

from __future__ import annotations

import math
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import httpx
import msgspec

from ctr.infra.kafka_io import DeliveryTracker, flush, make_producer, produce
from ctr.infra.schema import Click, Impression, encode
from ctr.infra.topics import CLICKS_TOPIC, IMPRESSIONS_TOPIC


def log_odds_gap(p_target: float, p_control: float) -> float:
    """``logit(p_target) - logit(p_control)``, probabilities clipped to [1e-6, 1 - 1e-6].

    >>> round(log_odds_gap(0.02, 0.01), 3)  # twice the odds, near zero
    0.703
    >>> round(log_odds_gap(0.2, 0.1), 3)
    0.811
    """
    def logit(p: float) -> float:
        p = min(max(p, 1e-6), 1 - 1e-6)
        return math.log(p / (1 - p))

    return logit(p_target) - logit(p_control)


@dataclass(frozen=True)
class ProbeResult:
    trial: int
    #: seconds from the clicks entering Kafka to the first served score that moved; None = never
    fresh_s: float | None
    #: how far the target-minus-control difference (in log-odds) rose over its median before
    #: the burst (at detection or timeout): the ad-specific move that detection uses
    specific: float
    threshold: float
    #: the model version that served the first moved score
    version: int | None
    #: how far the target's own score rose (shared rows included) at the same moment
    moved: float = 0.0
    #: the target's median score before the burst (a move in probability is smaller near 0 or 1)
    base: float = float("nan")
    #: unix time the clicks were handed to the producer (the trial's clock starts there)
    clicked_unix: float = float("nan")
    #: ``(seconds since the clicks, version, specific move)`` at each served version seen while
    #: polling, and at the move: where a slow trial's seconds went (no new version, or versions
    #: that moved too little; a move without a new version came with the store's item statistics)
    trace: tuple[tuple[float, int, float], ...] = ()

    @property
    def ok(self) -> bool:
        return self.fresh_s is not None

    def as_dict(self) -> dict:
        return asdict(self)


class FreshnessProbe:
    """Runs freshness trials against a live pipeline; each trial uses two brand-new ads."""

    def __init__(
        self,
        bootstrap: str,
        predict_url: str,
        event_clock: Callable[[], int],
        *,
        impressions: int = 30,
        templates: Sequence[Impression] | None = None,
        poll_s: float = 0.05,
        baseline_s: float = 2.5,
        timeout_s: float = 20.0,
        min_move: float = 0.05,
        noise_factor: float = 3.0,
    ) -> None:
        self.bootstrap, self.url, self.event_clock = bootstrap, predict_url, event_clock
        self.impressions = impressions
        if templates is None:  # the demo's default stream
            from ctr.streams.datasets import open_source

            templates = [r.impression for r in open_source("synthetic", seed=0, events=20 * impressions)]
        self.templates = list(templates)
        self.poll_s, self.baseline_s, self.timeout_s = poll_s, baseline_s, timeout_s
        self.min_move, self.noise_factor = min_move, noise_factor
        self.run_id = uuid.uuid4().hex[:8]
        self.producer = make_producer(bootstrap, **{"linger.ms": 0})
        self.http = httpx.Client(timeout=5.0)
        self.results: list[ProbeResult] = []
        #: impressions (each with one click) this probe put into the stream
        self.impressions_sent = 0

    def close(self) -> None:
        self.http.close()

    def _score(self, viewer: Impression, target: str, control: str) -> tuple[float, float, int] | None:
        """``(p_target, p_control, version)`` for ``viewer``; None if the request failed."""
        body = {
            "user_id": viewer.user_id,
            "context": {"categorical": dict(viewer.categorical), "numeric": dict(viewer.numeric)},
            "candidates": [{"item_id": target, "position": viewer.position},
                           {"item_id": control, "position": viewer.position}],
        }  # fmt: skip
        try:
            r = self.http.post(self.url, json=body)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        out = r.json()
        p = [c["p_click"] for c in out["predictions"]]
        return p[0], p[1], int(out["model_version"])

    def trial(self, k: int | None = None) -> ProbeResult:
        k = len(self.results) if k is None else k
        tag = f"probe-{self.run_id}-{k}"
        target, control = f"{tag}-ad", f"{tag}-control"
        n = self.impressions
        shown = [self.templates[(k * n + i) % len(self.templates)] for i in range(n)]
        viewer = msgspec.structs.replace(shown[0], user_id=f"{tag}-viewer")
        before: list[tuple[float, float, int]] = []
        end = time.monotonic() + self.baseline_s
        give_up = end + self.timeout_s  # serving not answering: a missed trial, not a hang
        while (time.monotonic() < end or len(before) < 3) and time.monotonic() < give_up:
            s = self._score(viewer, target, control)
            if s is not None:
                before.append(s)
            time.sleep(self.poll_s)
        if len(before) < 3:
            res = ProbeResult(trial=k, fresh_s=None, specific=0.0, threshold=float("nan"), version=None)
            self.results.append(res)
            return res
        base = statistics.median(p for p, _, _ in before)
        base_diff = statistics.median(log_odds_gap(p, c) for p, c, _ in before)
        noise = max(abs(log_odds_gap(p, c) - base_diff) for p, c, _ in before)
        threshold = max(self.min_move, self.noise_factor * noise)

        t_event = self.event_clock()
        tracker = DeliveryTracker()
        ids = [f"{tag}-imp-{i}" for i in range(n)]
        for i, (eid, t) in enumerate(zip(ids, shown, strict=True)):
            imp = Impression(event_id=eid, event_time_ms=t_event + i, user_id=f"{tag}-user-{i}", item_id=target,
                             position=t.position, categorical=t.categorical, numeric=t.numeric)  # fmt: skip
            produce(self.producer, IMPRESSIONS_TOPIC, encode(imp), eid.encode(), tracker)
        flush(self.producer, tracker)
        start, clicked_unix = time.monotonic(), time.time()
        for i, eid in enumerate(ids):
            click = Click(impression_id=eid, event_time_ms=t_event + i + 500)
            produce(self.producer, CLICKS_TOPIC, encode(click), eid.encode(), tracker)
        flush(self.producer, tracker)
        self.impressions_sent += len(ids)

        moved, specific, fresh, version = 0.0, 0.0, None, None
        trace: list[tuple[float, int, float]] = []
        while time.monotonic() - start < self.timeout_s:
            s = self._score(viewer, target, control)
            if s is not None:
                seen = time.monotonic() - start
                moved, specific = s[0] - base, log_odds_gap(s[0], s[1]) - base_diff
                if not trace or trace[-1][1] != s[2] or specific > threshold:  # a new version, or the move
                    trace.append((round(seen, 3), s[2], round(specific, 5)))
                if specific > threshold:
                    fresh, version = seen, s[2]
                    break
            time.sleep(self.poll_s)
        res = ProbeResult(trial=k, fresh_s=fresh, specific=round(specific, 5), threshold=round(threshold, 5),
                          version=version, moved=round(moved, 5), base=round(base, 5),
                          clicked_unix=round(clicked_unix, 3), trace=tuple(trace))  # fmt: skip
        self.results.append(res)
        return res


class ProbeLoop(threading.Thread):
    """Runs a trial every ``every_s`` seconds while ``stop`` is not set and the stream's clock
    has started; each result is stamped with the unix time it finished (``times``)."""

    def __init__(self, probe: FreshnessProbe, every_s: float = 3.0) -> None:
        super().__init__(name="freshness-probe", daemon=True)
        self.probe, self.every_s = probe, every_s
        self.stop = threading.Event()
        self.times: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if self.probe.event_clock() > 0:
                    self.probe.trial()
                    self.times.append(time.time())
                self.stop.wait(self.every_s)
        except BaseException as err:  # noqa: BLE001 - reported by whoever reads the results
            self.error = err
        finally:
            self.probe.close()


def freshness_summary(results: list[ProbeResult]) -> dict:
    """p50/p99 of the trials that moved (nearest rank), and how many never did."""
    xs = sorted(r.fresh_s for r in results if r.fresh_s is not None)

    def pct(q: float) -> float | None:
        return round(xs[min(len(xs) - 1, round(q * (len(xs) - 1)))], 3) if xs else None

    return {
        "freshness_trials": len(results),
        "freshness_missed": sum(1 for r in results if r.fresh_s is None),
        "freshness_p50_s": pct(0.5),
        "freshness_p99_s": pct(0.99),
        "freshness_max_s": xs[-1] if xs else None,
    }
