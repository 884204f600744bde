"""The contiguity guard (pure logic): chunks that continue the state pass, skips are dropped and
repaired by a seek, gaps the broker confirms are accepted. The integration side -- a worker
whose group position runs ahead of the join's state -- is in tests/test_stream_agents.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace as NS

from faust.types import TP

from ctr.streams.contiguity import ContiguityGuard

IMP, CLK = TP("impressions", 0), TP("clicks", 0)


def chunk(tp: TP, first: int, last: int) -> NS:
    return NS(tp=tp, records=[NS(offset=o) for o in range(first, last + 1)])


class Broker:
    """The first record at or after an offset, over a log with ``holes`` (offsets with no record)."""

    def __init__(self, end: int = 1_000, holes: range = range(0)) -> None:
        self.end, self.holes, self.asked = end, holes, []

    async def __call__(self, tp: TP, offset: int) -> int | None:
        self.asked.append((tp, offset))
        while offset in self.holes:
            offset += 1
        return offset if offset < self.end else None


def admit(guard: ContiguityGuard, chunks: list, expected: dict) -> tuple[list[tuple], dict]:
    out = asyncio.run(guard.admit(chunks, expected.get))
    return [(c.tp.topic, c.records[0].offset) for c in out.chunks], out.seeks


def test_contiguous_and_overlapping_chunks_pass_without_asking_the_broker():
    broker = Broker()
    guard = ContiguityGuard(broker)
    got, seeks = admit(guard, [chunk(IMP, 5, 9), chunk(IMP, 8, 12), chunk(IMP, 13, 20), chunk(CLK, 0, 3)],
                       {IMP: 7, CLK: 0})  # fmt: skip
    assert got == [("impressions", 5), ("impressions", 8), ("impressions", 13), ("clicks", 0)]
    assert seeks == {} and broker.asked == [] and guard.dropped == 0


def test_a_skip_drops_the_partitions_chunks_and_seeks_back_other_partitions_go_on():
    broker = Broker()
    guard = ContiguityGuard(broker)
    got, seeks = admit(guard, [chunk(IMP, 10, 19), chunk(IMP, 50, 59), chunk(CLK, 3, 4), chunk(IMP, 20, 29)],
                       {IMP: 10, CLK: 3})  # fmt: skip
    # 10..19 continue the state; 50.. skipped 20..49; 20..29 comes after the skip in the batch
    # and is dropped with it (the seek re-fetches it in order)
    assert got == [("impressions", 10), ("clicks", 3)]
    assert seeks == {IMP: 20}
    assert broker.asked == [(IMP, 20)]
    assert (guard.repaired, guard.dropped, guard.accepted) == (1, 2, 0)


def test_stale_chunks_after_a_repair_are_dropped_without_asking_again_and_the_refetch_passes():
    broker = Broker()
    guard = ContiguityGuard(broker, reseek_after_s=60)
    assert admit(guard, [chunk(IMP, 500, 599)], {IMP: 100})[1] == {IMP: 100}
    # more stale chunks from before the seek: dropped, same question not asked, no second seek
    got, seeks = admit(guard, [chunk(IMP, 600, 699)], {IMP: 100})
    assert got == [] and seeks == {} and broker.asked == [(IMP, 100)]
    # the re-fetch from the seek target
    got, seeks = admit(guard, [chunk(IMP, 100, 199), chunk(IMP, 200, 299)], {IMP: 100})
    assert got == [("impressions", 100), ("impressions", 200)] and seeks == {}


def test_the_seek_is_repeated_when_the_position_stays_wrong():
    guard = ContiguityGuard(Broker(), reseek_after_s=0)
    assert admit(guard, [chunk(IMP, 500, 599)], {IMP: 100})[1] == {IMP: 100}
    assert admit(guard, [chunk(IMP, 700, 799)], {IMP: 100})[1] == {IMP: 100}
    assert guard.repaired == 2


def test_a_gap_the_broker_confirms_is_accepted():
    # offsets 20..29 hold no records (compaction, transaction markers, retention)
    broker = Broker(holes=range(20, 30))
    guard = ContiguityGuard(broker)
    got, seeks = admit(guard, [chunk(IMP, 10, 19), chunk(IMP, 30, 39)], {IMP: 10})
    assert got == [("impressions", 10), ("impressions", 30)] and seeks == {}
    assert (guard.accepted, guard.repaired) == (1, 0)


def test_a_real_gap_inside_a_skip_repairs_to_the_expected_offset():
    # 20..24 are holes, 25..49 exist but were skipped: the seek goes to 20, and the re-fetch,
    # which starts at 25, is accepted as the real gap
    broker = Broker(holes=range(20, 25))
    guard = ContiguityGuard(broker, reseek_after_s=60)
    assert admit(guard, [chunk(IMP, 50, 59)], {IMP: 20})[1] == {IMP: 20}
    got, seeks = admit(guard, [chunk(IMP, 25, 59)], {IMP: 20})
    assert got == [("impressions", 25)] and seeks == {}


def test_a_log_that_starts_later_than_the_state_expects_is_accepted():
    # a fresh join (expects 0) on a topic whose head retention deleted: the broker answers its start
    broker = Broker(holes=range(0, 5_000), end=10_000)
    got, seeks = admit(ContiguityGuard(broker), [chunk(IMP, 5_000, 5_099)], {IMP: 0})
    assert got == [("impressions", 5_000)] and seeks == {}


def test_partitions_without_an_expected_offset_are_not_checked():
    broker = Broker()
    got, seeks = admit(ContiguityGuard(broker), [chunk(IMP, 900, 901)], {})
    assert got == [("impressions", 900)] and seeks == {} and broker.asked == []


def test_docstring_example_runs():
    import doctest

    import ctr.streams.contiguity

    result = doctest.testmod(ctr.streams.contiguity)
    assert result.attempted > 0 and result.failed == 0
