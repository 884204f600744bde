"""The demo's HTML report: plots of what the stages recorded, embedded as PNG in one file.

* progressive AUC and log loss over event time: live model, frozen copy, ground truth, drift marked;
* field weights over event time, as published by the reweighting stage;
* model versions published and served over wall time; click -> served-score freshness probes;
* throughput of each stage (events into Kafka, examples trained, predictions served) and the
  serving latency distribution with p50/p99.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:  # the [report] extra; without it the report holds the summary table and no figures
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt
except ModuleNotFoundError:  # pragma: no cover - the dev install has it
    plt = None  # type: ignore[assignment]


def _png(fig: Any) -> str:  # a matplotlib Figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


_MODELS = (("", "live model", "-"), ("frozen_", "frozen copy", "--"), ("oracle_", "best achievable", ":"))


def live_window_rows(rows: list[dict], live_examples: int | None) -> list[dict]:
    """Learner rows with window metrics written while the stream was live (``examples <=
    live_examples``): after its end the final watermark flushes the last window's negatives at
    once, so a sliding window over them holds one class only (see ``ctr.demo.summarise``)."""
    return [r for r in rows if r.get("examples") and r.get("window_auc") is not None
            and (live_examples is None or r["examples"] <= live_examples)]  # fmt: skip


def quality_figure(rows: list[dict], drift_event_ms: int | None, live_examples: int | None = None) -> str:
    """Window metrics while the stream was live (:func:`live_window_rows`)."""
    rows = live_window_rows(rows, live_examples)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, metric, title in zip(axes, ("window_auc", "window_log_loss"), ("AUC", "log loss"), strict=True):
        if rows:
            t0 = rows[0]["event_time_ms"]
            for prefix, label, style in _MODELS:
                pts = [
                    ((r["event_time_ms"] - t0) / 1000, r[prefix + metric])
                    for r in rows
                    if r.get(prefix + metric) is not None
                ]
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
        spread = {
            f: max(w["weights"].get(f, 1.0) for w in weights) - min(w["weights"].get(f, 1.0) for w in weights)
            for f in fields
        }
        for f in sorted(fields, key=lambda name: spread[name], reverse=True)[:8]:
            ax.plot(x, [w["weights"].get(f, 1.0) for w in weights], label=f)
        if drift_event_ms is not None:
            ax.axvline((drift_event_ms - t0) / 1000, color="red", alpha=0.6, label="drift")
        ax.legend(fontsize=8, ncol=3)
    ax.set(
        title="Field weights published by the reweighting stage (8 that moved most)",
        xlabel="event time (s)",
        ylabel="weight (mean 1)",
    )
    return _png(fig)


@dataclass
class Timeline:
    """What the demo itself observed, in unix seconds: replay/learner progress samples
    ``(t, events replayed, examples trained)``, freshness probes ``(t, ProbeResult)``, the
    version of every served response ``(t, version)`` and every response's latency."""

    progress: list[tuple[float, int, int]] = field(default_factory=list)
    probes: list[tuple[float, Any]] = field(default_factory=list)
    served: list[tuple[float, int]] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)

    def start(self, rows: list[dict]) -> float:
        ts = [t for t, *_ in self.progress] + [r["wall_ms"] / 1000 for r in rows if r.get("wall_ms")]
        return min(ts) if ts else 0.0


def versions_figure(rows: list[dict], tl: Timeline) -> str:
    """Versions published (learner) and served (responses), and click -> served freshness."""
    pub = [r for r in rows if r.get("published") or r.get("snapshot")]
    t0 = tl.start(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.5))
    if pub:
        ax1.step(
            [r["wall_ms"] / 1000 - t0 for r in pub],
            [r["version"] for r in pub],
            where="post",
            label="published (learner)",
        )
    if tl.served:
        ax1.plot([t - t0 for t, _ in tl.served], [v for _, v in tl.served], ".", ms=3, label="served (responses)")
    ax1.legend(fontsize=8)
    ok = [(t - t0, r.fresh_s) for t, r in tl.probes if r.fresh_s is not None]
    missed = [t - t0 for t, r in tl.probes if r.fresh_s is None]
    if ok:
        ax2.plot(*zip(*ok, strict=True), "o", label="probe: clicks on a new ad -> its served score moved")
        ax2.axhline(sorted(f for _, f in ok)[len(ok) // 2], color="gray", ls="--", label="p50")
    if missed:
        ax2.plot(missed, [0] * len(missed), "rx", label="never moved (timeout)")
    ax2.legend(fontsize=8)
    ax1.set(title="Model version over time", xlabel="wall time (s)", ylabel="version")
    ax2.set(
        title="Freshness: click entering Kafka -> served score reflects it", xlabel="wall time (s)", ylabel="seconds"
    )
    return _png(fig)


def throughput_figure(rows: list[dict], tl: Timeline) -> str:
    """Events/s into Kafka and examples/s trained over time; serving latency distribution."""
    t0 = tl.start(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.5))
    p, lag = tl.progress, 4  # rates over ~2 s of 0.5 s samples: smooth enough to read
    for i, label in ((1, "events replayed into Kafka /s"), (2, "examples trained /s (join -> learner)")):
        pts = [((b[0] + a[0]) / 2 - t0, (b[i] - a[i]) / (b[0] - a[0]))
               for a, b in zip(p, p[lag:], strict=False) if b[0] > a[0]]  # fmt: skip
        if pts:
            ax1.plot(*zip(*pts, strict=True), label=label)
    if tl.served:
        ts = [t for t, _ in tl.served]
        edges = list(range(int(ts[0]), int(ts[-1]) + 2))
        counts, _ = np.histogram(ts, bins=edges)
        ax1.plot([e - t0 + 0.5 for e in edges[:-1]], counts, label="predictions served /s")
    ax1.legend(fontsize=8)
    ax1.set(title="Throughput of each stage", xlabel="wall time (s)", ylabel="per second", yscale="symlog")
    if tl.latency_ms:
        lat = np.asarray(tl.latency_ms)
        ax2.hist(lat, bins=50)
        for q, style in ((50, "--"), (99, ":")):
            v = float(np.percentile(lat, q))
            ax2.axvline(v, color="black", ls=style, label=f"p{q} {v:.1f} ms")
        ax2.legend(fontsize=8)
    ax2.set(title="Serving latency (/predict over loopback, 10 candidates)", xlabel="ms", ylabel="requests")
    return _png(fig)


def write_report(path: Path, summary: dict, rows: list[dict], weights: list[dict], tl: Timeline | None = None) -> Path:
    tl = tl or Timeline()
    drift = summary.get("drift_event_time_ms")
    t0 = next((r["event_time_ms"] for r in rows if r.get("examples")), None)
    figures = []
    if plt is not None:
        figures = [
            ("Model quality over event time", quality_figure(rows, drift, summary.get("live_examples")), "quality"),
            ("Dynamic feature reweighting", weights_figure(weights, drift, t0), "weights"),
            ("Live refresh and freshness", versions_figure(rows, tl), "freshness"),
            ("Throughput and serving latency", throughput_figure(rows, tl), "throughput"),
        ]
    for _, img, name in figures:  # also as files, for READMEs and slides
        (path.parent / f"{name}.png").write_bytes(base64.b64decode(img))
    table = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v))}</td></tr>" for k, v in summary.items()
    )
    body = "".join(f"<h2>{html.escape(t)}</h2><img src='data:image/png;base64,{img}'/>" for t, img, _ in figures)
    if plt is None:
        body = "<p>No figures: install the report extra (<code>pip install 'ctr-stream[report]'</code>).</p>"
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>ctr demo report</title>"
        "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto}td{padding:2px 12px}"
        "img{max-width:100%}</style></head><body><h1>ctr demo report</h1>"
        f"<table>{table}</table>{body}</body></html>"
    )
    return path
