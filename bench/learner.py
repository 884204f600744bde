"""``ctr bench learner``: our online learner against Vowpal Wabbit and River on the same stream.

All learners see the same synthetic Criteo-shaped examples (26 categorical + 13 numeric
fields, drift half-way) in the same order and are scored progressively (predict, then learn).
Our learner's rate is end to end from decoded ``TrainingExample`` objects (feature encoding +
hashing + forward + backward + sparse update), on the CPU threads torch is given. River is
slow, so it runs on a prefix; AUC and log loss are reported on that same prefix for everyone
(``*_prefix`` columns) as well as on the full stream where a learner ran it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from bench.common import report
from bench.peers import run_river, run_vw
from online_learner.learner import OnlineCTR
from online_learner.metrics import log_loss, roc_auc
from online_learner.model import ModelConfig
from streams.datasets import open_source
from streams.schema import TrainingExample

TARGET_EXAMPLES_PER_S = 100_000
CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
NUMERIC = tuple(f"I{i}" for i in range(1, 14))


def synthetic_examples(n: int, seed: int = 0) -> list[TrainingExample]:
    return [
        TrainingExample(example_id=r.impression.event_id, label=int(r.clicked), impression=r.impression)
        for r in open_source("synthetic", seed=seed, events=n)
    ]


def run_ours(
    examples, batch_size: int = 2048, table_bits: int = 18, threads: int | None = None, **learner_kw
) -> tuple[np.ndarray, float, float]:
    """Progressive predictions, total seconds, and seconds spent in the model step alone."""
    if threads:
        torch.set_num_threads(threads)
    learner = OnlineCTR(ModelConfig(CATEGORICAL, NUMERIC, table_bits=table_bits), seed=0, **learner_kw)
    learner.predict_learn_many([e.impression for e in examples[:64]], [0] * 64)  # JIT warm-up, not timed
    learner = OnlineCTR(ModelConfig(CATEGORICAL, NUMERIC, table_bits=table_bits), seed=0, **learner_kw)
    y = np.array([e.label for e in examples], dtype=np.float32)
    p = np.empty(len(examples), dtype=np.float64)
    step = 0.0
    t = time.perf_counter()
    for i in range(0, len(examples), batch_size):
        enc = learner.encode([e.impression for e in examples[i : i + batch_size]])
        s = time.perf_counter()
        p[i : i + batch_size] = learner.predict_learn_many(enc, y[i : i + batch_size])
        step += time.perf_counter() - s
    return p, time.perf_counter() - t, step


def main(
    json_path: Path,
    events: int = 200_000,
    river_events: int = 20_000,
    batch_size: int = 2048,
    table_bits: int = 18,
    skip_peers: bool = False,
    threads: int = 1,
) -> dict:
    examples = synthetic_examples(events)
    y = np.array([e.label for e in examples])
    oracle = np.array([e.impression.oracle_ctr for e in examples])
    k = min(river_events, len(examples))
    rows = []

    def row(name: str, p: np.ndarray, seconds: float, n: int, note: str = "", **extra) -> dict:
        r = {
            "learner": name,
            "examples": n,
            "examples_per_s": round(n / seconds),
            "auc": round(roc_auc(y[:n], p[:n]), 4),
            "log_loss": round(log_loss(y[:n], p[:n]), 4),
            "auc_prefix": round(roc_auc(y[:k], p[:k]), 4),
            "log_loss_prefix": round(log_loss(y[:k], p[:k]), 4),
            **extra,
            "note": note,
        }
        rows.append(r)
        return r

    rows.append(
        {
            "learner": "oracle (ground truth p)",
            "examples": len(y),
            "auc": round(roc_auc(y, oracle), 4),
            "log_loss": round(log_loss(y, oracle), 4),
            "auc_prefix": round(roc_auc(y[:k], oracle[:k]), 4),
            "log_loss_prefix": round(log_loss(y[:k], oracle[:k]), 4),
            "note": "best achievable",
        }
    )
    p, total, step = run_ours(examples, batch_size, table_bits, threads=threads, lr_table=0.2, lr_dense=3e-3)
    ours = row(
        "ctr-stream unified embedding",
        p,
        total,
        len(examples),
        note=f"batch {batch_size}, 2^{table_bits} rows, {torch.get_num_threads()} threads",
        step_examples_per_s=round(len(examples) / step),
    )
    if not skip_peers:
        p, dt = run_vw(examples, CATEGORICAL, NUMERIC, bits=table_bits)
        vw = row("Vowpal Wabbit, all pairwise (-q)", p, dt, len(examples), note=f"-b {table_bits}, lr 0.5")
        p, dt = run_vw(examples, CATEGORICAL, NUMERIC, bits=table_bits, quadratic=False)
        row("Vowpal Wabbit, linear", p, dt, len(examples), note=f"-b {table_bits}")
        p, dt = run_river(examples[:k], CATEGORICAL, NUMERIC, "lr")
        row("River LogisticRegression", p, dt, k, note="prefix only")
        p, dt = run_river(examples[:k], CATEGORICAL, NUMERIC, "fm")
        row("River FMClassifier", p, dt, k, note="prefix only")
        for r in rows[2:]:
            r["speed_ratio_ours"] = round(ours["examples_per_s"] / r["examples_per_s"], 1)
        extra = {"auc_minus_vw_pairwise": round(ours["auc"] - vw["auc"], 4)}
    else:
        extra = {}
    return report(
        "online learners, progressive (predict-then-learn), synthetic Criteo-shaped stream",
        rows,
        json_path,
        {
            "target_examples_per_s": TARGET_EXAMPLES_PER_S,
            "meets_speed_target": ours["examples_per_s"] >= TARGET_EXAMPLES_PER_S,
            **extra,
        },
    )
