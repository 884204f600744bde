"""The Feast repository and its SDK against a REAL store: SQLite in tmp, `feast serve` over HTTP.

One module-scoped store (``import feast`` and ``apply`` cost seconds, paid once); `feast serve`
boots in the background while the in-process tests run and is stopped in teardown with no
orphan left behind.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from ctr.features.spec import ENTITIES, SPEC, field_value_key
from ctr.features.store import (
    FIELD_WEIGHTS_VIEW,
    JOIN_KEYS,
    STATS_VIEWS,
    FeatureWriter,
    OnlineFeatures,
    _event_times_us,
    ensure_applied,
    event_time_feature,
    http_get_online_features,
    open_store,
    push_source_name,
    serve_command,
    view_features,
    wait_healthy,
    write_config,
)
from ctr.infra.procs import die_with_parent, free_port, pid_alive, stop_process

T0 = 1_700_000_000_000  # ms
PRIOR = SPEC.smoothed_ctr(0, 0)


# --------------------------------------------------------------------------- no feast needed
def test_layout_is_generated_from_the_spec() -> None:
    for entity in ENTITIES:
        assert view_features(STATS_VIEWS[entity]) == SPEC.feature_names(entity)
    assert view_features(FIELD_WEIGHTS_VIEW) == ["weight", "importance", "psi", "version"]
    assert JOIN_KEYS == {"user": "user_id", "item": "item_id", "field_value": "field_value", "field": "field"}
    assert event_time_feature("field_value_stats") == "field_value_event_time_us"
    assert push_source_name("item_stats") == "item_stats_push"


def test_config_is_written_with_absolute_paths(tmp_path: Path) -> None:
    d = write_config(tmp_path / "a")
    cfg = yaml.safe_load((d / "feature_store.yaml").read_text())
    assert cfg["project"] == "ctr" and cfg["provider"] == "local"
    assert cfg["registry"]["path"] == str(d / "registry.db")
    assert cfg["online_store"] == {"type": "sqlite", "path": str(d / "online.db")}
    assert cfg["offline_store"]["type"] == "file"
    mtime = (d / "feature_store.yaml").stat().st_mtime_ns
    write_config(tmp_path / "a")
    assert (d / "feature_store.yaml").stat().st_mtime_ns == mtime, "unchanged config must not be rewritten"

    r = write_config(tmp_path / "r", online="redis", redis_url="redis:6379,db=0")
    rcfg = yaml.safe_load((r / "feature_store.yaml").read_text())
    assert rcfg["online_store"] == {
        "type": "redis",
        "connection_string": "redis:6379,db=0",
        "skip_dedup": True,
    }
    with pytest.raises(ValueError):
        write_config(tmp_path / "x", online="postgres")  # type: ignore[arg-type]


def test_event_times_are_rounded_to_microseconds() -> None:
    assert _event_times_us(T0, 2) == [T0 * 1000] * 2
    assert _event_times_us([1.0004, 2.0006], 2) == [1000, 2001]
    with pytest.raises(ValueError):
        _event_times_us([1, 2], 3)


# --------------------------------------------------------------------------- a real store
@dataclass
class Env:
    path: Path
    store: object
    proc: subprocess.Popen
    url: str


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    path = ensure_applied(tmp_path_factory.mktemp("feast"))
    port = free_port()
    log = open(path / "serve.log", "w")  # noqa: SIM115 - closed in teardown
    # Boots (~10 s: it imports feast too) while the in-process tests run.
    proc = subprocess.Popen(serve_command(path, port), preexec_fn=die_with_parent, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield Env(path, open_store(path), proc, f"http://127.0.0.1:{port}")
    finally:
        family = [proc.pid]
        if proc.poll() is None:
            family += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        stop_process(proc)
        log.close()
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in family if pid_alive(p)], "feast serve left processes behind"


def _stats_row(entity: str, key: str, base: int) -> dict:
    row: dict = {JOIN_KEYS[entity]: key}
    for i, name in enumerate(SPEC.feature_names(entity)):
        row[name] = (base + i) / 1000 if name.split("_")[-2] == "ctr" else base + i
    return row


@pytest.mark.integration
def test_apply_registers_views_entities_and_push_sources(env: Env) -> None:
    store = env.store
    views = {fv.name: fv for fv in store.list_feature_views()}
    assert set(views) == {*STATS_VIEWS.values(), FIELD_WEIGHTS_VIEW}
    for entity, view in STATS_VIEWS.items():
        cols = [f.name for f in views[view].features]
        assert cols == [*SPEC.feature_names(entity), event_time_feature(view)]
        assert views[view].online and views[view].ttl.total_seconds() >= 86_400
    assert {e.name: e.join_key for e in store.list_entities()} == JOIN_KEYS
    sources = {s.name for s in store.list_data_sources()}
    assert {push_source_name(v) for v in views} <= sources
    t = time.perf_counter()
    assert ensure_applied(env.path) == env.path  # already applied: a stamp check
    assert time.perf_counter() - t < 1.0


@pytest.mark.integration
def test_each_view_reads_back_what_was_written(env: Env) -> None:
    w = FeatureWriter(env.store)
    fv_key = field_value_key("C1", "rt")
    assert w.write("user_stats", [_stats_row("user", "rt-u", 10)], T0) == 1
    assert w.write("item_stats", [_stats_row("item", "rt-i", 20), _stats_row("item", "rt-j", 30)], T0) == 2
    assert w.write("field_value_stats", [_stats_row("field_value", fv_key, 40)], [T0]) == 1
    weights = [
        {"field": "C1", "weight": 0.7, "importance": 0.31, "psi": 0.02, "version": 4},
        {"field": "C2", "weight": 0.2, "importance": 0.05, "psi": 0.4, "version": 4},
    ]
    assert asyncio.run(w.write_async(FIELD_WEIGHTS_VIEW, weights, T0)) == 2

    online = OnlineFeatures(env.store)
    got = online.get_entity_stats(users=["rt-u"], items=["rt-i", "rt-j"], field_values=[fv_key])
    strip = lambda row, entity: {k: v for k, v in row.items() if k != JOIN_KEYS[entity]}  # noqa: E731
    assert got["user"]["rt-u"] == strip(_stats_row("user", "rt-u", 10), "user")
    assert got["item"]["rt-j"] == strip(_stats_row("item", "rt-j", 30), "item")
    assert got["field_value"][fv_key] == strip(_stats_row("field_value", fv_key, 40), "field_value")
    assert online.get_field_weights(["C1", "C2"]) == {"C1": 0.7, "C2": 0.2}
    rec = online.get_field_weight_records(["C2"])["C2"]
    assert rec == {"weight": 0.2, "importance": 0.05, "psi": 0.4, "version": 4}
    assert isinstance(rec["version"], int)


@pytest.mark.integration
@pytest.mark.parametrize("path", ["sqlite-fast-path", "online_read"])
def test_newest_event_time_wins(env: Env, path: str) -> None:
    w = FeatureWriter(env.store)
    if path == "online_read":
        w._sqlite_fast = False  # the store-agnostic path (Redis and any other online store)
    read = lambda k: OnlineFeatures(env.store).get_entity_stats(items=[k])["item"][k]["item_impressions_5m"]  # noqa: E731
    key = f"nw-{path}"
    # Newer, then older within the SAME second (Feast's SQLite keeps whole seconds only).
    assert w.write("item_stats", [_stats_row("item", key, 500)], T0 + 500) == 1
    assert w.write("item_stats", [_stats_row("item", key, 200)], T0 + 200) == 0
    assert read(key) == 500
    assert w.counts["stale"] == 1
    # An older write an hour back, too.
    assert w.write("item_stats", [_stats_row("item", key, 100)], T0 - 3_600_000) == 0
    assert read(key) == 500
    # Equal event time overwrites (a re-emitted window with updated counts).
    assert w.write("item_stats", [_stats_row("item", key, 501)], T0 + 500) == 1
    assert read(key) == 501
    # In one call, the newest row per key wins whatever the order.
    rows = [_stats_row("item", key, 900), _stats_row("item", key, 700)]
    assert w.write("item_stats", rows, [T0 + 900, T0 + 700]) == 1
    assert read(key) == 900
    # Mixed batch: only the stale key is dropped.
    fresh = f"{key}-fresh"
    assert w.write("item_stats", [_stats_row("item", key, 1), _stats_row("item", fresh, 2)], T0 + 800) == 1
    assert (read(key), read(fresh)) == (900, 2)


def _table_rows(store, view: str, keys: list[str]) -> dict[str, list[tuple]]:
    """Every stored SQLite row of ``keys`` in ``view``, as Feast's own table holds it."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.infra.online_stores.sqlite import _table_id

    cfg = store.config
    fv = store.get_feature_view(view)
    conn = store.provider.online_store._get_conn(cfg)
    table = _table_id(cfg.project, fv, cfg.registry.enable_online_feature_view_versioning)
    join_key = JOIN_KEYS[next(e for e, v in {**STATS_VIEWS, "field": FIELD_WEIGHTS_VIEW}.items() if v == view)]
    out = {}
    for key in keys:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        ek = EntityKey(join_keys=[join_key], entity_values=[Value(string_val=key)])
        blob = serialize_entity_key(ek, entity_key_serialization_version=cfg.entity_key_serialization_version)
        cur = conn.execute(
            f'SELECT feature_name, value, value_text, vector_value, event_ts, created_ts FROM "{table}" '
            "WHERE entity_key = ? ORDER BY feature_name",
            [blob],
        )
        out[key] = cur.fetchall()
    return out


@pytest.mark.integration
def test_direct_sqlite_writes_store_exactly_what_feast_would(env: Env) -> None:
    """The fast path bypasses ``write_to_online_store``: the table must not tell them apart
    (same value bytes, value_text, event_ts, created_ts), or Feast's readers would."""
    fast, feast_path = FeatureWriter(env.store), FeatureWriter(env.store)
    feast_path._sqlite_fast = False
    cases = {
        "user_stats": [_stats_row("user", f"u{i}", 7 * i) for i in range(5)],
        "item_stats": [{**_stats_row("item", "big", 2**40), "item_ctr_5m": 0.1 + 0.2}],
        "field_value_stats": [_stats_row("field_value", field_value_key("C3", "a=b"), 0)],
        FIELD_WEIGHTS_VIEW: [{"field": "C7", "weight": 1e-12, "importance": -0.0, "psi": 3.5, "version": 2**33}],
    }
    for view, rows in cases.items():
        jk = next(k for k in rows[0] if k in JOIN_KEYS.values())
        times = [T0 + 1234 + i for i in range(len(rows))]
        assert fast.write(view, [{**r, jk: f"fa-{r[jk]}"} for r in rows], times) == len(rows)
        assert feast_path.write(view, [{**r, jk: f"fe-{r[jk]}"} for r in rows], times) == len(rows)
        keys = [str(r[jk]) for r in rows]
        got_fast = _table_rows(env.store, view, [f"fa-{k}" for k in keys])
        got_feast = _table_rows(env.store, view, [f"fe-{k}" for k in keys])
        for k in keys:
            assert got_fast[f"fa-{k}"], (view, k)
            assert got_fast[f"fa-{k}"] == got_feast[f"fe-{k}"], (view, k)
    assert fast._sqlite_fast is not False and fast._direct.wal
    conn = env.store.provider.online_store._get_conn(env.store.config)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.integration
def test_values_the_fast_path_cannot_encode_go_through_feast(env: Env) -> None:
    w = FeatureWriter(env.store)
    row = {"field": "C8", "weight": float("nan"), "importance": 0.5, "psi": 0.0, "version": 1}
    assert w.write(FIELD_WEIGHTS_VIEW, [row], T0) == 1
    assert w._sqlite_fast is not False  # a fallback for this chunk, not for good
    rec = OnlineFeatures(env.store).get_field_weight_records(["C8"])["C8"]
    assert rec["importance"] == 0.5 and rec["version"] == 1


@pytest.mark.integration
def test_plain_feast_sqlite_lets_the_last_write_win(env: Env) -> None:
    """Why FeatureWriter guards: without it an older event overwrites a newer one on SQLite."""
    w = FeatureWriter(env.store, guard=False)
    w.write("item_stats", [_stats_row("item", "lw", 5)], T0 + 5_000)
    w.write("item_stats", [_stats_row("item", "lw", 1)], T0)
    assert OnlineFeatures(env.store).get_entity_stats(items=["lw"])["item"]["lw"]["item_impressions_5m"] == 1


@pytest.mark.integration
def test_missing_entities_get_the_prior(env: Env) -> None:
    online = OnlineFeatures(env.store)
    got = online.get_entity_stats(users=["never-seen"], items=["nope", "nope"], field_values=["C9=zz"])
    assert list(got["item"]) == ["nope"]
    for entity, key in (("user", "never-seen"), ("item", "nope"), ("field_value", "C9=zz")):
        row = got[entity][key]
        assert row[f"{entity}_ctr_5m"] == row[f"{entity}_ctr_1h"] == PRIOR
        assert row[f"{entity}_impressions_1h"] == row[f"{entity}_clicks_5m"] == 0
        assert None not in row.values()
    assert online.get_entity_stats() == {}
    assert online.get_field_weights(["C404"]) == {"C404": 1.0}
    assert online.get_field_weights(["C404"], missing=None) == {}


@pytest.mark.integration
def test_writer_rejects_bad_rows(env: Env) -> None:
    w = FeatureWriter(env.store)
    with pytest.raises(ValueError, match="join key"):
        w.write("user_stats", [{"item_id": "x"}], T0)
    with pytest.raises(ValueError, match="lacks feature"):
        w.write("user_stats", [{"user_id": "x", "user_clicks_5m": 1}], T0)
    with pytest.raises(ValueError, match="unknown feature view"):
        w.write("nope_stats", [], T0)
    assert w.write("user_stats", [], T0) == 0


@pytest.mark.integration
def test_cli_apply_and_get(env: Env) -> None:
    from typer.testing import CliRunner

    from ctr.features.cli import features_app

    runner = CliRunner()
    for cmd in ([], ["apply"], ["get"], ["serve"]):
        assert runner.invoke(features_app, [*cmd, "--help"]).exit_code == 0
    res = runner.invoke(features_app, ["apply", "--dir", str(env.path)])
    assert res.exit_code == 0 and "item_stats" in res.output
    FeatureWriter(env.store).write("user_stats", [_stats_row("user", "cli-u", 7)], T0)
    FeatureWriter(env.store).write(
        FIELD_WEIGHTS_VIEW, [{"field": "C3", "weight": 0.5, "importance": 0.1, "psi": 0.0, "version": 1}], T0
    )
    res = runner.invoke(
        features_app,
        [
            "get",
            "--dir",
            str(env.path),
            "--user",
            "cli-u",
            "--item",
            "cli-new",
            "--field-weights",
            "--field",
            "C3",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["user"]["cli-u"]["user_impressions_5m"] == 7
    assert out["item"]["cli-new"]["item_ctr_1h"] == PRIOR
    assert out["field_weights"]["C3"]["weight"] == 0.5
    assert runner.invoke(features_app, ["get", "--dir", str(env.path)]).exit_code == 2


@pytest.mark.integration
def test_feast_serve_returns_fresh_values(env: Env) -> None:
    w = FeatureWriter(env.store)
    w.write("item_stats", [_stats_row("item", "http-i", 60)], T0)
    wait_healthy(env.url, env.proc, timeout_s=90)
    feats = [f"item_stats:{c}" for c in SPEC.feature_names("item")]
    got = http_get_online_features(env.url, feats, {"item_id": ["http-i", "http-missing"]})
    assert got["item_impressions_5m"] == [60, None]
    assert got["item_ctr_1h"][0] == _stats_row("item", "http-i", 60)["item_ctr_1h"]
    # A newer write is visible on the next request (no cache between the server and SQLite).
    w.write("item_stats", [_stats_row("item", "http-i", 61)], T0 + 1)
    assert http_get_online_features(env.url, feats[:1], {"item_id": ["http-i"]})["item_impressions_5m"] == [61]
