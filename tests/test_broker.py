"""The embedded broker launcher: topics, clean stops, no orphans, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from confluent_kafka.admin import AdminClient

from ctr.infra.broker import EmbeddedBroker, create_topics
from ctr.infra.procs import pid_alive, port_open
from ctr.infra.topics import TOPICS


def test_topics_created_with_partition_counts(any_broker: EmbeddedBroker) -> None:
    meta = AdminClient({"bootstrap.servers": any_broker.bootstrap}).list_topics(timeout=10).topics
    for spec in TOPICS:
        assert len(meta[spec.name].partitions) == spec.partitions, spec.name
    create_topics(any_broker.bootstrap)  # idempotent


def test_stop_frees_port_and_process(any_broker: EmbeddedBroker) -> None:
    pid, port = any_broker.proc.pid, any_broker.port
    any_broker.stop()
    assert not pid_alive(pid)
    assert not port_open("127.0.0.1", port)


def test_broker_dies_with_killed_parent(tmp_path) -> None:
    """kill -9 of the launcher must not orphan the broker (PR_SET_PDEATHSIG)."""
    script = (
        "import sys, time\n"
        "from ctr.infra.broker import EmbeddedBroker\n"
        f"b = EmbeddedBroker(kind='noida', data_dir={str(tmp_path)!r}).start()\n"
        "print(b.proc.pid, b.port, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child_pid, port = map(int, parent.stdout.readline().split())
    assert pid_alive(child_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while pid_alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child_pid), "broker outlived its killed parent"


def test_unknown_kind_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown broker kind"):
        EmbeddedBroker(kind="zookeeper").start()


def _ctr(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ctr.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_start_status_stop(tmp_path) -> None:
    env = {**os.environ, "CTR_STATE_DIR": str(tmp_path / "state")}
    env.pop("CTR_BOOTSTRAP", None)
    started = _ctr("broker", "start", "--kind", "tansu", env=env)
    assert started.returncode == 0, started.stderr
    info = json.loads((tmp_path / "state" / "broker.json").read_text())
    try:
        assert pid_alive(info["pid"])
        again = _ctr("broker", "start", env=env)
        assert again.returncode == 2 and "already running" in again.stderr
        status = _ctr("broker", "status", env=env)
        assert status.returncode == 0, status.stderr
        assert "impressions" in status.stdout and "partitions=4" in status.stdout
    finally:
        stopped = _ctr("broker", "stop", env=env)
    assert stopped.returncode == 0
    assert not pid_alive(info["pid"])
    assert not (tmp_path / "state" / "broker.json").exists()


def test_cli_without_broker_says_what_to_do(tmp_path) -> None:
    env = {**os.environ, "CTR_STATE_DIR": str(tmp_path / "state")}
    env.pop("CTR_BOOTSTRAP", None)
    out = _ctr("broker", "status", env=env)
    assert out.returncode == 2 and "ctr broker start" in out.stderr


def _all_commands() -> list[list[str]]:
    """Every command path of the ``ctr`` app, discovered from the app itself."""
    import typer

    from ctr.cli import app

    def walk(cmd, path: list[str]) -> list[list[str]]:
        out = [path]
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
            for name, sub in cmd.commands.items():
                out += walk(sub, [*path, name])
        return out

    return walk(typer.main.get_command(app), [])


@pytest.mark.parametrize("cmd", _all_commands(), ids=lambda c: " ".join(c) or "ctr")
def test_every_command_has_help(cmd: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ctr.cli", *cmd, "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "usage" in out.stdout.lower(), out.stderr  # typer: Usage; argparse: usage
