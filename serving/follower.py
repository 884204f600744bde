"""A worker process of ``ctr serve --workers``: the replica's HTTP app over the versions the
updater sends (:mod:`ctr.serving.workers` describes the whole; :mod:`ctr.serving.channel` the
messages).

:class:`FollowerRegistry` is the app's registry here: ``current`` is whatever the updater last
sent (mapped read-only from its shared memory, :func:`ctr.serving.shared.attach`), requests
acquire and release it as in one process, and a version that is neither current nor held by a
request is reported ``drop``-ped, so the updater may rewrite its memory. It applies no update;
rollback / unpin / metrics are calls to the updater.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import signal
import threading
from typing import Any

from prometheus_client import REGISTRY, generate_latest

from ctr.infra.procs import die_with_parent
from ctr.online_learner.model import ModelConfig
from ctr.serving.channel import Channel, bind_port
from ctr.serving.metrics import merge_expositions
from ctr.serving.registry import ModelRegistry, ModelVersion, RegistryError
from ctr.serving.shared import Layout, attach

log = logging.getLogger(__name__)

#: how long an admin call waits for the updater (which waits up to 5 s for every worker's ack)
CALL_TIMEOUT_S = 10.0


class LeaderView:
    """The updater's update consumer as it last reported it (``ServingState.updates``)."""

    def __init__(self) -> None:
        self.state = "starting"
        self.error: str | None = None
        self.connected = True
        self.reported: dict[str, Any] = {}

    @property
    def alive(self) -> bool:
        return self.connected and bool(self.reported.get("updates_alive", True))

    def status(self) -> dict[str, Any]:
        got = self.reported.get("updates")
        return dict(got) if got else {"state": self.state, "error": self.error}

    def stop(self) -> None:
        """Nothing to stop here: the consumer runs in the updater."""

    def note(self, reported: dict[str, Any]) -> None:
        self.reported = reported
        updates = reported.get("updates")
        self.state = updates["state"] if updates else "static"
        self.error = updates.get("error") if updates else None

    def lost(self) -> None:
        self.connected, self.state, self.error = False, "failed", "the updater process is gone"


class FollowerRegistry(ModelRegistry):
    """A worker's registry: follows the updater's current version (see the module docstring)."""

    def __init__(self, channel: Channel, index: int, workers: int, keep: int = 5) -> None:
        super().__init__(keep=keep)
        self.channel, self.index, self.workers = channel, index, workers
        self.leader = LeaderView()
        #: set by the updater's first message: its current version, or its status when it has none
        self.first = threading.Event()
        self._tokens: dict[int, int] = {}  # id(version here) -> the updater's token for it
        self._configs: dict[str, ModelConfig] = {}
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._calls: dict[int, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._next_call = itertools.count(1)

    def start(self) -> FollowerRegistry:
        threading.Thread(target=self._read, name="updater-recv", daemon=True).start()
        threading.Thread(target=self._write, name="updater-send", daemon=True).start()
        return self

    def close(self) -> None:
        self._outbox.put(None)
        self.channel.close()

    # -- messages ---------------------------------------------------------------------------------
    def _write(self) -> None:
        # sends leave through this thread: a request's release on the event loop only queues
        while (message := self._outbox.get()) is not None:
            try:
                self.channel.send(message)
            except OSError:
                return

    def _read(self) -> None:
        while True:
            try:
                message, fd = self.channel.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "serve" and fd is not None:
                _, seq, token, meta, config, layout = message
                self._serve(seq, token, meta, config, layout, fd)
            elif kind == "status":
                self._status(message[1])
            elif kind == "collect":
                self._outbox.put(("metrics", message[1], generate_latest(REGISTRY)))
            elif kind == "reply":
                waiting = self._calls.pop(message[1], None)
                if waiting is not None:
                    waiting[1].append(message[2])
                    waiting[0].set()
            self.first.set()
        self.leader.lost()
        log.error("the updater is gone: stopping this worker")
        os.kill(os.getpid(), signal.SIGTERM)

    def _config(self, d: dict[str, Any]) -> ModelConfig:
        # one object per config: the encoder, the feature plan and the batcher key on identity
        key = repr(sorted(d.items()))
        got = self._configs.get(key)
        if got is None:
            got = self._configs[key] = ModelConfig.from_dict(d)
        return got

    def _serve(self, seq: int, token: int, meta: dict[str, Any], config: dict[str, Any], layout: Layout,
               fd: int) -> None:
        try:
            cfg = self._config(config)
            mv = ModelVersion(model=attach(fd, layout, cfg), config=cfg, encoder=self._encoder(cfg), **meta)
        except Exception:  # noqa: BLE001 - keep serving the current version; give the hold back
            log.exception("could not map v%s sent by the updater", meta.get("version"))
            self._outbox.put(("drop", token))
            return
        with self._lock:
            old = self.current
            self.current = mv
            self._tokens[id(mv)] = token
            if self.pinned is not None:
                self.pinned = mv  # the updater swaps only to what it serves: pinned until its status says not
            gone = self._tokens.pop(id(old), None) if old is not None and not self._inflight.get(id(old)) else None
            self.swaps += 1
        if gone is not None:
            self._outbox.put(("drop", gone))
        self._outbox.put(("serving", seq))
        for fn in self.listeners:
            fn(mv)

    def _status(self, reported: dict[str, Any]) -> None:
        self.leader.note(reported)
        reg = reported.get("registry") or {}
        with self._lock:
            self.pinned = self.current if reg.get("pinned") else None

    # -- the registry a request sees ------------------------------------------------------------------
    def release(self, mv: ModelVersion | None) -> None:
        if mv is None:
            return
        with self._lock:
            last = self._unhold(mv)
            token = self._tokens.pop(id(mv), None) if last and mv is not self.current else None
        if token is not None:
            self._outbox.put(("drop", token))

    def call(self, op: str, args: dict[str, Any], timeout_s: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        """Ask the updater to do ``op``. Raises RegistryError with its answer's status."""
        call_id = next(self._next_call)
        done: tuple[threading.Event, list[dict[str, Any]]] = (threading.Event(), [])
        self._calls[call_id] = done
        self._outbox.put(("call", call_id, op, args))
        if not done[0].wait(timeout_s):
            self._calls.pop(call_id, None)
            raise RegistryError(f"the updater did not answer {op} within {timeout_s:g} s", 504)
        result = done[1][0]
        if "error" in result:
            raise RegistryError(result["error"], result.get("status", 500))
        return result

    def rollback(self, version: int | None = None, model_id: str | None = None) -> ModelVersion:
        self.call("rollback", {"version": version, "model_id": model_id})
        # the updater sent the pinned version before its answer, on this channel: it serves here now
        mv = self.current
        if mv is None:
            raise RegistryError("no model loaded", 503)
        return mv

    def unpin(self) -> ModelVersion | None:
        self.call("unpin", {})
        return self.current

    def exposition(self) -> bytes:
        """Every process's metrics, gathered by the updater (this worker's alone without it)."""
        try:
            text: bytes = self.call("metrics", {})["text"]
            return text
        except RegistryError:
            return merge_expositions({str(self.index): generate_latest(REGISTRY)})

    def _reported(self) -> dict[str, Any]:
        got: dict[str, Any] = self.leader.reported.get("registry") or {}
        return got

    def head_version(self) -> int | None:
        got = self._reported().get("head_version")
        return int(got) if got is not None else None

    def learner_version(self) -> int | None:
        got = self._reported().get("learner_version")
        return int(got) if got is not None else None

    def kept(self) -> list[ModelVersion]:
        cur = self.current
        return [cur] if cur is not None else []

    def status(self) -> dict[str, Any]:
        reg = self._reported()
        cur = self.current
        return {
            "current": cur.info() if cur else None,
            "head_version": reg.get("head_version"),
            "pinned": bool(reg.get("pinned")),
            "pinned_version": reg.get("pinned_version"),
            "learner_version": reg.get("learner_version"),
            "versions_behind": reg.get("versions_behind"),
            "kept": reg.get("kept", []),
            "pending": reg.get("pending"),
            "worker": {"index": self.index, "of": self.workers, "pid": os.getpid(),
                       "updater_pid": self.leader.reported.get("updater_pid")},
        }


def main(fd: int, updater_pid: int) -> None:  # pragma: no cover - runs in the worker process
    """A worker: ``fd`` is its end of the channel; it serves until SIGTERM or the updater's end."""
    import torch
    from threadpoolctl import threadpool_limits

    from ctr.serving.app import create_app, serve, setup_process

    die_with_parent()  # SIGTERM when the updater dies (asked for after the fact: check it still lives)
    if os.getppid() != updater_pid:
        return
    channel = Channel.from_fd(fd)
    (_, config, index, workers), _ = channel.recv()
    setup_process(config, f"worker-{index}")
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
        threadpool_limits(config.torch_threads)
    follower = FollowerRegistry(channel, index, workers, keep=config.keep_versions)
    # listening (joining the port) waits for the feature store: a restarted worker takes no
    # connection it would answer 503
    app = create_app(config, registry=follower, updates=follower.leader, exposition=follower.exposition,
                     features_wait_s=300)
    follower.start()
    # serve from the first request on with the updater's version (it comes first when there is one)
    follower.first.wait(60)
    try:
        serve(app, config, bind_port(config.host, config.port))
    finally:
        follower.close()
