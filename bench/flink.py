"""``python -m bench.flink``: the PyFlink windowed-feature job's throughput on the embedded
mini-cluster (parallelism 1 and 2), next to the Faust agents on the same input.

One embedded noida-db broker, one synthetic replay with the tests' small vocabulary
(:data:`VOCAB`: 3k users, 300 ads, 8 categorical fields): HOP windows emit one row per entity
per window per hop, so with Criteo's vocabulary (C3 alone has ~10M values, 100k users) nearly
every event would open ~65 rows of its own (5 for 5 m, 60 for 1 h) and the bench would
measure the broker swallowing gigabytes of sink output, not the aggregation. Rows:

* ``flink p=N`` -- ``streams/flink/job.py`` bounded at the true end offsets, run as a process
  with ``.venv-flink``'s interpreter. ``events_per_s`` = input events / job time (from
  submission to the end of the bounded job: planning, deployment, the read of both topics,
  the interval join, the HOP windows and the Kafka sink of every window row);
  ``wall_s`` adds the JVM start; ``cpu_s`` is the CPU time of the job's processes (JVM
  included), so ``events_per_cpu_s`` holds up on a loaded machine where wall rates do not.
  ``output_rows`` = window rows written (one per entity per window per hop in which it had an
  event: up to 60 per event for the 1 h window).
* ``flink p=1 ... fixed cost`` -- the same job bounded at ~1k events (first run): start,
  planning, code generation and compilation, deployment, JIT, and the ~54k window rows those
  events open. ``marginal_events_per_cpu_s`` of the rows above = the extra events / the extra
  CPU time over this row.
* ``flink cluster p=1`` -- the same bounded job submitted with ``flink run -py`` to a standalone
  cluster (``ctr flink up``: a JobManager and one TaskManager, separate JVMs, 1 GiB each),
  started and warmed before the clock starts (the cluster runs for months; its JVM start is
  not the job's). ``seconds`` = submission to the end, as above; ``cpu_s`` = CPU time of the
  JobManager, the TaskManager and the ``flink run`` client (its JVM and Python) during it;
  ``wall_s`` = the whole ``flink run``.
* ``faust: join + features`` -- ``python -m ctr.streams.worker`` (label join, feature agent,
  Feast writer process) on the same topics, from its first event (its Prometheus counter,
  as in ``bench/stream.py``; start-up excluded) until the feature agent has committed every
  delta batch (its counts are final; Feast writes may trail). ``cpu_s``: worker + Feast
  writer process; ``join_events_per_s``: the join alone reaching the last event.

Numbers depend on the machine's load (2 shared cores here): compare rows of one run, and
prefer ``events_per_cpu_s`` when the load average is high (it is recorded in the JSON).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from bench.common import report
from bench.stream import _metric, _worker
from ctr.infra.procs import stop_process

#: Same as ``tests/test_stream_agents.py`` SMALL (bench code does not import tests).
VOCAB = dict(n_categorical=8, cardinalities=(50, 200, 1000, 20, 5, 300, 10, 10), n_numeric=4, n_informative=4,
             n_drift_fields=2, n_users=3000, n_ads=300, n_new_ads=50)  # fmt: skip


def _committed(consumer: object, bootstrap: str, topic: str) -> bool:
    """Whether the consumer's group has committed ``topic`` up to its end offsets."""
    from confluent_kafka import TopicPartition

    from ctr.streams.flink.harness import end_offsets

    ends = end_offsets(bootstrap, (topic,))[topic]
    done = consumer.committed([TopicPartition(topic, p) for p in ends], timeout=10)  # type: ignore[attr-defined]
    return all(tp.offset >= ends[tp.partition] for tp in done)


def _faust_row(bootstrap: str, total: int, tmp: Path, timeout_s: float = 900.0) -> dict:
    """The worker from its first event until the feature agent committed every delta batch
    (its counts are then final; the Feast writer may still be writing)."""
    from ctr.infra.kafka_io import make_consumer
    from ctr.streams.flink.harness import _tree_cpu

    app_id = f"bench-flink-{uuid.uuid4().hex[:6]}"
    proc, port = _worker(bootstrap, app_id, tmp / "feast", tmp / f"{app_id}.log")
    ps, cpu = psutil.Process(proc.pid), {}
    c = make_consumer(bootstrap, app_id)
    t_first = t_join = None
    cpu_first = 0.0
    n = 0.0
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            _tree_cpu(ps, cpu)
            now = time.perf_counter()
            n = _metric(port, "ctr_join_events_total")
            if t_first is None and n > 0:
                t_first, cpu_first = now, sum(cpu.values())
            if t_join is None and n >= total:
                t_join = now
            if t_join is not None and _committed(c, bootstrap, f"{app_id}-feature-deltas"):
                break
            time.sleep(0.2)
        else:
            return {"name": "faust: join + features (1 worker)", "events": int(n), "error": "did not finish"}
        t_done = time.perf_counter()
        cpu_s = sum(cpu.values()) - cpu_first
    finally:
        c.close()
        os.kill(proc.pid, signal.SIGTERM)
        stop_process(proc, grace_s=15)
    assert t_first is not None and t_join is not None
    secs = t_done - t_first
    return {"name": "faust: join + features (1 worker)", "events": total, "seconds": round(secs, 2),
            "events_per_s": round(total / secs, 1), "cpu_s": round(cpu_s, 2),
            "events_per_cpu_s": round(total / cpu_s, 1),
            "join_events_per_s": round(total / (t_join - t_first), 1)}  # fmt: skip


def _flink_row(bootstrap: str, ends: dict, total: int, p: int, tmp: Path, label: str = "") -> dict:
    from ctr.streams.flink.harness import create_output_topic, end_offsets, run_job

    topic = f"flink-features-p{p}" + ("-small" if label else "")
    create_output_topic(bootstrap, topic)
    job = run_job(bootstrap, ends, topic, parallelism=p, group=f"bench-{topic}", log=tmp / f"{topic}.log",
                  timeout_s=1800)  # fmt: skip
    out = sum(end_offsets(bootstrap, (topic,))[topic].values())
    return {"name": f"flink p={p} (mini-cluster, SQL HOP){label}", "events": total, "seconds": job["seconds"],
            "events_per_s": round(total / job["seconds"], 1), "cpu_s": job["cpu_s"],
            "events_per_cpu_s": round(total / job["cpu_s"], 1), "wall_s": job["wall_s"],
            "output_rows": out}  # fmt: skip


def _cluster_row(bootstrap: str, ends: dict, total: int, tmp: Path) -> dict:
    """The bounded job on a standalone cluster (``ctr.streams.flink.cluster``), 1 TaskManager."""
    import json

    from ctr.streams.flink import cluster
    from ctr.streams.flink.harness import create_output_topic, end_offsets

    home = tmp / "flink-cluster"
    state = cluster.up(home, cluster.ClusterConfig(taskmanagers=1))
    try:
        jvms = [psutil.Process(p["pid"]) for p in state["processes"].values()]

        def cpu() -> float:
            return sum(t.user + t.system for t in (j.cpu_times() for j in jvms))

        topic = "flink-features-cluster"
        create_output_topic(bootstrap, topic)
        c0, k0, t0 = cpu(), os.times(), time.perf_counter()
        job = cluster.submit(home, bootstrap, group="bench-cluster", timeout_s=1800,
                             job_args=("--end-offsets", json.dumps(ends), "--output-topic", topic))  # fmt: skip
        wall = time.perf_counter() - t0
        k1 = os.times()
        client = (k1.children_user - k0.children_user) + (k1.children_system - k0.children_system)
        cpu_s = cpu() - c0 + client
        out = sum(end_offsets(bootstrap, (topic,))[topic].values())
    finally:
        cluster.down(home)
    return {"name": "flink cluster p=1 (JobManager + 1 TaskManager, SQL HOP)", "events": total,
            "seconds": job["seconds"], "events_per_s": round(total / job["seconds"], 1), "cpu_s": round(cpu_s, 2),
            "events_per_cpu_s": round(total / cpu_s, 1), "wall_s": round(wall, 3), "output_rows": out}  # fmt: skip


def main(json_path: Path, events: int, parallelisms: tuple[int, ...], kind: str, skip_faust: bool,
         skip_cluster: bool = False) -> dict:  # fmt: skip
    from ctr.infra.broker import EmbeddedBroker
    from ctr.streams.datasets import open_source
    from ctr.streams.flink import KAFKA_PRODUCER_CONFIG
    from ctr.streams.flink.harness import end_offsets, flink_python
    from ctr.streams.replay import replay

    if flink_python() is None:
        raise SystemExit("no .venv-flink: run `make flink-setup` first")
    tmp = Path(tempfile.mkdtemp(prefix="bench-flink-"))
    broker = EmbeddedBroker(kind=kind, data_dir=tmp / "broker").start()
    rows: list[dict] = []
    extra: dict = {"events": events, "vocab": VOCAB, "broker": kind, "logs": str(tmp)}
    extra["loadavg_before"] = os.getloadavg()
    try:
        print(f"replaying {events:,} impressions (+ clicks) ...", flush=True)
        summary = replay(
            open_source("synthetic", seed=1, events=events, **VOCAB),
            broker.bootstrap,
            producer_config=KAFKA_PRODUCER_CONFIG,  # Flink's Kafka connector cannot read zstd
        )
        total = summary.events
        ends = end_offsets(broker.bootstrap)
        extra["replayed_events"] = total
        # The fixed cost (JVM start, planning, deployment, JIT) on the first ~1k events.
        small = {t: {q: min(o, 125) for q, o in parts.items()} for t, parts in ends.items()}
        n_small = sum(o for parts in small.values() for o in parts.values())
        base = _flink_row(broker.bootstrap, small, n_small, 1, tmp, " fixed cost")
        rows.append(base)
        print(rows[-1], flush=True)
        for p in parallelisms:
            r = _flink_row(broker.bootstrap, ends, total, p, tmp)
            # CPU per event once the fixed cost (measured at p=1) is paid.
            extra_cpu = r["cpu_s"] - base["cpu_s"]
            r["marginal_events_per_cpu_s"] = round((total - n_small) / extra_cpu, 1) if extra_cpu > 0 else None
            rows.append(r)
            print(rows[-1], flush=True)
        if not skip_cluster:
            rows.append(_cluster_row(broker.bootstrap, ends, total, tmp))
            print(rows[-1], flush=True)
        if not skip_faust:
            rows.append(_faust_row(broker.bootstrap, total, tmp))
            print(rows[-1], flush=True)
        extra["loadavg_after"] = os.getloadavg()
    finally:
        broker.stop()
        shutil.rmtree(tmp / "broker", ignore_errors=True)  # hundreds of MB of topic data
    return report("flink windowed features vs faust", rows, json_path, extra)


def cli(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.flink", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=Path("bench/results/flink.json"))
    ap.add_argument("--events", type=int, default=200_000, help="impressions to replay (clicks come on top)")
    ap.add_argument("--parallelism", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--kind", default="noida")
    ap.add_argument("--skip-faust", action="store_true")
    ap.add_argument("--skip-cluster", action="store_true", help="no standalone-cluster row")
    a = ap.parse_args(argv)
    main(a.json, a.events, tuple(a.parallelism), a.kind, a.skip_faust, a.skip_cluster)


if __name__ == "__main__":
    cli()
