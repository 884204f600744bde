"""``ctr serve --workers N``: N HTTP worker processes on one port, one updater applying updates.

This process becomes the *updater*: the update consumer and the :class:`ModelRegistry` run here
exactly as in a lone replica, except that every model lives in shared memory
(:mod:`ctr.serving.shared`). It answers no HTTP itself. N workers (:mod:`ctr.serving.follower`,
started with ``python -c``: a fresh interpreter, never a fork of this threaded process) each
bind the port with ``SO_REUSEPORT`` -- the kernel spreads connections over them, and stops
sending new ones to a worker whose socket closed -- and serve the existing app; their
registry follows the one here and never applies an update.

* **One version per response.** Whenever ``current`` changes here (a new version, a rollback,
  an unpin) each worker is sent it (:mod:`ctr.serving.channel`): metadata, config, layout and
  the segment's fd. The worker maps it read-only and swaps its ``current`` by one reference
  assignment; a request acquires one version and scores every candidate with it, as in one
  process.
* **No torn reads.** The registry builds a version on a recycled shadow -- a retired model's
  memory, rewritten in place -- only when nobody reads it. Each serve sent to a worker is one
  :meth:`ModelRegistry.hold` on that version, returned when the worker reports ``drop`` (that
  version is no longer its current and no request in flight holds it) or when the worker is
  found dead. Until then the registry leaves that model alone and builds on another spare or
  on a fresh copy.
* **Admin calls** reaching any worker are forwarded here; the registry's rollback / unpin
  broadcasts the new current, and the call answers once every live worker acknowledged it
  (within 5 s), so after a 200 every worker serves the pinned version.
* **/metrics** at any worker answers for every process: the updater gathers each worker's
  exposition and its own and labels each sample ``worker="0".."N-1"`` or ``worker="updater"``
  (per-process counters stay exact; sum over ``worker`` for the service).
* **Supervision.** A worker that exits is restarted (after 0.5 s, doubling to 10 s while
  restarts keep failing within 10 s); ten failed starts in a row stop the server. SIGTERM /
  SIGINT here stops the workers (SIGTERM, then SIGKILL after ``grace_s``); a worker whose
  updater vanished (even ``kill -9``) sees its channel close and exits, and Linux sends it
  SIGTERM when the updater dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field, fields
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, generate_latest

from ctr.online_learner.signing import verifier_from
from ctr.serving.channel import Channel, bind_port
from ctr.serving.config import ServingConfig
from ctr.serving.metrics import bind_gauges, merge_expositions
from ctr.serving.registry import ModelRegistry, ModelVersion, RegistryError
from ctr.serving.shared import segment_of, share_model, shared_copy
from ctr.serving.updates import UpdateConsumer, load_newest_snapshot

log = logging.getLogger(__name__)

WORKERS_UP = Gauge("ctr_serving_workers", "HTTP worker processes running (ctr serve --workers)")
WORKER_RESTARTS = Counter("ctr_serving_worker_restarts_total", "HTTP worker processes restarted after they exited")

#: ModelVersion fields a worker needs to rebuild a version around its mapped model
META = tuple(f.name for f in fields(ModelVersion) if f.name not in ("model", "config", "encoder", "forward", "touched"))
ACK_TIMEOUT_S = 5.0
COLLECT_TIMEOUT_S = 2.0


@dataclass(eq=False)
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    channel: Channel
    started: float
    #: highest serve seq this worker acknowledged
    acked: int = 0
    #: token -> the versions sent as that token and not dropped yet (one entry per serve)
    holds: dict[int, list[ModelVersion]] = field(default_factory=dict)
    #: the next serve (seq, token, version), not sent yet: a newer one replaces it
    slot: tuple[int, int, ModelVersion] | None = None
    status: dict[str, Any] | None = None
    queue: list[tuple[Any, ...]] = field(default_factory=list)
    closed: bool = False


class Workers:
    """The worker processes, their channels, and what each holds (see the module docstring)."""

    def __init__(self, config: ServingConfig, registry: ModelRegistry, updates: UpdateConsumer | None,
                 grace_s: float = 10.0) -> None:
        self.config, self.registry, self.updates = config, registry, updates
        self.n = config.workers
        self.grace_s = grace_s
        self._cv = threading.Condition()
        self._workers: list[_Worker | None] = [None] * self.n
        self._seq = 0
        self._tokens: weakref.WeakKeyDictionary[ModelVersion, int] = weakref.WeakKeyDictionary()
        self._next_token = itertools.count(1)
        self._next_call = itertools.count(1)
        self._collected: dict[int, dict[str, bytes]] = {}
        self._configs: dict[int, tuple[object, dict[str, Any]]] = {}
        registry.listeners.append(self._changed)

    # -- processes ------------------------------------------------------------------------------
    def spawn(self, index: int) -> None:
        """Start worker ``index`` and send it the current version."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        code = "import sys; from ctr.serving.follower import main; main(int(sys.argv[1]), int(sys.argv[2]))"
        proc = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno()), str(os.getpid())],
                                pass_fds=(theirs.fileno(),))
        theirs.close()
        channel = Channel(mine)
        w = _Worker(index, proc, channel, time.monotonic())
        try:
            channel.send(("start", self.config, index, self.n))
        except OSError:
            pass  # died at once: the supervisor sees it
        with self._cv:
            self._workers[index] = w
            self._offer(w, self._seq, self.registry.current)
        for target, name in ((self._sender, "send"), (self._reader, "recv")):
            threading.Thread(target=target, args=(w,), name=f"worker-{index}-{name}", daemon=True).start()
        log.info("worker %d started (pid %d)", index, proc.pid)

    def reap(self, w: _Worker) -> None:
        """Forget a worker that exited: whatever it held is free again."""
        with self._cv:
            w.closed = True
            gone = [mv for sent in w.holds.values() for mv in sent] + ([w.slot[2]] if w.slot else [])
            w.holds.clear()
            w.slot = None
            if self._workers[w.index] is w:
                self._workers[w.index] = None
            self._cv.notify_all()
            for mv in gone:
                self.registry.release(mv)
        w.channel.close()

    def live(self) -> list[_Worker]:
        return [w for w in self._workers if w is not None and not w.closed]

    def stop(self) -> None:
        """SIGTERM every worker, SIGKILL what is left after ``grace_s``."""
        procs = [w.proc for w in self.live()]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in %.0f s: SIGKILL", p.pid, self.grace_s)
                p.kill()
                p.wait(5)
        for w in self.live():
            self.reap(w)

    # -- versions out -----------------------------------------------------------------------------
    def _changed(self, _mv: ModelVersion) -> None:
        """Registry listener (never called under the registry's lock): every worker gets the
        registry's current version. Read here, under this lock, so the last broadcast always
        carries the latest current whatever order concurrent listeners run in."""
        with self._cv:
            self._seq += 1
            for w in self.live():
                self._offer(w, self._seq, self.registry.current)
            self._cv.notify_all()
        self.post_status()  # sent after the version: /model at a worker shows the head and pin at once

    def _offer(self, w: _Worker, seq: int, mv: ModelVersion | None) -> None:
        """(Under the lock.) ``mv`` becomes ``w``'s next serve, held until it drops it."""
        if mv is None:
            return
        token = self._tokens.get(mv)
        if token is None:
            token = self._tokens[mv] = next(self._next_token)
        self.registry.hold(mv)
        if w.slot is not None:  # never sent: its hold goes back
            self.registry.release(w.slot[2])
        w.slot = (seq, token, mv)

    def _config_dict(self, mv: ModelVersion) -> dict[str, Any]:
        got = self._configs.get(id(mv.config))
        if got is None or got[0] is not mv.config:
            got = self._configs[id(mv.config)] = (mv.config, mv.config.to_dict())
        return got[1]

    def _sender(self, w: _Worker) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: w.closed or w.slot is not None or w.status is not None or bool(w.queue))
                if w.closed:
                    return
                slot, status, queue = w.slot, w.status, w.queue
                w.slot, w.status, w.queue = None, None, []
                if slot is not None:  # from here on it is the worker's to drop
                    w.holds.setdefault(slot[1], []).append(slot[2])
            try:
                if slot is not None:
                    seq, token, mv = slot
                    meta = {k: getattr(mv, k) for k in META}
                    seg = segment_of(mv.model)
                    w.channel.send(("serve", seq, token, meta, self._config_dict(mv), seg.layout), fd=seg.fd)
                if status is not None:
                    w.channel.send(("status", status))
                for message in queue:
                    w.channel.send(message)
            except OSError:
                return  # the worker is gone: the supervisor reaps it

    def post_status(self) -> None:
        """Send every worker the registry's and the consumer's state (what /model reports)."""
        reg = self.registry.status()
        reg.pop("current")
        status = {"registry": reg, "updates": self.updates.status() if self.updates else None,
                  "updates_alive": self.updates.alive if self.updates else True,
                  "updater_pid": os.getpid(), "workers": self.n}
        with self._cv:
            for w in self.live():
                w.status = status
            self._cv.notify_all()

    def _post(self, w: _Worker, message: tuple[Any, ...]) -> None:
        with self._cv:
            w.queue.append(message)
            self._cv.notify_all()

    # -- messages in --------------------------------------------------------------------------------
    def _reader(self, w: _Worker) -> None:
        while True:
            try:
                message, _ = w.channel.recv()
            except (EOFError, OSError):
                return
            kind = message[0]
            if kind == "serving":
                with self._cv:
                    w.acked = max(w.acked, message[1])
                    self._cv.notify_all()
            elif kind == "drop":
                with self._cv:
                    sent = w.holds.get(message[1])
                    mv = sent.pop() if sent else None
                    if sent == []:
                        del w.holds[message[1]]
                    if mv is not None:
                        self.registry.release(mv)
            elif kind == "metrics":
                with self._cv:
                    got = self._collected.get(message[1])
                    if got is not None:
                        got[str(w.index)] = message[2]
                        self._cv.notify_all()
            elif kind == "call":  # may wait for every worker's ack: not on this thread
                threading.Thread(target=self._answer, args=(w, *message[1:]), name="admin", daemon=True).start()

    def _answer(self, w: _Worker, call_id: int, op: str, args: dict[str, Any]) -> None:
        try:
            result = self.call(op, args)
        except Exception as err:  # noqa: BLE001 - the worker answers 500 with it
            log.exception("%s from worker %d failed", op, w.index)
            result = {"error": f"{type(err).__name__}: {err}", "status": 500}
        self._post(w, ("reply", call_id, result))

    def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """An admin call or a metrics gathering, as asked by a worker."""
        if op == "metrics":
            return {"text": self.gather_metrics()}
        mv: ModelVersion | None
        try:
            if op == "rollback":
                mv = self.registry.rollback(args.get("version"), args.get("model_id"))
            elif op == "unpin":
                mv = self.registry.unpin()
            else:
                raise RegistryError(f"unknown call {op!r}", 400)
        except RegistryError as err:
            return {"error": str(err), "status": err.status}
        with self._cv:
            seq = self._seq
        return {"version": mv.version if mv else None, "model_id": mv.model_id if mv else None,
                "head_version": self.registry.head_version(), "confirmed": self.wait_acked(seq)}

    def wait_acked(self, seq: int, timeout_s: float = ACK_TIMEOUT_S) -> list[int]:
        """Wait until every live worker serves broadcast ``seq`` (or newer); those that do."""
        with self._cv:
            self._cv.wait_for(lambda: all(w.acked >= seq for w in self.live()), timeout_s)
            return sorted(w.index for w in self.live() if w.acked >= seq)

    def gather_metrics(self) -> bytes:
        call_id = next(self._next_call)
        with self._cv:
            got = self._collected[call_id] = {}
            asked = self.live()
            for w in asked:
                w.queue.append(("collect", call_id))
            self._cv.notify_all()
            self._cv.wait_for(lambda: len(got) >= len(asked), COLLECT_TIMEOUT_S)
            del self._collected[call_id]
        return merge_expositions({"updater": generate_latest(REGISTRY), **dict(sorted(got.items()))})

    # -- supervision --------------------------------------------------------------------------------
    def supervise(self, stop: threading.Event, status_every_s: float = 0.5) -> None:
        """Start the workers; restart any that exits; until ``stop`` is set. Raises RuntimeError
        when a worker keeps failing right after its start (a port taken, a broken install)."""
        for i in range(self.n):
            self.spawn(i)
        failures = [0] * self.n
        due: dict[int, float] = {}
        last_status = 0.0
        while not stop.wait(0.1):
            now = time.monotonic()
            for i in range(self.n):
                w = self._workers[i]
                if w is not None and w.proc.poll() is not None:
                    code = w.proc.returncode
                    quick = now - w.started < 10.0
                    failures[i] = failures[i] + 1 if quick else 0
                    if failures[i] >= 10:
                        raise RuntimeError(f"worker {i} failed {failures[i]} times right after starting "
                                           f"(last exit {code}): see its log above")
                    delay = min(10.0, 0.5 * 2 ** max(0, failures[i] - 1))
                    log.error("worker %d (pid %d) exited with %s: restarting in %.1f s", i, w.proc.pid, code, delay)
                    self.reap(w)
                    due[i] = now + delay
                elif w is None and i in due and now >= due[i]:
                    del due[i]
                    WORKER_RESTARTS.inc()
                    self.spawn(i)
            WORKERS_UP.set(len(self.live()))
            if now - last_status >= status_every_s:
                last_status = now
                self.post_status()


def run_workers(config: ServingConfig) -> None:
    """The updater: apply updates into shared memory, run ``config.workers`` HTTP workers."""
    import torch
    from threadpoolctl import threadpool_limits

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
        threadpool_limits(config.torch_threads)
    # held, not listening, for the server's life: a port in use fails the start here, and nobody
    # else can take it while a worker restarts (a socket that does not listen gets no connections)
    reserved = bind_port(config.host, config.port)
    registry = ModelRegistry(keep=config.keep_versions)
    registry.place, registry.clone = share_model, shared_copy
    bind_gauges(registry)
    verifier = verifier_from(config.verify_keys)
    updates = None
    if config.bootstrap:
        if verifier is None:
            log.warning("model updates are not verified: no --verify-key / $CTR_VERIFY_KEYS")
        updates = UpdateConsumer(registry, config.bootstrap, topic=config.topic, snapshot_dir=config.snapshot_dir,
                                 verifier=verifier).start()
    elif config.snapshot_dir is not None:
        threading.Thread(target=load_newest_snapshot, args=(registry, config.snapshot_dir, verifier),
                         name="snapshot-load", daemon=True).start()
    pool = Workers(config, registry, updates)
    stop = threading.Event()

    def stopping(sig: int, _frame: object) -> None:
        log.info("signal %d: stopping the workers", sig)
        stop.set()

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGINT, stopping)
    log.info("updater pid %d: %d workers on %s:%d", os.getpid(), config.workers, config.host, config.port)
    try:
        pool.supervise(stop)
    finally:
        pool.stop()
        if updates is not None:
            updates.stop()
        reserved.close()
