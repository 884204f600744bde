"""``ctr up`` / ``ctr status`` / ``ctr down``: long-running services, started and stopped for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ctr.infra.procs import free_port, pid_alive
from tests.kafka_helpers import end_offsets
from tests.stack_helpers import first_prediction


def _ctr(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ctr.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_up_replay_status_down(tmp_path) -> None:
    env = {**os.environ, "CTR_STATE_DIR": str(tmp_path / "state")}
    env.pop("CTR_BOOTSTRAP", None)
    port = free_port()
    up = _ctr("up", "--port", str(port), env=env)
    assert up.returncode == 0, up.stderr[-2000:]
    state = json.loads((tmp_path / "state" / "stack.json").read_text())
    pids = {n: s["pid"] for n, s in state["services"].items()}
    try:
        assert set(pids) == {"broker", "worker", "reweighter", "learner", "serve"}
        # the stages that batch their work yield the cores to serving's requests; the learner,
        # on the click -> score path, less so (niceness stops at 19)
        own = os.getpriority(os.PRIO_PROCESS, 0)
        nice = {n: os.getpriority(os.PRIO_PROCESS, p) - own for n, p in pids.items()}
        assert nice == {"broker": 0, "serve": 0, "worker": min(10, 19 - own), "reweighter": min(10, 19 - own),
                        "learner": min(3, 19 - own)}, nice
        assert _ctr("up", env=env).returncode == 2  # refuses a second stack
        replay = _ctr("replay", "--events", "2000", env=env)
        assert replay.returncode == 0, replay.stderr[-2000:]
        deadline = time.monotonic() + 90
        while sum(end_offsets(state["bootstrap"], "training-examples").values()) < 2000:
            assert time.monotonic() < deadline, "the worker did not label the replay"
            time.sleep(0.5)
        status = json.loads(_ctr("status", env=env).stdout)
        assert all(s["alive"] for s in status["services"].values()), status
        body = {"user_id": "u1", "candidates": [{"item_id": "ad1"}, {"item_id": "ad2"}]}
        r = first_prediction(port, body, deadline + 60)
        assert len(r.json()["predictions"]) == 2 and r.json()["model_version"] >= 1
    finally:
        down = _ctr("down", env=env)
    assert down.returncode == 0
    assert not any(pid_alive(p) for p in pids.values())
    assert json.loads(_ctr("status", env=env).stdout) == {"up": False}
