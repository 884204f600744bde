"""``python -m bench.served_bias``: served vs predict-then-learn quality, by label-emission mode.

Replays the synthetic stream (no broker: the label join's two orders are simulated exactly) to
the learner as ``ctr learn`` runs it, in polls of 200 examples, and scores every 20th impression
*as it is shown* with the model of that moment -- what serving would serve (without the
publish delay) -- then joins those scores to the labels:

* ``window``: every example leaves the join when its 30 s attribution window closes;
* ``emit-on-click``: a positive leaves at its click, a negative when the window closes
  (``--emission click``);
* ``provisional``: every impression leaves as a provisional negative (at once, or after the
  worker's default 5 s wait if not clicked by then: a click inside the wait makes it a
  positive), a later click as a correction (``--emission provisional``, the worker's default);
  the learner holds each first
  example's scores until its window has passed and learns the base rate and the calibration
  from the final labels, as ``ctr learn`` does (``online_learner/outcomes.py``).

Impressions shown before the first example arrived are not counted (nothing is served before
the first model). Prints a table and writes ``bench/results/served_bias.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.common import report
from online_learner.metrics import log_loss, roc_auc
from online_learner.outcomes import HeldLabels
from online_learner.trainer import TrainerConfig
from streams.datasets import DEFAULT_ATTRIBUTION_WINDOW_MS, open_source
from streams.schema import TrainingExample


def run(
    mode: str, events: int, poll: int = 200, serve_every: int = 20, data: str = "synthetic", wait_ms: int = 0
) -> dict:
    rows = list(open_source(data, events=events))
    shown = np.array([r.impression.event_time_ms for r in rows])
    window = DEFAULT_ATTRIBUTION_WINDOW_MS
    label = np.array([int(r.clicked and r.click_delay_ms <= window) for r in rows])
    delay = np.array([r.click_delay_ms or 0 for r in rows])
    if mode == "provisional":
        return _run_provisional(rows, shown, label, delay, poll, serve_every, wait_ms) | {"data": data}
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
        "data": data,
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


def _run_provisional(rows, shown, label, delay, poll: int, serve_every: int, wait_ms: int = 0) -> dict:
    """The same, with every impression arriving ``wait_ms`` after it is shown (label 0) unless
    clicked by then (label 1, at its click), and a later click as a correction."""
    n = len(rows)
    early = (label == 1) & (delay <= wait_ms)
    first_at = np.where(early, shown + delay, shown + wait_ms)
    clicked = np.flatnonzero((label == 1) & ~early)
    # (arrival time, impression, is correction), firsts before corrections at equal times
    arrives = np.concatenate([first_at, shown[clicked] + delay[clicked]])
    who = np.concatenate([np.arange(n), clicked])
    fix = np.concatenate([np.zeros(n, dtype=bool), np.ones(len(clicked), dtype=bool)])
    y_arrival = np.concatenate([early, np.ones(len(clicked), dtype=bool)]).astype(np.float32)
    order = np.lexsort((fix, arrives))
    cfg = TrainerConfig(bootstrap="", state_dir=Path("."))
    learner = cfg.make_learner(cfg.model_for([r.impression for r in rows[:poll]]))
    held = HeldLabels(DEFAULT_ATTRIBUTION_WINDOW_MS)
    served_at = np.arange(0, n, serve_every)
    served = np.full(len(served_at), np.nan)
    progressive = np.full(n, np.nan)
    j = 0
    for k in range(0, len(order), poll):
        part = order[k : k + poll]
        now = arrives[part].max()
        jj = j
        while jj < len(served_at) and shown[served_at[jj]] <= now:
            jj += 1
        if jj > j and k > 0:
            served[j:jj] = learner.predict_proba_many([rows[i].impression for i in served_at[j:jj]])
        j = jj
        idx, is_fix, y = who[part], fix[part], y_arrival[order[k : k + poll]]
        p, scores = learner.predict_learn_scored([rows[i].impression for i in idx], y)
        firsts = idx[~is_fix]
        learner.count_arrivals(shown[firsts], y[~is_fix], corrections=int(is_fix.sum()))
        held.admit([str(i) for i in firsts], shown[firsts], y[~is_fix], final=y[~is_fix] == 1, p=p[~is_fix],
                   score=scores[~is_fix], row=firsts)  # fmt: skip
        held.correct([str(i) for i in idx[is_fix]])
        for done in (held.release(int(now)),):
            if done is not None:
                learner.observe_outcomes(done["score"], done["label"])
                progressive[done["row"]] = done["p"]
    done = held.release(None)
    if done is not None:
        progressive[done["row"]] = done["p"]
    ok = ~np.isnan(served)
    y, ps = label[served_at][ok], served[ok]
    a, b = learner.model.calibration.coefficients()
    return {
        "mode": "provisional" if not wait_ms else f"provisional after {wait_ms / 1000:g} s",
        "examples": n,
        "served_impressions": int(ok.sum()),
        "served_auc": round(roc_auc(y, ps), 4),
        "served_log_loss": round(log_loss(y, ps), 4),
        "served_mean_p_over_rate": round(float(ps.mean() / y.mean()), 3),
        "progressive_auc": round(roc_auc(label, progressive), 4),
        "progressive_log_loss": round(log_loss(label, progressive), 4),
        "oracle_auc": round(roc_auc(label, np.array([r.impression.oracle_ctr for r in rows])), 4),
        "calibration_a": round(a, 3),
        "calibration_b": round(b, 3),
    }


def main(json_path: Path, events: int = 120_000) -> dict:
    from streams.agents.label_join import JoinConfig

    default_wait = JoinConfig().negative_after_ms  # what the worker runs
    orders = [("window", 0), ("emit-on-click", 0), ("provisional", 0), ("provisional", default_wait)]
    rows = [run(mode, events, data=data, wait_ms=wait) for data in ("synthetic", "synthetic:low-ctr")
            for mode, wait in orders]  # fmt: skip
    return report("served vs predict-then-learn quality by label-emission mode (synthetic, simulated join)",
                  rows, json_path)  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("bench/results/served_bias.json"))
    ap.add_argument("--events", type=int, default=120_000)
    args = ap.parse_args()
    main(args.json, args.events)
