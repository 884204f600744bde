"""``ctr bench ablation``: what each part of the model buys, in log loss and in step time.

Every variant is the learner exactly as ``ctr learn`` runs it (``bench.quality.run_ctr_stream``:
its ``ArrivalLearner``, polls of 2,048, fields from the data) with one model option changed
(``--model-option`` of ``ctr learn``), evaluated progressively on the same datasets as ``ctr
bench quality``. Per variant and dataset: whole-stream log loss minus the running click rate's
(negative = better than it). Per variant: the model step's time per example at full-size
updates (pre-encoded polls of 2,048 on the synthetic stream, one thread) -- what the part costs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.common import report
from bench.quality import SYNTHETIC, default_datasets, example_log_loss, load, run_ctr_stream, running_mean
from ctr.online_learner.trainer import DEFAULT_MODEL_OPTIONS, TrainerConfig

#: (name, model options over the shipped ones). The first is what ``ctr learn`` ships.
VARIANTS: tuple[tuple[str, dict], ...] = (
    ("shipped (ctr learn defaults)", {}),
    ("+ 2 probes per field", {"probes": 2}),
    ("+ DCN-V2 cross network (2 layers, rank 16)", {"cross_layers": 2}),
    ("+ FinalMLP learned field gate", {"gate": True}),
    ("+ all three (the model before 2026-12-07)", {"probes": 2, "cross_layers": 2, "gate": True}),
    ("- numeric fields' linear term", {"numeric_linear": False}),
)


def _config(options: dict) -> TrainerConfig:
    return TrainerConfig(bootstrap="", state_dir=Path("."), model_options={**DEFAULT_MODEL_OPTIONS, **options})


def step_us(options: dict, examples: Sequence, batch: int = 2048, polls: int = 12) -> float:
    """Model-step microseconds per example at full-size updates (one thread, pre-encoded polls)."""
    import torch

    torch.set_num_threads(1)
    cfg = _config(options)
    learner = cfg.make_learner(cfg.model_for([e.impression for e in examples[:batch]]))
    learner.examples_seen = learner.max_step * learner.step_ratio  # full-size updates from here
    encoded = [learner.encode([e.impression for e in examples[i : i + batch]]) for i in range(0, polls * batch, batch)]
    y = np.array([e.label for e in examples[: polls * batch]], dtype=np.float32)
    learner.predict_learn_many(encoded[0], y[:batch])  # warm-up
    t = time.perf_counter()
    for k, enc in enumerate(encoded):
        learner.predict_learn_many(enc, y[k * batch : (k + 1) * batch])
    return 1e6 * (time.perf_counter() - t) / (polls * batch)


def main(json_path: Path, data: Sequence[str] = (), synthetic_events: int | None = None) -> dict:
    specs = list(data) or default_datasets()
    streams = []
    for spec in specs:
        n = (synthetic_events or SYNTHETIC.get(spec, 100_000)) if spec.startswith("synthetic") else None
        streams.append(load(spec, events=n))
    speed_stream = load("synthetic", events=2048 * 13).examples
    rows = []
    for name, options in VARIANTS:
        # per dataset: whole-stream log loss minus the running click rate's
        row: dict = {"variant": name, "model_options": options}
        for s in streams:
            p, _ = run_ctr_stream(s, field_weights=False, config=_config(options))
            diff = float((example_log_loss(s.y, p) - example_log_loss(s.y, running_mean(s.y))).mean())
            row[s.name] = round(diff, 5)
        row["step_us_per_example"] = round(step_us(options, speed_stream), 2)
        print(f"{name}: {row}", flush=True)
        rows.append(row)
    return report(
        "ablation: log loss vs the running click rate and step time, per model option",
        rows,
        json_path,
        {"datasets": [s.name for s in streams], "shipped_options": DEFAULT_MODEL_OPTIONS},
    )


def markdown_table(doc: dict) -> str:
    names = doc["datasets"]
    head = "| variant | " + " | ".join(names) + " | step µs / example |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for r in doc["rows"]:
        cells = [f"{r[n]:+.5f}" for n in names]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['step_us_per_example']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    out = main(Path("bench/results/ablation.json"))
    print(markdown_table(out))
