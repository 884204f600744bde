"""Command-line pieces every stage's typer command shares: the bootstrap option and how it is
resolved, a choice check, and failing with a usage error (exit 2).

Each stage owns its command (``ctr.streams.cli.worker_command``, ...); ``ctr.cli`` mounts
them, and each ``python -m`` entry runs the same function (:func:`run_command`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

Bootstrap = Annotated[
    str | None,
    typer.Option(
        "--bootstrap",
        envvar="CTR_BOOTSTRAP",
        help="Kafka bootstrap HOST:PORT (external Apache Kafka, or the embedded broker; "
        "default: the broker started by `ctr broker start`).",
    ),
]
MetricsPort = Annotated[
    int | None, typer.Option(help="Prometheus /metrics on 127.0.0.1:PORT ($CTR_BIND).")
]


def fail(msg: str) -> None:
    """Print ``msg`` in red on stderr and exit 2 (a usage error)."""
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def bootstrap_or_exit(explicit: str | None) -> str:
    """``explicit``, else ``$CTR_BOOTSTRAP``, else the broker ``ctr broker start`` recorded."""
    from ctr.infra.config import resolve_bootstrap

    try:
        return resolve_bootstrap(explicit)
    except RuntimeError as err:
        fail(str(err))
        raise


def one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    """An option callback that refuses anything but ``choices`` (a usage error, exit 2)."""

    def check(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return check


def run_command(command: Callable[..., Any], prog: str, argv: Sequence[str] | None = None) -> None:
    """Run one typer command function as a program (a stage's ``python -m`` entry)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    app(args=list(argv) if argv is not None else None, prog_name=prog)
