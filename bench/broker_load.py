"""What the embedded broker costs while the pipeline runs: its CPU and its state file over time.

    python -m bench.broker_load --json bench/results/broker_load.json

``ctr up`` (broker, worker, reweighter, learner, serving, as a user starts them) in a temporary
state folder, then ``ctr replay --rate R`` of the synthetic stream; every ``--every`` seconds
the CPU each process used since the last sample (% of one core) and the size of the broker's
data folder. noida-db keeps its whole state in one JSON file that it rewrites after writes, so
its CPU grows with what the topics retain; this bench shows by how much, at the demo's rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.common import report


def _du_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


def main(json_path: Path, rate: int, seconds: float, every: float) -> dict:
    state = Path(tempfile.mkdtemp(prefix="bench-broker-load-"))
    env = {**os.environ, "CTR_STATE_DIR": str(state)}
    env.pop("CTR_BOOTSTRAP", None)
    ctr = [sys.executable, "-m", "ctr.cli"]
    subprocess.run([*ctr, "up"], env=env, check=True, capture_output=True, timeout=300)
    rows: list[dict] = []
    replay = None
    try:
        info = json.loads((state / "stack.json").read_text())
        procs = {name: psutil.Process(svc["pid"]) for name, svc in info["services"].items()}
        broker_dir = next(state.glob("broker-*"))
        replay = subprocess.Popen([*ctr, "replay", "--rate", str(rate), "--events", str(int(rate * seconds * 2))],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs["replay"] = psutil.Process(replay.pid)

        def cpu() -> dict[str, float]:
            """CPU seconds of each process and its live children (the worker's Feast writer)."""
            out = {}
            for name, p in procs.items():
                total = 0.0
                try:
                    for q in (p, *p.children(recursive=True)):
                        t = q.cpu_times()
                        total += t.user + t.system
                except psutil.Error:
                    pass
                out[name] = total
            return out

        start, last = time.monotonic(), cpu()
        t_last = start
        while time.monotonic() - start < seconds:
            time.sleep(every)
            now, used = time.monotonic(), cpu()
            row = {"t_s": round(now - start), "broker_state_mb": _du_mb(broker_dir)}
            span = now - t_last
            row.update({f"{name}_cpu_pct": round(100 * (used[name] - last[name]) / span, 1) for name in procs})
            rows.append(row)
            print(row, flush=True)
            last, t_last = used, now
    finally:
        if replay is not None:
            replay.kill()
            replay.wait()
        subprocess.run([*ctr, "down"], env=env, capture_output=True, timeout=120)
    return report(f"embedded broker under the pipeline: ctr up + ctr replay --rate {rate}", rows, json_path,
                  {"rate": rate, "seconds": seconds, "every_s": every,
                   "note": "cpu_pct: % of one core used in the interval before the row, each process with its "
                           "live children (the worker's Feast writer); broker_state_mb: the broker's data folder"})


def cli(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.broker_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=Path("bench/results/broker_load.json"))
    ap.add_argument("--rate", type=int, default=2000, help="events/s replayed (the demo's)")
    ap.add_argument("--seconds", type=float, default=180.0, help="how long to sample (the demo's 3 minutes)")
    ap.add_argument("--every", type=float, default=15.0, help="seconds between samples")
    a = ap.parse_args(argv)
    main(a.json, a.rate, a.seconds, a.every)


if __name__ == "__main__":
    cli()
