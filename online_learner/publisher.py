"""Publishing refreshed weights: versions, the quality gate, deltas and snapshots.

Every publish interval the learner ships the embedding rows touched since the last version
plus the dense weights as version ``v`` on top of ``base_version = v - 1``. A serving replica
applies a version only on top of its base, so versions form one chain; anything else makes
it re-sync from the newest snapshot. Snapshots are full model files written atomically to
the snapshot directory and announced on the topic (a one-line message with their path), so
a new replica starts from a file and catches up from the topic.

**Quality gate** (after Alibaba Alink's AUC-gated model release, but champion/challenger on
the same examples): the publisher keeps a copy of the *served* model, maintained by applying
its own deltas (the same code serving runs). A sample of training batches is scored by both
models before the live one learns from them; a version is withheld when the live model's AUC
on those examples is more than ``margin`` below the served model's, or when the live model
has non-finite weights. Withheld rows are not lost: they stay in the touched set and ship
with the next version that passes. Comparing on the same examples (instead of against a
number recorded earlier) keeps the gate from blocking exactly when a drift makes every
model's AUC fall.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import torch
from confluent_kafka import Producer
from prometheus_client import Counter, Gauge, Histogram

from ctr.infra.kafka_io import DeliveryTracker, produce
from ctr.infra.topics import MODEL_UPDATES_TOPIC
from ctr.online_learner.delta import apply_tensors, delta_tensors, snapshot_tensors
from ctr.online_learner.encoding import EncodedBatch
from ctr.online_learner.learner import OnlineCTR
from ctr.online_learner.metrics import roc_auc
from ctr.online_learner.signing import UpdateSigner
from ctr.online_learner.state_io import atomic_write
from ctr.online_learner.update_format import GateDecision, UpdateHeader, encode_update, split_delta

log = logging.getLogger(__name__)

VERSION = Gauge("ctr_learner_published_version", "Newest model version published")
PUBLISH_BYTES = Counter("ctr_learner_publish_bytes_total", "Bytes published to model-updates", ["kind"])
PUBLISH_SECONDS = Histogram(
    "ctr_learner_publish_seconds",
    "Time to publish one version (acked)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
GATE = Counter("ctr_learner_gate_decisions_total", "Quality gate decisions", ["decision"])


@dataclass
class QualityGate:
    """Withhold a version whose AUC on recent examples trails the served model's by > margin.

    Both models score the same sampled examples (the live model progressively, before it
    learns them). At a 0.3 % click rate a window of a thousand examples holds three clicks,
    and an AUC on three clicks decides nothing, so the window is not a fixed count: it grows
    across publishes until it holds ``min_positives`` clicks and as many non-clicks, then
    decides and starts afresh. A version published before that passes *undecided*
    (``GateDecision.decided`` is False; the publisher counts them).
    """

    margin: float = 0.02
    min_positives: int = 50
    sample_every: int = 4
    _y: list[np.ndarray] = field(default_factory=list)
    _live: list[np.ndarray] = field(default_factory=list)
    _served: list[np.ndarray] = field(default_factory=list)
    _batches: int = 0

    def wants_batch(self) -> bool:
        self._batches += 1
        return self.sample_every > 0 and self._batches % self.sample_every == 0

    def observe(self, y: np.ndarray, live_p: np.ndarray, served_p: np.ndarray) -> None:
        self._y.append(np.asarray(y))
        self._live.append(np.asarray(live_p))
        self._served.append(np.asarray(served_p))

    def decide(self, live_finite: bool = True) -> GateDecision:
        """Decide on the window when it holds enough of both classes (and then start a new
        one); otherwise pass undecided and keep the window growing."""
        if not live_finite:
            return GateDecision(passed=False, reason="live model has non-finite weights")
        y = np.concatenate(self._y) if self._y else np.zeros(0)
        positives = int(y.sum())
        negatives = len(y) - positives
        if min(positives, negatives) < self.min_positives:
            return GateDecision(
                passed=True,
                decided=False,
                reason=f"undecided: {positives} clicks / {negatives} non-clicks in the window "
                f"(needs {self.min_positives} of each)",
            )
        live, served = roc_auc(y, np.concatenate(self._live)), roc_auc(y, np.concatenate(self._served))
        self.reset()
        passed = live >= served - self.margin
        reason = (
            f"live AUC {live:.4f} vs served {served:.4f} on {len(y)} examples, {positives} clicks"
            f" (margin {self.margin})"
        )
        return GateDecision(passed=bool(passed), reason=reason, window_auc=float(live), served_auc=float(served))

    def reset(self) -> None:
        self._y, self._live, self._served = [], [], []


@dataclass
class _Unacked:
    """A version on its way to the broker: its bytes, and what publishing it changes here."""

    version: int
    parts: list[bytes]
    commit: Callable[[], None]
    t0: float
    attempts: int = 0
    tracker: DeliveryTracker = field(default_factory=DeliveryTracker)


class Publisher:
    """Turns the learner's state into versions on ``model-updates`` and snapshot files.

    A version number is consumed only when the broker acknowledged every part of it: during a
    broker outage the version waits (re-sent, same bytes, if a part fails), nothing newer is
    built, and the learner learns on; the rows it learns go into the next version."""

    def __init__(
        self,
        producer: Producer,
        learner: OnlineCTR,
        *,
        model_id: str,
        snapshot_dir: Path,
        version: int = 0,
        gate: QualityGate | None = None,
        fp16: bool = False,
        dense_every: int = 1,
        topic: str = MODEL_UPDATES_TOPIC,
        keep_snapshots: int = 5,
        ack_wait_s: float = 2.0,
        signer: UpdateSigner | None = None,
    ) -> None:
        self.producer, self.learner, self.model_id = producer, learner, model_id
        #: signs every message and snapshot file (None: unsigned, as before signing existed)
        self.signer = signer
        self.snapshot_dir = Path(snapshot_dir)
        self.version = version
        self.gate = gate or QualityGate()
        self.fp16, self.dense_every, self.topic, self.keep_snapshots = fp16, dense_every, topic, keep_snapshots
        self.tracker = DeliveryTracker()
        self.served = copy.deepcopy(learner.model).eval()
        self.last_decision = GateDecision(passed=True, reason="initial")
        self.withheld = 0
        #: versions published before the gate's window held enough clicks to compare
        self.undecided = 0
        #: the version sent and not yet acknowledged (at most one)
        self.pending: _Unacked | None = None
        self.ack_wait_s = ack_wait_s

    # -- the served copy, for the gate --------------------------------------------------------
    @torch.no_grad()
    def served_proba(self, enc: EncodedBatch) -> np.ndarray:
        ids, numeric = self.learner._inputs(enc)
        return torch.sigmoid(self.served(ids, numeric)).cpu().numpy()

    def _live_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.learner.model.parameters())

    # -- delivery: a version counts once the broker acknowledged all of it ------------------------
    @property
    def settled(self) -> bool:
        """No version is waiting for its acknowledgement."""
        return self.pending is None

    @property
    def issued(self) -> int:
        """The newest version number that may be on the topic (sent, acknowledged or not): a
        learner restored from a checkpoint must publish above it."""
        return self.version if self.pending is None else self.pending.version

    def _send(self, pending: _Unacked) -> None:
        pending.tracker = DeliveryTracker()
        pending.attempts += 1
        for part in pending.parts:
            produce(self.producer, self.topic, part, None, pending.tracker)

    def settle(self, wait_s: float | None = None) -> bool:
        """Wait up to ``wait_s`` (default :attr:`ack_wait_s`) for the pending version's
        acknowledgement; commit it when it comes. A part the broker refused (or that timed out
        in the client) is sent again, the same bytes: the version stays the same version and a
        replica that already has it skips the copy. Returns :attr:`settled`."""
        pending = self.pending
        if pending is None:
            return True
        tracker = pending.tracker
        if tracker.failed:
            log.warning("version %d not acknowledged (%s); sending it again (attempt %d)", pending.version,
                        tracker.errors[:1], pending.attempts + 1)  # fmt: skip
            self._send(pending)
            tracker = pending.tracker
        self.producer.flush(self.ack_wait_s if wait_s is None else wait_s)
        if tracker.delivered < len(pending.parts):
            return False
        self.pending = None
        pending.commit()
        self.version = pending.version
        VERSION.set(self.version)
        PUBLISH_SECONDS.observe(time.perf_counter() - pending.t0)
        return True

    def _publish(self, version: int, parts: list[bytes], commit: Callable[[], None], record: dict) -> dict:
        """Send ``parts`` as ``version``; the version number is consumed (``self.version``) and
        ``commit`` runs only once every part is acknowledged. Until then nothing newer is
        published and the learner learns on (rows learned meanwhile go into the next version)."""
        pending = _Unacked(version, parts, commit, time.perf_counter())
        self.pending = pending
        self._send(pending)
        if not self.settle():
            log.warning("version %d sent, not acknowledged within %.1fs: the broker is slow or away; "
                        "publishing waits for it", version, self.ack_wait_s)  # fmt: skip
            return {**record, "published": False, "pending": version, "version": self.version}
        return {**record, "published": True, "version": version,
                "publish_ms": round((time.perf_counter() - pending.t0) * 1000, 2)}  # fmt: skip

    def _waiting(self) -> dict | None:
        """None once no version is waiting; else what to report while one is."""
        if self.settle(0.0):
            return None
        p = self.pending
        assert p is not None
        return {"published": False, "pending": p.version, "version": self.version,
                "waiting_s": round(time.perf_counter() - p.t0, 1)}  # fmt: skip

    def publish_delta(self, *, event_time_ms: int, metrics: dict[str, float]) -> dict | None:
        """Gate, then publish the touched rows (+ dense weights) as the next version.

        Returns a record of what happened (for logs and the report), or None when nothing
        changed since the last version. While the previous version waits for its
        acknowledgement (a broker outage), nothing new is built: the record says so."""
        waiting = self._waiting()
        if waiting is not None:
            return waiting
        touched = self.learner.touched.peek()
        if touched.size == 0:
            return None
        decision = self.gate.decide(self._live_finite())
        self.last_decision = decision
        GATE.labels("pass" if decision.passed else "withhold").inc()
        if not decision.passed:
            self.withheld += 1
            log.warning("quality gate withheld version %d: %s", self.version + 1, decision.reason)
            return {"published": False, "version": self.version, "gate": decision.reason}
        if not decision.decided:
            self.undecided += 1
        # The rows leave the touched set now: from here they live in this version's bytes, which
        # are re-sent until acknowledged (a crash before that restarts from the checkpoint,
        # whose model holds them, and publishes a snapshot).
        touched = self.learner.take_touched()
        version = self.version + 1
        with_dense = version % self.dense_every == 0
        tensors = delta_tensors(self.learner.model, touched, with_dense=with_dense, fp16=self.fp16)
        header = UpdateHeader(
            kind="delta", model_id=self.model_id, version=version, base_version=version - 1,
            event_time_ms=event_time_ms, metrics=_finite(metrics), gate=decision,
            examples_seen=self.learner.examples_seen,
        )  # fmt: skip
        parts = [self._signed(p) for p in split_delta(header, tensors)]
        nbytes = sum(len(p) for p in parts)
        PUBLISH_BYTES.labels("delta").inc(nbytes)

        def commit() -> None:
            # the served copy now equals what every replica will hold at this version
            rows = {k: v.astype(np.float32) if k == "table.rows" else v for k, v in tensors.items()}
            apply_tensors(self.served, rows)

        record = {"rows": int(touched.size), "parts": len(parts), "bytes": nbytes, "with_dense": with_dense,
                  "gate": decision.reason}  # fmt: skip
        return self._publish(version, parts, commit, record)

    def publish_snapshot(self, *, event_time_ms: int, metrics: dict[str, float], new_version: bool) -> dict:
        """Write the whole model as a snapshot file and announce it on the topic.

        ``new_version=True`` makes it a new version (used at start-up and after a restore, so
        replicas holding newer-numbered versions from before a crash re-sync); otherwise it
        snapshots the current version, which must equal the last published (acknowledged)
        state."""
        t0 = time.perf_counter()
        if new_version:
            waiting = self._waiting()
            if waiting is not None:
                return waiting
            self.learner.take_touched()  # the snapshot carries every row
            version = self.version + 1
        elif self.learner.touched.peek().size or not self.settled:
            raise RuntimeError("snapshot of an unpublished state: publish the delta (and settle it) first")
        else:
            version = self.version
        header = UpdateHeader(
            kind="snapshot",
            model_id=self.model_id,
            version=version,
            base_version=version,
            event_time_ms=event_time_ms,
            metrics=_finite(metrics),
            examples_seen=self.learner.examples_seen,
            model_config=self.learner.config.to_dict(),
        )
        data = self._signed(encode_update(header, snapshot_tensors(self.learner.model)))
        path = self.snapshot_dir / f"snapshot-{version:012d}.ctru"
        atomic_write(path, data)
        PUBLISH_BYTES.labels("snapshot").inc(len(data))
        self._prune()
        announce = self._signed(encode_update(msgspec.structs.replace(header, snapshot_uri=str(path.resolve())), {}))
        state = copy.deepcopy(self.learner.model.state_dict()) if new_version else None

        def commit() -> None:
            if state is not None:
                self.served.load_state_dict(state)

        record = {"snapshot": str(path), "bytes": len(data)}
        out = self._publish(version, [announce], commit, record)
        out.setdefault("publish_ms", round((time.perf_counter() - t0) * 1000, 2))
        return out

    def _signed(self, update: bytes) -> bytes:
        return self.signer.sign(update) if self.signer is not None else update

    def _prune(self) -> None:
        files = sorted(self.snapshot_dir.glob("snapshot-*.ctru"))
        for old in files[: -self.keep_snapshots]:
            old.unlink(missing_ok=True)


def latest_snapshot(snapshot_dir: Path) -> Path | None:
    files = sorted(Path(snapshot_dir).glob("snapshot-*.ctru"))
    return files[-1] if files else None


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
