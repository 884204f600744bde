"""An agent's input must continue where its state left off.

An agent that keeps the last input offset it applied in its state (the label join's
``imp_hwm``/``click_hwm``, restored from its changelog) skips records at or below it, so a
re-delivery changes nothing. The opposite fault -- the consumer *skipping* records the state has
not applied -- is silent unless someone checks: the records are simply never seen. It happened
in a chaos run (``ctr bench chaos``, seed 2): after a broker restart re-formed the group, the
join's partitions resumed ~5,000 offsets past their restored state, and 16,102 impressions never
became examples. Stale chunks and a stale Faust read offset can both do it (noida-db restarts
generation ids after a restart, so chunks fetched before it look current), and a commit that ran
ahead of the state would too.

:class:`ContiguityGuard` checks every chunk against the offset the state expects next. A chunk
that starts past it is either a real gap -- the broker holds no records in between (retention,
compaction, transaction markers) -- or a skip. The broker is asked once which record it holds
first from the expected offset (:func:`ctr.infra.kafka_io.first_offset_from`): a real gap is
accepted; a skip drops the chunk (and the rest of that partition's chunks in the batch) and asks
for a seek back to the expected offset. Offsets are immutable, so any chunk that starts at or
before the expected offset carries the right records, however stale its fetch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: (topic, partition) -> offset the broker holds first at or after the given offset (None: none)
Probe = Callable[[Any, int], Awaitable[int | None]]


@dataclass
class Admitted:
    """What :meth:`ContiguityGuard.admit` decided for one batch."""

    #: the chunks to apply, in their order
    chunks: list[Any]
    #: tp -> offset the consumer must seek back to
    seeks: dict[Any, int] = field(default_factory=dict)


class ContiguityGuard:
    """Admits chunks that continue each partition's state; repairs skips, accepts real gaps.

    >>> import asyncio
    >>> from types import SimpleNamespace as NS
    >>> from faust.types import TP
    >>> def chunk(tp, first, last):
    ...     return NS(tp=tp, records=[NS(offset=o) for o in range(first, last + 1)])
    >>> async def broker(tp, offset):  # offsets 0..99 exist, nothing is missing
    ...     return offset
    >>> guard = ContiguityGuard(broker, agent="doc")
    >>> tp = TP("impressions", 0)
    >>> out = asyncio.run(guard.admit([chunk(tp, 10, 19), chunk(tp, 40, 49)], {tp: 10}.get))
    >>> [c.records[0].offset for c in out.chunks], out.seeks[tp], guard.repaired
    ([10], 20, 1)
    """

    def __init__(self, probe: Probe, *, agent: str = "agent", reseek_after_s: float = 5.0) -> None:
        self.probe = probe
        self.agent = agent
        #: a seek to the same offset is repeated only after this long (a fetch in flight
        #: can still deliver stale chunks for a while; re-seeking each time would starve it)
        self.reseek_after_s = reseek_after_s
        self._known: dict[Any, tuple[int, int | None]] = {}
        self._last_seek: dict[Any, tuple[int, float]] = {}
        #: skips found (each asked for a seek back)
        self.repaired = 0
        #: gaps the broker confirmed (no records between the expected offset and the chunk)
        self.accepted = 0
        #: chunks dropped because they did not continue their partition's state
        self.dropped = 0
        self._metric: Any = None

    async def admit(self, chunks: Sequence[Any], expected: Callable[[Any], int | None]) -> Admitted:
        """Split ``chunks`` into those to apply and the seeks that repair skips. ``expected(tp)``
        is the offset the state applies next (``None``: the agent keeps no offsets for ``tp``)."""
        out = Admitted([])
        cursor: dict[Any, int | None] = {}
        blocked: set[Any] = set()
        for c in chunks:
            tp = c.tp
            if tp in blocked:
                self.dropped += 1
                continue
            nxt = cursor[tp] if tp in cursor else expected(tp)
            first, last = c.records[0].offset, c.records[-1].offset
            if nxt is None or first <= nxt or await self._real_gap(tp, nxt, first):
                out.chunks.append(c)
                if nxt is not None:
                    cursor[tp] = max(nxt, last + 1)
                continue
            blocked.add(tp)
            self.dropped += 1
            seek = self._last_seek.get(tp)
            now = time.monotonic()
            if seek is None or seek[0] != nxt or now - seek[1] >= self.reseek_after_s:
                self._last_seek[tp] = (nxt, now)
                out.seeks[tp] = nxt
                self.repaired += 1
                self._count("repaired")
                log.warning("%s: %s[%d] delivered offset %d but the state expects %d (the broker holds %s "
                            "first): seeking back", self.agent, tp.topic, tp.partition, first, nxt,
                            self._known[tp][1])  # fmt: skip
        return out

    async def _real_gap(self, tp: Any, nxt: int, first: int) -> bool:
        known = self._known.get(tp)
        if known is None or known[0] != nxt:
            known = self._known[tp] = (nxt, await self.probe(tp, nxt))
        found = known[1]
        if found is not None and found < first:
            return False
        self.accepted += 1
        self._count("accepted")
        log.info("%s: %s[%d] holds no records between offsets %d and %d: continuing at %d",
                 self.agent, tp.topic, tp.partition, nxt, first - 1, first)  # fmt: skip
        return True

    def _count(self, outcome: str) -> None:
        from prometheus_client import Counter

        from ctr.streams.metrics import metric

        if self._metric is None:
            doc = "Input chunks that did not continue the agent's state"
            self._metric = metric("ctr_agent_input_gaps_total", Counter, doc, ["agent", "outcome"])
        self._metric.labels(self.agent, outcome).inc()
