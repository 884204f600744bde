"""Feature-delta messages: the count deltas the label join sends the windowed-feature agent, one
:class:`DeltaBatch` per feature partition and join batch, versioned ``(source partition, seq)``
so each is applied once. Only the join knows a click's impression, so the counts start there.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Sequence
from functools import reduce
from typing import TYPE_CHECKING

import msgspec

from ctr.features.spec import FeatureSpec, field_value_key
from ctr.infra.schema import Impression

if TYPE_CHECKING:
    from ctr.streams.agents.label_join import StepOutput

#: Entity kinds, indexed as in :data:`DeltaRow` (0 user, 1 item, 2 field_value).
ENTITY_KINDS: tuple[str, ...] = ("user", "item", "field_value")

#: ``(kind index, entity key, hop bucket, impressions delta, clicks delta)``
DeltaRow = tuple[int, str, int, int, int]


def bucket_ms(spec: FeatureSpec) -> int:
    """Width of the count buckets: the gcd of every window's hop (60 s for the default spec)."""
    return 1000 * reduce(math.gcd, (w.hop_s for w in spec.windows))


def impression_entities(imp: Impression, fields: Sequence[str]) -> list[tuple[int, str]]:
    """The entities an impression counts for: its user, its item, and ``field=value`` for each
    configured field present in ``imp.categorical``."""
    out = [(0, imp.user_id), (1, imp.item_id)]
    cat = imp.categorical
    for f in fields:
        v = cat.get(f)
        if v is not None:
            out.append((2, field_value_key(f, v)))
    return out


class DeltaBatch(msgspec.Struct, array_like=True, frozen=True):
    """Count deltas of one join batch for the entities of one feature partition.
    ``(src, seq)`` is the version: the feature agent applies each at most once."""

    src: int
    seq: int
    max_time: int
    rows: list[tuple[int, str, int, int, int]]


_delta_encoder = msgspec.msgpack.Encoder()
_delta_decoder = msgspec.msgpack.Decoder(DeltaBatch)


def encode_deltas(batch: DeltaBatch) -> bytes:
    return _delta_encoder.encode(batch)


def decode_deltas(data: bytes) -> DeltaBatch:
    return _delta_decoder.decode(data)


_partition_caches: dict[int, tuple[dict[str, int], ...]] = {}


def entity_partition(kind: int, key: str, partitions: int) -> int:
    """Feature partition of an entity: CRC-32 of the key seeded with the kind -- stable across
    processes and restarts (Python's ``hash`` is salted per process). Cached (bounded)."""
    caches = _partition_caches.get(partitions)
    if caches is None:
        caches = _partition_caches[partitions] = tuple({} for _ in ENTITY_KINDS)
    cache = caches[kind]
    d = cache.get(key)
    if d is None:
        if len(cache) > 1_000_000:
            cache.clear()
        d = cache[key] = zlib.crc32(key.encode(), kind) % partitions
    return d


def split_deltas(src: int, seq: int, max_time: int, out: StepOutput, partitions: int) -> list[DeltaBatch]:
    """One :class:`DeltaBatch` per feature partition (empty ones too: each carries the
    source's progress, ``max_time``). A key may appear twice in a batch (once with its
    impressions, once with its clicks); the feature agent adds them up."""
    rows: list[list[DeltaRow]] = [[] for _ in range(partitions)]
    appenders = [r.append for r in rows]
    entity_partition(0, "", partitions)
    caches = _partition_caches[partitions]
    for keys, which in ((out.imp_keys, 0), (out.click_keys, 1)):
        if not keys:
            continue
        for (kind, key, bucket), n in Counter(keys).items():
            d = caches[kind].get(key)
            if d is None:
                d = entity_partition(kind, key, partitions)
            appenders[d]((kind, key, bucket, n, 0) if which == 0 else (kind, key, bucket, 0, n))
    return [DeltaBatch(src, seq, max_time, r) for r in rows]
