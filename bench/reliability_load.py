"""Load and memory scenarios of ``bench/reliability.py`` (rows as in ``reliability_scenarios``).

* :func:`serving_under_load` — a ``python -m ctr.serving`` replica, bounded closed-loop clients,
  a publisher pushing a delta every second; then the replica is kill -9'd and restarted: it
  must be back at the newest published version.
* :func:`memory_under_replay` — broker, worker and learner as processes, a replay at maximum
  rate; peak RSS of each stage (children included: the worker's Feast writer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch

from ctr.infra.broker import EmbeddedBroker
from ctr.infra.kafka_io import DeliveryTracker, flush, make_producer, produce
from ctr.infra.procs import die_with_parent, free_port, stop_process


def _row(scenario: str, injected: int, lost: int | None = 0, crashes: int = 0, notes: str = "", **extra) -> dict:
    return {"scenario": scenario, "injected": injected, "lost": lost, "lost_by_design": 0, "crashes": crashes,
            "notes": notes, **extra}


class _Publisher:
    """A delta every ``interval_s`` on top of the previous version (what the learner ships)."""

    def __init__(self, bootstrap: str, snapshots: Path, interval_s: float = 1.0) -> None:
        from ctr.online_learner.delta import snapshot_tensors
        from ctr.online_learner.model import CTRModel, ModelConfig
        from ctr.online_learner.update_format import UpdateHeader, encode_update

        self.cfg = ModelConfig(("site", "device", "user_id", "item_id", "position"), ("I1",), table_bits=16)
        self.model, self.version, self.interval_s = CTRModel(self.cfg), 1, interval_s
        self.bootstrap, self.stop = bootstrap, threading.Event()
        snapshots.mkdir(parents=True, exist_ok=True)
        header = UpdateHeader(kind="snapshot", model_id="bench", version=1, base_version=1,
                              model_config=self.cfg.to_dict())
        (snapshots / "snapshot-000000000001.ctru").write_bytes(encode_update(header, snapshot_tensors(self.model)))
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from ctr.online_learner.delta import delta_tensors
        from ctr.online_learner.update_format import UpdateHeader, split_delta

        p, rng = make_producer(self.bootstrap), np.random.default_rng(0)
        while not self.stop.wait(self.interval_s):
            ids = np.unique(rng.integers(0, self.model.table.shape[0], 2000))
            with torch.no_grad():
                self.model.table[ids] += 0.01
            header = UpdateHeader(kind="delta", model_id="bench", version=self.version + 1, base_version=self.version)
            tr = DeliveryTracker()
            for part in split_delta(header, delta_tensors(self.model, ids)):
                produce(p, "model-updates", part, None, tr)
            flush(p, tr)
            self.version += 1


def _start_replica(bs: str, snapshots: Path, feast: Path, port: int, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "ctr.serving", "--bootstrap", bs, "--snapshot-dir", str(snapshots), "--feast-dir",
            str(feast), "--port", str(port), "--log-level", "warning"]
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                env={**os.environ, "CTR_ADMIN_TOKEN": "bench-token"})


def _wait(url: str, pred, timeout_s: float) -> dict:
    deadline, last = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=2)
            last = r.json()
            if pred(r.status_code, last):
                return last
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url}: {last}")


def serving_under_load(tmp: Path, seconds: float, clients: int = 3, rate_per_client: float = 40.0) -> list[dict]:
    from ctr.features.store import open_store

    feast, snapshots = tmp / "serving-feast", tmp / "serving-snapshots"
    open_store(feast)  # applies the repo before the replica opens it
    broker = EmbeddedBroker(kind="noida", data_dir=tmp / "serving-broker").start()
    pub = _Publisher(broker.bootstrap, snapshots)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_replica(broker.bootstrap, snapshots, feast, port, tmp / "replica.log")
    stats = {"lat": [], "codes": {}, "versions": set()}
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=url, timeout=10) as c:
            t0, i = time.monotonic(), 0
            while not stop.is_set():
                body = {"user_id": f"u{rng.integers(1000)}", "context": {"categorical": {"site": "s1"}},
                        "candidates": [{"item_id": f"ad{rng.integers(500)}"} for _ in range(10)]}
                t = time.perf_counter()
                try:
                    r = c.post("/predict", json=body)
                    code = r.status_code
                    if code == 200:
                        stats["lat"].append(time.perf_counter() - t)
                        stats["versions"].add(r.json()["model_version"])
                except httpx.HTTPError:
                    code = 0
                stats["codes"][code] = stats["codes"].get(code, 0) + 1
                i += 1
                time.sleep(max(0.0, i / rate_per_client - (time.monotonic() - t0)))

    rows = []
    try:
        _wait(url + "/readyz", lambda s, _: s == 200, 180)
        pub.thread.start()
        threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in range(clients)]
        for th in threads:
            th.start()
        time.sleep(seconds)
        stop.set()
        for th in threads:
            th.join(30)
        lat = np.array(stats["lat"]) * 1000
        codes = stats["codes"]
        n = sum(codes.values())
        five = sum(v for k, v in codes.items() if k >= 500 or k == 0)
        pct = {f"p{q}_ms": round(float(np.percentile(lat, q)), 1) for q in (50, 95, 99)} if len(lat) else {}
        rows.append(_row(f"serving: {seconds:.0f} s load, a delta every 1 s", n, crashes=five,
                         notes=f"{n / seconds:.0f} req/s x 10 candidates; codes {dict(sorted(codes.items()))}; "
                               f"{len(stats['versions'])} versions served", **pct,
                         max_ms=round(float(lat.max()), 1) if len(lat) else None))
        # kill -9 the replica while updates keep coming; it must come back at the newest version
        proc.kill()
        proc.wait(10)
        t0 = time.monotonic()
        proc = _start_replica(broker.bootstrap, snapshots, feast, port, tmp / "replica.log")
        _wait(url + "/readyz", lambda s, _: s == 200, 180)
        ready_s = time.monotonic() - t0
        time.sleep(1.5)
        pub.stop.set()
        pub.thread.join(30)
        want = pub.version
        got = _wait(url + "/model", lambda s, doc: doc.get("version") == want, 60)["version"]
        rows.append(_row("serving: replica kill -9 mid-updates", 1, lost=int(got != want),
                         notes=f"ready again in {ready_s:.1f} s, at v{got} = newest published v{want}"))
    finally:
        stop.set()
        pub.stop.set()
        stop_process(proc, 10)
        broker.stop()
    return rows


def _rss(pid: int) -> float:
    """RSS of ``pid`` and its children (the worker's Feast writer), in MiB; the bench process
    itself is counted alone (its children are the other stages)."""
    try:
        p = psutil.Process(pid)
        kids = p.children(recursive=True) if pid != os.getpid() else []
        return sum(x.memory_info().rss for x in [p, *kids]) / 2**20
    except psutil.Error:
        return 0.0


def memory_under_replay(tmp: Path, events: int) -> list[dict]:
    """Peak RSS per stage while a replay runs at maximum rate through worker and learner."""
    from ctr.streams.datasets import open_source
    from ctr.streams.replay import replay
    from ctr.streams.watermarks import send_watermark

    broker = EmbeddedBroker(kind="noida", data_dir=tmp / "mem-broker").start()
    bs = broker.bootstrap
    logs = tmp / "mem-logs"
    logs.mkdir()
    procs = {
        "worker": [sys.executable, "-m", "ctr.streams.worker", "--bootstrap", bs, "--app-id", "ctr-bench-rel",
                   "--feast-dir", str(tmp / "mem-feast"), "--instance-id", "w1"],
        "learner": [sys.executable, "-m", "ctr.cli", "learn", "--bootstrap", bs, "--state-dir",
                    str(tmp / "mem-learner")],
    }
    running = {}
    for name, argv in procs.items():
        with open(logs / f"{name}.log", "ab") as out:
            running[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    # the replay runs in the bench process, which earlier scenarios made load torch and uvicorn
    peak = {"replay (bench process)": 0.0, "broker": 0.0, "worker": 0.0, "learner": 0.0}
    pids = {next(iter(peak)): os.getpid(), "broker": broker.proc.pid,
            **{k: p.pid for k, p in running.items()}}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            for k, pid in pids.items():
                peak[k] = max(peak[k], _rss(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    metrics = tmp / "mem-learner" / "learner_metrics.jsonl"

    def learned() -> int:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return json.loads(lines[-1])["examples"] if lines else 0

    try:
        time.sleep(5)  # the worker joins its group while the replay starts anyway
        summary = replay(open_source("synthetic", seed=3, events=events), bs, rate=None)
        send_watermark(bs, 10**15)
        deadline = time.monotonic() + 180
        while learned() < summary.impressions and time.monotonic() < deadline:
            time.sleep(1)
        got = learned()
        # a stage that died during the run (not one that needed SIGKILL at the stop below)
        crashed = [k for k, p in running.items() if p.poll() is not None]
    finally:
        stop.set()
        sampler.join(5)
        for p in running.values():
            stop_process(p, 15)
        broker.stop()
    notes = f"{summary.events_per_s:,.0f} events/s produced; learner trained {got}/{summary.impressions}"
    rows = [_row("memory: max-rate replay", summary.impressions, lost=summary.impressions - got,
                 crashes=len(crashed), notes=notes + (f"; exited: {crashed}" if crashed else ""))]
    rows += [_row(f"memory: peak RSS {k}", 0, notes="", peak_rss_mb=round(v, 1)) for k, v in peak.items()]
    return rows
