"""The model-update format: round trip, splitting, and rejection of anything corrupt."""

from __future__ import annotations

import hashlib
import struct

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctr.online_learner.update_format import (
    MAGIC,
    UpdateError,
    UpdateHeader,
    decode_update,
    encode_update,
    split_delta,
)

HEADER = UpdateHeader(kind="delta", model_id="m", version=5, base_version=4)


def _tensors(n: int = 100, d: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "table.ids": rng.choice(1 << 20, n, replace=False).astype(np.int64),
        "table.rows": rng.normal(size=(n, d)).astype(np.float32),
        "head.w": rng.normal(size=(16, 4)).astype(np.float32),
    }


def test_round_trip_is_exact() -> None:
    t = _tensors()
    h, back = decode_update(encode_update(HEADER, t))
    assert (h.version, h.base_version, h.kind) == (5, 4, "delta")
    for k in t:
        assert back[k].dtype == t[k].dtype and np.array_equal(back[k], t[k])


def test_split_parts_reassemble_and_fit() -> None:
    t = _tensors(n=50_000, d=16)
    parts = split_delta(HEADER, t, max_bytes=200_000)
    assert len(parts) > 1 and all(len(p) <= 200_000 for p in parts)
    decoded = [decode_update(p) for p in parts]
    assert [h.part for h, _ in decoded] == list(range(len(parts)))
    assert all(h.parts == len(parts) and h.version == 5 for h, _ in decoded)
    ids = np.concatenate([x["table.ids"] for _, x in decoded])
    rows = np.concatenate([x["table.rows"] for _, x in decoded])
    assert np.array_equal(ids, t["table.ids"]) and np.array_equal(rows, t["table.rows"])
    assert "head.w" in decoded[0][1] and all("head.w" not in x for _, x in decoded[1:])


def test_wrong_checksum_is_rejected() -> None:
    data = bytearray(encode_update(HEADER, _tensors()))
    data[-1] ^= 0xFF
    with pytest.raises(UpdateError, match="checksum"):
        decode_update(bytes(data))


def _rewrite_header(data: bytes, **changes) -> bytes:
    (hlen,) = struct.unpack("<I", data[4:8])
    header = msgspec.json.decode(data[8 : 8 + hlen])
    payload = data[8 + hlen : -32]
    for k, v in changes.items():
        header[k] = v(header[k]) if callable(v) else v
    head = msgspec.json.encode(header)
    body = MAGIC + struct.pack("<I", len(head)) + head + payload
    return body + hashlib.sha256(body).digest()  # a well-formed checksum over a bad header


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"tensors": lambda ts: [{**ts[0], "shape": [ts[0]["shape"][0] + 1]}, *ts[1:]]}, "bytes"),
        ({"tensors": lambda ts: [{**ts[0], "dtype": "object"}, *ts[1:]]}, "not allowed"),
        ({"tensors": lambda ts: [{**ts[0], "dtype": "float64"}, *ts[1:]]}, "not allowed"),
        ({"tensors": lambda ts: [{**ts[1], "name": ts[0]["name"]}, ts[0], *ts[2:]]}, "out of place|twice"),
        ({"format": 99}, "unsupported"),
        ({"part": 3, "parts": 2}, "part"),
        ({"version": -1}, "bad header"),
        ({"kind": "exec"}, "bad header"),
    ],
)
def test_wrong_shape_dtype_or_header_is_rejected(change, reason) -> None:
    with pytest.raises(UpdateError, match=reason):
        decode_update(_rewrite_header(encode_update(HEADER, _tensors()), **change))


def test_disallowed_dtype_cannot_be_encoded() -> None:
    with pytest.raises(UpdateError):
        encode_update(HEADER, {"x": np.array(["a"], dtype=object)})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        decode_update(data)
    except UpdateError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=255))
def test_any_single_byte_flip_is_rejected(pos: int, flip: int) -> None:
    data = bytearray(encode_update(HEADER, _tensors(n=20)))
    data[pos % len(data)] ^= flip
    with pytest.raises(UpdateError):
        decode_update(bytes(data))
