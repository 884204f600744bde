"""Dynamic feature reweighting: the formulas, the drift on the synthetic stream, the stage on a
real broker (versions, dead letters, Feast, restart, SIGTERM)."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest

from ctr.infra.deadletter import read_dead_letter
from ctr.infra.schema import Impression, decode_field_weights, encode
from ctr.streams.agents.reweighting import (
    FieldImportance,
    ReweightConfig,
    SlidingWindow,
    entropy,
    field_psi,
    mutual_information,
    normalise_weights,
    null_mi_moments,
    outrank,
    psi,
    replay,
)
from ctr.streams.datasets import open_source
from ctr.streams.reweighting import run_reweighter
from tests.kafka_helpers import read_topic_confluent
from tests.learner_helpers import CATEGORICAL, NUMERIC, SMALL, examples, produce_examples

rng = np.random.default_rng(7)


def _table(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    _, inv = np.unique(values, return_inverse=True)
    k = int(inv.max()) + 1
    return np.stack([np.bincount(inv[labels == 0], minlength=k), np.bincount(inv[labels == 1], minlength=k)], 1)


# --------------------------------------------------------------------------- formulas
def test_mi_of_a_deterministic_field_is_the_label_entropy() -> None:
    v = rng.integers(0, 10, 20_000)
    y = (v < 2).astype(int)  # label is a function of the field
    p = y.mean()
    assert mutual_information(_table(v, y)) == pytest.approx(entropy(p), rel=1e-9)
    assert outrank(_table(v, y))[3] == pytest.approx(1.0, abs=0.01)
    assert mutual_information(_table(v, rng.permutation(y))) < 0.001


def test_a_random_high_cardinality_field_scores_zero_after_normalisation() -> None:
    n = 20_000
    y = (rng.random(n) < 0.1).astype(int)
    ids = rng.integers(0, 5_000, n)  # ~4 examples per value, unrelated to the label
    mi, e0, sd0, score = outrank(_table(ids, y))
    assert mi > 0.05  # raw plug-in MI looks like a strong field...
    assert abs(mi - e0) < 3 * sd0 and score == 0.0  # ...and is exactly what noise scores
    site = rng.integers(0, 5, n)  # a weak, real low-cardinality signal
    y2 = (rng.random(n) < 0.06 + 0.02 * site).astype(int)
    mi2, _, _, score2 = outrank(_table(site, y2))
    assert mi2 < mi and score2 > 0.01  # less raw MI, yet it is the one that matters


@pytest.mark.parametrize("k", [20, 2_000, 50_000])
def test_null_moments_match_label_permutations(k: int) -> None:
    n = 20_000
    values = np.minimum(rng.zipf(1.2, n), k)  # head values seen often, a tail seen once
    y = (rng.random(n) < 0.1).astype(int)
    mis = np.array([mutual_information(_table(values, rng.permutation(y))) for _ in range(150)])
    e0, sd0 = null_mi_moments(_table(values, y).sum(axis=1), y.mean())
    assert e0 == pytest.approx(mis.mean(), rel=0.03, abs=1e-5)
    assert sd0 == pytest.approx(mis.std(), rel=0.25)


def test_psi_is_zero_for_identical_and_large_for_shifted_distributions() -> None:
    p = np.array([0.5, 0.3, 0.15, 0.05])
    a, b = rng.multinomial(50_000, p), rng.multinomial(50_000, p)
    assert psi(a, b) < 0.001
    assert psi(a, rng.multinomial(50_000, p[::-1])) > 0.1
    assert psi(np.array([10, 0]), np.array([0, 10])) < math.inf  # empty bins are smoothed
    prev = np.array([[0, 0], [0, 0], [9_000, 1_000], [9_000, 1_000]])
    moved = np.array([[0, 0], [0, 0], [8_500, 1_500], [9_500, 500]])  # same traffic, other clicks
    p_all, p_clk = field_psi(prev, moved)
    assert p_all < 0.001 and p_clk > 0.1


def test_weights_are_normalised_floored_and_smoothed() -> None:
    w = normalise_weights({"a": 0.02, "b": 0.01, "c": 0.0, "d": 0.0})
    assert sum(w.values()) / 4 == pytest.approx(1.0, abs=1e-5)
    assert w["a"] > w["b"] > w["c"] == w["d"] > 0
    assert normalise_weights({"a": 0.0, "b": 0.0}) == {"a": 1.0, "b": 1.0}

    def imp(i: int, good: str) -> Impression:
        return Impression(
            event_id=f"e{i}", event_time_ms=i, user_id="u", item_id="a", categorical={"x": good, "z": "1"}
        )

    fi = FieldImportance(ReweightConfig(window=1_000, smoothing=0.5))
    fi.seed_weights({"x": 1.0, "z": 1.0})
    fi.add([imp(i, str(i % 2)) for i in range(1_000)], [i % 2 for i in range(1_000)])
    s = fi.compute()
    assert s.fields["x"].raw_weight > 1.8 and s.fields["z"].raw_weight < 0.2
    assert s.weights["x"] == pytest.approx((1 + s.fields["x"].raw_weight) / 2, abs=1e-3)  # halfway
    msg = FieldImportance.message(s, version=3, computed_at_ms=5)
    assert decode_field_weights(encode(msg)) == msg
    assert sum(msg.weights.values()) / 2 == pytest.approx(1.0, abs=1e-5)


def test_window_counts_match_a_recount_and_memory_stays_bounded() -> None:
    w, n = 50, 400
    vals = [str(v) for v in rng.integers(0, 30, n)]
    labels = rng.integers(0, 2, n).tolist()
    win = SlidingWindow(window=w, fields=("f",), max_values=64)
    for start in range(0, n, 37):  # uneven chunks
        win.add([{"f": v} for v in vals[start : start + 37]], [], labels[start : start + 37])
        seen = min(n, start + 37)
        for prev, lo, hi in ((False, seen - w, seen), (True, seen - 2 * w, seen - w)):
            lo, hi = max(lo, 0), max(hi, 0)
            expect = Counter(zip(vals[lo:hi], labels[lo:hi], strict=True))
            cur, old = win.tables("f")
            table = old if prev else cur
            got = {
                (win.value_of("f", s), y): int(table[s, y])
                for s in range(table.shape[0])
                for y in (0, 1)
                if table[s, y]
            }
            assert got == dict(expect)
    # a 10x larger vocabulary than slots: the overflow shares "other", slots are recycled
    tiny = SlidingWindow(window=20, fields=("id",), max_values=8)
    for i in range(0, 2_000, 10):
        tiny.add([{"id": str(j)} for j in range(i, i + 10)], [], [0] * 10)
    cur, prev = tiny.tables("id")
    assert cur.shape[0] == 10 and cur.sum() == 20 and prev.sum() == 20
    assert tiny.overflowed["id"] > 0 and ((cur + prev)[2:].sum(axis=1) > 0).sum() == 8  # slots recycled


def test_fields_are_discovered_numeric_values_bucketed() -> None:
    win = SlidingWindow(window=10)
    win.add([{"a": "x"}] * 4, [{"n": 3.0}, {"n": 300.0}, {"n": -5.0}, {}], [0, 1, 0, 1])
    win.add([{"a": "y", "b": "new"}], [{"n": 3.5}], [1])  # "b" appears late
    assert win.fields == ["a", "n", "b"]
    counts = {win.value_of("n", s): int(c.sum()) for s, c in enumerate(win.tables("n")[0]) if c.sum()}
    assert counts == {"2": 2, "8": 1, "-2": 1, None: 1}  # log2 octaves of 1 + |x|; {} is missing
    assert win.counts("b").tolist() == [[2, 2], [0, 1]]  # 4 earlier rows count as missing


# --------------------------------------------------------------------------- the drift
def test_weights_of_drifted_fields_move_after_the_drift() -> None:
    n, w = 80_000, 20_000
    source = open_source("synthetic", seed=0, events=n, **SMALL)
    assert source.drift_at == n // 2
    snaps = dict(replay(examples(n, seed=0), ReweightConfig(window=w), every=5_000))
    before, after = snaps[n // 2], snaps[n]  # windows entirely before / entirely after the drift
    for f in source.fading_fields:  # informative before, noise after
        assert after.fields[f].weight < 0.5 * before.fields[f].weight, (f, before.table(), after.table())
        assert after.fields[f].importance < before.fields[f].importance
    for f in source.emerging_fields:  # noise before, informative after
        assert after.fields[f].weight > 2.0 * before.fields[f].weight, (f, before.table(), after.table())
        assert after.fields[f].importance > before.fields[f].importance
    # the drift itself shows in the PSI while the windows straddle it
    straddling = [s for k, s in snaps.items() if n // 2 < k <= n // 2 + 2 * w]
    peak = {f: max(s.fields[f].psi for s in straddling) for f in before.fields}
    drifted = source.drift_fields
    for f in drifted:
        assert peak[f] > before.fields[f].psi, (f, peak)
    stable = [f for f in before.fields if f not in drifted]
    assert np.mean([peak[f] for f in drifted]) > 1.5 * np.mean([peak[f] for f in stable]), peak


# --------------------------------------------------------------------------- the stage
def _weights_messages(bootstrap: str, expect: int) -> list:
    msgs = read_topic_confluent(bootstrap, "field-weights", expect, f"chk-{time.monotonic_ns()}")
    assert all(m.key() == b"field-weights" for m in msgs)
    return [decode_field_weights(m.value()) for m in msgs]


def test_stage_publishes_versions_to_kafka_and_feast_dead_letters_and_resumes(broker, tmp_path, group_id) -> None:
    from ctr.features.store import OnlineFeatures, open_store

    bad = [b'{"example_id": 1}', b"not json"]
    produce_examples(broker.bootstrap, examples(6_000, seed=3, drift=False), extra=bad)
    kw = dict(window=4_000, publish_every=1_500, publish_interval_s=None, group_id=group_id, idle_exit_s=2.0)
    result = run_reweighter(broker.bootstrap, feast_dir=tmp_path / "feast", **kw)
    assert result["examples"] == 6_000 and result["dead_letters"] == 2 and result["feast_errors"] == 0
    assert result["publications"] == 4 and result["version"] == 4

    msgs = _weights_messages(broker.bootstrap, 4)
    assert [m.version for m in msgs] == [1, 2, 3, 4]
    assert [m.window_examples for m in msgs] == [1_500, 3_000, 4_000, 4_000]
    fields = {*CATEGORICAL, *NUMERIC}
    for m in msgs:
        assert set(m.weights) == set(m.importance) == set(m.psi) == fields
        assert min(m.weights.values()) >= 0 and np.mean(list(m.weights.values())) == pytest.approx(1.0, abs=1e-4)
        assert m.event_time_ms > 1_700_000_000_000 and m.computed_at_ms > m.event_time_ms
    assert all(a.event_time_ms <= b.event_time_ms for a, b in zip(msgs, msgs[1:], strict=False))

    dead = [
        read_dead_letter(m.value(), m.headers()) for m in read_topic_confluent(broker.bootstrap, "dead-letter", 2, "dl")
    ]
    assert sorted(d.original for d in dead) == sorted(bad)
    assert {(d.stage, d.source_topic) for d in dead} == {("reweighting", "training-examples")}

    online = OnlineFeatures(open_store(tmp_path / "feast"))
    assert online.get_field_weights(sorted(fields)) == pytest.approx(msgs[-1].weights, abs=1e-6)
    assert {r["version"] for r in online.get_field_weight_records(sorted(fields)).values()} == {4}

    # restart: resumes after the committed offsets, refills the window from before them, version 5
    produce_examples(broker.bootstrap, examples(1_500, seed=4, drift=False))
    again = run_reweighter(broker.bootstrap, **kw)
    assert again["examples"] == 1_500 and again["dead_letters"] == 0 and again["replayed"] == 6_000
    assert again["version"] == 5 and again["window_examples"] == 4_000


def test_sigterm_stops_the_stage_after_a_final_publication(broker, tmp_path, group_id) -> None:
    produce_examples(broker.bootstrap, examples(500, seed=5))
    err = tmp_path / "stderr.log"
    cmd = [sys.executable, "-m", "ctr.streams.reweighting", "--bootstrap", broker.bootstrap, "--window", "1000"]
    cmd += ["--publish-every", "100000", "--publish-interval-s", "3600", "--group-id", group_id]
    with err.open("w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        deadline = time.monotonic() + 30
        while "assigned" not in err.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, err.read_text()
            time.sleep(0.1)
        time.sleep(3.0)  # let it read the 500 examples
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.read_text()
    assert '"publications": 1' in out and '"version": 1' in out
    (msg,) = _weights_messages(broker.bootstrap, 1)
    assert msg.version == 1 and msg.window_examples == 500


def test_stage_in_a_thread_stops_on_event(broker, group_id) -> None:
    stop = threading.Event()
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(run_reweighter(broker.bootstrap, group_id=group_id, stop=stop)))
    t.start()
    time.sleep(1.0)
    stop.set()
    t.join(15)
    assert not t.is_alive() and result["publications"] == 0  # nothing arrived: nothing published
