"""A replica's moving parts: registry, update consumer, feature cache, score log, readiness."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from typing import Any, Protocol

import msgspec
from threadpoolctl import threadpool_limits

from ctr.online_learner.signing import verifier_from
from ctr.serving.candidate_fields import CandidateFields
from ctr.serving.config import ServingConfig
from ctr.serving.features import (
    FeastProcessSource,
    FeastSource,
    FeatureCache,
    FeaturePlan,
    FeatureSource,
)
from ctr.serving.registry import ModelRegistry, ModelVersion
from ctr.serving.score_log import ScoreLog
from ctr.serving.updates import UpdateConsumer, load_newest_snapshot

log = logging.getLogger(__name__)


class UpdatesView(Protocol):
    """What a replica reads of the consumer of ``model-updates``: its own
    (:class:`~ctr.serving.updates.UpdateConsumer`) or, in a worker of ``ctr serve --workers``,
    the updater's as it last reported it."""

    state: str
    error: str | None

    @property
    def alive(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def stop(self) -> None: ...


class ServingState:
    """A replica's moving parts: registry, update consumer, feature cache, readiness.

    ``updates`` given: a worker of ``ctr serve --workers``, whose versions are applied by the
    updater process (``registry`` follows it); no consumer, no snapshot load here."""

    def __init__(self, config: ServingConfig, registry: ModelRegistry | None = None,
                 features: FeatureSource | None = None, updates: UpdatesView | None = None) -> None:
        self.config = config
        self.registry = registry or ModelRegistry(keep=config.keep_versions)
        self.updates: UpdatesView | None = updates
        self._follower = updates is not None
        self.cache: FeatureCache | None = None
        self.feature_error: str | None = None
        self.started_ms = int(time.time() * 1000)
        self.warm_version: tuple[str, int] | None = None
        self._plans: dict[int, tuple[Any, FeaturePlan]] = {}
        token = config.admin_token if config.admin_token is not None else os.environ.get("CTR_ADMIN_TOKEN", "")
        self.admin_token = token or None
        self._given_features = features
        self._source: FeatureSource | None = None
        self._threads: list[threading.Thread] = []
        self.registry.listeners.append(self._on_swap)
        # loaded up front: a missing or unreadable key fails the start, not the first update
        self.verifier = verifier_from(config.verify_keys)
        if self.verifier is not None:
            log.info("model updates must be signed by key %s", ", ".join(self.verifier.key_ids))
        self.score_log: ScoreLog | None = None

    # -- lifecycle
    def start(self) -> None:
        import torch

        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
            threadpool_limits(self.config.torch_threads)
        if self.registry.current is not None:
            self._warm(self.registry.current)
        if self._given_features is not None:
            self._install_features(self._given_features)
        else:
            t = threading.Thread(target=self._open_feast, name="feast-open", daemon=True)
            t.start()
            self._threads.append(t)
        cfg = self.config
        if cfg.bootstrap:
            self.score_log = ScoreLog(cfg.bootstrap)
        if self._follower:
            return
        if cfg.bootstrap:
            if self.verifier is None:
                log.warning("model updates are not verified: no --verify-key / $CTR_VERIFY_KEYS (any writer "
                            "of %s decides what is served)", cfg.topic)
            self.updates = UpdateConsumer(self.registry, cfg.bootstrap, topic=cfg.topic,
                                          snapshot_dir=cfg.snapshot_dir, verifier=self.verifier).start()
        elif cfg.snapshot_dir is not None:
            t = threading.Thread(target=self._load_static, name="snapshot-load", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        if self.updates is not None:
            self.updates.stop()
        if self.score_log is not None:
            self.score_log.close()
        if self.cache is not None:
            self.cache.stop()
        close = getattr(self._source, "close", None)
        if close is not None:
            close()

    def _install_features(self, source: FeatureSource) -> None:
        cfg = self.config
        self.cache = FeatureCache(source, enabled=cfg.feature_cache, ttl_s=cfg.cache_ttl_s,
                                  max_stale_s=cfg.cache_max_stale_s).start()

    def _open_feast(self) -> None:
        cfg = self.config
        try:
            kind = FeastProcessSource if cfg.feast_process else FeastSource
            self._source = kind(cfg.feast_dir, cfg.online, cfg.redis_url)
            self._install_features(self._source)
        except Exception as err:  # noqa: BLE001 - reported by /readyz
            log.exception("feature store failed to open")
            self.feature_error = f"{type(err).__name__}: {err}"

    def _load_static(self) -> None:
        load_newest_snapshot(self.registry, self.config.snapshot_dir, self.verifier)

    def _on_swap(self, mv: ModelVersion) -> None:
        if self.warm_version is None or self.warm_version[0] != mv.model_id:
            self._warm(mv)

    def _warm(self, mv: ModelVersion) -> None:
        """First scoring compiles/loads the Numba kernels (hashing, the request bytes pass): do
        it before reporting ready.

        Then ``gc.freeze()``: torch, FastAPI, pydantic and the model leave ~300k objects that
        every full collection would walk (a pause of hundreds of ms every few thousand
        requests); frozen, they are never scanned again (refcounting still frees them). And
        young collections run every ``gc_threshold`` allocations instead of every 700."""
        row = {"categorical": {"user_id": "warmup", "item_id": "warmup", "position": "0"}, "numeric": {}}
        mv.predict(mv.encoder.encode([row] * 4))
        CandidateFields(mv.config, ()).keys([msgspec.Raw(b'{"warmup": "x"}')])  # the request bytes pass
        gc.collect()
        gc.freeze()
        if self.config.gc_threshold:
            _, older, oldest = gc.get_threshold()
            gc.set_threshold(self.config.gc_threshold, older, oldest)
        self.warm_version = mv.key

    # -- helpers
    def plan(self, mv: ModelVersion) -> FeaturePlan:
        got = self._plans.get(id(mv.config))
        if got is None or got[0] is not mv.config:
            if len(self._plans) > 32:
                self._plans.clear()
            got = self._plans[id(mv.config)] = (mv.config, FeaturePlan.for_fields(mv.config.numeric_fields))
        return got[1]

    def readiness(self) -> tuple[bool, list[str]]:
        problems = []
        if self.registry.current is None:
            st = self.updates.status() if self.updates else {}
            problems.append(f"no model loaded yet ({st.get('state', 'no update consumer')}"
                            f"{': ' + st['stall_reason'] if st.get('stall_reason') else ''})")
        elif self.warm_version is None:
            problems.append("model warming up")
        if self.cache is None:
            problems.append(f"feature store not open: {self.feature_error}" if self.feature_error
                            else "feature store opening")
        elif not getattr(self._source, "healthy", True):
            problems.append(f"feature store worker restarting: {getattr(self._source, 'error', '')}")
        if self.updates is not None and not self.updates.alive:
            problems.append(f"update consumer stopped: {self.updates.error}")
        return not problems, problems

    def model_status(self) -> dict[str, Any]:
        reg = self.registry.status()
        cur = reg["current"] or {}
        return {
            "replica": self.config.replica_id,
            "model_id": cur.get("model_id"),
            "version": cur.get("version"),
            "age_s": cur.get("age_s"),
            "pinned": reg["pinned"],
            "head_version": reg["head_version"],
            "learner_version": reg["learner_version"],
            "versions_behind": reg["versions_behind"],
            "gate": cur.get("gate"),
            "event_time_ms": cur.get("event_time_ms"),
            "current": reg["current"],
            "kept": reg["kept"],
            "pending": reg["pending"],
            "updates": self.updates.status() if self.updates else None,
            "features": self.cache.status() if self.cache else None,
            "feature_source": self._source_status(),
            "worker": reg.get("worker"),
        }

    def _source_status(self) -> dict[str, Any] | None:
        src = self._source
        if src is None:
            return None
        if isinstance(src, FeastProcessSource):
            return {"kind": "worker process", "pid": src._proc.pid, "healthy": src.healthy,
                    "restarts": src.restarts, "error": src.error, "open_s": round(src.open_s, 1)}
        return {"kind": type(src).__name__, "healthy": True}
