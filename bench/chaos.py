"""``ctr bench chaos``: the whole pipeline under load and faults, checked against the generator's
ground truth.

Per seed: the demo's stages (worker, reweighter, learner, serving) under the demo's
supervisor, the synthetic stream replayed at the demo's rate (2,000 events/s) while another
process keeps one core busy; at seeded random moments the broker is restarted twice and the
worker, the learner and serving are each ``kill -9``'d (the supervisor restarts them). At the
end, against the generator (:mod:`bench.ground_truth`):

* **examples**: every impression has an example; every copy carries the true label (late
  clicks count as late: their impressions are negatives, and each late click is on
  ``late-events``);
* **features**: every Feast row equals the brute-force recount of its windows;
* **learner**: every example trained once (the model that survived the kills counts each
  impression exactly once);
* **serving**: at the learner's last version.

Target: zero discrepancies on every seed. ``ctr bench chaos --seeds 5 --json
bench/results/chaos.json``
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from bench.common import read_to_end, report
from bench.ground_truth import brute_force_buckets, feast_mismatches, late_ids, truth_labels
from ctr.demo import ready, start_stages
from ctr.infra.broker import EmbeddedBroker
from ctr.supervisor import Supervisor

#: what is hit, once each per seed (the broker twice)
TARGETS: tuple[str, ...] = ("broker", "broker", "worker", "learner", "serve")


@dataclass(frozen=True)
class Fault:
    at_s: float  # seconds after the replay started
    target: str


def schedule(seed: int, duration_s: float) -> list[Fault]:
    """Seeded fault times, spread over 10-85 % of the replay (the end is left to settle)."""
    rng = random.Random(seed)
    targets = list(TARGETS)
    rng.shuffle(targets)
    times = sorted(rng.uniform(0.10, 0.85) * duration_s for _ in targets)
    return [Fault(round(t, 1), x) for t, x in zip(times, targets, strict=True)]


def _last_row(path: Path) -> dict:
    """The newest complete row: the learner may be appending one as it is read, or have been
    killed in the middle of one (seed 5 of the first committed run died on a torn line)."""
    lines = path.read_text().splitlines() if path.exists() else []
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {}


def _served_version(port: int) -> int | None:
    import httpx

    try:
        return int(httpx.get(f"http://127.0.0.1:{port}/model", timeout=2.0).json()["version"])
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def run_seed(seed: int, events: int, rate: float, out: Path, console: Console) -> dict:
    from ctr.infra.schema import decode_training_example, final_labels
    from ctr.online_learner.encoding import discover_fields
    from ctr.streams.datasets import open_source
    from ctr.streams.datasets.base import interleave_clicks
    from ctr.streams.replay import replay_events

    if out.exists() and any(out.iterdir()):
        # a broker data dir, learner state or Feast store left from an earlier run would mix
        # two runs' data (found the hard way: offsets of the old run, restores that fail)
        raise FileExistsError(f"{out} is not empty: give --out a new folder")
    out.mkdir(parents=True, exist_ok=True)
    records = list(open_source("synthetic", seed=seed, events=events))
    truth, late = truth_labels(records), late_ids(records)
    stream = list(interleave_clicks(records))
    duration = len(stream) / rate
    faults = schedule(seed, duration)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # one core kept busy
    broker = EmbeddedBroker(kind="noida", data_dir=out / "broker").start()
    bs = broker.bootstrap
    sup = Supervisor(out / "logs")
    done: list[BaseException | None] = []
    injected: list[str] = []
    t_start = time.monotonic()
    try:
        fields = discover_fields([r.impression for r in records[:1000]])
        port = start_stages(sup, bs, out, fields=fields)
        for svc in sup.services.values():
            svc.max_restarts = 5  # a kill -9 is one restart; a broker restart may cost another
        sup.wait_for(lambda: ready(port), timeout_s=300, what="serving to be ready")

        def do_replay() -> None:
            try:
                replay_events(stream, bs, rate=rate)
                done.append(None)
            except BaseException as err:  # noqa: BLE001 - reported below
                done.append(err)

        replayer = threading.Thread(target=do_replay, daemon=True)
        t0 = time.monotonic()
        replayer.start()
        pending = list(faults)
        while replayer.is_alive() or pending:
            sup.check()
            now = time.monotonic() - t0
            if pending and now >= pending[0].at_s:
                f = pending.pop(0)
                if f.target == "broker":
                    broker.restart()
                else:
                    os.kill(sup.services[f.target].proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
                    sup.services[f.target].proc.wait(10)  # type: ignore[union-attr]
                    sup.check()
                injected.append(f"{f.target}@{now:.0f}s")
                console.print(f"  seed {seed}: {f.target} {'restarted' if f.target == 'broker' else 'kill -9'} "
                              f"at {now:.0f} s of the replay")  # fmt: skip
            time.sleep(0.2)
        replayer.join()
        if done and done[0] is not None:
            raise done[0]
        replay_s = time.monotonic() - t0
        metrics = out / "learner" / "learner_metrics.jsonl"
        sup.wait_for(lambda: _last_row(metrics).get("examples", 0) >= len(truth), timeout_s=600,
                     what="the learner to train every example", poll_s=1.0)  # fmt: skip
        # -- quiesce, then check: the learner stops first (SIGTERM: its last version), serving
        # must reach that version, then everything but the worker stops, so the reads below do
        # not compete with a broker rewriting its whole data file for every new message
        codes = sup.stop_all(["learner"])
        final = _last_row(metrics)
        trained, learner_version = int(final.get("examples", 0)), int(final.get("version", 0))
        deadline, served = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            served = _served_version(port)
            if served == learner_version:
                break
            time.sleep(0.5)
        codes |= sup.stop_all(["serve", "reweighter"])
        # -- the checks ---------------------------------------------------------------------
        examples = [decode_training_example(m.value()) for m in read_to_end(bs, "training-examples", timeout_s=900)]
        try:
            got = final_labels(examples)  # each impression's final label, corrections applied
            contradictions = 0
        except ValueError:
            got, contradictions = {e.example_id: e.label for e in examples if not e.correction}, 1
        missing = sum(1 for e in truth if e not in got)
        wrong = sum(1 for e, label in got.items() if e in truth and label != truth[e]) + contradictions
        unexpected = sum(1 for e in got if e not in truth)
        late_got = Counter(m.key().decode() for m in read_to_end(bs, "late-events", timeout_s=300))
        # late-events is at least once, like the examples: a restored join re-sends what it is
        # not sure left, so a late click may come twice (with its key); missing or unexpected
        # ones are discrepancies
        late_diff = len(set(late_got) ^ set(late))
        late_dupes = sum(late_got.values()) - len(late_got)
        from ctr.features.store import open_store

        store, expected = open_store(out / "feast"), brute_force_buckets(records)
        deadline, feast_bad, feast_eg = time.monotonic() + 300, -1, []
        while time.monotonic() < deadline:
            feast_bad, feast_eg = feast_mismatches(store, expected)
            if feast_bad == 0:
                break
            time.sleep(3.0)
        row = {
            "seed": seed, "impressions": len(truth), "events": len(stream), "replay_s": round(replay_s, 1),
            "check_s": round(time.monotonic() - t0 - replay_s, 1),
            "faults": " ".join(injected), "missing_examples": missing, "wrong_labels": wrong,
            "unexpected_examples": unexpected, "late_click_mismatches": late_diff,
            "late_click_duplicates": late_dupes,
            "feast_mismatches": feast_bad, "trained": trained, "trained_minus_impressions": trained - len(truth),
            "learner_version": learner_version, "served_version": served,
            "restarts": {n: s.restarts for n, s in sup.services.items()}, "learner_exit": codes.get("learner"),
        }  # fmt: skip
        row["discrepancies"] = (missing + wrong + unexpected + late_diff + max(feast_bad, 0)
                                + abs(trained - len(truth)) + int(served != learner_version))  # fmt: skip
        if feast_bad:
            row["feast_examples"] = repr(feast_eg[:2])
        return row
    finally:
        sup.stop_all()
        broker.stop(keep_data=True)
        busy.kill()
        busy.wait()
        console.print(f"  seed {seed} done in {time.monotonic() - t_start:.0f} s; logs in {out / 'logs'}")


def main(json_path: Path, seeds: int, events: int, rate: float, out: Path | None = None) -> dict:
    import tempfile

    console = Console()
    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="ctr-chaos-"))
    rows = []
    for seed in range(1, seeds + 1):
        console.print(f"[bold]seed {seed}[/]: {events:,} impressions and their clicks at {rate:,.0f} events/s, "
                      "one core kept busy")
        try:
            rows.append(run_seed(seed, events, rate, root / f"seed-{seed}", console))
        except Exception as err:  # noqa: BLE001 - one seed's failure is a result, not the end of the run
            console.print(f"[red]seed {seed} failed[/]: {err!r}")
            rows.append({"seed": seed, "events": 0, "faults": "", "error": repr(err)[:300], "discrepancies": -1,
                         "served_version": None, "learner_version": 0,
                         **{key: None for key, _ in CHECKS}})  # fmt: skip
    met = all(r["discrepancies"] == 0 for r in rows)
    extra = {"target": "zero discrepancies on every seed", "met": met, "events": events, "rate": rate,
             "busy_cores": 1}  # fmt: skip
    return report("Chaos: broker restarted twice, worker/learner/serving kill -9, one core busy", rows, json_path,
                  extra)  # fmt: skip


CHECKS: tuple[tuple[str, str], ...] = (
    ("missing_examples", "missing examples"),
    ("wrong_labels", "wrong labels"),
    ("late_click_mismatches", "late clicks off"),
    ("feast_mismatches", "Feast counts off"),
    ("trained_minus_impressions", "trained - impressions"),
)


def markdown_table(doc: dict) -> str:
    """The README's table from a result: each check per seed (0 everywhere is the target)."""
    head = ["seed", "events", "faults (s into the replay)", *(label for _, label in CHECKS), "served = learner version",
            "late clicks re-sent (allowed)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["rows"]:
        same = "yes" if r["served_version"] == r["learner_version"] else "no"
        cells = [str(r["seed"]), f"{r['events']:,}", r["faults"].replace(" ", ", "),
                 *(str(r[key]) for key, _ in CHECKS), f"{same} (v{r['learner_version']})",
                 str(r.get("late_click_duplicates"))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
