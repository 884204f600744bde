"""A small process supervisor for ``ctr demo`` and ``ctr up``: each stage is a child process
with its own log file, dies with the supervisor (``PR_SET_PDEATHSIG``), is restarted if it
crashes (up to ``max_restarts``), and is stopped with SIGTERM, then SIGKILL after a grace.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ctr.infra.procs import die_with_parent, stop_process

#: The niceness of the stages that batch their work (worker, reweighter, learner) when they
#: share cores with serving, as in ``ctr demo`` and ``ctr up`` on one machine. A request has
#: a deadline of milliseconds; a learner step or a feature window does not. At nice 10 the
#: kernel's fair scheduler weighs a batch stage at about a tenth of serving, so a request that
#: wakes serving preempts it instead of waiting out its time slice; when serving is idle the
#: batch stages still get every cycle. 0 runs everything at one priority.
BATCH_NICE = 10

#: The learner's niceness when the other batch stages run at :data:`BATCH_NICE`. The learner
#: is on the click -> served score path and light (its training about an eighth of a core at
#: the demo's 2,000 events/s), but bursty: at nice 10, next to a worker, a reweighter and a
#: broker that together kept both cores busy, each batch waited for a core five to six times
#: as long as it computed, a 1 s publish interval stretched to 3-5 s, and the freshness tail
#: grew with it. At 3 it outweighs the nice-10 stages about 3:1 and still yields to serving
#: (nice 0).
LEARNER_NICE = 3


def stage_nice(stage: str, batch_nice: int = BATCH_NICE) -> int:
    """The niceness of a batch ``stage`` (worker, reweighter, learner) when they run at
    ``batch_nice``: the learner at no more than :data:`LEARNER_NICE`; 0 keeps one priority.

    >>> stage_nice("worker"), stage_nice("learner"), stage_nice("learner", 0)
    (10, 3, 0)
    """
    return min(batch_nice, LEARNER_NICE) if stage == "learner" else batch_nice

log = logging.getLogger(__name__)


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    max_restarts: int = 3
    grace_s: float = 15.0
    detach: bool = False  # ``ctr up``: outlive the launcher (no death signal, own session)
    nice: int = 0  # added to the child's niceness (see BATCH_NICE)
    proc: subprocess.Popen | None = None
    restarts: int = 0
    log_path: Path | None = None


def ctr_argv(*args: str) -> list[str]:
    """argv running ``ctr ARGS`` with this interpreter (works without the console script)."""
    return [sys.executable, "-m", "ctr.cli", *args]


def _preexec(svc: Service) -> Callable[[], None] | None:
    """What the child runs between fork and exec: its niceness, and (unless detached) death with
    the supervisor."""
    nice, attach = svc.nice, not svc.detach
    if not nice and not attach:
        return None

    def setup() -> None:  # pragma: no cover - runs in the child
        if nice:
            os.nice(nice)
        if attach:
            die_with_parent()

    return setup


class Supervisor:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.services: dict[str, Service] = {}

    def start(self, svc: Service) -> Service:
        svc.log_path = self.log_dir / f"{svc.name}.log"
        out = open(svc.log_path, "ab")  # noqa: SIM115 - the child owns it
        svc.proc = subprocess.Popen(
            svc.argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **svc.env},
            preexec_fn=_preexec(svc),
            start_new_session=svc.detach,
        )
        out.close()
        self.services[svc.name] = svc
        log.info("started %s (pid %d)", svc.name, svc.proc.pid)
        return svc

    def check(self) -> list[str]:
        """Restart crashed services; returns the names of services that exited for good."""
        dead = []
        for svc in self.services.values():
            if svc.proc is None or svc.proc.poll() is None:
                continue
            code = svc.proc.returncode
            if code == 0:
                continue
            if svc.restarts < svc.max_restarts:
                svc.restarts += 1
                log.warning("%s exited with %s; restart %d/%d", svc.name, code, svc.restarts, svc.max_restarts)
                self.start(svc)
            else:
                dead.append(svc.name)
        return dead

    def alive(self, name: str) -> bool:
        svc = self.services.get(name)
        return bool(svc and svc.proc and svc.proc.poll() is None)

    def stop(self, name: str) -> int | None:
        svc = self.services[name]
        code = stop_process(svc.proc, svc.grace_s) if svc.proc else None
        return code

    def stop_all(self, order: list[str] | None = None) -> dict[str, int | None]:
        """Stop in ``order`` (default: reverse start order), each SIGTERM -> grace -> SIGKILL."""
        names = order or list(reversed(self.services))
        return {n: self.stop(n) for n in names if n in self.services}

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            dead = self.check()
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}; see {self.log_dir}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}; logs in {self.log_dir}")
            time.sleep(poll_s)
