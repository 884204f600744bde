"""The label join's changelog record (:class:`JoinRecord`): one micro-batch of one partition, and
how its impressions are read back from the impressions topic when the record references them by
offset (:func:`inline_impressions`). The protocol around it: :mod:`~ctr.streams.agents.label_join_agent`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from ctr.infra.schema import WATERMARK_HEADER, Impression, SchemaError, decode_impression, encode  # noqa: F401 (the doctest)
from ctr.streams.watermarks import watermark_of


class JoinRecord(msgspec.Struct, array_like=True, frozen=True):
    """One micro-batch of one partition, as written to the join table's changelog.

    Its impressions are either copied (``impressions``) or referenced: ``imp_first..imp_last``
    is the offset range of the impressions partition the batch consumed, whose decodable
    non-control records are its ``imp_count`` impressions (:func:`impressions_in`). New
    fields go last, with defaults: records written by an older version still decode."""

    seq: int
    wm_before: int
    wm: int
    imp_max: int
    click_max: int
    imp_marker: int
    click_marker: int
    imp_hwm: int
    click_hwm: int
    confirmed: int
    impressions: list[bytes]
    clicks: list[tuple[str, int]]
    counters: dict[str, int]
    imp_first: int = -1
    imp_last: int = -1
    imp_count: int = 0

    @property
    def by_offsets(self) -> bool:
        """The impressions are referenced by offset, not copied into the record."""
        return self.imp_count > 0 and not self.impressions


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(JoinRecord)


def encode_record(rec: JoinRecord) -> bytes:
    return _record_encoder.encode(rec)


def decode_record(data: bytes) -> JoinRecord:
    return _record_decoder.decode(data)


def impressions_in(records: Iterable[tuple[int, bytes | None, Any]], first: int, last: int) -> list[bytes]:
    """The impressions a batch accepted from ``(offset, value, headers)`` records of its
    partition: those in ``first..last`` that are neither watermark control messages nor
    malformed (dead-lettered) -- the same test the agent applies, so re-reading a range gives
    back exactly the batch's impressions.

    >>> imp = encode(Impression(event_id="e1", event_time_ms=1, user_id="u", item_id="a"))
    >>> impressions_in([(4, imp, None), (5, b"{", None), (6, b"", [(WATERMARK_HEADER, b"9")]),
    ...                 (7, imp, None)], 4, 6) == [imp]
    True
    """
    out: list[bytes] = []
    for offset, value, headers in records:
        if offset < first or offset > last or (headers and watermark_of(headers) is not None):
            continue
        if value is None:  # a tombstone: no impression (the decoder refuses it too)
            continue
        try:
            decode_impression(value)
        except SchemaError:
            continue
        out.append(value)
    return out


def inline_impressions(rec: JoinRecord, records: Iterable[tuple[int, bytes | None, Any]]) -> JoinRecord:
    """``rec`` with its offset-referenced impressions copied in from ``records`` (read from
    its partition); raises if they are not the ones it consumed."""
    if not rec.by_offsets:
        return rec
    raws = impressions_in(records, rec.imp_first, rec.imp_last)
    if len(raws) != rec.imp_count:
        raise RuntimeError(
            f"join record {rec.seq}: impressions offsets {rec.imp_first}..{rec.imp_last} hold {len(raws)} "
            f"impressions now, the record consumed {rec.imp_count} (was the topic rewritten?)"
        )
    return msgspec.structs.replace(rec, impressions=raws)
