"""``python -m bench.served_bias``: served vs predict-then-learn quality, by label-emission mode.

Replays the synthetic stream (no broker: the label join's orders are simulated exactly) to
the learner as ``ctr learn`` runs it, in polls of 200 examples, and scores every 20th impression
*as it is shown* with the model of that moment -- what serving would serve (without the
publish delay) -- then joins those scores to the labels:

* ``window``: every example leaves the join when its 30 s attribution window closes;
* ``emit-on-click``: a positive leaves at its click, a negative when the window closes
  (``--emission click``);
* ``provisional``: every impression leaves as a provisional negative (at once, or after the
  worker's default 5 s wait if not clicked by then: a click inside the wait makes it a
  positive), a later click as a correction (``--emission provisional``, the worker's default);
  all three learned by :class:`~ctr.online_learner.outcomes.ArrivalLearner`, as ``ctr learn``
  learns them: every example on arrival, the base rate counted on arrival, the calibration
  and the progressive scores from each impression's final label.

Impressions shown before the first example arrived are not counted (nothing is served before
the first model). Prints a table and writes ``bench/results/served_bias.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.common import report
from ctr.infra.schema import TrainingExample
from ctr.online_learner.metrics import log_loss, roc_auc
from ctr.online_learner.outcomes import ArrivalLearner
from ctr.online_learner.trainer import TrainerConfig
from ctr.streams.datasets import DEFAULT_ATTRIBUTION_WINDOW_MS, open_source


def arrivals(rows, mode: str, wait_ms: int = 0) -> list[tuple[int, TrainingExample]]:
    """What the label join sends, in its order: ``(arrival event time, example)``."""
    window = DEFAULT_ATTRIBUTION_WINDOW_MS
    out = []
    for r in rows:
        imp, shown = r.impression, r.impression.event_time_ms
        clicked = r.clicked and r.click_delay_ms <= window
        click_at = shown + r.click_delay_ms if clicked else None
        eid = imp.event_id
        if mode == "window":
            out.append((shown + window, TrainingExample(example_id=eid, label=int(clicked), impression=imp)))
        elif mode == "emit-on-click":
            out.append((click_at if clicked else shown + window,
                        TrainingExample(example_id=eid, label=int(clicked), impression=imp)))  # fmt: skip
        elif clicked and r.click_delay_ms <= wait_ms:  # provisional: clicked inside the wait
            out.append((click_at, TrainingExample(example_id=eid, label=1, impression=imp, click_time_ms=click_at)))
        else:
            out.append((shown + wait_ms, TrainingExample(example_id=eid, label=0, impression=imp, provisional=True)))
            if clicked:
                out.append((click_at, TrainingExample(example_id=eid, label=1, impression=imp, correction=True,
                                                      click_time_ms=click_at)))  # fmt: skip
    out.sort(key=lambda a: (a[0], a[1].correction))
    return out


def run(
    mode: str, events: int, poll: int = 200, serve_every: int = 20, data: str = "synthetic", wait_ms: int = 0
) -> dict:
    rows = list(open_source(data, events=events))
    n = len(rows)
    row_of = {r.impression.event_id: i for i, r in enumerate(rows)}
    shown = np.array([r.impression.event_time_ms for r in rows])
    label = np.array([int(r.clicked and r.click_delay_ms <= DEFAULT_ATTRIBUTION_WINDOW_MS) for r in rows])
    stream = arrivals(rows, mode, wait_ms)
    cfg = TrainerConfig(bootstrap="", state_dir=Path("."))
    learner = cfg.make_learner(cfg.model_for([r.impression for r in rows[:poll]]))
    learn = ArrivalLearner(learner, cfg.window_ms)
    served_at = np.arange(0, n, serve_every)
    served = np.full(len(served_at), np.nan)
    progressive = np.full(n, np.nan)
    j = 0
    for k in range(0, len(stream), poll):
        part = stream[k : k + poll]
        now = part[-1][0]
        jj = j
        while jj < len(served_at) and shown[served_at[jj]] <= now:
            jj += 1
        if jj > j and k > 0:  # serve what was shown since the last poll, with the model of now
            served[j:jj] = learner.predict_proba_many([rows[i].impression for i in served_at[j:jj]])
        j = jj
        exs = [e for _, e in part]
        firsts = np.array([row_of[e.example_id] for e in exs if not e.correction], dtype=np.int64)
        done = learn.learn(exs, row=firsts)
        if done is not None:
            progressive[done["row"]] = done["p"]
    done = learn.drain()
    if done is not None:
        progressive[done["row"]] = done["p"]
    ok = ~np.isnan(served)
    y, p = label[served_at][ok], served[ok]
    # the baseline a served score must beat: the click rate of every impression shown before
    # this one, with its final label -- clairvoyant (labels still pending count as final), so
    # the bar is higher than any real running rate; add-half smoothed
    known = served_at
    clicks_known = np.concatenate([[0], np.cumsum(label)])[known]
    running = ((clicks_known + 0.5) / (known + 1.0))[ok]
    a, b = learner.model.calibration.coefficients()
    return {
        "mode": mode if mode != "provisional" or not wait_ms else f"provisional after {wait_ms / 1000:g} s",
        "data": data,
        "examples": n,
        "served_impressions": int(ok.sum()),
        "served_auc": round(roc_auc(y, p), 4),
        "served_log_loss": round(log_loss(y, p), 4),
        "served_mean_p_over_rate": round(float(p.mean() / y.mean()), 3),
        "running_mean_log_loss": round(log_loss(y, running), 4),
        "progressive_auc": round(roc_auc(label, progressive), 4),
        "progressive_log_loss": round(log_loss(label, progressive), 4),
        "oracle_auc": round(roc_auc(label, np.array([r.impression.oracle_ctr for r in rows])), 4),
        "calibration_a": round(a, 3),
        "calibration_b": round(b, 3),
    }


def main(json_path: Path, events: int = 120_000) -> dict:
    from ctr.streams.agents.label_join import JoinConfig

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
