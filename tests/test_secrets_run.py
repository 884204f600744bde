"""No secret in what a short run prints or writes.

``ctr up`` runs every stage with secrets of every kind: a Kafka password (SASL/PLAIN through
the one security config; noida-db accepts it), the Feast store in Redis (a Valkey server with
the compose ACL users, logged in as the writer), the signing key pair ``ctr up`` creates, an
admin token. Then a replay, predictions, admin calls (a wrong token and the right one),
``ctr features get``, ``ctr status`` and ``ctr down``. Every byte the commands printed, every
HTTP answer and every file the run left (logs, state files, the Feast config, checkpoints and
snapshots) is searched for each secret.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ctr.infra.procs import free_port
from tests.kafka_helpers import end_offsets
from tests.stack_helpers import first_prediction
from tests.test_online_redis import WRITER, Valkey, valkey  # noqa: F401 - the fixture


def _ctr(*args: str, env: dict[str, str], out: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "ctr.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    out += [done.stdout, done.stderr]
    return done


def _private_key_lines(path: Path) -> list[str]:
    """The base64 body of a PEM private key: what a leaked key would look like in text."""
    return [line for line in path.read_text().splitlines() if line and not line.startswith("-----")]


@pytest.mark.integration
@pytest.mark.slow
def test_a_short_run_never_shows_a_secret(tmp_path: Path, valkey: Valkey) -> None:  # noqa: F811
    state = tmp_path / "state"
    kafka_pw, token = "kpw-" + secrets.token_urlsafe(16), "tok-" + secrets.token_urlsafe(16)
    (tmp_path / "kafka.password").write_text(kafka_pw + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTR_", "REDIS_"))}
    env |= {
        "CTR_STATE_DIR": str(state),
        "CTR_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "CTR_KAFKA_SASL_MECHANISM": "PLAIN",
        "CTR_KAFKA_USERNAME": "ctr",
        "CTR_KAFKA_PASSWORD_FILE": str(tmp_path / "kafka.password"),
        "CTR_ONLINE_STORE": "redis",
        "REDIS_CONNECTION_STRING": valkey.url,
        **valkey.env(WRITER),
        "CTR_ADMIN_TOKEN": token,
    }
    printed: list[str] = []
    port = free_port()
    up = _ctr("up", "--port", str(port), env=env, out=printed)
    assert up.returncode == 0, up.stderr[-2000:]
    bootstrap = json.loads((state / "stack.json").read_text())["bootstrap"]
    try:
        assert _ctr("replay", "--events", "2000", env=env, out=printed).returncode == 0
        deadline = time.monotonic() + 120
        while sum(end_offsets(bootstrap, "training-examples").values()) < 2000 or valkey.client(WRITER).dbsize() == 0:
            assert time.monotonic() < deadline, "the worker did not label the replay and write its features to Redis"
            time.sleep(0.5)
        body = {"user_id": "u1", "candidates": [{"item_id": "ad1"}, {"item_id": "ad2"}]}
        r = first_prediction(port, body, deadline + 60)
        answers = [r.text]
        wrong = httpx.post(f"http://127.0.0.1:{port}/model/unpin", headers={"Authorization": "Bearer nope"}, timeout=5)
        right = httpx.post(f"http://127.0.0.1:{port}/model/unpin", headers={"Authorization": f"Bearer {token}"},
                           timeout=5)  # fmt: skip
        assert wrong.status_code == 403 and right.status_code == 200, (wrong.text, right.text)
        answers += [wrong.text, right.text, httpx.get(f"http://127.0.0.1:{port}/model", timeout=5).text,
                    httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text]  # fmt: skip
        got = _ctr("features", "get", "--dir", str(state / "feast"), "--item", "ad1", env=env, out=printed)
        assert got.returncode == 0 and json.loads(got.stdout)["online_store"] == f"redis at {valkey.url}"
        _ctr("status", env=env, out=printed)
    finally:
        down = _ctr("down", env=env, out=printed)
    assert down.returncode == 0

    private_key = state / "keys" / "signing.key"
    assert private_key.exists(), "ctr up signs model updates with a key pair of its own"
    needles = [kafka_pw, token, *valkey.passwords.values(), *_private_key_lines(private_key)]
    haystacks = {"printed": "\n".join(printed), "http": "\n".join(answers)}
    for path in state.rglob("*"):
        if path.is_file() and path != private_key:  # the key's own file is the one place it lives
            haystacks[str(path.relative_to(state))] = path.read_bytes().decode("latin-1")
    assert any(p.startswith("logs") for p in haystacks), "the stages wrote no logs"
    leaks = [(name, where) for where, text in haystacks.items() for name, s in enumerate(needles) if s in text]
    assert leaks == [], f"secrets (by index) found in: {leaks}"
