"""Dynamic feature reweighting, pure logic (no Kafka): per-field importance and drift on a
sliding window of labelled examples, turned into the normalised weights the learner's field
gate applies. The streaming shell is :mod:`ctr.streams.reweighting`; the formulas and their
measured behaviour are in ``streams/REWEIGHTING.md``.

Per field ``f``, on the last ``W`` examples (the *current* window; the ``W`` before them are the
*previous* window), with ``n_v`` examples of value ``v``, ``n_vy`` of them with label ``y``,
``N`` examples, click rate ``p`` and label entropy ``H(p)`` (nats):

* ``mi`` -- plug-in mutual information ``sum_vy n_vy/N ln(n_vy N / (n_v n_y))``;
* ``expected_mi``, ``null_sd`` -- mean and standard deviation of the MI that a field with the
  *same value counts* but no relation to the label scores (OutRank's cardinality-aware
  baseline), analytic (:func:`null_mi_moments`): ``expected_mi = sum_v n_v/N b(n_v)`` with
  ``b(n) = H(p) - E[H(Binomial(n, p)/n)]``, exact for ``n <= 256``, else the Miller-Madow term
  ``(N - n) / (2 n (N - 1))``. With every count large this is the textbook ``(k - 1) / (2N)``;
  an all-unique id field gets exactly ``H(p)``, its plug-in MI (pure noise);
* ``importance = max(0, mi - expected_mi - significance * null_sd) / H(p)`` -- the fraction of
  the label's uncertainty the field explains beyond what noise of its cardinality explains
  (a bias-corrected uncertainty coefficient in [0, 1]; ``significance`` 2 by default);
* ``psi = max(psi_impressions, psi_clicks)`` -- population stability index of the field's
  value distribution between the previous and the current window (0 until both are full),
  over the previous window's ``psi_bins`` most frequent values plus one "other" bin, among all
  examples (covariate drift) and among the clicked ones (concept drift: *which* values get
  clicked changed);
* ``weight`` -- ``importance / mean(importance)``, floored at ``floor``, renormalised to mean 1,
  then an EMA (``smoothing`` = weight of the new value) across computations, renormalised again;
  all 1 while no field is significant.

Memory is bounded: a ring of ``2W`` encoded rows (int32 per field) and two count tables of at
most ``max_values`` distinct values per field; a value that arrives while all slots hold live
values is counted in the field's "other" bucket, and a slot is recycled once its value left
both windows.

>>> from ctr.infra.schema import Impression
>>> def imp(i, **cat):
...     return Impression(event_id=f"e{i}", event_time_ms=i, user_id="u", item_id="a", categorical=cat)
>>> fi = FieldImportance(ReweightConfig(window=1_000, floor=0.1, smoothing=1.0))
>>> rows = [imp(i, good=str(i % 2), noise=str(i % 3 == 0)) for i in range(1_000)]
>>> fi.add(rows, [i % 2 for i in range(1_000)])  # "good" is the label itself
>>> snap = fi.compute()
>>> round(snap.fields["good"].importance, 3), round(snap.fields["noise"].importance, 3)
(0.996, 0.0)
>>> snap.weights
{'good': 1.904762, 'noise': 0.095238}
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ctr.infra.schema import MAX_FIELDS, FieldWeights, Impression, TrainingExample

__all__ = [
    "FieldImportance",
    "FieldScore",
    "ReweightConfig",
    "SlidingWindow",
    "Snapshot",
    "entropy",
    "expected_null_mi",
    "field_psi",
    "mutual_information",
    "null_mi_moments",
    "normalise_weights",
    "outrank",
    "psi",
]

#: Reserved value ids of every field: values beyond ``max_values`` share OTHER; absent = MISSING.
OTHER, MISSING = 0, 1
#: Impression attributes usable as fields (as in the learner's encoder).
ATTRIBUTES = ("user_id", "item_id", "position")
#: Counts up to this get the exact binomial null expectation; larger ones Miller-Madow.
EXACT_MAX = 256


# --------------------------------------------------------------------------- formulas
def entropy(p: float) -> float:
    """Binary entropy in nats. ``entropy(0.5) == ln 2``."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log(p) + (1.0 - p) * math.log(1.0 - p))


def mutual_information(counts: np.ndarray) -> float:
    """Plug-in mutual information (nats) of a ``[values, 2]`` table of (value, label) counts.

    >>> round(mutual_information(np.array([[50, 0], [0, 50]])), 4) == round(math.log(2), 4)
    True
    >>> mutual_information(np.array([[40, 10], [40, 10]]))
    0.0
    """
    c = np.asarray(counts, dtype=np.float64)
    n = c.sum()
    if n <= 0:
        return 0.0
    nv = c.sum(axis=1, keepdims=True)
    ny = c.sum(axis=0, keepdims=True)
    mask = c > 0
    expected = (nv @ ny)[mask] / n
    return max(0.0, float((c[mask] * np.log(c[mask] / expected)).sum() / n))


_LOG_COMB = np.full((EXACT_MAX + 1, EXACT_MAX + 1), -np.inf)
for _n in range(EXACT_MAX + 1):
    for _x in range(_n + 1):
        _LOG_COMB[_n, _x] = math.lgamma(_n + 1) - math.lgamma(_x + 1) - math.lgamma(_n - _x + 1)
_X = np.arange(EXACT_MAX + 1, dtype=np.float64)
_NS = np.maximum(np.arange(EXACT_MAX + 1, dtype=np.float64), 1.0)
with np.errstate(divide="ignore", invalid="ignore"):
    _FRAC = np.where(_X[None, :] <= _NS[:, None], _X[None, :] / _NS[:, None], 0.0)
    _H_TABLE = np.nan_to_num(-(_FRAC * np.log(_FRAC) + (1 - _FRAC) * np.log(1 - _FRAC)))


@functools.lru_cache(maxsize=4)  # one click rate per computation, shared by every field
def _null_moment_tables(p: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact null moments of one value seen ``n = 0..EXACT_MAX`` times, ``X ~ Binomial(n, p)``
    clicks: the mean, variance and covariance with ``X`` of the non-linear remainder
    ``R(n) = H(X/n) - H(p) - H'(p) (X/n - p)`` of its plug-in label entropy."""
    q = 1.0 - p
    logpmf = _LOG_COMB + _X[None, :] * math.log(p) + (_NS[:, None] - _X[None, :]) * math.log(q)
    pmf = np.exp(logpmf)  # exp(-inf) = 0 beyond x > n
    r = _H_TABLE - entropy(p) - math.log(q / p) * (_FRAC - p)
    mean = (pmf * r).sum(axis=1)
    var = np.maximum((pmf * r * r).sum(axis=1) - mean**2, 0.0)
    cov = (pmf * r * _X[None, :]).sum(axis=1) - mean * _NS * p
    mean[0] = var[0] = cov[0] = 0.0
    return mean, var, cov


def null_mi_moments(value_counts: np.ndarray, p: float) -> tuple[float, float]:
    """Mean and standard deviation (nats) of the plug-in MI of a field with these per-value
    counts whose values are independent of a label with click rate ``p``: OutRank's "random
    field of the same cardinality", computed analytically from the actual count profile.

    Under independence (labels permuted, total clicks fixed) the plug-in MI is exactly
    ``-sum_v (n_v / N) R_v`` (the linear terms sum to zero), so its mean is
    ``sum_v (n_v/N) b(n_v)`` with ``b(n) = -E[R(n)] = H(p) - E[H(X/n)]`` (exact for
    ``n <= EXACT_MAX``, else ``(N - n) / (2 n (N - 1))``, Miller-Madow) and its variance
    ``sum_v (n_v/N)^2 Var R(n_v) - (sum_v (n_v/N) Cov(R(n_v), X_v))^2 / (N p (1-p))`` (the
    values treated as independent binomials, then conditioned on the total; ``Var R(n) =
    1 / (2 n^2)`` and ``Cov = 0`` beyond ``EXACT_MAX``). Checked against 300 label permutations
    of uniform, Zipf and all-but-unique id fields: mean and sd within a few percent.

    >>> n = 100_000
    >>> many = np.full(1_000, 100)  # 1000 values seen 100 times: ~ (k - 1) / (2N), sqrt(2(k - 1)) / (2N)
    >>> e0, sd0 = null_mi_moments(many, 0.1)
    >>> round(e0 / ((1_000 - 1) / (2 * n)), 1), round(sd0 / (math.sqrt(2 * 999) / (2 * n)), 1)
    (1.0, 1.0)
    >>> e0, sd0 = null_mi_moments(np.ones(500), 0.1)  # all unique: plug-in MI is exactly H(p)
    >>> round(e0 - entropy(0.1), 9), round(sd0, 9)
    (0.0, 0.0)
    """
    nv = np.asarray(value_counts, dtype=np.int64)
    nv = nv[nv > 0]
    total = int(nv.sum())
    if total <= 1 or nv.size == 0 or p <= 0.0 or p >= 1.0:
        return 0.0, 0.0
    mean_r, var_r, cov_r = _null_moment_tables(p)
    small = nv[nv <= EXACT_MAX]
    big = nv[nv > EXACT_MAX].astype(np.float64)
    ws, wb = small / total, big / total
    e0 = float(-(ws * mean_r[small]).sum() + (wb * (total - big) / (2.0 * big * (total - 1))).sum())
    var = float((ws**2 * var_r[small]).sum() + (wb**2 / (2.0 * big**2)).sum())
    cov = float((ws * cov_r[small]).sum())
    var -= cov * cov / (total * p * (1.0 - p))
    return e0, math.sqrt(max(var, 0.0))


def expected_null_mi(value_counts: np.ndarray, p: float) -> float:
    """The mean of :func:`null_mi_moments`.

    >>> round(expected_null_mi(np.full(10, 1_000), 0.1) * 2 * 10_000, 2)  # (k - 1) / (2N)
    9.0
    """
    return null_mi_moments(value_counts, p)[0]


def outrank(counts: np.ndarray, significance: float = 2.0) -> tuple[float, float, float, float]:
    """``(mi, expected_mi, null_sd, importance)`` of a ``[values, 2]`` count table, with
    ``importance = max(0, mi - expected_mi - significance * null_sd) / H(p)`` (module doc).

    >>> rng = np.random.default_rng(0)
    >>> labels = rng.random(20_000) < 0.1
    >>> ids = rng.integers(0, 5_000, 20_000)  # a random high-cardinality id
    >>> mi, e0, sd0, score = outrank(np.stack([np.bincount(ids[~labels], minlength=5_000),
    ...                                        np.bincount(ids[labels], minlength=5_000)], axis=1))
    >>> round(mi, 3), round(e0, 3), round(sd0, 4), score
    (0.119, 0.119, 0.0015, 0.0)
    """
    c = np.asarray(counts, dtype=np.int64)
    n = int(c.sum())
    if n == 0:
        return 0.0, 0.0, 0.0, 0.0
    p = float(c[:, 1].sum()) / n
    h = entropy(p)
    if h <= 0.0:
        return 0.0, 0.0, 0.0, 0.0
    mi = mutual_information(c)
    e0, sd0 = null_mi_moments(c.sum(axis=1), p)
    return mi, e0, sd0, max(0.0, mi - e0 - significance * sd0) / h


def psi(expected: np.ndarray, actual: np.ndarray, pseudocount: float = 0.5) -> float:
    """Population stability index ``sum (a_i - e_i) ln(a_i / e_i)`` between two aligned count
    vectors turned into proportions with ``pseudocount`` added to every bin (so empty bins are
    finite). 0 for identical distributions; > 0.1 is conventionally a shift, > 0.25 a major one.

    >>> round(psi(np.array([100, 200, 700]), np.array([10, 20, 70])), 3)
    0.0
    >>> round(psi(np.array([500, 300, 200]), np.array([200, 300, 500])), 3)
    0.548
    """
    e = np.asarray(expected, dtype=np.float64) + pseudocount
    a = np.asarray(actual, dtype=np.float64) + pseudocount
    if e.size == 0:
        return 0.0
    e /= e.sum()
    a /= a.sum()
    return max(0.0, float(((a - e) * np.log(a / e)).sum()))


def normalise_weights(scores: Mapping[str, float], floor: float = 0.1) -> dict[str, float]:
    """Scores -> weights with mean 1 over the fields, none below ``floor`` (before the final
    renormalisation), all 1 when no field scores above 0.

    >>> normalise_weights({"a": 3.0, "b": 1.0, "c": 0.0})
    {'a': 2.177419, 'b': 0.725806, 'c': 0.096774}
    >>> normalise_weights({"a": 0.0, "b": 0.0})
    {'a': 1.0, 'b': 1.0}
    """
    if not scores:
        return {}
    values = np.array([max(0.0, float(v)) for v in scores.values()])
    mean = values.mean()
    if not mean > 0:
        return dict.fromkeys(scores, 1.0)
    w = np.maximum(values / mean, floor)
    w /= w.mean()
    return {f: round(float(x), 6) for f, x in zip(scores, w, strict=True)}


def _num_token(x: float | None) -> str | None:
    """Numeric value -> its log2 octave (``"3"`` for 7 <= 1+|x| < 15, ``"-3"`` if negative)."""
    if x is None or not math.isfinite(x):
        return None
    octave = int(math.log2(1.0 + abs(x)))
    return f"-{octave}" if x < 0 else str(octave)


# --------------------------------------------------------------------------- the window
@dataclass(frozen=True)
class ReweightConfig:
    """Knobs of :class:`FieldImportance` (defaults: what ``ctr reweight`` runs)."""

    #: Examples in the current window (the previous window, for PSI, has as many).
    window: int = 50_000
    #: Fields to score; None = every categorical and numeric field seen (up to ``max_fields``).
    #: ``user_id`` / ``item_id`` / ``position`` read the impression's attributes.
    fields: tuple[str, ...] | None = None
    #: Distinct values tracked per field; later ones share an "other" bucket.
    max_values: int = 4096
    max_fields: int = MAX_FIELDS
    #: Importance only counts MI above its null mean plus this many null standard deviations.
    significance: float = 2.0
    #: Bins of the PSI: the previous window's most frequent values (+ one "other" bin).
    psi_bins: int = 20
    psi_pseudocount: float = 0.5
    #: No field's weight goes below this (before the final renormalisation to mean 1).
    floor: float = 0.1
    #: EMA weight of a new computation (1.0 = no smoothing).
    smoothing: float = 0.5

    def __post_init__(self) -> None:
        if self.window < 1 or self.max_values < 2 or self.psi_bins < 1:
            raise ValueError("window >= 1, max_values >= 2 and psi_bins >= 1 required")
        if not 0.0 < self.smoothing <= 1.0 or not 0.0 <= self.floor <= 1.0:
            raise ValueError("smoothing must be in (0, 1] and floor in [0, 1]")
        if not 1 <= self.max_fields <= MAX_FIELDS:
            raise ValueError(f"max_fields must be in [1, {MAX_FIELDS}]")


class SlidingWindow:
    """The last ``2 W`` examples, encoded, with (value, label) count tables of the current
    (newest ``W``) and the previous window, updated incrementally in vectorised chunks.

    >>> w = SlidingWindow(window=2, fields=("site",))
    >>> w.add([{"site": "a"}, {"site": "b"}, {"site": "a"}], [], [1, 0, 1])
    >>> w.n_current, w.n_previous, w.counts("site").tolist(), w.counts("site", previous=True).tolist()
    (2, 1, [[0, 1], [1, 0]], [[0, 1]])
    """

    def __init__(
        self,
        window: int,
        fields: Sequence[str] | None = None,
        max_values: int = 4096,
        max_fields: int = MAX_FIELDS,
    ) -> None:
        self.window = int(window)
        self.max_values = int(max_values)
        self.max_fields = int(max_fields)
        self.discover = fields is None
        self.fields: list[str] = []
        self._index: dict[str, int] = {}
        self._kinds: list[str] = []  # "cat" | "num" | "attr" | "any" (not seen yet)
        self._vocab: list[dict[str | None, int]] = []
        self._values: list[list[str | None]] = []  # id -> value (for inspection)
        self._free: list[list[int]] = []
        self._slots = self.max_values + 2
        self._ring = np.full((2 * self.window, 0), MISSING, dtype=np.int32)
        self._labels = np.zeros(2 * self.window, dtype=np.int8)
        self._cur = np.zeros((0, self._slots, 2), dtype=np.int64)
        self._prev = np.zeros((0, self._slots, 2), dtype=np.int64)
        self._cur_labels = np.zeros(2, dtype=np.int64)
        self._prev_labels = np.zeros(2, dtype=np.int64)
        self.seen = 0  # examples ever added
        self.newest_event_time_ms = 0
        self.overflowed: dict[str, int] = {}  # field -> values counted as "other" for lack of a slot
        for f in fields or ():
            self._add_field(f, "attr" if f in ATTRIBUTES else "any")

    # -- views
    @property
    def n_current(self) -> int:
        return min(self.seen, self.window)

    @property
    def n_previous(self) -> int:
        return min(max(self.seen - self.window, 0), self.window)

    def label_counts(self, previous: bool = False) -> np.ndarray:
        return (self._prev_labels if previous else self._cur_labels).copy()

    def counts(self, field_name: str, previous: bool = False) -> np.ndarray:
        """The non-empty rows of the field's ``[values, 2]`` (value, label) count table."""
        table = (self._prev if previous else self._cur)[self._index[field_name]]
        return table[table.sum(axis=1) > 0]

    def tables(self, field_name: str) -> tuple[np.ndarray, np.ndarray]:
        """The field's current and previous ``[slots, 2]`` tables, rows aligned by value."""
        i = self._index[field_name]
        return self._cur[i], self._prev[i]

    def value_of(self, field_name: str, slot: int) -> str | None:
        """The value in a slot (``"<other>"`` / None for the reserved ones)."""
        return self._values[self._index[field_name]][slot]

    # -- fields
    def _add_field(self, name: str, kind: str) -> bool:
        if name in self._index:
            return True
        if len(self.fields) >= self.max_fields:
            return False
        self._index[name] = len(self.fields)
        self.fields.append(name)
        self._kinds.append(kind)
        self._vocab.append({None: MISSING})
        self._values.append(["<other>", None])
        self._free.append([])
        self._ring = np.concatenate([self._ring, np.full((2 * self.window, 1), MISSING, dtype=np.int32)], axis=1)
        new_cur = np.zeros((1, self._slots, 2), dtype=np.int64)
        new_prev = np.zeros((1, self._slots, 2), dtype=np.int64)
        new_cur[0, MISSING] = self._cur_labels  # every example already in the windows lacked it
        new_prev[0, MISSING] = self._prev_labels
        self._cur = np.concatenate([self._cur, new_cur])
        self._prev = np.concatenate([self._prev, new_prev])
        return True

    # -- updates
    def add(
        self,
        categorical: Sequence[Mapping[str, str]],
        numeric: Sequence[Mapping[str, float]],
        labels: Sequence[int],
        attributes: Sequence[Impression] = (),
        event_time_ms: int = 0,
    ) -> None:
        """Add examples in order: their categorical dicts, numeric dicts (may be empty
        sequences), 0/1 labels and, for attribute fields, the impressions themselves."""
        n = len(labels)
        for start in range(0, n, self.window):
            stop = min(n, start + self.window)
            self._add_chunk(
                categorical[start:stop] if categorical else (),
                numeric[start:stop] if numeric else (),
                labels[start:stop],
                attributes[start:stop] if attributes else (),
            )
        self.newest_event_time_ms = max(self.newest_event_time_ms, int(event_time_ms))

    def _table_delta(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Counts per (field, slot, label) of the ring rows ``rows``, and the per-label totals."""
        nf = len(self.fields)
        ids = self._ring[rows, :nf].astype(np.int64)
        lab = self._labels[rows].astype(np.int64)
        flat = (np.arange(nf, dtype=np.int64)[None, :] * self._slots + ids) * 2 + lab[:, None]
        delta = np.bincount(flat.ravel(), minlength=nf * self._slots * 2).reshape(nf, self._slots, 2)
        return delta, np.bincount(lab, minlength=2)

    def _add_chunk(
        self,
        cats: Sequence[Mapping[str, str]],
        nums: Sequence[Mapping[str, float]],
        labels: Sequence[int],
        imps: Sequence[Impression],
    ) -> None:
        m, w, s = len(labels), self.window, self.seen
        cat_names = set().union(*(c.keys() for c in cats))
        num_names = set().union(*(x.keys() for x in nums)) - cat_names
        if self.discover:
            for name in sorted((cat_names | num_names) - self._index.keys()):
                if not self._add_field(name, "cat" if name in cat_names else "num"):
                    break
        for f, kind in enumerate(self._kinds):
            if kind == "any" and self.fields[f] in cat_names:
                self._kinds[f] = "cat"
            elif kind == "any" and self.fields[f] in num_names:
                self._kinds[f] = "num"
        # 1. rows aging out of the current window move to the previous one
        a0, a1 = max(0, s - w), max(0, s - w + m)
        if a1 > a0:
            delta, lab = self._table_delta(np.arange(a0, a1) % (2 * w))
            self._cur -= delta
            self._prev += delta
            self._cur_labels -= lab
            self._prev_labels += lab
        # 2. rows aging out of the previous window leave; their slots are recycled when free
        b0, b1 = max(0, s - 2 * w), max(0, s - 2 * w + m)
        if b1 > b0:
            rows = np.arange(b0, b1) % (2 * w)
            delta, lab = self._table_delta(rows)
            self._prev -= delta
            self._prev_labels -= lab
            alive = (self._cur.sum(axis=2) + self._prev.sum(axis=2)) > 0
            for f in range(len(self.fields)):
                gone = np.unique(self._ring[rows, f])
                gone = gone[(gone > MISSING) & ~alive[f, gone]]
                vocab, values, free = self._vocab[f], self._values[f], self._free[f]
                for slot in gone.tolist():
                    vocab.pop(values[slot], None)
                    values[slot] = None
                    free.append(slot)
        # 3. encode and add the new rows
        pos = np.arange(s, s + m) % (2 * w)
        ids = np.empty((m, len(self.fields)), dtype=np.int32)
        for f, (name, kind) in enumerate(zip(self.fields, self._kinds, strict=True)):
            if kind == "cat":
                col = [c.get(name) for c in cats]
            elif kind == "num":
                col = [_num_token(x.get(name)) for x in nums]
            elif kind == "attr" and imps:
                col = [str(getattr(imp, name)) for imp in imps]
            else:
                col = [None] * m
            ids[:, f] = self._encode(f, col)
        self._ring[pos, : len(self.fields)] = ids
        self._labels[pos] = np.asarray(labels, dtype=np.int8)
        delta, lab = self._table_delta(pos)
        self._cur += delta
        self._cur_labels += lab
        self.seen += m

    def _encode(self, f: int, col: list[str | None]) -> list[int]:
        vocab = self._vocab[f]
        get = vocab.get
        out = [get(v, -1) for v in col]
        if -1 in out:
            values, free = self._values[f], self._free[f]
            overflow = 0
            for i, slot in enumerate(out):
                if slot != -1:
                    continue
                v = col[i]
                slot = vocab.get(v, -1)  # an earlier row of this chunk may have added it
                if slot == -1:
                    if free:
                        slot = free.pop()
                        values[slot] = v
                    elif len(values) < self._slots:
                        slot = len(values)
                        values.append(v)
                    else:
                        overflow += 1
                        out[i] = OTHER
                        continue
                    vocab[v] = slot
                out[i] = slot
            if overflow:
                name = self.fields[f]
                self.overflowed[name] = self.overflowed.get(name, 0) + overflow
        return out


# --------------------------------------------------------------------------- importance
def field_psi(
    previous: np.ndarray, current: np.ndarray, bins: int = 20, pseudocount: float = 0.5
) -> tuple[float, float]:
    """``(psi over all examples, psi over clicked examples)`` of one field between two aligned
    ``[slots, 2]`` (value, label) tables: bins are the previous window's ``bins`` most frequent
    values (never the shared "other" slot, whose content depends on slot availability) plus one
    bin for everything else.

    >>> prev = np.array([[0, 0], [0, 0], [900, 100], [900, 100]])  # slots: other, missing, a, b
    >>> [round(x, 3) for x in field_psi(prev, prev)]
    [0.0, 0.0]
    >>> cur = np.array([[0, 0], [0, 0], [850, 150], [950, 50]])  # same traffic, clicks moved to a
    >>> [round(x, 3) for x in field_psi(prev, cur)]
    [0.0, 0.271]
    """
    prev_total = previous.sum(axis=1)
    if prev_total.sum() == 0 or current.sum() == 0:
        return 0.0, 0.0
    live = np.flatnonzero(prev_total)
    live = live[live != OTHER]
    top = live[np.argsort(-prev_total[live], kind="stable")[:bins]]
    rest = np.ones(previous.shape[0], dtype=bool)
    rest[top] = False

    def binned(t: np.ndarray) -> np.ndarray:
        return np.concatenate([t[top], t[rest].sum(axis=0, keepdims=True)])

    pb, cb = binned(previous), binned(current)
    p_all = psi(pb.sum(axis=1), cb.sum(axis=1), pseudocount)
    p_clk = psi(pb[:, 1], cb[:, 1], pseudocount) if pb[:, 1].sum() > 0 and cb[:, 1].sum() > 0 else 0.0
    return p_all, p_clk


@dataclass(frozen=True)
class FieldScore:
    """One field in one computation (see the module doc for the formulas)."""

    mi: float
    expected_mi: float
    null_sd: float
    importance: float
    psi: float
    psi_impressions: float
    psi_clicks: float
    #: Distinct values in the current window (the "other" bucket counts as one).
    cardinality: int
    raw_weight: float
    weight: float


@dataclass(frozen=True)
class Snapshot:
    """Everything one computation found; :meth:`FieldImportance.message` turns it into the
    :class:`~ctr.infra.schema.FieldWeights` contract."""

    window_examples: int
    previous_examples: int
    click_rate: float
    label_entropy: float
    event_time_ms: int
    fields: dict[str, FieldScore] = field(default_factory=dict)

    @property
    def weights(self) -> dict[str, float]:
        return {f: s.weight for f, s in self.fields.items()}

    def table(self) -> str:
        """A fixed-width table of the scores (for logs and reports)."""
        head = ("field", "weight", "import.", "mi", "E0[mi]", "sd0", "psi", "psi_all", "psi_clk", "card")
        lines = ["{:<8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>6}".format(*head)]
        for f, s in self.fields.items():
            lines.append(
                f"{f:<8} {s.weight:7.3f} {s.importance:8.4f} {s.mi:8.5f} {s.expected_mi:8.5f} {s.null_sd:8.5f} "
                f"{s.psi:7.3f} {s.psi_impressions:7.3f} {s.psi_clicks:7.3f} {s.cardinality:6d}"
            )
        return "\n".join(lines)


class FieldImportance:
    """A :class:`SlidingWindow` plus the scoring and the EMA of the published weights.

    ``add`` feeds examples; every ``compute`` scores the fields on the current window, moves
    the weight EMA one step and returns a :class:`Snapshot`.
    """

    def __init__(self, config: ReweightConfig | None = None) -> None:
        self.config = config or ReweightConfig()
        c = self.config
        self.window = SlidingWindow(c.window, c.fields, c.max_values, c.max_fields)
        self._ema: dict[str, float] = {}

    def add(self, rows: Sequence[Impression | TrainingExample], labels: Sequence[int] | None = None) -> None:
        """Add :class:`~ctr.infra.schema.TrainingExample` s (labels read from them) or
        :class:`~ctr.infra.schema.Impression` s with their ``labels``."""
        if not rows:
            return
        if labels is None:
            labels = [r.label for r in rows]  # type: ignore[union-attr]
            imps = [r.impression for r in rows]  # type: ignore[union-attr]
        else:
            imps = [r.impression if isinstance(r, TrainingExample) else r for r in rows]
        self.window.add(
            [i.categorical for i in imps],
            [i.numeric for i in imps],
            labels,
            imps,
            event_time_ms=max(i.event_time_ms for i in imps),
        )

    def seed_weights(self, weights: Mapping[str, float]) -> None:
        """Start the EMA from previously published weights (after a restart)."""
        self._ema = {f: float(w) for f, w in weights.items()}

    def compute(self) -> Snapshot:
        """Score every field on the current window and move the weight EMA one step."""
        c, w = self.config, self.window
        n1, n = int(w._cur_labels[1]), int(w._cur_labels.sum())
        p = n1 / n if n else 0.0
        parts: dict[str, dict] = {}
        for name in w.fields:
            cur, prev = w.tables(name)
            live = cur.sum(axis=1) > 0
            mi, e0, sd0, imp = outrank(cur[live], c.significance)
            p_all, p_clk = 0.0, 0.0
            if w.n_previous >= w.window:  # two full windows: equal sample sizes, a stable noise floor
                p_all, p_clk = field_psi(prev, cur, c.psi_bins, c.psi_pseudocount)
            parts[name] = dict(
                mi=mi,
                expected_mi=e0,
                null_sd=sd0,
                importance=imp,
                psi=max(p_all, p_clk),
                psi_impressions=p_all,
                psi_clicks=p_clk,
                cardinality=int(live.sum()),
            )
        raw = normalise_weights({f: s["importance"] for f, s in parts.items()}, c.floor)
        smoothed = raw
        if c.smoothing < 1.0 and self._ema and raw:
            mixed = {f: (1 - c.smoothing) * self._ema.get(f, x) + c.smoothing * x for f, x in raw.items()}
            mean = sum(mixed.values()) / len(mixed)
            if mean > 0:
                smoothed = {f: round(x / mean, 6) for f, x in mixed.items()}
        self._ema = dict(smoothed)
        return Snapshot(
            window_examples=w.n_current,
            previous_examples=w.n_previous,
            click_rate=p,
            label_entropy=entropy(p),
            event_time_ms=w.newest_event_time_ms,
            fields={f: FieldScore(**s, raw_weight=raw[f], weight=smoothed[f]) for f, s in parts.items()},
        )

    @staticmethod
    def message(snapshot: Snapshot, version: int, computed_at_ms: int) -> FieldWeights:
        """The published contract (floats rounded to 6 digits)."""
        return FieldWeights(
            version=version,
            computed_at_ms=computed_at_ms,
            event_time_ms=snapshot.event_time_ms,
            window_examples=snapshot.window_examples,
            weights={f: round(s.weight, 6) for f, s in snapshot.fields.items()},
            importance={f: round(s.importance, 6) for f, s in snapshot.fields.items()},
            psi={f: round(s.psi, 6) for f, s in snapshot.fields.items()},
        )


def replay(examples: Iterable[TrainingExample], config: ReweightConfig, every: int) -> Iterable[tuple[int, Snapshot]]:
    """Feed ``examples`` in chunks of ``every`` and compute after each: ``(examples seen, snapshot)``.

    What the streaming stage does, without Kafka (reports and tests use it)."""
    fi = FieldImportance(config)
    batch: list[TrainingExample] = []
    seen = 0
    for ex in examples:
        batch.append(ex)
        if len(batch) == every:
            fi.add(batch)
            seen += len(batch)
            batch = []
            yield seen, fi.compute()
    if batch:
        fi.add(batch)
        yield seen + len(batch), fi.compute()
