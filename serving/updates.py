"""The background consumer of ``model-updates``: applies versions to the registry, re-syncs.

One daemon thread per replica owns a confluent-kafka consumer with the topic's single
partition assigned manually (no group join: every replica reads every update, and nothing is
committed; a replica's position is derived from the snapshot it loads). When caught up it
stops fetching and polls the end offset every ``idle_poll_s`` (50 ms) instead: the embedded
broker does not hold empty fetches, and an idle assigned consumer would spin a core.

* **Start**: load the newest snapshot file of ``snapshot_dir`` (validated whole by
  ``decode_update``), then position the consumer at the first message produced at or after
  that snapshot's ``created_ms`` (``offsets_for_times``, minus a margin): every delta on top
  of the snapshot is replayed, older ones are skipped from their header alone. Without a
  snapshot the consumer reads the topic from the beginning and waits for the learner's
  snapshot announcement.
* **Each message**: with a verifier, its signature is checked first (``signing``: refused and
  counted by reason when unsigned, from an unknown key, wrongly signed or tampered); then
  ``decode_header`` (cheap) lets the registry skip stale messages without
  hashing them; anything else is validated whole (``decode_update``: checksum, dtypes,
  shapes) and offered to :class:`~ctr.serving.registry.ModelRegistry`, which applies it to a
  shadow copy and swaps it in, or rejects it.
* **Re-sync** (a gap, an out-of-order/forked delta, another lineage, an incomplete multi-part
  version, or a snapshot announced newer than the head): load the announced file, else the
  newest snapshot of ``snapshot_dir``; if it is newer than the head, install it and seek back
  to it as at start. If nothing newer exists the replica keeps serving its head
  (``state="stalled"``), rejects updates that do not chain, and looks again every
  ``retry_s`` -- the learner's next snapshot (periodic, or the one it publishes after a
  restart) ends the stall.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, KafkaException, TopicPartition
from prometheus_client import Counter, Histogram

from ctr.infra.kafka_io import PacedConsumer, make_consumer, offset_of
from ctr.infra.topics import MODEL_UPDATES_TOPIC
from ctr.online_learner.signing import ENVELOPE, HEAD_BYTES, SignatureError, UpdateVerifier, open_update
from ctr.online_learner.update_format import MAX_HEADER_BYTES, UpdateError, UpdateHeader, decode_header, decode_update
from ctr.serving.registry import Decision, ModelRegistry

log = logging.getLogger(__name__)


APPLIED = Counter("ctr_serving_updates_applied_total", "Model versions applied (swapped in)", ["kind"])
REJECTED = Counter("ctr_serving_updates_rejected_total", "Model-update messages rejected", ["reason"])
SKIPPED = Counter("ctr_serving_updates_skipped_total", "Model-update messages skipped (stale, duplicate)",
                  ["reason"])
RESYNCS = Counter("ctr_serving_resyncs_total", "Re-syncs from a snapshot file", ["reason", "result"])
APPLY_LAG = Histogram("ctr_serving_update_lag_seconds",
                      "Learner publish (created_ms) -> version served here, per applied version",
                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
BUILD_SECONDS = Histogram("ctr_serving_version_build_seconds", "Copy + apply (delta) or load (snapshot)",
                          ["kind"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5))


def read_snapshot_header(path: Path) -> UpdateHeader:
    """The header of a snapshot file, reading only its first bytes (no checksum or signature
    check: it only orders files; what is installed is verified whole)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] == ENVELOPE:  # signed: the update starts after the envelope
            f.seek(HEAD_BYTES)
            head = f.read(8)
        if len(head) < 8:
            raise UpdateError(f"{path}: too short")
        hlen = int.from_bytes(head[4:8], "little")
        if hlen > MAX_HEADER_BYTES:
            raise UpdateError(f"{path}: header length {hlen} out of bounds")
        data = head + f.read(hlen) + b"\0" * 33  # decode_header drops a 32-byte digest
    return decode_header(data)


def snapshot_files(snapshot_dir: Path | None) -> list[Path]:
    if snapshot_dir is None or not Path(snapshot_dir).is_dir():
        return []
    return sorted(Path(snapshot_dir).glob("snapshot-*.ctru"))


def load_newest_snapshot(registry: ModelRegistry, snapshot_dir: Path | None,
                         verifier: UpdateVerifier | None) -> bool:
    """Install the newest snapshot file of ``snapshot_dir`` (by ``created_ms``): a replica
    without live updates. False when there is none."""
    files = snapshot_files(snapshot_dir)
    if not files:
        log.error("no snapshot in %s", snapshot_dir)
        return False
    path = max(files, key=lambda p: read_snapshot_header(p).created_ms)
    header, tensors = decode_update(open_update(path.read_bytes(), verifier))
    registry.install_snapshot(header, tensors)
    return True


class UpdateConsumer:
    """Feeds ``model-updates`` into a :class:`ModelRegistry` from a daemon thread.

    Args:
        registry: the replica's versions.
        bootstrap: Kafka bootstrap servers.
        snapshot_dir: the learner's snapshot directory (start-up and re-sync); announced
            snapshot paths are tried first.
        seek_margin_ms: how far before a snapshot's ``created_ms`` to start reading.
        retry_s: while stalled, how often to look for a newer snapshot.
        idle_poll_s: when caught up, how often to check the topic's end offset (the added
            delivery latency of an update is at most about this; see :meth:`_step`).
    """

    def __init__(self, registry: ModelRegistry, bootstrap: str, *, topic: str = MODEL_UPDATES_TOPIC,
                 snapshot_dir: Path | None = None, seek_margin_ms: int = 2000, retry_s: float = 2.0,
                 poll_timeout_s: float = 0.05, idle_poll_s: float = 0.05, recheck_s: float = 1.0,
                 group_id: str | None = None, verifier: UpdateVerifier | None = None) -> None:
        self.registry = registry
        #: None: updates are accepted unsigned (signed ones are read without a check)
        self.verifier = verifier
        self.bootstrap, self.topic = bootstrap, topic
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.seek_margin_ms, self.retry_s, self.poll_timeout_s = seek_margin_ms, retry_s, poll_timeout_s
        self.idle_poll_s, self.recheck_s = idle_poll_s, recheck_s
        self.group_id = group_id or f"ctr-serving-{socket.gethostname()}-{os.getpid()}"
        #: starting | catching_up | live | stalled | failed | stopped
        self.state = "starting"
        self.stall_reason = ""
        self.last_resync: dict[str, Any] | None = None
        self.last_rejection: dict[str, Any] | None = None
        self.messages = 0
        self.offset = -1
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: PacedConsumer | None = None
        self._last_retry = 0.0
        self._high = -1
        #: Next offset to read; fetching happens only while assigned (see _step).
        self.pos = 0
        self._assigned = False
        self._last_fetch = 0.0

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> UpdateConsumer:
        self._thread = threading.Thread(target=self._run, name="model-updates", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "stall_reason": self.stall_reason or None, "offset": self.offset,
                "position": self.pos, "end_offset": self._high, "messages": self.messages,
                "last_resync": self.last_resync, "last_rejection": self.last_rejection, "error": self.error}

    @property
    def _kafka(self) -> PacedConsumer:
        """The consumer; the update thread (:meth:`_run`) makes it before anything reads it."""
        assert self._consumer is not None
        return self._consumer

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._consumer = make_consumer(self.bootstrap, self.group_id)
            if not self._resync(Decision("rejected", "startup", "replica start")):
                self._position(OFFSET_BEGINNING)
                if self.registry.head is None:
                    self.state = "stalled"
                    self.stall_reason = "no snapshot yet: waiting for the learner's announcement"
            if self.state == "starting":
                self.state = "catching_up"
            while not self._stop.is_set():
                try:
                    self._step()
                except KafkaException as err:  # broker away, topic missing: keep serving, retry
                    self.error = f"KafkaException: {err}"
                    log.warning("model-updates: %s (retrying in 1 s)", err)
                    self._stop.wait(1.0)
                    continue
                self.error = None
                if self.state == "stalled" and time.monotonic() - self._last_retry > self.retry_s:
                    self._resync(Decision("rejected", "retry", self.stall_reason))
        except Exception as err:  # noqa: BLE001 - recorded for /healthz, then the thread ends
            log.exception("model-updates consumer died")
            self.error = f"{type(err).__name__}: {err}"
            self.state = "failed"
        finally:
            if self._consumer is not None:
                self._consumer.close()
            if self.state != "failed":
                self.state = "stopped"

    def _step(self) -> None:
        """Fetch only while there is something to read.

        An assigned partition is fetched continuously by librdkafka, relying on the broker to
        hold an empty fetch for ``fetch.wait.max.ms``. The embedded noida broker answers at once,
        so an idle assigned consumer spins (~40% of a core here, plus as much in the broker).
        So: when caught up, unassign and poll the end offset every ``idle_poll_s``; assign again
        from our position when it moves (and once per ``recheck_s`` regardless, for brokers
        whose reported end offset lags by one batch)."""
        tp = TopicPartition(self.topic, 0)
        if self.pos < 0:  # a logical offset: resolve it now (the broker may have been away before)
            lo, hi = self._kafka.get_watermark_offsets(tp, timeout=10, cached=False)
            self.pos = lo if self.pos == OFFSET_BEGINNING else hi
        if not self._assigned:
            now = time.monotonic()
            _, self._high = self._kafka.get_watermark_offsets(tp, timeout=10, cached=False)
            if self._high > self.pos or now - self._last_fetch > self.recheck_s:
                self._kafka.assign([TopicPartition(self.topic, 0, self.pos)])
                self._assigned, self._last_fetch = True, now
            else:
                if self.state == "catching_up":
                    self.state = "live"
                self._stop.wait(self.idle_poll_s)
                return
        msgs = self._kafka.consume(256, self.poll_timeout_s)
        data = 0
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("model-updates consumer: %s", err)
                continue
            data += 1
            self.messages += 1
            self.offset = offset_of(m)
            self.pos = self.offset + 1
            if self._handle(m.value()):
                return  # repositioned: the rest of this batch is from the old position
        if self.pos >= self._high:  # caught up (an empty consume with pos < end: a fetch in flight)
            self._kafka.unassign()
            self._assigned = False

    def _handle(self, message: bytes | None) -> bool:
        """Process one message; True when the consumer was repositioned (re-sync)."""
        reg = self.registry
        try:
            data = self.open(message)
        except SignatureError as err:  # before a byte of it is read: nothing it says is trusted
            return self._note(Decision("rejected", err.reason, str(err)))
        try:
            header = decode_header(data)
        except UpdateError as err:
            return self._note(Decision("rejected", "invalid", str(err)))
        decision = reg.classify(header)
        if decision is None:
            try:
                header, tensors = decode_update(data, digest_checked=self.verifier is not None)
            except UpdateError as err:
                return self._note(Decision("rejected", "invalid", str(err)))
            decision = reg.offer(header, tensors)
        return self._note(decision)

    def open(self, data: bytes | memoryview | None) -> memoryview:
        """The update in ``data``, verified when a verifier is set. Raises SignatureError."""
        return open_update(data, self.verifier)

    def _note(self, d: Decision) -> bool:
        if d.outcome == "applied":
            mv = d.version
            APPLIED.labels(mv.source if mv else "delta").inc()
            if mv is not None:
                BUILD_SECONDS.labels(mv.source).observe(mv.build_ms / 1000)
                if mv.created_ms:
                    APPLY_LAG.observe(max(0.0, (mv.applied_ms - mv.created_ms) / 1000))
            if self.state == "stalled":
                self.state, self.stall_reason = "catching_up", ""
        elif d.outcome == "rejected":
            REJECTED.labels(d.reason).inc()
            self.last_rejection = {"reason": d.reason, "detail": d.detail, "at_ms": int(time.time() * 1000)}
            log.warning("model update rejected (%s): %s", d.reason, d.detail)
        elif d.outcome == "skipped":
            SKIPPED.labels(d.reason).inc()
        if d.resync:
            return self._resync(d)
        return False

    # -- re-sync ----------------------------------------------------------------------------------
    def _candidates(self, uri: str) -> list[Path]:
        """Announced file first, then the directory's files newest-created first."""
        out: list[Path] = [Path(uri)] if uri else []
        files = []
        for p in snapshot_files(self.snapshot_dir):
            try:
                files.append((read_snapshot_header(p).created_ms, p))
            except (OSError, UpdateError):
                continue
        out += [p for _, p in sorted(files, reverse=True) if p not in out]
        return out

    def _newer(self, header: UpdateHeader, announced: bool) -> bool:
        head = self.registry.head
        if head is None:
            return True
        if header.model_id == head.model_id:
            return header.version > head.version
        # another lineage: only when announced on the topic or created after what we serve
        return announced or header.created_ms > head.created_ms

    def _resync(self, d: Decision) -> bool:
        """Install the newest usable snapshot newer than the head and seek back to it.

        Returns True when the consumer was repositioned."""
        self._last_retry = time.monotonic()
        for path in self._candidates(d.snapshot_uri):
            announced = bool(d.snapshot_uri) and path == Path(d.snapshot_uri)
            try:
                if not self._newer(read_snapshot_header(path), announced):
                    continue
                t0 = time.perf_counter()
                header, tensors = decode_update(self.open(path.read_bytes()))
                if header.kind != "snapshot" or not self._newer(header, announced):
                    continue
                mv = self.registry.install_snapshot(header, tensors)
            except (OSError, UpdateError, ValueError) as err:  # SignatureError is a ValueError
                log.warning("snapshot %s unusable: %s", path, err)
                RESYNCS.labels(d.reason, "unusable").inc()
                continue
            APPLIED.labels("snapshot").inc()
            BUILD_SECONDS.labels("snapshot").observe(mv.build_ms / 1000)
            RESYNCS.labels(d.reason, "loaded").inc()
            self.last_resync = {"reason": d.reason, "detail": d.detail, "snapshot": str(path),
                                "version": mv.version, "model_id": mv.model_id,
                                "load_ms": round((time.perf_counter() - t0) * 1000, 1),
                                "at_ms": int(time.time() * 1000)}
            log.info("re-synced (%s) from %s: v%d of %s", d.reason, path, mv.version, mv.model_id)
            self.state, self.stall_reason = "catching_up", ""
            self._seek_to_time(header.created_ms - self.seek_margin_ms)
            return True
        if d.reason not in ("retry", "startup"):
            RESYNCS.labels(d.reason, "nothing_newer").inc()
            self.last_resync = {"reason": d.reason, "detail": d.detail, "snapshot": None,
                                "at_ms": int(time.time() * 1000)}
        if d.reason not in ("retry", "startup"):
            # an update did not chain (or a newer snapshot could not be read): serve the head,
            # reject what does not chain, look for a newer snapshot every retry_s
            self.state = "stalled"
            self.stall_reason = f"{d.reason}: {d.detail}; no newer snapshot to re-sync from yet"
        return False

    # -- positioning ------------------------------------------------------------------------------
    def _position(self, offset: int) -> None:
        """Read from ``offset`` next (OFFSET_BEGINNING / OFFSET_END are resolved by ``_step``)."""
        self.pos = offset
        if self._assigned:
            self._kafka.unassign()
            self._assigned = False

    def _seek_to_time(self, ts_ms: int) -> None:
        offset = OFFSET_BEGINNING
        try:
            found = self._kafka.offsets_for_times([TopicPartition(self.topic, 0, max(0, ts_ms))], timeout=10)
            offset = found[0].offset if found and found[0].offset >= 0 else OFFSET_END
        except Exception as err:  # noqa: BLE001 - a broker without a time index: replay from the start
            log.warning("offsets_for_times failed (%s): reading %s from the beginning", err, self.topic)
        self._position(offset)
