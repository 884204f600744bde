"""The demo's HTML report: plots of what the stages recorded, embedded as PNG in one file.

* progressive AUC and log loss over event time: live model, frozen copy, ground truth, drift marked;
* field weights over event time, as published by the reweighting stage;
* model versions over wall time and publish latency.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


_MODELS = (("", "live model", "-"), ("frozen_", "frozen copy", "--"), ("oracle_", "best achievable", ":"))


def quality_figure(rows: list[dict], drift_event_ms: int | None) -> str:
    rows = [r for r in rows if r.get("examples") and r.get("window_auc") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, metric, title in zip(axes, ("window_auc", "window_log_loss"), ("AUC", "log loss"), strict=True):
        if rows:
            t0 = rows[0]["event_time_ms"]
            for prefix, label, style in _MODELS:
                pts = [((r["event_time_ms"] - t0) / 1000, r[prefix + metric]) for r in rows
                       if r.get(prefix + metric) is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=label)
            if drift_event_ms is not None:
                ax.axvline((drift_event_ms - t0) / 1000, color="red", alpha=0.6, label="drift")
            ax.legend(fontsize=8)
        ax.set(title=f"Progressive {title} (sliding window)", xlabel="event time (s)", ylabel=title)
    return _png(fig)


def weights_figure(weights: list[dict], drift_event_ms: int | None, t0: int | None) -> str:
    fig, ax = plt.subplots(figsize=(12, 4))
    if weights:
        t0 = t0 if t0 is not None else weights[0]["event_time_ms"]
        x = [(w["event_time_ms"] - t0) / 1000 for w in weights]
        fields = sorted({f for w in weights for f in w["weights"]})
        # the fields that moved most, so the picture stays readable
        spread = {f: max(w["weights"].get(f, 1.0) for w in weights) - min(w["weights"].get(f, 1.0) for w in weights)
                  for f in fields}
        for f in sorted(fields, key=spread.get, reverse=True)[:8]:
            ax.plot(x, [w["weights"].get(f, 1.0) for w in weights], label=f)
        if drift_event_ms is not None:
            ax.axvline((drift_event_ms - t0) / 1000, color="red", alpha=0.6, label="drift")
        ax.legend(fontsize=8, ncol=3)
    ax.set(title="Field weights published by the reweighting stage (8 that moved most)", xlabel="event time (s)",
           ylabel="weight (mean 1)")
    return _png(fig)


def versions_figure(rows: list[dict]) -> str:
    pub = [r for r in rows if r.get("published") or r.get("snapshot")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.5))
    if pub:
        w0 = pub[0]["wall_ms"]
        ax1.step([(r["wall_ms"] - w0) / 1000 for r in pub], [r["version"] for r in pub], where="post")
        lat = [r["publish_ms"] for r in pub if r.get("publish_ms") is not None]
        ax2.hist(lat, bins=30)
    ax1.set(title="Model version published", xlabel="wall time (s)", ylabel="version")
    ax2.set(title="Publish latency (encode + produce + broker ack)", xlabel="ms", ylabel="versions")
    return _png(fig)


def write_report(path: Path, summary: dict, rows: list[dict], weights: list[dict]) -> Path:
    drift = summary.get("drift_event_time_ms")
    t0 = next((r["event_time_ms"] for r in rows if r.get("examples")), None)
    quality = quality_figure(rows, drift)
    (path.parent / "quality.png").write_bytes(base64.b64decode(quality))
    figures = [
        ("Model quality over event time", quality),
        ("Dynamic feature reweighting", weights_figure(weights, drift, t0)),
        ("Live refresh", versions_figure(rows)),
    ]
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v))}</td></tr>"
                    for k, v in summary.items())
    body = "".join(f"<h2>{html.escape(t)}</h2><img src='data:image/png;base64,{img}'/>" for t, img in figures)
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>ctr demo report</title>"
        "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto}td{padding:2px 12px}"
        "img{max-width:100%}</style></head><body><h1>ctr demo report</h1>"
        f"<table>{table}</table>{body}</body></html>"
    )
    return path
