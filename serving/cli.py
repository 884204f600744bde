"""``ctr serve`` (mounted by :mod:`ctr.cli`), the same function ``python -m ctr.serving`` runs.

Light to import: the app (FastAPI, torch) is imported when the command runs; the flags' defaults
are :class:`~ctr.serving.config.ServingConfig`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ctr.features.cli import OnlineOpt, RedisUrl, check_online
from ctr.infra.cli_options import Bootstrap, bootstrap_or_exit
from ctr.serving.config import ServingConfig

#: the defaults live in ServingConfig (one owner); the flags show them
_D = ServingConfig()


def serve_command(
    bootstrap: Bootstrap = None,
    snapshot_dir: Annotated[
        Path, typer.Option(help="The learner's snapshot directory (start-up and re-sync).")
    ] = Path(".ctr/learner/snapshots"),
    feast_dir: Annotated[
        Path | None, typer.Option(envvar="CTR_FEAST_DIR", help="Feast store directory (default .ctr/feast).")
    ] = None,
    host: Annotated[str, typer.Option(help="Bind address (loopback unless told otherwise).")] = _D.host,
    port: Annotated[int, typer.Option(help="HTTP port.")] = _D.port,
    updates: Annotated[
        bool, typer.Option("--updates/--no-updates", help="Apply live model-updates (else: the newest snapshot only).")
    ] = True,
    topic: Annotated[str, typer.Option(help="The model-updates topic.")] = _D.topic,
    keep_versions: Annotated[int, typer.Option(help="Model versions kept for rollback.")] = _D.keep_versions,
    online: OnlineOpt = None,
    redis_url: RedisUrl = None,
    feature_cache: Annotated[
        bool, typer.Option(help="Cache request features (--no-feature-cache reads Feast per request: baseline).")
    ] = _D.feature_cache,
    feast_process: Annotated[
        bool,
        typer.Option("--feast-process/--feast-in-process", help="Read Feast in a worker process (or in threads)."),
    ] = _D.feast_process,
    cache_ttl: Annotated[float, typer.Option(help="Feature cache freshness (s).")] = _D.cache_ttl_s,
    cache_max_stale: Annotated[
        float, typer.Option(help="Serve a cached value this old at most (s).")
    ] = _D.cache_max_stale_s,
    max_candidates: Annotated[int, typer.Option(help="Candidates per /predict at most.")] = _D.max_candidates,
    max_body_bytes: Annotated[int, typer.Option(help="Request body size limit.")] = _D.max_body_bytes,
    torch_threads: Annotated[int, typer.Option(help="torch intra-op threads.")] = _D.torch_threads,
    gil_switch_interval: Annotated[
        float, typer.Option(help="sys.setswitchinterval in seconds (0: leave CPython's 5 ms).")
    ] = _D.gil_switch_interval_s,
    verify_key: Annotated[
        list[Path] | None,
        typer.Option(help="Ed25519 public key (PEM) model updates must be signed with; repeatable (a key "
                     "rotation); default: the comma-separated files of $CTR_VERIFY_KEYS, else unsigned accepted."),
    ] = None,
    gc_threshold: Annotated[
        int, typer.Option(help="Allocations between young garbage collections (0: CPython's 700).")
    ] = _D.gc_threshold,
    batch_wait: Annotated[
        float, typer.Option(help="Dynamic batching: ms the first queued request waits for others (0: none).")
    ] = _D.batch_wait_ms,
    workers: Annotated[
        int, typer.Option(min=1, help="HTTP worker processes sharing one copy of each model version in shared "
                          "memory; this process then applies the updates (1: serve in this process).")
    ] = _D.workers,
    log_level: Annotated[str, typer.Option(help="Log level.")] = _D.log_level,
) -> None:
    """HTTP /predict with live model refresh, rollback and Prometheus /metrics (admin token: CTR_ADMIN_TOKEN)."""
    from ctr.serving.app import run_server

    run_server(
        ServingConfig(
            bootstrap=bootstrap_or_exit(bootstrap) if updates else None, snapshot_dir=snapshot_dir,
            feast_dir=feast_dir, online=check_online(online), redis_url=redis_url, host=host, port=port,
            topic=topic, keep_versions=keep_versions, feature_cache=feature_cache, feast_process=feast_process,
            cache_ttl_s=cache_ttl, cache_max_stale_s=cache_max_stale, max_candidates=max_candidates,
            max_body_bytes=max_body_bytes, torch_threads=torch_threads, gil_switch_interval_s=gil_switch_interval,
            gc_threshold=gc_threshold, batch_wait_ms=batch_wait, verify_keys=tuple(verify_key or ()),
            workers=workers, log_level=log_level,
        )
    )  # fmt: skip
