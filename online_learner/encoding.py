"""Feature encoder: a batch of events -> the arrays the hash and the model take.

Rows may be :class:`ctr.infra.schema.Impression`, :class:`ctr.infra.schema.TrainingExample` (its
impression is used), or plain mappings -- either structured ``{"categorical": {...},
"numeric": {...}}`` or flat ``{field: value}``.

* The field vocabulary is the field *names* of the :class:`~ctr.online_learner.model.ModelConfig`;
  fields a row carries that the model does not know are ignored (a new field needs a new model
  config, not a crash of the trainer).
* A missing categorical value maps to :data:`~ctr.online_learner.hashing.MISSING_KEY` (each field
  then reads its own "missing" rows); a missing / NaN / inf numeric value to missing too.
* ``user_id``, ``item_id`` and ``position`` are read from the Impression's own attributes when
  they are listed as categorical fields.

The steady-state cost is one dict lookup per (row, field) -- the string hash runs once per
distinct value (:class:`~ctr.online_learner.hashing.ValueKeyer`).

>>> from ctr.online_learner.model import ModelConfig
>>> enc = FeatureEncoder(ModelConfig(categorical_fields=("site", "user_id"), numeric_fields=("price",)))
>>> batch = enc.encode([{"site": "news", "user_id": "u1", "price": 2.5, "extra": "ignored"}, {"site": "news"}])
>>> batch.keys.shape, batch.keys.dtype, len(batch)
((2, 3), dtype('uint64'), 2)
>>> int(batch.keys[1, 1]), bool(batch.keys[0, 0] == batch.keys[1, 0])
(0, True)
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter, itemgetter
from typing import Any

import numpy as np

from ctr.online_learner.hashing import MISSING_KEY, ValueKeyer, numeric_keys, value_key
from ctr.online_learner.model import ModelConfig

__all__ = ["EncodedBatch", "FeatureEncoder"]

EMPTY_KEY = np.uint64(value_key(""))
#: Impression attributes usable as categorical fields.
IMPRESSION_ATTRIBUTES = ("user_id", "item_id", "position")


@dataclass
class EncodedBatch:
    """Model inputs for ``B`` examples.

    Attributes:
        keys: uint64 ``[B, H]`` keys of the hashed fields (``config.hashed_fields`` order).
        numeric: float32 ``[B, F_num]`` raw numeric values, NaN = missing (dense mode, or the
            numeric fields' linear term; None when the model reads no numeric values).
    """

    keys: np.ndarray
    numeric: np.ndarray | None = None

    def __len__(self) -> int:
        return self.keys.shape[0]

    def take(self, rows: np.ndarray | slice) -> EncodedBatch:
        """The batch of ``rows`` (an index array, or a slice: a view)."""
        return EncodedBatch(self.keys[rows], None if self.numeric is None else self.numeric[rows])


def _to_float(v: Any) -> float:
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def numeric_table(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> np.ndarray:
    """float64 ``[len(rows), len(names)]`` of ``row.get(name)``: absent, None or unparsable -> NaN.

    Rows that hold every name (a store's rows) take one ``itemgetter`` pass; otherwise the
    common case -- every value a float or int, or absent -- is one C-level ``map`` per row and
    one ``fromiter``; anything else (None, strings) takes the per-value path."""
    n, f = len(rows), len(names)
    if n and f:
        try:  # every row holds every name (a store's rows): one C-level pass
            got = map(itemgetter(*names), rows)
            return np.fromiter(got if f == 1 else itertools.chain.from_iterable(got),
                               dtype=np.float64, count=n * f).reshape(n, f)
        except (KeyError, TypeError, ValueError, OverflowError):  # an absent name, or not a number
            pass
    flat: list[Any] = []
    extend = flat.extend
    absent = [math.nan] * f
    for d in rows:
        extend(map(d.get, names, absent))
    try:
        return np.fromiter(flat, dtype=np.float64, count=n * f).reshape(n, f)
    except (TypeError, ValueError):  # None, or a string: numeric strings parse, the rest is NaN
        return np.array([_to_float(v) for v in flat], dtype=np.float64).reshape(n, f)


class FeatureEncoder:
    """Turns rows into :class:`EncodedBatch` for one :class:`ModelConfig`.

    Args:
        config: the model config (field names, numeric mode and resolution).
        keyer: shared value-key cache (one per process is enough).
        empty_is_missing: treat ``""`` as missing (Criteo's convention).
    """

    def __init__(self, config: ModelConfig, keyer: ValueKeyer | None = None, empty_is_missing: bool = False):
        self.config = config
        self.keyer = keyer or ValueKeyer()
        self.empty_is_missing = empty_is_missing

    @functools.cached_property
    def column_of(self) -> dict[str, int]:
        """Field name -> its column in :attr:`EncodedBatch.keys`."""
        return {name: j for j, name in enumerate(self.config.hashed_fields)}

    def encode(self, rows: Sequence[Any]) -> EncodedBatch:
        """``B`` rows -> :class:`EncodedBatch` (keys ``[B, H]``, numerics ``[B, F_num]`` if dense)."""
        cfg = self.config
        n = len(rows)
        rows = [getattr(r, "impression", r) for r in rows]  # TrainingExample -> Impression
        structured = n > 0 and not isinstance(rows[0], Mapping)
        if structured:
            cats: list[Any] = [r.categorical for r in rows]
            nums: list[Any] = [r.numeric for r in rows]
        elif n > 0 and "categorical" in rows[0]:
            cats = [r.get("categorical", {}) for r in rows]
            nums = [r.get("numeric", {}) for r in rows]
        else:
            cats = nums = list(rows)

        keys = np.empty((n, len(cfg.hashed_fields)), dtype=np.uint64)
        own = [f for f, name in enumerate(cfg.categorical_fields) if structured and name in IMPRESSION_ATTRIBUTES]
        for f in own:
            keys[:, f] = self.keyer(list(map(str, map(attrgetter(cfg.categorical_fields[f]), rows))))
        rest = [f for f in range(len(cfg.categorical_fields)) if f not in own]
        if rest:
            keys[:, rest] = self.keyer.columns(cats, [cfg.categorical_fields[f] for f in rest])
        if self.empty_is_missing:
            cat_keys = keys[:, : len(cfg.categorical_fields)]
            cat_keys[cat_keys == EMPTY_KEY] = MISSING_KEY

        numeric = None
        if cfg.numeric_fields:
            values = numeric_table(nums, cfg.numeric_fields)
            if cfg.numeric_mode == "bucket":
                keys[:, len(cfg.categorical_fields) :] = numeric_keys(values, cfg.numeric_resolution)
            if cfg.numeric_mode == "dense" or cfg.numeric_linear:
                numeric = values.astype(np.float32)
        return EncodedBatch(keys, numeric)


def discover_fields(
    rows: Sequence[Any], categorical: Sequence[str] | None = None, numeric: Sequence[str] | None = None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (categorical, numeric) fields to learn from these rows: every field they carry.

    The impression's own ids (``user_id``, ``item_id``, ``position``) come first, then the
    categorical and numeric field names present in any row, each sorted (a stable order, so
    the same data gives the same model layout). Per-field hash seeds derive from the names,
    so no vocabulary is needed. ``categorical`` / ``numeric`` given: exactly those (they
    narrow what is learned, whatever the data carries).

    >>> from ctr.infra.schema import Impression
    >>> imp = Impression(event_id="e", event_time_ms=0, user_id="u", item_id="i", position=0,
    ...                  categorical={"site": "news", "app": "x"}, numeric={"price": 2.0})
    >>> discover_fields([imp])
    (('user_id', 'item_id', 'position', 'app', 'site'), ('price',))
    >>> discover_fields([imp], numeric=())
    (('user_id', 'item_id', 'position', 'app', 'site'), ())
    """
    rows = [getattr(r, "impression", r) for r in rows]
    cats: set[str] = set()
    nums: set[str] = set()
    structured = False
    for r in rows:
        if isinstance(r, Mapping):
            c, n = r.get("categorical", {}), r.get("numeric", {})
        else:
            structured = True
            c, n = r.categorical, r.numeric
        cats.update(c)
        nums.update(n)
    own = IMPRESSION_ATTRIBUTES if structured else ()
    found_cat = own + tuple(sorted(cats - set(own)))
    found_num = tuple(sorted(nums - cats - set(own)))
    return (
        tuple(categorical) if categorical is not None else found_cat,
        tuple(numeric) if numeric is not None else found_num,
    )
