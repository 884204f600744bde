"""Any delimited click log, described by a small mapping file (TOML or JSON).

The mapping names the columns that play each role; see ``mapping.example.toml`` next to
this module for a commented example. Keys (all column names are header names, or names
from ``columns`` for a file without header):

================== ========== =========================================================
key                required   meaning
================== ========== =========================================================
label              yes        clicked column: 1/0, true/false, yes/no (any case)
user               yes        user id column (empty -> ``"unknown"``)
item               yes        item / ad id column (empty -> ``"unknown"``)
timestamp          no         event-time column; without it event time is
                              ``start_ms + row_index * 1000 / events_per_second``
timestamp_format   no         ``epoch_ms`` (default), ``epoch_s`` (fractions allowed) or
                              ``iso`` (ISO 8601; naive times are UTC)
position           no         slot column (non-negative integer; empty -> 0)
position_offset    no         integer subtracted from ``position`` (default 0; 1 for a file
                              whose first slot is 1); a slot below it is a bad row
categorical        no         list of columns kept as categorical features (empty omitted)
numeric            no         list of columns kept as numeric features (empty omitted;
                              anything else non-numeric is a bad row)
derive             no         list of categorical features computed from the event time
                              (UTC): ``hour`` (``"0"``-``"23"``), ``weekday`` (``"0"`` =
                              Monday .. ``"6"``); needs ``timestamp``
delimiter          no         one character; default: sniffed from the first line
columns            no         column names, in order, for a file with no header line
start_ms           no         origin when there is no timestamp (default 1_700_000_000_000)
events_per_second  no         rate when there is no timestamp (default 1000)
================== ========== =========================================================

Unknown keys are an error (a typo would otherwise silently drop a feature), and so is a
mapped column missing from the header or a derived field named like a mapped column.
Event-time order is not a mapping key but an option of the source (``order``, see
:class:`~ctr.streams.datasets.base.CsvSource`). Values are stripped of surrounding whitespace;
quoted fields (with delimiters or newlines inside) follow RFC 4180 via :mod:`csv`.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Unpack

from ctr.infra.schema import MAX_ID_LEN, Impression
from ctr.streams.datasets.base import (
    BadRow,
    CsvSource,
    SourceOptions,
    check_field_count,
    check_id,
    parse_label,
    parse_number,
    parse_numbers,
)
from ctr.streams.datasets.obd import parse_timestamp_ms

TIMESTAMP_FORMATS = ("epoch_ms", "epoch_s", "iso")
_MAX_FIELD_NAME = 64
_MAX_POSITION = 10_000
_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS
# Field name -> its value for an event time in ms (UTC). Integer arithmetic, no datetime:
# it runs on every row. 1970-01-01 was a Thursday, weekday 3 when Monday is 0.
_DERIVED: dict[str, Callable[[int], str]] = {
    "hour": lambda ms: str(ms // _HOUR_MS % 24),
    "weekday": lambda ms: str((ms // _DAY_MS + 3) % 7),
}
DERIVABLE = tuple(_DERIVED)


def derive_time_fields(event_time_ms: int, names: tuple[str, ...]) -> dict[str, str]:
    """The ``derive`` fields of an event time (UTC).

    >>> derive_time_fields(1_714_564_800_250, ("hour", "weekday"))  # 2024-05-01T12:00Z, a Wednesday
    {'hour': '12', 'weekday': '2'}
    """
    return {name: _DERIVED[name](event_time_ms) for name in names}


@dataclass(frozen=True)
class CsvMapping:
    """Which column plays which role; load one with :meth:`load` (see module doc for keys).

    >>> m = CsvMapping.from_dict({"label": "clicked", "user": "uid", "item": "ad",
    ...                           "timestamp": "ts", "timestamp_format": "epoch_s",
    ...                           "categorical": ["site", "os"]})
    >>> m.categorical, m.numeric
    (('site', 'os'), ())
    >>> CsvMapping.from_dict({"label": "y", "user": "u", "item": "i", "lable": "z"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: mapping: unknown keys ['lable']; known keys: [...]
    """

    label: str
    user: str
    item: str
    timestamp: str | None = None
    timestamp_format: str = "epoch_ms"
    position: str | None = None
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    delimiter: str | None = None
    columns: tuple[str, ...] | None = None
    start_ms: int = 1_700_000_000_000
    events_per_second: float = 1000.0
    derive: tuple[str, ...] = ()
    position_offset: int = 0

    def __post_init__(self) -> None:
        for key in ("label", "user", "item"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"mapping: '{key}' must name a column")
        if self.timestamp_format not in TIMESTAMP_FORMATS:
            raise ValueError(
                f"mapping: timestamp_format must be one of {TIMESTAMP_FORMATS}, got {self.timestamp_format!r}"
            )
        if self.delimiter is not None and len(self.delimiter) != 1:
            raise ValueError(f"mapping: delimiter must be one character, got {self.delimiter!r}")
        if self.events_per_second <= 0:
            raise ValueError("mapping: events_per_second must be positive")
        # Lists from TOML/JSON become tuples so the mapping stays hashable and immutable.
        for key in ("categorical", "numeric", "columns", "derive"):
            value = getattr(self, key)
            if value is not None:
                if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                    what = "field names" if key == "derive" else "column names"
                    raise ValueError(f"mapping: '{key}' must be a list of {what}")
                object.__setattr__(self, key, tuple(value))
        both = set(self.categorical) & set(self.numeric)
        if both:
            raise ValueError(f"mapping: columns both categorical and numeric: {sorted(both)}")
        too_long = [n for n in (*self.categorical, *self.numeric) if len(n) > _MAX_FIELD_NAME]
        if too_long:
            raise ValueError(f"mapping: feature names longer than {_MAX_FIELD_NAME} chars: {too_long}")
        self._check_derive()
        self._check_position_offset()
        check_field_count(max(len(self.categorical) + len(self.derive), len(self.numeric)))

    def _check_derive(self) -> None:
        unknown = [n for n in self.derive if n not in _DERIVED]
        if unknown:
            raise ValueError(f"mapping: derive can only hold {list(DERIVABLE)}, got {unknown}")
        if len(set(self.derive)) != len(self.derive):
            raise ValueError(f"mapping: derive lists a field twice: {list(self.derive)}")
        if self.derive and self.timestamp is None:
            # Without a timestamp the event time is a made-up row clock: an hour of day taken
            # from it would be a feature that only encodes the row number.
            raise ValueError("mapping: derive needs a timestamp column")
        clash = sorted(set(self.derive) & {*self.categorical, *self.numeric})
        if clash:
            raise ValueError(f"mapping: derived fields {clash} are also mapped columns; rename or drop one")

    def _check_position_offset(self) -> None:
        if not isinstance(self.position_offset, int) or isinstance(self.position_offset, bool):
            raise ValueError(f"mapping: position_offset must be an integer, got {self.position_offset!r}")
        if self.position_offset and self.position is None:
            raise ValueError("mapping: position_offset needs a position column")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "mapping") -> CsvMapping:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known keys: {sorted(known)}")
        missing = [k for k in ("label", "user", "item") if k not in data]
        if missing:
            raise ValueError(f"{where}: missing required keys {missing}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None

    @classmethod
    def load(cls, path: str | Path) -> CsvMapping:
        """Read a ``.toml`` or ``.json`` mapping file."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"csv: no such mapping file: {path}")
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(path.read_text(encoding="utf-8"))
            else:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"csv: cannot parse mapping {path}: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"csv: mapping {path} must be a table/object")
        return cls.from_dict(data, where=str(path))


class CsvMappedSource(CsvSource):
    """Stream a delimited file described by a :class:`CsvMapping` (see module doc).

    ``mapping`` is a :class:`CsvMapping` or the path of a TOML/JSON mapping file.
    ``delay``, ``events``, ``strict``, ``seed``, ``order`` behave as for every
    :class:`CsvSource` (``order`` only matters with a ``timestamp`` column).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "log.csv").write_text('ts,uid,ad,y,site,price\\n'
    ...                                '1700000000123,u1,ad9,1,"news, sports",2.5\\n')
    >>> m = CsvMapping(label="y", user="uid", item="ad", timestamp="ts",
    ...                categorical=("site",), numeric=("price",))
    >>> ex = next(CsvMappedSource(d / "log.csv", mapping=m))
    >>> ex.impression.event_time_ms, ex.impression.categorical, ex.impression.numeric, ex.clicked
    (1700000000123, {'site': 'news, sports'}, {'price': 2.5}, True)
    """

    source = "csv"

    def __init__(
        self,
        path: str | Path,
        *,
        mapping: CsvMapping | str | Path,
        **options: Unpack[SourceOptions],
    ) -> None:
        if "delimiter" in options:
            raise TypeError("the delimiter of a csv: source is the mapping's (delimiter = ...)")
        self.mapping = mapping if isinstance(mapping, CsvMapping) else CsvMapping.load(mapping)
        m = self.mapping
        options["delimiter"] = m.delimiter
        super().__init__(path, **options)
        names = list(m.columns) if m.columns is not None else [c.strip() for c in self.first_row]
        self.has_header = m.columns is None
        wanted = [m.label, m.user, m.item, m.timestamp, m.position, *m.categorical, *m.numeric]
        missing = [c for c in wanted if c is not None and c not in names]
        if missing:
            raise ValueError(f"csv: {self.path} has no column(s) {missing}; columns are {names}")
        self._ncols = len(names)
        col = names.index
        self._label, self._user, self._item = col(m.label), col(m.user), col(m.item)
        self._ts = col(m.timestamp) if m.timestamp is not None else None
        self._pos = col(m.position) if m.position is not None else None
        self._pos_offset = m.position_offset
        self._derive = m.derive
        self._cat = [(n, col(n)) for n in m.categorical]
        self._num = [(n, col(n)) for n in m.numeric]
        self._ms_per_event = 1000.0 / m.events_per_second
        self._ts_kind = m.timestamp_format
        self.has_event_time = m.timestamp is not None
        self.check_order()  # an unsorted file is refused at open, like a bad header

    def _time_key(self, row: list[str]) -> int:
        assert self._ts is not None  # only called when has_event_time
        return self._event_time(row[self._ts].strip(), 0)

    def _event_time(self, value: str, index: int) -> int:
        if self._ts is None:
            return self.mapping.start_ms + int(index * self._ms_per_event)
        if not value:
            raise BadRow("bad timestamp", "empty")
        if self._ts_kind == "iso":
            return parse_timestamp_ms(value)
        x = parse_number("timestamp", value)
        ms = round(x * 1000) if self._ts_kind == "epoch_s" else round(x)
        if not 0 <= ms <= 2**53:
            raise BadRow("bad timestamp", f"{value[:40]!r} out of range")
        return ms

    def _parse(self, row: list[str], index: int) -> tuple[Impression, bool]:
        if len(row) != self._ncols:
            kind = "short row" if len(row) < self._ncols else "long row"
            raise BadRow(kind, f"{len(row)} of {self._ncols} fields")
        row = [v.strip() for v in row]
        clicked = parse_label(row[self._label])
        position = self._position(row[self._pos]) if self._pos is not None else 0
        numeric = parse_numbers(row, self._num)
        categorical = {name: v for name, j in self._cat if (v := row[j])}
        if any(len(v) > MAX_ID_LEN for v in categorical.values()):
            raise BadRow("value too long", f"a categorical value is longer than {MAX_ID_LEN} chars")
        event_time = self._event_time(row[self._ts] if self._ts is not None else "", index)
        if self._derive:
            categorical.update(derive_time_fields(event_time, self._derive))
        imp = Impression(
            event_id=f"{self.id_prefix}-{index}",
            event_time_ms=event_time,
            user_id=check_id("user", row[self._user]),
            item_id=check_id("item", row[self._item]),
            position=position,
            categorical=categorical,
            numeric=numeric,
        )
        return imp, clicked

    def _position(self, value: str) -> int:
        """The 0-based slot: empty -> 0 (unknown), else the value minus ``position_offset``."""
        if not value:
            return 0
        # '²'.isdigit() is True; the length cap keeps int() off huge digit strings (it raises
        # ValueError past 4,300 digits).
        if not (value.isascii() and value.isdigit()) or len(value) > 9:
            raise BadRow("bad position", repr(value[:20]))
        position = int(value) - self._pos_offset
        if not 0 <= position <= _MAX_POSITION:
            raise BadRow("bad position", f"{value[:20]!r} with position_offset {self._pos_offset}")
        return position
