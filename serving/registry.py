"""Model versions for serving: shadow apply, atomic swap, the last K versions, rollback/pin, re-sync.

Pure logic (no Kafka, no HTTP): :mod:`ctr.serving.updates` feeds it decoded updates, the HTTP
handlers read :attr:`ModelRegistry.current`.

* **Immutable versions.** A :class:`ModelVersion` is never mutated once built. A delta is
  applied to a *copy* of the head model (the "shadow"); when every part of the version has
  been applied, the new object replaces the head by one reference assignment under a lock. A
  request reads ``registry.current`` once and scores with that object, so the version it
  reports is the version that scored, and no request ever sees a half-applied update.
* **One chain per lineage.** A delta is applied only on top of its ``base_version`` in the
  same ``model_id``. Anything else is rejected and asks for a re-sync (:class:`Decision`
  ``resync=True``): ``gap`` (base newer than the head: something was missed),
  ``out_of_order`` (base older than the head while the version is newer: a fork) and
  ``lineage`` (another learner). Versions not newer than the head are ``stale`` (replays after
  a seek, duplicates) and skipped without a re-sync.
* **Multi-part versions** are buffered until every part has arrived, then applied together.
* **K versions** (default 5) are kept for rollback; ``rollback`` pins a kept version (the
  stream keeps advancing the head underneath), ``unpin`` serves the head again.

>>> import numpy as np
>>> from ctr.online_learner.model import CTRModel, ModelConfig
>>> from ctr.online_learner.delta import snapshot_tensors
>>> from ctr.online_learner.update_format import UpdateHeader
>>> cfg = ModelConfig(("site",), table_bits=6)
>>> reg = ModelRegistry(keep=3)
>>> snap = UpdateHeader(kind="snapshot", model_id="m", version=1, base_version=1, model_config=cfg.to_dict())
>>> reg.install_snapshot(snap, snapshot_tensors(CTRModel(cfg))).version
1
>>> rows = {"table.ids": np.array([0], np.int64), "table.rows": np.zeros((1, 4), np.float32)}
>>> reg.offer(UpdateHeader(kind="delta", model_id="m", version=2, base_version=1), rows).outcome
'applied'
>>> d = reg.offer(UpdateHeader(kind="delta", model_id="m", version=4, base_version=3), rows)
>>> (d.outcome, d.reason, d.resync, reg.current.version)
('rejected', 'gap', True, 2)
"""

from __future__ import annotations

import copy
import json
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ctr.online_learner.delta import apply_tensors
from ctr.online_learner.encoding import EncodedBatch, FeatureEncoder
from ctr.online_learner.hashing import ValueKeyer
from ctr.online_learner.inference import NumpyForward
from ctr.online_learner.model import CTRModel, ModelConfig
from ctr.online_learner.update_format import GateDecision, UpdateError, UpdateHeader

__all__ = ["Decision", "ModelRegistry", "ModelVersion", "RegistryError", "score"]


class RegistryError(Exception):
    """An admin operation that cannot be done (unknown version, nothing to roll back to)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def _now_ms() -> int:
    return int(time.time() * 1000)


@torch.no_grad()
def score(model: CTRModel, enc: EncodedBatch) -> np.ndarray:
    """Click probabilities ``[B]`` (float32) of ``enc`` under ``model`` (CPU, eval mode).

    The same computation as ``OnlineCTR.predict_proba_many``: keys -> bucket ids -> logits ->
    sigmoid."""
    if len(enc) == 0:
        return np.zeros(0, dtype=np.float32)
    ids = model.bucket_ids(torch.from_numpy(enc.keys.view(np.int64)))
    numeric = torch.from_numpy(enc.numeric) if enc.numeric is not None else None
    return torch.sigmoid(model(ids, numeric)).numpy()


@dataclass(frozen=True, eq=False)
class ModelVersion:
    """One servable, immutable model version (never mutated after it is built)."""

    model_id: str
    version: int
    model: CTRModel
    config: ModelConfig
    encoder: FeatureEncoder
    #: How this version was built here: "snapshot" (loaded whole) or "delta" (applied on its base).
    source: str
    base_version: int
    created_ms: int
    event_time_ms: int
    examples_seen: int
    gate: GateDecision
    metrics: dict[str, float]
    #: Wall-clock ms when this replica made the version available.
    applied_ms: int
    parts: int = 1
    #: Wall-clock ms to build it here (copy + apply, or load).
    build_ms: float = 0.0
    #: Table rows this version changed from its base (a delta's row ids); None: any (a snapshot).
    touched: np.ndarray | None = None
    #: Table rows copied to build it here: those that may differ between the recycled model and
    #: the base, repeats included; -1 when the whole table was copied (or a deepcopy made).
    copied_rows: int = -1
    #: The inference forward over this version's parameters (built with the version, off the
    #: request path; the same computation as :func:`score`).
    forward: NumpyForward = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "forward", NumpyForward(self.model))

    def predict(self, enc: EncodedBatch) -> np.ndarray:
        """Click probabilities ``[B]`` of the encoded candidates ``enc``."""
        return self.forward(enc.keys, enc.numeric)

    @property
    def key(self) -> tuple[str, int]:
        return (self.model_id, self.version)

    def info(self, now_ms: int | None = None) -> dict[str, Any]:
        now_ms = _now_ms() if now_ms is None else now_ms
        return {
            "model_id": self.model_id,
            "version": self.version,
            "source": self.source,
            "base_version": self.base_version,
            "created_ms": self.created_ms,
            "event_time_ms": self.event_time_ms,
            "applied_ms": self.applied_ms,
            "age_s": round(max(0, now_ms - self.created_ms) / 1000, 3) if self.created_ms else None,
            "apply_lag_ms": (self.applied_ms - self.created_ms) if self.created_ms else None,
            "examples_seen": self.examples_seen,
            "parts": self.parts,
            "build_ms": round(self.build_ms, 2),
            "copied_rows": self.copied_rows,
            "gate": {"passed": self.gate.passed, "reason": self.gate.reason,
                     "window_auc": self.gate.window_auc, "served_auc": self.gate.served_auc},
        }


@dataclass(frozen=True)
class Decision:
    """What :meth:`ModelRegistry.offer` did with one update message.

    ``outcome``: ``applied`` | ``buffered`` (a part of an incomplete version) | ``skipped``
    (stale / duplicate / nothing to do) | ``announce`` (a newer snapshot file was announced) |
    ``rejected``. ``reason`` is a short label for metrics
    (``gap``, ``out_of_order``, ``lineage``, ``no_base``, ``snapshot``, ``incompatible``,
    ``incomplete``, ``stale``, ``duplicate_part``...). ``resync`` asks the caller to re-sync
    from the newest snapshot; ``snapshot_uri`` names one when the update announced it.
    """

    outcome: str
    reason: str = ""
    detail: str = ""
    resync: bool = False
    snapshot_uri: str = ""
    version: ModelVersion | None = None


@dataclass
class _Pending:
    header: UpdateHeader
    parts: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    headers: dict[int, UpdateHeader] = field(default_factory=dict)


def _config_key(config: ModelConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


_STATE: weakref.WeakKeyDictionary[CTRModel, list[torch.Tensor]] = weakref.WeakKeyDictionary()


def _tensors(model: CTRModel) -> list[torch.Tensor]:
    """Every parameter and buffer of ``model`` (the full state), in a fixed order.

    Listed once per model (a module walk per version build adds up): the entries are the
    parameter and buffer objects themselves (``keep_vars``), which stay valid when their data
    is overwritten in place, as every build here does."""
    got = _STATE.get(model)
    if got is None:
        got = _STATE[model] = list(model.state_dict(keep_vars=True).values())
    return got


def _touched_rows(parts: list[dict[str, np.ndarray]]) -> np.ndarray | None:
    """The table rows a version's parts write (None if a part carries the whole table)."""
    if any("table" in p for p in parts):
        return None
    ids = [p["table.ids"].astype(np.int64, copy=False) for p in parts if "table.ids" in p and len(p["table.ids"])]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def refresh_derived_state(model: CTRModel) -> None:
    """Recompute state derived from buffers that ``apply_tensors`` writes directly.

    ``apply_tensors`` copies ``gate.field_weights`` / ``gate.prior`` with ``copy_``, which skips
    ``FieldGate._load_from_state_dict`` and leaves the gate's "neutral prior" shortcut stale: a
    version whose field weights are not all 1 would be scored as if they were. Re-running the
    gate's own refresh (prior from the shipped weights) makes the served model equal the
    learner's. Harmless if ``apply_tensors`` is fixed to do it itself."""
    gate = getattr(model, "gate", None)
    refresh = getattr(gate, "_refresh_prior", None)
    if callable(refresh):
        with torch.no_grad():
            refresh()


class ModelRegistry:
    """The versions one replica holds; thread-safe (one writer: the update consumer; admin
    calls and readers from any thread).

    Args:
        keep: how many recent versions to keep for rollback (>= 1; the head counts).
        max_pending_parts_bytes: bound on buffered parts of an incomplete version.
        max_scattered_rows: see the attribute.
    """

    def __init__(
        self, keep: int = 5, max_pending_parts_bytes: int = 1 << 30, max_scattered_rows: float = 1 / 32
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.keep = keep
        self.max_pending_parts_bytes = max_pending_parts_bytes
        #: Above this fraction of the table's rows, a recycled model copies the whole table: a
        #: scattered row (gather + scatter) costs tens of rows of a sequential copy
        #: (``python -m bench.version_apply``).
        self.max_scattered_rows = max_scattered_rows
        self._lock = threading.RLock()
        #: What requests score with (head, or the pinned version). Read without the lock.
        self.current: ModelVersion | None = None
        #: Newest version built from the stream.
        self.head: ModelVersion | None = None
        self.pinned: ModelVersion | None = None
        self._history: OrderedDict[tuple[str, int], ModelVersion] = OrderedDict()
        #: Versions out of the kept window, their models reusable as shadows (see acquire).
        self._retired: list[ModelVersion] = []
        self.max_retired = 3
        self._inflight: dict[int, int] = {}
        self._pending: _Pending | None = None
        self._encoders: dict[str, FeatureEncoder] = {}
        self._last_encoder: FeatureEncoder | None = None
        self._keyer = ValueKeyer()
        #: Newest version seen on the stream per lineage (applied or not): "how far behind".
        self.newest_seen: dict[str, int] = {}
        #: Called with the new current version after every swap (freshness hooks, metrics).
        self.listeners: list[Callable[[ModelVersion], None]] = []
        self.swaps = 0
        #: (model_id, version) -> (base_version, rows it changed or None): what a recycled model
        #: lacks is the union over the versions after its own (see _rows_between).
        self._changes: OrderedDict[tuple[str, int], tuple[int, np.ndarray | None]] = OrderedDict()
        #: Where the models live. ``place`` is called with a snapshot's model once it is filled,
        #: ``clone`` makes a shadow when no retired model is free; a recycled model stays where it
        #: is (written in place). ``ctr serve --workers`` puts them in shared memory
        #: (:func:`ctr.serving.shared.share_model`, :func:`~ctr.serving.shared.shared_copy`).
        self.place: Callable[[CTRModel], None] | None = None
        self.clone: Callable[[CTRModel], CTRModel] = copy.deepcopy

    # -- building versions -----------------------------------------------------------------------
    def _encoder(self, config: ModelConfig) -> FeatureEncoder:
        # a delta's version shares its base's config object: found by identity, no key built
        # (serialising the config is most of what a version build spends in Python)
        same = self._last_encoder
        if same is not None and same.config is config:
            return same
        key = _config_key(config)
        enc = self._encoders.get(key)
        if enc is None:
            enc = self._encoders[key] = FeatureEncoder(config, self._keyer)
        self._last_encoder = enc
        return enc

    def _version(self, header: UpdateHeader, model: CTRModel, config: ModelConfig, source: str, t0: float,
                 parts: int = 1, touched: np.ndarray | None = None, copied_rows: int = -1) -> ModelVersion:
        if model.training:  # a recycled model is already in eval mode, without gradients
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        return ModelVersion(
            model_id=header.model_id, version=header.version, model=model, config=config,
            encoder=self._encoder(config), source=source, base_version=header.base_version,
            created_ms=header.created_ms, event_time_ms=header.event_time_ms, examples_seen=header.examples_seen,
            gate=header.gate, metrics=dict(header.metrics), applied_ms=_now_ms(), parts=parts,
            build_ms=(time.perf_counter() - t0) * 1000, touched=touched, copied_rows=copied_rows,
        )

    def build_snapshot(self, header: UpdateHeader, tensors: dict[str, np.ndarray]) -> ModelVersion:
        """A version from a full snapshot (header carries the model config). Raises UpdateError."""
        t0 = time.perf_counter()
        if header.kind != "snapshot":
            raise UpdateError(f"expected a snapshot, got a {header.kind}")
        if "table" not in tensors:
            raise UpdateError("snapshot without a table (an announcement, not the snapshot file?)")
        if not header.model_config:
            raise UpdateError("snapshot without model_config")
        try:
            config = ModelConfig.from_dict(header.model_config)
        except (TypeError, ValueError) as err:
            raise UpdateError(f"snapshot model_config: {err}") from None
        model = CTRModel(config)
        apply_tensors(model, tensors)
        refresh_derived_state(model)
        if self.place is not None:
            self.place(model)
        return self._version(header, model, config, "snapshot", t0)

    def _build_delta(self, base: ModelVersion, header: UpdateHeader, parts: list[dict[str, np.ndarray]],
                     spare: ModelVersion | None = None) -> ModelVersion:
        """Bring a shadow to ``base`` and apply the parts to it; ``base`` is untouched.

        The shadow is a retired version's model nobody holds (``spare``) or else a copy of the
        base (``clone``: a ``deepcopy``, whose Python-level walk and storage copies hold the GIL:
        requests in flight wait). A spare is some versions behind ``base``; the table rows that differ are the
        union of the rows those versions changed, so only they are copied (``index_copy_``),
        with the small dense tensors whole: a version costs what the stream changed, not the
        table size. Without that history (a snapshot in between, another lineage, history
        dropped) the whole table is copied (``copy_``, which releases the GIL)."""
        t0 = time.perf_counter()
        touched = _touched_rows(parts)
        copied = -1
        if spare is not None:
            shadow = spare.model
            rows = self._rows_between(spare, base)
            table = shadow.table
            if rows is not None and len(rows) > self.max_scattered_rows * table.shape[0]:
                rows = None  # that many scattered rows cost more than one sequential copy
            with torch.no_grad():
                for dst, src in zip(_tensors(shadow), _tensors(base.model), strict=True):
                    if rows is not None and dst is table:
                        idx = torch.from_numpy(rows).to(dst.device)
                        dst.index_copy_(0, idx, src.index_select(0, idx))
                    else:
                        dst.copy_(src)
            if rows is not None:
                copied = len(rows)
        else:
            shadow = self.clone(base.model)
        for tensors in parts:
            apply_tensors(shadow, tensors)  # validates each part before writing it
        refresh_derived_state(shadow)
        return self._version(header, shadow, base.config, "delta", t0, parts=len(parts), touched=touched,
                             copied_rows=copied)

    def _rows_between(self, old: ModelVersion, new: ModelVersion) -> np.ndarray | None:
        """Table rows that may differ between two versions of one lineage (``old`` older):
        the union of the rows every version after ``old`` up to ``new`` changed; None when
        the chain is not all deltas with known rows."""
        if old.model_id != new.model_id or old.config is not new.config or old.version >= new.version:
            return None
        rows: list[np.ndarray] = []
        version = new.version
        while version != old.version:
            change = self._changes.get((new.model_id, version))
            if change is None:
                return None
            version, touched = change
            if touched is None or version < old.version:
                return None
            rows.append(touched)
        # repeats are harmless (every copy of a row carries the same values) and cheaper than a sort
        return np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)

    # -- references held by requests, retired versions ---------------------------------------
    def acquire(self) -> ModelVersion | None:
        """The version to score a request with, counted as in use until :meth:`release`.

        A version that left the K kept ones is *retired*; its model is recycled as the shadow
        of a later version once no request holds it. So score through acquire/release (or only
        with ``current`` / kept versions), never with a version kept aside for long."""
        with self._lock:
            mv = self.current
            if mv is not None:
                self._inflight[id(mv)] = self._inflight.get(id(mv), 0) + 1
            return mv

    def hold(self, mv: ModelVersion) -> None:
        """Count ``mv`` as in use, as :meth:`acquire` does, until a matching :meth:`release`:
        a reader outside this registry (a worker process mapping its tensors) still reads it, so
        its model must not be recycled."""
        with self._lock:
            self._inflight[id(mv)] = self._inflight.get(id(mv), 0) + 1

    def release(self, mv: ModelVersion | None) -> None:
        if mv is None:
            return
        with self._lock:
            self._unhold(mv)

    def _unhold(self, mv: ModelVersion) -> bool:
        """One hold of ``mv`` fewer (call under the lock); True when none is left."""
        n = self._inflight.get(id(mv), 0) - 1
        if n > 0:
            self._inflight[id(mv)] = n
            return False
        self._inflight.pop(id(mv), None)
        return True

    def _retire(self, mv: ModelVersion) -> None:
        self._retired.append(mv)
        del self._retired[:-self.max_retired]

    def _take_spare(self, base: ModelVersion) -> ModelVersion | None:
        """A retired version of ``base``'s config that no request holds (call under the lock);
        the newest such, so the fewest rows differ from ``base``."""
        for i in range(len(self._retired) - 1, -1, -1):
            v = self._retired[i]
            if (v.config is base.config and not self._inflight.get(id(v)) and v is not self.current
                    and v is not self.pinned and v is not self.head):
                del self._retired[i]
                return v
        return None

    # -- swapping ---------------------------------------------------------------------------------
    def _install(self, mv: ModelVersion) -> None:
        """Make ``mv`` the head (and current unless pinned): one reference assignment each."""
        with self._lock:
            self._changes[mv.key] = (mv.base_version, mv.touched)
            while len(self._changes) > self.keep + self.max_retired + 2:
                self._changes.popitem(last=False)
            self.head = mv
            self._history[mv.key] = mv
            self._history.move_to_end(mv.key)
            while len(self._history) > self.keep:
                _, old = self._history.popitem(last=False)
                if old is not self.pinned:
                    self._retire(old)
            if self.pinned is None:
                self.current = mv
            current = self.current or mv
            self.swaps += 1
            self._note_seen(mv.model_id, mv.version)
        for fn in self.listeners:
            fn(current)

    def install_snapshot(self, header: UpdateHeader, tensors: dict[str, np.ndarray]) -> ModelVersion:
        """Load a snapshot as the new head (a re-sync or the initial load); drops pending parts."""
        mv = self.build_snapshot(header, tensors)
        with self._lock:
            self._pending = None
        # not under the lock: listeners run unlocked on every path (a listener may take locks of
        # its own, which would otherwise be ordered both ways); the update consumer is the only writer
        self._install(mv)
        return mv

    def _note_seen(self, model_id: str, version: int) -> None:
        if version > self.newest_seen.get(model_id, -1):
            self.newest_seen[model_id] = version

    # -- the stream -------------------------------------------------------------------------------
    def classify(self, header: UpdateHeader) -> Decision | None:
        """Decide from the header alone (no checksum, no tensors): a Decision when the message
        is skipped or rejected as it stands, None when it must be fully decoded and offered."""
        head = self.head
        self._note_seen(header.model_id, header.version)
        if header.kind == "snapshot":
            if head is not None and header.model_id == head.model_id and header.version <= head.version:
                return Decision("skipped", "stale", f"snapshot v{header.version} <= head v{head.version}")
            if header.snapshot_uri:
                why = "lineage" if head is not None and header.model_id != head.model_id else "snapshot"
                return Decision("announce", why, f"snapshot v{header.version} announced: re-sync from its file",
                                resync=True, snapshot_uri=header.snapshot_uri)
            return None  # an inline snapshot (tensors in the message)
        if head is None:
            return Decision("rejected", "no_base", f"delta v{header.version} but no model loaded", resync=True)
        if header.model_id != head.model_id:
            return Decision("rejected", "lineage",
                            f"delta of lineage {header.model_id!r}, serving {head.model_id!r}", resync=True)
        if header.version <= head.version:
            return Decision("skipped", "stale", f"delta v{header.version} <= head v{head.version}")
        if header.base_version > head.version:
            return Decision("rejected", "gap",
                            f"delta v{header.version} on base v{header.base_version}, head is v{head.version}",
                            resync=True)
        if header.base_version < head.version:
            return Decision("rejected", "out_of_order",
                            f"delta v{header.version} on base v{header.base_version}, head is v{head.version}",
                            resync=True)
        return None

    def offer(self, header: UpdateHeader, tensors: dict[str, np.ndarray]) -> Decision:
        """Apply one decoded (already checksum-validated) update message if it chains onto the head."""
        with self._lock:
            early = self.classify(header)
        if early is not None:
            return early
        if header.kind == "snapshot":
            try:
                mv = self.install_snapshot(header, tensors)
            except UpdateError as err:
                return Decision("rejected", "incompatible", str(err))
            return Decision("applied", "snapshot", version=mv)
        with self._lock:
            head = self.head
            assert head is not None
            pend = self._pending
            dropped = ""
            if pend is not None and pend.header.version != header.version:
                # Another version on the same base before this one completed: that one is lost.
                dropped = f" (dropped incomplete v{pend.header.version}: {len(pend.parts)}/{pend.header.parts} parts)"
                self._pending = pend = None
            if pend is None:
                pend = self._pending = _Pending(header)
            if header.parts != pend.header.parts:
                self._pending = None
                return Decision("rejected", "incompatible", f"v{header.version}: parts disagree on their count")
            if header.part in pend.parts:
                return Decision("skipped", "duplicate_part", f"v{header.version} part {header.part} again")
            pend.parts[header.part] = tensors
            pend.headers[header.part] = header
            if sum(t.nbytes for p in pend.parts.values() for t in p.values()) > self.max_pending_parts_bytes:
                self._pending = None
                return Decision("rejected", "too_large", f"v{header.version}: parts exceed the buffer bound")
            if len(pend.parts) < header.parts:
                return Decision("buffered", "part",
                                f"v{header.version}: {len(pend.parts)}/{header.parts} parts{dropped}")
            self._pending = None
            spare = self._take_spare(head)
        # Built outside the lock (requests acquire() under it); the update consumer is the only writer.
        try:
            mv = self._build_delta(head, pend.headers[0], [pend.parts[i] for i in range(header.parts)], spare)
        except UpdateError as err:
            return Decision("rejected", "incompatible", f"v{header.version}: {err}{dropped}")
        self._install(mv)
        return Decision("applied", "delta", dropped.strip(), version=mv)

    # -- admin ------------------------------------------------------------------------------------
    def kept(self) -> list[ModelVersion]:
        with self._lock:
            out = list(self._history.values())
            if self.pinned is not None and self.pinned.key not in self._history:
                out.insert(0, self.pinned)
            return out

    def rollback(self, version: int | None = None, model_id: str | None = None) -> ModelVersion:
        """Pin ``version`` (default: the kept version just before the one serving now)."""
        with self._lock:
            cur = self.current
            if cur is None:
                raise RegistryError("no model loaded", 503)
            kept = self.kept()
            if version is None:
                older = [v for v in kept if v.model_id == cur.model_id and v.version < cur.version]
                if not older:
                    raise RegistryError(f"no kept version older than v{cur.version} to roll back to "
                                        f"(kept: {[v.version for v in kept]})")
                target = max(older, key=lambda v: v.version)
            else:
                lineage = model_id or cur.model_id
                matches = [v for v in kept if v.version == version and v.model_id == lineage]
                if not matches:
                    raise RegistryError(f"version {version} of {lineage!r} is not kept here "
                                        f"(kept: {[v.version for v in kept]})", 404)
                target = matches[0]
            self.pinned = target
            self.current = target
            self.swaps += 1
        for fn in self.listeners:
            fn(target)
        return target

    def unpin(self) -> ModelVersion | None:
        """Serve the head again (no-op when nothing is pinned)."""
        with self._lock:
            self.pinned = None
            self.current = self.head
            self.swaps += 1
            mv = self.current
        if mv is not None:
            for fn in self.listeners:
                fn(mv)
        return mv

    def head_version(self) -> int | None:
        """The newest version built from the stream (None: nothing loaded)."""
        head = self.head
        return head.version if head is not None else None

    def learner_version(self) -> int | None:
        """The newest version seen on the stream of the head's lineage (applied or not)."""
        head = self.head
        return self.newest_seen.get(head.model_id, head.version) if head is not None else None

    def status(self) -> dict[str, Any]:
        now = _now_ms()
        with self._lock:
            cur, head, pinned = self.current, self.head, self.pinned
            newest = self.newest_seen.get(head.model_id, head.version) if head else None
            pend = self._pending
            return {
                "current": cur.info(now) if cur else None,
                "head_version": head.version if head else None,
                "pinned": pinned is not None,
                "pinned_version": pinned.version if pinned else None,
                "learner_version": newest,
                "versions_behind": (newest - head.version) if head and newest is not None else None,
                "kept": [v.version for v in self.kept()],
                "pending": {"version": pend.header.version, "parts": len(pend.parts), "of": pend.header.parts}
                if pend else None,
            }
