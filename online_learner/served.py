"""Online quality of what was served: served scores joined to their impressions' labels.

Serving logs ``(impression_id, p_click, version)`` on ``served-scores`` for candidates that
name their impression (:mod:`ctr.serving.score_log`). The trainer keeps the recent ones here and,
when an impression's training example arrives, scores the served probability against the
label. Unlike predict-then-learn metrics, nothing the model learned after the impression was
served can flatter these numbers -- which matters when positives reach the learner at their
click and negatives only when the attribution window closes (the learner has then already
learned from up to a window's worth of *later* clicks when it scores a negative).

>>> q = ServedQuality(capacity=2)
>>> q.add("a", 0.9); q.add("b", 0.2); q.add("c", 0.4)  # "a" is evicted
>>> idx, p = q.take(["a", "b", "x", "c"])
>>> idx.tolist(), p.tolist(), q.matched, len(q)
([1, 3], [0.2, 0.4], 2, 0)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from ctr.infra.topics import SERVED_SCORES_TOPIC

__all__ = ["SERVED_SCORES_TOPIC", "ServedQuality"]



class ServedQuality:
    """Recent served scores by impression id (bounded; oldest evicted first)."""

    def __init__(self, capacity: int = 1_000_000) -> None:
        self.capacity = capacity
        self._scores: OrderedDict[str, float] = OrderedDict()
        self.received = 0
        self.matched = 0

    def add(self, impression_id: str, p_click: float) -> None:
        self._scores[impression_id] = p_click
        self.received += 1
        if len(self._scores) > self.capacity:
            self._scores.popitem(last=False)

    def take(self, example_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Positions in ``example_ids`` that were served, and their served probabilities
        (each score is used once)."""
        pop = self._scores.pop
        idx, p = [], []
        for i, eid in enumerate(example_ids):
            hit = pop(eid, None)
            if hit is not None:
                idx.append(i)
                p.append(hit)
        self.matched += len(idx)
        return np.asarray(idx, dtype=np.int64), np.asarray(p, dtype=np.float64)

    def __len__(self) -> int:
        return len(self._scores)
