"""Final labels for what needs them: each impression once, once its window has passed.

The label join sends an impression's first example at once -- a provisional negative unless
it was already clicked -- and a *correction* (label 1) if the click comes later within the
attribution window (``streams/agents/label_join.py``). The network, the base rate and the
calibration learn every example as it arrives (a correction is one more gradient term of the
calibration, so it ends where final labels would have taken it): nothing reaches them ordered
by label, and nothing waits a window. What *judges* the model needs the final label of each
impression instead: the progressive / served / frozen metrics and the quality gate.
:class:`HeldLabels` keeps each first example's columns (its scores) until its impression is
older than the attribution window, applies the corrections that arrive meanwhile, and then
releases it with its final label.

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
from typing import Any

import numpy as np

__all__ = ["ArrivalLearner", "HeldLabels"]


@dataclass
class _Batch:
    ids: list[str]
    event_ms: np.ndarray  # [B]
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
        batch = _Batch(list(ids), np.array(event_ms, dtype=np.int64), cols)
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

    def column(self, ids: Sequence[str], name: str) -> np.ndarray:
        """Column ``name`` of the held first examples ``ids`` (ids not held are skipped)."""
        hits = [h for h in map(self._where.get, ids) if h is not None]
        return np.array([b.columns[name][i] for b, i in hits])

    def release(self, now_ms: int | None = None) -> dict[str, np.ndarray] | None:
        """The held examples whose window has passed at ``now_ms`` (all of them with ``None``),
        their columns concatenated in arrival order; ``None`` if there are none."""
        out: list[dict[str, np.ndarray]] = []
        batches, where = self._batches, self._where
        upto = None if now_ms is None else max(self.complete_ms, now_ms - self.window_ms)
        while batches:
            b = batches[0]
            if upto is None or len(where) > self.capacity:
                done = np.ones(len(b.ids), dtype=bool)
            else:
                done = b.event_ms <= upto
            if not done.any():
                break
            for i in np.flatnonzero(done):
                where.pop(b.ids[i], None)
            out.append({k: v[done] for k, v in b.columns.items()})
            if done.all():
                batches.popleft()
                continue
            # the rest of the batch waits; its rows move up
            keep = np.flatnonzero(~done)
            b.ids = [b.ids[i] for i in keep]
            b.event_ms = b.event_ms[keep]
            b.columns = {k: v[keep] for k, v in b.columns.items()}
            for row, eid in enumerate(b.ids):
                where[eid] = (b, row)
            break
        if not out:
            return None
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]}

    def __len__(self) -> int:
        return len(self._where)


class ArrivalLearner:
    """Learns examples as the label join sends them -- first examples and corrections, in
    arrival order -- the way ``ctr learn`` does (``Trainer`` and ``bench/quality.py`` both use
    this, so the benchmark measures the learner users run):

    1. the network learns every example on arrival (:meth:`OnlineCTR.predict_learn_scored`);
    2. the base rate and the calibration learn them on arrival, corrections included
       (:meth:`OnlineCTR.observe_arrivals`);
    3. each first example is held (:class:`HeldLabels`) with its progressive probability ``p``,
       its raw ``score`` and the caller's columns until its label is final; corrections flip it;
    4. what is released has its final label: :meth:`learn` returns it for judging.

    >>> from ctr.online_learner.learner import OnlineCTR
    >>> from ctr.infra.schema import Impression, TrainingExample
    >>> imps = [Impression(event_id=f"e{i}", event_time_ms=i, user_id="u", item_id=str(i % 3)) for i in range(4)]
    >>> exs = [TrainingExample(example_id=m.event_id, label=i % 2, impression=m) for i, m in enumerate(imps)]
    >>> arrivals = ArrivalLearner(OnlineCTR(categorical_fields=("user_id", "item_id"), table_bits=10, seed=0))
    >>> done = arrivals.learn(exs)  # final labels: released as soon as a non-click completes them
    >>> done["label"].tolist(), len(arrivals.held)
    ([0.0, 1.0, 0.0], 1)
    """

    def __init__(self, learner: Any, window_ms: int = 30_000) -> None:
        self.learner = learner
        self.held = HeldLabels(window_ms)
        #: corrections learned (the learner's ``examples_seen`` counts them too)
        self.corrections = 0
        #: the stream's clock: the newest impression or click time in the examples
        self.clock_ms = -(1 << 62)

    def learn(self, examples: Sequence[Any], enc: Any = None, **columns: np.ndarray) -> dict[str, np.ndarray] | None:
        """Learn ``examples`` (``TrainingExample`` s; ``enc`` their encoding if done already).
        ``columns``: more per-*first-example* values to hold (``[F]``, F = examples that are not
        corrections). Returns the first examples released with their final labels, or None.

        The batch is learned in updates of :meth:`OnlineCTR.step_size` examples, each counted
        and released before the next is predicted: while data is scarce the base rate and the
        calibration move after every few examples, not once per poll of 2,048."""
        n = len(examples)
        if n == 0:
            return None
        enc = self.learner.encode([e.impression for e in examples]) if enc is None else enc
        first_before = np.cumsum([0] + [not e.correction for e in examples])  # firsts before position i
        out = []
        i = 0
        while i < n:
            j = min(n, i + self.learner.step_size())
            a, b = first_before[i], first_before[j]
            done = self._learn(examples[i:j], enc.take(slice(i, j)), {k: v[a:b] for k, v in columns.items()})
            if done is not None:
                out.append(done)
            i = j
        if not out:
            return None
        return {k: np.concatenate([d[k] for d in out]) for k in out[0]}

    def _learn(self, examples: Sequence[Any], enc: Any, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        learner = self.learner
        n = len(examples)
        y = np.fromiter((e.label for e in examples), dtype=np.float32, count=n)
        fi = np.fromiter((i for i, e in enumerate(examples) if not e.correction), dtype=np.int64)
        firsts = [examples[i] for i in fi]
        p, scores = learner.predict_learn_scored(enc, y)
        event_ms = np.fromiter((e.impression.event_time_ms for e in firsts), dtype=np.int64, count=len(firsts))
        final = np.fromiter((not e.provisional for e in firsts), dtype=bool, count=len(firsts))
        self.held.admit([e.example_id for e in firsts], event_ms, y[fi], final=final, p=p[fi], score=scores[fi],
                        **columns)  # fmt: skip
        corrections = [e.example_id for e in examples if e.correction]
        corrected = self.held.column(corrections, "score") if corrections else None
        learner.observe_arrivals(event_ms, y[fi], scores[fi], corrected, corrections=len(corrections))
        if corrections:
            self.corrections += len(corrections)
            self.held.correct(corrections)
        newest = max(e.impression.event_time_ms if e.click_time_ms is None else e.click_time_ms for e in examples)
        self.clock_ms = max(self.clock_ms, newest)
        return self.held.release(self.clock_ms)

    def drain(self) -> dict[str, np.ndarray] | None:
        """Everything still held, as it stands (not learned: a correction may still come)."""
        return self.held.release(None)
