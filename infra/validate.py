"""Validation on the way in, shared by every confluent-kafka stage: decode a batch, send what
does not decode to the dead-letter topic, return the rest."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from confluent_kafka import Message

from ctr.infra.deadletter import DeadLetterSink
from ctr.infra.schema import WATERMARK_HEADER, SchemaError

T = TypeVar("T")


def decode_batch(msgs: Sequence[Message], decode: Callable[[bytes], T], sink: DeadLetterSink) -> list[T]:
    """Decode each message; a :class:`SchemaError` sends it to ``sink`` and the batch goes on.
    Watermark control messages (:data:`~ctr.infra.schema.WATERMARK_HEADER`) are not data: skipped."""
    out: list[T] = []
    for m in msgs:
        headers = m.headers()
        if isinstance(headers, list) and any(k == WATERMARK_HEADER for k, _ in headers):
            continue
        value = m.value() or b""  # a tombstone is not an event: the decoder refuses b""
        try:
            out.append(decode(value))
        except SchemaError as err:
            sink.send(
                str(err), value, source_topic=m.topic() or "", partition=m.partition(), offset=m.offset(), key=m.key()
            )
    return out
