"""Main-venv side of the Flink job: start it bounded as a subprocess with ``.venv-flink``'s
interpreter, tell it the true end offsets, read its output topic back. Used by the parity
test and ``bench/flink.py``; the job itself never imports this (it has no confluent-kafka).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from ctr.infra.broker import create_topics
from ctr.infra.kafka_io import PacedConsumer, consumer_config, make_consumer, offset_of
from ctr.infra.procs import die_with_parent, stop_process
from ctr.infra.topics import TopicSpec

REPO = Path(__file__).resolve().parents[2]
FLINK_VENV = REPO / ".venv-flink"
JOB = REPO / "streams" / "flink" / "job.py"


def flink_python() -> Path | None:
    """The Flink environment's interpreter (``make flink-setup``), or None if absent."""
    exe = Path(os.environ.get("CTR_FLINK_VENV", FLINK_VENV)) / "bin" / "python"
    return exe if exe.exists() else None


def end_offsets(bootstrap: str, topics: tuple[str, ...] = ("impressions", "clicks")) -> dict[str, dict[int, int]]:
    """High-water marks per topic and partition, asked of the broker (exact on noida; on Tansu
    count what you produced instead)."""
    c = make_consumer(bootstrap, "flink-end-offsets")
    try:
        out: dict[str, dict[int, int]] = {}
        for t in topics:
            parts = c.list_topics(t, timeout=10).topics[t].partitions
            out[t] = {p: c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1] for p in parts}
        return out
    finally:
        c.close()


def create_output_topic(bootstrap: str, topic: str, partitions: int = 4) -> None:
    create_topics(bootstrap, (TopicSpec(topic, partitions, "windowed features from the Flink job"),))


def _tree_cpu(proc: psutil.Process, seen: dict[int, float]) -> None:
    """Record the CPU seconds of ``proc`` and its descendants (the job's JVM) so far."""
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            t = p.cpu_times()
            seen[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass


def run_job(
    bootstrap: str,
    ends: dict[str, dict[int, int]],
    output_topic: str,
    *,
    parallelism: int = 1,
    group: str = "ctr-flink-test",
    log: Path | None = None,
    timeout_s: float = 300.0,
    extra_args: tuple[str, ...] = (),
) -> dict:
    """Run the job bounded at ``ends`` to completion. Returns its summary line (``seconds``:
    submission to end), ``wall_s`` (process start to exit, JVM start included) and ``cpu_s``
    (CPU seconds of the job's processes, sampled every 0.2 s: on a shared machine a fairer
    measure than wall time). Raises with the log tail on failure."""
    exe = flink_python()
    if exe is None:
        raise RuntimeError(f"no Flink environment at {FLINK_VENV}: run `make flink-setup`")
    args = [str(exe), str(JOB), "--bootstrap", bootstrap, "--parallelism", str(parallelism), "--group", group,
            "--output-topic", output_topic, "--end-offsets", json.dumps(ends), *extra_args]  # fmt: skip
    env = {**os.environ, "JVM_ARGS": os.environ.get("CTR_FLINK_JVM_ARGS", "-Xmx1g")}
    out = log or Path(tempfile.mkstemp(prefix="flink-job-", suffix=".log")[1])
    cpu: dict[int, float] = {}
    t0 = time.perf_counter()
    with open(out, "w") as f:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        ps = psutil.Process(proc.pid)
        try:
            while proc.poll() is None:
                _tree_cpu(ps, cpu)
                if time.perf_counter() - t0 > timeout_s:
                    raise TimeoutError(f"Flink job still running after {timeout_s}s (log {out})")
                time.sleep(0.2)
        finally:
            stop_process(proc, grace_s=10)
    wall = time.perf_counter() - t0
    text = out.read_text(errors="replace")
    summary = [json.loads(line) for line in text.splitlines() if line.startswith('{"flink_job"')]
    if proc.returncode != 0 or not summary:
        raise RuntimeError(f"Flink job failed (rc {proc.returncode}):\n{text[-4000:]}")
    return {**summary[-1], "wall_s": round(wall, 3), "cpu_s": round(sum(cpu.values()), 2)}


def read_messages(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list:
    """Every message on ``topic`` (confluent ``Message``), read up to the end offsets as of the call."""
    ends = end_offsets(bootstrap, (topic,))[topic]
    # Unpaced: it reads to known ends and stops. Paced, a loaded machine can let the pause
    # land before librdkafka has looked up OFFSET_BEGINNING (``PacedConsumer.settle_s``), and
    # those partitions never start fetching (seen: 3 of 4 partitions stuck at 0 for 300 s).
    c = PacedConsumer(consumer_config(bootstrap, "flink-read"), backoff_s=0)
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p, end in ends.items() if end > 0])
    pos = dict.fromkeys(ends, 0)
    out: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while any(pos[p] < ends[p] for p in ends):
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {len(out)} messages of {topic}; offsets {pos} < {ends}")
            for m in c.consume(5000, 0.2):
                if m.error() is None:
                    p = m.partition()
                    assert p is not None  # a consumed record has one
                    pos[p] = offset_of(m) + 1
                    out.append(m)
    finally:
        c.close()
    return out


def read_features(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[dict]:
    """The job's output rows (decoded JSON)."""
    return [json.loads(m.value()) for m in read_messages(bootstrap, topic, timeout_s)]
