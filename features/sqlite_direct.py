"""Feast's SQLite online table, written and read directly: the fast path of
:class:`~ctr.features.store.FeatureWriter`.

Feast's public path (``write_to_online_store``) converts DataFrame -> Arrow -> one ``Value``
proto per cell -> one ``execute`` per (entity, feature); here each cell is serialised once and a
chunk is one ``executemany`` of Feast's own upsert, into the same table with the same bytes.
It leans on two private names of ``feast.infra.online_stores.sqlite`` (``_table_id``,
``SqliteOnlineStore._get_conn``), pinned by ``tests/test_private_contracts.py``; the writer
falls back to the public path for good when either moves (any exception but a bad row), and
``tests/test_features.py`` compares both paths row for row.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from feast import FeatureStore

    from ctr.features.store import _View

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


class NotSqlite(Exception):
    """The store's online store is not the plain SQLite one: use the public path."""


def datetime_to_us(ts: datetime) -> int:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return (ts - _EPOCH) // _US


class SqliteDirect:
    """Writes and event-time reads of one store's SQLite online tables (WAL on first write)."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.wal = False

    def write(
        self, v: _View, rows: Sequence[Mapping[str, Any]], times: list[int], chunk: list[tuple[str, int]]
    ) -> bool:
        """SQLite: the rows ``write_to_online_store`` would write, built straight from the dicts.

        Feast's path goes DataFrame -> Arrow -> one ``Value`` proto per cell -> one
        ``execute`` per (entity, feature); two thirds of its time is the conversion. Here
        each cell is serialised once and the whole chunk is one ``executemany`` of Feast's own
        upsert statement, in one transaction -- same table, same bytes (a test compares both
        paths row for row), several times the rows/s. Returns False (nothing written) for a value this
        path does not encode exactly like Feast (None, NaN, inf), so the caller falls back.
        """
        import math

        from feast.infra.online_stores.sqlite import SqliteOnlineStore, _table_id

        online, cfg = self.store.provider.online_store, self.store.config
        # only the plain store: subclasses, vector search or value_num columns write other columns
        if (
            type(online) is not SqliteOnlineStore
            or cfg.online_store.vector_enabled
            or getattr(cfg.online_store, "enable_openai_compatible_store", False)
        ):
            raise NotSqlite
        table = _table_id(cfg.project, v.fv, cfg.registry.enable_online_feature_view_versioning)
        version = cfg.entity_key_serialization_version
        Value = v._value
        ints = v.int_features
        params: list[tuple] = []
        for key, i in chunk:
            row = rows[i]
            key_bin = v.key_bin(key, version)
            # what Feast's registered datetime adapter stores: whole seconds
            ts = times[i] // 1_000_000
            for f in v.features:
                try:
                    x = row[f]
                except KeyError:
                    raise ValueError(f"a row for {v.name} lacks feature {f!r}; needs {v.features}") from None
                if x is None or not math.isfinite(x):
                    return False
                if f in ints:
                    x = round(x)
                    params.append((key_bin, f, Value(int64_val=x).SerializeToString(), str(x), ts, None))
                else:
                    x = float(x)
                    params.append((key_bin, f, Value(double_val=x).SerializeToString(), str(x), ts, None))
            us = times[i]
            params.append((key_bin, v.time_feature, Value(int64_val=us).SerializeToString(), str(us), ts, None))
        conn = online._get_conn(cfg)
        if not self.wal:
            self._setup_wal(conn)
        with conn:
            conn.executemany(
                f'INSERT INTO "{table}" (entity_key, feature_name, value, value_text, event_ts, created_ts) '
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
                "value = excluded.value, value_text = excluded.value_text, "
                "event_ts = excluded.event_ts, created_ts = excluded.created_ts",
                params,
            )
        return True

    def _setup_wal(self, conn: Any) -> None:
        """WAL, and ``synchronous`` from ``CTR_SQLITE_SYNCHRONOUS`` (default OFF).

        WAL: readers (feast serve, the serving tier) never block the writer. OFF: SQLite never
        fsyncs. With NORMAL it fsyncs at every checkpoint, which it runs inside the commit that
        crosses ``wal_autocheckpoint`` -- and beside the embedded broker, which rewrites its
        whole state file on the same disk every few seconds, that fsync waited on the broker's
        writeback: a 7,000-row write took 3 s at 0.4 CPU. Feature freshness at 2,000 events/s
        over 30 s, with fetch pacing: OFF p50 0.7 s / p99 1.5 s; NORMAL with a thread
        checkpointing every second, p50 1.3 s / p99 2.5 s (features/README.md). What OFF
        risks: a killed process loses nothing (the OS has the pages); an OS crash or power loss
        may corrupt ``online.db``. This store is derived data: delete the file and restart the
        worker; every entity's row comes back, with exact counts from the agent's restored
        state, at its next event (those of unconfirmed batches at once).
        ``CTR_SQLITE_SYNCHRONOUS=NORMAL`` trades freshness for that risk.
        """
        mode = os.environ.get("CTR_SQLITE_SYNCHRONOUS", "OFF").upper()
        if mode not in ("OFF", "NORMAL", "FULL"):
            raise ValueError(f"CTR_SQLITE_SYNCHRONOUS={mode!r}: choose OFF, NORMAL or FULL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={mode}")
        self.wal = True

    def stored_times(self, v: _View, keys: list[str]) -> dict[str, int]:
        """SQLite: select only the event-time rows (plus one feature row, for rows written
        without it) instead of every feature of every key -- far cheaper than online_read,
        which on SQLite reads and parses all features whatever ``requested_features`` says."""
        from feast.infra.online_stores.sqlite import SqliteOnlineStore, _table_id
        from feast.protos.feast.types.Value_pb2 import Value

        online, cfg = self.store.provider.online_store, self.store.config
        if not isinstance(online, SqliteOnlineStore):
            raise NotSqlite
        table = _table_id(cfg.project, v.fv, cfg.registry.enable_online_feature_view_versioning)
        conn = online._get_conn(cfg)
        version = cfg.entity_key_serialization_version
        by_bin = {v.key_bin(k, version): k for k in keys}
        bins = list(by_bin)
        exact: dict[str, int] = {}
        coarse: dict[str, int] = {}
        for start in range(0, len(bins), 5000):
            part = bins[start : start + 5000]
            cur = conn.execute(
                f'SELECT entity_key, feature_name, value, event_ts FROM "{table}" '
                f"WHERE feature_name IN (?, ?) AND entity_key IN ({','.join('?' * len(part))})",
                [v.time_feature, v.features[0], *part],
            )
            for key_bin, name, value, ts in cur.fetchall():
                key = by_bin[key_bin]
                if name == v.time_feature:
                    val = Value()
                    val.ParseFromString(value)
                    exact[key] = val.int64_val
                elif ts is not None:
                    coarse[key] = datetime_to_us(ts)
        return {**coarse, **exact}
