"""Reliability: faults injected, load held, bad inputs tried — and what was lost or crashed.

    ctr bench reliability --json bench/results/reliability.json

Bounded (a few minutes on 2 cores). Every row names what was injected, how many, how many
were lost (acknowledged but gone, or an impression without its example) and how many crashes
(an exception or 5xx where a clear error was due). Scenarios:

* **bad input** — mutated events through the event decoders, corrupted model updates through
  the serving replica's per-message path, hostile requests to a real uvicorn server, hostile
  files through the dataset readers;
* **broker faults** — noida stopped cleanly and restarted on its port under a running
  producer; a producer during the outage (its delivery reports must fail); noida kill -9
  (what its debounced file does not keep); a tansu restart (keeps nothing);
* **serving** — a replica kill -9'd while a publisher pushes a delta every second and clients
  load it: the restarted replica must be back at the newest version; zero 5xx, latency
  percentiles;
* **memory** — peak RSS of the replay, broker, worker and learner during a max-rate replay.

Worker and learner kill -9 are exercised by tests/test_stream_agents.py and
tests/test_trainer.py (minutes each); tests/test_reliability_faults.py runs the whole pipeline
through a broker restart and a serving kill -9.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from pathlib import Path

from bench.common import report
from bench.reliability_scenarios import (
    bad_datasets,
    bad_events,
    bad_http,
    bad_updates,
    broker_kill9,
    broker_outage,
    broker_restart,
    memory_under_replay,
    serving_under_load,
    tansu_restart,
)


def main(json_path: Path = Path("bench/results/reliability.json"), seconds: float = 30.0, events: int = 60_000,
         seed: int = 0) -> dict:
    rng = random.Random(seed)
    rows: list[dict] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ctr-bench-rel-") as tmp:
        tmp_path = Path(tmp)
        scenarios = [("bad events", lambda: bad_events(rng, 20_000)), ("bad updates", lambda: bad_updates(rng, 2_000)),
                     ("bad files", lambda: bad_datasets(rng, tmp_path, 60)), ("bad http", lambda: bad_http(rng, 2_000)),
                     ("broker restart", lambda: broker_restart(tmp_path)),
                     ("broker outage", lambda: broker_outage(tmp_path)),
                     ("broker kill -9", lambda: broker_kill9(tmp_path)), ("tansu", lambda: tansu_restart(tmp_path)),
                     ("serving", lambda: serving_under_load(tmp_path, seconds)),
                     ("memory", lambda: memory_under_replay(tmp_path, events))]
        for name, fn in scenarios:
            try:
                rows += fn()
            except Exception as err:  # noqa: BLE001 - a failed scenario is a row, not a lost report
                rows.append({"scenario": name, "injected": 0, "lost": None, "crashes": 1,
                             "notes": f"scenario failed: {type(err).__name__}: {err}"[:200]})
            print(f"[{time.monotonic() - t0:5.0f} s] {rows[-1]['scenario']}", flush=True)
    lost = sum(r.get("lost") or 0 for r in rows)
    crashes = sum(r.get("crashes") or 0 for r in rows)
    return report("reliability: faults, load, bad input", rows, json_path,
                  {"total_lost": lost, "total_crashes": crashes, "target": "zero lost, zero crashes",
                   "seconds": round(time.monotonic() - t0, 1), "threads": threading.active_count()})


if __name__ == "__main__":  # pragma: no cover
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=Path("bench/results/reliability.json"))
    p.add_argument("--seconds", type=float, default=30.0, help="serving load duration")
    p.add_argument("--events", type=int, default=60_000, help="events of the max-rate replay")
    a = p.parse_args()
    main(a.json, a.seconds, a.events)
