"""Dead-letter routing: a malformed message is kept, counted, and processing continues.

The format follows Kafka Connect's dead-letter convention: the message value is the
**original bytes, unchanged** (so nothing is lost, whatever was wrong with them) and the
reason and provenance travel in headers (``ctr.dlq.*``). :func:`read_dead_letter` turns a
consumed message back into a :class:`~ctr.infra.schema.DeadLetter`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from prometheus_client import Counter

from ctr.infra.schema import DeadLetter
from ctr.infra.topics import DEAD_LETTER_TOPIC

DEAD_LETTERS = Counter("ctr_dead_letters_total", "Messages sent to the dead-letter topic", ["stage", "source_topic"])
_PREFIX = "ctr.dlq."

#: Message headers in the form confluent-kafka's ``produce`` takes (its ``HeadersType``, as a
#: list); the values written here are all bytes.
Headers = list[tuple[str, str | bytes | None]]
#: ``send(topic, key, value, headers)`` — a confluent-kafka produce or a Faust topic send.
SendFn = Callable[[str, bytes | None, bytes, Headers], None]


class DeadLetterSink:
    """One dead-letter format and one counter for every stage, whatever client it uses.

    >>> sent = []
    >>> sink = DeadLetterSink("doc", lambda topic, key, value, headers: sent.append((topic, value, headers)))
    >>> sink.send("malformed JSON", b'{"bad', source_topic="impressions", partition=0, offset=7)
    >>> topic, value, headers = sent[0]
    >>> topic, value, sink.count
    ('dead-letter', b'{"bad', 1)
    >>> dict(headers)["ctr.dlq.reason"]
    b'malformed JSON'
    """

    def __init__(self, stage: str, send: SendFn, topic: str = DEAD_LETTER_TOPIC) -> None:
        self.stage = stage
        self._send = send
        self.topic = topic
        self.count = 0

    def send(
        self,
        reason: str,
        original: bytes | None,
        *,
        source_topic: str,
        partition: int | None = None,
        offset: int | None = None,
        key: bytes | None = None,
    ) -> None:
        headers: Headers = [
            (_PREFIX + "reason", reason[:2000].encode()),
            (_PREFIX + "stage", self.stage.encode()),
            (_PREFIX + "source_topic", source_topic.encode()),
            (_PREFIX + "failed_at_ms", str(int(time.time() * 1000)).encode()),
        ]
        if partition is not None:
            headers.append((_PREFIX + "partition", str(partition).encode()))
        if offset is not None:
            headers.append((_PREFIX + "offset", str(offset).encode()))
        self._send(self.topic, key, bytes(original or b""), headers)
        self.count += 1
        DEAD_LETTERS.labels(self.stage, source_topic).inc()


def read_dead_letter(value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None) -> DeadLetter:
    """Rebuild a :class:`DeadLetter` from a consumed dead-letter message."""
    h = {k[len(_PREFIX) :]: (v or b"").decode() for k, v in (headers or []) if k.startswith(_PREFIX)}

    def opt_int(name: str) -> int | None:
        return int(h[name]) if name in h else None

    return DeadLetter(
        reason=h.get("reason", ""),
        source_topic=h.get("source_topic", ""),
        stage=h.get("stage", ""),
        original=bytes(value or b""),
        partition=opt_int("partition"),
        offset=opt_int("offset"),
        failed_at_ms=opt_int("failed_at_ms") or 0,
    )
