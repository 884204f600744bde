"""``ctr worker``: run the CTR Faust agents as one worker process.

Several workers may run with the same ``app_id``: Faust's group protocol splits the four
partitions between them (partition *p* of impressions, clicks, the feature-delta topic and
both table changelogs always land on the same worker). Stop a worker with SIGTERM; if it has
not exited after a grace period, SIGKILL it -- nothing is lost either way (see
:mod:`ctr.streams.agents.label_join` for the delivery guarantees).

    python -m ctr.streams.worker --bootstrap 127.0.0.1:9092 --feast-dir .ctr/feast
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ctr.infra.config import CHANGELOG_MODES, EMISSIONS
from ctr.infra.topics import CLICKS_TOPIC, IMPRESSIONS_TOPIC, TOPICS, TopicSpec
from ctr.streams.agents.label_join import JoinConfig
from ctr.streams.app import CHANGELOG_TOPIC_CONFIGS, PARTITIONS, CtrApp, OutputProducer, create_app

log = logging.getLogger("ctr.streams.worker")


def default_instance_id() -> str:
    """``<hostname>-1``: a stable ``group.instance.id`` for the first worker on a host. Give
    every further worker on the same host its own ``--instance-id`` (two workers with one id
    fence each other). Static membership matters on noida-db: it never evicts a member that
    died without leaving, so a kill -9'd *dynamic* member blocks every later rebalance."""
    import socket

    return f"{socket.gethostname()}-1"


def deltas_topic_name(app_id: str) -> str:
    return f"{app_id}-feature-deltas"


def internal_topics(app_id: str) -> tuple[TopicSpec, ...]:
    """Topics this app writes that are not in :data:`ctr.infra.config.TOPICS`; pre-created with
    explicit partitions (a broker that auto-creates would make them 1-partition)."""
    return (TopicSpec(deltas_topic_name(app_id), PARTITIONS, "count deltas re-keyed by entity (internal)"),)


def ensure_topics(bootstrap: str, app_id: str) -> None:
    from ctr.infra.broker import create_topics

    create_topics(bootstrap.split("://", 1)[-1], TOPICS + internal_topics(app_id))


async def _subscribe_only(stream: Any, name: str) -> None:
    """Iterating the agent's stream registers its topic with Faust's conductor (subscription,
    assignment); the records themselves arrive through the bulk queue, so nothing comes here."""
    async for _ in stream:  # pragma: no cover - only if bulk delivery is bypassed
        log.warning("%s: a record reached the per-event stream; bulk delivery is not active", name)


def build(
    bootstrap: str,
    *,
    feast_dir: str | Path | None = None,
    app_id: str = "ctr-stream",
    window_ms: int = 30_000,
    allowed_lateness_ms: int = 0,
    emission: str = "provisional",
    negative_after_ms: int = 5_000,
    features: bool = True,
    online: str = "sqlite",
    redis_url: str | None = None,
    web_port: int | None = None,
    feast_interval_s: float = 0.1,
    sink: Any = None,
    instance_id: str | None = None,
    changelog: str = "offsets",
) -> CtrApp:
    """Create the app with its topics, tables and agents (the worker is not started)."""
    from ctr.features.spec import SPEC
    from ctr.streams.agents.label_join import LabelJoinAgent
    from ctr.streams.agents.windowed_features import ProcessFeastSink, WindowedFeatureAgent

    app = create_app(bootstrap, app_id=app_id, web_port=web_port, instance_id=instance_id)
    output = OutputProducer(bootstrap)
    deltas_name = deltas_topic_name(app_id)
    source = app.topic(IMPRESSIONS_TOPIC, CLICKS_TOPIC, key_serializer="raw", value_serializer="raw")
    deltas = app.topic(deltas_name, partitions=PARTITIONS, key_serializer="raw", value_serializer="raw")
    join_table = app.Table(
        "join-state",
        key_type=bytes,
        value_type=bytes,
        partitions=PARTITIONS,
        extra_topic_configs=CHANGELOG_TOPIC_CONFIGS,
    )
    join = LabelJoinAgent(
        app,
        join_table,
        output,
        deltas_name,
        JoinConfig(
            window_ms=window_ms, allowed_lateness_ms=allowed_lateness_ms, emission=emission,
            negative_after_ms=negative_after_ms, spec=SPEC, changelog_impressions=changelog,
        ),
        bootstrap=bootstrap,
    )  # fmt: skip
    app.ctr_join = join  # type: ignore[attr-defined]

    @app.agent(source, name="label-join")
    async def label_join(stream: Any) -> None:
        sub = asyncio.ensure_future(_subscribe_only(stream, "label-join"))
        try:
            await join.run()
        finally:
            sub.cancel()

    if features:
        feature_table = app.Table(
            "feature-state",
            key_type=bytes,
            value_type=bytes,
            partitions=PARTITIONS,
            extra_topic_configs=CHANGELOG_TOPIC_CONFIGS,
        )
        if sink is None:
            sink = ProcessFeastSink(str(feast_dir) if feast_dir else None, online=online, redis_url=redis_url)
        feat = WindowedFeatureAgent(
            app, feature_table, deltas_name, sink, output, SPEC, interval_s=feast_interval_s, changelog=changelog,
            bootstrap=bootstrap,
        )  # fmt: skip
        app.ctr_features = feat  # type: ignore[attr-defined]

        @app.agent(deltas, name="windowed-features")
        async def windowed_features(stream: Any) -> None:
            sub = asyncio.ensure_future(_subscribe_only(stream, "windowed-features"))
            try:
                await feat.run()
            finally:
                sub.cancel()

    @app.timer(interval=5.0)
    async def report() -> None:
        parts = [
            f"join events={join.events} waited={join.runner.waited_s:.2f} "
            + " ".join(f"{k}={v:.2f}" for k, v in join.timings.items())
        ]
        for p, jp in sorted(join.states.items()):
            parts.append(
                f"p{p}: wm={jp.wm} pending={len(jp.pending)} examples={jp.counters['examples']} "
                f"late={jp.counters['late_clicks']}"
                + (f" out_of_order={ooo}" if (ooo := jp.counters["out_of_order_clicks"]) else "")
            )
        if features:
            w = app.ctr_features.writer  # type: ignore[attr-defined]
            sink_state = getattr(w.sink, "state", "ready")
            parts.append(f"feast rows={w.rows_written} writes={w.writes} pending={w.pending} sink={sink_state}")
        log.info(" | ".join(parts))

    return app


def run_worker(
    bootstrap: str,
    *,
    feast_dir: str | Path | None = None,
    app_id: str = "ctr-stream",
    window_ms: int = 30_000,
    allowed_lateness_ms: int = 0,
    emission: str = "provisional",
    negative_after_ms: int = 5_000,
    features: bool = True,
    online: str = "sqlite",
    redis_url: str | None = None,
    metrics_port: int | None = None,
    web_port: int | None = None,
    loglevel: str = "info",
    instance_id: str | None = None,
    wait_for_store: bool = False,
    changelog: str = "offsets",
) -> int:
    """Run one worker in the foreground until SIGTERM/SIGINT; returns its exit code.

    ``bootstrap`` is ``HOST:PORT`` (or ``kafka://HOST:PORT``); ``feast_dir`` the Feast repo
    directory (``ctr.features.store.open_store``; default ``$CTR_FEAST_DIR`` or ``.ctr/feast``);
    ``metrics_port`` serves Prometheus metrics on 127.0.0.1 (``$CTR_BIND``); ``web_port`` enables Faust's web
    server. ``features=False`` runs the label join only. ``wait_for_store`` holds consumption
    until the Feast writer process has opened the store (``import feast`` is ~6 s of CPU): by
    default the join starts at once, so examples reach the learner while the writer starts.
    ``changelog``: ``offsets`` (the changelogs reference the records they consumed, the join's
    its impressions and the feature agent's its delta batches; a restore reads them back, so the
    impressions topic must keep its records for the attribution window and the deltas topic for
    the longest feature window plus its hop) or ``inline`` (copies them: ~660 changelog bytes
    per event instead of ~2, measured by ``ctr bench stream``).
    """
    import faust

    bootstrap = bootstrap.split("://", 1)[-1]
    logging.basicConfig(
        level=getattr(logging, loglevel.upper(), logging.INFO),
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
    )
    if loglevel.lower() in ("info", "debug") and not os.environ.get("CTR_FAUST_DEBUG"):
        for noisy in ("faust", "mode", "aiokafka"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in filter(None, os.environ.get("CTR_DEBUG_LOGGERS", "").split(",")):
        logging.getLogger(name).setLevel(logging.DEBUG)
    ensure_topics(bootstrap, app_id)
    app = build(
        bootstrap,
        feast_dir=feast_dir,
        app_id=app_id,
        window_ms=window_ms,
        allowed_lateness_ms=allowed_lateness_ms,
        emission=emission,
        negative_after_ms=negative_after_ms,
        features=features,
        online=online,
        redis_url=redis_url,
        web_port=web_port,
        instance_id=instance_id,
        changelog=changelog,
    )
    if wait_for_store and features:
        # ProcessFeastSink opens the store in its helper process; an in-process sink has no wait
        ready = getattr(app.ctr_features.writer.sink, "ready", None)  # type: ignore[attr-defined]
        if ready is not None:
            log.info("waiting for the Feast writer process before consuming")
            ready.result(timeout=600)
    if metrics_port:
        from prometheus_client import start_http_server

        # CTR_BIND=0.0.0.0 in a container, so Prometheus can scrape it (like the learner, reweighter)
        start_http_server(metrics_port, addr=os.environ.get("CTR_BIND", "127.0.0.1"))
    quiet_faust = loglevel.lower() in ("info", "debug") and not os.environ.get("CTR_FAUST_DEBUG")
    faust_level = "warn" if quiet_faust else loglevel
    worker = faust.Worker(app, loglevel=faust_level, quiet=True, override_logging=False)
    profile_path = os.environ.get("CTR_PROFILE")  # cProfile the worker; written at a clean stop
    profiler = None
    if profile_path:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctr.streams.worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", default=os.environ.get("CTR_BOOTSTRAP"), help="Kafka HOST:PORT")
    ap.add_argument("--feast-dir", default=os.environ.get("CTR_FEAST_DIR"), help="Feast repo dir")
    ap.add_argument("--app-id", default="ctr-stream")
    ap.add_argument("--window-ms", type=int, default=30_000, help="attribution window (event time)")
    ap.add_argument("--lateness-ms", type=int, default=0, help="allowed out-of-orderness of each topic")
    ap.add_argument("--emission", choices=EMISSIONS, default="provisional",
                    help="when examples leave the join (streams/agents/label_join.py)")
    ap.add_argument("--negative-after-ms", type=int, default=5_000,
                    help="provisional: how long after its impression a first example leaves")  # fmt: skip
    ap.add_argument("--online", choices=("sqlite", "redis"), default="sqlite")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--no-features", action="store_true", help="run the label join only")
    ap.add_argument("--wait-for-store", action="store_true", help="consume only once the Feast writer is ready")
    ap.add_argument("--changelog", choices=CHANGELOG_MODES, default="offsets",
                    help="changelog records reference the impressions / delta batches they consumed by "
                         "offset (read back at restore), or copy them")  # fmt: skip
    ap.add_argument("--metrics-port", type=int, default=None)
    ap.add_argument("--web-port", type=int, default=None)
    ap.add_argument("--loglevel", default="info")
    ap.add_argument(
        "--instance-id",
        default=os.environ.get("CTR_WORKER_ID") or default_instance_id(),
        help="stable consumer group.instance.id (static membership): a restarted worker "
        "takes over its old place at once instead of waiting for it to time out",
    )
    a = ap.parse_args(argv)
    if not a.bootstrap:
        ap.error("--bootstrap (or CTR_BOOTSTRAP) is required")
    return run_worker(
        a.bootstrap,
        feast_dir=a.feast_dir,
        app_id=a.app_id,
        window_ms=a.window_ms,
        allowed_lateness_ms=a.lateness_ms,
        emission=a.emission,
        negative_after_ms=a.negative_after_ms,
        features=not a.no_features,
        online=a.online,
        redis_url=a.redis_url,
        metrics_port=a.metrics_port,
        web_port=a.web_port,
        loglevel=a.loglevel,
        instance_id=a.instance_id,
        wait_for_store=a.wait_for_store,
        changelog=a.changelog,
    )


if __name__ == "__main__":
    sys.exit(main())
