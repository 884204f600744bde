"""What signing model updates costs: the learner signs each message, serving verifies it.

    python -m bench.signing --json bench/results/signing.json

Deltas of the learner's shape (table rows: an int64 id + 4 float32 each, plus the dense
weights' bytes) at three sizes, the middle one the size of the learner bench's median delta.
Per update: encoding (for scale), signing (one Ed25519 signature over the update's digest),
verifying (the signature, then the body's SHA-256 against the digest), and decoding with the
checksum (unsigned updates) or without it (after a verification, which hashed the body).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from bench.common import report, timings

ROWS = (5_000, 40_000, 160_000)
TARGET_MS = 1.0


def _ms(fn: Callable[[], object], repeat: int) -> float:
    return float(np.median(timings(fn, repeat))) * 1000


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=Path("bench/results/signing.json"))
    p.add_argument("--repeat", type=int, default=30)
    a = p.parse_args(argv)

    from ctr.online_learner.signing import UpdateSigner, UpdateVerifier, generate_keypair
    from ctr.online_learner.update_format import UpdateHeader, decode_update, encode_update

    priv, pub = generate_keypair()
    signer, verifier = UpdateSigner(priv), UpdateVerifier([pub])
    rng = np.random.default_rng(0)
    rows = []
    for n in ROWS:
        tensors = {"table.ids": np.sort(rng.choice(1 << 22, n, replace=False)).astype(np.int64),
                   "table.rows": rng.normal(size=(n, 4)).astype(np.float32),
                   "dense": rng.normal(size=20_000).astype(np.float32)}  # fmt: skip
        header = UpdateHeader(kind="delta", model_id="bench", version=2, base_version=1)
        update = encode_update(header, tensors)
        signed = signer.sign(update)
        opened = verifier.open(signed)
        rows.append({
            "rows": n, "bytes": len(update),
            "encode_ms": round(_ms(partial(encode_update, header, tensors), a.repeat), 3),
            "sign_ms": round(_ms(partial(signer.sign, update), a.repeat), 3),
            "verify_ms": round(_ms(partial(verifier.open, signed), a.repeat), 3),
            "decode_with_checksum_ms": round(_ms(partial(decode_update, update), a.repeat), 3),
            "decode_after_verify_ms": round(_ms(partial(decode_update, opened, digest_checked=True), a.repeat), 3),
        })  # fmt: skip
    mid = next(r for r in rows if r["rows"] == ROWS[1])
    added = mid["sign_ms"] + mid["verify_ms"] + mid["decode_after_verify_ms"] - mid["decode_with_checksum_ms"]
    extra = {"target": {"what": f"signing + verification add <= {TARGET_MS:g} ms to a {mid['bytes'] / 1e6:.1f} MB "
                                "delta (the learner bench's median delta)",
                        "added_ms": round(added, 3), "met": added <= TARGET_MS}}  # fmt: skip
    report("Signed model updates: cost per update (one thread)", rows, a.json, extra)


if __name__ == "__main__":
    main()
