"""Request features for serving: the Feast online store behind a small in-process cache,
with every Feast read done in a worker process.

What a model needs: a numeric field of the model config whose name is a Feast statistics
column (``SPEC.feature_names("user")`` / ``("item")``, e.g. ``user_ctr_5m``, ``item_ctr_1h``)
is filled from the store for the request's user / each candidate item (:class:`FeaturePlan`).
A missing entity reads as the prior (``ctr.features.store.default_value``: prior CTR, 0 counts).

Why a cache. Feast's Python read path for 100 keys on SQLite costs about the whole latency
budget of a 100-candidate request (``bench/results/feast_io.json``, README "Feast I/O"),
and every 60 s one read also pays a registry refresh. :class:`FeatureCache` keeps each entity's
stats in a dict with its fetch time:

* **fresh** (age < ``ttl_s``): served from memory;
* **stale** (``ttl_s`` <= age < ``max_stale_s``): served from memory *and* queued for refresh;
* **missing / too old**: read synchronously, all such keys of the request in ONE call.

A background thread re-reads, in bulk (chunks of ``refresh_chunk`` keys), every key that
requests touched since its last refresh once its age passes 0.75 ``ttl_s`` ("refresh-ahead"):
a key in use stays younger than about ``ttl_s`` and never waits for Feast on the request path.
Keys nobody asks for are not refreshed (they expire, then are evicted beyond ``max_keys``).
``put()`` is the hook for feeding the cache from the feature stream itself once the Faust
writer publishes its rows; then ``ttl_s`` only bounds how long a lost update can linger.

Why a worker process (:class:`FeastProcessSource`): see its docstring -- Feast reads are long
stretches of pure Python, and in the serving process they hold the GIL against requests.

With ``enabled=False`` (``--no-feature-cache``) every request reads Feast (the baseline the
benchmark compares with); :class:`FeastSource` reads in-process (``--feast-in-process``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any, Protocol

import msgspec
from prometheus_client import Counter, Histogram

from ctr.features.spec import SPEC

log = logging.getLogger(__name__)

#: Entity -> its statistics columns (the names a model config may list as numeric fields).
STAT_FEATURES: dict[str, tuple[str, ...]] = {e: tuple(SPEC.feature_names(e)) for e in ("user", "item")}
_FEATURE_ENTITY = {f: e for e, names in STAT_FEATURES.items() for f in names}
_VIEWS = {"user": "user_stats", "item": "item_stats"}

FETCH_SECONDS = Histogram(
    "ctr_serving_feature_fetch_seconds", "Feature lookup time per request (cache + any Feast read)", ["path"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
FEAST_READ_SECONDS = Histogram(
    "ctr_serving_feast_read_seconds", "One Feast online read", ["caller"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5),
)
CACHE_LOOKUPS = Counter("ctr_serving_feature_cache_lookups_total", "Feature cache lookups per key", ["result"])
FEAST_ERRORS = Counter("ctr_serving_feast_errors_total", "Failed Feast reads (served stale values or priors)")


def _default(entity: str, feature: str) -> float:
    from ctr.features.store import default_value  # feast-free module-level code

    return float(default_value(_VIEWS[entity], feature))


DEFAULTS: dict[str, dict[str, float]] = {e: {f: _default(e, f) for f in names} for e, names in STAT_FEATURES.items()}


@dataclass(frozen=True)
class FeaturePlan:
    """Which numeric fields of a model are filled from the store, per entity."""

    user: tuple[str, ...] = ()
    item: tuple[str, ...] = ()

    @classmethod
    def for_fields(cls, numeric_fields: Iterable[str]) -> FeaturePlan:
        names = list(numeric_fields)
        return cls(user=tuple(f for f in names if _FEATURE_ENTITY.get(f) == "user"),
                   item=tuple(f for f in names if _FEATURE_ENTITY.get(f) == "item"))

    @property
    def needs_features(self) -> bool:
        return bool(self.user or self.item)


class FeatureSource(Protocol):
    def stats(self, users: Sequence[str], items: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]: ...

    def field_weights(self, fields: Sequence[str]) -> dict[str, float]: ...


class FeastSource:
    """Blocking reads from the Feast online store. ``import feast`` happens here, once."""

    def __init__(self, path: Path | str | None = None, online: str | None = None, redis_url: str | None = None) -> None:
        from ctr.features.store import OnlineFeatures, open_store

        t0 = time.perf_counter()
        self.store = open_store(path, online, redis_url)  # type: ignore[arg-type]
        self.online = OnlineFeatures(self.store)
        self._lock = threading.Lock()  # one Feast call at a time (shared SQLite connection)
        self.stats(["__warmup__"], ["__warmup__"] * 2)
        self.open_s = time.perf_counter() - t0
        log.info("Feast store open in %.1f s", self.open_s)

    #: Keys per Feast read. Feast's read path is superlinear in the batch (per key, a read of
    #: a few hundred keys cost about three times one of 128 on SQLite), so big reads are cut
    #: into chunks.
    CHUNK = 128

    def stats(self, users: Sequence[str], items: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
        """Stats of users and items. One ``get_entity_stats`` per view and chunk: a call with
        both views pads the shorter key list to the longer one (``OnlineFeatures._read``), so
        1 user + 100 items costs about twice as much in one call as in two."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        with self._lock:
            for entity, keys in (("user", list(users)), ("item", list(items))):
                for i in range(0, len(keys), self.CHUNK):
                    part = keys[i:i + self.CHUNK]
                    got = self.online.get_entity_stats(**{f"{entity}s": part})
                    out.setdefault(entity, {}).update(got.get(entity, {}))
        return out

    def field_weights(self, fields: Sequence[str]) -> dict[str, float]:
        with self._lock:
            return self.online.get_field_weights(list(fields))


class FeastProcessSource:
    """The same reads, done by a worker process that owns Feast (the default).

    Feast's read path is pure-Python work (protobuf, DataFrames), tens of milliseconds for a
    few hundred keys. In the serving process every such read holds the GIL that long, and a
    request thread that releases the GIL (each torch op, each socket write) then waits for it
    again: the p99 of a 100-candidate request multiplies while the cache refreshes in a thread
    (the "cache, Feast refreshed in-process" row of ``ctr bench serving``). In a worker
    process the asking thread just blocks on a pipe with the GIL released.

    The worker is ``python -c`` running :func:`feast_worker_main` (it imports Feast, not
    torch) and exits when its stdin closes, i.e. when the server exits or is killed (no
    ``PR_SET_PDEATHSIG``: Linux ties that to the creating *thread*, which here is short-lived).
    Frames are 4-byte length + msgpack. One request at a time (a caller waits at most
    ``wait_s`` for its turn); no answer within ``timeout_s`` raises -- the cache then serves
    stale values or priors -- and a new worker is started in the background.
    """

    def __init__(self, path: Path | str | None = None, online: str | None = None, redis_url: str | None = None,
                 timeout_s: float = 5.0, start_timeout_s: float = 300.0, wait_s: float = 1.0) -> None:
        self.args = [str(path) if path is not None else "", online or "", redis_url or ""]
        self.timeout_s, self.start_timeout_s, self.wait_s = timeout_s, start_timeout_s, wait_s
        self._lock = threading.Lock()
        self._seq = 0
        self.restarts = -1
        self.open_s = 0.0
        self.healthy = False
        self.error: str | None = None
        self._proc = self._start()

    def _start(self) -> Any:
        import subprocess
        import sys

        t0 = time.perf_counter()
        code = "import sys; from ctr.serving.features import feast_worker_main; feast_worker_main(sys.argv[1:])"
        proc = subprocess.Popen([sys.executable, "-c", code, *self.args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, bufsize=0)
        try:
            status, detail = _read_frame(proc.stdout, self.start_timeout_s)
        except (OSError, EOFError, TimeoutError, ValueError) as err:
            proc.kill()
            raise RuntimeError(f"Feast worker did not start: {err}") from None
        if status != "ready":
            proc.kill()
            raise RuntimeError(f"Feast worker failed: {detail}")
        self.restarts += 1
        self.open_s = time.perf_counter() - t0
        self.healthy, self.error = True, None
        log.info("Feast worker pid %d ready in %.1f s", proc.pid, self.open_s)
        return proc

    def _restart(self, why: str) -> None:
        """Kill the worker; start a new one in the background (calls fail fast meanwhile)."""
        self.healthy, self.error = False, why
        with contextlib.suppress(OSError):
            self._proc.kill()

        def again() -> None:
            while True:
                try:
                    proc = self._start()
                except Exception as err:  # noqa: BLE001 - keep trying; /readyz shows the error
                    self.error = str(err)
                    time.sleep(5)
                    continue
                with self._lock:
                    self._proc = proc
                return

        threading.Thread(target=again, name="feast-worker-restart", daemon=True).start()

    def _call(self, op: str, *args: Any) -> Any:
        if not self.healthy:
            raise RuntimeError(f"Feast worker restarting ({self.error})")
        if not self._lock.acquire(timeout=self.wait_s):
            raise TimeoutError(f"Feast worker busy for more than {self.wait_s} s")
        try:
            self._seq += 1
            seq = self._seq
            try:
                _write_frame(self._proc.stdin, [seq, op, *args])
                got_seq, ok, payload = _read_frame(self._proc.stdout, self.timeout_s)
            except (OSError, EOFError, TimeoutError, ValueError) as err:
                log.warning("Feast worker unusable (%s): restarting it", err)
                self._restart(f"{type(err).__name__}: {err}")
                raise
            if got_seq != seq:
                self._restart(f"answer {got_seq} to request {seq}")
                raise RuntimeError(f"Feast worker answered request {got_seq}, expected {seq}")
            if not ok:
                raise RuntimeError(f"Feast read failed in the worker: {payload}")
            return payload
        finally:
            self._lock.release()

    def stats(self, users: Sequence[str], items: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
        return self._call("stats", list(users), list(items))

    def field_weights(self, fields: Sequence[str]) -> dict[str, float]:
        return self._call("weights", list(fields))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        try:
            self._proc.wait(5)
        except Exception:  # noqa: BLE001
            self._proc.kill()


def _write_frame(f: Any, obj: Any) -> None:
    data = msgspec.msgpack.encode(obj)
    f.write(len(data).to_bytes(4, "little") + data)
    f.flush()


def _read_exact(f: Any, n: int, deadline: float) -> bytes:
    import select

    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([f], [], [], left)[0]:
            raise TimeoutError("no answer from the Feast worker in time")
        chunk = f.read(n - len(buf))
        if not chunk:
            raise EOFError("the Feast worker exited")
        buf += chunk
    return bytes(buf)


def _read_frame(f: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    n = int.from_bytes(_read_exact(f, 4, deadline), "little")
    return msgspec.msgpack.decode(_read_exact(f, n, deadline))


def feast_worker_main(argv: list[str]) -> None:  # pragma: no cover - runs in the worker process
    """The worker: open Feast once, then answer framed reads on stdin/stdout until stdin closes."""
    import os
    import sys

    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything Feast prints goes to stderr, never into the frames
    inp = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
    path, online, redis_url = (argv + ["", "", ""])[:3]
    try:
        src = FeastSource(path or None, online or None, redis_url or None)
    except Exception as err:  # noqa: BLE001 - reported to the parent
        _write_frame(out, ["error", f"{type(err).__name__}: {err}"])
        return
    import gc

    gc.collect()
    gc.freeze()  # Feast's import graph: keep full collections from walking it on every pass
    _write_frame(out, ["ready", src.open_s])
    while True:
        try:
            seq, op, *args = _read_frame(inp, 10**9)
        except (EOFError, OSError, TimeoutError):
            return
        try:
            payload = src.stats(*args) if op == "stats" else src.field_weights(*args)
            _write_frame(out, [seq, True, payload])
        except Exception as err:  # noqa: BLE001 - reported to the parent; the worker goes on
            _write_frame(out, [seq, False, f"{type(err).__name__}: {err}"])


@dataclass
class Lookup:
    """Stats for one request: ``values["user"][user_id][feature]``, ``values["item"][...]``."""

    values: dict[str, dict[str, dict[str, float]]]
    hits: int = 0
    stale: int = 0
    misses: int = 0
    #: "cache" (no Feast read on the request path), "feast" (read at least one key), "none".
    source: str = "none"
    degraded: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "hits": self.hits, "stale": self.stale, "misses": self.misses,
                "degraded": self.degraded, "ms": round(self.seconds * 1000, 3)}


@dataclass(eq=False, slots=True)  # eq=False: ``None in entries`` compares by identity, in C
class _Entry:
    t: float
    values: dict[str, float]


_ENTRY_T, _ENTRY_VALUES = attrgetter("t"), attrgetter("values")


@dataclass
class FeatureCache:
    """Per-entity TTL cache in front of a :class:`FeatureSource`; see the module docstring.

    Thread-safe: request threads read, the refresher and misses write (whole-entry swaps of
    immutable dicts under a lock)."""

    source: FeatureSource
    enabled: bool = True
    ttl_s: float = 5.0
    max_stale_s: float = 60.0
    max_keys: int = 500_000
    refresh_chunk: int = 128
    clock: Any = time.monotonic
    _data: dict[str, dict[str, _Entry]] = field(default_factory=lambda: {"user": {}, "item": {}, "field": {}})
    _touched: dict[str, set[str]] = field(default_factory=lambda: {"user": set(), "item": set(), "field": set()})
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    refreshed_keys: int = 0
    refresh_passes: int = 0
    last_refresh_s: float = 0.0

    # -- request path ------------------------------------------------------------------------------
    def peek(self, wanted: Mapping[str, Sequence[str]]) -> tuple[Lookup, dict[str, list[str]]]:
        """Serve what the cache holds; return the keys that must be read from the source."""
        look = Lookup({e: {} for e in wanted}, source="cache")
        missing: dict[str, list[str]] = {}
        if not self.enabled:
            return look, {e: list(dict.fromkeys(keys)) for e, keys in wanted.items() if keys}
        now = self.clock()
        ttl, max_stale = self.ttl_s, self.max_stale_s
        for entity, keys in wanted.items():
            table, out, touched = self._data[entity], look.values[entity], self._touched[entity]
            touched.update(keys)
            entries = list(map(table.get, keys))
            if entries and None not in entries and now - min(map(_ENTRY_T, entries)) < ttl:  # all fresh
                out.update(zip(keys, map(_ENTRY_VALUES, entries), strict=True))
                look.hits += len(out)
                continue
            miss: list[str] = []
            for k in keys:
                if k in out:
                    continue
                e = table.get(k)
                if e is None or now - e.t >= max_stale:
                    miss.append(k)
                    continue
                out[k] = e.values
                if now - e.t >= ttl:
                    look.stale += 1
                else:
                    look.hits += 1
            if miss:
                missing[entity] = list(dict.fromkeys(miss))
        return look, missing

    def fetch(self, look: Lookup, missing: dict[str, list[str]]) -> Lookup:
        """Read ``missing`` keys from the source (ONE call for users + items) into ``look``."""
        if not missing:
            return look
        users, items = missing.get("user", []), missing.get("item", [])
        fields = missing.get("field", [])
        look.misses += sum(len(v) for v in missing.values())
        look.source = "feast"
        try:
            if users or items:
                t0 = time.perf_counter()
                got = self.source.stats(users, items)
                FEAST_READ_SECONDS.labels("request").observe(time.perf_counter() - t0)
                self._store(got, look)
            if fields:
                weights = self.source.field_weights(fields)
                self._store({"field": {f: {"weight": float(w)} for f, w in weights.items()}}, look)
        except Exception as err:  # noqa: BLE001 - degrade to stale values / priors, never fail the request
            FEAST_ERRORS.inc()
            log.warning("Feast read failed (%s): serving stale values or priors", err)
            look.degraded = True
            for entity, keys in missing.items():
                table = self._data[entity]
                for k in keys:
                    e = table.get(k)
                    look.values[entity][k] = e.values if e is not None else _defaults_of(entity)
        return look

    def _store(self, got: dict[str, dict[str, dict[str, float]]], look: Lookup | None) -> None:
        now = self.clock()
        with self._lock:
            for entity, rows in got.items():
                table = self._data.setdefault(entity, {})
                for k, values in rows.items():
                    if self.enabled:
                        table[k] = _Entry(now, values)
                    if look is not None and entity in look.values:
                        look.values[entity][k] = values
            self._evict()

    def _evict(self) -> None:
        total = sum(len(t) for t in self._data.values())
        if total <= self.max_keys:
            return
        for table in self._data.values():  # oldest inserted first (dict order), ~10% headroom
            drop = int(len(table) * 0.1) + 1
            for k in list(table)[:drop]:
                del table[k]

    def put(self, entity: str, rows: dict[str, dict[str, float]]) -> None:
        """Hook for a stream-fed cache: install fresh values pushed by the feature stream."""
        self._store({entity: rows}, None)

    # -- background refresh ------------------------------------------------------------------------
    def refresh_once(self) -> int:
        """Re-read every touched key whose age nears ``ttl_s``; returns how many were read."""
        now = self.clock()
        horizon = self.ttl_s * 0.75
        due: dict[str, list[str]] = {}
        with self._lock:
            for entity, touched in self._touched.items():
                if not touched:
                    continue
                table = self._data[entity]
                # list() and difference_update() are single C calls: atomic against request threads
                keys = [k for k in list(touched) if (e := table.get(k)) is None or now - e.t >= horizon]
                touched.difference_update(keys)
                if keys:
                    due[entity] = keys
        n = 0
        t0 = time.perf_counter()
        users, items = due.get("user", []), due.get("item", [])
        chunk = self.refresh_chunk
        for i in range(0, max(len(users), len(items)), chunk):
            if self._stop.is_set():
                break
            u, it = users[i:i + chunk], items[i:i + chunk]
            try:
                t1 = time.perf_counter()
                got = self.source.stats(u, it)
                FEAST_READ_SECONDS.labels("refresh").observe(time.perf_counter() - t1)
            except Exception as err:  # noqa: BLE001 - keep serving what we have
                FEAST_ERRORS.inc()
                log.warning("feature refresh failed: %s", err)
                break
            self._store(got, None)
            n += len(u) + len(it)
            time.sleep(0.0005)  # let request threads have the GIL between chunks
        if due.get("field"):
            try:
                weights = self.source.field_weights(due["field"])
                self._store({"field": {f: {"weight": float(w)} for f, w in weights.items()}}, None)
                n += len(due["field"])
            except Exception as err:  # noqa: BLE001
                FEAST_ERRORS.inc()
                log.warning("field-weight refresh failed: %s", err)
        self.refreshed_keys += n
        self.refresh_passes += 1
        self.last_refresh_s = time.perf_counter() - t0
        return n

    def start(self) -> FeatureCache:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="feature-refresh", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        interval = max(0.05, self.ttl_s / 8)
        while not self._stop.wait(interval):
            try:
                self.refresh_once()
            except Exception:  # noqa: BLE001 - the refresher must not die
                log.exception("feature refresh pass failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def status(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "ttl_s": self.ttl_s, "max_stale_s": self.max_stale_s,
                "keys": {e: len(t) for e, t in self._data.items()}, "refreshed_keys": self.refreshed_keys,
                "refresh_passes": self.refresh_passes, "last_refresh_ms": round(self.last_refresh_s * 1000, 2)}


def _defaults_of(entity: str) -> dict[str, float]:
    if entity == "field":
        return {"weight": 1.0}
    return DEFAULTS[entity]


def record(look: Lookup) -> None:
    """Prometheus accounting of one request's lookup."""
    for result, n in (("hit", look.hits), ("stale", look.stale), ("miss", look.misses)):
        if n:
            CACHE_LOOKUPS.labels(result).inc(n)
    FETCH_SECONDS.labels(look.source).observe(look.seconds)
