"""``ctr worker``: run the CTR Faust agents as one worker process.

Several workers may run with the same ``app_id``: Faust's group protocol splits the four
partitions between them (partition *p* of impressions, clicks, the feature-delta topic and
both table changelogs always land on the same worker). Stop a worker with SIGTERM; if it has
not exited after a grace period, SIGKILL it -- nothing is lost either way (see
:mod:`ctr.streams.agents.label_join` for the delivery guarantees).

    python -m ctr.streams.worker --bootstrap 127.0.0.1:9092 --feast-dir .ctr/feast
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from ctr.infra.cli_options import run_command
from ctr.infra.topics import CLICKS_TOPIC, IMPRESSIONS_TOPIC, TOPICS, TopicSpec
from ctr.streams.app import CHANGELOG_TOPIC_CONFIGS, PARTITIONS, CtrApp, OutputProducer, create_app
from ctr.streams.worker_config import WorkerConfig

if TYPE_CHECKING:
    from ctr.streams.agents.windowed_features import FeatureSink

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


def build(config: WorkerConfig, *, feast_interval_s: float = 0.1, sink: FeatureSink | None = None) -> CtrApp:
    """Create the app with its topics, tables and agents (the worker is not started)."""
    from ctr.features.spec import SPEC
    from ctr.streams.agents.label_join_agent import LabelJoinAgent
    from ctr.streams.agents.windowed_features import ProcessFeastSink, WindowedFeatureAgent

    cfg = config
    bootstrap = cfg.bootstrap.split("://", 1)[-1]
    app_id, features, changelog = cfg.app_id, cfg.features, cfg.changelog
    app = create_app(bootstrap, app_id=app_id, web_port=cfg.web_port, instance_id=cfg.instance_id)
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
        cfg.join_config(),
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
            feast_dir = str(cfg.feast_dir) if cfg.feast_dir else None
            sink = ProcessFeastSink(feast_dir, online=cfg.online, redis_url=cfg.redis_url)
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


def run_worker(config: WorkerConfig) -> int:
    """Run one worker in the foreground until SIGTERM/SIGINT; returns its exit code."""
    import faust

    cfg = config
    bootstrap, loglevel = cfg.bootstrap.split("://", 1)[-1], cfg.loglevel
    logging.basicConfig(
        level=getattr(logging, loglevel.upper(), logging.INFO),
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
    )
    if loglevel.lower() in ("info", "debug") and not os.environ.get("CTR_FAUST_DEBUG"):
        for noisy in ("faust", "mode", "aiokafka"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in filter(None, os.environ.get("CTR_DEBUG_LOGGERS", "").split(",")):
        logging.getLogger(name).setLevel(logging.DEBUG)
    ensure_topics(bootstrap, cfg.app_id)
    app = build(cfg)
    if cfg.wait_for_store and cfg.features:
        # ProcessFeastSink opens the store in its helper process; an in-process sink has no wait
        ready = getattr(app.ctr_features.writer.sink, "ready", None)  # type: ignore[attr-defined]
        if ready is not None:
            log.info("waiting for the Feast writer process before consuming")
            ready.result(timeout=600)
    if cfg.metrics_port:
        from prometheus_client import start_http_server

        # CTR_BIND=0.0.0.0 in a container, so Prometheus can scrape it (like the learner, reweighter)
        start_http_server(cfg.metrics_port, addr=os.environ.get("CTR_BIND", "127.0.0.1"))
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
        if profiler is not None and profile_path:
            profiler.disable()
            profiler.dump_stats(profile_path)
    return 0


def main(argv: list[str] | None = None) -> None:
    from ctr.streams.cli import worker_command

    run_command(worker_command, "python -m ctr.streams.worker", argv)


if __name__ == "__main__":
    # run as ``python -m``: this file is ``__main__``; the command imports it by its name, which
    # would load it a second time (and register its metrics twice) -- let that name be this one
    sys.modules.setdefault("ctr.streams.worker", sys.modules[__name__])
    main()
