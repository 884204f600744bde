"""``ctr``: the command line of the CTR adaptation system. Every command has ``--help``.

Imports are lazy on purpose: ``import feast`` alone takes seconds, and ``ctr broker status``
should answer instantly.
"""

from __future__ import annotations

import importlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypedDict

import typer

from ctr.infra.cli_options import Bootstrap, bootstrap_or_exit, fail, one_of
from ctr.serving.cli import serve_command
from ctr.streams.cli import reweight_command, worker_command

if TYPE_CHECKING:
    from ctr.streams.replay import ReplaySummary

#: ``ctr demo`` and ``ctr up``: who computes the windowed features that reach Feast.
FeaturesOpt = Annotated[str, typer.Option(
    help="Who computes the windowed features in Feast: faust (the worker's agent) or flink (a standalone Flink "
         "cluster, the job and the pusher; the worker keeps the label join; producers then write lz4).",
    callback=one_of(("faust", "flink")))]
TaskManagersOpt = Annotated[int, typer.Option(min=1, help="--features flink: TaskManager processes.")]

app = typer.Typer(
    help="Real-time CTR adaptation: replay, stream processing, online learning, serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
broker_app = typer.Typer(help="The embedded Kafka-protocol broker (no Docker needed).", no_args_is_help=True)
app.add_typer(broker_app, name="broker")


def _mount_features() -> None:
    # features/cli.py imports nothing heavy at module level (feast is imported per command)
    from ctr.features.cli import features_app

    app.add_typer(features_app, name="features", help="The Feast feature store: apply, get, serve.")


_mount_features()


def _mount_bench() -> None:
    # The benchmarks are the checkout's bench/ (the layer above this one, not in the wheel):
    # mounted by name when this ctr runs from a checkout (an editable install), so `ctr bench
    # ...` works there and the installed product neither needs nor imports it.
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "bench" / "cli.py").is_file():
        return
    if str(checkout) not in sys.path:
        sys.path.append(str(checkout))
    bench_cli = importlib.import_module("bench.cli")
    app.add_typer(bench_cli.bench_app, name="bench")


_mount_bench()


# --------------------------------------------------------------------------- broker
@broker_app.command("start")
def broker_start(
    kind: Annotated[str, typer.Option(help="noida (default: transactions, exact end offsets) or tansu.")] = "noida",
    port: Annotated[int | None, typer.Option(help="Port on 127.0.0.1 (default: a free one).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Broker data (default: .ctr/broker-<kind>).")] = None,
    foreground: Annotated[bool, typer.Option("--foreground", help="Run until Ctrl-C instead of detaching.")] = False,
) -> None:
    """Start the embedded broker on loopback, wait until it accepts connections, create the topics."""
    from ctr.infra.broker import KINDS, EmbeddedBroker
    from ctr.infra.config import state_dir

    if kind not in KINDS:
        fail(f"unknown broker kind {kind!r}; choose one of {', '.join(KINDS)}")
    state = state_dir() / "broker.json"
    if state.exists() and not foreground:
        info = json.loads(state.read_text())
        from ctr.infra.procs import pid_alive

        if pid_alive(info["pid"]):
            fail(
                f"a broker is already running: {info['kind']} at {info['bootstrap']} (pid {info['pid']}); "
                "`ctr broker stop` first"
            )
        state.unlink()
    data_dir = data_dir or state_dir() / f"broker-{kind}"
    broker = EmbeddedBroker(kind=kind, port=port, data_dir=data_dir, detach=not foreground).start()
    proc = broker.proc
    assert proc is not None  # start() launched it
    info = {"kind": kind, "bootstrap": broker.bootstrap, "pid": proc.pid, "data_dir": str(data_dir)}
    if not foreground:
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps(info))
        typer.echo(
            f"broker {kind} running at {broker.bootstrap} (pid {proc.pid}); stop it with `ctr broker stop`"
        )
        return
    typer.echo(f"broker {kind} running at {broker.bootstrap}; Ctrl-C stops it")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while proc.poll() is None:
            time.sleep(0.5)
        fail(f"broker exited with code {proc.returncode}; log: {data_dir / 'broker.log'}")
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop(keep_data=True)


@broker_app.command("stop")
def broker_stop() -> None:
    """Stop the broker started by `ctr broker start` (nothing acknowledged is lost)."""
    from ctr.infra.broker import stop_broker
    from ctr.infra.config import state_dir

    state = state_dir() / "broker.json"
    if not state.exists():
        typer.echo("no broker running (nothing in .ctr/broker.json)")
        return
    info = json.loads(state.read_text())
    stop_broker(info["pid"], info["kind"], info.get("data_dir"))
    state.unlink()
    typer.echo(f"stopped broker {info['kind']} (pid {info['pid']})")


@broker_app.command("status")
def broker_status(bootstrap: Bootstrap = None) -> None:
    """Show the broker's address and each topic's partitions and end offsets."""
    from confluent_kafka import TopicPartition

    from ctr.infra.kafka_io import make_consumer
    from ctr.infra.topics import TOPICS

    bs = bootstrap_or_exit(bootstrap)
    try:
        consumer = make_consumer(bs, "ctr-status")
        meta = consumer.list_topics(timeout=5)
    except Exception as err:  # noqa: BLE001 - report any client error as "not reachable"
        fail(f"broker at {bs} not reachable: {err}")
    typer.echo(f"broker at {bs}: reachable")
    for t in TOPICS:
        if t.name not in meta.topics:
            typer.echo(f"  {t.name:<18} missing")
            continue
        parts = meta.topics[t.name].partitions
        ends = [consumer.get_watermark_offsets(TopicPartition(t.name, p), timeout=5)[1] for p in parts]
        typer.echo(f"  {t.name:<18} partitions={len(parts)} messages={sum(ends)}")
    consumer.close()


topics_app = typer.Typer(help="Kafka topics of the pipeline.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")


@topics_app.command("create")
def topics_create(bootstrap: Bootstrap = None) -> None:
    """Create the pipeline's topics with their partition counts on any Kafka (idempotent)."""
    from ctr.infra.broker import create_topics
    from ctr.infra.topics import TOPICS

    bs = bootstrap_or_exit(bootstrap)
    create_topics(bs)
    for t in TOPICS:
        typer.echo(f"{t.name:<18} partitions={t.partitions}  {t.purpose}")


# --------------------------------------------------------------------------- replay
class _FileOptions(TypedDict, total=False):
    """The options only a file source takes (open_source passes them to its reader)."""

    order: str


@app.command("replay")
def replay_cmd(
    data: Annotated[str, typer.Option(help="synthetic | criteo:PATH | avazu:PATH | obd:PATH | csv:PATH")] = "synthetic",
    mapping: Annotated[Path | None, typer.Option(help="Mapping file for csv:PATH (see streams/datasets).")] = None,
    rate: Annotated[str, typer.Option(help="Events per second, or 'max'.")] = "max",
    events: Annotated[
        int | None,
        typer.Option(help="Impressions to replay (clicks follow them). Default: the whole file; synthetic: its own."),
    ] = None,
    order: Annotated[
        str,
        typer.Option(
            callback=one_of(("check", "sort", "trust")),  # ctr.streams.datasets.base.ORDER_MODES (lazy import)
            help="A file's rows out of event-time order: check (refuse, with their count), sort (external "
            "merge sort via temporary files), trust (replay as is, counted).",
        ),
    ] = "check",
    seed: Annotated[int, typer.Option(help="Seed for the synthetic stream and click delays.")] = 0,
    bootstrap: Bootstrap = None,
) -> None:
    """Write impressions and delayed clicks to Kafka in event-time order, with progress; the
    final JSON line adds the rows skipped (by reason) and, for timestamped files, the order handling."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ctr.streams.datasets import open_source
    from ctr.streams.datasets.base import OutOfOrderError
    from ctr.streams.replay import replay

    bs = bootstrap_or_exit(bootstrap)
    # The synthetic stream is in order by construction and takes no file options.
    options: _FileOptions = {} if data.partition(":")[0].strip().lower() == "synthetic" else {"order": order}
    try:
        per_s = None if rate == "max" else float(rate)
        # An unsorted file is refused here (order=check), before anything is produced.
        records = open_source(data, mapping=mapping, seed=seed, events=events, **options)
    except ValueError as err:
        fail(str(err))
    # The bar's length: the count asked for, else the synthetic stream's own; a whole file's
    # row count is unknown until read (the bar then pulses).
    total = events if events is not None else getattr(getattr(records, "config", None), "n_events", None)
    with Progress(
        TextColumn("replay"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} impressions"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        transient=False,
    ) as progress:
        task = progress.add_task("replay", total=total, rate="")

        def on_progress(s: ReplaySummary) -> None:
            progress.update(task, completed=s.impressions, rate=f"{s.events_per_s:,.0f} events/s")

        try:
            summary = replay(records, bs, rate=per_s, on_progress=on_progress)
        except OutOfOrderError as err:  # past a capped check's prefix: rare, but say it plainly
            fail(str(err))
    typer.echo(json.dumps({**summary.as_dict(), **records.report()}))


# --------------------------------------------------------------------------- the stages' commands
# Each stage owns its command (also run by `python -m` of its module); the order is the pipeline's.
app.command("worker")(worker_command)
app.command("reweight")(reweight_command)
app.command("serve")(serve_command)


# --------------------------------------------------------------------------- learn
@app.command("learn")
def learn_cmd(
    bootstrap: Bootstrap = None,
    state_dir: Annotated[Path, typer.Option(help="Checkpoint, snapshots and metrics log.")] = Path(".ctr/learner"),
    batch_size: Annotated[int, typer.Option(help="Micro-batch size.")] = 2048,
    max_latency: Annotated[float, typer.Option(help="Max seconds to wait to fill a micro-batch.")] = 0.1,
    publish_interval: Annotated[float, typer.Option(help="Seconds between published versions.")] = 1.0,
    checkpoint_interval: Annotated[float, typer.Option(help="Seconds between checkpoints.")] = 10.0,
    snapshot_interval: Annotated[float, typer.Option(help="Seconds between snapshot files.")] = 60.0,
    gate_margin: Annotated[
        float, typer.Option(help="Withhold a version whose AUC trails the served one by more.")
    ] = 0.02,
    table_bits: Annotated[int, typer.Option(help="Unified table has 2**bits rows.")] = 18,
    categorical: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated categorical fields to learn (user_id, item_id, position: the impression's). "
            "Default: every categorical field the first examples carry."
        ),
    ] = None,
    numeric: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated numeric fields to learn. Default: every numeric field the first examples carry."
        ),
    ] = None,
    fp16: Annotated[bool, typer.Option(help="Ship delta rows as float16.")] = False,
    signing_key: Annotated[
        Path | None,
        typer.Option(envvar="CTR_SIGNING_KEY", help="Ed25519 private key (PEM) every model update is signed with."),
    ] = None,
    prior_strength: Annotated[
        float,
        typer.Option(
            help="Exponent on the stream's field weights in the gate (0 ignores them; see `ctr bench quality`)."
        ),
    ] = 0.0,
    model_option: Annotated[
        list[str] | None,
        typer.Option(
            help="Model setting KEY=VALUE over the shipped ones (repeatable; a ModelConfig field, the value "
            "as JSON), e.g. cross_layers=2, probes=2, gate=true, mlp_dims=[128,64]."
        ),
    ] = None,
    max_examples: Annotated[int | None, typer.Option(help="Stop after this many examples.")] = None,
    idle_exit: Annotated[float | None, typer.Option(help="Stop after this many seconds without examples.")] = None,
    frozen_after: Annotated[
        int | None, typer.Option(help="Also score with a frozen copy taken after N examples.")
    ] = None,
    window_ms: Annotated[
        int, typer.Option(help="The worker's attribution window: labels are final this long after an impression.")
    ] = 30_000,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus /metrics on 127.0.0.1:PORT ($CTR_BIND).")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help="torch device of the model: cpu, cuda, cuda:1 (default: CUDA where torch sees one)."),
    ] = None,
) -> None:
    """Train the unified-embedding model online from training-examples; publish versions."""
    from ctr.online_learner.trainer import TrainerConfig, run_trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    def names(option: str | None) -> tuple[str, ...] | None:
        return None if option is None else tuple(f.strip() for f in option.split(",") if f.strip())

    cfg = TrainerConfig(
        bootstrap=bootstrap_or_exit(bootstrap),
        state_dir=state_dir,
        batch_size=batch_size,
        max_latency_s=max_latency,
        publish_interval_s=publish_interval,
        checkpoint_interval_s=checkpoint_interval,
        snapshot_interval_s=snapshot_interval,
        gate_margin=gate_margin,
        fp16_deltas=fp16,
        signing_key=signing_key,
        categorical=names(categorical),
        numeric=names(numeric),
        model_options=model_options(table_bits, prior_strength, model_option or []),
        frozen_after_examples=frozen_after,
        window_ms=window_ms,
        device=device,
    )
    result = run_trainer(cfg, metrics_port=metrics_port, max_examples=max_examples, idle_exit_s=idle_exit)
    typer.echo(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in result.items()}))


def model_options(table_bits: int, prior_strength: float, overrides: list[str]) -> dict:
    """``ctr learn``'s model options: the shipped ones (``DEFAULT_MODEL_OPTIONS``, what ``ctr bench
    quality`` and ``ctr bench learner`` evaluate) with the flags and ``--model-option`` over them."""
    import dataclasses

    from ctr.online_learner.model import ModelConfig
    from ctr.online_learner.trainer import DEFAULT_MODEL_OPTIONS

    options = {**DEFAULT_MODEL_OPTIONS, "table_bits": table_bits, "prior_strength": prior_strength}
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"categorical_fields", "numeric_fields"}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key.strip() not in known:
            raise typer.BadParameter(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw  # a bare string, e.g. numeric_mode=dense
    return options


# --------------------------------------------------------------------------- demo
@app.command("demo")
def demo_cmd(
    data: Annotated[str, typer.Option(help="synthetic | criteo:PATH | avazu:PATH | obd:PATH | csv:PATH")] = "synthetic",
    mapping: Annotated[Path | None, typer.Option(help="Mapping file for csv:PATH.")] = None,
    minutes: Annotated[float, typer.Option(help="How long to replay (sets --events from --rate).")] = 3.0,
    events: Annotated[int | None, typer.Option(help="Impressions to replay (overrides --minutes).")] = None,
    rate: Annotated[str, typer.Option(help="Events per second, or 'max'.")] = "2000",
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<timestamp>).")] = None,
    kind: Annotated[str, typer.Option(help="Embedded broker kind.")] = "noida",
    bootstrap: Annotated[str | None, typer.Option(help="Use an external Kafka instead of the embedded broker.")] = None,
    seed: int = 0,
    batch_nice: Annotated[
        int, typer.Option(help="Niceness of worker and reweighter (the learner: at most 3): serving's requests go "
                               "first (0: one priority).")
    ] = 10,
    features: FeaturesOpt = "faust",
    taskmanagers: TaskManagersOpt = 1,
) -> None:
    """The main job: broker, Faust worker, online learner and a paced replay, with a live view and a summary."""
    from ctr.demo import run_demo

    out = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    try:
        run_demo(
            out,
            data=data,
            mapping=mapping,
            events=events,
            minutes=minutes,
            rate=None if rate == "max" else float(rate),
            kind=kind,
            bootstrap=bootstrap,
            seed=seed,
            batch_nice=batch_nice,
            features=features,
            taskmanagers=taskmanagers,
        )
    except ValueError as err:
        fail(str(err))


# --------------------------------------------------------------------------- flink
flink_app = typer.Typer(
    help="A standalone Flink cluster (JobManager + TaskManagers, from .venv-flink) running the windowed-feature "
    "job, its rows pushed into Feast.",
    no_args_is_help=True,
)
app.add_typer(flink_app, name="flink")
FlinkHome = Annotated[Path | None, typer.Option("--home", help="FLINK_HOME and cluster state (default .ctr/flink).")]


def _flink_home(home: Path | None) -> Path:
    from ctr.stack import flink_home

    return (home or flink_home()).resolve()


@flink_app.command("up")
def flink_up(
    taskmanagers: Annotated[int, typer.Option(min=1, help="TaskManager processes.")] = 1,
    slots: Annotated[int, typer.Option(min=1, help="Task slots per TaskManager.")] = 1,
    taskmanager_mb: Annotated[int, typer.Option(help="TaskManager process size (MiB).")] = 1024,
    jobmanager_mb: Annotated[int, typer.Option(help="JobManager process size (MiB).")] = 1024,
    home: FlinkHome = None,
) -> None:
    """Start a JobManager and N TaskManagers (Java 17, REST on 127.0.0.1, checkpoints under HOME)."""
    from ctr.streams.flink import cluster

    cfg = cluster.ClusterConfig(taskmanagers=taskmanagers, slots=slots, taskmanager_mb=taskmanager_mb,
                                jobmanager_mb=jobmanager_mb)  # fmt: skip
    try:
        state = cluster.up(_flink_home(home), cfg)
    except (RuntimeError, TimeoutError) as err:
        fail(str(err))
    typer.echo(json.dumps({"rest_url": state["rest_url"], "home": state["home"],
                           "processes": state["processes"]}, indent=2))  # fmt: skip
    typer.echo("submit the job with `ctr flink submit`, stop with `ctr flink down`")


@flink_app.command("submit")
def flink_submit(
    bootstrap: Bootstrap = None,
    parallelism: Annotated[int, typer.Option(min=1, help="The job's parallelism (needs as many free slots).")] = 1,
    group: Annotated[str, typer.Option(help="The job's Kafka consumer group.")] = "ctr-flink-features",
    push: Annotated[bool, typer.Option(help="Also start the pusher: the job's rows into the Feast store.")] = True,
    feast_dir: Annotated[Path | None, typer.Option(help="Feast store the pusher writes (default .ctr/feast).")] = None,
    end_offsets: Annotated[
        str | None, typer.Option(help='Bounded: stop at these offsets, JSON {"impressions": {"0": N, ...}, ...}.')
    ] = None,
    home: FlinkHome = None,
) -> None:
    """Submit streams/flink/job.py (`flink run -py`) against the broker; with --push the pusher writes to Feast."""
    from ctr.infra.config import state_dir
    from ctr.stack import start_pusher
    from ctr.streams.flink import cluster
    from ctr.streams.flink.harness import create_output_topic

    bs, h = bootstrap_or_exit(bootstrap), _flink_home(home)
    try:
        create_output_topic(bs, "flink-features")
        job = cluster.submit(h, bs, parallelism=parallelism, group=group,
                             job_args=("--end-offsets", end_offsets) if end_offsets else ())  # fmt: skip
        if push:
            job["pusher"] = start_pusher(h, bs, feast_dir or state_dir() / "feast")
    except (RuntimeError, TimeoutError) as err:
        fail(str(err))
    typer.echo(json.dumps(job, indent=2))


@flink_app.command("add-taskmanager")
def flink_add_taskmanager(home: FlinkHome = None) -> None:
    """Start one more TaskManager (more slots, or to replace a lost one)."""
    from ctr.streams.flink import cluster

    try:
        typer.echo(json.dumps(cluster.add_taskmanager(_flink_home(home)), indent=2))
    except RuntimeError as err:
        fail(str(err))


@flink_app.command("status")
def flink_status(home: FlinkHome = None) -> None:
    """The cluster's processes and, from its REST API, TaskManagers, slots and jobs."""
    from ctr.streams.flink import cluster

    typer.echo(json.dumps(cluster.status(_flink_home(home)), indent=2))


@flink_app.command("down")
def flink_down(home: FlinkHome = None) -> None:
    """Cancel the jobs, stop the pusher, the TaskManagers and the JobManager."""
    from ctr.streams.flink import cluster

    typer.echo(json.dumps(cluster.down(_flink_home(home)) or {"up": False}, indent=2))


# --------------------------------------------------------------------------- up / down / status
@app.command("up")
def up_cmd(
    kind: Annotated[str, typer.Option(help="Embedded broker kind.")] = "noida",
    feast_dir: Annotated[Path | None, typer.Option(help="Feast store directory (default .ctr/feast).")] = None,
    port: Annotated[int, typer.Option(help="Serving port on 127.0.0.1.")] = 8000,
    monitor: Annotated[
        bool, typer.Option(help="Also start Prometheus (on PATH) scraping every stage, with the alert rules of "
                           "infra/docker/prometheus/alerts.yml.")
    ] = False,
    monitor_port: Annotated[int, typer.Option(help="Prometheus' port on 127.0.0.1 (0: a free one).")] = 0,
    profile: Annotated[
        str, typer.Option(help="dev: one process per stage, SQLite online store. full: two Faust workers, a "
                          "Redis-protocol online store (Valkey), two serving workers, Prometheus (--monitor).")
    ] = "dev",
    features: FeaturesOpt = "faust",
    taskmanagers: TaskManagersOpt = 1,
) -> None:
    """Start broker, Faust worker, reweighter, learner and serving in the background (.ctr/stack.json)."""
    from ctr.stack import up

    try:
        state = up(kind=kind, feast_dir=feast_dir, serve_port=port, monitor=monitor, monitor_port=monitor_port,
                   profile=profile, features=features, taskmanagers=taskmanagers)  # fmt: skip
    except (RuntimeError, TimeoutError) as err:
        fail(str(err))
    if features == "flink":
        typer.echo("the Flink job reads no zstd: produce with CTR_KAFKA_COMPRESSION=lz4 (e.g. `ctr replay`)")
    typer.echo(json.dumps(state, indent=2))
    typer.echo("feed it with `ctr replay`, inspect with `ctr status` and `ctr features get`, stop with `ctr down`")


@app.command("down")
def down_cmd() -> None:
    """Stop what `ctr up` started (SIGTERM, SIGKILL after a grace period)."""
    from ctr.stack import down

    typer.echo(json.dumps(down() or {"up": False}, indent=2))


@app.command("status")
def status_cmd() -> None:
    """Show the services `ctr up` started, their pids, liveness and log files (and Prometheus' health and alerts)."""
    from ctr.stack import status

    typer.echo(json.dumps(status(), indent=2))


@app.command("keygen")
def keygen_cmd(
    out: Annotated[Path, typer.Argument(help="Directory for signing.key (the private key, mode 0600).")],
    public_out: Annotated[
        Path | None, typer.Option(help="Directory for signing.pub (default: OUT), e.g. the replicas' key directory.")
    ] = None,
    if_missing: Annotated[
        bool, typer.Option(help="Exit 0 without writing when OUT already holds a key (a one-shot deployment step).")
    ] = False,
) -> None:
    """Create an Ed25519 key pair for signed model updates (`ctr learn --signing-key`, `ctr serve --verify-key`)."""
    from ctr.online_learner.signing import UpdateSigner, load_private_key, write_keypair

    if (out / "signing.key").exists():
        if if_missing:
            key = UpdateSigner(load_private_key(out / "signing.key"))
            typer.echo(json.dumps({"private_key": str(out / "signing.key"), "key_id": key.key_id.hex(),
                                   "created": False}, indent=2))  # fmt: skip
            return
        fail(f"{out / 'signing.key'} exists: keys are not overwritten (choose another directory)")
    private, public = write_keypair(out, public_out)
    typer.echo(json.dumps({"private_key": str(private), "public_key": str(public),
                           "key_id": UpdateSigner(load_private_key(private)).key_id.hex(), "created": True},
                          indent=2))  # fmt: skip


#: The password files docker-compose.yml mounts as secrets (``<name>.password``): a Kafka SCRAM
#: user per principal of infra/docker/kafka/acls.conf and the two Redis users of
#: infra/docker/redis/users.acl (tests/test_compose.py checks all three agree).
COMPOSE_SECRETS = ("kafka-topics", "kafka-replay", "kafka-worker", "kafka-reweighter", "kafka-learner",
                   "kafka-serving", "kafka-flink", "redis-writer", "redis-reader")  # fmt: skip


@app.command("secrets")
def secrets_cmd(
    out: Annotated[Path, typer.Argument(help="Directory for the password files (docker-compose.yml: ./secrets).")],
) -> None:
    """Create the Kafka and Redis passwords of the compose deployment (random; an existing file is kept)."""
    from ctr.infra.security import write_password_files

    created = write_password_files(out, COMPOSE_SECRETS)
    # names only: the values never leave the files
    typer.echo(json.dumps({"directory": str(out), "created": [n for n, c in created.items() if c],
                           "kept": [n for n, c in created.items() if not c]}, indent=2))  # fmt: skip


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
