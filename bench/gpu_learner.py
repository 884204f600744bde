"""``ctr bench gpu``'s learner sections: the model step by batch size, and ``ctr learn`` whole.

Training (per device, per batch size ``B``): the model ``ctr learn`` builds (``TrainerConfig``'s
defaults, fields discovered from the synthetic Criteo-shaped stream), its learning rates and
its one torch thread, with two changes so one poll of ``B`` is one update of ``B``: ``max_step``
is raised to ``B`` (``ctr learn`` ships 2048) and the learner starts as if it had seen
``64 * B`` examples (a fresh learner's first updates are small on purpose,
:meth:`OnlineCTR.step_size`). Two rates, as in ``ctr bench learner``: *step* is
``predict_learn_many`` on pre-encoded batches (host -> device copy, hashing, forward, backward,
sparse update, calibration); *end to end* adds the feature encoding from decoded
``Impression`` objects on the host. Each runs for ``plan.train_seconds`` after two warm-up
steps, cycling over the stream.

Learner: ``ctr learn --device D`` as a process, fed a topic the embedded broker already holds,
so it runs as fast as it can; examples/s from its metrics log, publish latency (a delta encoded,
produced and acknowledged) from the versions it published every 0.25 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.checkout_ctr import ROOT, command
from bench.common import print_table
from bench.gpu import Plan, Skipped, md_table


def _devices() -> list[str]:
    import torch

    return ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]


def _timed(step: Callable[[int], int], seconds: float, min_steps: int = 3) -> tuple[float, int]:
    """Examples/s of ``step(i) -> examples`` called for i = 0, 1, ... for ``seconds`` (at least
    ``min_steps`` calls); every step returns host numpy, so the device has finished its work."""
    n, i, t0 = 0, 0, time.perf_counter()
    while True:
        n += step(i)
        i += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and i >= min_steps:
            return n / elapsed, i


def training_section(plan: Plan, utilisation: Callable[[], Any]) -> dict:
    """Examples/s by batch size on each device, model step alone and end to end."""
    from ctr.online_learner.learner import OnlineCTR
    from ctr.online_learner.trainer import TrainerConfig
    from ctr.streams.datasets import open_source

    examples = [r.example() for r in open_source("synthetic", seed=0, events=plan.train_examples)]
    impressions = [e.impression for e in examples]
    labels = np.array([e.label for e in examples], dtype=np.float32)
    cfg = TrainerConfig(bootstrap="", state_dir=Path("."))  # what `ctr learn` ships
    model = cfg.model_for(impressions[: cfg.discover_examples])
    enc_all = OnlineCTR(model, device="cpu").encode(impressions)  # host work, the same for every device
    devices, failed = _devices(), {}
    rows = []
    for batch in plan.train_batches:
        if batch > len(examples):
            continue
        row: dict = {"batch": batch}
        for device in devices:
            if device in failed:  # one error (an out-of-memory, a broken context) ends that device's runs
                continue
            try:
                learner = OnlineCTR(model, lr_table=cfg.lr_table, lr_dense=cfg.lr_dense, seed=cfg.seed,
                                    num_threads=cfg.torch_threads, device=device, max_step=batch)  # fmt: skip
                learner.examples_seen = batch * learner.step_ratio  # full-size updates from the first poll
                row.update(_rates(learner, device, enc_all, impressions, labels, plan.train_seconds, utilisation))
            except Exception as err:  # recorded; the other device and the rows so far are kept
                failed[device] = row[f"{device}_error"] = f"{type(err).__name__}: {err}"[-2000:]
        rows.append(row)
        print_table(f"training, batch {batch:,}", [row])
    biggest = rows[-1] if rows else {}
    best_step = biggest.get("cuda_step_ex_s")
    return {
        "rows": rows,
        "failed": failed,
        "model": {"fields": len(model.hashed_fields), "table_bits": model.table_bits, "probes": model.probes,
                  "mlp_dims": list(model.mlp_dims), "cross_layers": model.cross_layers, "gate": model.gate},
        "torch_threads": cfg.torch_threads,
        "gpu_passes_cpu_at": {mode: _crossover(rows, mode) for mode in ("step", "e2e")} if "cuda" in devices else None,
        "target_step_examples_per_s": 2e6,
        "meets_target": None if best_step is None else best_step >= 2e6,
    }  # fmt: skip


def _rates(learner: Any, device: str, enc_all: Any, impressions: list, labels: np.ndarray, seconds: float,
           utilisation: Callable[[], Any]) -> dict:  # fmt: skip
    """``learner``'s examples/s on polls of its ``max_step``, cycling over the stream: the step
    on pre-encoded batches, then end to end from the decoded impressions."""
    batch = learner.max_step
    polls = len(impressions) // batch

    def step(i: int) -> int:
        s = slice((i % polls) * batch, (i % polls + 1) * batch)
        return len(learner.predict_learn_many(enc_all.take(s), labels[s]))

    def end_to_end(i: int) -> int:
        s = slice((i % polls) * batch, (i % polls + 1) * batch)
        return len(learner.predict_learn_many(learner.encode(impressions[s]), labels[s]))

    out: dict = {}
    for mode, fn in (("step", step), ("e2e", end_to_end)):
        fn(0), fn(1)  # warm-up: kernels compiled, allocator and caches filled
        with utilisation() as util:
            rate, _ = _timed(fn, seconds)
        out[f"{device}_{mode}_ex_s"] = round(rate)
        if device == "cuda":
            out.update({f"{device}_{mode}_{k}": v for k, v in util.summary().items()})
    return out


def _crossover(rows: Sequence[dict], mode: str) -> int | None:
    """The smallest batch from which the GPU is faster than the CPU at every larger batch."""
    found = None
    for r in reversed(rows):
        if r.get(f"cuda_{mode}_ex_s", 0) > r.get(f"cpu_{mode}_ex_s", float("inf")):
            found = r["batch"]
        else:
            break
    return found


# ------------------------------------------------------------------------------- whole learner
def _produce(bootstrap: str, n: int) -> int:
    """``n`` synthetic training examples onto the topic, acknowledged (what the label join emits)."""
    from ctr.infra.kafka_io import DeliveryTracker, flush, make_producer, produce
    from ctr.infra.schema import encode
    from ctr.infra.topics import EXAMPLES_TOPIC
    from ctr.streams.datasets import open_source

    p, tracker = make_producer(bootstrap), DeliveryTracker()
    for r in open_source("synthetic", seed=1, events=n):
        e = r.example()
        produce(p, EXAMPLES_TOPIC, encode(e), e.example_id.encode(), tracker)
    flush(p, tracker)
    return tracker.delivered


def learner_section(plan: Plan, utilisation: Callable[[], Any]) -> dict:
    """``ctr learn --device D`` on a pre-filled topic: examples/s and publish latency per device."""
    if plan.learn_examples <= 0:
        raise Skipped("the whole learner is not part of --quick (a broker and a learner process: tens of seconds)")
    try:
        import noida_db  # noqa: F401 - the embedded broker's binary ships in this wheel
    except ImportError as err:
        raise Skipped(f"no embedded broker here ({err}); carry the noida-db wheel (README, Benchmarks)") from err
    from ctr.infra.broker import EmbeddedBroker

    rows = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(data_dir=Path(tmp) / "broker") as broker:
        t = time.perf_counter()
        n = _produce(broker.bootstrap, plan.learn_examples)
        print(f"  {n:,} examples on the topic in {time.perf_counter() - t:.1f} s", flush=True)
        for device in _devices():
            try:
                row = _run_learner(broker.bootstrap, Path(tmp) / f"learner-{device}", device, n, utilisation)
            except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as err:
                row = {"device": device, "error": f"{type(err).__name__}: {err}"[-3000:]}  # the other device runs
            rows.append(row)
            print_table(f"ctr learn --device {device}", [row])
    if all("error" in r for r in rows):
        raise RuntimeError("; ".join(r["error"] for r in rows))
    return {"rows": rows, "examples": n, "publish_interval_s": 0.25}


def _run_learner(bootstrap: str, state: Path, device: str, n: int, utilisation: Callable[[], Any]) -> dict:
    cmd = command("learn", "--bootstrap", bootstrap, "--state-dir", str(state), "--device", device,
                  "--max-examples", str(n), "--idle-exit", "10", "--publish-interval", "0.25")  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t = time.perf_counter()
    with utilisation() as util:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"ctr learn --device {device} exited {done.returncode}: {done.stderr[-2000:]}")
    final = json.loads(done.stdout.strip().splitlines()[-1])
    log = [json.loads(x) for x in (state / "learner_metrics.jsonl").read_text().splitlines()]
    # between the first and the last version that carried examples: the learner at work, without
    # its start (imports, JIT, model discovery) and its final acknowledgement wait; "sustained"
    # once its updates reached full size (2048 = examples seen / 64, OnlineCTR.step_size), as
    # `ctr bench learner` reports it -- before that a fresh learner takes small updates on purpose
    rate = _rate([r for r in log if r.get("examples", 0) > 0])
    sustained = _rate([r for r in log if r.get("examples", 0) >= 64 * 2048])
    ms = np.array([r["publish_ms"] for r in log if r.get("published") and "rows" in r and "publish_ms" in r])
    row = {
        "device": device,
        "examples": final.get("examples"),
        "ex_s": None if rate is None else round(rate),
        "ex_s_sustained": None if sustained is None else round(sustained),
        "wall_s": round(wall, 1),
        "deltas": int(ms.size),
        "publish_ms_p50": round(float(np.median(ms)), 2) if ms.size else None,
        "publish_ms_p99": round(float(np.percentile(ms, 99)), 2) if ms.size else None,
        "publish_ms_max": round(float(ms.max()), 2) if ms.size else None,
        "auc": final.get("auc"),
        "version": final.get("version"),
    }
    if device == "cuda":
        row.update(util.summary())
    return row


def _rate(rows: list[dict]) -> float | None:
    """Examples/s between the first and the last of the metrics log's ``rows``."""
    if len(rows) < 2 or rows[-1]["wall_ms"] <= rows[0]["wall_ms"]:
        return None
    return (rows[-1]["examples"] - rows[0]["examples"]) / ((rows[-1]["wall_ms"] - rows[0]["wall_ms"]) / 1e3)


# ------------------------------------------------------------------------------------- tables
def render_training(sec: dict) -> str:
    def f(v: object) -> str:
        return "" if v is None else f"{v:,}" if isinstance(v, int) else f"{v}"

    head = ["batch", "GPU step ex/s", "GPU end to end", "CPU step (1 thread)", "CPU end to end", "GPU busy %"]
    body = [[f"{r['batch']:,}", f(r.get("cuda_step_ex_s")), f(r.get("cuda_e2e_ex_s")), f(r.get("cpu_step_ex_s")),
             f(r.get("cpu_e2e_ex_s")), f(r.get("cuda_step_gpu_util_mean"))] for r in sec["rows"]]  # fmt: skip
    cross = sec.get("gpu_passes_cpu_at") or {}
    met = sec.get("meets_target")
    verdict = "no GPU" if met is None else "met" if met else "**not met**"
    return md_table(head, body) + (
        f"\n\nGPU faster than the CPU from batch: step {cross.get('step')}, end to end {cross.get('e2e')}. "
        f"Target >= 2M examples/s for the step at the largest batch: {verdict}."
    )


def render_learner(sec: dict) -> str:
    def f(v: int | None) -> str:
        return "" if v is None else f"{v:,}"

    head = ["device", "examples", "examples/s", "sustained", "versions", "publish p50 / p99 ms", "GPU busy %"]
    body = []
    for r in sec["rows"]:
        if "error" in r:
            body.append([r["device"], f"error: {r['error'][:80]}", *[""] * (len(head) - 2)])
            continue
        body.append([r["device"], f(r.get("examples")), f(r.get("ex_s")), f(r.get("ex_s_sustained")),
                     f(r.get("deltas")), f"{r.get('publish_ms_p50')} / {r.get('publish_ms_p99')}",
                     f"{r.get('gpu_util_mean') or ''}"])  # fmt: skip
    return md_table(head, body)
