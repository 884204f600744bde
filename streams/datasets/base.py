"""Shared pieces of every dataset source: the labeled event, the click-delay model, the
bad-row bookkeeping and the streaming CSV machinery the file readers are built on.

Real click logs (Criteo, Avazu, OBD) carry a label but no click time, while the pipeline
joins impressions with *delayed* clicks inside an attribution window. :class:`ClickDelay`
fills that gap with a seeded delay model that includes a small fraction of clicks arriving
after the window, so the late-click path of the joiner is exercised by every source.

>>> from ctr.infra.schema import Impression
>>> imp = Impression(event_id="e0", event_time_ms=1_000, user_id="u1", item_id="ad1")
>>> ex = LabeledImpression(imp, clicked=True, click_delay_ms=2_500)
>>> ex.click()
Click(impression_id='e0', event_time_ms=3500)
>>> LabeledImpression(imp, clicked=False, click_delay_ms=None).click() is None
True
"""

from __future__ import annotations

import bz2
import csv
import gzip
import heapq
import logging
import lzma
import math
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from operator import itemgetter
from pathlib import Path
from typing import IO, Any, ClassVar, NamedTuple, TypedDict

import numpy as np

from ctr.infra.schema import MAX_FIELDS, MAX_ID_LEN, Click, Impression, TrainingExample

log = logging.getLogger(__name__)

#: The attribution window the joiner uses by default: a click more than this long after its
#: impression is "late" (the impression was already emitted as a negative example).
DEFAULT_ATTRIBUTION_WINDOW_MS = 30_000
#: ``user_id`` / ``item_id`` used when the configured column is empty on a row (the schema
#: requires a non-empty id). All such rows share it, which is what a counter keyed on a
#: missing id should see.
MISSING_ID = "unknown"
#: How a file source treats rows out of event-time order (see :class:`CsvSource`).
ORDER_MODES = ("check", "sort", "trust")
#: Rows per sorted run of ``order="sort"`` held in memory before spilling to a temporary
#: file (in ``$TMPDIR``); the merge needs about the file's uncompressed size on disk.
DEFAULT_SORT_RUN_ROWS = 100_000

# Label spellings accepted by every reader (Criteo/Avazu/OBD use 0/1; generic CSV may not).
_LABELS: dict[str, bool] = {
    "0": False,
    "1": True,
    "0.0": False,
    "1.0": True,
    "false": False,
    "true": True,
    "no": False,
    "yes": True,
    "False": False,
    "True": True,
}


class LabeledImpression(NamedTuple):
    """An impression with its (eventual) label and when the click arrives.

    ``click_delay_ms`` is ``None`` exactly when ``clicked`` is false. It may exceed the
    attribution window: such a click is *late* and the joiner must treat it as such.

    >>> from ctr.infra.schema import Impression
    >>> imp = Impression(event_id="e1", event_time_ms=10, user_id="u", item_id="i")
    >>> LabeledImpression(imp, True, 40_000).is_late()
    True
    """

    impression: Impression
    clicked: bool
    click_delay_ms: int | None

    def click(self) -> Click | None:
        """The :class:`~ctr.infra.schema.Click` event this impression produces, if any."""
        if not self.clicked or self.click_delay_ms is None:
            return None
        return Click(
            impression_id=self.impression.event_id,
            event_time_ms=self.impression.event_time_ms + self.click_delay_ms,
        )

    def example(self) -> TrainingExample:
        """The training example of this impression, labelled ``clicked`` (keyed like the join's)."""
        return TrainingExample(example_id=self.impression.event_id, label=int(self.clicked), impression=self.impression)

    def is_late(self, window_ms: int = DEFAULT_ATTRIBUTION_WINDOW_MS) -> bool:
        """True when the click arrives after ``window_ms`` (so it misses the join)."""
        return self.click_delay_ms is not None and self.click_delay_ms > window_ms


class ClickDelay:
    """Seeded model of the time between an impression and its click.

    On-time clicks (a fraction ``1 - late_fraction``) follow a log-normal distribution
    truncated to the attribution window, whose location is solved so that their mean is
    exactly ``mean_ms`` (clicks in real logs are mostly seconds after the view, with a
    long right tail). Late clicks arrive ``window_ms + 1 + Exponential(late_mean_ms)``
    after the impression, i.e. always strictly after the window, so a test can count
    them. On-time delays are at most ``window_ms - 1`` ms and at least 1 ms (a click
    never precedes or coincides with its impression), whichever convention (``<`` or
    ``<=``) the joiner uses for the window bound.

    >>> delay = ClickDelay(mean_ms=4_000, late_fraction=0.05, seed=7)
    >>> d = delay.sample(20_000)
    >>> bool(abs(d[d < 30_000].mean() - 4_000) < 150)
    True
    >>> round(float((d > 30_000).mean()), 2)
    0.05
    >>> isinstance(delay.draw(), int)
    True
    """

    def __init__(
        self,
        mean_ms: float = 5_000.0,
        *,
        sigma: float = 1.0,
        late_fraction: float = 0.02,
        late_mean_ms: float = 60_000.0,
        window_ms: int = DEFAULT_ATTRIBUTION_WINDOW_MS,
        seed: int = 0,
    ) -> None:
        if not 1.0 <= mean_ms < window_ms - 1:
            raise ValueError(f"mean_ms must be in [1, window_ms - 1), got {mean_ms} (window {window_ms})")
        if not 0.0 <= late_fraction <= 1.0:
            raise ValueError(f"late_fraction must be in [0, 1], got {late_fraction}")
        if sigma <= 0 or late_mean_ms <= 0:
            raise ValueError("sigma and late_mean_ms must be positive")
        self.mean_ms = float(mean_ms)
        self.sigma = float(sigma)
        self.late_fraction = float(late_fraction)
        self.late_mean_ms = float(late_mean_ms)
        self.window_ms = int(window_ms)
        self.seed = seed
        self._mu = _truncated_lognormal_mu(self.mean_ms, self.sigma, float(self.window_ms - 1))
        self._log_cap = math.log(self.window_ms - 1)
        # A distinct stream from the caller's other seeded draws with the same seed.
        self._rng = np.random.default_rng([seed, 0xC11C])
        self._buffer: list[int] = []

    def __repr__(self) -> str:
        return (
            f"ClickDelay(mean_ms={self.mean_ms:g}, sigma={self.sigma:g}, "
            f"late_fraction={self.late_fraction:g}, late_mean_ms={self.late_mean_ms:g}, "
            f"window_ms={self.window_ms}, seed={self.seed})"
        )

    def sample(self, n: int) -> np.ndarray:
        """``n`` delays in ms as an int64 array (vectorised; used by the synthetic stream)."""
        rng = self._rng
        z = rng.standard_normal(n)
        # Rejection keeps the truncated shape exact; acceptance is Phi(a) (> 0.5 for any
        # sensible mean), so a handful of rounds suffice.
        bad = self._mu + self.sigma * z > self._log_cap
        while bad.any():
            z[bad] = rng.standard_normal(int(bad.sum()))
            bad = self._mu + self.sigma * z > self._log_cap
        on_time = np.exp(self._mu + self.sigma * z)
        delays = np.clip(np.rint(on_time), 1, self.window_ms - 1).astype(np.int64)
        late = rng.random(n) < self.late_fraction
        n_late = int(late.sum())
        if n_late:
            extra = np.rint(rng.exponential(self.late_mean_ms, n_late)).astype(np.int64)
            delays[late] = self.window_ms + 1 + extra
        return delays

    def draw(self) -> int:
        """One delay in ms (buffered: file readers call this once per click)."""
        if not self._buffer:
            # Reversed so pop() hands them out in sampling order (keeps runs reproducible).
            self._buffer = self.sample(1024).tolist()[::-1]
        return self._buffer.pop()


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _truncated_lognormal_mu(mean: float, sigma: float, cap: float) -> float:
    """The ``mu`` of a log-normal truncated to ``(0, cap]`` whose mean is ``mean``.

    E[X | X <= c] = exp(mu + s^2/2) * Phi((ln c - mu - s^2)/s) / Phi((ln c - mu)/s) grows
    monotonically from 0 to ``cap`` with ``mu``, so bisection always converges.
    """
    log_cap = math.log(cap)

    def truncated_mean(mu: float) -> float:
        a = (log_cap - mu) / sigma
        num = _normal_cdf(a - sigma)
        den = _normal_cdf(a)
        if den == 0.0:
            return cap
        return math.exp(mu + sigma * sigma / 2) * num / den

    lo, hi = math.log(mean) - 10 - sigma * sigma, log_cap + 10
    for _ in range(200):
        mid = (lo + hi) / 2
        if truncated_mean(mid) < mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def interleave_clicks(examples: Iterable[LabeledImpression]) -> Iterator[Impression | Click]:
    """Turn labeled impressions into the raw event stream a producer would see.

    Impressions come out in input order; each click comes out just before the first
    impression whose event time is at or after the click's, so the output is
    event-time ordered when the input is. Memory holds only pending clicks (bounded by
    click rate x delay tail), never the stream.

    >>> from ctr.infra.schema import Impression
    >>> imps = [Impression(event_id=f"e{i}", event_time_ms=i * 1_000, user_id="u", item_id="a")
    ...         for i in range(3)]
    >>> evs = interleave_clicks([LabeledImpression(imps[0], True, 1_500),
    ...                          LabeledImpression(imps[1], False, None),
    ...                          LabeledImpression(imps[2], False, None)])
    >>> [type(e).__name__ + ":" + str(e.event_time_ms) for e in evs]
    ['Impression:0', 'Impression:1000', 'Click:1500', 'Impression:2000']
    """
    pending: list[tuple[int, int, Click]] = []
    seq = 0
    for ex in examples:
        now = ex.impression.event_time_ms
        while pending and pending[0][0] <= now:
            yield heapq.heappop(pending)[2]
        yield ex.impression
        click = ex.click()
        if click is not None:
            heapq.heappush(pending, (click.event_time_ms, seq, click))
            seq += 1
    while pending:
        yield heapq.heappop(pending)[2]


# --------------------------------------------------------------------------- bad rows


class BadRow(Exception):
    """Raised by a reader's row parser: ``kind`` is a short category (the counter key),
    ``detail`` says what was wrong on that row."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail


class BadRowError(ValueError):
    """A row that cannot be parsed, raised only by sources opened with ``strict=True``."""


class OutOfOrderError(ValueError):
    """A file source with ``order="check"`` found rows out of event-time order.

    ``rows`` counts them (a lower bound when ``complete`` is false: found while replaying
    past the checked prefix) and ``first_line`` is the first one's line number.
    """

    def __init__(self, path: Path, rows: int, first_line: int, *, complete: bool = True) -> None:
        self.path, self.rows, self.first_line = path, rows, first_line
        count = "1 row is" if rows == 1 else f"{rows:,} rows are"
        if not complete:
            count = "at least " + count
        super().__init__(
            f"{path}: {count} out of event-time order (earlier than a row before them), "
            f"the first at line {first_line}. Replayed as is, the label join would drop them "
            "as late events. Sort the file by event time, or open it with order='sort' "
            "(ctr replay --order sort) to sort it on the fly; order='trust' replays it as is."
        )


class SkippedRows:
    """What a non-strict reader dropped: a count per reason and the first few examples.

    >>> s = SkippedRows()
    >>> s.add(7, "short row", "3 of 40 fields")
    >>> s.total, dict(s.reasons), s.examples
    (1, {'short row': 1}, [(7, 'short row: 3 of 40 fields')])
    """

    #: How many (line, reason) examples are kept; counts are always complete.
    max_examples: ClassVar[int] = 20

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()
        self.examples: list[tuple[int, str]] = []

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def add(self, line: int, kind: str, detail: str = "") -> None:
        self.reasons[kind] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append((line, f"{kind}: {detail}" if detail else kind))

    def as_dict(self) -> dict[str, Any]:
        """``{"total": n, "reasons": {reason: n}}``, most frequent reason first (for summaries)."""
        return {"total": self.total, "reasons": dict(self.reasons.most_common())}

    def __repr__(self) -> str:
        return f"SkippedRows(total={self.total}, reasons={dict(self.reasons)})"


# --------------------------------------------------------------------------- sources


class Source(Iterator[LabeledImpression]):
    """Base of every source: a single-pass iterator of :class:`LabeledImpression`.

    Like a file object, a source is consumed by iterating it; open a new one to replay.
    ``skipped`` tells what was dropped (always empty for the synthetic stream).
    """

    #: Short name used in event ids and messages ("criteo", "avazu", ...).
    source: ClassVar[str] = "source"

    def __init__(self, *, events: int | None = None) -> None:
        if events is not None and events < 0:
            raise ValueError(f"events must be >= 0, got {events}")
        self.events = events
        self.skipped = SkippedRows()
        self._it: Iterator[LabeledImpression] | None = None

    def __iter__(self) -> Iterator[LabeledImpression]:
        # The underlying generator itself (same single pass as ``self``): a ``for`` loop
        # then runs at generator speed instead of through a Python-level ``__next__``.
        if self._it is None:
            self._it = self._limited()
        return self._it

    def __next__(self) -> LabeledImpression:
        if self._it is None:
            self._it = self._limited()
        return next(self._it)

    def _limited(self) -> Iterator[LabeledImpression]:
        if self.events is None:
            yield from self._generate()
            return
        if self.events == 0:
            return
        for n, ex in enumerate(self._generate(), 1):
            yield ex
            if n >= self.events:
                return

    def _generate(self) -> Iterator[LabeledImpression]:
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        """What the source dropped (and, for files, how it handled event-time order), for
        the summary printed after a replay."""
        return {"skipped": self.skipped.as_dict()}


class _TextOpen(TypedDict):
    """The text-mode keywords every opener below takes (typed, so each open() overload matches)."""

    encoding: str
    errors: str
    newline: str


def open_text(path: Path) -> IO[str]:
    """Open a (possibly gz/bz2/xz-compressed) text file for the ``csv`` module.

    ``newline=""`` lets ``csv`` handle CRLF and newlines inside quoted fields; undecodable
    bytes become U+FFFD instead of aborting a 40M-row stream half-way; a UTF-8 byte-order
    mark (spreadsheet exports) is dropped so it does not stick to the first column name.
    """
    suffix = path.suffix.lower()
    kwargs: _TextOpen = {"encoding": "utf-8-sig", "errors": "replace", "newline": ""}
    if suffix == ".gz":
        return gzip.open(path, "rt", **kwargs)
    if suffix == ".bz2":
        return bz2.open(path, "rt", **kwargs)
    if suffix in (".xz", ".lzma"):
        return lzma.open(path, "rt", **kwargs)
    return open(path, **kwargs)  # the caller closes it


def sniff_delimiter(line: str, candidates: str = "\t,;|") -> str:
    """The candidate that occurs most on the first line (tab wins ties: Criteo's raw files)."""
    counts = [(line.count(c), -i, c) for i, c in enumerate(candidates)]
    best = max(counts)
    if best[0] == 0:
        raise ValueError(f"cannot find a delimiter ({candidates!r}) in the first line: {line[:80]!r}")
    return best[2]


def parse_label(value: str) -> bool:
    """``"1"``/``"0"`` (and true/false, yes/no, 1.0/0.0) to bool; raises :class:`BadRow`."""
    try:
        return _LABELS[value]
    except KeyError:
        pass
    stripped = value.strip().lower()
    if stripped in _LABELS:
        return _LABELS[stripped]
    raise BadRow("bad label", repr(value[:40]))


def parse_number(name: str, value: str) -> float:
    """A finite float; raises :class:`BadRow` (NaN/inf would not survive the JSON schema)."""
    try:
        x = float(value)
    except ValueError:
        raise BadRow("bad numeric", f"{name}={value[:40]!r}") from None
    if not math.isfinite(x):
        raise BadRow("bad numeric", f"{name}={value[:40]!r} is not finite")
    return x


def parse_numbers(row: list[str], columns: list[tuple[str, int]]) -> dict[str, float]:
    """``{name: float(row[j])}`` for the non-empty ``columns``; raises :class:`BadRow`.

    Fast path first (one comprehension, one ``isfinite`` on the sum: a sum of floats is
    finite only if every term is); the per-value path runs only to name the culprit.
    """
    try:
        numeric = {name: float(v) for name, j in columns if (v := row[j])}
        if math.isfinite(sum(numeric.values())):
            return numeric
    except ValueError:
        pass
    return {name: parse_number(name, v) for name, j in columns if (v := row[j])}


def check_id(name: str, value: str) -> str:
    """A value usable as ``user_id``/``item_id``: empty -> :data:`MISSING_ID`, too long -> BadRow."""
    if not value:
        return MISSING_ID
    if len(value) > MAX_ID_LEN:
        raise BadRow("value too long", f"{name} has {len(value)} chars > {MAX_ID_LEN}")
    return value


class SourceOptions(TypedDict, total=False):
    """What every file reader takes besides its own options, passed through to
    :class:`CsvSource` (which holds the defaults): ``seed`` of the click-delay draws, ``delay``
    (a :class:`ClickDelay`), ``events`` (a cap), ``strict`` (raise on the first bad row),
    ``id_prefix``, ``delimiter``, ``order`` (``check`` | ``sort`` | ``trust``), ``sort_run_rows``."""

    seed: int
    delay: ClickDelay | None
    events: int | None
    strict: bool
    id_prefix: str | None
    delimiter: str | None
    order: str
    sort_run_rows: int


class CsvSource(Source):
    """A delimited text file read row by row in constant memory.

    Subclasses set up column positions in ``__init__`` (reading only the first line) and
    implement :meth:`_parse`. **Bad-row policy**: a row that cannot be parsed (short or
    long row, bad label, bad or non-finite numeric, over-long value, malformed CSV) yields
    nothing; it is counted in :attr:`skipped` by reason, the first ones are logged with
    their line number, and the stream goes on. With ``strict=True`` the first bad row
    raises :class:`BadRowError` naming the file and line instead. Blank lines are ignored.

    ``event_id`` is ``f"{id_prefix}-{row_index}"`` where ``row_index`` counts data rows
    from 0, bad rows included, so ids are unique, deterministic, and stable when a bad
    row is fixed (also when ``order="sort"`` moves the row).

    **Event-time order** (``order``, one of :data:`ORDER_MODES`): the label join drops
    events older than its watermark, so a file that is not sorted by event time would
    silently lose most of its clicks. A row is *out of order* when its event time is
    earlier than that of a row before it (the check and the sort read only timestamps, so
    a row that is bad for another reason counts too; it is skipped all the same).

    * ``"check"`` (default): when the source is opened, a pass that parses only the
      timestamps counts the out-of-order rows and raises :class:`OutOfOrderError` (a
      ``ValueError``, like a bad header) if there are any, so nothing is produced from an
      unsorted file. With ``events`` set the pass stops after that many timestamped rows;
      the rows read past it are still checked, as they are yielded.
    * ``"sort"``: yield rows in event-time order, ties in file order, with bounded memory
      (an external merge sort: sorted runs of at most ``sort_run_rows`` rows spill to
      temporary files, which are then merged); :attr:`out_of_order` counts the rows that
      were out of order.
    * ``"trust"``: yield rows in file order as they are; :attr:`out_of_order` counts the
      events yielded out of order (e.g. to exercise the late-event path on purpose).

    Sources whose event time is synthesized from the row index (no timestamp column) are
    always in order and ignore ``order``.
    """

    #: Whether rows carry their own event time (else it comes from the row index and the
    #: file is in order by construction). Subclasses with a timestamp column set it, and
    #: implement :meth:`_time_key` and call :meth:`check_order` once their columns are known.
    has_event_time: bool = False
    #: How many sorted runs one merge reads at once (open files); more are merged in rounds.
    merge_fan_in: ClassVar[int] = 64

    def __init__(
        self,
        path: str | Path,
        *,
        seed: int = 0,
        delay: ClickDelay | None = None,
        events: int | None = None,
        strict: bool = False,
        id_prefix: str | None = None,
        delimiter: str | None = None,
        order: str = "check",
        sort_run_rows: int = DEFAULT_SORT_RUN_ROWS,
    ) -> None:
        super().__init__(events=events)
        if order not in ORDER_MODES:
            raise ValueError(f"order must be one of {', '.join(ORDER_MODES)}, got {order!r}")
        if sort_run_rows < 1:
            raise ValueError(f"sort_run_rows must be >= 1, got {sort_run_rows}")
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.source}: no such file: {self.path}")
        self.delay = delay if delay is not None else ClickDelay(seed=seed)
        self.strict = strict
        self.id_prefix = id_prefix or self.source
        self.order = order
        self.sort_run_rows = sort_run_rows
        self.rows_read = 0
        #: Rows whose event time is earlier than a row before them in the file: found by the
        #: check, moved by the sort, or replayed as they are (``trust``).
        self.out_of_order = 0
        self._order_checked = False
        first = self._first_line()
        self.delimiter = delimiter or sniff_delimiter(first)
        self.first_row: list[str] = next(csv.reader([first], delimiter=self.delimiter), [])
        #: Set by subclasses: skip the first line as a header.
        self.has_header = False

    def _first_line(self) -> str:
        try:
            with open_text(self.path) as f:
                for line in f:
                    if line.strip():
                        return line.rstrip("\r\n")
        except (OSError, EOFError) as err:  # e.g. a truncated or mislabelled .gz
            raise ValueError(f"{self.source}: cannot read {self.path}: {err}") from None
        raise ValueError(f"{self.source}: {self.path} is empty")

    def _parse(self, row: list[str], index: int) -> tuple[Impression, bool]:
        """One data row -> (impression, clicked); raise :class:`BadRow` if unparseable."""
        raise NotImplementedError

    def _time_key(self, row: list[str]) -> int:
        """A non-negative number that orders rows as their event times do (the event time
        itself, or a coarser key such as Avazu's hour); only reads the timestamp column.
        Raises :class:`BadRow` or :class:`IndexError` when the row has none (such a row
        is then a bad row for :meth:`_parse` too). Needed when :attr:`has_event_time`."""
        raise NotImplementedError

    def _bad(self, line: int, err: BadRow) -> None:
        if self.strict:
            raise BadRowError(f"{self.path}:{line}: {err.kind}: {err.detail}")
        if self.skipped.total < 5:
            log.warning("%s:%d: skipped row (%s: %s)", self.path, line, err.kind, err.detail)
        self.skipped.add(line, err.kind, err.detail)

    def report(self) -> dict[str, Any]:
        out = super().report()
        if self.has_event_time:
            out["order"] = {"mode": self.order, "out_of_order_rows": self.out_of_order}
        return out

    # ------------------------------------------------------------------ reading

    def _rows(self) -> Iterator[_NumberedRow]:
        """``(row_index, line, fields)`` per data row in file order; a row the csv module
        cannot split comes with a :class:`BadRow` instead of its fields."""
        with open_text(self.path) as f:
            reader = csv.reader(f, delimiter=self.delimiter)
            if self.has_header:
                for header in reader:
                    if header:  # skip leading blank lines, then the header itself
                        break
            index = 0
            while True:
                try:
                    for row in reader:
                        if row:
                            yield index, reader.line_num, row
                            index += 1
                    return
                except csv.Error as err:  # e.g. a runaway quote hitting the field-size limit
                    yield index, reader.line_num, BadRow("malformed csv", str(err))
                    index += 1

    def _generate(self) -> Iterator[LabeledImpression]:
        if not self.has_event_time:
            rows = self._rows()
        elif self.order == "sort":
            rows = self._sorted_rows()
        else:
            self.check_order()
            rows = self._rows()
        # The sorted stream is in order by construction; otherwise watch each event time:
        # "check" refuses rows past the checked prefix, "trust" counts them.
        watch = self.has_event_time and self.order != "sort"
        latest = -1
        parse, draw = self._parse, self.delay.draw
        for index, line, row in rows:
            self.rows_read += 1
            if isinstance(row, BadRow):
                self._bad(line, row)
                continue
            try:
                imp, clicked = parse(row, index)
            except BadRow as err:
                self._bad(line, err)
                continue
            if watch:
                if imp.event_time_ms < latest:
                    self._late_row(line)
                else:
                    latest = imp.event_time_ms
            if clicked:
                yield LabeledImpression(imp, True, draw())
            else:
                yield LabeledImpression(imp, False, None)

    def _late_row(self, line: int) -> None:
        if self.order == "check":
            raise OutOfOrderError(self.path, 1, line, complete=False)
        self.out_of_order += 1

    # ------------------------------------------------------------------ event-time order

    def check_order(self) -> None:
        """The ``order="check"`` pass: count the out-of-order rows, reading only timestamps
        in constant memory, and raise :class:`OutOfOrderError` if there are any.

        Subclasses call it at the end of ``__init__`` (it needs their column positions),
        so an unsorted file is refused at open; it also runs before the first event if
        not run yet. Runs at most once; does nothing for the other modes or without a
        timestamp column.
        """
        if self._order_checked or self.order != "check" or not self.has_event_time:
            return
        self._order_checked = True
        latest, late, first_line, timed = -1, 0, 0, 0
        for _index, line, row in self._rows():
            if self.events is not None and timed >= self.events:
                break  # the rows a capped replay can reach; later ones are checked as yielded
            key = self._sort_key(row)
            if key == _NO_TIME:
                continue  # a bad row: the replay skips (or, strict, refuses) it anyway
            timed += 1
            if key < latest:
                late += 1
                first_line = first_line or line
            else:
                latest = key
        self.out_of_order = late
        if late:
            raise OutOfOrderError(self.path, late, first_line)

    def _sort_key(self, row: list[str] | BadRow) -> int:
        """:meth:`_time_key`, or :data:`_NO_TIME` for a row without a usable timestamp."""
        if isinstance(row, BadRow):
            return _NO_TIME
        try:
            return self._time_key(row)
        except (BadRow, IndexError):
            return _NO_TIME

    def _sorted_rows(self) -> Iterator[_NumberedRow]:
        """The rows in event-time order (file order among ties), as an external merge sort.

        Rows without a usable timestamp sort first, so ``strict`` fails early and the
        others are counted as skipped; malformed-CSV rows are counted here, as they have
        no fields to carry through the sort.
        """
        with ExitStack() as spilled:
            runs: list[IO[str]] = []
            run: list[_KeyedRow] = []
            latest = -1
            for index, line, row in self._rows():
                if isinstance(row, BadRow):
                    self.rows_read += 1
                    self._bad(line, row)
                    continue
                key = self._sort_key(row)
                if key != _NO_TIME:
                    if key < latest:
                        self.out_of_order += 1
                    else:
                        latest = key
                run.append((key, index, line, row))
                if len(run) >= self.sort_run_rows:
                    run.sort(key=_TIME_KEY)  # stable: file order among equal times
                    runs.append(spilled.enter_context(_spill(run)))
                    run = []
            run.sort(key=_TIME_KEY)
            if runs and run:
                runs.append(spilled.enter_context(_spill(run)))
            merged = iter(run) if not runs else self._merge(runs, spilled)
            for _key, index, line, row in merged:
                yield index, line, row

    def _merge(self, runs: list[IO[str]], spilled: ExitStack) -> Iterator[_KeyedRow]:
        """Merge sorted run files; in rounds of :attr:`merge_fan_in` so open files stay
        bounded. ``heapq.merge`` takes equal keys from earlier runs first, and runs are in
        file order, so the sort stays stable."""
        while len(runs) > self.merge_fan_in:
            rounds = [runs[i : i + self.merge_fan_in] for i in range(0, len(runs), self.merge_fan_in)]
            merged = []
            for group in rounds:
                merged.append(spilled.enter_context(_spill(heapq.merge(*map(_read_run, group), key=_TIME_KEY))))
                for f in group:
                    f.close()  # frees its disk space now rather than at the end
            runs = merged
        return heapq.merge(*map(_read_run, runs), key=_TIME_KEY)


# (row_index, line, fields or the reason the row could not be split)
_NumberedRow = tuple[int, int, "list[str] | BadRow"]
# (time key, row_index, line, fields): a row on its way through the external sort
_KeyedRow = tuple[int, int, int, list[str]]
_TIME_KEY = itemgetter(0)
# The sort key of a row without a usable timestamp: below every real one, so such rows sort
# first (strict mode fails early) and never count as out of order.
_NO_TIME = -1


def _spill(rows: Iterable[_KeyedRow]) -> IO[str]:
    """Write sorted rows to an anonymous temporary file (deleted when closed)."""
    f = tempfile.TemporaryFile("w+", encoding="utf-8", newline="")
    # csv quoting carries any field (delimiters, quotes, newlines) through unchanged.
    csv.writer(f).writerows((key, index, line, *row) for key, index, line, row in rows)
    return f


def _read_run(f: IO[str]) -> Iterator[_KeyedRow]:
    f.seek(0)
    for rec in csv.reader(f):
        yield int(rec[0]), int(rec[1]), int(rec[2]), rec[3:]


def check_field_count(n_fields: int) -> None:
    if n_fields > MAX_FIELDS:
        raise ValueError(f"{n_fields} feature columns > the schema's limit of {MAX_FIELDS}")
