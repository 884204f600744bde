"""Signed model updates: the learner signs every update it publishes, serving verifies before
it reads a byte of it (Ed25519).

An encoded update (:func:`~ctr.online_learner.update_format.encode_update`) ends with the
SHA-256 of its body. A signed update is that encoded update behind an envelope::

    b"CTRS" | key id (8 bytes: SHA-256 of the raw public key) | Ed25519 signature (64) | update

The signature covers ``b"ctr-update-v1" + digest``; :meth:`UpdateVerifier.open` checks the
signature with the public key the id names, then that the digest is the body's (so a flipped
bit anywhere is caught), and returns the update. Signing a 1 s delta costs one signature over
32 bytes; verifying it, one verification plus the hash the checksum needed anyway.

Keys are PEM files (PKCS8 private, SubjectPublicKeyInfo public), named by ``--signing-key`` /
``$CTR_SIGNING_KEY`` (the learner) and ``--verify-key`` / ``$CTR_VERIFY_KEYS`` (serving; several
keys, comma-separated, or a directory of ``*.pub`` files, are accepted at once, and re-read
when they change: a key rotation publishes with the new key while replicas still accept the
old one, with no restart). The keys themselves never appear in a log line: only their ids do.

>>> from ctr.online_learner.update_format import UpdateHeader, decode_update, encode_update
>>> update = encode_update(UpdateHeader(kind="delta", model_id="m", version=2, base_version=1), {})
>>> priv, pub = generate_keypair()
>>> signed = UpdateSigner(priv).sign(update)
>>> decode_update(UpdateVerifier([pub]).open(signed))[0].version
2
>>> try:
...     UpdateVerifier([generate_keypair()[1]]).open(signed)
... except SignatureError as err:
...     print(err.reason)
unknown_key
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

ENVELOPE = b"CTRS"
_KEY_ID = 8
_SIG = 64
HEAD_BYTES = len(ENVELOPE) + _KEY_ID + _SIG
_DIGEST = 32
_DOMAIN = b"ctr-update-v1"
SIGNING_KEY_ENV = "CTR_SIGNING_KEY"
VERIFY_KEYS_ENV = "CTR_VERIFY_KEYS"


class SignatureError(ValueError):
    """An update that is not signed by an accepted key; ``reason`` labels the refusal metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def key_id(public: Ed25519PublicKey) -> bytes:
    """8 bytes naming a public key (in envelopes and logs; not secret)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:_KEY_ID]


def is_signed(data: bytes | memoryview) -> bool:
    return bytes(data[: len(ENVELOPE)]) == ENVELOPE


def strip(data: bytes | memoryview) -> memoryview:
    """The update inside an envelope, unverified (or ``data`` itself when not signed): for
    readers that only need the header of their own updates (the learner's version counter)."""
    mv = memoryview(data)
    return mv[HEAD_BYTES:] if is_signed(mv) else mv


def open_update(data: bytes | memoryview | None, verifier: UpdateVerifier | None) -> memoryview:
    """The update in ``data``: verified when there is a verifier (raises :class:`SignatureError`),
    else with any envelope stripped unchecked (a reader configured to accept unsigned updates)."""
    if verifier is not None:
        return verifier.open(data)
    return strip(data if data is not None else b"")


class UpdateSigner:
    """Signs encoded updates with one private key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._key = private
        self.key_id = key_id(private.public_key())

    def sign(self, update: bytes) -> bytes:
        """``update`` (an encoded update, ending with its digest) in a signed envelope."""
        if len(update) < _DIGEST:
            raise ValueError("not an encoded update")
        return ENVELOPE + self.key_id + self._key.sign(_DOMAIN + update[-_DIGEST:]) + update


class UpdateVerifier:
    """Accepts updates signed by any of ``public_keys``; refuses everything else.

    Built :meth:`from_files`, it re-reads its key files (a directory: every ``*.pub`` in it)
    when they change, checked at most every ``recheck_s``: a key rotation needs no restart."""

    def __init__(self, public_keys: Sequence[Ed25519PublicKey], sources: Sequence[Path] = (),
                 recheck_s: float = 1.0) -> None:
        if not public_keys:
            raise ValueError("a verifier needs at least one public key")
        self._keys = {key_id(k): k for k in public_keys}
        self._sources, self._recheck_s = list(sources), recheck_s
        self._checked = time.monotonic()
        self._stamp = _stamp(self._sources)

    @classmethod
    def from_files(cls, paths: Sequence[Path | str], recheck_s: float = 1.0) -> UpdateVerifier:
        sources = [Path(p) for p in paths]
        return cls(_load_keys(sources), sources, recheck_s)

    @property
    def key_ids(self) -> list[str]:
        return [k.hex() for k in self._keys]

    def _reload(self) -> None:
        self._checked = time.monotonic()
        stamp = _stamp(self._sources)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            keys = _load_keys(self._sources)
        except (OSError, ValueError) as err:  # a half-written or wrong file: keep the keys we have
            log.error("public keys not reloaded (keeping %s): %s", ", ".join(self.key_ids), err)
            return
        self._keys = {key_id(k): k for k in keys}
        log.warning("public keys reloaded: updates must be signed by key %s", ", ".join(self.key_ids))

    def open(self, data: bytes | memoryview | None) -> memoryview:
        """The verified update inside ``data``. Raises :class:`SignatureError` (reasons:
        ``unsigned``, ``unknown_key``, ``bad_signature``, ``tampered``)."""
        if self._sources and time.monotonic() - self._checked >= self._recheck_s:
            self._reload()
        if data is None or not is_signed(data):
            raise SignatureError("unsigned", "no signature envelope")
        mv = memoryview(data)
        if len(mv) < HEAD_BYTES + _DIGEST:
            raise SignatureError("tampered", "envelope too short")
        kid = bytes(mv[4 : 4 + _KEY_ID])
        key = self._keys.get(kid)
        if key is None:
            accepted = len(self._keys)
            raise SignatureError("unknown_key", f"signed with key {kid.hex()} (not one of the {accepted} accepted)")
        update = mv[HEAD_BYTES:]
        digest = bytes(update[-_DIGEST:])
        try:
            key.verify(bytes(mv[4 + _KEY_ID : HEAD_BYTES]), _DOMAIN + digest)
        except InvalidSignature:
            raise SignatureError("bad_signature", f"signature does not verify with key {kid.hex()}") from None
        if hashlib.sha256(update[:-_DIGEST]).digest() != digest:
            raise SignatureError("tampered", "the update's bytes are not the ones signed")
        return update


# -- keys ----------------------------------------------------------------------------------------
def generate_keypair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    private = Ed25519PrivateKey.generate()
    return private, private.public_key()


def write_keypair(directory: Path, public_directory: Path | None = None) -> tuple[Path, Path]:
    """A new key pair: ``signing.key`` (private, mode 0600) in ``directory``, ``signing.pub`` in
    ``public_directory`` (default: the same)."""
    public_directory = public_directory or directory
    for d in (directory, public_directory):
        d.mkdir(parents=True, exist_ok=True)
    private, public = generate_keypair()
    priv_path, pub_path = directory / "signing.key", public_directory / "signing.pub"
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    pub_path.write_bytes(public.public_bytes(serialization.Encoding.PEM, spki))
    return priv_path, pub_path


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def _key_files(sources: Sequence[Path]) -> list[Path]:
    return [f for p in sources for f in (sorted(p.glob("*.pub")) if p.is_dir() else [p])]


def _stamp(sources: Sequence[Path]) -> tuple[tuple[str, float], ...]:
    out = []
    for f in _key_files(sources):
        try:
            out.append((str(f), f.stat().st_mtime))
        except OSError:
            out.append((str(f), -1.0))
    return tuple(out)


def _load_keys(sources: Sequence[Path]) -> list[Ed25519PublicKey]:
    keys = [load_public_key(f) for f in _key_files(sources)]
    if not keys:
        raise ValueError(f"no public key in {', '.join(map(str, sources))}")
    return keys


def signer_from(path: Path | str | None) -> UpdateSigner | None:
    """The learner's signer: ``path``, else ``$CTR_SIGNING_KEY``, else None (unsigned)."""
    path = path or os.environ.get(SIGNING_KEY_ENV) or None
    return UpdateSigner(load_private_key(path)) if path else None


def verifier_from(paths: Sequence[Path | str] = ()) -> UpdateVerifier | None:
    """Serving's verifier: ``paths`` (PEM files, or directories of ``*.pub``), else
    ``$CTR_VERIFY_KEYS`` (comma-separated), else None (updates are accepted unsigned, as before
    signing existed). The files are re-read when they change."""
    given = [str(p) for p in paths] or [p.strip() for p in os.environ.get(VERIFY_KEYS_ENV, "").split(",") if p.strip()]
    return UpdateVerifier.from_files(given) if given else None


def run_keys(directory: Path) -> tuple[Path | None, bool]:
    """The signing key of a stack started here (``ctr demo`` / ``ctr up``): None when
    ``$CTR_SIGNING_KEY`` and ``$CTR_VERIFY_KEYS`` are both set (the stages read them), else a
    new pair in ``directory`` (``signing.key`` / ``signing.pub``). Returns the private key's
    path (the public one beside it) and whether the pair was created."""
    if os.environ.get(SIGNING_KEY_ENV) and os.environ.get(VERIFY_KEYS_ENV):
        return None, False
    private, _ = write_keypair(directory)
    return private, True


def stage_flags(private: Path | None) -> tuple[list[str], list[str]]:
    """``ctr learn`` and ``ctr serve`` flags for :func:`run_keys`' result."""
    if private is None:
        return [], []
    return ["--signing-key", str(private)], ["--verify-key", str(private.with_suffix(".pub"))]
