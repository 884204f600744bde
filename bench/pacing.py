"""``python -m bench.pacing``: what an idle consumer costs, with and without fetch pacing.

noida-db answers an empty fetch at once instead of holding it for ``fetch.wait.max.ms``, so a
consumer with nothing to read re-fetches in a tight loop. For each broker and each client this
measures, on an empty 4-partition topic, the CPU seconds per second of the consuming process
and the fetch requests per second, paced (the project's default) and unpaced
(``CTR_FETCH_BACKOFF_MS=0``):

* ``confluent-kafka`` -- :class:`ctr.infra.kafka_io.PacedConsumer` (or ``backoff_s=0``) in a child
  process, ``consume(100, 0.1)`` in a loop; fetches counted by librdkafka's own statistics;
* ``aiokafka`` -- ``AIOKafkaConsumer.getmany`` in a loop with
  :func:`ctr.streams.app.install_fetch_backoff` (or 0); fetches counted at ``_proc_fetch_request``;
* ``faust worker`` -- ``python -m ctr.streams.worker --no-features`` with nothing to consume (CPU only).

Then the latency it costs: one message produced at a random moment, time until a paced
confluent consumer returns it (``--latency-probes``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import report
from ctr.infra.procs import die_with_parent, stop_process

REPO = Path(__file__).resolve().parents[1]
TOPIC = "impressions"


def _child(client: str, bootstrap: str, backoff_ms: float, seconds: float) -> dict:
    """Runs in a child process: consume an empty topic for ``seconds`` after a 2 s settle."""
    import resource

    os.environ["CTR_FETCH_BACKOFF_MS"] = str(backoff_ms)

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    if client == "confluent-kafka":
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        from ctr.infra.kafka_io import make_consumer

        fetches: list[int] = []

        def on_stats(s: str) -> None:
            fetches.append(sum(b["req"]["Fetch"] for b in json.loads(s)["brokers"].values()))

        c = make_consumer(bootstrap, "bench-pacing", **{"statistics.interval.ms": 500, "stats_cb": on_stats})
        c.assign([TopicPartition(TOPIC, q, OFFSET_BEGINNING) for q in range(4)])
        t_end = time.monotonic() + 2
        while time.monotonic() < t_end:
            c.consume(100, 0.1)
        f0, c0, t0 = (fetches[-1] if fetches else 0), cpu(), time.monotonic()
        while time.monotonic() < t0 + seconds:
            c.consume(100, 0.1)
        out = {"cpu": cpu() - c0, "fetches": (fetches[-1] if fetches else 0) - f0, "s": time.monotonic() - t0}
        c.close()
        return out
    if client == "aiokafka":
        import asyncio

        from aiokafka import AIOKafkaConsumer
        from aiokafka.consumer.fetcher import Fetcher
        from aiokafka.structs import TopicPartition

        from ctr.infra.security import kafka_security
        from ctr.streams.app import install_fetch_backoff

        install_fetch_backoff()
        calls = [0]
        paced = Fetcher._proc_fetch_request

        async def counting(self, *args, **kwargs):  # noqa: ANN001, ANN202
            calls[0] += 1
            return await paced(self, *args, **kwargs)

        Fetcher._proc_fetch_request = counting  # type: ignore[method-assign]

        async def run() -> dict:
            c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=1500,
                                 **kafka_security().aiokafka())
            await c.start()
            c.assign([TopicPartition(TOPIC, q) for q in range(4)])
            await c.seek_to_beginning()
            t_end = time.monotonic() + 2
            while time.monotonic() < t_end:
                await c.getmany(timeout_ms=100)
            n0, c0, t0 = calls[0], cpu(), time.monotonic()
            while time.monotonic() < t0 + seconds:
                await c.getmany(timeout_ms=100)
            out = {"cpu": cpu() - c0, "fetches": calls[0] - n0, "s": time.monotonic() - t0}
            await c.stop()
            return out

        return asyncio.run(run())
    raise ValueError(client)


def _client_row(client: str, kind: str, bootstrap: str, backoff_ms: float, seconds: float) -> dict:
    code = (
        "import json, sys; from bench.pacing import _child; "
        f"print(json.dumps(_child({client!r}, {bootstrap!r}, {backoff_ms!r}, {seconds!r})))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=die_with_parent
    )
    if res.returncode != 0:
        return {"broker": kind, "client": client, "paced": backoff_ms > 0, "error": res.stderr.strip()[-300:]}
    r = json.loads(res.stdout.strip().splitlines()[-1])
    return {"broker": kind, "client": client, "paced": backoff_ms > 0, "backoff_ms": backoff_ms,
            "cpu_per_s": round(r["cpu"] / r["s"], 3), "fetches_per_s": round(r["fetches"] / r["s"])}  # fmt: skip


def _worker_row(kind: str, bootstrap: str, backoff_ms: float, seconds: float, tmp: Path) -> dict:
    import psutil

    env = {**os.environ, "CTR_FETCH_BACKOFF_MS": str(backoff_ms)}
    args = [sys.executable, "-m", "ctr.streams.worker", "--bootstrap", bootstrap, "--no-features",
            "--app-id", f"pacing-{int(backoff_ms)}", "--instance-id", f"pacing-{int(backoff_ms)}"]  # fmt: skip
    with open(tmp / f"worker-{kind}-{backoff_ms:g}.log", "w") as log:
        proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
    try:
        time.sleep(25)  # start, join the group (tansu: the session timeout), settle
        ps = psutil.Process(proc.pid)
        c0, t0 = sum(ps.cpu_times()[:2]), time.monotonic()
        time.sleep(seconds)
        cpu = (sum(ps.cpu_times()[:2]) - c0) / (time.monotonic() - t0)
    finally:
        stop_process(proc, grace_s=15)
    return {"broker": kind, "client": "faust worker (label join)", "paced": backoff_ms > 0,
            "backoff_ms": backoff_ms, "cpu_per_s": round(cpu, 3), "exit_code": proc.returncode}  # fmt: skip


def _latency(bootstrap: str, probes: int) -> dict:
    """Produce one message at a random moment; time until a paced consumer returns it."""
    from confluent_kafka import OFFSET_END, TopicPartition

    from ctr.infra.kafka_io import make_consumer, make_producer

    c = make_consumer(bootstrap, "bench-pacing-latency")
    c.assign([TopicPartition(TOPIC, q, OFFSET_END) for q in range(4)])
    t_end = time.monotonic() + 2
    while time.monotonic() < t_end:
        c.consume(100, 0.1)
    p = make_producer(bootstrap, **{"linger.ms": 0})
    lat = []
    for i in range(probes):
        time.sleep(random.random() * 0.05)
        t0 = time.monotonic()
        p.produce(TOPIC, b"probe", partition=i % 4)
        p.flush(5)
        while not c.consume(10, 0.1):
            pass
        lat.append((time.monotonic() - t0) * 1000)
    c.close()
    lat.sort()
    return {"broker": "noida", "client": "confluent-kafka, produce -> consumed", "paced": True,
            "latency_p50_ms": round(lat[len(lat) // 2], 2), "latency_max_ms": round(lat[-1], 2)}  # fmt: skip


def main(json_path: Path, seconds: float, kinds: list[str], latency_probes: int, worker: bool) -> dict:
    from ctr.infra.broker import EmbeddedBroker

    tmp = Path(tempfile.mkdtemp(prefix="bench-pacing-"))
    rows: list[dict] = []
    for kind in kinds:
        with EmbeddedBroker(kind=kind, data_dir=tmp / kind) as broker:
            for client in ("confluent-kafka", "aiokafka"):
                for backoff in (0.0, 10.0):
                    rows.append(_client_row(client, kind, broker.bootstrap, backoff, seconds))
                    print(rows[-1], flush=True)
            if worker:
                for backoff in (0.0, 10.0):
                    rows.append(_worker_row(kind, broker.bootstrap, backoff, seconds, tmp))
                    print(rows[-1], flush=True)
            if kind == "noida" and latency_probes:
                rows.append(_latency(broker.bootstrap, latency_probes))
    return report("idle consumers: fetch pacing", rows, json_path, {"seconds": seconds, "logs": str(tmp)})


def cli(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.pacing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=Path("bench/results/pacing.json"))
    ap.add_argument("--seconds", type=float, default=5.0, help="measured idle seconds per row")
    ap.add_argument("--kind", action="append", choices=("noida", "tansu"), help="broker(s); default both")
    ap.add_argument("--latency-probes", type=int, default=50)
    ap.add_argument("--no-worker", action="store_true", help="skip the Faust worker rows (~1 min each)")
    a = ap.parse_args(argv)
    main(a.json, a.seconds, a.kind or ["noida", "tansu"], a.latency_probes, not a.no_worker)


if __name__ == "__main__":
    cli()
