"""Criteo display-advertising logs (Kaggle DAC ``train.txt``, the 1TB day files, samples).

Layout: the label, then 13 integer features ``I1..I13``, then 26 hashed categorical features
``C1..C26``. Accepted variants, detected from the first line:

* tab- or comma-separated (sniffed);
* no header (the raw files) with 40 columns, or 41 when a leading ``Id`` column is present;
* a header ``label,I1,..,C26`` or ``Id,Label,I1,..,C26`` (any case; with a header, every
  column named ``I<n>`` is numeric and every ``C<n>`` categorical, so subsets work too);
* ``.gz`` / ``.bz2`` / ``.xz`` compression.

Mapping to :class:`~ctr.infra.schema.Impression` (Criteo has neither timestamps nor users):

* an empty categorical value omits that field; an empty numeric omits it (missing is not 0);
  numerics are kept raw (no log transform: that is the feature pipeline's job);
* ``event_time_ms = start_ms + floor(row_index * 1000 / events_per_second)``. The defaults
  (2014-01-01 UTC, 76 events/s) spread the 45.8M-row Kaggle file over its real span of
  about 7 days, in file order, which is the logs' time order;
* ``user_id`` is column ``C3`` (about 10M distinct values in the full data, the most
  user-like cardinality) and ``item_id`` is ``C15`` (about 15k distinct values, never
  missing: ad-like). Both are configurable; an empty value gives ``"unknown"``. The columns
  also stay in ``categorical``;
* ``position`` is 0 (unknown).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Unpack

from ctr.infra.schema import MAX_ID_LEN, Impression
from ctr.streams.datasets.base import (
    BadRow,
    CsvSource,
    SourceOptions,
    check_id,
    parse_label,
    parse_numbers,
)

#: 2014-01-01T00:00:00Z: an arbitrary, documented origin (the Kaggle data is from 2014).
CRITEO_START_MS = 1_388_534_400_000
#: 45,840,617 rows over ~7 days in the Kaggle training file.
CRITEO_EVENTS_PER_SECOND = 76.0
NUMERIC = tuple(f"I{i}" for i in range(1, 14))
CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
_LABEL_NAMES = ("label", "click", "clicked", "y")
_NUMERIC_NAME = re.compile(r"^I\d+$", re.IGNORECASE)
_CATEGORICAL_NAME = re.compile(r"^C\d+$", re.IGNORECASE)


class CriteoSource(CsvSource):
    """Stream a Criteo file as :class:`~ctr.streams.datasets.base.LabeledImpression` (see module doc).

    Parameters: ``user_column`` / ``item_column`` name the categorical columns used as ids,
    ``start_ms`` / ``events_per_second`` place rows in event time, ``delay`` gives clicks
    their delay (default ``ClickDelay(seed=seed)``), ``events`` caps the number yielded,
    ``strict`` raises on the first bad row instead of counting it in ``skipped``. Event time
    comes from the row index, so the file is in order by construction and ``order`` (accepted
    like every :class:`CsvSource` option) changes nothing.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "day_0.txt"
    >>> row = ["1", "5", "", *["0"] * 11] + [f"{i:08x}" for i in range(26)]
    >>> row[14 + 2] = ""                                      # C3 missing on this row
    >>> _ = path.write_text("\\t".join(row) + "\\n")
    >>> src = CriteoSource(path)
    >>> ex = next(src)
    >>> ex.clicked, ex.impression.event_id, ex.impression.user_id, ex.impression.item_id
    (True, 'criteo-0', 'unknown', '0000000e')
    >>> sorted(ex.impression.numeric)[:3], "I2" in ex.impression.numeric, len(ex.impression.categorical)
    (['I1', 'I10', 'I11'], False, 25)
    """

    source = "criteo"

    def __init__(
        self,
        path: str | Path,
        *,
        user_column: str = "C3",
        item_column: str = "C15",
        start_ms: int = CRITEO_START_MS,
        events_per_second: float = CRITEO_EVENTS_PER_SECOND,
        **options: Unpack[SourceOptions],
    ) -> None:
        super().__init__(path, **options)
        if events_per_second <= 0:
            raise ValueError(f"events_per_second must be positive, got {events_per_second}")
        self.start_ms = int(start_ms)
        self.events_per_second = float(events_per_second)
        self._ms_per_event = 1000.0 / self.events_per_second
        first = self.first_row
        self.has_header = (
            bool(first) and not _is_label(first[0]) and not _is_label(first[min(1, len(first) - 1)])
        )
        if self.has_header:
            names = [c.strip() for c in first]
            lowered = [n.lower() for n in names]
            label = next((lowered.index(n) for n in _LABEL_NAMES if n in lowered), None)
            if label is None:
                raise ValueError(
                    f"criteo: {self.path} has a header but no label column ({'/'.join(_LABEL_NAMES)})"
                )
            self._label = label
            self._num = [(n.upper(), j) for j, n in enumerate(names) if _NUMERIC_NAME.match(n)]
            self._cat = [(n.upper(), j) for j, n in enumerate(names) if _CATEGORICAL_NAME.match(n)]
        else:
            if len(first) == 40:
                offset = 0
            elif len(first) == 41:
                offset = 1  # leading Id column
            elif len(first) == 39:
                raise ValueError(f"criteo: {self.path} has 39 columns: no label (a Criteo test file?)")
            else:
                raise ValueError(
                    f"criteo: {self.path} has {len(first)} columns; expected 40 (label, I1-13, C1-26)"
                )
            self._label = offset
            self._num = [(n, offset + 1 + k) for k, n in enumerate(NUMERIC)]
            self._cat = [(n, offset + 14 + k) for k, n in enumerate(CATEGORICAL)]
        self._ncols = len(first)
        columns = dict(self._cat)
        for role, col in (("user_column", user_column), ("item_column", item_column)):
            if col.upper() not in columns:
                raise ValueError(f"criteo: {role}={col!r} is not a categorical column of {self.path}")
        self._user = columns[user_column.upper()]
        self._item = columns[item_column.upper()]

    def _parse(self, row: list[str], index: int) -> tuple[Impression, bool]:
        if len(row) != self._ncols:
            kind = "short row" if len(row) < self._ncols else "long row"
            raise BadRow(kind, f"{len(row)} of {self._ncols} fields")
        clicked = parse_label(row[self._label])
        numeric = parse_numbers(row, self._num)
        categorical = {name: v for name, j in self._cat if (v := row[j])}
        if max(map(len, row)) > MAX_ID_LEN:
            raise BadRow("value too long", f"a field is longer than {MAX_ID_LEN} chars")
        imp = Impression(
            event_id=f"{self.id_prefix}-{index}",
            event_time_ms=self.start_ms + int(index * self._ms_per_event),
            user_id=check_id("user", row[self._user]),
            item_id=check_id("item", row[self._item]),
            categorical=categorical,
            numeric=numeric,
        )
        return imp, clicked


def _is_label(value: str) -> bool:
    return value.strip() in ("0", "1")
