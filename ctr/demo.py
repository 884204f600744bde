"""``ctr demo``: the whole pipeline on the embedded default, for a bounded time, with a live
view and an honest summary.

Stages, each its own process under :class:`~ctr.supervisor.Supervisor` (logs in the run
folder, restarted if they crash, stopped with SIGTERM then SIGKILL):

    replay (this process, paced) -> broker -> ctr worker (label join, windowed features -> Feast)
    -> training-examples -> ctr learn (predict-then-learn, versions) -> model-updates

The learner also scores every example with a *frozen* copy of the model taken early (before
the synthetic drift) and with the generator's true click probability (evaluation only), so
the summary can say how much live refresh is worth and how far from the best achievable it is.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from ctr.infra.broker import EmbeddedBroker
from ctr.infra.procs import free_port
from ctr.infra.topics import DEAD_LETTER_TOPIC, FIELD_WEIGHTS_TOPIC
from ctr.online_learner.signing import run_keys, stage_flags
from ctr.probe import FreshnessProbe, ProbeLoop, ProbeResult, freshness_summary
from ctr.streams.agents.label_join import DEFAULT_WINDOW_MS
from ctr.streams.datasets import LabeledImpression, open_source
from ctr.streams.replay import ReplaySummary, replay
from ctr.supervisor import BATCH_NICE, Service, Supervisor, ctr_argv, stage_nice
from ctr.traffic import ServedImpressions, SteadyClient, TrafficLog


class _DriftProbe:
    """Passes records through, noting the event time of the impression at ``drift_at`` and
    offering each impression to the served-impressions scorer once it is live."""

    def __init__(self, records: Iterable[LabeledImpression], drift_at: int | None) -> None:
        self.records, self.drift_at = records, drift_at
        self.drift_event_ms: int | None = None
        self.count = 0
        self.scorer: ServedImpressions | None = None
        self.event_times: list[int] = []

    def open_at_end(self, window_ms: int = DEFAULT_WINDOW_MS) -> int:
        """Impressions whose click window was still open when the stream ended: the replay's
        final watermark marker closes them all at once (their negatives reach the learner in
        one burst after the live stream)."""
        if not self.event_times:
            return 0
        end = max(self.event_times)
        return sum(1 for t in self.event_times if t > end - window_ms)

    def __iter__(self) -> Iterator:
        for rec in self.records:
            if self.count == self.drift_at:
                self.drift_event_ms = rec.impression.event_time_ms
            self.count += 1
            self.event_times.append(rec.impression.event_time_ms)
            if self.scorer is not None:
                self.scorer.offer(rec.impression)
            yield rec


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return rows


def _fmt(v: object) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, str):  # features, freshness_error
        return v
    return f"{v:,.4f}" if isinstance(v, float) else f"{v:,}"


def _view(replayed: ReplaySummary, learner: dict, elapsed: float, stage: str, fresh: dict | None = None) -> Table:
    t = Table(title=f"ctr demo — {stage} — {elapsed:,.0f} s", show_header=True)
    t.add_column("events in", justify="right")
    t.add_column("events/s", justify="right")
    t.add_column("examples trained", justify="right")
    t.add_column("model version", justify="right")
    t.add_column("window AUC live", justify="right")
    t.add_column("frozen", justify="right")
    t.add_column("best (oracle)", justify="right")
    t.add_column("click→served p50", justify="right")
    t.add_row(
        _fmt(replayed.events),
        _fmt(round(replayed.events_per_s)),
        _fmt(learner.get("examples")),
        _fmt(learner.get("version")),
        _fmt(learner.get("window_auc")),
        _fmt(learner.get("frozen_window_auc")),
        _fmt(learner.get("oracle_window_auc")),
        "-" if not fresh or fresh["freshness_p50_s"] is None else f"{fresh['freshness_p50_s']:.2f} s",
    )
    return t


def run_demo(
    out: Path,
    data: str = "synthetic",
    mapping: Path | None = None,
    events: int | None = None,
    minutes: float = 3.0,
    rate: float | None = 2_000.0,
    kind: str = "noida",
    bootstrap: str | None = None,
    seed: int = 0,
    console: Console | None = None,
    predict_rate: float = 20.0,
    batch_nice: int = BATCH_NICE,
    features: str = "faust",
    taskmanagers: int = 1,
) -> dict:
    """``features="flink"``: the windowed features come from the Flink job on a standalone
    cluster (``taskmanagers`` TaskManagers, FLINK_HOME in ``out/flink``) through the pusher, the
    worker runs the label join only; every producer of the run then writes lz4 (Flink reads no
    zstd)."""
    console = console or Console()
    if features == "flink":
        os.environ["CTR_KAFKA_COMPRESSION"] = "lz4"  # this process's producers and the stages'
    elif features != "faust":
        raise ValueError(f"features={features!r}: choose faust or flink")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if events is None:
        events = int((rate or 2_000.0) * minutes * 60 / 1.1)  # ~10 % of events are clicks
    broker = None if bootstrap else EmbeddedBroker(kind=kind, data_dir=out / "broker").start()
    bs = broker.bootstrap if broker is not None else str(bootstrap)
    sup = Supervisor(out / "logs")
    learner_dir = out / "learner"
    metrics_path = learner_dir / "learner_metrics.jsonl"
    started = time.monotonic()
    console.print(f"[bold]ctr demo[/]: broker {kind if broker else 'external'} at {bs}; run folder {out}")
    result: dict = {}
    trials: list[dict] | None = None
    try:
        # The learner learns every field of the data -- the fields `ctr learn` would discover
        # from its first examples, read here up front so that the first model (and serving's
        # warm-up) exists before the stream starts and every event can show up in served scores.
        from ctr.online_learner.encoding import discover_fields

        fields = discover_fields([r.impression for r in open_source(data, mapping=mapping, seed=seed, events=1_000)])
        port = start_stages(sup, bs, out, frozen_after=max(2_000, events // 10), fields=fields, say=console.print,
                            batch_nice=batch_nice, features=features)  # fmt: skip
        if features == "flink":
            from ctr.stack import flink_features

            with console.status("starting the Flink cluster, the windowed-feature job and the pusher ..."):
                flink_features(bs, out / "feast", home=out / "flink", taskmanagers=taskmanagers, say=console.print)
        client = SteadyClient(f"http://127.0.0.1:{port}/predict", rate=predict_rate)
        # one replayed impression in 40 is scored by serving as it is shown (~50 requests/s at
        # the default rate): the online quality of what was served
        scorer = ServedImpressions(f"http://127.0.0.1:{port}/predict")
        records = _DriftProbe(
            open_source(data, mapping=mapping, seed=seed, events=events),
            drift_at=events // 2 if data == "synthetic" else None,
        )
        progress = ReplaySummary()
        replay_error: list[BaseException] = []

        def do_replay() -> None:
            try:
                replay(records, bs, rate=rate, on_progress=lambda s: progress.__dict__.update(s.__dict__))
            except BaseException as err:  # noqa: BLE001 - reported by the main thread
                replay_error.append(err)

        replayer = threading.Thread(target=do_replay, name="replay", daemon=True)
        # the stream starts once serving is ready (a model and the feature store), so every
        # event of it can show up in served scores; on a busy machine this takes a while
        with console.status("starting the stages (broker, worker, reweighter, learner, serving) ..."):
            sup.wait_for(lambda: ready(port), timeout_s=240, what="the serving tier to be ready")
        replayer.start()
        client.start()
        scorer.start()
        records.scorer = scorer
        # click -> served score, measured every few seconds with a burst of clicks on a new ad
        # (its events ride the stream's event-time clock; stopped before the replay's last
        # watermark marker would make them late)
        templates = [r.impression for r in open_source(data, mapping=mapping, seed=seed, events=600)]
        prober = ProbeLoop(FreshnessProbe(bs, f"http://127.0.0.1:{port}/predict", lambda: progress.last_event_ms,
                                          templates=templates, timeout_s=10.0), every_s=2.0)  # fmt: skip
        prober.start()
        stage = "replaying"
        last: dict = {}
        fresh: dict | None = None
        timeline: list[tuple[float, int, int]] = []  # (unix time, events replayed, examples trained)
        with Live(_view(progress, last, 0, stage), console=console, refresh_per_second=2, transient=False) as live:
            deadline = time.monotonic() + minutes * 60 * 3 + 120  # generous: never hang forever
            while time.monotonic() < deadline:
                dead = sup.check()
                if dead:
                    raise RuntimeError(f"{', '.join(dead)} kept crashing; logs in {out / 'logs'}")
                rows = _read_jsonl(metrics_path)
                last = rows[-1] if rows else {}
                timeline.append((time.time(), progress.events, last.get("examples", 0)))
                if progress.events >= 0.95 * events:
                    prober.stop.set()
                if not replayer.is_alive():
                    if replay_error:
                        raise replay_error[0]
                    stage = "learner catching up"
                    prober.stop.set()
                    prober.join(30)
                    if last.get("examples", 0) >= progress.impressions + prober.probe.impressions_sent:
                        break
                fresh = freshness_summary(prober.probe.results)
                live.update(_view(progress, last, time.monotonic() - started, stage, fresh))
                time.sleep(0.5)
            live.update(_view(progress, last, time.monotonic() - started, "done", fresh))
        # let the learner publish its last version and serving apply it, then stop everything
        time.sleep(2.5)
        client.stop.set()
        scorer.stop.set()
        client.join(10)
        scorer.join(10)
        codes = sup.stop_all(["serve", "learner", "reweighter", "worker"])
        rows = _read_jsonl(metrics_path)
        # the examples the learner had before the final marker flushed the open windows
        live_examples = progress.impressions + prober.probe.impressions_sent - records.open_at_end()
        result = summarise(rows, progress, records.drift_event_ms, time.monotonic() - started, codes,
                           live_examples=live_examples)  # fmt: skip
        # the probes' events went through the same pipeline: count them, say which they were
        result["probe_impressions"] = prober.probe.impressions_sent
        result["impressions"] += prober.probe.impressions_sent
        result["clicks"] += prober.probe.impressions_sent
        result["events"] += 2 * prober.probe.impressions_sent
        result.update(freshness_summary(prober.probe.results))
        trials = freshness_trials(prober.probe.results, rows)
        if prober.error is not None:
            result["freshness_error"] = repr(prober.error)
        result.update(serving_summary(client.log))
        result["served_impressions_scored"] = scorer.scored
        result["features"] = features
        result["dead_letters"] = _dead_letters(bs)
        weights = _field_weights(bs)
        from ctr.report import Timeline, write_report

        tl = Timeline(progress=timeline, probes=list(zip(prober.times, prober.probe.results, strict=False)),
                      served=client.log.versions, latency_ms=client.log.latency_ms)  # fmt: skip
        write_report(out / "report.html", result, rows, weights, tl)
    finally:
        sup.stop_all()
        if features == "flink":
            from ctr.streams.flink import cluster

            cluster.down(out / "flink")
        if broker:
            broker.stop(keep_data=True)
    _print_summary(console, result)
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    if trials is not None:
        (out / "freshness_trials.json").write_text(json.dumps(trials, indent=1))
    console.print(f"wrote {out / 'summary.json'} and {out / 'report.html'}; logs in {out / 'logs'}")
    return result


def start_stages(
    sup: Supervisor,
    bootstrap: str,
    out: Path,
    frozen_after: int | None = None,
    fields: tuple[Sequence[str], Sequence[str]] | None = None,
    say: Callable[[str], object] = print,
    batch_nice: int = BATCH_NICE,
    features: str = "faust",
) -> int:
    """Start worker, reweighter, learner and serving under ``sup`` with their state in ``out``;
    returns the serving port (ready once :func:`ready` says so). ``fields``: the learner's
    (categorical, numeric) fields; None lets it discover them from its first examples. The
    learner signs every model update and serving accepts only those (a key pair for the run
    unless the environment names one). ``batch_nice``: the worker's and reweighter's niceness
    (:data:`~ctr.supervisor.BATCH_NICE`), the learner's at most :data:`~ctr.supervisor.LEARNER_NICE`
    (:func:`~ctr.supervisor.stage_nice`); serving keeps the launcher's. ``features="flink"``:
    the worker runs the label join only (the Flink job computes the features)."""
    feast_dir, learner_dir = str(out / "feast"), out / "learner"
    key, created = run_keys(out / "keys")
    if created:
        say(f"model updates are signed with a key pair created for this run ({out / 'keys'}; "
                          "set $CTR_SIGNING_KEY and $CTR_VERIFY_KEYS to use your own)")
    sign, verify = stage_flags(key)
    extra = ["--frozen-after", str(frozen_after)] if frozen_after is not None else []
    if fields is not None:
        extra += ["--categorical", ",".join(fields[0]), "--numeric", ",".join(fields[1])]
    stages = {
        "worker": ["worker", "--feast-dir", feast_dir, "--instance-id", "demo-worker-1",
                   *(["--no-features"] if features == "flink" else [])],
        "reweighter": ["reweight", "--feast-dir", feast_dir, "--window", "20000", "--publish-every", "5000"],
        "learner": ["learn", "--state-dir", str(learner_dir), "--publish-interval", "1",
                    "--checkpoint-interval", "10", *sign, *extra],
    }  # fmt: skip
    for name, args in stages.items():
        sup.start(Service(name, ctr_argv(args[0], "--bootstrap", bootstrap, *args[1:]),
                          nice=stage_nice(name, batch_nice)))
    port = free_port()
    serve = ["serve", "--bootstrap", bootstrap, "--snapshot-dir", str(learner_dir / "snapshots"),
             "--feast-dir", feast_dir, "--port", str(port), *verify]  # fmt: skip
    sup.start(Service("serve", ctr_argv(*serve)))
    return port


def ready(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def serving_summary(log: TrafficLog) -> dict:
    lat = sorted(log.latency_ms)

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None

    return {
        "predictions": log.ok,
        "prediction_errors": log.errors,
        "serving_p50_ms": pct(0.5),
        "serving_p99_ms": pct(0.99),
        "model_versions_served": len({v for _, v in log.versions}),
    }


def freshness_trials(results: list[ProbeResult], rows: list[dict]) -> list[dict]:
    """Each freshness trial with its polling trace, every served version in it annotated with
    when the learner logged publishing it (seconds after the trial's clicks; learner metrics
    ``rows``, written just after the version is produced, so under load a little late):
    where a slow trial's seconds went -- no version published, one published but applied late,
    or versions that carried the clicks but moved the score too little.

    >>> r = ProbeResult(trial=0, fresh_s=1.2, specific=0.4, threshold=0.1, version=7, clicked_unix=100.0,
    ...                 trace=((0.05, 6, 0.0), (1.2, 7, 0.4)))
    >>> freshness_trials([r], [{"version": 7, "wall_ms": 100_900}])[0]["trace"][1]
    {'after_click_s': 1.2, 'version': 7, 'specific': 0.4, 'published_after_click_s': 0.9}
    """
    published = {row["version"]: row["wall_ms"] / 1000 for row in rows if row.get("version") is not None}
    out = []
    for r in results:
        d = r.as_dict()
        d["trace"] = [{"after_click_s": t, "version": v, "specific": sp,
                       "published_after_click_s": (round(published[v] - r.clicked_unix, 3) if v in published else None)}
                      for t, v, sp in r.trace]
        out.append(d)
    return out


def _dead_letters(bootstrap: str) -> int:
    from confluent_kafka import TopicPartition

    from ctr.infra.kafka_io import make_consumer

    c = make_consumer(bootstrap, "demo-dlq-count")
    try:
        lo, hi = c.get_watermark_offsets(TopicPartition(DEAD_LETTER_TOPIC, 0), timeout=10)
        return hi - lo
    finally:
        c.close()


def _field_weights(bootstrap: str) -> list[dict]:
    """Every version the reweighting stage published, oldest first."""
    import msgspec
    from confluent_kafka import TopicPartition

    from ctr.infra.kafka_io import make_consumer
    from ctr.infra.schema import SchemaError, decode_field_weights

    c = make_consumer(bootstrap, "demo-field-weights")
    out = []
    try:
        lo, hi = c.get_watermark_offsets(TopicPartition(FIELD_WEIGHTS_TOPIC, 0), timeout=10)
        c.assign([TopicPartition(FIELD_WEIGHTS_TOPIC, 0, lo)])
        idle = time.monotonic()
        while time.monotonic() - idle < 1.0:
            for m in c.consume(500, 0.2):
                if m.error() is None:
                    idle = time.monotonic()
                    try:
                        out.append(msgspec.to_builtins(decode_field_weights(m.value())))
                    except SchemaError:
                        pass
    finally:
        c.close()
    return sorted(out, key=lambda w: w["version"])


def summarise(
    rows: list[dict],
    replayed: ReplaySummary,
    drift_event_ms: int | None,
    seconds: float,
    exit_codes: dict,
    live_examples: int | None = None,
) -> dict:
    """The demo's numbers, all read from what the stages recorded (nothing assumed).

    Cumulative metrics come from the last row. The *window* metrics come from the last row
    the learner wrote while the stream was live (``examples <= live_examples``): positives
    leave the join at their click, negatives when their window closes, so the final watermark
    flushes the last window's negatives (30 s of event time) in one go, and a sliding window
    over them holds one class only -- an artefact of the stream's end, not of the model. The
    cut is a count of examples, not a wall time: a learner lagging behind a busy machine's
    replay has not yet reached the drift's consequences when the replay ends."""
    trained = [r for r in rows if r.get("examples")]
    last = trained[-1] if trained else {}
    from ctr.report import live_window_rows

    live = live_window_rows(trained, live_examples)
    end = live[-1] if live else {}
    versions = sorted({r["version"] for r in rows if r.get("published") or r.get("snapshot")})
    after = [r for r in trained if drift_event_ms is not None and r["event_time_ms"] >= drift_event_ms]
    publish_ms = sorted(r["publish_ms"] for r in rows if r.get("published"))
    # freshness of the learner: wall time from an example's arrival to the version carrying it
    # is bounded by the publish interval + publish time; measured end-to-end in the serving bench.
    return {
        "events": replayed.events,
        "impressions": replayed.impressions,
        "clicks": replayed.clicks,
        "examples": last.get("examples", 0),
        "duplicates_skipped": last.get("duplicates", 0),
        "field_weights_version": last.get("field_weights_version"),
        "progressive_auc": last.get("auc"),
        "progressive_logloss": last.get("log_loss"),
        "window_auc_end": end.get("window_auc"),
        "frozen_auc": last.get("frozen_auc"),
        "frozen_window_auc_end": end.get("frozen_window_auc"),
        "best_auc": last.get("oracle_auc"),
        "best_window_auc_end": end.get("oracle_window_auc"),
        # what serving scored for sampled impressions as they were shown, joined to their labels
        # (predict-then-learn numbers above are optimistic: positives reach the learner at their
        # click, negatives only when the window closes, so a negative is scored by a model that
        # has already learned from later clicks)
        "served_examples": last.get("served_examples"),
        "served_auc": last.get("served_auc"),
        "served_logloss": last.get("served_log_loss"),
        "frozen_served_auc": last.get("frozen_served_auc"),
        "frozen_served_logloss": last.get("frozen_served_log_loss"),
        # on the same impressions: those served once the frozen copy existed
        "paired_served_auc": last.get("paired_served_auc"),
        "paired_served_logloss": last.get("paired_served_log_loss"),
        "paired_served_examples": last.get("paired_served_examples"),
        "live_minus_frozen_served_auc": (
            round(last["paired_served_auc"] - last["frozen_served_auc"], 4)
            if last.get("paired_served_auc") is not None and last.get("frozen_served_auc") is not None
            else None
        ),
        "live_minus_frozen_after_drift": (
            round(end["window_auc"] - end["frozen_window_auc"], 4)
            if after and end.get("frozen_window_auc") is not None
            else None
        ),
        "drift_event_time_ms": drift_event_ms,
        "live_examples": live_examples,
        "model_versions_published": len(versions),
        "gate_withheld": sum(1 for r in rows if r.get("published") is False),
        "publish_p50_ms": publish_ms[len(publish_ms) // 2] if publish_ms else None,
        "events_per_s": round(replayed.events_per_s),
        "seconds": round(seconds, 1),
        "exit_codes": exit_codes,
    }


def _print_summary(console: Console, result: dict) -> None:
    table = Table(title="ctr demo summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.items():
        table.add_row(k, json.dumps(v) if isinstance(v, dict) else _fmt(v))
    console.print(table)
