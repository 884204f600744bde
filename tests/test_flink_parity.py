"""Parity: the PyFlink job and the Faust agents, reading the same Kafka topics on the embedded
broker, produce identical windowed counts and smoothed CTR.

Both run for real: ``python -m ctr.streams.worker`` (label join + windowed-feature agent + Feast
writer) and ``streams/flink/job.py`` on the mini-cluster in ``.venv-flink``, bounded at the
true end offsets. Compared, for every (entity, window, window end):

* Flink's output rows against the Faust agent's own counts, read back from its
  ``feature-state`` changelog and summed with ``FeatureShard.restore`` (the agent's code);
  the *set* of non-empty windows must match too, so neither side may drop or invent one;
* both against a brute-force recount from the generator (which side is wrong, if one is);
* every Feast row the agent wrote against the Flink row of the window it represents.

Skipped only when ``.venv-flink`` is absent and ``CI`` is unset; under CI it must run.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from ctr.features.spec import SPEC
from ctr.streams.agents.deltas import ENTITY_KINDS
from ctr.streams.agents.windowed_features import FeatureShard, WindowPlan, decode_record, inline_deltas
from ctr.streams.datasets import open_source
from ctr.streams.flink import KAFKA_PRODUCER_CONFIG
from ctr.streams.flink.harness import (
    create_output_topic,
    end_offsets,
    flink_python,
    read_features,
    read_messages,
    run_job,
)
from ctr.streams.replay import replay
from tests.test_stream_agents import SMALL, Worker, brute_force_buckets, truth_labels

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: 3,000 impressions over ~10 minutes of event time: several 1-minute hops, whole 5-minute
#: windows and part of the 1-hour ones, ~300 clicks (some after the attribution window).
EVENTS, EVENTS_PER_S = 3_000, 5.0
Key = tuple[str, str, str, int]  # (entity_type, entity_id, window name, window end ms)


@pytest.fixture
def flink() -> Path:
    exe = flink_python()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but .venv-flink is missing: run `make flink-setup` first")
        pytest.skip(".venv-flink not found (`make flink-setup` creates it); under CI=1 this test must run")
    return exe


def windows_of(buckets: dict[tuple[str, str], dict[int, list[int]]]) -> dict[Key, tuple[int, int]]:
    """Every non-empty window (size S, hop H, end on a multiple of H) of every entity:
    key -> (impressions, clicks), summed from per-bucket counts as the Faust agent sums them."""
    plan = WindowPlan.of(SPEC)
    out: dict[Key, tuple[int, int]] = {}
    for (etype, eid), bk in buckets.items():
        for name, size, hop in plan.windows:
            ends = {e for b in bk for e in range((b // hop + 1) * hop, b + size + 1, hop)}
            for e in ends:
                imps = sum(v[0] for b, v in bk.items() if e - size <= b < e)
                clicks = sum(v[1] for b, v in bk.items() if e - size <= b < e)
                if imps or clicks:
                    out[(etype, eid, name, e * plan.bucket_ms)] = (imps, clicks)
    return out


def faust_buckets(bootstrap: str, app_id: str) -> dict[tuple[str, str], dict[int, list[int]]]:
    """The feature agent's counts, from its changelog: every record it wrote (including the
    ones later tombstoned because their buckets aged out), their delta batches read back from
    the deltas topic, summed per partition by the agent's own restore code."""
    latest: dict[bytes, bytes] = {}
    for m in read_messages(bootstrap, f"{app_id}-feature-state-changelog"):
        if m.value() is not None:
            latest[m.key()] = m.value()
    deltas: dict[int, dict[int, bytes]] = defaultdict(dict)
    for m in read_messages(bootstrap, f"{app_id}-feature-deltas"):
        deltas[m.partition()][m.offset()] = m.value()
    by_part: dict[int, list] = defaultdict(list)
    for key, value in latest.items():
        by_part[int(key.split(b":")[0])].append(decode_record(value))
    out: dict[tuple[str, str], dict[int, list[int]]] = {}
    for p, recs in by_part.items():
        assert any(r.by_offsets for r in recs), "the default changelog references delta batches by offset"
        shard, _ = FeatureShard.restore(p, SPEC, [inline_deltas(r, deltas[p]) for r in recs])
        for (kind, key), bk in shard.counts.items():
            out[(ENTITY_KINDS[kind], key)] = bk
    return out


def diff(got: dict[Key, tuple[int, int]], want: dict[Key, tuple[int, int]], limit: int = 5) -> list:
    missing = [k for k in want if k not in got][:limit]
    extra = [k for k in got if k not in want][:limit]
    wrong = [(k, got[k], want[k]) for k in want if k in got and got[k] != want[k]][:limit]
    return [f"missing {missing}", f"extra {extra}", f"different {wrong}"] if missing or extra or wrong else []


def assert_agent_matches(bootstrap: str, app_id: str, worker: Worker, totals: tuple[int, int],
                         flink_counts: dict[Key, tuple[int, int]], timeout_s: float = 180) -> dict:
    """Wait until the Faust agent's user windows hold ``totals`` (impressions, clicks) -- it
    has caught up -- then compare its windows with ``flink_counts`` window by window; returns
    the agent's buckets."""
    deadline = time.monotonic() + timeout_s
    while True:
        faust = faust_buckets(bootstrap, app_id)
        users = [bk for (etype, _), bk in faust.items() if etype == "user"]
        got = (sum(v[0] for bk in users for v in bk.values()), sum(v[1] for bk in users for v in bk.values()))
        if got == totals:
            break
        assert worker.alive(), worker.text()[-3000:]
        assert time.monotonic() < deadline, f"Faust agent counted {got}, expected {totals}"
        time.sleep(1.0)
    faust_windows = windows_of(faust)
    assert not diff(flink_counts, faust_windows), f"Flink vs Faust agent: {diff(flink_counts, faust_windows)}"
    return faust


def wait_feast_matches(feast_dir: Path, flink: dict[Key, tuple[int, int, float]], entities: list,
                       timeout_s: float = 120) -> None:
    """Poll until the Feast rows in ``feast_dir`` match ``flink`` (a writer lags behind)."""
    deadline = time.monotonic() + timeout_s
    while bad := feast_mismatches(feast_dir, flink, entities):
        assert time.monotonic() < deadline, f"{len(bad)} Feast rows in {feast_dir} differ from Flink, e.g. {bad[:5]}"
        time.sleep(2.0)


def feast_mismatches(feast_dir: Path, flink: dict[Key, tuple[int, int, float]], entities: list) -> list:
    """Each entity's Feast row holds the windows ending at the first hop boundary after the
    row's event time; they must equal Flink's rows for those windows (zeros when Flink has
    none: no event of the entity in that window)."""
    from ctr.features.store import open_store
    from tests.feast_helpers import stats_rows

    store = open_store(feast_dir)
    plan = WindowPlan.of(SPEC)
    bad: list = []
    for etype, eid, row in stats_rows(store, entities):
        us = row["event_time_us"]
        if us is None:
            bad.append((etype, eid, "no Feast row"))
            continue
        for name, _, hi in plan.ranges(us // 1000):
            want = flink.get((etype, eid, name, hi * plan.bucket_ms), (0, 0, SPEC.smoothed_ctr(0, 0)))
            got = tuple(row[f"{etype}_{s}_{name}"] for s in ("impressions", "clicks", "ctr"))
            if got[:2] != want[:2] or abs(got[2] - want[2]) > 1e-9:
                bad.append((etype, eid, name, got, want))
    return bad


def test_flink_job_and_faust_agent_produce_identical_windowed_features(broker, tmp_path, flink):
    records = list(open_source("synthetic", seed=21, events=EVENTS, events_per_second=EVENTS_PER_S, **SMALL))
    summary = replay(records, broker.bootstrap, producer_config=KAFKA_PRODUCER_CONFIG)  # Flink reads no zstd
    assert summary.failed == 0
    ends = end_offsets(broker.bootstrap)
    # The end offsets bound the Flink read: they must cover every event (plus one watermark
    # marker per partition), or the job would stop early and silently skip records.
    assert sum(ends["impressions"].values()) == summary.impressions + 4
    assert sum(ends["clicks"].values()) == summary.clicks + 4
    truth = brute_force_buckets(records)
    assert sum(truth_labels(records).values()) > 100

    app_id = f"parity-{uuid.uuid4().hex[:6]}"
    worker = Worker(broker.bootstrap, tmp_path, app_id).start()  # consumes while Flink runs
    try:
        create_output_topic(broker.bootstrap, "flink-features")
        job = run_job(broker.bootstrap, ends, "flink-features", group=f"flink-{app_id}", log=tmp_path / "flink.log")
        rows = read_features(broker.bootstrap, "flink-features", timeout_s=300)  # ~150k rows; slow under load
        keys = [(r["entity_type"], r["entity_id"], r["window"], r["window_end_ms"]) for r in rows]
        assert len(set(keys)) == len(keys), "a window was emitted twice"
        flink_rows = {k: (r["impressions"], r["clicks"], r["ctr"]) for k, r in zip(keys, rows, strict=True)}
        bad_ctr = [(k, v) for k, v in flink_rows.items() if abs(v[2] - SPEC.smoothed_ctr(v[1], v[0])) > 1e-9]
        assert not bad_ctr, f"smoothed CTR differs from the spec's formula: {bad_ctr[:5]}"
        flink_counts = {k: v[:2] for k, v in flink_rows.items()}
        expected = windows_of(truth)
        assert not diff(flink_counts, expected), f"Flink vs brute force: {diff(flink_counts, expected)}"

        # The agent has caught up when its counts match the totals; then compare window by window.
        n_imp, n_clk = summary.impressions, sum(truth_labels(records).values())
        faust = assert_agent_matches(broker.bootstrap, app_id, worker, (n_imp, n_clk), flink_counts)

        # End to end: what the agent wrote to Feast (its writer lags; poll).
        wait_feast_matches(tmp_path / "feast", flink_rows, list(faust))
        print(f"\nparity: {len(rows):,} windows from {summary.events:,} events identical; "
              f"Flink job {job['seconds']:.1f}s ({job['wall_s']:.1f}s with JVM start)")  # fmt: skip
    finally:
        worker.stop()


def test_pusher_merges_window_rows_into_feast_rows_readable_as_the_faust_agent_writes_them(broker, tmp_path):
    """``ctr.streams.flink.push``: the 5 m and 1 h rows of one entity and end become one Feast row
    at ``end - 1`` (so ``WindowPlan.ranges`` of the row's time finds that end, as for a Faust
    row), rows split across batches merge, a later end resets the windows that did not close
    again, an older replayed row changes nothing."""
    import json

    from ctr.features.store import open_store
    from ctr.infra.kafka_io import DeliveryTracker, flush, make_producer, produce
    from ctr.streams.flink.push import RowMerger, push

    def row(eid: str, window: str, end: int, imps: int, clicks: int) -> dict:
        return {"entity_type": "item", "entity_id": eid, "window": window, "window_end_ms": end,
                "impressions": imps, "clicks": clicks, "ctr": SPEC.smoothed_ctr(clicks, imps)}  # fmt: skip

    t = 1_700_000_040_000  # a minute boundary
    batches = [
        [row("ad1", "5m", t, 3, 1), row("ad2", "5m", t, 1, 0)],
        [row("ad1", "1h", t, 9, 2), row("ad2", "1h", t, 1, 0), row("ad2", "1h", t + 300_000, 1, 0)],
        [row("ad1", "5m", t - 60_000, 99, 99)],  # older than what ad1 holds: ignored
    ]
    create_output_topic(broker.bootstrap, "flink-features")
    p, tracker, n, merger = make_producer(broker.bootstrap), DeliveryTracker(), 0, RowMerger()
    for batch in batches:
        for r in batch:
            produce(p, "flink-features", json.dumps(r).encode(), r["entity_id"].encode(), tracker)
        flush(p, tracker)
        n += push(broker.bootstrap, "flink-features", tmp_path / "feast", until_end=True, merger=merger)
    assert n >= 2
    store = open_store(tmp_path / "feast")
    names = [f"item_{s}_{w}" for w in ("5m", "1h") for s in ("impressions", "clicks", "ctr")]
    got = store.get_online_features(features=[f"item_stats:{f}" for f in [*names, "item_event_time_us"]],
                                    entity_rows={"item_id": ["ad1", "ad2"]}).to_dict()  # fmt: skip
    prior = SPEC.smoothed_ctr(0, 0)
    want = {
        "ad1": (t - 1, [3, 1, SPEC.smoothed_ctr(1, 3), 9, 2, SPEC.smoothed_ctr(2, 9)]),
        "ad2": (t + 300_000 - 1, [0, 0, prior, 1, 0, SPEC.smoothed_ctr(0, 1)]),
    }
    plan = WindowPlan.of(SPEC)
    for i, eid in enumerate(["ad1", "ad2"]):
        at, values = want[eid]
        assert got["item_event_time_us"][i] == at * 1000
        assert [got[f][i] for f in names] == pytest.approx(values, abs=1e-9)
        assert {hi * plan.bucket_ms for _, _, hi in plan.ranges(at)} == {at + 1}
