"""The windowed-feature job on a real standalone Flink cluster (``ctr flink up``): a
JobManager and a TaskManager as separate JVMs started from ``.venv-flink``'s PyFlink wheel,
the job submitted with ``flink run -py``, the embedded broker on a free loopback port.

* parity: the job on the cluster and the Faust agent, window by window, and the pusher's
  Feast rows against the Faust agent's (serving reads either the same way);
* idleness: a click topic that stays quiet while the impressions run ahead holds the windows
  back (no idle timeout) until its clicks and then a watermark control message arrive; every
  click counts;
* a TaskManager ``kill -9`` mid-job: a new TaskManager, the job restored from its checkpoint,
  exact counts.

Skipped only when ``.venv-flink`` is absent and ``CI`` is unset (as the parity test).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition

from bench.ground_truth import brute_force_buckets, truth_labels
from ctr.features.spec import SPEC
from ctr.infra.kafka_io import make_consumer
from ctr.infra.procs import free_port, pid_alive, stop_process
from ctr.infra.schema import WATERMARK_HEADER, Click, Impression
from ctr.streams.datasets import open_source
from ctr.streams.datasets.base import interleave_clicks
from ctr.streams.flink import KAFKA_PRODUCER_CONFIG, cluster, sql
from ctr.streams.flink.harness import create_output_topic, end_offsets, flink_python, read_features
from ctr.streams.replay import replay, replay_events
from ctr.streams.watermarks import send_watermark
from tests.stack_helpers import first_prediction
from tests.test_flink_parity import (
    assert_agent_matches,
    diff,
    feast_mismatches,
    wait_feast_matches,
    windows_of,
)
from tests.test_stream_agents import SMALL, Worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Key = tuple[str, str, str, int]


@pytest.fixture(scope="module")
def flink_venv() -> Path:
    if flink_python() is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but .venv-flink is missing: run `make flink-setup` first")
        pytest.skip(".venv-flink not found (`make flink-setup` creates it); under CI=1 this test must run")
    venv = cluster.flink_venv()
    assert venv is not None
    return venv


def ctr(*args: str, timeout: float = 300) -> dict:
    """``ctr ARGS`` as a subprocess (the command line users run); its JSON output."""
    out = subprocess.run([sys.executable, "-m", "ctr.cli", *args], capture_output=True, text=True, timeout=timeout,
                         check=False)  # fmt: skip
    assert out.returncode == 0, f"ctr {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return dict(json.loads(out.stdout[: out.stdout.rindex("}") + 1]))


@pytest.fixture(scope="module")
def flink_home(flink_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``ctr flink up`` (1 TaskManager, 1 slot) for the module; ``ctr flink down`` after it."""
    home = tmp_path_factory.mktemp("flink")
    state = ctr("flink", "up", "--home", str(home), "--taskmanagers", "1")
    try:
        assert set(state["processes"]) == {"jobmanager", "taskmanager-1"}
        yield home
    finally:
        started = (cluster.load_state(home) or state)["processes"]  # the replacement TaskManager too
        ctr("flink", "down", "--home", str(home))
        assert not any(pid_alive(p["pid"]) for p in started.values())
        assert ctr("flink", "status", "--home", str(home)) == {"up": False}


def rows_by_key(rows: list[dict]) -> dict[Key, tuple[int, int, float]]:
    """Output rows keyed by window; a window emitted twice (a replay after a restore) must
    carry the same values both times."""
    out: dict[Key, tuple[int, int, float]] = {}
    for r in rows:
        k = (r["entity_type"], r["entity_id"], r["window"], r["window_end_ms"])
        v = (r["impressions"], r["clicks"], r["ctr"])
        assert out.setdefault(k, v) == v, f"window {k} emitted as {out[k]} and as {v}"
    return out


def wait_for_windows(bootstrap: str, topic: str, want: dict[Key, tuple[int, int]], timeout_s: float) -> dict:
    """Read the output until every expected window is there; the rows by key."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = rows_by_key(read_features(bootstrap, topic))
        counts = {k: v[:2] for k, v in got.items()}
        if all(k in counts for k in want):
            return got
        assert time.monotonic() < deadline, f"{len(counts)} of {len(want)} windows after {timeout_s}s: " \
            f"{diff(counts, want)}"  # fmt: skip
        time.sleep(2.0)


def committed(bootstrap: str, group: str, ends: dict[str, dict[int, int]]) -> dict[str, dict[int, int]]:
    """The offsets the job's consumer group committed (the Kafka source commits on checkpoints)."""
    c = make_consumer(bootstrap, group)
    try:
        tps = [TopicPartition(t, p) for t, parts in ends.items() for p in parts]
        return {t: {tp.partition: max(tp.offset, 0) for tp in c.committed(tps, timeout=10) if tp.topic == t}
                for t in ends}  # fmt: skip
    finally:
        c.close()


def wait_checkpointed(bootstrap: str, group: str, ends: dict[str, dict[int, int]], timeout_s: float = 120) -> None:
    """Wait until a completed checkpoint covers ``ends`` (the group committed them)."""
    deadline = time.monotonic() + timeout_s
    while (got := committed(bootstrap, group, ends)) != ends:
        assert time.monotonic() < deadline, f"committed {got}, want {ends}"
        time.sleep(1.0)


def submit_unbounded(home: Path, bootstrap: str, group: str) -> str:
    create_output_topic(bootstrap, "flink-features")
    job = cluster.submit(home, bootstrap, group=group, job_args=("--checkpoint-interval-ms", "2000"))
    state = cluster.load_state(home)
    assert state is not None
    deadline = time.monotonic() + 60
    while rest_job(state, job["job_id"])["state"] != "RUNNING":
        assert time.monotonic() < deadline, rest_job(state, job["job_id"])
        time.sleep(0.5)
    return str(job["job_id"])


def rest_job(state: dict, job_id: str) -> dict:
    return dict(cluster.rest(state, f"/jobs/{job_id}"))


def test_the_job_reads_the_header_the_producers_write() -> None:
    assert sql.WATERMARK_HEADER == WATERMARK_HEADER
    ddl = sql.statements(SPEC, sql.JobConfig("b:9092"))
    sources = [s for s in ddl if s.startswith("CREATE TABLE") and "'format' = 'raw'" in s]
    assert len(sources) == 2 and all(f"headers['{WATERMARK_HEADER}']" in s for s in sources)


def test_the_cluster_config_binds_loopback_caps_memory_and_restarts_from_checkpoints(tmp_path) -> None:
    """What ``ctr flink up`` writes to ``conf/config.yaml`` (no JVM needed)."""
    cfg = cluster.ClusterConfig(taskmanagers=2, slots=2)
    text = cluster.config_yaml(tmp_path, cfg, 18081, 16123, tmp_path / "python", "--add-opens=x")
    conf = {k: json.loads(v) for k, v in (line.split(": ", 1) for line in text.splitlines())}
    hosts = ("jobmanager.bind-host", "taskmanager.bind-host", "rest.bind-address", "rest.address",
             "jobmanager.rpc.address", "taskmanager.host")  # fmt: skip
    assert {conf[k] for k in hosts} == {"127.0.0.1"}
    assert (conf["rest.port"], conf["jobmanager.rpc.port"]) == ("18081", "16123")
    assert conf["jobmanager.memory.process.size"] == conf["taskmanager.memory.process.size"] == "1024m"
    assert conf["taskmanager.numberOfTaskSlots"] == "2"
    assert conf["execution.checkpointing.dir"] == (tmp_path / "checkpoints").as_uri()
    assert conf["restart-strategy.type"] == "fixed-delay"
    assert conf["python.executable"] == conf["python.client.executable"] == str(tmp_path / "python")
    assert conf["env.java.opts.all"] == "--add-opens=x"


def test_ctr_up_features_flink_serves_flink_computed_features(flink_venv, tmp_path):
    """``ctr up --features flink``: the worker keeps the label join (the learner trains and
    serving answers), the windowed features in Feast come from the job on the cluster through
    the pusher; ``ctr status`` shows the cluster; ``ctr down`` stops all of it. First in the
    module, so its cluster is down before the module's starts."""
    env = {**os.environ, "CTR_STATE_DIR": str(tmp_path / "state"), "CTR_KAFKA_COMPRESSION": "lz4"}
    env.pop("CTR_BOOTSTRAP", None)
    port = free_port()

    def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "ctr.cli", *args], env=env, capture_output=True, text=True,
                             timeout=timeout, check=False)  # fmt: skip
        assert out.returncode == 0, f"ctr {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        return out

    run("up", "--features", "flink", "--port", str(port))
    state = json.loads((tmp_path / "state" / "stack.json").read_text())
    flink_state = cluster.load_state(tmp_path / "state" / "flink")
    assert flink_state is not None
    pids = [s["pid"] for s in state["services"].values()] + [p["pid"] for p in flink_state["processes"].values()]
    try:
        assert set(state["services"]) == {"broker", "flink", "worker", "reweighter", "learner", "serve"}
        assert set(flink_state["processes"]) == {"jobmanager", "taskmanager-1", "pusher"}
        run("replay", "--events", "2000")
        status = json.loads(run("status").stdout)
        assert all(s["alive"] for s in status["services"].values()), status
        assert [j["state"] for j in status["flink"]["jobs"]] == ["RUNNING"], status["flink"]
        assert status["flink"]["overview"]["taskmanagers"] == 1

        # The newest closed 5 m window of the busiest item, as the job wrote it ...
        deadline = time.monotonic() + 120
        while not (rows := [r for r in read_features(state["bootstrap"], "flink-features")
                            if r["entity_type"] == "item" and r["window"] == "5m"]):  # fmt: skip
            assert time.monotonic() < deadline, "the job wrote no window"
            time.sleep(2.0)
        end = max(r["window_end_ms"] for r in rows)
        top = max((r for r in rows if r["window_end_ms"] == end), key=lambda r: r["impressions"])
        # ... is what `ctr features get` (serving's read) returns once the pusher wrote it.
        while True:
            got = json.loads(run("features", "get", "--item", top["entity_id"], "--dir", state["feast_dir"]).stdout)
            vals = got["item"][top["entity_id"]]
            if (vals["item_impressions_5m"], vals["item_clicks_5m"]) == (top["impressions"], top["clicks"]):
                break
            assert time.monotonic() < deadline, f"Feast holds {vals}, the job wrote {top}"
            time.sleep(2.0)
        assert vals["item_ctr_5m"] == pytest.approx(top["ctr"], abs=1e-12)
        body = {"user_id": "u1", "candidates": [{"item_id": top["entity_id"]}, {"item_id": "ad2"}]}
        r = first_prediction(port, body, time.monotonic() + 120)  # the label join still feeds the learner
        assert len(r.json()["predictions"]) == 2
    finally:
        run("down")
    assert not any(pid_alive(p) for p in pids)
    assert not (tmp_path / "state" / "flink" / cluster.STATE_FILE).exists()


def test_cluster_job_matches_the_faust_agent_and_its_pushed_rows_read_as_faust_rows(broker, tmp_path, flink_home):
    records = list(open_source("synthetic", seed=23, events=1000, events_per_second=5.0, **SMALL))
    summary = replay(records, broker.bootstrap, producer_config=KAFKA_PRODUCER_CONFIG)  # Flink reads no zstd
    assert summary.failed == 0
    ends = end_offsets(broker.bootstrap)
    assert sum(ends["clicks"].values()) == summary.clicks + 4  # the events and one marker per partition
    status = ctr("flink", "status", "--home", str(flink_home))
    assert status["overview"]["taskmanagers"] == 1 and status["overview"]["flink-version"] == "2.3.0"
    assert all(p["alive"] for p in status["processes"].values())

    app_id = f"cluster-parity-{uuid.uuid4().hex[:6]}"
    worker = Worker(broker.bootstrap, tmp_path, app_id).start()  # consumes while Flink runs
    try:
        t0 = time.monotonic()
        job = ctr("flink", "submit", "--home", str(flink_home), "--bootstrap", broker.bootstrap, "--no-push",
                  "--group", f"flink-{app_id}", "--end-offsets", json.dumps(ends))  # fmt: skip
        assert job["flink_job"] == "done"
        job_s = time.monotonic() - t0
        flink_rows = rows_by_key(read_features(broker.bootstrap, "flink-features", timeout_s=300))
        flink_counts = {k: v[:2] for k, v in flink_rows.items()}
        truth = windows_of(brute_force_buckets(records))
        assert not diff(flink_counts, truth), f"Flink cluster vs brute force: {diff(flink_counts, truth)}"

        n_imp, n_clk = summary.impressions, sum(truth_labels(records).values())
        faust = assert_agent_matches(broker.bootstrap, app_id, worker, (n_imp, n_clk), flink_counts)

        # What serving reads: the pusher's Feast rows (Flink) and the agent's (Faust) both hold
        # exactly the Flink windows their event time names.
        from ctr.streams.flink.push import push

        assert push(broker.bootstrap, "flink-features", tmp_path / "feast-flink", until_end=True) > 0
        assert not (bad := feast_mismatches(tmp_path / "feast-flink", flink_rows, list(faust))), bad[:5]
        wait_feast_matches(tmp_path / "feast", flink_rows, list(faust))
        print(f"\ncluster parity: {len(flink_rows):,} windows from {summary.events:,} events; "
              f"`ctr flink submit` (bounded) {job_s:.1f}s, job {job['seconds']:.1f}s")  # fmt: skip
    finally:
        worker.stop()


def test_a_quiet_click_topic_holds_the_windows_until_its_marker_and_no_click_is_lost(broker, flink_home, tmp_path):
    """The impressions run ahead while the click topic is quiet (its clicks are produced
    later, as a click topic consumed behind the impressions is). With an idle timeout the quiet
    source would stop holding the watermark and the late-arriving clicks would be dropped as
    late; here nothing closes until the clicks and then a marker arrive, and all count.
    Submitted as users do (``ctr flink submit``, the pusher started beside the job): the
    pusher's Feast rows end equal to the job's windows."""
    records = list(open_source("synthetic", seed=5, events=300, events_per_second=2.0, **SMALL))
    events = list(interleave_clicks(records))
    imps = [e for e in events if isinstance(e, Impression)]
    clicks = [e for e in events if isinstance(e, Click)]
    assert sum(truth_labels(records).values()) >= 15
    group = f"quiet-{uuid.uuid4().hex[:6]}"
    job = ctr("flink", "submit", "--home", str(flink_home), "--bootstrap", broker.bootstrap, "--group", group,
              "--feast-dir", str(tmp_path / "feast"))  # fmt: skip
    job_id, pusher = job["job_id"], job["pusher"]["pid"]
    state = cluster.load_state(flink_home)
    assert state is not None and state["processes"]["pusher"]["pid"] == pusher
    try:
        replay_events(imps, broker.bootstrap, producer_config=KAFKA_PRODUCER_CONFIG, close_after_ms=None)
        ends = end_offsets(broker.bootstrap, ("impressions",))
        wait_checkpointed(broker.bootstrap, group, ends)  # the job has read (and checkpointed) them all
        time.sleep(3.0)
        assert read_features(broker.bootstrap, "flink-features") == [], "a window closed with the clicks unread"

        replay_events(clicks, broker.bootstrap, producer_config=KAFKA_PRODUCER_CONFIG, close_after_ms=None)
        send_watermark(broker.bootstrap, imps[-1].event_time_ms + 3_600_000, producer_config=KAFKA_PRODUCER_CONFIG)
        want = windows_of(brute_force_buckets(records))
        got = wait_for_windows(broker.bootstrap, "flink-features", want, timeout_s=120)
        counts = {k: v[:2] for k, v in got.items()}
        assert not diff(counts, want), diff(counts, want)
        assert sum(c for (etype, _, w, _), (_, c) in counts.items() if etype == "user" and w == "1h") == \
            60 * sum(truth_labels(records).values())  # every click, in each of the 60 hourly windows holding it
        entities = sorted({(k[0], k[1]) for k in got})
        deadline = time.monotonic() + 120
        while bad := feast_mismatches(tmp_path / "feast", got, entities):  # the pusher (a service) catches up
            assert pid_alive(pusher), Path(job["pusher"]["log"]).read_text()[-3000:]
            assert time.monotonic() < deadline, f"{len(bad)} pushed Feast rows differ from the job's, e.g. {bad[:5]}"
            time.sleep(2.0)
    finally:
        cluster.cancel_jobs(state)
        assert rest_job(state, job_id)["state"] in ("CANCELLING", "CANCELED")
        stop_process(pusher)  # `ctr flink down` would stop it too; the next test has its own broker



def test_taskmanager_kill9_mid_job_recovers_from_its_checkpoint_with_exact_counts(broker, flink_home):
    """Last in the module: it kills the module cluster's TaskManager (and leaves its replacement)."""
    home = flink_home
    state = cluster.load_state(home)
    assert state is not None
    records = list(open_source("synthetic", seed=9, events=800, events_per_second=4.0, **SMALL))
    events = list(interleave_clicks(records))
    half = len(events) // 2
    group = f"kill-{uuid.uuid4().hex[:6]}"
    job_id = submit_unbounded(home, broker.bootstrap, group)
    try:
        replay_events(events[:half], broker.bootstrap, producer_config=KAFKA_PRODUCER_CONFIG, close_after_ms=None)
        wait_checkpointed(broker.bootstrap, group, end_offsets(broker.bootstrap))
        before = len(read_features(broker.bootstrap, "flink-features"))
        assert before > 0  # windows closed (by the first half's own event time) before the kill

        [tm] = [p["pid"] for name, p in state["processes"].items() if name.startswith("taskmanager-")
                and pid_alive(p["pid"])]  # fmt: skip
        os.kill(tm, signal.SIGKILL)
        t_kill = time.monotonic()
        cluster.add_taskmanager(home)  # the replacement (the job's only slot died with the first)
        # then a marker an hour on: every 1 h window closes (the replay's default closes 1 minute on)
        replay_events(events[half:], broker.bootstrap, producer_config=KAFKA_PRODUCER_CONFIG, close_after_ms=3_600_000)
        want = windows_of(brute_force_buckets(records))
        got = wait_for_windows(broker.bootstrap, "flink-features", want, timeout_s=150)
        recovered_s = time.monotonic() - t_kill
        counts = {k: v[:2] for k, v in got.items()}
        assert not diff(counts, want), diff(counts, want)

        cps = cluster.rest(state, f"/jobs/{job_id}/checkpoints")
        assert cps["counts"]["restored"] >= 1, cps["counts"]  # restored from a checkpoint, not started over
        assert rest_job(state, job_id)["state"] == "RUNNING"
        assert cluster.rest(state, "/overview")["taskmanagers"] == 1  # the killed one is gone
        print(f"\nkill -9: {before:,} rows before, all {len(want):,} windows exact {recovered_s:.1f}s after the kill "
              f"({cps['counts']['restored']} restore(s))")  # fmt: skip
    finally:
        cluster.cancel_jobs(state)
