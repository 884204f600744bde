"""PyFlink job: windowed user / item / field-value counts and smoothed CTR, from Kafka to Kafka.

Runs on the embedded mini-cluster (``python streams/flink/job.py --bootstrap HOST:PORT``)
and on a cluster (``flink run -py streams/flink/job.py --bootstrap kafka:9092``). All the
work is Flink SQL (:mod:`ctr.streams.flink.sql`, generated from ``features/spec.py``); Python only
assembles it -- Python UDFs or DataStream windows would run in Python per row (platform notes).

Imports only the stdlib, pyflink and stdlib-only project modules (the spec, the security
config: ``$CTR_KAFKA_*`` reach the connector): this runs in ``.venv-flink``,
which cannot also hold Feast. Output rows (JSON, key = entity id) on ``--output-topic``::

    {"entity_type": "item", "entity_id": "ad7", "window": "5m", "window_end_ms": 1700000100000,
     "impressions": 42, "clicks": 3, "ctr": 0.0645...}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):
    # Run as a script (``python job.py``, ``flink run -py``) by Flink's own Python, where the
    # project is not installed: map the checkout's folders under ``ctr`` as the wheel does
    # (features/ -> ctr.features, streams/ -> ctr.streams). Both modules used here are pure.
    import types

    _ctr = types.ModuleType("ctr")
    _ctr.__path__ = [str(Path(__file__).resolve().parents[2])]
    sys.modules.setdefault("ctr", _ctr)

if TYPE_CHECKING:
    from pyflink.table import TableEnvironment

from ctr.features.spec import SPEC, FeatureSpec  # noqa: E402
from ctr.infra.security import kafka_security, redact  # noqa: E402
from ctr.streams.flink.sql import DEFAULT_ATTRIBUTION_MS, DEFAULT_OUTPUT_TOPIC, JobConfig, statements  # noqa: E402


def default_jars() -> list[Path]:
    """Connector jars: ``$CTR_FLINK_JARS`` (a directory) or ``<this venv>/jars``. Empty when
    neither exists -- then the cluster must have them in its ``lib/`` (the Docker image)."""
    where = os.environ.get("CTR_FLINK_JARS")
    d = Path(where) if where else Path(sys.prefix) / "jars"
    return sorted(d.glob("*.jar")) if d.is_dir() else []


def parse_offsets(text: str) -> dict[str, dict[int, int]]:
    """``'{"impressions": {"0": 12, ...}, "clicks": {...}}'`` (JSON) or ``@file.json``.

    >>> parse_offsets('{"clicks": {"0": 5, "1": 0}}')
    {'clicks': {0: 5, 1: 0}}
    """
    raw = json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)
    return {topic: {int(p): int(o) for p, o in parts.items()} for topic, parts in raw.items()}


def build_env(
    parallelism: int, jars: list[Path], bounded: bool, idle_timeout_ms: int, checkpoint_ms: int = 10_000
) -> TableEnvironment:
    # The mini-cluster lives in the py4j gateway JVM, whose heap is otherwise uncapped (3.9 GB
    # at parallelism 2 was measured here); JVM_ARGS is read when the gateway starts.
    os.environ.setdefault("JVM_ARGS", "-Xmx1g")
    from pyflink.table import EnvironmentSettings, TableEnvironment

    settings = EnvironmentSettings.in_streaming_mode()
    env = TableEnvironment.create(settings)
    conf = env.get_config()
    opts = {
        "parallelism.default": str(parallelism),
        # HOP windows on TIMESTAMP_LTZ align to the session time zone: UTC keeps them on the
        # same epoch multiples as the Faust agent's buckets.
        "table.local-time-zone": "UTC",
        "pipeline.name": "ctr-windowed-features",
        # SQL operators copy what they keep; skipping the defensive copy between chained
        # operators is safe for a SQL-only job (no user functions holding on to rows).
        "pipeline.object-reuse": "true",
    }
    if "PYFLINK_GATEWAY_PORT" not in os.environ:
        # `python job.py`: an embedded mini-cluster in our own gateway JVM (under `flink run`
        # the CLI provides the gateway and the cluster owns these settings).
        opts |= {
            # Python workers would otherwise start whatever `python` is on PATH (no pyflink).
            "python.executable": sys.executable,
            # The mini-cluster's REST endpoint binds every interface on 8081 by default.
            "rest.bind-address": "127.0.0.1",
            "rest.address": "127.0.0.1",
            "rest.bind-port": "0",
        }
    if jars:
        opts["pipeline.jars"] = ";".join(p.resolve().as_uri() for p in jars)
    if not bounded:
        # Offsets are committed and the at-least-once sink flushed on checkpoints. Rows are
        # whole-window values keyed by entity, so a replayed row overwrites with the same value.
        opts["execution.checkpointing.interval"] = f"{checkpoint_ms} ms"
        # A partition without traffic holds the watermark (and every window) back until a
        # watermark control message arrives there (sql._source_table reads them), as in the
        # Faust join. An idle timeout is an opt-in fallback for producers that send none: an
        # idle source stops holding the watermark back at all, so a burst that then reaches a
        # long-idle click partition is behind the impressions' watermark and its clicks are
        # dropped as late (seen on the mini-cluster) -- hence off by default.
        if idle_timeout_ms > 0:
            opts["table.exec.source.idle-timeout"] = f"{idle_timeout_ms} ms"
        # Only the first-click deduplication keeps state per key without a watermark to clean
        # it (interval join and windows are cleaned by event time); a click can only be
        # attributed within the attribution window, so an hour of (processing-time) TTL is
        # ample and bounds the state of a job that runs for months.
        opts["table.exec.state.ttl"] = "1 h"
    for k, v in opts.items():
        conf.set(k, v)
    return env


def run(
    spec: FeatureSpec,
    cfg: JobConfig,
    parallelism: int,
    *,
    wait: bool,
    idle_timeout_ms: int = 0,
    checkpoint_ms: int = 10_000,
) -> float:
    """Submit the job; with ``wait`` block until a bounded job finishes. Returns seconds from
    submission to the end (or to submission for an unbounded job)."""
    bounded = cfg.end_offsets is not None or cfg.bounded_latest
    env = build_env(parallelism, default_jars(), bounded, idle_timeout_ms, checkpoint_ms)
    stmts = statements(spec, cfg)
    for ddl in stmts:
        if not ddl.startswith("INSERT"):
            env.execute_sql(ddl)
    sset = env.create_statement_set()
    for ins in stmts:
        if ins.startswith("INSERT"):
            sset.add_insert_sql(ins)
    t0 = time.perf_counter()
    result = sset.execute()
    if wait:
        result.wait()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", default=os.environ.get("CTR_BOOTSTRAP", "localhost:9092"))
    ap.add_argument("--parallelism", type=int, default=1)
    ap.add_argument("--group", default="ctr-flink-features", help="Kafka consumer group id")
    ap.add_argument("--output-topic", default=DEFAULT_OUTPUT_TOPIC)
    ap.add_argument("--impressions-topic", default="impressions")
    ap.add_argument("--clicks-topic", default="clicks")
    ap.add_argument("--attribution-ms", type=int, default=DEFAULT_ATTRIBUTION_MS)
    ap.add_argument("--out-of-orderness-ms", type=int, default=5_000, help="watermark delay (see sql.JobConfig)")
    ap.add_argument("--idle-timeout-ms", type=int, default=0,
                    help="unbounded: stop waiting for a partition idle this long (0 = off: markers move it on)")
    ap.add_argument("--checkpoint-interval-ms", type=int, default=10_000, help="unbounded: checkpoint interval")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--bounded", action="store_true", help="stop at the end offsets the broker reports at start")
    mode.add_argument(
        "--end-offsets",
        type=parse_offsets,
        default=None,
        help='stop at these offsets: JSON {"impressions": {"0": N, ...}, "clicks": {...}} or @file',
    )
    ap.add_argument("--explain", action="store_true", help="print the generated SQL and exit")
    a = ap.parse_args(argv)
    cfg = JobConfig(
        bootstrap=a.bootstrap,
        group=a.group,
        impressions_topic=a.impressions_topic,
        clicks_topic=a.clicks_topic,
        output_topic=a.output_topic,
        attribution_ms=a.attribution_ms,
        out_of_orderness_ms=a.out_of_orderness_ms,
        end_offsets=a.end_offsets,
        bounded_latest=a.bounded,
        # $CTR_KAFKA_*: the connector's Java client gets the password in its JAAS line
        kafka_properties=(security := kafka_security()).flink_properties(),
    )
    if a.explain:  # the SQL quotes the JAAS line: its password is masked
        secret = [security.password.reveal()] if security.password is not None else []
        print(redact(";\n\n".join(statements(SPEC, cfg)) + ";", secret))
        return 0
    bounded = cfg.end_offsets is not None or cfg.bounded_latest
    # The embedded mini-cluster lives in this process: leaving would end the job. Under
    # `flink run` an unbounded job belongs to the cluster once submitted (works with -d too).
    wait = bounded or "PYFLINK_GATEWAY_PORT" not in os.environ
    seconds = run(SPEC, cfg, a.parallelism, wait=wait, idle_timeout_ms=a.idle_timeout_ms,
                  checkpoint_ms=a.checkpoint_interval_ms)
    # One machine-readable line for the bench and the tests.
    state = "done" if bounded else ("stopped" if wait else "submitted")
    print(json.dumps({"flink_job": state, "seconds": round(seconds, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
