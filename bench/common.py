"""Shared bench plumbing: a table on stdout, JSON with machine facts under bench/results/."""

from __future__ import annotations

import json
import os
import platform
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _git(*args: str) -> str:
    import subprocess

    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _tree() -> tuple[str | None, bool]:
    # the results folder is what a bench writes: its own outputs do not make the code dirty
    commit = _git("rev-parse", "HEAD")
    if not commit:
        # a copy of the tree without .git (the GPU machine): the commit and the state of the tree
        # are stamped where git is (`make gpu-carry`), read here from the environment; unknown
        # counts as dirty
        return os.environ.get("CTR_BENCH_COMMIT") or None, os.environ.get("CTR_BENCH_DIRTY", "1") != "0"
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
    return commit, bool(changed)


#: the code and the load when the bench process started (``report`` checks both again at its end)
_TREE_AT_START = _tree()
_LOAD_AT_START = os.getloadavg()


#: Processes kept spinning for the whole run (``keep_cores_busy``): the loaded variant of a bench.
_BUSY: list = []

_SPIN = """
import os
parent = os.getppid()
while os.getppid() == parent:  # a spinner outlives no bench, even one that was kill -9'd
    for _ in range(1_000_000):
        pass
"""


def keep_cores_busy(n: int) -> None:
    """Keep ``n`` cores busy with spinning processes until this process exits: what a result
    looks like on a machine shared with other work (CI, a laptop, a node with neighbours).
    ``CTR_BENCH_BUSY_CORES=N`` does the same for a bench started as a module."""
    import atexit
    import subprocess
    import sys

    for _ in range(n - len(_BUSY)):
        _BUSY.append(subprocess.Popen([sys.executable, "-c", _SPIN]))

    def stop() -> None:
        for proc in _BUSY:
            proc.kill()
            proc.wait()

    atexit.register(stop)


if os.environ.get("CTR_BENCH_BUSY_CORES"):
    keep_cores_busy(int(os.environ["CTR_BENCH_BUSY_CORES"]))


def provenance() -> dict:
    """What a reader needs to trace a result: the commit, whether the tree had uncommitted
    changes or moved during the run (a dirty result is not one to quote), the command and the
    load around the run."""
    import sys

    commit, dirty = _tree()
    return {
        "commit": _TREE_AT_START[0],
        "dirty": _TREE_AT_START[1] or dirty or commit != _TREE_AT_START[0],
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "load_avg_start": [round(x, 2) for x in _LOAD_AT_START],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "busy_cores": len(_BUSY),
    }


def machine() -> dict:
    import psutil

    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def timings(fn: Callable[[], object], reps: int) -> list[float]:
    """Seconds per call of ``fn()``, ``reps`` calls after one untimed warm-up call."""
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def report(title: str, rows: list[dict], json_path: Path, extra: dict | None = None) -> dict:
    """Print ``rows`` as a table and write them (plus machine facts) to ``json_path``."""
    print_table(title, rows)
    doc = {
        "bench": title,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        **provenance(),
        "rows": rows,
        **(extra or {}),
    }
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2))
    Console().print(f"wrote {json_path}")
    return doc


def print_table(title: str, rows: list[dict]) -> None:
    """``rows`` (dicts, columns in first-seen order) as one table on stdout."""
    if not rows:
        Console().print(f"{title}: no rows")
        return
    table = Table(title=title)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    for c in cols:
        table.add_column(c, justify="right" if any(isinstance(r.get(c), (int, float)) for r in rows) else "left")
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in cols])
    # wide enough for every cell on one line (a pipe or CI log has no terminal width to fit)
    need = sum(max(len(c), *(len(_fmt(r.get(c))) for r in rows)) + 3 for c in cols) + 1
    Console(width=max(120, Console().width, need)).print(table)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def read_to_end(bootstrap: str, topic: str, timeout_s: float = 120.0) -> list:
    """Every record of ``topic`` from the beginning of each partition (no group offsets)."""
    from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

    from ctr.infra.kafka_io import make_consumer

    c = make_consumer(bootstrap, f"read-{uuid.uuid4().hex[:6]}", **{"enable.partition.eof": True})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    # the end is the high watermark taken now: after broker restarts noida-db reported an end
    # past the last record on some partition, and waiting for a partition-EOF event never ended
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out, done, deadline = [], {p for p, end in ends.items() if end == 0}, time.monotonic() + timeout_s
    try:
        while len(done) < len(parts):
            if time.monotonic() > deadline:
                left = sorted(set(parts) - done)
                raise TimeoutError(f"{topic}: partitions {left} not read to {ends} in {timeout_s}s")
            for m in c.consume(10_000, 0.5):
                if m.error() is None:
                    out.append(m)
                    if m.offset() >= ends[m.partition()] - 1:
                        done.add(m.partition())
                elif m.error().code() == KafkaError._PARTITION_EOF:
                    done.add(m.partition())
    finally:
        c.close()
    return out
