"""Real files replay correctly: event-time order is checked or sorted (external merge sort),
skipped rows are reported by reason, the mapping derives hour/weekday and shifts positions,
and ``ctr replay`` replays a whole file and says what it dropped."""

from __future__ import annotations

import csv
import inspect
import json
import random
import re
from collections import Counter
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ctr.infra.schema import decode_impression
from ctr.infra.topics import IMPRESSIONS_TOPIC
from ctr.streams.datasets import (
    AvazuSource,
    CriteoSource,
    CsvMappedSource,
    CsvMapping,
    ObdSource,
    csv_mapping,
    open_source,
)
from ctr.streams.datasets import base as datasets_base
from ctr.streams.datasets.base import ORDER_MODES, LabeledImpression, OutOfOrderError
from ctr.streams.datasets.csv_mapping import derive_time_fields
from tests.kafka_helpers import end_offsets, read_topic_confluent

OBD_ALL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "obd" / "random" / "all" / "all.csv"
needs_obd = pytest.mark.skipif(not OBD_ALL.is_file(), reason=f"shared OBD sample not found at {OBD_ALL}")

MAPPING_KEYS = {"label": "y", "user": "u", "item": "i", "timestamp": "ts", "categorical": ["site"]}
MAPPING = CsvMapping.from_dict(MAPPING_KEYS)


def _mapping_file(tmp_path: Path) -> Path:
    """:data:`MAPPING` as the JSON file ``open_source`` and ``ctr replay`` take."""
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(MAPPING_KEYS))
    return path


def _write_log(path: Path, times: list[int], *, sites: list[str] | None = None) -> Path:
    """A ``ts,u,i,y,site`` log with one row per event time, in the given (file) order."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", "u", "i", "y", "site"])
        for k, t in enumerate(times):
            w.writerow([t, f"u{k % 5}", f"ad{k % 3}", k % 2, sites[k] if sites else f"s{k}"])
    return path


def _late_rows(times: list[int]) -> int:
    """Rows earlier than the latest time before them (the definition the check counts)."""
    late, latest = 0, -1
    for t in times:
        if t < latest:
            late += 1
        latest = max(latest, t)
    return late


def _content(ex: LabeledImpression) -> tuple:
    """An example without its event id (which numbers rows in their file's order)."""
    imp = ex.impression
    return (
        imp.event_time_ms,
        imp.user_id,
        imp.item_id,
        imp.position,
        tuple(sorted(imp.categorical.items())),
        tuple(sorted(imp.numeric.items())),
        ex.clicked,
    )


def _times(examples: list[LabeledImpression]) -> list[int]:
    return [e.impression.event_time_ms for e in examples]


# --------------------------------------------------------------------------- order="check"


def test_unsorted_file_is_refused_at_open_with_the_count(tmp_path: Path) -> None:
    times = [1_000, 3_000, 2_000, 4_000, 500, 4_000, 3_999]
    path = _write_log(tmp_path / "log.csv", times)
    with pytest.raises(OutOfOrderError, match=r"3 rows are out of event-time order.*line 4.*order='sort'") as err:
        CsvMappedSource(path, mapping=MAPPING)
    assert (err.value.rows, err.value.first_line) == (3, 4)  # header is line 1: row 2 is line 4
    # The same refusal through the front door: a ValueError before any event, like a bad header.
    with pytest.raises(ValueError, match="3 rows are out of event-time order"):
        open_source(f"csv:{path}", mapping=_mapping_file(tmp_path))


def test_sorted_file_passes_check_unchanged(tmp_path: Path) -> None:
    times = [1_000, 1_000, 2_000, 2_500, 2_500, 9_000]
    path = _write_log(tmp_path / "log.csv", times)
    checked = list(CsvMappedSource(path, mapping=MAPPING, seed=3))
    trusted = list(CsvMappedSource(path, mapping=MAPPING, seed=3, order="trust"))
    assert checked == trusted and _times(checked) == times
    src = CsvMappedSource(path, mapping=MAPPING)
    src.check_order()
    assert src.report()["order"] == {"mode": "check", "out_of_order_rows": 0}


@needs_obd
def test_real_sorted_file_passes_check() -> None:
    src = ObdSource(OBD_ALL)
    assert sum(1 for _ in src) == 10_000
    assert src.report() == {
        "skipped": {"total": 0, "reasons": {}},
        "order": {"mode": "check", "out_of_order_rows": 0},
    }


def test_capped_check_reads_only_what_the_replay_can_reach(tmp_path: Path) -> None:
    path = _write_log(tmp_path / "log.csv", [1, 2, 3, 4, 5, 0])
    assert _times(list(CsvMappedSource(path, mapping=MAPPING, events=5))) == [1, 2, 3, 4, 5]
    with pytest.raises(OutOfOrderError, match="1 row is out of event-time order"):
        list(CsvMappedSource(path, mapping=MAPPING, events=6))


def test_rows_past_a_capped_check_are_still_checked(tmp_path: Path) -> None:
    # A bad row counts toward the checked prefix but yields nothing, so the replay reads one
    # row past the prefix: that row is out of order and must still be refused.
    path = tmp_path / "log.csv"
    path.write_text("ts,u,i,y,site\n1,a,b,0,s\n2,a,b,maybe,s\n3,a,b,1,s\n0,a,b,0,s\n")
    src = CsvMappedSource(path, mapping=MAPPING, events=3)
    it = iter(src)
    assert [next(it).impression.event_time_ms for _ in range(2)] == [1, 3]
    with pytest.raises(OutOfOrderError, match="at least 1 row is out of event-time order.*line 5"):
        next(it)


def test_trust_replays_file_order_and_counts(tmp_path: Path) -> None:
    times = [5, 1, 7, 2, 9]
    src = CsvMappedSource(_write_log(tmp_path / "log.csv", times), mapping=MAPPING, order="trust")
    assert _times(list(src)) == times
    assert src.report()["order"] == {"mode": "trust", "out_of_order_rows": 2}


def test_order_option_is_validated_and_reaches_every_file_source(tmp_path: Path) -> None:
    path = _write_log(tmp_path / "log.csv", [2, 1])
    with pytest.raises(ValueError, match="order must be one of check, sort, trust"):
        open_source(f"csv:{path}", mapping=_mapping_file(tmp_path), order="shuffle")
    with pytest.raises(ValueError, match="sort_run_rows"):
        CsvMappedSource(path, mapping=MAPPING, sort_run_rows=0)
    assert _times(list(open_source(f"csv:{path}", mapping=_mapping_file(tmp_path), order="sort"))) == [1, 2]
    assert _times(list(CsvMappedSource(path, mapping=MAPPING, order="sort", events=1))) == [1]  # the earliest
    assert ORDER_MODES == ("check", "sort", "trust")


def test_row_clock_sources_are_always_in_order(tmp_path: Path) -> None:
    """Without a timestamp column event time comes from the row index: no pass, no refusal."""
    row = "\t".join(["1", *["1"] * 13, *[f"{i:08x}" for i in range(26)]])
    criteo = tmp_path / "day.txt"
    criteo.write_text((row + "\n") * 5)
    for order in ORDER_MODES:
        src = CriteoSource(criteo, order=order)
        assert _times(list(src)) == sorted(_times(list(CriteoSource(criteo))))
        assert "order" not in src.report()
    log = tmp_path / "log.csv"
    log.write_text("y,u,i\n0,a,b\n1,a,c\n")
    no_ts = CsvMapping(label="y", user="u", item="i")
    assert len(list(CsvMappedSource(log, mapping=no_ts, order="sort"))) == 2


# --------------------------------------------------------------------------- order="sort"


def test_sort_yields_event_time_order_with_nothing_lost(tmp_path: Path) -> None:
    rng = random.Random(11)
    times = [rng.randrange(50) * 1_000 for _ in range(300)]  # many ties
    sites = [f's{k}, "quoted"\nline' if k % 7 == 0 else f"s{k}" for k in range(len(times))]
    path = _write_log(tmp_path / "log.csv", times, sites=sites)
    trusted = list(CsvMappedSource(path, mapping=MAPPING, order="trust"))
    src = CsvMappedSource(path, mapping=MAPPING, order="sort")
    ordered = list(src)
    assert Counter(map(_content, ordered)) == Counter(map(_content, trusted))
    # Event-time order, file order (= row index) among equal times, ids kept from the file.
    expected_ids = [f"csv-{k}" for k in sorted(range(len(times)), key=times.__getitem__)]
    assert [e.impression.event_id for e in ordered] == expected_ids
    assert src.out_of_order == _late_rows(times) > 0
    assert src.report()["order"] == {"mode": "sort", "out_of_order_rows": _late_rows(times)}


def test_sort_spills_runs_and_merges_in_rounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny runs force the external path: many run files, merged in several rounds."""
    rng = random.Random(5)
    times = [rng.randrange(40) for _ in range(200)]
    sites = ['a,"b"\r\nc' if k % 9 == 0 else f"s{k}" for k in range(len(times))]
    path = _write_log(tmp_path / "log.csv", times, sites=sites)
    spills = []
    real_spill = datasets_base._spill

    def counting_spill(rows):
        spills.append(1)
        return real_spill(rows)

    monkeypatch.setattr(datasets_base, "_spill", counting_spill)
    monkeypatch.setattr(CsvMappedSource, "merge_fan_in", 4)
    in_memory = list(CsvMappedSource(path, mapping=MAPPING, order="sort"))
    assert spills == []  # one run: sorted in memory, nothing written
    spilled = list(CsvMappedSource(path, mapping=MAPPING, order="sort", sort_run_rows=3))
    runs = -(-len(times) // 3)
    assert len(spills) > runs  # every run, plus the intermediate merges of the rounds
    assert spilled == in_memory
    assert _times(spilled) == sorted(times)


def test_sort_counts_bad_rows_by_reason(tmp_path: Path) -> None:
    huge = "x" * (csv.field_size_limit() + 10)
    path = tmp_path / "log.csv"
    path.write_text(
        "ts,u,i,y,site\n"
        "30,a,b,1,s\n"
        "10,a,b,maybe,s\n"  # bad label
        "soon,a,b,0,s\n"  # unparseable epoch timestamp: no sort key, sorts first, skipped
        "20,a,b\n"  # short row
        f'"{huge}"\n'  # malformed csv, counted during the sort
        "5,a,b,0,s\n"
        "15,a,b,0,s\n"
    )
    src = CsvMappedSource(path, mapping=MAPPING, order="sort", sort_run_rows=2)
    assert _times(list(src)) == [5, 15, 30]
    assert src.report()["skipped"] == {
        "total": 4,
        "reasons": {"bad label": 1, "bad numeric": 1, "short row": 1, "malformed csv": 1},
    }
    assert src.rows_read == 7
    # The rows with a timestamp: 30, 10, 20, 5, 15 -> 10, 20, 5 and 15 come after 30.
    assert src.out_of_order == 4


def test_avazu_sort_groups_hours_before_spreading_them(tmp_path: Path) -> None:
    header = "id,click,hour,banner_pos,site_id,app_id,device_id,device_ip,device_model"
    hours = ["14102101", "14102100", "14102101", "14102100"]
    path = tmp_path / "avazu.csv"
    path.write_text(header + "\n" + "".join(f"{k},0,{h},0,s{k},ecad2386,a99f214a,ip,m\n" for k, h in enumerate(hours)))
    with pytest.raises(OutOfOrderError, match="2 rows are out of event-time order.*line 3"):
        list(AvazuSource(path, rows_per_hour=2))
    src = AvazuSource(path, rows_per_hour=2, order="sort")
    examples = list(src)
    h00 = int(datetime(2014, 10, 21, tzinfo=UTC).timestamp() * 1000)
    assert _times(examples) == [h00, h00 + 1_800_000, h00 + 3_600_000, h00 + 5_400_000]
    assert [e.impression.event_id for e in examples] == ["avazu-1", "avazu-3", "avazu-0", "avazu-2"]
    assert src.out_of_order == 2


@needs_obd
def test_shuffled_real_file_is_refused_then_sorted(tmp_path: Path) -> None:
    header, *rows = OBD_ALL.read_text().splitlines(keepends=True)
    random.Random(7).shuffle(rows)
    shuffled = tmp_path / "all.csv"
    shuffled.write_text(header + "".join(rows))
    in_file_order = list(ObdSource(shuffled, order="trust"))
    late = _late_rows(_times(in_file_order))
    with pytest.raises(OutOfOrderError, match=f"{late:,} rows are out of event-time order"):
        ObdSource(shuffled).check_order()
    src = ObdSource(shuffled, order="sort", sort_run_rows=1_500)
    ordered = list(src)
    original = list(ObdSource(OBD_ALL, item_context=False))
    assert _times(ordered) == sorted(_times(original))
    assert Counter(map(_content, ordered)) == Counter(map(_content, original))
    assert src.out_of_order == late and src.skipped.total == 0


# --------------------------------------------------------------------------- mapping keys


def test_derive_hour_weekday_and_position_offset(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text(
        "ts,u,i,y,slot\n"
        "0,a,b,0,1\n"  # 1970-01-01T00:00Z, a Thursday
        "1714564800,a,b,1,3\n"  # 2024-05-01T12:00Z, a Wednesday
        "1714953599.5,a,b,0,\n"  # 2024-05-05T23:59:59.5Z, a Sunday; empty slot stays 0
        "1714953600,a,b,0,0\n"  # slot 0 is below the offset: a bad row
    )
    m = CsvMapping.from_dict(
        {
            "label": "y",
            "user": "u",
            "item": "i",
            "timestamp": "ts",
            "timestamp_format": "epoch_s",
            "position": "slot",
            "position_offset": 1,
            "derive": ["hour", "weekday"],
        }
    )
    src = CsvMappedSource(path, mapping=m)
    imps = [e.impression for e in src]
    assert [i.categorical for i in imps] == [
        {"hour": "0", "weekday": "3"},
        {"hour": "12", "weekday": "2"},
        {"hour": "23", "weekday": "6"},
    ]
    assert [i.position for i in imps] == [0, 2, 0]
    assert dict(src.skipped.reasons) == {"bad position": 1}


def test_every_mapping_key_is_documented() -> None:
    example = (Path(csv_mapping.__file__).parent / "mapping.example.toml").read_text()
    for key in (f.name for f in fields(CsvMapping)):
        assert re.search(rf"^{key} ", csv_mapping.__doc__ or "", re.MULTILINE), f"{key} not in the module table"
        assert re.search(rf"^(# )?{key} +=", example, re.MULTILINE), f"{key} not in mapping.example.toml"


def test_derived_fields_agree_with_datetime() -> None:
    rng = random.Random(3)
    for ms in [rng.randrange(0, 4_102_444_800_000) for _ in range(2_000)]:
        dt = datetime.fromtimestamp(ms / 1000, UTC)
        assert derive_time_fields(ms, ("hour", "weekday")) == {"hour": str(dt.hour), "weekday": str(dt.weekday())}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"derive": ["month"]}, "derive can only hold"),
        ({"derive": ["hour", "hour"]}, "lists a field twice"),
        ({"derive": "hour"}, "'derive' must be a list"),
        ({"derive": ["hour"], "timestamp": None}, "derive needs a timestamp"),
        ({"derive": ["hour"], "categorical": ["hour"]}, "also mapped columns"),
        ({"position_offset": 1, "position": None}, "position_offset needs a position"),
        ({"position_offset": "1"}, "position_offset must be an integer"),
        ({"position_offset": True}, "position_offset must be an integer"),
        ({"derived": ["hour"]}, "unknown keys"),
    ],
)
def test_mapping_key_errors(extra: dict, message: str) -> None:
    data = {"label": "y", "user": "u", "item": "i", "timestamp": "ts", "position": "slot", **extra}
    with pytest.raises(ValueError, match=message):
        CsvMapping.from_dict({k: v for k, v in data.items() if v is not None})


# --------------------------------------------------------------------------- ctr replay


def _cli(*args: str):
    from typer.testing import CliRunner

    from ctr.cli import app

    return CliRunner().invoke(app, ["replay", *args])


def _summary(output: str) -> dict:
    return json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("{")))


def test_cli_order_choices_match_the_sources(tmp_path: Path) -> None:
    absent = str(tmp_path / "absent.csv")
    for order in ORDER_MODES:  # accepted by the option, then refused for the missing file
        assert "no such file" in _cli("--data", f"obd:{absent}", "--order", order, "--bootstrap", "x:1").output
    assert "not one of" in _cli("--data", f"obd:{absent}", "--order", "shuffle").output


@pytest.mark.integration
def test_cli_refuses_unsorted_file_then_sorts_it_whole(tmp_path: Path, broker, group_id: str) -> None:
    n = 150
    rng = random.Random(2)
    times = [1_700_000_000_000 + rng.randrange(10 * n) * 1_000 for _ in range(n)]
    path = _write_log(tmp_path / "log.csv", times)
    with path.open("a") as f:
        f.write("1800000000000,a,b,maybe,s\n1800000000000,a,b\n")  # bad label, short row (latest times)
    mapping = _mapping_file(tmp_path)
    common = ("--data", f"csv:{path}", "--mapping", str(mapping), "--bootstrap", broker.bootstrap)

    refused = _cli(*common)
    assert refused.exit_code == 2
    assert f"{_late_rows(times):,} rows are out of event-time order" in refused.output
    assert "--order sort" in refused.output
    assert sum(end_offsets(broker.bootstrap, IMPRESSIONS_TOPIC).values()) == 0, "refused, yet produced"

    done = _cli(*common, "--order", "sort")
    assert done.exit_code == 0, done.output
    summary = _summary(done.output)
    assert summary["impressions"] == n  # the whole file: no --events cap
    assert summary["skipped"] == {"total": 2, "reasons": {"bad label": 1, "short row": 1}}
    assert summary["order"] == {"mode": "sort", "out_of_order_rows": _late_rows(times)}
    imps = [
        decode_impression(m.value()) for m in read_topic_confluent(broker.bootstrap, IMPRESSIONS_TOPIC, n, group_id)
    ]
    assert Counter(i.event_time_ms for i in imps) == Counter(times)


def test_cli_replays_the_whole_file_by_default() -> None:
    """`--events` used to default to 100,000 and cut real files short without a word."""
    from ctr.cli import replay_cmd

    assert inspect.signature(replay_cmd).parameters["events"].default is None
