"""``python -m bench.served_bias``: served vs predict-then-learn quality, by label-emission mode.

Replays the synthetic stream (no broker: the label join's two orders are simulated exactly) to
the learner as ``ctr learn`` runs it, in polls of 200 examples, and scores every 20th impression
*as it is shown* with the model of that moment -- what serving would serve (without the
publish delay) -- then joins those scores to the labels:

* ``window``: every example leaves the join when its 30 s attribution window closes;
* ``emit-on-click``: a positive leaves at its click, a negative when the window closes (the
  worker's default).

Impressions shown before the first example arrived are not counted (nothing is served before
the first model). Prints a table and writes ``bench/results/served_bias.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.common import report
from online_learner.metrics import log_loss, roc_auc
from online_learner.trainer import TrainerConfig
from streams.datasets import DEFAULT_ATTRIBUTION_WINDOW_MS, open_source
from streams.schema import TrainingExample


def run(mode: str, events: int, poll: int = 200, serve_every: int = 20) -> dict:
    rows = list(open_source("synthetic", events=events))
    shown = np.array([r.impression.event_time_ms for r in rows])
    window = DEFAULT_ATTRIBUTION_WINDOW_MS
    label = np.array([int(r.clicked and r.click_delay_ms <= window) for r in rows])
    delay = np.array([r.click_delay_ms or 0 for r in rows])
    arrives = np.where(label == 1, shown + delay, shown + window) if mode == "emit-on-click" else shown + window
    order = np.argsort(arrives, kind="stable")
    examples = [TrainingExample(example_id=r.impression.event_id, label=int(y), impression=r.impression)
                for r, y in zip(rows, label, strict=True)]  # fmt: skip
    cfg = TrainerConfig(bootstrap="", state_dir=Path("."))
    learner = cfg.make_learner(cfg.model_for([e.impression for e in examples[:poll]]))
    served_at = np.arange(0, len(rows), serve_every)
    served = np.full(len(served_at), np.nan)
    progressive = np.empty(len(rows))
    j = 0
    for k in range(0, len(order), poll):
        idx = order[k : k + poll]
        now = arrives[idx].max()
        jj = j
        while jj < len(served_at) and shown[served_at[jj]] <= now:
            jj += 1
        if jj > j and k > 0:  # serve what was shown since the last poll, with the model of now
            served[j:jj] = learner.predict_proba_many([rows[i].impression for i in served_at[j:jj]])
        j = jj
        batch = learner.encode([examples[i] for i in idx])
        progressive[idx] = learner.predict_learn_many(batch, label[idx].astype(np.float32), shown[idx])
    ok = ~np.isnan(served)
    y, p = label[served_at][ok], served[ok]
    a, b = learner.model.calibration.coefficients()
    return {
        "mode": mode,
        "examples": len(rows),
        "served_impressions": int(ok.sum()),
        "served_auc": round(roc_auc(y, p), 4),
        "served_log_loss": round(log_loss(y, p), 4),
        "served_mean_p_over_rate": round(float(p.mean() / y.mean()), 3),
        "progressive_auc": round(roc_auc(label, progressive), 4),
        "progressive_log_loss": round(log_loss(label, progressive), 4),
        "oracle_auc": round(roc_auc(label, np.array([r.impression.oracle_ctr for r in rows])), 4),
        "calibration_a": round(a, 3),
        "calibration_b": round(b, 3),
    }


def main(json_path: Path, events: int = 120_000) -> dict:
    rows = [run(mode, events) for mode in ("window", "emit-on-click")]
    return report("served vs predict-then-learn quality by label-emission mode (synthetic, simulated join)",
                  rows, json_path)  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("bench/results/served_bias.json"))
    ap.add_argument("--events", type=int, default=120_000)
    args = ap.parse_args()
    main(args.json, args.events)
