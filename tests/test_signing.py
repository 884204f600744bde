"""Signed model updates: only the learner's key changes what is served.

Unit tests of the envelope (``ctr.online_learner.signing``), then the real thing: an embedded
broker, serving processes verifying with public keys, and forged, tampered, unsigned and
replayed updates on ``model-updates`` -- each refused (or, the replay, ignored) and counted,
with the served version and scores exactly as before; a key rotation across two replicas.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ctr.online_learner.delta import snapshot_tensors
from ctr.online_learner.model import CTRModel
from ctr.online_learner.signing import (
    HEAD_BYTES,
    SignatureError,
    UpdateSigner,
    UpdateVerifier,
    generate_keypair,
    load_private_key,
    load_public_key,
    run_keys,
    signer_from,
    strip,
    verifier_from,
    write_keypair,
)
from ctr.online_learner.update_format import UpdateHeader, decode_update, encode_update
from tests.test_serving import MODEL, MODEL_ID, T0_MS, Publisher, Replica

UPDATE = encode_update(UpdateHeader(kind="delta", model_id="m", version=2, base_version=1),
                       {"x": np.arange(8, dtype=np.float32)})


def _reason(verifier: UpdateVerifier, data: bytes) -> str:
    with pytest.raises(SignatureError) as err:
        verifier.open(data)
    return err.value.reason


def test_signed_updates_open_only_with_an_accepted_key() -> None:
    (priv, pub), (other_priv, other_pub) = generate_keypair(), generate_keypair()
    signed = UpdateSigner(priv).sign(UPDATE)
    header, tensors = decode_update(UpdateVerifier([pub]).open(signed))
    assert header.version == 2 and tensors["x"].tolist() == list(range(8))
    assert _reason(UpdateVerifier([pub]), UPDATE) == "unsigned"
    assert _reason(UpdateVerifier([other_pub]), signed) == "unknown_key"
    # the right key id, somebody else's signature
    forged = signed[:12] + UpdateSigner(other_priv).sign(UPDATE)[12:HEAD_BYTES] + signed[HEAD_BYTES:]
    assert _reason(UpdateVerifier([pub]), forged) == "bad_signature"
    for at in (HEAD_BYTES + 20, len(signed) - 40, len(signed) - 1):  # header, payload, digest
        flipped = bytearray(signed)
        flipped[at] ^= 1
        assert _reason(UpdateVerifier([pub]), bytes(flipped)) in ("tampered", "bad_signature")
    assert _reason(UpdateVerifier([pub]), signed[:50]) == "tampered"
    assert bytes(strip(signed)) == UPDATE and bytes(strip(UPDATE)) == UPDATE


def test_a_rotation_accepts_both_keys_then_only_the_new_one() -> None:
    (old, old_pub), (new, new_pub) = generate_keypair(), generate_keypair()
    during = UpdateVerifier([old_pub, new_pub])
    for key in (old, new):
        assert decode_update(during.open(UpdateSigner(key).sign(UPDATE)))[0].version == 2
    after = UpdateVerifier([new_pub])
    assert _reason(after, UpdateSigner(old).sign(UPDATE)) == "unknown_key"
    assert decode_update(after.open(UpdateSigner(new).sign(UPDATE)))[0].version == 2


def test_a_replica_rereads_its_key_directory_no_restart(tmp_path: Path) -> None:
    """The rotation as an operator runs it: the new public key is dropped into the replicas'
    key directory (both accepted), the learner switches, the old public key is removed."""
    keys = tmp_path / "verify"
    keys.mkdir()
    old_priv, old_pub = write_keypair(tmp_path / "old")
    new_priv, new_pub = write_keypair(tmp_path / "new")
    old, new = UpdateSigner(load_private_key(old_priv)), UpdateSigner(load_private_key(new_priv))
    (keys / "old.pub").write_bytes(old_pub.read_bytes())
    verifier = verifier_from([keys])
    assert verifier is not None
    verifier._recheck_s = 0.0  # re-read on every update (the default: at most once a second)
    assert decode_update(verifier.open(old.sign(UPDATE)))[0].version == 2
    assert _reason(verifier, new.sign(UPDATE)) == "unknown_key"
    (keys / "new.pub").write_bytes(new_pub.read_bytes())
    for signer in (old, new):
        assert decode_update(verifier.open(signer.sign(UPDATE)))[0].version == 2
    (keys / "old.pub").unlink()
    assert _reason(verifier, old.sign(UPDATE)) == "unknown_key"
    (keys / "new.pub").write_bytes(b"half-written")  # a bad file: the keys it had stay
    assert decode_update(verifier.open(new.sign(UPDATE)))[0].version == 2


def test_key_files_and_where_keys_come_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    priv_path, pub_path = write_keypair(tmp_path / "k")
    assert stat.S_IMODE(os.stat(priv_path).st_mode) == 0o600
    signed = UpdateSigner(load_private_key(priv_path)).sign(UPDATE)
    assert decode_update(UpdateVerifier([load_public_key(pub_path)]).open(signed))[0].version == 2
    with pytest.raises(ValueError, match="not an Ed25519 private key"):
        load_private_key(_rsa_pem(tmp_path))
    monkeypatch.delenv("CTR_SIGNING_KEY", raising=False)
    monkeypatch.delenv("CTR_VERIFY_KEYS", raising=False)
    assert signer_from(None) is None and verifier_from(()) is None
    monkeypatch.setenv("CTR_SIGNING_KEY", str(priv_path))
    monkeypatch.setenv("CTR_VERIFY_KEYS", f"{pub_path}, {write_keypair(tmp_path / 'k2')[1]}")
    assert signer_from(None) is not None and len(verifier_from(()).key_ids) == 2  # type: ignore[union-attr]
    assert run_keys(tmp_path / "run") == (None, False)  # the environment's keys: none created
    monkeypatch.delenv("CTR_VERIFY_KEYS")
    made, created = run_keys(tmp_path / "run")
    assert created and made is not None and made.with_suffix(".pub").exists()


def _rsa_pem(tmp: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp / "rsa.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip
    return path


# --------------------------------------------------------------------------- against serving
class SignedPublisher(Publisher):
    """The hand-made updates of the serving tests, signed with ``signer`` (None: unsigned)."""

    def __init__(self, bootstrap: str, snapshots: Path, signer: UpdateSigner | None) -> None:
        super().__init__(bootstrap, snapshots)
        self.signer = signer

    def sign(self, parts: list[bytes], signer: UpdateSigner | None = None) -> list[bytes]:
        signer = signer or self.signer
        return [signer.sign(p) for p in parts] if signer is not None else parts

    def signed_snapshot(self, model: CTRModel, version: int, signer: UpdateSigner | None = None) -> Path:
        header = UpdateHeader(kind="snapshot", model_id=MODEL_ID, version=version, base_version=version,
                              model_config=MODEL.to_dict(), event_time_ms=T0_MS + version)
        path = self.snapshots / f"snapshot-{version:012d}.ctru"
        path.write_bytes(self.sign([encode_update(header, snapshot_tensors(model))], signer)[0])
        return path

    def signed_announce(self, path: Path, version: int, signer: UpdateSigner | None = None) -> None:
        header = UpdateHeader(kind="snapshot", model_id=MODEL_ID, version=version, base_version=version,
                              model_config=MODEL.to_dict(), snapshot_uri=str(path.resolve()))
        self.send(self.sign([encode_update(header, {})], signer))


def _request() -> dict:
    return {"user_id": "u1", "context": {"categorical": {"C1": "a"}},
            "candidates": [{"item_id": f"i{k}", "categorical": {"C5": f"v{k}"}} for k in range(8)]}


def _served(rep: Replica) -> tuple[int, list[float]]:
    r = rep.client.post("/predict", json=_request())
    assert r.status_code == 200, r.text
    body = r.json()
    return body["model_version"], [p["p_click"] for p in body["predictions"]]


def _rejected(rep: Replica, reason: str) -> float:
    return rep.metric("ctr_serving_updates_rejected_total", reason=reason)


def _wait_metric(rep: Replica, reason: str, at_least: float, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _rejected(rep, reason) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {reason} rejection counted\n{rep.tail()}")
        time.sleep(0.05)


@pytest.mark.integration
def test_only_the_learners_key_changes_what_is_served(broker, tmp_path: Path) -> None:
    from ctr.features.store import open_store

    bs = broker.bootstrap
    snapshots, feast_dir = tmp_path / "snapshots", tmp_path / "feast"
    snapshots.mkdir()
    open_store(feast_dir)
    keys = tmp_path / "keys"
    (old_priv, old_pub), (new_priv, new_pub) = write_keypair(keys / "old"), write_keypair(keys / "new")
    _, forger_pub = write_keypair(keys / "forger")
    old, new = UpdateSigner(load_private_key(old_priv)), UpdateSigner(load_private_key(new_priv))
    forger = UpdateSigner(load_private_key(keys / "forger" / "signing.key"))
    pub = SignedPublisher(bs, snapshots, old)
    torch.manual_seed(3)
    model = CTRModel(MODEL)
    with torch.no_grad():
        model.calibration.coef.copy_(torch.tensor([1.0, 0.0]))  # scores that depend on the rows
    pub.signed_announce(pub.signed_snapshot(model, 1), 1)

    # a: mid-rotation (old and new accepted); b: after it (new only)
    a = Replica(tmp_path, "a", bs, snapshots, feast_dir)
    a.args += ["--verify-key", str(old_pub), "--verify-key", str(new_pub)]
    b = Replica(tmp_path, "b", bs, snapshots, feast_dir)
    b.args += ["--verify-key", str(new_pub)]
    try:
        b.start()  # b cannot start from the old key's snapshot: it waits for the new key's
        a.start().wait_ready()
        assert a.wait_version(1)["version"] == 1
        before = _served(a)
        assert len(set(before[1])) > 1

        m2, ids = pub.perturbed(model)
        good = pub.delta(m2, ids, version=2, base=1)
        attacks = {
            "unknown_key": pub.sign(good, forger),  # a forged delta
            "unsigned": good,
            "tampered": [_flip(p, len(p) // 2) for p in pub.sign(good)],
            "bad_signature": [p[:12] + f[12:HEAD_BYTES] + p[HEAD_BYTES:]
                              for p, f in zip(pub.sign(good), pub.sign(good, forger), strict=True)],
        }  # fmt: skip
        for reason, parts in attacks.items():
            count = _rejected(a, reason)
            pub.send(parts)
            _wait_metric(a, reason, count + len(parts))
            assert _served(a) == before, reason  # the same version, the very same scores
        # a forged snapshot: a file signed by the forger, announced by the forger
        count = _rejected(a, "unknown_key")
        pub.signed_announce(pub.signed_snapshot(m2, 9, forger), 9, forger)
        _wait_metric(a, "unknown_key", count + 1)
        assert _served(a) == before
        (snapshots / "snapshot-000000000009.ctru").unlink()

        pub.send(pub.sign(good))  # the learner's own delta flows
        assert a.wait_version(2)["version"] == 2
        after = _served(a)
        assert after[0] == 2 and after[1] != before[1]
        pub.send(pub.sign(good))  # a replay of a signed old version changes nothing
        pub.send(pub.sign(pub.delta(model, ids, version=2, base=1)))  # nor one of v2 with other weights
        time.sleep(1.0)
        assert _served(a) == after and a.metric("ctr_serving_updates_skipped_total", reason="stale") >= 2

        # the rotation: the new key's versions reach both replicas; the old key's only a
        m3, ids3 = pub.perturbed(m2)
        pub.signed_announce(pub.signed_snapshot(m3, 3, new), 3, new)
        assert a.wait_version(3)["version"] == 3
        b.wait_ready()
        assert b.wait_version(3)["version"] == 3 and _served(b) == _served(a)
        m4, ids4 = pub.perturbed(m3)
        count = _rejected(b, "unknown_key")
        pub.send(pub.sign(pub.delta(m4, ids4, version=4, base=3), old))
        assert a.wait_version(4)["version"] == 4
        _wait_metric(b, "unknown_key", count + 1)
        assert _served(b)[0] == 3
        assert "BEGIN PRIVATE KEY" not in a.log.read_text() + b.log.read_text()
    finally:
        a.stop()
        b.stop()


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x10
    return bytes(out)


def test_ctr_keygen_writes_a_pair_and_never_overwrites(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from ctr.cli import app

    first = CliRunner().invoke(app, ["keygen", str(tmp_path / "k")])
    assert first.exit_code == 0, first.output
    made = json.loads(first.output)
    signer = UpdateSigner(load_private_key(made["private_key"]))
    assert made["key_id"] == signer.key_id.hex() and "PRIVATE" not in first.output
    verifier = UpdateVerifier([load_public_key(made["public_key"])])
    assert decode_update(verifier.open(signer.sign(UPDATE)))[0].version == 2
    again = CliRunner().invoke(app, ["keygen", str(tmp_path / "k")])
    assert again.exit_code == 2 and "not overwritten" in again.output
