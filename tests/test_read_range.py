"""``ctr.infra.kafka_io.read_range`` against the real brokers: what the label join reads back at
a restore when its changelog references impressions by offset."""

from __future__ import annotations

import pytest

from ctr.infra.kafka_io import DeliveryTracker, OffsetsGone, flush, make_producer, read_range

TOPIC = "impressions"  # 4 partitions, created by the broker fixture


@pytest.mark.integration
@pytest.mark.compat
def test_read_range_returns_exactly_the_offsets_asked_for(any_broker) -> None:
    p, tracker = make_producer(any_broker.bootstrap), DeliveryTracker()
    for n in range(300):
        p.produce(TOPIC, b"v%d" % n, partition=n % 2, on_delivery=tracker, headers=[("n", str(n).encode())])
        if n % 50 == 0:
            p.poll(0)
    flush(p, tracker)
    got = read_range(any_broker.bootstrap, TOPIC, 1, 20, 99)
    assert [m.offset() for m in got] == list(range(20, 100))
    assert [m.value() for m in got] == [b"v%d" % (2 * o + 1) for o in range(20, 100)]
    assert got[0].headers() == [("n", b"41")]
    assert [m.offset() for m in read_range(any_broker.bootstrap, TOPIC, 0, 149, 149)] == [149]
    with pytest.raises(OffsetsGone, match="before offset 400"):
        read_range(any_broker.bootstrap, TOPIC, 0, 140, 400, timeout_s=20)
