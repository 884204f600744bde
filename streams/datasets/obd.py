"""Open Bandit Dataset (ZOZOTOWN fashion recommendations; ``obp`` / st-tech/zr-obp).

Layout (header required, first column an unnamed row index): ``timestamp,item_id,position,
click,propensity_score,user_feature_0..3,user-item_affinity_0..K``; the file is sorted by
``timestamp`` (ISO 8601 with offset, e.g. ``2019-11-24 00:00:34.762830+00:00``). An
``item_context.csv`` next to it (``item_id,item_feature_0..3``) is joined when present.

Mapping to :class:`~ctr.infra.schema.Impression`:

* **event time**: the real ``timestamp`` (naive times are read as UTC), in ms;
* **item**: ``item_id`` as is (``"0"``-``"79"``);
* **position**: 0-based slot, i.e. the file's 1-based ``position`` minus ``position_base``;
* **user**: OBD has no user id. The surrogate is ``obd-u-<hash>``, a 64-bit BLAKE2 hash of
  the four ``user_feature_*`` values: a *cohort* of users sharing those features (about
  250 cohorts in the 10k-row samples), not a person. Documented here so nobody reads
  per-user counters on OBD as per-person;
* **categorical**: ``user_feature_0..3`` and, from the item context, ``item_feature_1..3``;
* **numeric**: ``user_item_affinity`` = the ``user-item_affinity_<item_id>`` column of the
  shown item, and ``item_feature_0`` from the item context. With ``all_affinities=True``,
  every *non-zero* affinity column is added as ``affinity_<k>`` (95 % are zero);
* ``propensity_score`` is the logging policy's probability, not a feature: not emitted.
"""

from __future__ import annotations

import csv
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from hashlib import blake2b
from pathlib import Path
from typing import Unpack

from ctr.infra.schema import MAX_ID_LEN, Impression
from ctr.streams.datasets.base import (
    BadRow,
    CsvSource,
    SourceOptions,
    open_text,
    parse_label,
    parse_number,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_USER_FEATURES = tuple(f"user_feature_{i}" for i in range(4))
_AFFINITY = "user-item_affinity_"


@lru_cache(maxsize=1 << 16)  # bounded: OBD has few feature combinations, the cache stays small
def _cohort_id(features: tuple[str, ...]) -> str:
    return "obd-u-" + blake2b("\x1f".join(features).encode(), digest_size=8).hexdigest()


def parse_timestamp_ms(value: str) -> int:
    """ISO 8601 (space or ``T``, optional offset; naive = UTC) -> epoch milliseconds."""
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise BadRow("bad timestamp", repr(value[:40])) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    ms = (dt - _EPOCH) // _MS
    if ms < 0:
        raise BadRow("bad timestamp", f"{value[:40]!r} is before 1970")
    return ms


class ObdSource(CsvSource):
    """Stream an Open Bandit Dataset ``all.csv`` (see module doc).

    ``item_context``: path of the item-context file; default ``item_context.csv`` next to
    ``path`` if it exists; ``False`` disables the join. ``position_base``: the first slot's
    number in the file (1 for OBD). ``delay``, ``events``, ``strict``, ``seed``, ``order``
    behave as for every :class:`CsvSource`.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "all.csv"
    >>> _ = path.write_text(
    ...     ",timestamp,item_id,position,click,propensity_score,user_feature_0,user_feature_1,"
    ...     "user_feature_2,user_feature_3,user-item_affinity_0,user-item_affinity_1\\n"
    ...     "0,2019-11-24 00:00:34.762830+00:00,1,3,1,0.0125,a,b,c,d,0.0,2.0\\n")
    >>> ex = next(ObdSource(path))
    >>> ex.impression.event_time_ms, ex.impression.item_id, ex.impression.position, ex.clicked
    (1574553634762, '1', 2, True)
    >>> ex.impression.user_id, ex.impression.numeric
    ('obd-u-c361c0ce24f02dc0', {'user_item_affinity': 2.0})
    """

    source = "obd"
    has_event_time = True

    def __init__(
        self,
        path: str | Path,
        *,
        item_context: str | Path | bool | None = None,
        position_base: int = 1,
        all_affinities: bool = False,
        **options: Unpack[SourceOptions],
    ) -> None:
        super().__init__(path, **options)
        names = [c.strip() for c in self.first_row]
        missing = [
            c for c in ("timestamp", "item_id", "position", "click", *_USER_FEATURES) if c not in names
        ]
        if missing:
            raise ValueError(f"obd: {self.path} header lacks {missing}")
        self.has_header = True
        self._ncols = len(names)
        col = names.index
        self._ts, self._item, self._pos, self._click = (
            col("timestamp"),
            col("item_id"),
            col("position"),
            col("click"),
        )
        self._user = [col(n) for n in _USER_FEATURES]
        self._affinity = {n[len(_AFFINITY) :]: j for j, n in enumerate(names) if n.startswith(_AFFINITY)}
        self._all_affinities = (
            [(f"affinity_{k}", j) for k, j in self._affinity.items()] if all_affinities else []
        )
        self.position_base = position_base
        beside = self.path.with_name("item_context.csv")
        context: Path | None
        if item_context is None:  # the file beside the log, when there is one
            context = beside if beside.is_file() else None
        elif item_context is True:
            context = beside
        else:
            context = Path(item_context) if item_context else None
        self.items: dict[str, tuple[dict[str, str], dict[str, float]]] = (
            _load_item_context(context) if context is not None else {}
        )
        self.check_order()  # an unsorted file is refused at open, like a bad header

    def _time_key(self, row: list[str]) -> int:
        return parse_timestamp_ms(row[self._ts])

    def _parse(self, row: list[str], index: int) -> tuple[Impression, bool]:
        if len(row) != self._ncols:
            kind = "short row" if len(row) < self._ncols else "long row"
            raise BadRow(kind, f"{len(row)} of {self._ncols} fields")
        clicked = parse_label(row[self._click])
        item = row[self._item]
        if not item or len(item) > MAX_ID_LEN:
            raise BadRow("bad item", repr(item[:40]))
        pos = row[self._pos]
        if not (pos.isascii() and pos.isdigit()) or not 0 <= int(pos) - self.position_base <= 10_000:
            raise BadRow("bad position", repr(pos[:20]))
        user_features = tuple(row[j] for j in self._user)
        categorical = {name: v for name, v in zip(_USER_FEATURES, user_features, strict=True) if v}
        if any(len(v) > MAX_ID_LEN for v in user_features):
            raise BadRow("value too long", f"a user feature is longer than {MAX_ID_LEN} chars")
        numeric: dict[str, float] = {}
        j = self._affinity.get(item)
        if j is not None and row[j]:
            numeric["user_item_affinity"] = parse_number(_AFFINITY + item, row[j])
        for name, k in self._all_affinities:
            if row[k] and (x := parse_number(name, row[k])) != 0.0:
                numeric[name] = x
        context = self.items.get(item)
        if context is not None:
            categorical.update(context[0])
            numeric.update(context[1])
        imp = Impression(
            event_id=f"{self.id_prefix}-{index}",
            event_time_ms=parse_timestamp_ms(row[self._ts]),
            user_id=_cohort_id(user_features),
            item_id=item,
            position=int(pos) - self.position_base,
            categorical=categorical,
            numeric=numeric,
        )
        return imp, clicked


def _load_item_context(path: Path) -> dict[str, tuple[dict[str, str], dict[str, float]]]:
    """item_id -> (categorical, numeric) for the ``item_feature_*`` columns.

    A column is numeric when every value in it parses as a number (``item_feature_0`` in
    OBD), categorical otherwise. One row per item (80 in OBD): reading it whole is fine.
    """
    if not path.is_file():
        raise ValueError(f"obd: no such item-context file: {path}")
    with open_text(path) as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "item_id" not in reader.fieldnames:
            raise ValueError(f"obd: {path} has no item_id column")
        rows = list(reader)
    features = [n for n in reader.fieldnames if n and n.startswith("item_feature_")]

    def is_number(value: str) -> bool:
        try:
            parse_number("", value)
        except BadRow:
            return False
        return True

    numeric_cols = {n for n in features if all(is_number(r[n]) for r in rows if r[n])}
    items: dict[str, tuple[dict[str, str], dict[str, float]]] = {}
    for r in rows:
        categorical = {n: r[n][:MAX_ID_LEN] for n in features if n not in numeric_cols and r[n]}
        numeric = {n: float(r[n]) for n in features if n in numeric_cols and r[n]}
        items[r["item_id"]] = (categorical, numeric)
    return items
