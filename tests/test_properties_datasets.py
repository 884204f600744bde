"""Property tests of the dataset readers: hostile files never crash a reader and never yield
an impression the pipeline's own decoder would refuse.

A file built from valid rows with random cells replaced by CSV-hostile text (quotes,
delimiters, CR/LF, NUL, non-UTF-8 bytes, over-long values, NaN/inf, 1e400) must either be
refused when opened (``ValueError`` with a reason: a bad first line) or stream rows where
every yielded impression survives ``encode`` -> ``decode_impression`` unchanged (so the
replay never puts on Kafka what a consumer would dead-letter), and every row read is either
yielded or counted in ``skipped``. ``strict=True`` raises only ``BadRowError``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ctr.infra.schema import SchemaError, decode_impression, encode
from ctr.streams.datasets import AvazuSource, BadRowError, CriteoSource, CsvMappedSource, ObdSource

HOSTILE = st.one_of(
    st.sampled_from(["", '"', '""', "\t", ",", ";", "\r", "\n", "\r\n", "\x00", "nan", "inf", "-inf", "1e400",
                     "NaN", " 1 ", "0x1F", "-1", "99999999999999999999", "\ufeff", "\ud7ff", "é", "\u2028",
                     "x" * 300, "1" * 300]),
    st.text(max_size=12),
)
#: bytes spliced into the file at random places (invalid UTF-8 included)
JUNK = st.binary(min_size=1, max_size=8)

CRITEO_ROW = ["1", *[str(i) for i in range(13)], *[f"{i:08x}" for i in range(26)]]
AVAZU_HEADER = "id,click,hour,C1,banner_pos,site_id,app_id,device_id,device_ip,device_model"
AVAZU_ROW = ["1", "0", "14102100", "1005", "0", "1fbe01fe", "ecad2386", "a99f214a", "ddd2926e", "44956a24"]
OBD_HEADER = ("timestamp,item_id,position,click,propensity_score,user_feature_0,user_feature_1,user_feature_2,"
              "user_feature_3,user-item_affinity_25")
OBD_ROW = ["2019-11-24 00:00:17.159907+00:00", "25", "1", "0", "0.0125", "81ce12", "2723d2", "c39b0c", "c2e4f5", "0.5"]
CSV_HEADER = "ts,user_id,ad_id,slot,clicked,site,price"
CSV_ROW = ["2024-05-01T12:00:00.250Z", "u42", "ad7", "0", "1", "news", "0.35"]
MAPPING = (
    'label = "clicked"\nuser = "user_id"\nitem = "ad_id"\ntimestamp = "ts"\ntimestamp_format = "iso"\n'
    'position = "slot"\ncategorical = ["site"]\nnumeric = ["price"]\n'
)


@st.composite
def hostile_file(draw: st.DrawFn, good: list[str], sep: str, header: str | None) -> bytes:
    """A header (if any), then rows: valid ones, ones with cells replaced, short/long ones, junk."""
    lines: list[bytes] = [header.encode()] if header else []
    for _ in range(draw(st.integers(1, 12))):
        row = list(good)
        kind = draw(st.sampled_from(["good", "cells", "cells", "short", "long", "junk"]))
        if kind == "cells":
            for _ in range(draw(st.integers(1, 4))):
                row[draw(st.integers(0, len(row) - 1))] = draw(HOSTILE)
        elif kind == "short":
            row = row[: draw(st.integers(0, len(row) - 1))]
        elif kind == "long":
            row += [draw(HOSTILE)]
        line = sep.join(row).encode("utf-8", "surrogatepass")
        if kind == "junk":
            at = draw(st.integers(0, len(line)))
            line = line[:at] + draw(JUNK) + line[at:]
        lines.append(line)
    end = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = end.join(lines) + (end if draw(st.booleans()) else b"")
    if draw(st.booleans()):  # truncated anywhere after the first line
        data = data[: draw(st.integers(len(lines[0]), len(data)))]
    return data


def _check(open_reader, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        path.write_bytes(data)
        try:
            src = open_reader(path, strict=False)
        except ValueError as err:  # a refused file says why
            assert str(err)
            event("refused at open")
            return
        out = list(src)
        for ex in out:
            imp = ex.impression
            try:
                assert decode_impression(encode(imp)) == imp
            except SchemaError as err:  # pragma: no cover - the failure message is the point
                raise AssertionError(f"reader yielded an impression consumers would reject: {err}: {imp}") from None
            assert ex.clicked == (ex.click_delay_ms is not None)
        assert len(out) + src.skipped.total == src.rows_read, (len(out), src.skipped, src.rows_read)
        event(f"yielded {min(len(out), 3)}+, skipped {min(src.skipped.total, 3)}+")
        try:
            list(open_reader(path, strict=True))
        except BadRowError as err:
            assert "data.csv:" in str(err)


#: CTR_HYPOTHESIS_EXAMPLES raises the budget for a longer hunt (bench/reliability.py uses it).
SETTINGS = settings(max_examples=int(os.environ.get("CTR_HYPOTHESIS_EXAMPLES", "120")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(hostile_file(CRITEO_ROW, "\t", None))
def test_criteo_reader_survives_hostile_files(data: bytes) -> None:
    _check(lambda p, strict: CriteoSource(p, strict=strict, delimiter="\t"), data)


@SETTINGS
@given(hostile_file(AVAZU_ROW, ",", AVAZU_HEADER))
def test_avazu_reader_survives_hostile_files(data: bytes) -> None:
    _check(lambda p, strict: AvazuSource(p, strict=strict), data)


@SETTINGS
@given(hostile_file(OBD_ROW, ",", OBD_HEADER))
def test_obd_reader_survives_hostile_files(data: bytes) -> None:
    _check(lambda p, strict: ObdSource(p, strict=strict), data)


@SETTINGS
@given(hostile_file(CSV_ROW, ",", CSV_HEADER))
def test_mapped_csv_reader_survives_hostile_files(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mapping = Path(tmp) / "m.toml"
        mapping.write_text(MAPPING)
        _check(lambda p, strict: CsvMappedSource(p, mapping=mapping, strict=strict), data)
