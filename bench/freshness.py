"""``ctr bench freshness``: click entering Kafka -> a served score that reflects it, p50/p99.

What runs (all real, on this machine, as ``ctr demo`` runs it): the embedded broker, a
``ctr worker`` (label join: a positive example leaves at its click; windowed features ->
Feast), the reweighting stage, ``ctr learn`` (publishes a delta every second) and ``ctr serve``
(applies deltas from ``model-updates``, features from Feast through its cache). A background
replay of the synthetic stream runs at ``--rate`` events/s the whole time, so versions land,
the feature store is written and the trials share the machine with real traffic.

Each trial (:class:`ctr.probe.FreshnessProbe`): a burst of ``--impressions`` impressions of
a brand-new ad and a click on each, at the stream's event time; ``/predict`` is polled every
50 ms for that ad and a control ad until the target's score relative to the control's rose
beyond the noise measured just before (the control cancels what every new version does to
every score). Freshness = that
moment minus the time the clicks were handed to the producer. A trial that never moves within
``--timeout`` counts as missed.

    python -m bench.freshness --trials 20 --json bench/results/freshness.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from bench.common import report

TARGET_P50_S, TARGET_P99_S = 2.0, 5.0
SEED = 7  # of the background stream; the probes' contexts come from the same stream


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="ctr bench freshness", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=Path("bench/results/freshness.json"))
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--rate", type=float, default=1000.0, help="background replay, events/s")
    ap.add_argument("--impressions", type=int, default=30, help="impressions (each clicked) per burst")
    ap.add_argument("--gap", type=float, default=1.0, help="seconds between trials")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds before a trial counts as missed")
    ap.add_argument("--kind", default="noida", help="embedded broker kind")
    a = ap.parse_args(argv)

    from ctr.demo import ready, start_stages
    from ctr.infra.broker import EmbeddedBroker
    from ctr.probe import FreshnessProbe, freshness_summary
    from ctr.streams.datasets import open_source
    from ctr.streams.replay import ReplaySummary, replay
    from ctr.supervisor import Supervisor

    out = Path(tempfile.mkdtemp(prefix="bench-freshness-"))
    broker = EmbeddedBroker(kind=a.kind, data_dir=out / "broker").start()
    sup = Supervisor(out / "logs")
    extra: dict = {"config": vars(a) | {"json": str(a.json)}, "logs": str(out), "loadavg_before": os.getloadavg()}
    try:
        port = start_stages(sup, broker.bootstrap, out)
        progress = ReplaySummary()
        # enough events for start-up + every trial timing out, so the stream never ends mid-trial
        events = int(a.rate * (240 + a.trials * (a.timeout + a.gap + 2)))
        stop = threading.Event()

        def background() -> None:
            def tick(s: ReplaySummary) -> None:
                progress.__dict__.update(s.__dict__)
                if stop.is_set():
                    raise InterruptedError  # ends the replay early; nothing after it matters

            try:
                replay(open_source("synthetic", seed=SEED, events=events), broker.bootstrap, rate=a.rate,
                       on_progress=tick, close_after_ms=None)  # fmt: skip
            except InterruptedError:
                pass

        threading.Thread(target=background, name="replay", daemon=True).start()
        sup.wait_for(lambda: ready(port), timeout_s=240, what="the serving tier to be ready")
        templates = [r.impression for r in open_source("synthetic", seed=SEED, events=20 * a.impressions)]
        probe = FreshnessProbe(broker.bootstrap, f"http://127.0.0.1:{port}/predict", lambda: progress.last_event_ms,
                               impressions=a.impressions, templates=templates, timeout_s=a.timeout)  # fmt: skip
        time.sleep(5.0)  # a few versions in: the serving tier is applying deltas, not starting up
        try:
            for k in range(a.trials):
                r = probe.trial(k)
                dead = sup.check()
                print(f"trial {k + 1}/{a.trials}: "
                      f"{'missed' if r.fresh_s is None else f'{r.fresh_s:.2f} s'} "
                      f"(ad-specific {r.specific:+.3f} log-odds, "
                      f"threshold {r.threshold:.3f}, own score {r.base:.4f} {r.moved:+.4f}, version {r.version}); "
                      f"replayed {progress.events:,}"
                      + (f"; restarted: {dead}" if dead else ""), flush=True)  # fmt: skip
                time.sleep(a.gap)
        finally:
            probe.close()
            stop.set()
        summ = freshness_summary(probe.results)
        extra["trials"] = [r.as_dict() for r in probe.results]
        extra["background_events"] = progress.events
        extra["loadavg_after"] = os.getloadavg()
        rows = [{
            "name": "click -> served score moved",
            "trials": summ["freshness_trials"], "missed": summ["freshness_missed"],
            "p50_s": summ["freshness_p50_s"], "p99_s": summ["freshness_p99_s"], "max_s": summ["freshness_max_s"],
            "target_p50_s": TARGET_P50_S, "target_p99_s": TARGET_P99_S,
            "background_events_per_s": a.rate, "burst_impressions": a.impressions,
        }]  # fmt: skip
    finally:
        sup.stop_all(["serve", "learner", "reweighter", "worker"])
        broker.stop()
    return report("freshness: click -> served score", rows, a.json, extra)


if __name__ == "__main__":
    main()
