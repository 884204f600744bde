"""A thin SDK over the Feast repository in ``features/repo``: open, write, read, serve.

Importing this module is cheap (no ``import feast``, which takes seconds); Feast is imported
by :func:`open_store`. The names below are the layout every component shares::

    >>> STATS_VIEWS["item"], JOIN_KEYS["item"], push_source_name("item_stats")
    ('item_stats', 'item_id', 'item_stats_push')
    >>> view_features("field_weights")
    ['weight', 'importance', 'psi', 'version']
    >>> view_features("user_stats")[:2]
    ['user_impressions_5m', 'user_clicks_5m']

Typical use (the Faust agent writes, the serving tier reads)::

    store = open_store(Path("runs/r1/feast"))          # materialise config + apply (idempotent)
    writer = FeatureWriter(store)
    writer.write("item_stats", [{"item_id": "ad7", "item_impressions_5m": 10, ...}],
                 event_time_ms=1_700_000_000_000)
    online = OnlineFeatures(store)
    online.get_entity_stats(users=["u1"], items=["ad7"])["item"]["ad7"]["item_ctr_5m"]

Newest event time wins, on SQLite and Redis alike. Feast alone does not give that: its SQLite
store lets the last write win (and keeps event times in whole seconds), its Redis store drops
an older write but also an EQUAL one. So :class:`FeatureWriter` enforces it itself: every row
also stores its event time in µs in a bookkeeping column (:func:`event_time_feature`); before
each micro-batch one read fetches that column for the batch's keys (a direct SELECT on
SQLite, ``provider.online_read`` on Redis or any other store), and rows strictly older than
what is stored are dropped; the rest go out in one ``write_to_online_store`` call. An equal
event time overwrites (a stream processor may re-emit the same event time with updated
counts), and within one ``write`` call only the newest row per key is kept. ``feature_store.redis.yaml`` sets
``skip_dedup: true`` so Feast's own Redis check does not drop those equal-time updates.
Limits: read-then-write is not atomic, so keep one writer per key at a time (the agents are
partitioned by key); writes that bypass FeatureWriter (HTTP ``/push``) are not checked.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ctr.features.spec import ENTITIES, SPEC, FeatureSpec
from ctr.features.sqlite_direct import NotSqlite, SqliteDirect, datetime_to_us
from ctr.infra.security import RedisSecurity, SecurityConfigError, redis_security

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- layout (feast-free)
REPO_DIR = Path(__file__).resolve().parent / "repo"
PROJECT = "ctr"
#: Event-time column of every view (µs precision; Feast's offline push rejects nanoseconds).
TIMESTAMP_FIELD = "event_timestamp"
#: Entity name -> join key.
JOIN_KEYS: dict[str, str] = {
    "user": "user_id",
    "item": "item_id",
    "field_value": "field_value",
    "field": "field",
}
#: Entity -> its windowed-statistics feature view.
STATS_VIEWS: dict[str, str] = {entity: f"{entity}_stats" for entity in ENTITIES}
FIELD_WEIGHTS_VIEW = "field_weights"
#: Field-weight columns and their kind ("float" -> Float64, "int" -> Int64).
FIELD_WEIGHT_FEATURES: dict[str, str] = {
    "weight": "float",
    "importance": "float",
    "psi": "float",
    "version": "int",
}
#: Feature view -> entity.
VIEW_ENTITY: dict[str, str] = {**{v: e for e, v in STATS_VIEWS.items()}, FIELD_WEIGHTS_VIEW: "field"}
#: Weight reported for a field nobody has published a weight for (the learner's neutral weight).
DEFAULT_FIELD_WEIGHT = 1.0

Online = Literal["sqlite", "redis"]


def push_source_name(view: str) -> str:
    """The push source feeding ``view`` (``/push`` over HTTP takes this name)."""
    return f"{view}_push"


def event_time_feature(view: str) -> str:
    """The bookkeeping Int64 column of ``view`` holding each row's event time in µs.

    Feast's SQLite online store keeps event timestamps in whole seconds (its sqlite3 adapter
    stores ``int(ts.timestamp())``), too coarse to order a stream's updates; newest-wins
    compares this column instead. ``event_time_feature("item_stats") == "item_event_time_us"``.
    """
    if view not in VIEW_ENTITY:
        raise ValueError(f"unknown feature view {view!r}; one of {sorted(VIEW_ENTITY)}")
    return f"{VIEW_ENTITY[view]}_event_time_us"


def stat_of(entity: str, feature_name: str, spec: FeatureSpec = SPEC) -> str:
    """The statistic of one stats column: ``stat_of("field_value", "field_value_ctr_1h") == "ctr"``."""
    for stat in spec.stats:
        if any(feature_name == f"{entity}_{stat}_{w.name}" for w in spec.windows):
            return stat
    raise ValueError(f"{feature_name!r} is not a statistics column of {entity!r}")


def view_features(view: str, spec: FeatureSpec = SPEC) -> list[str]:
    """The feature columns of ``view`` (without the join key and the timestamp)."""
    if view == FIELD_WEIGHTS_VIEW:
        return list(FIELD_WEIGHT_FEATURES)
    if view not in VIEW_ENTITY:
        raise ValueError(f"unknown feature view {view!r}; one of {sorted(VIEW_ENTITY)}")
    return spec.feature_names(VIEW_ENTITY[view])


def default_value(view: str, feature: str, spec: FeatureSpec = SPEC) -> float:
    """What a read returns for a missing value: the prior CTR, 0 counts, the neutral weight.

    >>> default_value("item_stats", "item_ctr_1h") == SPEC.smoothed_ctr(0, 0)
    True
    """
    if view == FIELD_WEIGHTS_VIEW:
        kind = FIELD_WEIGHT_FEATURES[feature]
        return DEFAULT_FIELD_WEIGHT if feature == "weight" else (0 if kind == "int" else 0.0)
    return spec.smoothed_ctr(0, 0) if stat_of(VIEW_ENTITY[view], feature, spec) == "ctr" else 0


# --------------------------------------------------------------------------- config + apply
def default_dir() -> Path:
    """``$CTR_FEAST_DIR``, else ``<state dir>/feast`` (``.ctr/feast``)."""
    env = os.environ.get("CTR_FEAST_DIR")
    if env:
        return Path(env).resolve()
    from ctr.infra.config import state_dir

    return state_dir() / "feast"


def configured_store(path: Path | str | None = None) -> tuple[Online, str | None] | None:
    """The online store a directory was set up with (``(type, redis connection string)``),
    or None when it has no config yet."""
    import yaml

    target = (Path(path).resolve() if path is not None else default_dir()) / "feature_store.yaml"
    if not target.exists():
        return None
    store = yaml.safe_load(target.read_text()).get("online_store", {})
    if store.get("type") == "redis":
        return "redis", store.get("connection_string")
    return "sqlite", None


def write_config(path: Path | str | None = None, online: Online | None = None, redis_url: str | None = None) -> Path:
    """Write ``feature_store.yaml`` into ``path`` from the template in ``features/repo``, with
    absolute registry / SQLite paths inside ``path`` (Redis: ``redis_url`` >
    ``$REDIS_CONNECTION_STRING`` > ``localhost:6379``, as ``host:port[,db=0,...]``).
    ``online`` None: the store the directory was set up with (SQLite for a new one), so a
    command that names no store reads the one the writers use. The file is only rewritten
    when its content changes. Returns the directory."""
    import yaml

    path = Path(path).resolve() if path is not None else default_dir()
    path.mkdir(parents=True, exist_ok=True)
    if online is None:
        online, configured_url = configured_store(path) or ("sqlite", None)
        redis_url = redis_url or configured_url
    if online not in ("sqlite", "redis"):
        raise ValueError(f"online store must be 'sqlite' or 'redis', not {online!r}")
    template = REPO_DIR / ("feature_store.yaml" if online == "sqlite" else "feature_store.redis.yaml")
    cfg = yaml.safe_load(template.read_text())
    cfg["registry"]["path"] = str(path / "registry.db")
    if online == "sqlite":
        cfg["online_store"]["path"] = str(path / "online.db")
    else:
        url = redis_url or os.environ.get("REDIS_CONNECTION_STRING") or "localhost:6379"
        if "password=" in url or "username=" in url:  # this file is written to disk and printed
            raise SecurityConfigError("the Redis connection string names a user or password: give them as "
                                      "$CTR_REDIS_USERNAME / $CTR_REDIS_PASSWORD_FILE instead")
        cfg["online_store"]["connection_string"] = url
    header = f"# Written by ctr.features.store.write_config from {template.name}; edits are overwritten.\n"
    text = header + yaml.safe_dump(cfg, sort_keys=False)
    target = path / "feature_store.yaml"
    if not target.exists() or target.read_text() != text:
        tmp = target.with_suffix(f".{os.getpid()}.tmp")  # several processes may open at once
        tmp.write_text(text)
        tmp.replace(target)
    return path


def _fingerprint(path: Path) -> str:
    """Changes whenever what ``apply`` would register could change (feast-free, cheap)."""
    h = hashlib.sha256()
    for f in (REPO_DIR / "definitions.py", Path(__file__), Path(__file__).with_name("spec.py")):
        h.update(f.read_bytes())
    h.update(repr(SPEC).encode())
    h.update(importlib.metadata.version("feast").encode())
    h.update((path / "feature_store.yaml").read_bytes())
    return h.hexdigest()


def _applied(path: Path) -> bool:
    stamp = path / ".applied"
    if not stamp.exists() or not (path / "registry.db").exists():
        return False
    if "type: sqlite" in (path / "feature_store.yaml").read_text() and not (path / "online.db").exists():
        return False
    return stamp.read_text() == _fingerprint(path)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_definitions() -> list:
    """The objects of ``features/repo/definitions.py`` (imports feast)."""
    from ctr.features.repo import definitions

    return list(definitions.OBJECTS)


def ensure_applied(
    path: Path | str | None = None,
    online: Online | None = None,
    redis_url: str | None = None,
    force: bool = False,
) -> Path:
    """Write the config into ``path`` and ``apply`` the definitions unless this exact version
    already is (a stamp file records it; checking costs no ``import feast``). Safe to call
    from several processes at once (file lock). Returns the directory."""
    path = write_config(path, online, redis_url)
    if not force and _applied(path):
        return path
    with _locked(path):
        if force or not _applied(path):
            from feast import FeatureStore

            # apply deletes the rows of views that were removed: it may talk to Redis too
            login(FeatureStore(repo_path=str(path))).apply(load_definitions())
            (path / ".applied").write_text(_fingerprint(path))
    return path


class _WithCredentials(str):
    """A Redis connection string with its credentials, whose ``repr`` (what a logged config
    object shows) leaves them out."""

    def __repr__(self) -> str:
        return repr(self.split(",username=")[0].split(",password=")[0] + ",<credentials>")


def login(store: FeatureStore, security: RedisSecurity | None = None) -> FeatureStore:
    """Make ``store``'s Redis online store log in as the configured ACL user (``security``, else
    :func:`~ctr.infra.security.redis_security`): the credentials join the connection string in
    memory only, before Feast creates its client; ``feature_store.yaml`` never holds them."""
    online = store.config.online_store
    params = (security or redis_security()).connection_params()
    if getattr(online, "type", None) == "redis" and params:
        online.connection_string = _WithCredentials(str(online.connection_string) + params)
    return store


def open_store(
    path: Path | str | None = None,
    online: Online | None = None,
    redis_url: str | None = None,
    apply: bool = True,
    security: RedisSecurity | None = None,
) -> FeatureStore:
    """A ready :class:`feast.FeatureStore` whose config, registry and SQLite db live in ``path``
    (default :func:`default_dir`). Applies the definitions when needed (first call: ~1 s plus
    ``import feast``; afterwards a stamp check). A Redis store logs in with :func:`login`.

    >>> store = open_store(tmp / "feast")                          # doctest: +SKIP
    >>> store = open_store(online="redis", redis_url="redis:6379")  # doctest: +SKIP
    """
    try:
        path = ensure_applied(path, online, redis_url) if apply else write_config(path, online, redis_url)
        from feast import FeatureStore

        return login(FeatureStore(repo_path=str(path)), security)
    except Exception as err:
        missing = ("FeastModuleImportError", "FeastExtrasDependencyImportError", "ModuleNotFoundError")
        if online == "redis" and type(err).__name__ in missing:
            raise RuntimeError(
                "the Redis online store needs the redis client (pip install 'feast[redis]'); "
                f"this environment lacks it: {err}"
            ) from err
        raise


# --------------------------------------------------------------------------- timestamps
def _event_times_us(event_time_ms: int | float | Sequence[int | float], n: int) -> list[int]:
    """Event times in ms (one for all rows, or one per row) -> integer µs since the epoch."""
    if isinstance(event_time_ms, (int, float)):
        return [round(event_time_ms * 1000)] * n
    times = [round(t * 1000) for t in event_time_ms]
    if len(times) != n:
        raise ValueError(f"{len(times)} event times for {n} rows")
    return times


# --------------------------------------------------------------------------- writes
class _View:
    """What a writer/reader needs to know about one feature view, resolved once."""

    def __init__(self, store: FeatureStore, name: str) -> None:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value
        from feast.types import Int64

        if name not in VIEW_ENTITY:
            raise ValueError(f"unknown feature view {name!r}; one of {sorted(VIEW_ENTITY)}")
        self.name = name
        self.entity = VIEW_ENTITY[name]
        self.join_key = JOIN_KEYS[self.entity]
        self.fv = store.get_feature_view(name, allow_registry_cache=True)
        self.time_feature = event_time_feature(name)
        self.features = view_features(name)
        self.int_features = {f.name for f in self.fv.features if f.dtype == Int64}
        self._entity_key, self._value = EntityKey, Value
        self._bins: dict[str, bytes] = {}
        registered = {f.name for f in self.fv.features}
        if registered != {*self.features, self.time_feature}:
            raise RuntimeError(
                f"registry view {name} has {sorted(registered)}, the spec wants {self.features} + "
                f"{self.time_feature}: re-apply (ensure_applied(force=True))"
            )

    def entity_key(self, key: str) -> Any:
        """The ``EntityKey`` proto of one key of this view."""
        return self._entity_key(join_keys=[self.join_key], entity_values=[self._value(string_val=key)])

    def key_bin(self, key: str, version: int) -> bytes:
        """The serialised entity key, as Feast's SQLite store keys its rows (cached: a hot
        entity is written every micro-batch, and serialising costs as much as the upsert)."""
        b = self._bins.get(key)
        if b is None:
            from feast.infra.key_encoding_utils import serialize_entity_key

            if len(self._bins) >= 200_000:
                self._bins.clear()
            b = self._bins[key] = serialize_entity_key(self.entity_key(key), entity_key_serialization_version=version)
        return b


class FeatureWriter:
    """Micro-batched online writes with newest-event-time-wins, for SQLite and Redis alike.

    Rows are dicts holding the view's join key (``user_id`` / ``item_id`` / ``field_value`` /
    ``field``) and every feature column of the view (:func:`view_features`); extra keys are
    ignored, keys are coerced to ``str``, Int64 columns are rounded to ``int``; the writer fills
    the event-time column itself.

    >>> w = FeatureWriter(store)                                       # doctest: +SKIP
    >>> w.write("user_stats", [{"user_id": "u1", **{c: 1 for c in view_features("user_stats")}}],
    ...         event_time_ms=1_700_000_000_000)                       # doctest: +SKIP
    1
    >>> w.write("field_weights", [{"field": "C1", "weight": 0.7, "importance": 0.3, "psi": 0.01,
    ...         "version": 4}], event_time_ms=1_700_000_000_000)       # doctest: +SKIP
    1

    ``write`` blocks (``python -m bench.feast_io`` times it); from asyncio code (a
    Faust agent) use ``await w.write_async(...)``, which runs it in a thread. Calls are
    serialised by a lock, so one writer may be shared by several agents of a process.

    Args:
        store: from :func:`open_store`.
        batch_size: rows per ``write_to_online_store`` call (1000 is the measured sweet spot).
        guard: read stored timestamps and drop older rows (newest wins). Turning it off saves
            one read per batch and gives Feast's own semantics (last write wins on SQLite).
    """

    def __init__(self, store: FeatureStore, *, batch_size: int = 1000, guard: bool = True) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.store = store
        self.batch_size = batch_size
        self.guard = guard
        #: Rows written / dropped as older than the stored value / dropped as superseded in-call.
        self.counts = {"written": 0, "stale": 0, "superseded": 0}
        self._views: dict[str, _View] = {}
        #: the SQLite fast path: None untried, False off (not SQLite, or Feast moved), True working
        self._sqlite_fast: bool | None = None
        self._direct = SqliteDirect(store)
        self._lock = threading.Lock()

    def _view(self, name: str) -> _View:
        v = self._views.get(name)
        if v is None:
            v = self._views[name] = _View(self.store, name)
        return v

    def write(
        self,
        view: str,
        rows: Sequence[Mapping[str, Any]],
        event_time_ms: int | float | Sequence[int | float],
    ) -> int:
        """Write ``rows`` to ``view`` at ``event_time_ms`` (one for all rows, or one per row;
        rounded to µs). Returns how many rows were written: a row older than the value stored
        for its key, or superseded by a newer row for the same key in this call, is dropped.
        """
        with self._lock:
            return self._write(view, rows, event_time_ms)

    async def write_async(
        self,
        view: str,
        rows: Sequence[Mapping[str, Any]],
        event_time_ms: int | float | Sequence[int | float],
    ) -> int:
        """:meth:`write` in a worker thread, for asyncio callers (Faust agents)."""
        import asyncio

        return await asyncio.to_thread(self.write, view, rows, event_time_ms)

    def _write(
        self, view: str, rows: Sequence[Mapping[str, Any]], event_time_ms: int | float | Sequence[int | float]
    ) -> int:
        v = self._view(view)
        if not rows:
            return 0
        times = _event_times_us(event_time_ms, len(rows))
        newest: dict[str, int] = {}
        for i, row in enumerate(rows):
            try:
                key = str(row[v.join_key])
            except KeyError:
                raise ValueError(f"row {i} for {view} lacks its join key {v.join_key!r}") from None
            j = newest.get(key)
            if j is None or times[i] >= times[j]:
                newest[key] = i
        self.counts["superseded"] += len(rows) - len(newest)
        written = 0
        items = list(newest.items())
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            if self.guard:
                stored = self._stored_times(v, [k for k, _ in chunk])
                kept = [(k, i) for k, i in chunk if k not in stored or times[i] >= stored[k]]
                self.counts["stale"] += len(chunk) - len(kept)
                chunk = kept
            if chunk:
                self._online_write(v, rows, times, chunk)
                written += len(chunk)
        self.counts["written"] += written
        return written

    def _online_write(
        self, v: _View, rows: Sequence[Mapping[str, Any]], times: list[int], chunk: list[tuple[str, int]]
    ) -> None:
        if self._sqlite_fast is not False:
            try:
                if self._direct.write(v, rows, times, chunk):
                    return
            except NotSqlite:
                self._sqlite_fast = False
            except (KeyError, ValueError, TypeError):
                raise
            except Exception as err:  # noqa: BLE001 - Feast internals moved: use the public path
                log.warning("SQLite fast path for writes failed (%s); using write_to_online_store", err)
                self._sqlite_fast = False
        self.store.write_to_online_store(v.name, self._frame(v, rows, times, chunk))

    def _stored_times(self, v: _View, keys: list[str]) -> dict[str, int]:
        """Stored event time (µs) per key, for the keys that have one: one read per batch."""
        if self._sqlite_fast is not False:
            try:
                return self._direct.stored_times(v, keys)
            except NotSqlite:
                self._sqlite_fast = False
            except Exception as err:  # noqa: BLE001 - Feast internals moved: use the public path
                log.warning("SQLite fast path for stored event times failed (%s); using online_read", err)
                self._sqlite_fast = False
        return self._stored_times_generic(v, keys)

    def _stored_times_generic(self, v: _View, keys: list[str]) -> dict[str, int]:
        """Any online store: ``provider.online_read`` of the event-time column."""
        res = self.store.provider.online_read(
            config=self.store.config, table=v.fv, entity_keys=[v.entity_key(k) for k in keys],
            requested_features=[v.time_feature],
        )  # fmt: skip
        out = {}
        for k, (ts, values) in zip(keys, res, strict=True):
            if ts is None:
                continue
            us = (values or {}).get(v.time_feature)
            out[k] = us.int64_val if us is not None and us.HasField("int64_val") else datetime_to_us(ts)
        return out

    @staticmethod
    def _frame(
        v: _View, rows: Sequence[Mapping[str, Any]], times: list[int], chunk: list[tuple[str, int]]
    ) -> Any:  # a pandas DataFrame (pandas is imported when a write needs it)
        import numpy as np
        import pandas as pd

        cols: dict[str, Any] = {v.join_key: [k for k, _ in chunk]}
        for f in v.features:
            try:
                values = [rows[i][f] for _, i in chunk]
            except KeyError:
                raise ValueError(f"a row for {v.name} lacks feature {f!r}; needs {v.features}") from None
            if f in v.int_features:
                cols[f] = np.asarray([round(x) for x in values], dtype=np.int64)
            else:
                cols[f] = np.asarray(values, dtype=np.float64)
        us = np.asarray([times[i] for _, i in chunk], dtype=np.int64)
        cols[v.time_feature] = us
        cols[TIMESTAMP_FIELD] = pd.DatetimeIndex(us.astype("datetime64[us]")).tz_localize("UTC")
        return pd.DataFrame(cols)


# --------------------------------------------------------------------------- reads
class OnlineFeatures:
    """Fresh values for the serving tier and the learner; missing values come back as the
    prior (CTR ``SPEC.smoothed_ctr(0, 0)``, counts 0, field weight 1.0), never ``None``.

    >>> online = OnlineFeatures(store)                                 # doctest: +SKIP
    >>> stats = online.get_entity_stats(users=["u1"], items=["ad7", "ad9"],
    ...                                 field_values=["C1=1005"])      # doctest: +SKIP
    >>> stats["item"]["ad9"]["item_ctr_1h"]                            # doctest: +SKIP
    0.05
    >>> online.get_field_weights(["C1", "C2"])                         # doctest: +SKIP
    {'C1': 0.7, 'C2': 1.0}
    """

    def __init__(self, store: FeatureStore, spec: FeatureSpec = SPEC) -> None:
        self.store = store
        self.spec = spec

    def get_entity_stats(
        self,
        users: Sequence[str] = (),
        items: Sequence[str] = (),
        field_values: Sequence[str] = (),
    ) -> dict[str, dict[str, dict[str, float]]]:
        """Windowed stats of every given user, item and ``"field=value"`` key, in ONE
        ``get_online_features`` call: ``{"user": {"u1": {"user_ctr_5m": ...}}, "item": {...},
        "field_value": {...}}`` (an entity type appears only when keys were asked for)."""
        wanted = {"user": users, "item": items, "field_value": field_values}
        return self._read({STATS_VIEWS[e]: list(dict.fromkeys(map(str, keys))) for e, keys in wanted.items()})

    def get_field_weight_records(self, fields: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """``{field: {"weight", "importance", "psi", "version"}}`` (default fields:
        ``SPEC.stat_fields``; pass the model's field list). Missing: weight 1.0, others 0."""
        keys = list(dict.fromkeys(fields if fields is not None else self.spec.stat_fields))
        return self._read({FIELD_WEIGHTS_VIEW: keys}).get("field", {})

    def get_field_weights(
        self, fields: Sequence[str] | None = None, missing: float | None = DEFAULT_FIELD_WEIGHT
    ) -> dict[str, float]:
        """``{field: weight}``; a field without a published weight gets ``missing``
        (or is left out when ``missing`` is None)."""
        keys = list(dict.fromkeys(fields if fields is not None else self.spec.stat_fields))
        if not keys:
            return {}
        resp = self.store.get_online_features(
            features=[f"{FIELD_WEIGHTS_VIEW}:weight"], entity_rows={JOIN_KEYS["field"]: keys}
        ).to_dict()
        out = {}
        for k, w in zip(keys, resp["weight"], strict=True):
            if w is not None:
                out[k] = float(w)
            elif missing is not None:
                out[k] = missing
        return out

    def _read(self, keys_by_view: dict[str, list[str]]) -> dict[str, dict[str, dict[str, float]]]:
        views = {view: keys for view, keys in keys_by_view.items() if keys}
        if not views:
            return {}
        n = max(len(keys) for keys in views.values())
        # One call for all views: pad shorter key lists with "" (never a real id: ids are
        # non-empty), whose lookups simply miss.
        rows = {JOIN_KEYS[VIEW_ENTITY[v]]: keys + [""] * (n - len(keys)) for v, keys in views.items()}
        features = [f"{v}:{f}" for v in views for f in view_features(v, self.spec)]
        resp = self.store.get_online_features(features=features, entity_rows=rows).to_dict()
        out: dict[str, dict[str, dict[str, float]]] = {}
        for v, keys in views.items():
            names = view_features(v, self.spec)
            defaults = [default_value(v, f, self.spec) for f in names]
            columns = [resp[f] for f in names]
            out[VIEW_ENTITY[v]] = {
                k: {f: d if c[i] is None else c[i] for f, d, c in zip(names, defaults, columns, strict=True)}
                for i, k in enumerate(keys)
            }
        return out


# --------------------------------------------------------------------------- feast serve
def serve_command(path: Path | str, port: int, host: str = "127.0.0.1", workers: int = 1) -> list[str]:
    """The command line of Feast's feature server for a config dir (:mod:`ctr.features.feast_server`:
    what ``feast serve`` runs, logged in to Redis as :func:`login` does), loopback by default."""
    return [sys.executable, "-m", "ctr.features.feast_server", str(Path(path).resolve()),
            "--host", host, "--port", str(port), "--workers", str(workers)]  # fmt: skip


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 60.0) -> None:
    """Poll ``GET {url}/health`` until it answers 200; raise if ``proc`` exits or time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"feast serve exited with {proc.returncode} before becoming healthy")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"feast serve at {url} not healthy after {timeout_s:.0f} s")


def http_get_online_features(url: str, features: list[str], entities: dict[str, list[str]]) -> dict[str, list]:
    """POST ``/get-online-features`` and return ``{feature: [values per row]}`` (None = missing).

    The equivalent curl::

        curl -s -X POST http://127.0.0.1:6566/get-online-features \\
          -H 'Content-Type: application/json' \\
          -d '{"features": ["item_stats:item_ctr_5m"], "entities": {"item_id": ["ad7"]}}'
    """
    import httpx

    body = {"features": features, "entities": entities}
    r = httpx.post(f"{url}/get-online-features", json=body, timeout=10.0)
    r.raise_for_status()
    answer = r.json()
    names = answer["metadata"]["feature_names"]
    return {name: res["values"] for name, res in zip(names, answer["results"], strict=True)}


__all__ = [
    "DEFAULT_FIELD_WEIGHT",
    "FIELD_WEIGHTS_VIEW",
    "FIELD_WEIGHT_FEATURES",
    "JOIN_KEYS",
    "STATS_VIEWS",
    "TIMESTAMP_FIELD",
    "FeatureWriter",
    "OnlineFeatures",
    "default_dir",
    "ensure_applied",
    "http_get_online_features",
    "open_store",
    "push_source_name",
    "serve_command",
    "view_features",
    "wait_healthy",
    "write_config",
]
