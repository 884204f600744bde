"""``ctr learn``: the online trainer. Consumes ``training-examples`` in micro-batches,
predict-then-learn, publishes versions, checkpoints. Snapshots are published periodically and
on request (``kill -USR1 <learner pid>``, or ``Trainer.snapshot_requested.set()``).

Delivery and recovery (what is promised, and how):

* **Offsets live in the checkpoint, with the model.** Partitions are assigned manually and
  positioned from the checkpoint, never from the broker's committed offsets, so the model
  state and "what it has learned from" can never disagree. After ``kill -9`` the trainer
  reloads the newest checkpoint and re-reads from its offsets: examples after the checkpoint
  are learned again *into the restored model*, i.e. exactly once in the resulting model.
  (Offsets are also committed to the broker after each checkpoint, for lag monitoring only.)
* **Duplicates** (the upstream join is at-least-once) are recognised by ``example_id``: a
  bounded set of recently seen ids (part of the checkpoint) drops repeats before training.
* **Versions after a restart**: versions published after the last checkpoint may already be
  served; the trainer reads the newest version on ``model-updates`` and publishes a snapshot
  as the next version, so replicas re-sync instead of receiving a broken chain.
* Malformed examples go to the dead-letter topic; a bad field-weights message is dead-lettered
  too and the previous weights stay.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, Message, TopicPartition
from prometheus_client import Counter, Gauge

from ctr.infra.deadletter import DeadLetterSink
from ctr.infra.kafka_io import DeliveryTracker, make_consumer, make_producer, produce, stage_consumer
from ctr.infra.schema import (
    SchemaError,
    TrainingExample,
    decode_field_weights,
    decode_served_score,
    decode_training_example,
)
from ctr.infra.topics import EXAMPLES_TOPIC, FIELD_WEIGHTS_TOPIC, MODEL_UPDATES_TOPIC, SERVED_SCORES_TOPIC
from ctr.infra.validate import decode_batch
from ctr.online_learner.encoding import discover_fields
from ctr.online_learner.learner import OnlineCTR
from ctr.online_learner.metrics import ProgressiveMetrics
from ctr.online_learner.model import ModelConfig
from ctr.online_learner.outcomes import ArrivalLearner
from ctr.online_learner.publisher import Publisher, QualityGate
from ctr.online_learner.served import ServedQuality
from ctr.online_learner.signing import signer_from, strip
from ctr.online_learner.state_io import load_state, save_state
from ctr.online_learner.update_format import UpdateError, UpdateHeader, decode_header

log = logging.getLogger(__name__)

TRAINED = Counter("ctr_learner_examples_total", "Training examples learned from")
DUPLICATES = Counter("ctr_learner_duplicates_total", "Duplicate examples skipped (same example_id)")
PROGRESSIVE = Gauge("ctr_learner_progressive", "Progressive (predict-then-learn) metrics", ["metric"])
FIELD_WEIGHTS_VERSION = Gauge("ctr_learner_field_weights_version", "Version of the applied field weights")

#: appended to a correction's example id for deduplication (an id never contains it)
_CORRECTION = "\x1fclick"


class RecentIds:
    """The last ``capacity`` example ids (as 64-bit hashes), oldest evicted first."""

    def __init__(self, capacity: int = 1_000_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[int, None] = OrderedDict()

    @staticmethod
    def key(example_id: str) -> int:
        from ctr.online_learner.hashing import value_key

        return value_key(example_id)

    def add_new(self, example_id: str) -> bool:
        """True if ``example_id`` was not seen recently (and remember it)."""
        k = self.key(example_id)
        if k in self._ids:
            return False
        self._ids[k] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def to_array(self) -> np.ndarray:
        # int64 view: the update format carries signed integers only
        return np.fromiter(self._ids.keys(), dtype=np.uint64, count=len(self._ids)).view(np.int64)

    def load(self, arr: np.ndarray) -> None:
        self._ids = OrderedDict((int(k), None) for k in np.asarray(arr, dtype=np.int64).view(np.uint64))


#: What ``ctr learn`` builds on top of :class:`ModelConfig`'s defaults, from ``ctr bench quality``
#: on every log it runs (README, "Learner quality" and "Learner speed"):
#:
#: * prior_strength 0: the stream's field weights are received but not applied -- applied
#:   (0.5) they made log loss worse on every log;
#: * probes 1, no cross layers, no learned gate: together, two probes, the DCN-V2 cross network
#:   and the FinalMLP gate bought up to 0.004 log loss on one small log, less than 0.001 on the
#:   others, for four times the model step (``ctr bench ablation``).
DEFAULT_MODEL_OPTIONS: dict = {"table_bits": 18, "prior_strength": 0.0, "probes": 1, "cross_layers": 0, "gate": False}


@dataclass
class LoopClock:
    """Where the learner loop's time went since the last metrics row (each row carries it): a
    version that comes late because training was slow (``train_cpu_s`` near ``train_s``),
    because the process waited for a core (``train_s`` well above ``train_cpu_s``: other
    processes had it; the learner runs niced under ``ctr demo``/``ctr up``), or because of the
    rest of an iteration -- consuming, publishing, a checkpoint (``longest_iteration_s``, the
    whole loop body, well above the training).

    >>> clock = LoopClock()
    >>> clock.trained(0.25, 0.05)
    >>> clock.iterated(0.3)
    >>> clock.take()
    {'train_s': 0.25, 'train_cpu_s': 0.05, 'longest_iteration_s': 0.3}
    >>> clock.take()["train_s"]
    0.0
    """

    train_s: float = 0.0
    train_cpu_s: float = 0.0
    longest_iteration_s: float = 0.0

    def trained(self, wall_s: float, cpu_s: float) -> None:
        self.train_s += wall_s
        self.train_cpu_s += cpu_s

    def iterated(self, wall_s: float) -> None:
        self.longest_iteration_s = max(self.longest_iteration_s, wall_s)

    def take(self) -> dict[str, float]:
        """The totals since the last take, rounded; then zero."""
        out = {k: round(v, 4) for k, v in vars(self).items()}
        vars(self).update(dict.fromkeys(out, 0.0))
        return out


@dataclass
class TrainerConfig:
    bootstrap: str
    state_dir: Path
    batch_size: int = 2048
    max_latency_s: float = 0.1
    publish_interval_s: float = 1.0
    #: at stop, how long the last version may wait for the broker's acknowledgement
    final_ack_wait_s: float = 30.0
    checkpoint_interval_s: float = 10.0
    snapshot_interval_s: float = 60.0
    gate_margin: float = 0.02
    #: with no ``model``: build it from the fields of the first this-many examples, or of those
    #: that arrived within ``discover_wait_s`` of the first
    discover_examples: int = 1_000
    discover_wait_s: float = 5.0
    #: the gate compares AUCs once its window holds this many clicks (and non-clicks)
    gate_min_positives: int = 50
    fp16_deltas: bool = False
    dense_every: int = 1
    #: PEM file of the Ed25519 key every update is signed with (None: ``$CTR_SIGNING_KEY``,
    #: else unsigned); see ``ctr.online_learner.signing``
    signing_key: Path | None = None
    dedupe_capacity: int = 1_000_000
    metrics_window: int = 20_000
    #: the label join's attribution window: a first example's final label is known (no
    #: correction can follow) once the stream is this far past its impression
    window_ms: int = 30_000
    #: Score every batch with a frozen copy of the model taken after this many examples too
    #: (the demo's "what if we never refreshed" baseline); None = off.
    frozen_after_examples: int | None = None
    group_id: str = "ctr-learner"
    model_id: str = field(default_factory=lambda: f"ctr-{uuid.uuid4().hex[:8]}")
    #: The model; None = discover the fields from the first examples (every categorical and
    #: numeric field they carry, or exactly ``categorical`` / ``numeric`` where given) and
    #: build it with ``model_options``.
    model: ModelConfig | None = None
    categorical: tuple[str, ...] | None = None
    numeric: tuple[str, ...] | None = None
    #: the model ``ctr learn`` builds (``DEFAULT_MODEL_OPTIONS``; ``--model-option`` overrides)
    model_options: dict = field(default_factory=lambda: dict(DEFAULT_MODEL_OPTIONS))
    lr_table: float = 0.1
    lr_dense: float = 0.005
    seed: int = 0
    #: torch intra-op threads. 1 by default: the trainer shares the machine with the broker,
    #: the stream workers and serving, and under contention 2 threads ran the step several
    #: times slower than 1 (bench/learner.py).
    torch_threads: int = 1
    #: torch device of the model: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; None: CUDA when torch
    #: sees one (as :class:`OnlineCTR`), else the CPU
    device: str | None = None

    def model_for(self, impressions: Sequence) -> ModelConfig:
        """The model config: ``model`` if set, else one over the fields these impressions carry."""
        if self.model is not None:
            return self.model
        cat, num = discover_fields(impressions, self.categorical, self.numeric)
        return ModelConfig(cat, num, **self.model_options)

    def make_learner(self, model: ModelConfig) -> OnlineCTR:
        """The learner ``ctr learn`` trains (``bench/quality.py`` evaluates this same one)."""
        return OnlineCTR(
            model,
            lr_table=self.lr_table,
            lr_dense=self.lr_dense,
            seed=self.seed,
            num_threads=self.torch_threads,
            device=self.device,
        )


class Trainer:
    def __init__(self, config: TrainerConfig) -> None:
        self.cfg = config
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.state_dir / "checkpoint.ctru"
        self.metrics_path = self.state_dir / "learner_metrics.jsonl"
        self.producer = make_producer(config.bootstrap)
        self.tracker = DeliveryTracker()
        # loaded up front: a missing or wrong key fails the start, not the first publish
        self._signer = signer_from(config.signing_key)
        if self._signer is not None:
            log.info("signing model updates with key %s", self._signer.key_id.hex())
        self.dlq = DeadLetterSink(
            "learner", lambda t, k, v, h: produce(self.producer, t, v, k, self.tracker, headers=h)
        )
        # Built from the checkpoint, from ``config.model``, or from the first examples' fields.
        self.learner: OnlineCTR | None = None
        self.publisher: Publisher | None = None
        self.metrics = ProgressiveMetrics(window=config.metrics_window)
        self.frozen_metrics = ProgressiveMetrics(window=config.metrics_window)
        # Evaluation only: when examples carry the synthetic generator's true click probability,
        # score it like a model so reports can state the best achievable AUC. Never learned from.
        self.oracle_metrics = ProgressiveMetrics(window=config.metrics_window)
        # What serving actually predicted for these impressions (joined from served-scores), and
        # the frozen copy on the same examples: online quality, free of predict-then-learn bias.
        self.served = ServedQuality()
        self.served_metrics = ProgressiveMetrics(window=config.metrics_window)
        self.frozen_served_metrics = ProgressiveMetrics(window=config.metrics_window)
        # what serving served for those same impressions (the pair to compare: the frozen copy
        # exists only from its moment on)
        self.paired_served_metrics = ProgressiveMetrics(window=config.metrics_window)
        self.frozen: OnlineCTR | None = None
        # learns first examples and corrections as they arrive, and holds each first example
        # until its label is final (online_learner/outcomes.py); made with the model
        self.arrivals: ArrivalLearner | None = None
        self._corrections = 0  # restored from the checkpoint, handed to ``arrivals``
        self.seen = RecentIds(config.dedupe_capacity)
        self.offsets: dict[int, int] = {}
        self.field_weights_offset = 0
        self.field_weights_version = -1
        self.field_weights: dict[str, float] | None = None  # the newest, applied once a model exists
        self._first: list[TrainingExample] = []  # examples held until the model is built from their fields
        self._first_at = 0.0
        self.event_time_ms = 0
        self.duplicates = 0
        self.clock = LoopClock()
        self.model_id = config.model_id
        #: Set (SIGUSR1 under ``ctr learn``) to publish a snapshot at the next loop turn.
        self.snapshot_requested = threading.Event()
        self._restored_version = self._restore()
        if self.learner is None and (config.model is not None or None not in (config.categorical, config.numeric)):
            self._start_model(config.model_for(()))  # the fields are known without seeing data

    def _start_model(self, model: ModelConfig, state: dict | None = None) -> OnlineCTR:
        """Build the learner (and its arrivals and publisher); returns it."""
        self.learner = self.cfg.make_learner(model)
        self.arrivals = ArrivalLearner(self.learner, self.cfg.window_ms)
        self.arrivals.corrections = self._corrections
        if state is not None:
            self.learner.load_state_dict(state)
        elif self.field_weights is not None:
            self.learner.set_field_weights(self.field_weights)
        log.info(
            "model: %d categorical fields %s, %d numeric fields %s",
            len(model.categorical_fields),
            ",".join(model.categorical_fields),
            len(model.numeric_fields),
            ",".join(model.numeric_fields),
        )
        self.publisher = Publisher(
            self.producer,
            self.learner,
            model_id=self.model_id,
            snapshot_dir=self.state_dir / "snapshots",
            version=max(self._last_published_version(), self._restored_version),
            gate=QualityGate(self.cfg.gate_margin, self.cfg.gate_min_positives),
            fp16=self.cfg.fp16_deltas,
            dense_every=self.cfg.dense_every,
            signer=self._signer,
        )
        return self.learner

    # -- checkpoints ------------------------------------------------------------------------------
    def _restore(self) -> int:
        if not self.checkpoint_path.exists():
            return 0
        header, state = load_state(self.checkpoint_path)
        model = ModelConfig.from_dict(state["learner"]["config"])
        if self.cfg.model is not None and model != self.cfg.model:
            raise ValueError(f"checkpoint {self.checkpoint_path} was made with another model config")
        self._restored_version = header.version
        t = state["trainer"]
        self.offsets = {int(p): int(o) for p, o in t["offsets"].items()}
        self.field_weights_offset = int(t["field_weights_offset"])
        self.field_weights_version = int(t["field_weights_version"])
        self.event_time_ms = int(t["event_time_ms"])
        self.duplicates = int(t["duplicates"])
        self._corrections = int(t.get("corrections", 0))
        self.model_id = header.model_id
        self.seen.load(state["seen"])
        learner = self._start_model(model, state["learner"])
        log.info(
            "restored checkpoint v%d: %d examples, offsets %s", header.version, learner.examples_seen, self.offsets
        )
        return header.version

    def checkpoint(self) -> int:
        """Write model + optimizer + offsets + dedupe state atomically; returns bytes (0 before
        the first example: there is no model yet)."""
        if self.learner is None or self.publisher is None:
            return 0
        state = {
            "learner": self.learner.state_dict(),
            "trainer": {
                "offsets": {str(p): o for p, o in self.offsets.items()},
                "field_weights_offset": self.field_weights_offset,
                "field_weights_version": self.field_weights_version,
                "event_time_ms": self.event_time_ms,
                "duplicates": self.duplicates,
                "corrections": self.corrections,
            },
            "seen": self.seen.to_array(),
        }
        header = UpdateHeader(
            kind="snapshot",
            model_id=self.model_id,
            # the newest number possibly on the topic: the restored learner's snapshot goes above
            version=self.publisher.issued,
            base_version=self.publisher.issued,
            examples_seen=self.learner.examples_seen,
        )
        n = save_state(self.checkpoint_path, header, state)
        if self.offsets:  # visibility only: the checkpoint is the source of truth
            self._consumer.commit(
                offsets=[TopicPartition(EXAMPLES_TOPIC, p, o) for p, o in self.offsets.items()], asynchronous=True
            )
        return n

    def _last_published_version(self) -> int:
        """Newest version on model-updates (reads the tail; robust to brokers whose end offset
        points at the start of the last batch)."""
        c = make_consumer(self.cfg.bootstrap, f"{self.cfg.group_id}-tail")
        try:
            lo, hi = _watermarks_when_up(c, TopicPartition(MODEL_UPDATES_TOPIC, 0))
            if hi <= lo:
                return 0
            c.assign([TopicPartition(MODEL_UPDATES_TOPIC, 0, max(lo, hi - 200))])
            best, idle_since = 0, time.monotonic()
            while time.monotonic() - idle_since < 0.5:
                msgs = c.consume(500, 0.2)
                for m in msgs:
                    if m.error() is None:
                        idle_since = time.monotonic()
                        try:
                            best = max(best, decode_header(strip(m.value() or b"")).version)
                        except UpdateError:
                            pass
            return best
        finally:
            c.close()

    # -- the loop ---------------------------------------------------------------------------------
    def _assign(self) -> None:
        c = self._consumer
        parts = c.list_topics(EXAMPLES_TOPIC, timeout=10).topics[EXAMPLES_TOPIC].partitions
        assignment = [TopicPartition(EXAMPLES_TOPIC, p, self.offsets.get(p, OFFSET_BEGINNING)) for p in parts]
        assignment.append(TopicPartition(FIELD_WEIGHTS_TOPIC, 0, self.field_weights_offset or OFFSET_BEGINNING))
        # scores served from now on (they only feed metrics; older ones would have no example
        # left); a deployment without the topic simply has no served metrics
        if SERVED_SCORES_TOPIC in c.list_topics(timeout=10).topics:
            assignment.append(TopicPartition(SERVED_SCORES_TOPIC, 0, OFFSET_END))
        c.assign(assignment)

    def _apply_field_weights(self, msgs: Sequence[Message]) -> None:
        for m in msgs:
            offset = m.offset()
            assert offset is not None  # a consumed record has one
            self.field_weights_offset = offset + 1
            try:
                fw = decode_field_weights(m.value())
            except SchemaError as err:
                self.dlq.send(
                    str(err), m.value(), source_topic=FIELD_WEIGHTS_TOPIC, partition=m.partition(), offset=offset
                )
                continue
            if fw.version > self.field_weights_version:
                self.field_weights = fw.weights
                if self.learner is not None:
                    self.learner.set_field_weights(fw.weights)
                self.field_weights_version = fw.version
                FIELD_WEIGHTS_VERSION.set(fw.version)

    def _train(self, examples: Sequence[TrainingExample]) -> None:
        # a correction is the second example of its impression: deduplicated on its own
        fresh = [e for e in examples if self.seen.add_new(e.example_id + _CORRECTION if e.correction else e.example_id)]
        dup = len(examples) - len(fresh)
        if dup:
            self.duplicates += dup
            DUPLICATES.inc(dup)
        if self.learner is None:
            # The model learns the fields the first examples carry: wait for enough of them (a
            # first poll of a handful can miss a sparse field), then learn them all.
            if fresh and not self._first:
                self._first_at = time.monotonic()
            self._first.extend(fresh)
            waited = time.monotonic() - self._first_at
            if not self._first or (len(self._first) < self.cfg.discover_examples and waited < self.cfg.discover_wait_s):
                return
            fresh, self._first = self._first, []
            self._start_model(self.cfg.model_for([e.impression for e in fresh]))
            self._publish_first_snapshot()
        if not fresh:
            return
        assert self.learner is not None and self.publisher is not None
        n = len(fresh)
        enc = self.learner.encode([e.impression for e in fresh])
        first = np.fromiter((not e.correction for e in fresh), dtype=bool, count=n)
        fi = np.flatnonzero(first)
        firsts = [fresh[i] for i in fi]
        enc_first = enc if fi.size == n else enc.take(fi)
        # scored before learning the batch: what the served and the frozen model say
        gate = self.publisher.gate
        gate_p = self.publisher.served_proba(enc_first) if fi.size and gate.wants_batch() else None
        frozen_p = self.frozen.predict_proba_many(enc_first) if self.frozen is not None and fi.size else None
        idx, logged_p = self.served.take([e.example_id for e in firsts])
        served = np.full(len(firsts), np.nan)
        served[idx] = logged_p
        oracle = np.array([np.nan if e.impression.oracle_ctr is None else e.impression.oracle_ctr for e in firsts])
        nan = np.full(len(firsts), np.nan)
        assert self.arrivals is not None
        done = self.arrivals.learn(fresh, enc, served=served, frozen=nan if frozen_p is None else frozen_p,
                                   gate=nan if gate_p is None else gate_p, oracle=oracle)  # fmt: skip
        TRAINED.inc(n)
        if firsts:
            self.event_time_ms = max(self.event_time_ms, max(e.impression.event_time_ms for e in firsts))
        self._judge(done)
        if (  # after that many *final* labels: the calibration has learned from them too
            self.frozen is None
            and self.cfg.frozen_after_examples is not None
            and self.metrics.count >= self.cfg.frozen_after_examples
        ):
            self.frozen = OnlineCTR.from_state_dict(self.learner.state_dict(), device=self.learner.device)

    def _judge(self, done: dict[str, np.ndarray] | None) -> None:
        """First examples with their final labels: the metrics and the gate judge the scores
        they were given (the calibration has learned them already, in ``arrivals``)."""
        if done is None:
            return
        assert self.publisher is not None
        y = done["label"]
        self.metrics.update(y, done["p"])
        for metrics, col in ((self.frozen_metrics, "frozen"), (self.served_metrics, "served"),
                             (self.oracle_metrics, "oracle")):  # fmt: skip
            m = ~np.isnan(done[col])
            if m.any():
                metrics.update(y[m], done[col][m])
        m = ~np.isnan(done["served"]) & ~np.isnan(done["frozen"])
        if m.any():
            self.frozen_served_metrics.update(y[m], done["frozen"][m])
            self.paired_served_metrics.update(y[m], done["served"][m])
        m = ~np.isnan(done["gate"])
        if m.any():
            self.publisher.gate.observe(y[m].astype(np.float32), done["p"][m], done["gate"][m])

    def _served_summary(self) -> dict:
        m, f = self.served_metrics, self.frozen_served_metrics
        out = {
            "served_examples": m.count,
            "served_auc": _round(m.auc()),
            "served_log_loss": _round(m.log_loss()),
            "served_window_auc": _round(m.window_auc()),
            "served_window_log_loss": _round(m.window_log_loss()),
        }
        if f.count:
            live = self.paired_served_metrics
            out.update(frozen_served_auc=_round(f.auc()), frozen_served_log_loss=_round(f.log_loss()),
                       paired_served_auc=_round(live.auc()), paired_served_log_loss=_round(live.log_loss()),
                       paired_served_examples=live.count)  # fmt: skip
        return out

    def _apply_served_scores(self, msgs: Sequence[Message]) -> None:
        for m in msgs:
            try:
                s = decode_served_score(m.value())
            except SchemaError as err:
                self.dlq.send(
                    str(err), m.value(), source_topic=SERVED_SCORES_TOPIC, partition=m.partition(), offset=m.offset()
                )
                continue
            self.served.add(s.impression_id, s.p_click)

    @property
    def corrections(self) -> int:
        return self.arrivals.corrections if self.arrivals is not None else self._corrections

    @property
    def examples_seen(self) -> int:
        """Impressions learned (their first examples; corrections not counted)."""
        return self.learner.examples_seen - self.corrections if self.learner is not None else 0

    def _publish_first_snapshot(self) -> None:
        assert self.publisher is not None
        self._record(
            self.publisher.publish_snapshot(
                event_time_ms=self.event_time_ms, metrics=self.metrics.summary(), new_version=True
            )
        )

    def _record(self, event: dict) -> None:
        summary = self.metrics.summary()
        for k in ("auc", "window_auc", "log_loss", "window_log_loss", "calibration"):
            PROGRESSIVE.labels(k).set(summary[k])
        row = {
            "wall_ms": int(time.time() * 1000),
            "event_time_ms": self.event_time_ms,
            "examples": self.examples_seen,
            "corrections": self.corrections,
            "held": len(self.arrivals.held) if self.arrivals is not None else 0,
            "duplicates": self.duplicates,
            "field_weights_version": self.field_weights_version,
            **event,
            **{k: (None if not np.isfinite(v) else round(float(v), 6)) for k, v in summary.items()},
            **self.clock.take(),
        }
        if self.learner is not None:
            # the calibration's trust in the network's score (a) and its offset (b): how much of
            # a published version's move comes from the features rather than the base rate
            a, b = self.learner.model.calibration.coefficients()
            row["calibration_a"], row["calibration_b"] = round(a, 5), round(b, 5)
        if self.oracle_metrics.count:
            row["oracle_window_auc"] = _round(self.oracle_metrics.window_auc())
            row["oracle_auc"] = _round(self.oracle_metrics.auc())
            row["oracle_window_log_loss"] = _round(self.oracle_metrics.window_log_loss())
        if self.served_metrics.count:
            row.update(self._served_summary())
        if self.frozen is not None:
            row["frozen_window_auc"] = _round(self.frozen_metrics.window_auc())
            row["frozen_auc"] = _round(self.frozen_metrics.auc())
            row["frozen_window_log_loss"] = _round(self.frozen_metrics.window_log_loss())
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def run(
        self, stop: threading.Event | None = None, max_examples: int | None = None, idle_exit_s: float | None = None
    ) -> dict:
        """Train until ``stop`` is set, ``max_examples`` are learned, or no example arrived
        for ``idle_exit_s``. Returns the final metrics summary."""
        stop = stop or threading.Event()
        cfg = self.cfg
        self._consumer = stage_consumer(cfg.bootstrap, cfg.group_id)
        self._assign()
        if self.publisher is not None:
            self._publish_first_snapshot()
        now = time.monotonic()
        next_publish, next_ckpt = now + cfg.publish_interval_s, now + cfg.checkpoint_interval_s
        next_snapshot, last_data = now + cfg.snapshot_interval_s, now
        try:
            while not stop.is_set():
                started = time.perf_counter()
                msgs = [m for m in self._consumer.consume(cfg.batch_size, cfg.max_latency_s) if m.error() is None]
                weights = [m for m in msgs if m.topic() == FIELD_WEIGHTS_TOPIC]
                if weights:
                    self._apply_field_weights(weights)
                scores = [m for m in msgs if m.topic() == SERVED_SCORES_TOPIC]
                if scores:
                    self._apply_served_scores(scores)
                batch = [m for m in msgs if m.topic() == EXAMPLES_TOPIC]
                t_train, cpu_train = time.perf_counter(), time.thread_time()
                if batch:
                    self._train(decode_batch(batch, decode_training_example, self.dlq))
                    for m in batch:
                        p, off = m.partition(), m.offset()
                        assert p is not None and off is not None  # a consumed record has both
                        self.offsets[p] = off + 1
                    last_data = time.monotonic()  # after training: the first step JIT-compiles
                self.clock.trained(time.perf_counter() - t_train, time.thread_time() - cpu_train)
                now = time.monotonic()
                if self.publisher is None:  # no model yet, so nothing to publish or save
                    if self._first:
                        self._train([])  # builds the model once the first examples waited enough
                    if self.publisher is None:
                        if idle_exit_s is not None and now - last_data > idle_exit_s:
                            break
                        continue
                assert self.learner is not None  # made with the publisher (_start_model)
                if not self.publisher.settled:  # a version waits for the broker (an outage)
                    waiting = self.publisher.pending
                    if self.publisher.settle(0.0) and waiting is not None:
                        self._record({"published": True, "version": waiting.version, "acknowledged_late": True,
                                      "waited_s": round(time.perf_counter() - waiting.t0, 2)})  # fmt: skip
                if now >= next_publish:
                    next_publish = now + cfg.publish_interval_s
                    rec = self.publisher.publish_delta(event_time_ms=self.event_time_ms, metrics=self.metrics.summary())
                    if rec is not None:
                        self._record(rec)
                if now >= next_snapshot or self.snapshot_requested.is_set():
                    # a snapshot must equal a published version: ship pending rows first
                    if self.learner.touched.peek().size:
                        rec = self.publisher.publish_delta(
                            event_time_ms=self.event_time_ms, metrics=self.metrics.summary()
                        )
                        if rec is not None:
                            self._record(rec)
                    # else the gate withheld it, or the broker has not acknowledged it: try later
                    if self.learner.touched.peek().size == 0 and self.publisher.settled:
                        next_snapshot = now + cfg.snapshot_interval_s
                        self.snapshot_requested.clear()
                        self._record(
                            self.publisher.publish_snapshot(
                                event_time_ms=self.event_time_ms, metrics=self.metrics.summary(), new_version=False
                            )
                        )
                if now >= next_ckpt:
                    next_ckpt = now + cfg.checkpoint_interval_s
                    self.checkpoint()
                self.clock.iterated(time.perf_counter() - started)
                if max_examples is not None and self.examples_seen >= max_examples:
                    break
                if idle_exit_s is not None and now - last_data > idle_exit_s:
                    break
            if self._first:  # stopping before the model was built: build it, learn what waited
                self._first_at = -math.inf
                self._train([])
            if self.publisher is not None:
                # the labels still held count in the metrics; the model does not learn them (if the
                # stream goes on, a correction may still come for them)
                self._judge(self.arrivals.drain() if self.arrivals is not None else None)
                rec = self.publisher.publish_delta(event_time_ms=self.event_time_ms, metrics=self.metrics.summary())
                if rec is not None:
                    self._record(rec)
                if not self.publisher.settle(cfg.final_ack_wait_s):
                    log.error("stopping with version %d unacknowledged after %.0fs: the checkpoint keeps its "
                              "rows, and a restart publishes a snapshot above it", self.publisher.issued,
                              cfg.final_ack_wait_s)  # fmt: skip
            self.checkpoint()
        finally:
            self._consumer.close()
            self.producer.flush(10)
        return {
            **self.metrics.summary(),
            "examples": self.examples_seen,
            "corrections": self.corrections,
            "duplicates": self.duplicates,
            "version": self.publisher.version if self.publisher is not None else 0,
            "withheld": self.publisher.withheld if self.publisher is not None else 0,
            "undecided": self.publisher.undecided if self.publisher is not None else 0,
            **(self._served_summary() if self.served_metrics.count else {}),
            "dead_letters": self.dlq.count,
        }


def _round(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 6)


def _watermarks_when_up(consumer: Consumer, tp: TopicPartition, patience_s: float = 120.0) -> tuple[int, int]:
    """``tp``'s watermark offsets, waiting (with backoff) while the broker is down: a learner
    restarted during a broker outage resumes when the broker is back instead of exiting."""
    deadline, wait = time.monotonic() + patience_s, 0.5
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=10)
        except KafkaException as err:
            if time.monotonic() + wait > deadline:
                raise
            log.warning("broker not answering (%s); retrying in %.1fs", err, wait)
            time.sleep(wait)
            wait = min(wait * 2, 8.0)


def run_trainer(
    config: TrainerConfig,
    *,
    metrics_port: int | None = None,
    max_examples: int | None = None,
    idle_exit_s: float | None = None,
) -> dict:
    """Entry point of ``ctr learn``: SIGTERM/SIGINT stop it cleanly (final publish + checkpoint)."""
    import signal

    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=os.environ.get("CTR_BIND", "127.0.0.1"))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    trainer = Trainer(config)
    # `kill -USR1 <pid>`: a snapshot on request (e.g. before adding serving replicas)
    signal.signal(signal.SIGUSR1, lambda *_: trainer.snapshot_requested.set())
    return trainer.run(stop, max_examples=max_examples, idle_exit_s=idle_exit_s)
