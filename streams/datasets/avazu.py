"""Avazu mobile-ads CTR logs (Kaggle ``train`` / ``train.gz``, 40.4M rows over 10 days).

Layout (header required): ``id,click,hour,C1,banner_pos,site_id,site_domain,site_category,
app_id,app_domain,app_category,device_id,device_ip,device_model,device_type,
device_conn_type,C14..C21``; ``hour`` is ``YYMMDDHH`` in UTC and the file is sorted by it.

Mapping to :class:`~ctr.infra.schema.Impression`:

* **event time**: the start of ``hour`` plus an offset spreading the hour's rows by row
  order. A single pass cannot know how many rows an hour holds, so the step is
  ``3_600_000 / rows in the previous hour`` (``rows_per_hour`` for the first hour; the
  default 170,000 is the file's average) and the offset is capped at the hour's last
  millisecond: times are monotone non-decreasing whenever ``hour`` is, and each row stays
  inside its own hour. A file whose ``hour`` goes back is refused by the default
  ``order="check"``; ``order="sort"`` sorts rows by ``hour`` (file order within an hour)
  first, so the spread sees each hour's rows together.
* **user**: ``device_id``, except for the placeholder ``a99f214a`` that ~83 % of rows carry
  when the device id is unknown; those get ``ip:<device_ip>:<device_model>``, the usual
  Avazu user surrogate. Real device ids are prefixed ``dev:``.
* **item** (the ad slot's content): ``app:<app_id>`` for app traffic, ``site:<site_id>``
  for site traffic (rows whose ``app_id`` is the placeholder ``ecad2386``).
* **position**: ``banner_pos``.
* **categorical**: every other column except ``id``/``click``/``hour`` (including the id
  columns above and ``banner_pos``), plus ``hour_of_day`` (``"00"``-``"23"``) and
  ``weekday`` (``"0"`` = Monday) derived from ``hour``. Empty values are omitted. Avazu has
  no numeric columns (``C14``-``C21`` are anonymised codes).
* **event_id**: ``avazu-<row_index>`` (the ``id`` column is not needed).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Unpack

from ctr.infra.schema import MAX_ID_LEN, Impression
from ctr.streams.datasets.base import BadRow, CsvSource, SourceOptions, check_id, parse_label

#: ``device_id`` value standing for "unknown device" in Avazu.
NO_DEVICE_ID = "a99f214a"
#: ``app_id`` value carried by site (non-app) traffic.
NO_APP_ID = "ecad2386"
_HOUR_MS = 3_600_000
_EXCLUDED = frozenset({"id", "click", "hour"})


class AvazuSource(CsvSource):
    """Stream an Avazu file as :class:`~ctr.streams.datasets.base.LabeledImpression` (see module doc).

    ``rows_per_hour`` only seeds the within-hour spread of the first hour. ``delay``,
    ``events``, ``strict``, ``seed``, ``order`` behave as for every :class:`CsvSource`.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "avazu.csv"
    >>> _ = path.write_text(
    ...     "id,click,hour,banner_pos,site_id,app_id,device_id,device_ip,device_model\\n"
    ...     "1,0,14102100,0,1fbe01fe,ecad2386,a99f214a,ddd2926e,44956a24\\n"
    ...     "2,1,14102100,1,85f751fd,e2fcccd2,0f7c61dc,c4e18dd6,be6db1d7\\n")
    >>> a, b = AvazuSource(path, rows_per_hour=2)
    >>> a.impression.user_id, a.impression.item_id, b.impression.user_id, b.impression.item_id
    ('ip:ddd2926e:44956a24', 'site:1fbe01fe', 'dev:0f7c61dc', 'app:e2fcccd2')
    >>> b.impression.event_time_ms - a.impression.event_time_ms, b.impression.position, b.clicked
    (1800000, 1, True)
    >>> a.impression.categorical["hour_of_day"], a.impression.categorical["weekday"]
    ('00', '1')
    """

    source = "avazu"
    has_event_time = True

    def __init__(
        self,
        path: str | Path,
        *,
        rows_per_hour: int = 170_000,
        **options: Unpack[SourceOptions],
    ) -> None:
        super().__init__(path, **options)
        if rows_per_hour < 1:
            raise ValueError(f"rows_per_hour must be >= 1, got {rows_per_hour}")
        names = [c.strip() for c in self.first_row]
        missing = [
            c for c in ("click", "hour", "site_id", "app_id", "device_id", "device_ip") if c not in names
        ]
        if missing:
            raise ValueError(f"avazu: {self.path} header lacks {missing} (an Avazu test file has no 'click')")
        self.has_header = True
        self._ncols = len(names)
        col = names.index
        self._click, self._hour = col("click"), col("hour")
        self._site, self._app = col("site_id"), col("app_id")
        self._device, self._ip = col("device_id"), col("device_ip")
        self._model = col("device_model") if "device_model" in names else None
        self._pos = col("banner_pos") if "banner_pos" in names else None
        self._cat = [(n, j) for j, n in enumerate(names) if n not in _EXCLUDED]
        self._rows_per_hour = rows_per_hour
        # Within-hour spreading state (see module doc).
        self._cur_hour = ""
        self._hour_start = 0
        self._hour_derived: tuple[str, str] = ("", "")
        self._in_hour = 0
        self._prev_hour_rows = rows_per_hour
        self._step = _HOUR_MS / rows_per_hour
        self.check_order()  # an unsorted file is refused at open, like a bad header

    def _time_key(self, row: list[str]) -> int:
        # YYMMDDHH read as a number orders rows like their hours do, and event times are
        # monotone whenever hours are (see module doc): the spread is not needed here.
        hour = row[self._hour]
        if len(hour) != 8 or not (hour.isascii() and hour.isdigit()):
            raise BadRow("bad hour", f"{hour[:20]!r} is not YYMMDDHH")
        return int(hour)

    def _event_time(self, hour: str) -> int:
        if hour != self._cur_hour:
            if len(hour) != 8 or not (hour.isascii() and hour.isdigit()):
                raise BadRow("bad hour", f"{hour[:20]!r} is not YYMMDDHH")
            try:
                dt = datetime(2000 + int(hour[:2]), int(hour[2:4]), int(hour[4:6]), int(hour[6:]), tzinfo=UTC)
            except ValueError as err:
                raise BadRow("bad hour", f"{hour!r}: {err}") from None
            if self._cur_hour:
                self._prev_hour_rows = max(self._in_hour, 1)
                self._step = _HOUR_MS / self._prev_hour_rows
            self._cur_hour = hour
            self._hour_start = int(dt.timestamp()) * 1000
            self._hour_derived = (hour[6:], str(dt.weekday()))
            self._in_hour = 0
        offset = min(int(self._in_hour * self._step), _HOUR_MS - 1)
        self._in_hour += 1
        return self._hour_start + offset

    def _parse(self, row: list[str], index: int) -> tuple[Impression, bool]:
        if len(row) != self._ncols:
            kind = "short row" if len(row) < self._ncols else "long row"
            raise BadRow(kind, f"{len(row)} of {self._ncols} fields")
        clicked = parse_label(row[self._click])
        position = 0
        if self._pos is not None:
            p = row[self._pos]
            if not (p.isascii() and p.isdigit()) or int(p) > 10_000:  # '²'.isdigit() is True
                raise BadRow("bad position", f"banner_pos={p[:20]!r}")
            position = int(p)
        if max(map(len, row)) > MAX_ID_LEN - 16:  # leaves room for the id prefixes below
            raise BadRow("value too long", f"a field is longer than {MAX_ID_LEN - 16} chars")
        event_time = self._event_time(row[self._hour])  # last: bad rows do not advance the spread
        device = row[self._device]
        if device and device != NO_DEVICE_ID:
            user = f"dev:{device}"
        else:
            model = row[self._model] if self._model is not None else ""
            user = f"ip:{row[self._ip]}:{model}"
        app = row[self._app]
        item = f"app:{app}" if app and app != NO_APP_ID else f"site:{row[self._site]}"
        categorical = {name: v for name, j in self._cat if (v := row[j])}
        categorical["hour_of_day"], categorical["weekday"] = self._hour_derived
        imp = Impression(
            event_id=f"{self.id_prefix}-{index}",
            event_time_ms=event_time,
            user_id=check_id("user", user),
            item_id=check_id("item", item),
            position=position,
            categorical=categorical,
        )
        return imp, clicked
