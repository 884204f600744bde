"""``ctr features ...``: apply the Feast repository, read fresh values, run ``feast serve``.

Mounted by ``ctr/cli.py`` as ``app.add_typer(features_app, name="features")``. Imports are
lazy: ``import feast`` takes seconds, so only the commands that need it pay for it.

    ctr features apply --dir runs/r1/feast
    ctr features get --user u1 --item ad7 --field-value C1=1005
    ctr features get --field-weights --field C1 --field C2
    ctr features serve --port 6566
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from ctr.features.store import Online

features_app = typer.Typer(
    help="The Feast feature store: windowed stats per user/item/field value, and field weights.",
    no_args_is_help=True,
)

Dir = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        envvar="CTR_FEAST_DIR",
        help="Where the config, registry and SQLite db live (default: .ctr/feast).",
    ),
]
OnlineOpt = Annotated[
    str | None,
    typer.Option(
        "--online",
        envvar="CTR_ONLINE_STORE",
        help="Online store: sqlite (embedded) or redis (default: the one the store directory was set up with; "
        "sqlite for a new one).",
    ),
]
RedisUrl = Annotated[
    str | None,
    typer.Option(
        "--redis-url",
        envvar="REDIS_CONNECTION_STRING",
        help="Redis host:port[,db=0] for --online redis (default localhost:6379).",
    ),
]


def check_online(online: str | None) -> Online | None:
    """``online`` as the store's type (None: the directory's), or a usage error (exit 2)."""
    if online is None:
        return None
    if online == "sqlite":
        return "sqlite"
    if online == "redis":
        return "redis"
    typer.secho(f"--online must be sqlite or redis, not {online!r}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@features_app.command("apply")
def apply(
    dir: Dir = None,
    online: OnlineOpt = None,
    redis_url: RedisUrl = None,
    force: Annotated[bool, typer.Option("--force", help="Apply even when this version already is.")] = False,
) -> None:
    """Register the feature views generated from features/spec.py in --dir (idempotent).

    Writes feature_store.yaml into --dir and applies entities, feature views and push sources;
    a no-op when this exact version is already applied.
    """
    from ctr.features.store import STATS_VIEWS, ensure_applied, push_source_name, view_features

    path = ensure_applied(dir, check_online(online), redis_url, force=force)
    typer.echo(f"feast repository applied in {path} (online store: {online})")
    for view in [*STATS_VIEWS.values(), "field_weights"]:
        typer.echo(f"  {view:<18} push source {push_source_name(view):<24} {', '.join(view_features(view))}")


@features_app.command("get")
def get(
    user: Annotated[list[str] | None, typer.Option("--user", help="A user id (repeatable).")] = None,
    item: Annotated[list[str] | None, typer.Option("--item", help="An item / ad id (repeatable).")] = None,
    field_value: Annotated[
        list[str] | None,
        typer.Option("--field-value", help='A "field=value" key, e.g. C1=1005 (repeatable).'),
    ] = None,
    field_weights: Annotated[
        bool,
        typer.Option("--field-weights", help="Print the field weights (weight, importance, psi, version)."),
    ] = False,
    field: Annotated[
        list[str] | None,
        typer.Option("--field", help="A field for --field-weights (repeatable; default: spec stat fields)."),
    ] = None,
    dir: Dir = None,
    online: OnlineOpt = None,
    redis_url: RedisUrl = None,
) -> None:
    """Print fresh online values as JSON, e.g. --user u1 --item ad7, or --field-weights.

    Missing entities get the prior: CTR SPEC.smoothed_ctr(0, 0), counts 0, weight 1.0.
    """
    if not (user or item or field_value or field_weights):
        typer.secho("nothing to get: pass --user/--item/--field-value and/or --field-weights", err=True)
        raise typer.Exit(2)
    from ctr.features.store import OnlineFeatures, configured_store, open_store

    store = open_store(dir, check_online(online), redis_url)
    reader = OnlineFeatures(store)
    kind, url = configured_store(store.repo_path) or ("sqlite", None)
    # which store was read: a directory set up for Redis is read from Redis unless told otherwise
    out: dict = {"online_store": f"redis at {url}" if kind == "redis" else f"sqlite in {store.repo_path}"}
    if user or item or field_value:
        out.update(reader.get_entity_stats(users=user or (), items=item or (), field_values=field_value or ()))
    if field_weights:
        out["field_weights"] = reader.get_field_weight_records(field or None)
    typer.echo(json.dumps(out, indent=2))


@features_app.command("serve")
def serve(
    port: Annotated[int | None, typer.Option(help="Port (default: a free one).")] = None,
    host: Annotated[str, typer.Option(help="Interface; keep loopback unless you mean it.")] = "127.0.0.1",
    workers: Annotated[int, typer.Option(help="Gunicorn worker processes.")] = 1,
    dir: Dir = None,
    online: OnlineOpt = None,
    redis_url: RedisUrl = None,
) -> None:
    """Run `feast serve` (HTTP, loopback) for --dir in the foreground until Ctrl-C.

    Runs with --max-requests 0 (Feast's default recycles workers and stalls).
    POST /get-online-features returns the fresh values:

        curl -s -X POST http://127.0.0.1:PORT/get-online-features -H 'Content-Type: application/json'
          -d '{"features": ["item_stats:item_ctr_5m"], "entities": {"item_id": ["ad7"]}}'
    """
    from ctr.features.store import ensure_applied, serve_command, wait_healthy
    from ctr.infra.procs import die_with_parent, free_port, stop_process

    path = ensure_applied(dir, check_online(online), redis_url)
    port = port or free_port(host)
    proc = subprocess.Popen(serve_command(path, port, host, workers), preexec_fn=die_with_parent)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        try:
            wait_healthy(f"http://{host}:{port}", proc)
        except (RuntimeError, TimeoutError) as err:
            typer.secho(str(err), fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        typer.echo(f"feast serve for {path} at http://{host}:{port} (pid {proc.pid}); Ctrl-C stops it")
        code = proc.wait()
        raise typer.Exit(code)
    except KeyboardInterrupt:
        pass
    finally:
        stop_process(proc)
