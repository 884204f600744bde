"""The stream stage's commands: ``ctr worker`` and ``ctr reweight`` (mounted by :mod:`ctr.cli`),
the same functions ``python -m ctr.streams.worker`` and ``python -m ctr.streams.reweighting`` run.

Light to import (the Faust app is imported when a command runs), so ``ctr --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ctr.features.cli import OnlineOpt, RedisUrl, check_online
from ctr.infra.cli_options import Bootstrap, MetricsPort, bootstrap_or_exit, one_of
from ctr.infra.config import CHANGELOG_MODES, EMISSIONS
from ctr.streams.worker_config import WorkerConfig

#: the worker's defaults live in WorkerConfig (one owner); the flags show them
_W = WorkerConfig(bootstrap="")


def worker_command(
    bootstrap: Bootstrap = None,
    feast_dir: Annotated[Path | None, typer.Option(help="Feast store directory (default: .ctr/feast).")] = None,
    app_id: Annotated[str, typer.Option(help="Faust app id (workers with one id share partitions).")] = _W.app_id,
    instance_id: Annotated[
        str | None,
        typer.Option(
            envvar="CTR_WORKER_ID",
            help="Stable consumer group.instance.id (static membership): a restarted worker takes over its "
            "old place at once instead of waiting for it to time out; each worker on a host needs its own "
            "(default <hostname>-1).",
        ),
    ] = None,
    window_ms: Annotated[int, typer.Option(help="Attribution window (event time).")] = _W.window_ms,
    lateness_ms: Annotated[int, typer.Option(help="Allowed out-of-orderness of each topic.")] = _W.allowed_lateness_ms,
    emission: Annotated[
        str,
        typer.Option(
            callback=one_of(EMISSIONS),
            help="provisional: every impression leaves at once (a provisional negative unless clicked), a "
            "later click sends a correction; click: positives at their click, negatives at window close; "
            "window: all at window close.",
        ),
    ] = _W.emission,
    negative_after_ms: Annotated[
        int, typer.Option(help="provisional: how long after its impression (event time) a first example leaves.")
    ] = _W.negative_after_ms,
    features: Annotated[bool, typer.Option(help="Run the windowed feature agent (writes Feast).")] = _W.features,
    online: OnlineOpt = None,
    redis_url: RedisUrl = None,
    metrics_port: MetricsPort = None,
    web_port: Annotated[int | None, typer.Option(help="Faust's web server on this port.")] = None,
    wait_for_store: Annotated[
        bool, typer.Option(help="Consume only once the Feast writer process is ready (import feast takes seconds).")
    ] = _W.wait_for_store,
    changelog: Annotated[
        str,
        typer.Option(
            callback=one_of(CHANGELOG_MODES),
            help="offsets: changelog records reference the impressions / delta batches they consumed "
            "(read back at restore); inline: they copy them.",
        ),
    ] = _W.changelog,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = _W.loglevel,
) -> None:
    """Run the Faust agents (label join, windowed features -> Feast) as one worker; SIGTERM stops it."""
    from ctr.streams.worker import default_instance_id, run_worker

    config = WorkerConfig(
        bootstrap=bootstrap_or_exit(bootstrap), feast_dir=feast_dir, app_id=app_id,
        instance_id=instance_id or default_instance_id(), window_ms=window_ms, allowed_lateness_ms=lateness_ms,
        emission=emission, negative_after_ms=negative_after_ms, features=features, online=check_online(online),
        redis_url=redis_url, metrics_port=metrics_port, web_port=web_port, wait_for_store=wait_for_store,
        changelog=changelog, loglevel=loglevel,
    )  # fmt: skip
    raise typer.Exit(run_worker(config))


def reweight_command(
    bootstrap: Bootstrap = None,
    feast_dir: Annotated[Path | None, typer.Option(help="Also write the weights to this Feast store.")] = None,
    window: Annotated[int, typer.Option(help="Labelled examples in the sliding window.")] = 50_000,
    publish_every: Annotated[int, typer.Option(help="Publish a version every N new examples.")] = 5_000,
    publish_interval_s: Annotated[
        float, typer.Option("--publish-interval-s", "--publish-interval", help="...or at least this often (s).")
    ] = 60.0,
    fields: Annotated[
        str | None, typer.Option(help="Comma-separated fields (default: every categorical and numeric field seen).")
    ] = None,
    group_id: Annotated[str, typer.Option(help="Consumer group.")] = "ctr-reweighting",
    max_values: Annotated[int, typer.Option(help="Distinct values tracked per field.")] = 4096,
    psi_bins: Annotated[int, typer.Option(help="Bins of the drift (PSI) histograms.")] = 20,
    floor: Annotated[float, typer.Option(help="Smallest weight a field can get (before renormalisation).")] = 0.1,
    smoothing: Annotated[float, typer.Option(help="EMA weight of a new computation (1 = none).")] = 0.5,
    significance: Annotated[float, typer.Option(help="Null standard deviations MI must clear.")] = 2.0,
    online: OnlineOpt = None,
    redis_url: RedisUrl = None,
    metrics_port: MetricsPort = None,
    max_examples: Annotated[int | None, typer.Option(help="Stop after this many examples.")] = None,
    idle_exit_s: Annotated[float | None, typer.Option(help="Stop after this long with nothing to read (s).")] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    """Dynamic feature reweighting: OutRank importance and PSI drift per field -> field-weights + Feast."""
    import json
    import logging

    from ctr.streams.reweighting import run_reweighter

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_reweighter(
        bootstrap_or_exit(bootstrap), feast_dir=feast_dir, window=window, publish_every=publish_every,
        publish_interval_s=publish_interval_s, fields=[f for f in fields.split(",") if f] if fields else None,
        group_id=group_id, max_values=max_values, psi_bins=psi_bins, floor=floor, smoothing=smoothing,
        significance=significance, online=check_online(online), redis_url=redis_url, metrics_port=metrics_port,
        max_examples=max_examples, idle_exit_s=idle_exit_s,
    )  # fmt: skip
    typer.echo(json.dumps(summary, default=str))
