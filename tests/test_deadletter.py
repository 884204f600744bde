"""Malformed input lands in the dead-letter topic with a reason; the stage keeps going."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctr.infra.deadletter import DeadLetterSink, read_dead_letter
from ctr.infra.kafka_io import DeliveryTracker, flush, make_consumer, make_producer, produce
from ctr.infra.schema import (
    MAX_MESSAGE_BYTES,
    Impression,
    SchemaError,
    decode_click,
    decode_impression,
    decode_training_example,
    encode,
)
from ctr.infra.topics import IMPRESSIONS_TOPIC
from ctr.infra.validate import decode_batch
from tests.kafka_helpers import read_topic_confluent

GOOD = Impression(event_id="ok1", event_time_ms=1, user_id="u", item_id="a")
BAD = {
    b'{"event_id": "x", "event_time_ms": 1, "user_id": "u", "item_id"': "malformed JSON",
    b'{"event_id": "x", "event_time_ms": "yesterday", "user_id": "u", "item_id": "a"}': "Expected `int`",
    b'{"event_id": "x", "user_id": "u", "item_id": "a"}': "missing required field `event_time_ms`",
    b'{"event_id": "", "event_time_ms": 1, "user_id": "u", "item_id": "a"}': "length >= 1",
    b'{"event_id": "x", "event_time_ms": -5, "user_id": "u", "item_id": "a"}': "Expected `int` >= 0",
    b'{"event_id": "x", "event_time_ms": 1, "user_id": "u", "item_id": "a", "extra": 1}': "unknown field",
    b"[1, 2, 3]": "Expected `object`",
    b"\xff\xfe\x00garbage": "malformed JSON",
    b"": "malformed JSON",
    b'{"event_id": "\xed\xa0\x80", "event_time_ms": 1, "user_id": "u", "item_id": "a"}': "malformed JSON",
    b'{"event_id": "' + b"x" * MAX_MESSAGE_BYTES + b'"}': "bytes >",
}


def test_malformed_messages_go_to_dead_letter(broker, group_id: str) -> None:
    producer, tracker = make_producer(broker.bootstrap), DeliveryTracker()
    produce(producer, IMPRESSIONS_TOPIC, encode(GOOD), b"ok1", tracker)
    for raw in BAD:
        produce(producer, IMPRESSIONS_TOPIC, raw, b"bad", tracker)
    produce(producer, IMPRESSIONS_TOPIC, encode(GOOD), b"ok2", tracker)
    flush(producer, tracker)

    sink = DeadLetterSink("test", lambda t, k, v, h: produce(producer, t, v, k, tracker, headers=h))
    consumer = make_consumer(broker.bootstrap, group_id)
    consumer.subscribe([IMPRESSIONS_TOPIC])
    good, seen = [], 0
    while seen < len(BAD) + 2:
        msgs = [m for m in consumer.consume(100, 1.0) if m.error() is None]
        seen += len(msgs)
        good += decode_batch(msgs, decode_impression, sink)
    consumer.close()
    flush(producer, tracker)

    assert good == [GOOD, GOOD] and sink.count == len(BAD)
    letters = [
        read_dead_letter(m.value(), m.headers())
        for m in read_topic_confluent(broker.bootstrap, "dead-letter", len(BAD), group_id + "-dlq")
    ]
    assert len(letters) == len(BAD)
    by_original = {bytes(letter.original): letter for letter in letters}
    for raw, reason in BAD.items():
        letter = by_original[raw]  # the original bytes are kept verbatim
        assert reason in letter.reason, (reason, letter.reason)
        assert letter.source_topic == IMPRESSIONS_TOPIC and letter.stage == "test"
        assert letter.offset is not None and letter.partition is not None


@pytest.mark.parametrize("raw", list(BAD))
def test_decoder_never_raises_anything_but_schema_error(raw: bytes) -> None:
    with pytest.raises(SchemaError):
        decode_impression(raw)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300) | st.from_regex(rb'\{"event_id": ".{0,5}", "event_time_ms": .{0,4}\}', fullmatch=True))
def test_decoders_raise_only_schema_error(raw: bytes) -> None:
    for decode in (decode_impression, decode_click, decode_training_example):
        try:
            decode(raw)
        except SchemaError:
            pass
