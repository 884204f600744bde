"""Shared pieces of every dataset source: the labeled event, the click-delay model, the
bad-row bookkeeping and the streaming CSV machinery the file readers are built on.

Real click logs (Criteo, Avazu, OBD) carry a label but no click time, while the pipeline
joins impressions with *delayed* clicks inside an attribution window. :class:`ClickDelay`
fills that gap with a seeded delay model that includes a small fraction of clicks arriving
after the window, so the late-click path of the joiner is exercised by every source.

>>> from streams.schema import Impression
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
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, ClassVar, NamedTuple

import numpy as np

from streams.schema import MAX_FIELDS, MAX_ID_LEN, Click, Impression

log = logging.getLogger(__name__)

#: The attribution window the joiner uses by default: a click more than this long after its
#: impression is "late" (the impression was already emitted as a negative example).
DEFAULT_ATTRIBUTION_WINDOW_MS = 30_000
#: ``user_id`` / ``item_id`` used when the configured column is empty on a row (the schema
#: requires a non-empty id). All such rows share it, which is what a counter keyed on a
#: missing id should see.
MISSING_ID = "unknown"

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

    >>> from streams.schema import Impression
    >>> imp = Impression(event_id="e1", event_time_ms=10, user_id="u", item_id="i")
    >>> LabeledImpression(imp, True, 40_000).is_late()
    True
    """

    impression: Impression
    clicked: bool
    click_delay_ms: int | None

    def click(self) -> Click | None:
        """The :class:`~streams.schema.Click` event this impression produces, if any."""
        if not self.clicked or self.click_delay_ms is None:
            return None
        return Click(
            impression_id=self.impression.event_id,
            event_time_ms=self.impression.event_time_ms + self.click_delay_ms,
        )

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

    >>> from streams.schema import Impression
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


def open_text(path: Path) -> IO[str]:
    """Open a (possibly gz/bz2/xz-compressed) text file for the ``csv`` module.

    ``newline=""`` lets ``csv`` handle CRLF and newlines inside quoted fields; undecodable
    bytes become U+FFFD instead of aborting a 40M-row stream half-way; a UTF-8 byte-order
    mark (spreadsheet exports) is dropped so it does not stick to the first column name.
    """
    suffix = path.suffix.lower()
    kwargs = {"encoding": "utf-8-sig", "errors": "replace", "newline": ""}
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
    row is fixed.
    """

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
    ) -> None:
        super().__init__(events=events)
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.source}: no such file: {self.path}")
        self.delay = delay if delay is not None else ClickDelay(seed=seed)
        self.strict = strict
        self.id_prefix = id_prefix or self.source
        self.rows_read = 0
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

    def _bad(self, line: int, err: BadRow) -> None:
        if self.strict:
            raise BadRowError(f"{self.path}:{line}: {err.kind}: {err.detail}")
        if self.skipped.total < 5:
            log.warning("%s:%d: skipped row (%s: %s)", self.path, line, err.kind, err.detail)
        self.skipped.add(line, err.kind, err.detail)

    def _generate(self) -> Iterator[LabeledImpression]:
        parse, draw = self._parse, self.delay.draw
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
                        if not row:
                            continue
                        self.rows_read += 1
                        try:
                            imp, clicked = parse(row, index)
                        except BadRow as err:
                            self._bad(reader.line_num, err)
                            continue
                        finally:
                            index += 1
                        if clicked:
                            yield LabeledImpression(imp, True, draw())
                        else:
                            yield LabeledImpression(imp, False, None)
                    return
                except csv.Error as err:  # e.g. a runaway quote hitting the field-size limit
                    self.rows_read += 1
                    index += 1
                    self._bad(reader.line_num, BadRow("malformed csv", str(err)))


def check_field_count(n_fields: int) -> None:
    if n_fields > MAX_FIELDS:
        raise ValueError(f"{n_fields} feature columns > the schema's limit of {MAX_FIELDS}")
