"""``ctr bench``: every benchmark's command (mounted into ``ctr`` by :mod:`ctr.cli` in a checkout).

Each bench prints a table and writes JSON under bench/results/; ``ctr bench report`` turns the
committed results into the README's tables (docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

bench_app = typer.Typer(help="Benchmarks: print a table and write JSON under bench/results/.", no_args_is_help=True)


@bench_app.callback()
def bench_options(
    busy_cores: Annotated[
        int,
        typer.Option(
            help="Keep N cores busy with spinning processes for the whole run (the loaded variant: "
            "what to expect on a shared machine). Recorded in the result."
        ),
    ] = 0,
) -> None:
    """Benchmarks: print a table and write JSON under bench/results/."""
    if busy_cores:
        from bench.common import keep_cores_busy

        keep_cores_busy(busy_cores)


@bench_app.command("quality")
def bench_quality(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the JSON results.")] = Path(
        "bench/results/quality.json"
    ),
    data: Annotated[
        list[str] | None,
        typer.Option(
            help="Dataset spec, repeatable: synthetic | synthetic:low-ctr | obd:PATH | criteo:PATH | avazu:PATH | "
            "csv:PATH. Default: every real log in ../shared/data and both synthetic profiles."
        ),
    ] = None,
    mapping: Annotated[Path | None, typer.Option(help="Mapping file for csv:PATH.")] = None,
    events: Annotated[int | None, typer.Option(help="Cap on events per file (default: the whole file).")] = None,
    synthetic_events: Annotated[
        int | None, typer.Option(help="Events per synthetic stream (default: 100k, 500k for low-ctr).")
    ] = None,
    peers: Annotated[bool, typer.Option(help="Run Vowpal Wabbit and River too.")] = True,
) -> None:
    """Progressive log loss, AUC and calibration on real click logs, from the first event: the
    learner as `ctr learn` runs it vs the running click rate, Vowpal Wabbit and River."""
    from bench.quality import main

    main(json_path, data or (), mapping, events, synthetic_events, peers)


@bench_app.command("ablation")
def bench_ablation(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the JSON results.")] = Path(
        "bench/results/ablation.json"
    ),
    data: Annotated[
        list[str] | None, typer.Option(help="Dataset spec, repeatable (as `ctr bench quality`). Default: the same.")
    ] = None,
    synthetic_events: Annotated[
        int | None, typer.Option(help="Events per synthetic stream (default: 100k, 500k for low-ctr).")
    ] = None,
) -> None:
    """What each model option buys: log loss vs the running click rate per dataset, and the
    model step's time, for the shipped model and with one part added or removed."""
    from bench.ablation import main

    main(json_path, data or (), synthetic_events)


@bench_app.command("replay")
def bench_replay(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the JSON results.")] = Path(
        "bench/results/replay.json"
    ),
    events: Annotated[int, typer.Option(help="Events per client.")] = 100_000,
    kind: Annotated[str, typer.Option(help="Embedded broker kind to run against.")] = "noida",
    bootstrap: Annotated[str | None, typer.Option(help="Use this broker instead of starting one.")] = None,
) -> None:
    """Events/s into the broker per client (confluent-kafka, aiokafka, kafka-python) and of the
    full replay path (generate + validate + encode + produce)."""
    from bench.replay import main

    main(json_path=json_path, events=events, kind=kind, bootstrap=bootstrap)


@bench_app.command("learner")
def bench_learner(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the JSON results.")] = Path(
        "bench/results/learner.json"
    ),
    events: Annotated[int, typer.Option(help="Examples in the synthetic stream.")] = 200_000,
    river_events: Annotated[int, typer.Option(help="Prefix River runs on (it is slow).")] = 20_000,
    batch_size: Annotated[int, typer.Option(help="Our micro-batch size.")] = 2048,
    threads: Annotated[int, typer.Option(help="torch threads for our learner.")] = 1,
    skip_peers: Annotated[bool, typer.Option(help="Only our learner.")] = False,
) -> None:
    """Examples/s, progressive AUC and log loss: ours vs Vowpal Wabbit and River, same stream."""
    from bench.learner import main

    main(
        json_path=json_path,
        events=events,
        river_events=river_events,
        batch_size=batch_size,
        skip_peers=skip_peers,
        threads=threads,
    )


@bench_app.command("gpu")
def bench_gpu(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the JSON results.")] = Path(
        "bench/results/gpu.json"
    ),
    quick: Annotated[bool, typer.Option(help="Seconds instead of minutes: tiny sizes, no learner process.")] = False,
    section: Annotated[
        list[str] | None, typer.Option(help="Run only this section (repeatable): hashing, training, learner.")
    ] = None,
    learn_examples: Annotated[
        int | None, typer.Option(help="Examples on the topic for the whole learner (0 skips it).")
    ] = None,
) -> None:
    """The GPU path against the CPU on the same machine: the Numba-CUDA hashing kernel (ids/s,
    2^16..2^24 rows), the model step and end to end by batch size with the GPU's utilisation, and
    `ctr learn --device cuda` fed by the embedded broker. Without CUDA: the CPU side only."""
    from bench.gpu import SECTIONS, main

    main(json_path, quick=quick, sections=tuple(section or SECTIONS), learn_examples=learn_examples)


@bench_app.command("flink")
def bench_flink(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the JSON results.")] = Path(
        "bench/results/flink.json"
    ),
    events: Annotated[int, typer.Option(help="Impressions to replay (clicks come on top).")] = 200_000,
    parallelism: Annotated[list[int] | None, typer.Option(help="Flink parallelism; repeat for several.")] = None,
    skip_faust: Annotated[bool, typer.Option(help="Only the Flink job.")] = False,
    skip_cluster: Annotated[bool, typer.Option(help="No row for the job on a standalone cluster.")] = False,
) -> None:
    """Events/s of the PyFlink windowed-feature job on the mini-cluster and on a standalone cluster
    (`ctr flink up`; needs `make flink-setup`), next to the Faust agents on the same input."""
    from bench.flink import main

    main(json_path, events, tuple(parallelism or (1, 2)), "noida", skip_faust, skip_cluster)


@bench_app.command("reliability")
def bench_reliability(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the JSON results.")] = Path(
        "bench/results/reliability.json"
    ),
    seconds: Annotated[float, typer.Option(help="Seconds of serving load (a delta every second).")] = 30.0,
    events: Annotated[int, typer.Option(help="Events of the max-rate replay (peak RSS per stage).")] = 60_000,
) -> None:
    """Faults injected (broker restart/outage/kill -9, serving kill -9), load held, bad inputs tried;
    counts lost and crashes (target: zero)."""
    from bench.reliability import main

    main(json_path=json_path, seconds=seconds, events=events)


@bench_app.command("chaos")
def bench_chaos(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the JSON results.")] = Path(
        "bench/results/chaos.json"
    ),
    seeds: Annotated[int, typer.Option(help="Seeds (runs), each with its own fault schedule.")] = 5,
    events: Annotated[int, typer.Option(help="Impressions per seed (their clicks come on top).")] = 200_000,
    rate: Annotated[float, typer.Option(help="Replay rate, events/s (the demo's).")] = 2_000.0,
    out: Annotated[Path | None, typer.Option(help="Run folders (default: a temporary one).")] = None,
) -> None:
    """The whole pipeline with one core busy, the broker restarted twice and worker, learner and
    serving kill -9'd at seeded moments; labels, Feast counts, training counts and the served
    version checked against the generator (target: zero discrepancies)."""
    from bench.chaos import main

    main(json_path, seeds, events, rate, out)


_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@bench_app.command("report")
def bench_report(
    check: Annotated[bool, typer.Option("--check", help="Fail if a table differs from its result.")] = False,
) -> None:
    """Write the README's benchmark tables from the committed results in bench/results/."""
    from bench import report

    if check:
        found = report.problems()
        for p in found:
            typer.echo(p, err=True)
        raise typer.Exit(1 if found else 0)
    changed = report.write()
    typer.echo(f"rewrote {', '.join(changed)}" if changed else "every table already true to its result")
    for p in report.problems():
        typer.echo(p, err=True)


@bench_app.command("pacing", context_settings=_PASS_THROUGH, add_help_option=False)
def bench_pacing(ctx: typer.Context) -> None:
    """Idle consumers' CPU and fetches/s with and without fetch pacing, per broker and client
    (`ctr bench pacing --help` for its options)."""
    from bench.pacing import cli

    cli(ctx.args)


@bench_app.command("broker-load", context_settings=_PASS_THROUGH, add_help_option=False)
def bench_broker_load(ctx: typer.Context) -> None:
    """The embedded broker's CPU and state size over time while `ctr up` runs a replay
    (`ctr bench broker-load --help` for its options)."""
    from bench.broker_load import cli

    cli(ctx.args)


@bench_app.command("stream", context_settings=_PASS_THROUGH, add_help_option=False)
def bench_stream(ctx: typer.Context) -> None:
    """Faust agents events/s vs raw aiokafka, Feast write rows/s, feature freshness
    (`ctr bench stream --help` for its options)."""
    from bench.stream import cli

    cli(ctx.args)


@bench_app.command("serving", context_settings=_PASS_THROUGH, add_help_option=False)
def bench_serving(ctx: typer.Context) -> None:
    """/predict for 1, 10, 100 candidates, features included, one server on one core: capacity
    (highest rate with p99 <= 10 ms while a version lands every second; wrk saturation) and
    p50/p99 at fixed rates with and without updates (`ctr bench serving --help`)."""
    from bench.serving import main

    main(ctx.args)


@bench_app.command("inference", context_settings=_PASS_THROUGH, add_help_option=False)
def bench_inference(ctx: typer.Context) -> None:
    """The serving forward: torch vs NumPy over the same parameters, by batch size
    (`ctr bench inference --help` for its options)."""
    from bench.inference import main

    main(ctx.args)


@bench_app.command("signing", context_settings=_PASS_THROUGH, add_help_option=False)
def bench_signing(ctx: typer.Context) -> None:
    """What signing and verifying a model update costs, by delta size (`ctr bench signing --help`)."""
    from bench.signing import main

    main(ctx.args)


@bench_app.command("freshness", context_settings=_PASS_THROUGH, add_help_option=False)
def bench_freshness(ctx: typer.Context) -> None:
    """Click entering Kafka -> a served score that reflects it, p50/p99 over repeated trials
    (`ctr bench freshness --help` for its options)."""
    from bench.freshness import main

    main(ctx.args)




@bench_app.command("durability", context_settings=_PASS_THROUGH, add_help_option=False)
def bench_durability(ctx: typer.Context) -> None:
    """The Feast online store after a kill -9 of its writer (and of the Valkey server):
    acknowledged rows vs rows read back, SQLite and Valkey per persistence mode
    (`ctr bench durability --help` for its options)."""
    from bench.online_durability import cli

    cli(ctx.args)
