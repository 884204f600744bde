"""The model-update wire and file format: versioned deltas and snapshots, no pickle.

One message (or snapshot file) is::

    b"CTRU" | u32 header length (little-endian) | header JSON | payload | SHA-256 of all before

The header (:class:`UpdateHeader`, msgspec-validated) lists every tensor with its name,
dtype, shape, offset and byte count; the trailing SHA-256 covers header and payload.
:func:`decode_update` checks all of it — checksum, magic, sizes, dtype whitelist, shapes
against byte counts, offsets inside the payload — before a single tensor is handed out, so a corrupt or
hostile update is rejected whole (:class:`UpdateError`), never half-applied.

A delta carries only the embedding rows touched since ``base_version`` (``table.ids`` +
``table.rows``) and, when they changed, the dense weights. A delta too big for one Kafka
message is split into ``parts`` by rows (:func:`split_delta`); a consumer applies a version
only once every part has arrived.

>>> import numpy as np
>>> tensors = {"table.ids": np.array([3, 9], dtype=np.int64), "table.rows": np.ones((2, 4), np.float16)}
>>> header = UpdateHeader(kind="delta", model_id="m1", version=2, base_version=1)
>>> h, t = decode_update(encode_update(header, tensors))
>>> (h.version, h.base_version, t["table.rows"].shape, t["table.rows"].dtype.name)
(2, 1, (2, 4), 'float16')
"""

from __future__ import annotations

import hashlib
import struct
import time
from typing import Annotated, Literal

import msgspec
import numpy as np

MAGIC = b"CTRU"
FORMAT_VERSION = 1
#: Only plain numeric dtypes: nothing that could carry objects or code.
DTYPES = {"float32", "float16", "bfloat16", "int64", "int32", "uint8"}
MAX_HEADER_BYTES = 1 << 20
MAX_UPDATE_BYTES = 1 << 31
#: Kafka's default message limit is 1 MB; stay under it with headroom.
MAX_PART_BYTES = 900_000

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]


class UpdateError(ValueError):
    """A model update that fails validation; ``str(err)`` says why."""


class TensorMeta(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    dtype: str
    shape: Annotated[list[NonNeg], msgspec.Meta(max_length=8)]
    offset: NonNeg
    nbytes: NonNeg


class GateDecision(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The learner's quality gate for this version (Alink-style AUC gate)."""

    passed: bool = True
    reason: str = ""
    window_auc: float | None = None
    served_auc: float | None = None
    #: False: the window did not yet hold enough clicks to compare, the version passed untested
    decided: bool = True


class UpdateHeader(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    format: int = FORMAT_VERSION
    kind: Literal["delta", "snapshot"]
    #: A learner lineage; a serving replica never mixes versions of two lineages.
    model_id: Name
    version: NonNeg
    #: The version a delta applies on top of (a snapshot repeats its own version).
    base_version: NonNeg
    part: NonNeg = 0
    parts: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1
    created_ms: NonNeg = 0
    #: Newest event time the learner had trained on at publish time (freshness).
    event_time_ms: NonNeg = 0
    examples_seen: NonNeg = 0
    metrics: dict[str, float] = {}
    gate: GateDecision = GateDecision()
    #: Model hyper-parameters, so a snapshot alone can rebuild the model (snapshots only).
    model_config: dict[str, object] = {}
    #: Where the snapshot file is, for snapshot announcements on the topic.
    snapshot_uri: str = ""
    tensors: list[TensorMeta] = []


_header_decoder = msgspec.json.Decoder(UpdateHeader)


def _dtype_name(arr: np.ndarray) -> str:
    name = arr.dtype.name
    if name not in DTYPES:
        raise UpdateError(f"dtype {name} not allowed in an update (allowed: {sorted(DTYPES)})")
    return name


def encode_update(header: UpdateHeader, tensors: dict[str, np.ndarray]) -> bytes:
    """Serialise ``header`` + ``tensors``; fills in tensor metadata, checksum and created_ms."""
    metas, chunks, offset = [], [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        data = arr.tobytes()
        metas.append(
            TensorMeta(name=name, dtype=_dtype_name(arr), shape=list(arr.shape), offset=offset, nbytes=len(data))
        )
        chunks.append(data)
        offset += len(data)
    payload = b"".join(chunks)
    header = msgspec.structs.replace(header, tensors=metas, created_ms=header.created_ms or int(time.time() * 1000))
    head = msgspec.json.encode(header)
    body = MAGIC + struct.pack("<I", len(head)) + head + payload
    return body + hashlib.sha256(body).digest()


def decode_header(data: bytes | memoryview | None) -> UpdateHeader:
    """Read and validate only the header (cheap: the checksum is not verified)."""
    return _split(memoryview(data)[:-_DIGEST] if data is not None and len(data) > _DIGEST else b"")[0]


_DIGEST = 32


def _split(data: bytes | memoryview | None) -> tuple[UpdateHeader, memoryview]:
    if data is None or len(data) < 8:
        raise UpdateError("update too short")
    if len(data) > MAX_UPDATE_BYTES:
        raise UpdateError(f"update of {len(data)} bytes exceeds {MAX_UPDATE_BYTES}")
    mv = memoryview(data)
    if bytes(mv[:4]) != MAGIC:
        raise UpdateError("not a model update (bad magic)")
    (hlen,) = struct.unpack("<I", mv[4:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(mv):
        raise UpdateError(f"header length {hlen} out of bounds")
    try:
        header = _header_decoder.decode(mv[8 : 8 + hlen])
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as err:
        raise UpdateError(f"bad header: {err}") from None
    if header.format != FORMAT_VERSION:
        raise UpdateError(f"unsupported update format {header.format}")
    if header.part >= header.parts:
        raise UpdateError(f"part {header.part} >= parts {header.parts}")
    return header, mv[8 + hlen :]


def decode_update(
    data: bytes | memoryview | None, *, digest_checked: bool = False
) -> tuple[UpdateHeader, dict[str, np.ndarray]]:
    """Validate everything, then return the header and freshly owned numpy tensors.

    ``digest_checked``: the body's SHA-256 was already compared with the digest (a signature
    verification does that), so it is not hashed twice."""
    if data is None or len(data) < 8 + _DIGEST:
        raise UpdateError("update too short")
    mv = memoryview(data)
    if not digest_checked and hashlib.sha256(mv[:-_DIGEST]).digest() != bytes(mv[-_DIGEST:]):
        raise UpdateError("checksum mismatch")
    header, payload = _split(mv[:-_DIGEST])
    tensors: dict[str, np.ndarray] = {}
    end = 0
    for meta in header.tensors:
        if meta.dtype not in DTYPES:
            raise UpdateError(f"tensor {meta.name}: dtype {meta.dtype} not allowed")
        if meta.name in tensors:
            raise UpdateError(f"tensor {meta.name} appears twice")
        dtype = np.dtype(meta.dtype) if meta.dtype != "bfloat16" else np.dtype("uint16")
        count = int(np.prod(meta.shape, dtype=np.int64)) if meta.shape else 1
        if count * dtype.itemsize != meta.nbytes:
            raise UpdateError(f"tensor {meta.name}: shape {meta.shape} x {meta.dtype} != {meta.nbytes} bytes")
        if meta.offset != end or meta.offset + meta.nbytes > len(payload):
            raise UpdateError(f"tensor {meta.name}: bytes [{meta.offset}, +{meta.nbytes}) out of place")
        end = meta.offset + meta.nbytes
        arr = np.frombuffer(payload[meta.offset : end], dtype=dtype).reshape(meta.shape).copy()
        tensors[meta.name] = arr
    if end != len(payload):
        raise UpdateError(f"{len(payload) - end} trailing payload bytes")
    return header, tensors


def split_delta(header: UpdateHeader, tensors: dict[str, np.ndarray], max_bytes: int = MAX_PART_BYTES) -> list[bytes]:
    """Encode a delta as one or more messages, splitting the touched rows across parts.

    Dense tensors (everything not ``table.*``) travel in part 0; ``table.ids``/``table.rows``
    are cut into row ranges so each part stays under ``max_bytes``.
    """
    ids, rows = tensors.get("table.ids"), tensors.get("table.rows")
    dense = {k: v for k, v in tensors.items() if not k.startswith("table.")}
    dense_bytes = sum(v.nbytes for v in dense.values())
    if ids is None or rows is None or len(ids) == 0:
        return [encode_update(header, tensors)]
    per_row = rows[0].nbytes + ids.itemsize
    first = max(1, (max_bytes - 4096 - dense_bytes) // per_row) if dense_bytes < max_bytes else 1
    rest = max(1, (max_bytes - 4096) // per_row)
    bounds = [0, min(len(ids), first)]
    while bounds[-1] < len(ids):
        bounds.append(min(len(ids), bounds[-1] + rest))
    parts = len(bounds) - 1
    out = []
    for i in range(parts):
        lo, hi = bounds[i], bounds[i + 1]
        part_tensors = {"table.ids": ids[lo:hi], "table.rows": rows[lo:hi], **(dense if i == 0 else {})}
        out.append(encode_update(msgspec.structs.replace(header, part=i, parts=parts), part_tensors))
    return out
