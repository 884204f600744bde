"""Progressive (predict-then-learn) metrics for a click stream.

Feed each batch's *pre-update* predictions with its labels; read cumulative and sliding-window
numbers at any time:

* AUC -- sliding window: **exact** (tie-aware rank statistic over the last ``window`` examples,
  one ``argsort`` per read). Cumulative: an unbounded stream cannot keep every score, so it keeps
  label counts per score bin (``bins`` equal-width bins of p; default 2**16). Pairs in different
  bins are ranked exactly, pairs inside one bin count 1/2 -- :attr:`ProgressiveMetrics.auc_tie_bound`
  is the largest possible error that causes (usually < 1e-4).
* log loss (clipped at 1e-7), cumulative and windowed;
* calibration: mean predicted CTR / observed CTR (1.0 = calibrated), cumulative and windowed.

>>> m = ProgressiveMetrics(window=4)
>>> m.update([0, 1, 0, 1], [0.1, 0.8, 0.3, 0.6])
>>> m.update([1, 0], [0.2, 0.9])
>>> round(m.auc(), 4), round(m.window_auc(), 4), m.count
(0.5556, 0.25, 6)
>>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
0.75
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ProgressiveMetrics", "log_loss", "roc_auc"]

_EPS = 1e-7


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Exact ROC AUC (ties count 1/2) via average ranks; NaN if one class is absent. O(n log n)."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="stable")
    ps = p[order]
    # average rank of each tie group (1-based)
    boundaries = np.flatnonzero(np.diff(ps)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [ps.size]])
    avg_rank = (starts + ends + 1) / 2.0
    ranks = np.repeat(avg_rank, ends - starts)
    rank_sum_pos = ranks[y[order]].sum()
    return float((rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy, p clipped to ``[1e-7, 1 - 1e-7]``."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())


class ProgressiveMetrics:
    """Cumulative + sliding-window AUC, log loss and calibration over a prediction stream.

    Args:
        window: examples in the sliding window (exact AUC over them).
        bins: score bins of the cumulative AUC.
    """

    def __init__(self, window: int = 100_000, bins: int = 1 << 16) -> None:
        self.window = int(window)
        self.bins = int(bins)
        self._pos = np.zeros(bins, dtype=np.int64)
        self._neg = np.zeros(bins, dtype=np.int64)
        self.count = 0
        self._sum_loss = 0.0
        self._sum_p = 0.0
        self._sum_y = 0
        self._wy = np.zeros(self.window, dtype=bool)
        self._wp = np.zeros(self.window, dtype=np.float64)
        self._wfill = 0
        self._whead = 0  # next write position in the ring

    def update(self, y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray) -> None:
        """Add a batch of labels ``y [n]`` and their pre-update predictions ``p [n]``."""
        y = np.asarray(y).astype(bool).ravel()
        p = np.asarray(p, dtype=np.float64).ravel()
        if y.shape != p.shape:
            raise ValueError("y and p must have the same length")
        n = y.size
        if n == 0:
            return
        b = np.minimum((p * self.bins).astype(np.int64), self.bins - 1).clip(0)
        self._pos += np.bincount(b[y], minlength=self.bins)
        self._neg += np.bincount(b[~y], minlength=self.bins)
        pc = np.clip(p, _EPS, 1 - _EPS)
        self._sum_loss += float(-(np.log(pc[y]).sum() + np.log1p(-pc[~y]).sum()))
        self._sum_p += float(p.sum())
        self._sum_y += int(y.sum())
        self.count += n
        # ring buffer of the last `window` examples
        if n >= self.window:
            self._wy[:] = y[-self.window :]
            self._wp[:] = p[-self.window :]
            self._whead, self._wfill = 0, self.window
            return
        first = min(n, self.window - self._whead)
        self._wy[self._whead : self._whead + first] = y[:first]
        self._wp[self._whead : self._whead + first] = p[:first]
        if first < n:
            self._wy[: n - first] = y[first:]
            self._wp[: n - first] = p[first:]
        self._whead = (self._whead + n) % self.window
        self._wfill = min(self.window, self._wfill + n)

    # -- cumulative --------------------------------------------------------------------------
    def auc(self) -> float:
        """Cumulative AUC from the score histogram (see :attr:`auc_tie_bound`)."""
        n_pos, n_neg = self._pos.sum(), self._neg.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        neg_below = np.cumsum(self._neg) - self._neg
        wins = (self._pos * neg_below).sum() + 0.5 * (self._pos * self._neg).sum()
        return float(wins / (n_pos * n_neg))

    @property
    def auc_tie_bound(self) -> float:
        """Largest error of :meth:`auc` due to pairs sharing a score bin."""
        n_pos, n_neg = self._pos.sum(), self._neg.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        return float(0.5 * (self._pos * self._neg).sum() / (n_pos * n_neg))

    def log_loss(self) -> float:
        return self._sum_loss / self.count if self.count else float("nan")

    def calibration(self) -> float:
        """Mean predicted CTR / observed CTR (cumulative)."""
        return self._sum_p / self._sum_y if self._sum_y else float("nan")

    def ctr(self) -> float:
        return self._sum_y / self.count if self.count else float("nan")

    # -- sliding window ---------------------------------------------------------------------
    def _window(self) -> tuple[np.ndarray, np.ndarray]:
        return self._wy[: self._wfill], self._wp[: self._wfill]

    def window_auc(self) -> float:
        """Exact AUC over the last ``window`` examples."""
        return roc_auc(*self._window())

    def window_log_loss(self) -> float:
        y, p = self._window()
        return log_loss(y, p) if y.size else float("nan")

    def window_calibration(self) -> float:
        y, p = self._window()
        return float(p.sum() / y.sum()) if y.sum() else float("nan")

    def summary(self) -> dict[str, float]:
        """All metrics as a flat dict (JSON / Prometheus friendly)."""
        return {
            "count": float(self.count),
            "auc": self.auc(),
            "auc_tie_bound": self.auc_tie_bound,
            "log_loss": self.log_loss(),
            "calibration": self.calibration(),
            "ctr": self.ctr(),
            "window_auc": self.window_auc(),
            "window_log_loss": self.window_log_loss(),
            "window_calibration": self.window_calibration(),
        }
