"""Final labels for what needs them: each impression once, once its window has passed.

The label join sends an impression's first example at once -- a provisional negative unless
it was already clicked -- and a *correction* (label 1) if the click comes later within the
attribution window (``streams/agents/label_join.py``). The network trains on every example as
it arrives: nothing reaches it ordered by label, so it is not biased towards what was shown
recently. Everything that judges or calibrates the model needs the *final* label of each
impression instead: the base rate, the calibration, the progressive / served / frozen metrics
and the quality gate. :class:`HeldLabels` keeps each first example's columns (its scores)
until its impression is older than the attribution window, applies the corrections that
arrive meanwhile, and then releases it with its final label.

"Older than the window" is measured on the stream's own clock: the newest event time seen in
examples (impression and click times), so replays and live streams release alike. A *final*
negative (not provisional: its window had closed when it left) completes its impression-time
cohort at once: everything shown before it is final too (the join sends in event-time
order), so a stream of final labels -- ``--emission click`` / ``window``, or a replayed log --
is released without waiting. Holding positives until then matters: a click leaves the join
before its cohort's non-clicks, and counted on arrival the newest cohort reads as all clicks.

>>> held = HeldLabels(window_ms=1_000)
>>> held.admit(["a", "b"], np.array([0, 10]), np.array([0.0, 0.0]), final=np.array([False, False]),
...            p=np.array([0.1, 0.2]))
>>> held.correct(["b"]), len(held)
(0, 2)
>>> held.release(now_ms=500) is None       # a's window has not passed yet
True
>>> out = held.release(now_ms=1_010)
>>> out["label"].tolist(), out["p"].tolist()
([0.0, 1.0], [0.1, 0.2])
>>> held.admit(["c"], np.array([20]), np.array([0.0]), final=np.array([True]), p=np.array([0.3]))
>>> held.release(now_ms=30)["p"].tolist()  # a final negative: its cohort is complete at once
[0.3]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["HeldLabels"]


@dataclass
class _Batch:
    ids: list[str]
    newest_ms: int
    columns: dict[str, np.ndarray]  # "label" and the caller's columns, all [B]


class HeldLabels:
    """First examples held until ``now - window_ms`` passes their impression time.

    Args:
        window_ms: the label join's attribution window (no correction can come after it).
        capacity: most examples held; beyond it the oldest batches are released early (their
            labels may then miss a correction; counted in :attr:`late_corrections` when one
            comes).
    """

    def __init__(self, window_ms: int = 30_000, capacity: int = 2_000_000) -> None:
        self.window_ms = window_ms
        self.capacity = capacity
        self._batches: deque[_Batch] = deque()
        self._where: dict[str, tuple[_Batch, int]] = {}
        #: corrections whose first example was not held (released already, or never seen)
        self.late_corrections = 0
        #: impression time up to which every label is final (the newest final negative's)
        self.complete_ms = -(1 << 62)

    def admit(
        self, ids: Sequence[str], event_ms: np.ndarray, labels: np.ndarray, final: np.ndarray, **columns: np.ndarray
    ) -> None:
        """Hold first examples ``ids`` (impression times ``[B]``, labels ``[B]``, ``final`` ``[B]``:
        no correction can follow; any columns ``[B]``)."""
        if not len(ids):
            return
        done = np.asarray(final, dtype=bool) & (np.asarray(labels) == 0)
        if done.any():
            self.complete_ms = max(self.complete_ms, int(np.max(np.asarray(event_ms)[done])))
        cols = {"label": np.array(labels, dtype=np.float64)}
        cols.update({k: np.asarray(v) for k, v in columns.items()})
        batch = _Batch(list(ids), int(np.max(event_ms)), cols)
        self._batches.append(batch)
        where = self._where
        for i, eid in enumerate(batch.ids):
            where[eid] = (batch, i)

    def correct(self, ids: Sequence[str]) -> int:
        """The clicks of held provisional negatives: their label becomes 1. Returns how many
        were not held (see :attr:`late_corrections`)."""
        late = 0
        for eid in ids:
            hit = self._where.get(eid)
            if hit is None:
                late += 1
            else:
                hit[0].columns["label"][hit[1]] = 1.0
        self.late_corrections += late
        return late

    def release(self, now_ms: int | None = None) -> dict[str, np.ndarray] | None:
        """The held examples whose window has passed at ``now_ms`` (all of them with ``None``),
        their columns concatenated in arrival order; ``None`` if there are none."""
        out: list[_Batch] = []
        batches, where = self._batches, self._where
        upto = None if now_ms is None else max(self.complete_ms, now_ms - self.window_ms)
        while batches and (upto is None or batches[0].newest_ms <= upto or len(where) > self.capacity):
            b = batches.popleft()
            for eid in b.ids:
                where.pop(eid, None)
            out.append(b)
        if not out:
            return None
        return {k: np.concatenate([b.columns[k] for b in out]) for k in out[0].columns}

    def __len__(self) -> int:
        return len(self._where)
