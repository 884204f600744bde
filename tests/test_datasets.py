"""File readers: every real sample in ../shared/data, hand-made edge cases, bad-row policy,
constant memory, and the open_source() front door."""

from __future__ import annotations

import doctest
import gzip
import importlib
import inspect
import json
import tracemalloc
from pathlib import Path

import psutil
import pytest

from ctr.infra.schema import Click, Impression, decode_impression, encode
from ctr.streams.datasets import (
    MISSING_ID,
    AvazuSource,
    BadRowError,
    ClickDelay,
    CriteoSource,
    CsvMappedSource,
    CsvMapping,
    LabeledImpression,
    ObdSource,
    criteo,
    interleave_clicks,
    open_source,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EXAMPLE_MAPPING = Path(__file__).resolve().parents[1] / "streams" / "datasets" / "mapping.example.toml"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared datasets not found at {DATA}")

# (spec relative to DATA, rows, label rate stated in shared/data/README.md, tolerance)
REAL_FILES = [
    ("criteo:criteo/criteo_sample.txt", 200, 0.245, 0.001),
    ("criteo:criteo/criteo_train_tiny.csv", 1999, 0.209, 0.001),
    ("avazu:avazu/avazu_sample.txt", 100, 0.20, 0.001),
    ("obd:obd/random/all/all.csv", 10_000, 0.0055, 0.0025),  # README: "about 0.4-0.7 %"
    ("obd:obd/bts/all/all.csv", 10_000, 0.0055, 0.0025),
]


def _open(spec: str, **kw) -> object:
    kind, _, rel = spec.partition(":")
    return open_source(f"{kind}:{DATA / rel}", **kw)


def _roundtrip(imp: Impression) -> None:
    """The reader's output must pass the strict decoder the pipeline applies on the way in."""
    assert decode_impression(encode(imp)) == imp


# --------------------------------------------------------------------------- real files


@needs_data
@pytest.mark.parametrize(("spec", "rows", "rate", "tol"), REAL_FILES, ids=[f[0] for f in REAL_FILES])
def test_real_file_parses_completely(spec: str, rows: int, rate: float, tol: float) -> None:
    src = _open(spec, seed=1)
    examples = list(src)
    assert len(examples) == rows
    assert src.skipped.total == 0, src.skipped.examples
    assert abs(sum(e.clicked for e in examples) / rows - rate) <= tol
    ids = [e.impression.event_id for e in examples]
    assert len(set(ids)) == rows and ids[0] == f"{spec.partition(':')[0]}-0"
    times = [e.impression.event_time_ms for e in examples]
    assert times == sorted(times)
    for e in examples:
        assert (e.click_delay_ms is not None) == e.clicked
        _roundtrip(e.impression)


@needs_data
def test_every_shared_data_file_has_a_reader() -> None:
    """A new file dropped into shared/data must be added to REAL_FILES (or explicitly ignored)."""
    covered = {DATA / spec.partition(":")[2] for spec, *_ in REAL_FILES}
    side_files = {"README.md", "item_context.csv"}  # item_context is joined by ObdSource
    found = {p for p in DATA.rglob("*") if p.is_file() and p.name not in side_files}
    assert found == covered


@needs_data
def test_criteo_real_mapping() -> None:
    (first, *_), tiny = list(_open("criteo:criteo/criteo_sample.txt")), next(_open(REAL_FILES[1][0]))
    assert first.impression.user_id == first.impression.categorical["C3"]
    assert first.impression.item_id == first.impression.categorical["C15"]
    assert "C19" not in first.impression.categorical  # empty -> omitted
    assert "I1" not in first.impression.numeric and first.impression.numeric["I3"] == 260.0
    assert (
        len(tiny.impression.categorical) == 25 and tiny.impression.numeric["I5"] == 1382.0
    )  # Id column skipped


@needs_data
def test_avazu_real_mapping() -> None:
    examples = list(_open("avazu:avazu/avazu_sample.txt"))
    first = examples[0].impression
    assert first.user_id == "ip:ddd2926e:44956a24"  # device_id is the a99f214a placeholder
    assert first.item_id == "site:1fbe01fe"
    assert first.categorical["hour_of_day"] == "00" and "click" not in first.categorical
    hour_start = 1_413_849_600_000  # 2014-10-21 00:00 UTC
    assert all(hour_start <= e.impression.event_time_ms < hour_start + 3_600_000 for e in examples)
    assert any(e.impression.item_id.startswith("app:") for e in examples)
    assert any(e.impression.position == 1 for e in examples)


@needs_data
def test_obd_real_mapping() -> None:
    examples = list(_open("obd:obd/random/all/all.csv", events=500))
    first = examples[0].impression
    assert first.event_time_ms == 1_574_553_634_762  # 2019-11-24 00:00:34.762830+00:00
    assert first.item_id == "14" and first.position == 2  # file position 3 -> slot 2
    assert first.user_id.startswith("obd-u-")
    assert {"item_feature_1", "user_feature_0"} <= set(first.categorical)
    assert set(first.numeric) == {"user_item_affinity", "item_feature_0"}
    assert {e.impression.position for e in examples} == {0, 1, 2}
    assert 50 < len({e.impression.user_id for e in examples}) < 500  # cohorts, not persons


# --------------------------------------------------------------------------- edge cases

CRITEO_ROW = ["1", "5", "-1", "", *["2"] * 10] + [f"{i:08x}" for i in range(26)]


def _criteo_line(row: list[str], sep: str = "\t") -> str:
    return sep.join(row)


def test_criteo_edge_cases(tmp_path: Path) -> None:
    missing = list(CRITEO_ROW)
    missing[14 + 2] = ""  # C3 (the user column) empty
    missing[14 + 25] = ""  # C26 empty
    bad_num = list(CRITEO_ROW)
    bad_num[5] = "abc"
    nan_num = list(CRITEO_ROW)
    nan_num[6] = "nan"
    bad_label = ["2", *CRITEO_ROW[1:]]
    too_long = list(CRITEO_ROW)
    too_long[20] = "x" * 300
    lines = [
        _criteo_line(CRITEO_ROW),  # line 1
        _criteo_line(missing),  # 2
        _criteo_line(CRITEO_ROW[:20]),  # 3: short row
        _criteo_line(bad_num),  # 4
        "",  # 5: blank line, ignored
        _criteo_line(nan_num),  # 6
        _criteo_line(bad_label),  # 7
        _criteo_line(too_long),  # 8
        _criteo_line([*CRITEO_ROW, "extra"]),  # 9: long row
        _criteo_line(["0", *CRITEO_ROW[1:]]),  # 10
    ]
    path = tmp_path / "day.txt"
    path.write_bytes("\r\n".join(lines).encode() + b"\r\n")  # CRLF, no header, tabs
    src = CriteoSource(path, seed=3)
    examples = list(src)
    assert [e.impression.event_id for e in examples] == ["criteo-0", "criteo-1", "criteo-8"]
    assert [e.clicked for e in examples] == [True, True, False]
    a, b, _ = (e.impression for e in examples)
    assert a.numeric == {"I1": 5.0, "I2": -1.0, **{f"I{i}": 2.0 for i in range(4, 14)}}  # I3 empty
    assert a.categorical["C26"] == "00000019" and not any("\r" in v for v in a.categorical.values())
    assert b.user_id == MISSING_ID and "C3" not in b.categorical and "C26" not in b.categorical
    assert b.event_time_ms - a.event_time_ms == 13  # 76 events/s
    assert src.skipped.total == 6
    assert dict(src.skipped.reasons) == {
        "short row": 1,
        "bad numeric": 2,
        "bad label": 1,
        "value too long": 1,
        "long row": 1,
    }
    assert [line for line, _ in src.skipped.examples] == [3, 4, 6, 7, 8, 9]
    assert "I5='abc'" in src.skipped.examples[1][1]
    for e in examples:
        _roundtrip(e.impression)


def test_strict_mode_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "day.txt"
    path.write_text(_criteo_line(CRITEO_ROW) + "\n" + _criteo_line(CRITEO_ROW[:5]) + "\n")
    src = CriteoSource(path, strict=True)
    assert next(src).clicked
    with pytest.raises(BadRowError, match=r"day\.txt:2: short row"):
        next(src)


def test_criteo_header_variants(tmp_path: Path) -> None:
    header = ["label", *criteo.NUMERIC, *criteo.CATEGORICAL]
    plain = tmp_path / "with_header.csv"
    plain.write_text(",".join(header) + "\n" + _criteo_line(CRITEO_ROW, ",") + "\n")
    with_id = tmp_path / "with_id.csv"
    with_id.write_text(
        "Id,Label," + ",".join(header[1:]) + "\n" + "42," + _criteo_line(CRITEO_ROW, ",") + "\n"
    )
    id_no_header = tmp_path / "id_no_header.txt"
    id_no_header.write_text("42\t" + _criteo_line(CRITEO_ROW) + "\n")
    gz = tmp_path / "day.txt.gz"
    with gzip.open(gz, "wt") as f:
        f.write(_criteo_line(CRITEO_ROW) + "\n")
    results = [next(CriteoSource(p)).impression for p in (plain, with_id, id_no_header, gz)]
    assert all(r.categorical == results[0].categorical and r.numeric == results[0].numeric for r in results)
    assert results[0].user_id == "00000002"  # C3

    custom = next(CriteoSource(plain, user_column="C1", item_column="C2", start_ms=0, events_per_second=1))
    assert (custom.impression.user_id, custom.impression.item_id) == ("00000000", "00000001")

    test_file = tmp_path / "test.txt"
    test_file.write_text(_criteo_line(CRITEO_ROW[1:]) + "\n")
    with pytest.raises(ValueError, match="no label"):
        CriteoSource(test_file)
    with pytest.raises(ValueError, match="not a categorical column"):
        CriteoSource(plain, user_column="I1")


def test_malformed_csv_is_skipped_and_stream_goes_on(tmp_path: Path) -> None:
    import csv

    path = tmp_path / "day.csv"
    huge = "x" * (csv.field_size_limit() + 10)
    path.write_text(
        _criteo_line(CRITEO_ROW, ",") + "\n" + f'"{huge}"' + "\n" + _criteo_line(CRITEO_ROW, ",") + "\n"
    )
    src = CriteoSource(path)
    assert [e.impression.event_id for e in src] == ["criteo-0", "criteo-2"]
    assert dict(src.skipped.reasons) == {"malformed csv": 1}


AVAZU_HEADER = (
    "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
    "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21"
)


def _avazu_row(i: int, hour: str, click: str = "0", banner: str = "0") -> str:
    return (
        f"{i},{click},{hour},1005,{banner},1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,"
        f"a99f214a,ip{i % 3},m1,1,0,15706,320,50,1722,0,35,-1,79"
    )


def test_avazu_time_spread_and_bad_rows(tmp_path: Path) -> None:
    rows = [_avazu_row(i, "14102100") for i in range(4)]
    rows += [_avazu_row(4, "1410210X"), _avazu_row(5, "14102101", banner="top"), "6,1,14102101"]
    rows += [_avazu_row(i, "14102101", click="1") for i in range(7, 9)]
    path = tmp_path / "train.csv"
    path.write_bytes(("\r\n".join([AVAZU_HEADER, *rows]) + "\r\n").encode())
    src = AvazuSource(path, rows_per_hour=8)
    examples = list(src)
    times = [e.impression.event_time_ms for e in examples]
    h0 = 1_413_849_600_000
    # first hour: the hint (8 rows/hour) gives a 450 s step; second hour: previous hour had 4 rows.
    assert times == [h0, h0 + 450_000, h0 + 900_000, h0 + 1_350_000, h0 + 3_600_000, h0 + 3_600_000 + 900_000]
    assert [e.clicked for e in examples] == [False] * 4 + [True, True]
    assert dict(src.skipped.reasons) == {"bad hour": 1, "bad position": 1, "short row": 1}
    assert examples[-1].impression.event_id == "avazu-8"
    assert examples[0].impression.categorical["device_id"] == "a99f214a"
    for e in examples:
        _roundtrip(e.impression)

    no_click = tmp_path / "test.csv"
    no_click.write_text(AVAZU_HEADER.replace("click,", "") + "\n")
    with pytest.raises(ValueError, match="click"):
        AvazuSource(no_click)


def test_avazu_time_capped_inside_the_hour(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("\n".join([AVAZU_HEADER, *(_avazu_row(i, "14102100") for i in range(5))]) + "\n")
    times = [e.impression.event_time_ms for e in AvazuSource(path, rows_per_hour=2)]
    assert times == sorted(times) and times[-1] == 1_413_849_600_000 + 3_599_999


def test_obd_edge_cases(tmp_path: Path) -> None:
    header = ",timestamp,item_id,position,click,propensity_score," + ",".join(
        [f"user_feature_{i}" for i in range(4)] + [f"user-item_affinity_{k}" for k in range(3)]
    )
    rows = [
        "0,2019-11-24 00:00:34.762830+00:00,2,1,0,0.01,a,b,c,d,0.0,1.5,0.25",
        "1,not a time,2,1,0,0.01,a,b,c,d,0.0,0.0,0.0",
        "2,2019-11-24T00:00:35,1,9x,0,0.01,a,b,c,d,0.0,0.0,0.0",
        "3,2019-11-24T00:00:36,0,2,1,0.01,a,b,c,e,7.0,0.0,0.0",
    ]
    path = tmp_path / "all.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    (tmp_path / "item_context.csv").write_text(
        ",item_id,item_feature_0,item_feature_1\n0,0,0.5,red\n1,1,-1.0,blue\n2,2,2.0,red\n"
    )
    src = ObdSource(path, all_affinities=True)
    a, b = (e.impression for e in src)
    assert dict(src.skipped.reasons) == {"bad timestamp": 1, "bad position": 1}
    assert a.numeric == {
        "user_item_affinity": 0.25,
        "affinity_1": 1.5,
        "affinity_2": 0.25,
        "item_feature_0": 2.0,
    }
    assert a.categorical["item_feature_1"] == "red" and a.position == 0
    assert b.event_time_ms == 1_574_553_636_000  # naive -> UTC
    assert a.user_id != b.user_id  # user_feature_3 differs
    plain = next(ObdSource(path, item_context=False)).impression
    assert "item_feature_1" not in plain.categorical and plain.numeric == {"user_item_affinity": 0.25}


# --------------------------------------------------------------------------- csv + mapping


def test_example_mapping_file_is_valid_and_documented(tmp_path: Path) -> None:
    mapping = CsvMapping.load(EXAMPLE_MAPPING)
    assert mapping.timestamp_format == "iso" and mapping.position == "slot"
    # The file the example documents, with a quoted field holding the delimiter and a newline.
    path = tmp_path / "log.csv"
    path.write_bytes(
        b"ts,user_id,ad_id,slot,clicked,site,device,country,price,hour_of_day\r\n"
        b"2024-05-01T12:00:00.250Z,u42,ad7,0,1,news.example,mobile,FR,0.35,12\r\n"
        b'2024-05-01T12:00:01Z, u43 ,ad8,2,false,"shop, ""big""\r\nsale",,FR,,13\r\n'
        b"2024-05-01T12:00:02Z,u44,ad9,1,maybe,x,y,z,1,14\r\n"
        b"2024-05-01T12:00:03Z,u45,ad9,1,0,x,y,z,cheap,14\r\n"
    )
    src = open_source(f"csv:{path}", mapping=EXAMPLE_MAPPING)
    a, b = (e.impression for e in src)
    assert a.event_time_ms == 1_714_564_800_250 and a.user_id == "u42" and a.item_id == "ad7"
    assert a.categorical == {"site": "news.example", "device": "mobile", "country": "FR", "hour_of_day": "12"}
    assert a.numeric == {"price": 0.35}
    assert b.user_id == "u43" and b.position == 2 and b.categorical["site"] == 'shop, "big"\r\nsale'
    assert "device" not in b.categorical and b.numeric == {}
    assert dict(src.skipped.reasons) == {"bad label": 1, "bad numeric": 1}
    for imp in (a, b):
        _roundtrip(imp)


def test_csv_json_mapping_headerless_epoch_seconds(tmp_path: Path) -> None:
    mapping = tmp_path / "m.json"
    mapping.write_text(
        json.dumps(
            {
                "label": "y",
                "user": "u",
                "item": "i",
                "timestamp": "t",
                "timestamp_format": "epoch_s",
                "columns": ["t", "u", "i", "y", "f"],
                "categorical": ["f"],
                "delimiter": ";",
            }
        )
    )
    path = tmp_path / "log.txt"
    path.write_text("1700000000.5;u1;i1;1;a\n1700000001;;i2;0;b\n")
    examples = list(open_source(f"csv:{path}", mapping=mapping))
    assert [e.impression.event_time_ms for e in examples] == [1_700_000_000_500, 1_700_000_001_000]
    assert examples[1].impression.user_id == MISSING_ID
    assert examples[0].impression.categorical == {"f": "a"}


def test_csv_without_timestamp_uses_row_clock(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("y,u,i\n0,a,b\n1,a,c\n")
    m = CsvMapping(label="y", user="u", item="i", start_ms=1_000, events_per_second=4)
    assert [e.impression.event_time_ms for e in CsvMappedSource(path, mapping=m)] == [1_000, 1_250]


def test_mapping_errors(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("y,u,i\n0,a,b\n")
    bad = tmp_path / "bad.toml"
    bad.write_text('label = "y"\nuser = "u"\nitem = "i"\ncategorcal = ["u"]\n')
    with pytest.raises(ValueError, match="unknown keys.*categorcal"):
        open_source(f"csv:{path}", mapping=bad)
    with pytest.raises(ValueError, match="no column"):
        CsvMappedSource(path, mapping=CsvMapping(label="y", user="u", item="i", numeric=("price",)))
    with pytest.raises(ValueError, match="missing required keys"):
        CsvMapping.from_dict({"label": "y"})
    with pytest.raises(ValueError, match="timestamp_format"):
        CsvMapping(label="y", user="u", item="i", timestamp_format="unix")
    with pytest.raises(ValueError, match="no such mapping"):
        open_source(f"csv:{path}", mapping=tmp_path / "absent.toml")


# --------------------------------------------------------------------------- open_source


def test_open_source_errors(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("y,u,i\n0,a,b\n")
    with pytest.raises(ValueError, match="unknown source kind 'parquet'"):
        open_source(f"parquet:{path}")
    with pytest.raises(ValueError, match="no such file"):
        open_source(f"criteo:{tmp_path / 'absent.txt'}")
    with pytest.raises(ValueError, match="missing path"):
        open_source("avazu:")
    with pytest.raises(ValueError, match="mapping file is required"):
        open_source(f"csv:{path}")
    with pytest.raises(ValueError, match="mapping only applies"):
        open_source(f"obd:{path}", mapping=EXAMPLE_MAPPING)
    with pytest.raises(ValueError, match="takes no path"):
        open_source("synthetic:/tmp/x")
    with pytest.raises(ValueError, match="unexpected keyword"):
        open_source(f"criteo:{path}", colour="blue")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        open_source(f"criteo:{empty}")


def test_events_limit_and_delay_seed(tmp_path: Path) -> None:
    path = tmp_path / "day.txt"
    path.write_text("\n".join(_criteo_line(CRITEO_ROW) for _ in range(50)) + "\n")
    assert len(list(open_source(f"criteo:{path}", events=7))) == 7
    assert list(open_source(f"criteo:{path}", events=0)) == []
    d1 = [e.click_delay_ms for e in open_source(f"criteo:{path}", seed=1)]
    d1b = [e.click_delay_ms for e in open_source(f"criteo:{path}", seed=1)]
    d2 = [e.click_delay_ms for e in open_source(f"criteo:{path}", seed=2)]
    assert d1 == d1b != d2
    fixed = ClickDelay(mean_ms=100, sigma=0.01, late_fraction=0.0)
    assert all(95 <= e.click_delay_ms <= 105 for e in open_source(f"criteo:{path}", delay=fixed))


def test_interleave_clicks_orders_by_event_time() -> None:
    imps = [Impression(event_id=f"e{i}", event_time_ms=i * 1_000, user_id="u", item_id="a") for i in range(5)]
    labeled = [
        LabeledImpression(imps[0], True, 3_500),
        LabeledImpression(imps[1], True, 500),
        *(LabeledImpression(imp, False, None) for imp in imps[2:]),
    ]
    events = list(interleave_clicks(labeled))
    assert [e.event_time_ms for e in events] == [0, 1_000, 1_500, 2_000, 3_000, 3_500, 4_000]
    assert [e.impression_id for e in events if isinstance(e, Click)] == ["e1", "e0"]


@pytest.mark.parametrize("module", ["", ".base", ".criteo", ".avazu", ".obd", ".csv_mapping", ".synthetic"])
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(
        importlib.import_module(f"ctr.streams.datasets{module}"), optionflags=doctest.ELLIPSIS
    )
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- memory


def test_reader_streams_in_constant_memory(tmp_path: Path) -> None:
    """200k Criteo rows (~700 MB if materialised as Impressions) are read with flat memory."""
    n = 200_000
    path = tmp_path / "big.txt"
    path.write_text((_criteo_line(CRITEO_ROW) + "\n") * n)
    src = CriteoSource(path)
    assert inspect.isgenerator(iter(src))  # lazily produced, never a list

    # Python-level allocations, traced over the first 10k rows (tracing is slow): the peak
    # is reached early and does not grow with the number of rows.
    tracemalloc.start()
    try:
        for i, _ in enumerate(src, 1):
            if i == 1_000:
                early_peak = tracemalloc.get_traced_memory()[1]
            if i == 10_000:
                break
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB: the reader is materialising rows"
    assert peak - early_peak < 256 * 1024

    # Whole file, untraced: resident memory stays flat too.
    process = psutil.Process()
    rss_start, rss_max, count = process.memory_info().rss, 0, 10_000
    for count, _ in enumerate(src, 10_001):
        if count % 20_000 == 0:
            rss_max = max(rss_max, process.memory_info().rss)
    assert count == n and src.rows_read == n
    assert rss_max - rss_start < 64 * 1024 * 1024
