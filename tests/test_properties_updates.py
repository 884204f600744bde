"""Property tests of the model-update path as a serving replica runs it: a corrupted message
(byte flips, truncation, junk appended) is never applied, a well-checksummed update with a
wrong shape, dtype or value is rejected, and every rejection is counted on
``ctr_serving_updates_rejected_total`` — the counter ``/metrics`` exports.

Messages go through ``UpdateConsumer._handle`` (header triage, full decode, registry offer),
the exact per-message code of the live consumer, without a broker (the wire is covered in
test_serving and test_reliability_faults).
"""

from __future__ import annotations

import hashlib
import os
import struct

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from ctr.online_learner.delta import delta_tensors, snapshot_tensors
from ctr.online_learner.model import CTRModel, ModelConfig
from ctr.online_learner.update_format import MAGIC, UpdateHeader, encode_update, split_delta
from ctr.serving.registry import ModelRegistry
from ctr.serving.updates import UpdateConsumer

MODEL = ModelConfig(("site", "user_id", "item_id"), ("I1",), table_bits=9)
SETTINGS = settings(max_examples=int(os.environ.get("CTR_HYPOTHESIS_EXAMPLES", "200")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def counted() -> float:
    """Every message the consumer decided not to apply: rejected + skipped, all reasons."""
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name in ("ctr_serving_updates_rejected", "ctr_serving_updates_skipped"):
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


def rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("ctr_serving_updates_rejected_total", {"reason": reason}) or 0.0


def state_of(reg: ModelRegistry) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in reg.current.model.state_dict().items()}


def same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


class Replica:
    """A registry at v1 and the next version v2 as a valid (multi-part) delta."""

    def __init__(self, parts_max_bytes: int = 900_000) -> None:
        self.reg = ModelRegistry()
        model = CTRModel(MODEL)
        self.reg.install_snapshot(UpdateHeader(kind="snapshot", model_id="m", version=1, base_version=1,
                                               model_config=MODEL.to_dict()), snapshot_tensors(model))
        with torch.no_grad():
            model.table[:40] += 0.25
        self.want = delta_tensors(model, np.arange(40))
        self.header = UpdateHeader(kind="delta", model_id="m", version=2, base_version=1)
        self.parts = split_delta(self.header, self.want, max_bytes=parts_max_bytes)
        # no bootstrap is contacted: only the per-message path is used
        self.consumer = UpdateConsumer(self.reg, "127.0.0.1:9", snapshot_dir=None)
        self.before = state_of(self.reg)

    def handle(self, data: bytes) -> None:
        self.consumer._handle(data)

    def assert_untouched(self) -> None:
        assert self.reg.current.version == 1 and self.reg.head.version == 1
        assert same_state(self.before, state_of(self.reg)), "a rejected update changed the served model"


@pytest.fixture(scope="module")
def replica() -> Replica:
    return Replica()


# ----------------------------------------------------------------------------- corruption
@st.composite
def corrupted(draw: st.DrawFn, data: bytes) -> bytes:
    how = draw(st.sampled_from(["flip", "flips", "truncate", "append", "splice"]))
    buf = bytearray(data)
    if how in ("flip", "flips"):
        for _ in range(1 if how == "flip" else draw(st.integers(2, 20))):
            buf[draw(st.integers(0, len(buf) - 1))] ^= draw(st.integers(1, 255))
    elif how == "truncate":
        buf = buf[: draw(st.integers(0, len(buf) - 1))]
    elif how == "append":
        buf += draw(st.binary(min_size=1, max_size=64))
    else:
        at = draw(st.integers(0, len(buf)))
        buf[at:at] = draw(st.binary(min_size=1, max_size=64))
    out = bytes(buf)
    return out if out != data else out + b"\0"


@SETTINGS
@given(st.data())
def test_a_corrupted_message_is_never_applied_and_always_counted(replica: Replica, data) -> None:
    msg = replica.parts[0]
    bad = data.draw(corrupted(msg))
    n = counted()
    replica.handle(bad)
    replica.assert_untouched()
    assert counted() == n + 1, "every message not applied is counted (rejected or skipped)"


def test_the_valid_message_still_applies_after_the_corrupted_ones(replica: Replica) -> None:
    for part in replica.parts:
        replica.handle(part)
    assert replica.reg.current.version == 2
    table = replica.reg.current.model.table.detach().numpy()
    assert np.array_equal(table[:40], replica.want["table.rows"])


# ----------------------------------------------------------------------------- well-formed but wrong
def _reencode(data: bytes, change) -> bytes:
    """Rewrite the header JSON and recompute the checksum: wrong content, valid envelope."""
    (hlen,) = struct.unpack("<I", data[4:8])
    header = msgspec.json.decode(data[8 : 8 + hlen])
    payload = data[8 + hlen : -32]
    header, payload = change(header, payload)
    head = msgspec.json.encode(header)
    body = MAGIC + struct.pack("<I", len(head)) + head + payload
    return body + hashlib.sha256(body).digest()


def _tensor(header: dict, name: str) -> dict:
    return next(t for t in header["tensors"] if t["name"] == name)


def _retype(name: str, dtype: str):
    def change(h, p):
        _tensor(h, name)["dtype"] = dtype
        return h, p
    return change


def _reshape(name: str, shape):
    def change(h, p):
        t = _tensor(h, name)
        t["shape"] = shape(t["shape"])
        return h, p
    return change


def _rows_of(delta: dict[str, np.ndarray], **replace: np.ndarray) -> bytes:
    header = UpdateHeader(kind="delta", model_id="m", version=2, base_version=1)
    return encode_update(header, {**delta, **replace})


WRONG = {
    # envelope fine, tensor metadata inconsistent with the payload -> "invalid"
    "dtype not allowed (object)": ("invalid", lambda r: _reencode(r.parts[0], _retype("table.rows", "object"))),
    "dtype not allowed (float64)": ("invalid", lambda r: _reencode(r.parts[0], _retype("table.rows", "float64"))),
    "shape vs bytes": ("invalid", lambda r: _reencode(r.parts[0], _reshape("table.rows", lambda s: [s[0] + 1, s[1]]))),
    "wrong checksum": ("invalid", lambda r: r.parts[0][:-1] + bytes([r.parts[0][-1] ^ 1])),
    # decodes fine, does not fit the model -> "incompatible"; nothing is written
    "row width": ("incompatible", lambda r: _rows_of(r.want, **{"table.rows": np.zeros((40, 3), np.float32)})),
    "ids out of range": ("incompatible", lambda r: _rows_of(r.want, **{"table.ids": np.arange(40) + 10**9})),
    "ids dtype int32": ("incompatible", lambda r: _rows_of(r.want, **{"table.ids": np.arange(40, dtype=np.int32)})),
    "NaN rows": ("incompatible", lambda r: _rows_of(r.want, **{"table.rows": np.full_like(r.want["table.rows"],
                                                                                          np.nan)})),
    "unknown tensor": ("incompatible", lambda r: _rows_of(r.want, evil=np.zeros(3, np.float32))),
    "dense shape": ("incompatible", lambda r: _rows_of(r.want, **{k: np.zeros(7, np.float32) for k in r.want
                                                                   if k.startswith("dense.")} )),
    "hash seed changed": ("incompatible", lambda r: _rows_of(r.want, **{"dense.embedding.probe_seed":
                                                                        r.want["dense.embedding.probe_seed"] + 1})),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_checksum_shape_dtype_or_value_is_rejected_and_counted(case: str) -> None:
    rep = Replica()
    reason, make = WRONG[case]
    before = rejected(reason)
    rep.handle(make(rep))
    rep.assert_untouched()
    assert rejected(reason) == before + 1, f"{case}: not counted as {reason}"
    for part in rep.parts:  # the stream is not poisoned: the real v2 still applies
        rep.handle(part)
    assert rep.reg.current.version == 2


def test_a_multi_part_version_with_one_bad_part_is_applied_not_at_all() -> None:
    """Parts 0 and 2 valid, part 1 corrupted (or valid envelope, wrong rows): no half version."""
    for spoil in ("checksum", "rows"):
        rep = Replica(parts_max_bytes=4500)
        assert len(rep.parts) >= 3
        parts = list(rep.parts)
        if spoil == "checksum":
            parts[1] = parts[1][:-1] + bytes([parts[1][-1] ^ 1])
        else:
            def nan_rows(h, p):
                rows = _tensor(h, "table.rows")
                start = rows["offset"]
                p = p[:start] + np.full(rows["nbytes"] // 4, np.nan, np.float32).tobytes() + p[start + rows["nbytes"]:]
                return h, p
            parts[1] = _reencode(parts[1], nan_rows)
        for part in parts:
            rep.handle(part)
        rep.assert_untouched()
        assert rep.reg.status()["pending"] is None or rep.reg.status()["pending"]["parts"] < len(parts)
