"""``ctr serve`` (mounted by :mod:`ctr.cli`), the same function ``python -m ctr.serving`` runs.

Light to import: the app (FastAPI, torch) is imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ctr.features.cli import OnlineOpt, RedisUrl, check_online
from ctr.infra.cli_options import Bootstrap, bootstrap_or_exit
from ctr.infra.topics import MODEL_UPDATES_TOPIC


def serve_command(
    bootstrap: Bootstrap = None,
    snapshot_dir: Annotated[
        Path, typer.Option(help="The learner's snapshot directory (start-up and re-sync).")
    ] = Path(".ctr/learner/snapshots"),
    feast_dir: Annotated[
        Path | None, typer.Option(envvar="CTR_FEAST_DIR", help="Feast store directory (default .ctr/feast).")
    ] = None,
    host: Annotated[str, typer.Option(help="Bind address (loopback unless told otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    updates: Annotated[
        bool, typer.Option("--updates/--no-updates", help="Apply live model-updates (else: the newest snapshot only).")
    ] = True,
    topic: Annotated[str, typer.Option(help="The model-updates topic.")] = MODEL_UPDATES_TOPIC,
    keep_versions: Annotated[int, typer.Option(help="Model versions kept for rollback.")] = 5,
    online: OnlineOpt = "sqlite",
    redis_url: RedisUrl = None,
    feature_cache: Annotated[
        bool, typer.Option(help="Cache request features (--no-feature-cache reads Feast per request: baseline).")
    ] = True,
    feast_process: Annotated[
        bool,
        typer.Option("--feast-process/--feast-in-process", help="Read Feast in a worker process (or in threads)."),
    ] = True,
    cache_ttl: Annotated[float, typer.Option(help="Feature cache freshness (s).")] = 5.0,
    cache_max_stale: Annotated[float, typer.Option(help="Serve a cached value this old at most (s).")] = 60.0,
    max_candidates: Annotated[int, typer.Option(help="Candidates per /predict at most.")] = 500,
    max_body_bytes: Annotated[int, typer.Option(help="Request body size limit.")] = 1 << 20,
    torch_threads: Annotated[int, typer.Option(help="torch intra-op threads.")] = 1,
    gil_switch_interval: Annotated[
        float, typer.Option(help="sys.setswitchinterval in seconds (0: leave CPython's 5 ms).")
    ] = 0.0005,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """HTTP /predict with live model refresh, rollback and Prometheus /metrics (admin token: CTR_ADMIN_TOKEN)."""
    from ctr.serving.app import run_server
    from ctr.serving.config import ServingConfig

    run_server(
        ServingConfig(
            bootstrap=bootstrap_or_exit(bootstrap) if updates else None, snapshot_dir=snapshot_dir,
            feast_dir=feast_dir, online=check_online(online), redis_url=redis_url, host=host, port=port,
            topic=topic, keep_versions=keep_versions, feature_cache=feature_cache, feast_process=feast_process,
            cache_ttl_s=cache_ttl, cache_max_stale_s=cache_max_stale, max_candidates=max_candidates,
            max_body_bytes=max_body_bytes, torch_threads=torch_threads, gil_switch_interval_s=gil_switch_interval,
            log_level=log_level,
        )
    )  # fmt: skip
