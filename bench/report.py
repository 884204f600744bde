"""The README's benchmark tables, generated from the committed results (``ctr bench report``).

A figure in the README is only as good as the result behind it. Each table here is rendered
from one JSON file under ``bench/results/`` and written between ``<!-- name:begin -->`` and
``<!-- name:end -->`` markers, with a source line naming the file, the commit it measured, the
command and the load. ``ctr bench report --check`` (run by the test suite) fails when a table
in the docs differs from what its result renders -- a number edited by hand -- or when the
result was measured on uncommitted code or records no commit.

Add a table: write ``render(doc) -> str`` and a :class:`Table` entry in :data:`TABLES`, put the
markers in the README, run ``ctr bench report``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Table:
    """One generated block: ``marker`` in ``doc`` rendered from ``result`` -- one file (``render``
    gets its JSON) or several (``render`` gets ``{file: JSON}``)."""

    marker: str
    result: str | tuple[str, ...]
    render: Callable[[dict], str]
    doc: str = "README.md"

    @property
    def results(self) -> tuple[str, ...]:
        return (self.result,) if isinstance(self.result, str) else self.result


def source_line(doc: dict, result: str) -> str:
    """Where a table's numbers come from: the file, commit, command, load and when."""
    commit = (doc.get("commit") or "unknown")[:7]
    load = doc.get("load_avg_start"), doc.get("load_avg_end")
    load_txt = f", load {load[0][0]:.2f} -> {load[1][0]:.2f}" if all(load) else ""
    at = f", {doc['at'][:10]}" if doc.get("at") else ""
    if doc.get("busy_cores"):
        load_txt += f", {doc['busy_cores']} core(s) kept busy"
    return f"<sub>`{result}` · commit `{commit}` · `{doc.get('command', '?')}`{load_txt}{at}</sub>"


def _md(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(r) + " |" for r in rows)])  # fmt: skip


def _verdict(met: object) -> str:
    return "met" if met else "**not met**"


def _click_freshness_met(r: dict) -> bool:
    """A ``ctr bench freshness`` row against its own targets (every probe moved the score)."""
    return r["p50_s"] <= r["target_p50_s"] and r["p99_s"] <= r["target_p99_s"] and not r["missed"]


def _feature_freshness_met(r: dict) -> bool:
    """The freshness row of ``ctr bench stream`` against its target (every probe seen)."""
    return r["p99_s"] <= r["target_p99_s"] and r["visible"] == r["probes"]


def _quality(doc: dict) -> str:
    from bench.quality import markdown_table

    return markdown_table(doc)


def _ablation(doc: dict) -> str:
    from bench.ablation import markdown_table

    return markdown_table(doc)


def _chaos(doc: dict) -> str:
    from bench.chaos import markdown_table

    return markdown_table(doc)


def _num(v: object, fmt: str = "{:,}") -> str:
    return "" if v is None else fmt.format(v)


def _speed_verdict(doc: dict) -> str:
    target = f"Speed target {doc.get('target_examples_per_s', 0):,} examples/s end to end"
    if "meets_speed_target_from_first_event" not in doc:  # results from before the sustained rate
        return f"{target}: {_verdict(doc.get('meets_speed_target'))}."
    return (f"{target}, sustained (polls after the learner's updates reached full size): "
            f"{_verdict(doc['meets_speed_target'])}; over the whole run from a fresh model: "
            f"{_verdict(doc['meets_speed_target_from_first_event'])}.")  # fmt: skip


def _learner(doc: dict) -> str:
    rows = []
    for r in doc["rows"]:
        if "auc" not in r:
            continue
        ours = r["learner"].startswith("ctr-stream")
        speed = _num(r.get("examples_per_s"))
        if r.get("step_examples_per_s"):
            speed += f" end to end from a fresh model; {r['step_examples_per_s']:,} model step"
        if r.get("sustained_examples_per_s"):
            speed += f"; **{r['sustained_examples_per_s']:,} sustained**"
        name, auc, ll = r["learner"], f"{r['auc']:.3f}", f"{r['log_loss']:.3f}"
        if ours:
            name, auc, ll = f"**{name}**", f"**{auc}**", f"**{ll}**"
        rows.append([name, f"{r['examples']:,}", speed, auc, ll,
                     f"{r['auc_prefix']:.3f} / {r['log_loss_prefix']:.3f}", r.get("note", "")])  # fmt: skip
    lines = [_md(["learner", "examples", "examples/s", "AUC", "log loss", "AUC / log loss, first 20k", "note"], rows),
             "", _speed_verdict(doc)]
    pubs = [[r["learner"], str(r["publishes"]), f"{r['rows_per_delta_p50']:,}", f"{r['bytes_per_delta_p50']:,}",
             f"{r['publish_ms_p50']} / {r['publish_ms_p99']}"] for r in doc["rows"] if "publishes" in r]  # fmt: skip
    if pubs:
        lines += ["", _md(["publishing", "publishes", "rows per delta p50", "bytes per delta p50",
                           "publish p50 / p99 ms"], pubs)]  # fmt: skip
    return "\n".join(lines)


#: ``ctr worker --emission`` settings in bench/served_bias.py's rows, as the README names them
_EMISSIONS = (
    ("window", "`window`: every example when its window closes"),
    ("emit-on-click", "`click`: a positive at its click, a negative when its window closes"),
    ("provisional", "`provisional --negative-after-ms 0`: every impression at once, "
                    "its click as a correction"),
    ("provisional after 5 s", "**`provisional` (default, 5 s)**: an unclicked impression after 5 s, "
                              "its later click as a correction"),
)  # fmt: skip


def _served_bias(doc: dict) -> str:
    by = {(r["mode"], r["data"]): r for r in doc["rows"]}
    datas = list(dict.fromkeys(r["data"] for r in doc["rows"]))
    head = ["`ctr worker --emission`"] + [f"{d}: served AUC / log loss / mean p ÷ click rate / running rate's log loss"
                                          for d in datas]  # fmt: skip
    rows = []
    for mode, label in _EMISSIONS:
        cells = [label]
        for d in datas:
            r = by.get((mode, d))
            running = f" / {r['running_mean_log_loss']:.4f}" if r and r.get("running_mean_log_loss") else ""
            cells.append("" if r is None else f"{r['served_auc']:.4f} / {r['served_log_loss']:.4f} / "
                                               f"{r['served_mean_p_over_rate']:.3f}{running}")  # fmt: skip
        rows.append(cells)
    note = ("Running rate: every earlier impression's final label, known at once -- a bar above any real running "
            "rate -- scored on the same served impressions.")
    return f"{_md(head, rows)}\n\n{note}"


def _demo(doc: dict) -> str:
    s = doc["summary"]
    rows = [
        ("events / impressions / clicks (probe impressions + clicks included)",
         f"{s['events']:,} / {s['impressions']:,} / {s['clicks']:,}"),
        ("impressions trained (one first example each; corrections on top)", f"{s['examples']:,}"),
        (f"**served scores** (scored as shown, joined to the final label): AUC / log loss, live model, all "
         f"{s['served_examples']:,}", f"**{s['served_auc']:.3f} / {s['served_logloss']:.3f}**"),
        (f"the same, on the {s['paired_served_examples']:,} impressions served once the frozen copy existed: "
         "live / frozen copy", f"**{s['paired_served_auc']:.3f} / {s['paired_served_logloss']:.3f}** vs "
         f"{s['frozen_served_auc']:.3f} / {s['frozen_served_logloss']:.3f}"),
        ("progressive (predict-then-learn) AUC, cumulative (log loss)",
         f"{s['progressive_auc']:.3f} ({s['progressive_logloss']:.3f})"),
        ("window AUC at the end of the live stream: live / frozen / best achievable (progressive)",
         f"{s['window_auc_end']:.3f} / {s['frozen_window_auc_end']:.3f} / {s['best_window_auc_end']:.3f}"),
        ("model versions published (1 s interval) and served; withheld by the gate; publish p50",
         f"{s['model_versions_published']} and {s['model_versions_served']}; {s['gate_withheld']}; "
         f"{s['publish_p50_ms']:.0f} ms"),
        ("**freshness, click entering Kafka -> served score moved**",
         f"p50 {s['freshness_p50_s']:.2f} s, p99 {s['freshness_p99_s']:.2f} s ({s['freshness_trials']} probes, "
         f"{s['freshness_missed']} missed)"),
        ("predictions served (20 req/s, 10 candidates), errors", f"{s['predictions']:,}, {s['prediction_errors']}"),
        ("serving latency p50 / p99, everything on the same 2 cores",
         f"{s['serving_p50_ms']:.1f} / {s['serving_p99_ms']:.1f} ms"),
        ("dead letters; exit codes of all stages",
         f"{s['dead_letters']}; " + ("all 0" if not any(s["exit_codes"].values()) else str(s["exit_codes"]))),
    ]  # fmt: skip
    return _md(["metric", "value"], [list(r) for r in rows])


def _replay(doc: dict) -> str:
    rows = []
    for r in doc["rows"]:
        rate = f"{r['events_per_s']:,}"
        rows.append([r["stage"], f"**{rate}**" if r["stage"].startswith("replay path") else rate])
    target = f"{doc['target_events_per_s']:,} events/s"
    note = f"Target: the replay path at {target}: {_verdict(doc['meets_target'])}."
    return f"{_md(['stage', 'events/s'], rows)}\n\n{note}"


def _hashing(doc: dict) -> str:
    rows = [[r["impl"], f"{r['Mhash/s best']:,.1f}", f"{r['Mhash/s median']:,.1f}"] if "Mhash/s best" in r
            else [r["impl"], f"{r['Mvalues/s']:,.2f} M strings/s", ""] for r in doc["rows"]]  # fmt: skip
    note = (f"Target {doc['target_cpu_hashes_per_s'] / 1e6:,.0f} M hashes/s on one core (CPU twin, best of the "
            f"repeats): {_verdict(doc['cpu_twin_meets_target'])}; twin / torch: {doc['speedup_twin_vs_torch']:.1f}x.")
    return f"{_md(['implementation', 'M hashes/s best', 'median'], rows)}\n\n{note}"


def _learner_core(doc: dict) -> str:
    tp = [[str(r["threads"]), f"{r['batch']:,}", f"{r['examples/s']:,.0f}", f"{r['best slice']:,.0f}"]
          for r in doc["rows"] if r["section"].startswith("throughput")]  # fmt: skip
    acc = [[r["embedding"], r.get("numeric", ""), f"{r['table_MB']:g}" if "table_MB" in r else "",
            f"{r['auc']:.3f}", f"{r['auc_last']:.3f}", f"{r['log_loss']:.4f}" if "log_loss" in r else ""]
           for r in doc["rows"] if r["section"].startswith("accuracy")]  # fmt: skip
    parts = []
    if tp:
        parts.append(_md(["torch threads", "batch", "examples/s", "best slice"], tp))
    if acc:
        parts.append(_md(["embedding", "numeric", "table MB", "AUC", "AUC, last part", "log loss"], acc))
    return "\n\n".join(parts)


def _flink(doc: dict) -> str:
    rows = [[r["name"], f"{r['events']:,}", f"{r['events_per_s']:,.0f}", f"{r['cpu_s']:,.1f}" if "cpu_s" in r else "",
             f"{r['events_per_cpu_s']:,.0f}" if "events_per_cpu_s" in r else "",
             f"{r['output_rows']:,}" if "output_rows" in r else ""] for r in doc["rows"]]  # fmt: skip
    return _md(["run", "events", "events/s", "CPU s", "events per CPU s", "output rows"], rows)


def _version_apply(doc: dict) -> str:
    rows = [[f"2^{r['table_bits']} ({r['table_rows']:,})", f"{r['touched_rows']:,}", r["registry"],
             r["copied_rows"] if isinstance(r["copied_rows"], str) else f"{r['copied_rows']:,}",
             f"{r['build_ms_p50']:,.2f}", f"{r['build_ms_max']:,.2f}"] for r in doc["rows"]]  # fmt: skip
    return _md(["table rows", "rows touched per version", "registry", "rows copied", "build ms p50", "max"], rows)


def _serving(doc: dict) -> str:
    default = next(r["features"] for r in doc["rows"])  # the first mode is the default one
    fixed = sorted({r["rate_rps"] for r in doc["rows"] if r["kind"] == "fixed"})
    many = any(r.get("workers", 1) != 1 for r in doc["rows"])  # ctr serve --workers N rows: a column more
    head = ["features", *(["workers"] if many else []), "candidates",
            "capacity: req/s at p99 <= 10 ms, with updates", "wrk saturation req/s"]
    head += [f"p50 / p99 ms at {rate:g} req/s, {how}" for rate in fixed for how in ("no updates", "with updates")]
    rows = []
    for feats, workers in dict.fromkeys((r["features"], r.get("workers", 1)) for r in doc["rows"]):
        mine = [r for r in doc["rows"] if r["features"] == feats and r.get("workers", 1) == workers]
        caps = doc.get("capacity_by_workers", {}).get(str(workers)) or (doc["capacity"] if workers == 1 else {})
        for n in dict.fromkeys(r["candidates"] for r in mine):
            cap = caps.get(str(n)) if feats == default else None
            sat = (cap or {}).get("wrk_saturation") or {}
            best = (cap or {}).get("rps_at_p99_bar")
            split = "/".join(f"{v:.2f}" for v in sat.get("worker_share", {}).values())
            line = [feats, *([str(workers)] if many else []), str(n),
                    "" if not cap else f"{best:,.0f}" if best else "none of the offered rates",
                    f"{sat['rps']:,.0f} (p99 {sat.get('p99_ms', 0):,.1f} ms{'; split ' + split if split else ''})"
                    if "rps" in sat else ""]
            for rate in fixed:
                for updates in (False, True):
                    r = next((r for r in mine if r["candidates"] == n and r["kind"] == "fixed"
                              and r["rate_rps"] == rate and r["updates"] == updates), None)
                    line.append(f"{r['p50_ms']:,.1f} / {r['p99_ms']:,.1f}" + (f" ({r['errors']} errors)" if r["errors"]
                                                                              else "") if r else "")
            rows.append(line)
    lines = [_md(head, rows)]
    if doc.get("targets"):
        lines += ["", *(f"Target: {t['what']}: {t['measured']}, {_verdict(t['met'])}." for t in doc["targets"])]
    return "\n".join(lines)


def _serving_workers(doc: dict) -> str:
    """One worker (pinned) and ``--workers 2`` from the same run; the bars are judged on the
    serving table's own run."""
    return _serving({**doc, "targets": []})


def _inference(doc: dict) -> str:
    rows = [[r["model"], str(r["candidates"]), f"{r['torch_us']:,.0f}", f"{r['numpy_us']:,.0f}",
             f"{r['speedup']:.1f}x", f"{r['max_abs_diff']:.1e}"] for r in doc["rows"]]  # fmt: skip
    return _md(["model", "candidates", "torch us/call", "NumPy us/call", "NumPy faster by", "max abs diff"], rows)


def _signing(doc: dict) -> str:
    rows = [[f"{r['rows']:,}", f"{r['bytes'] / 1e6:.2f}", f"{r['sign_ms']:.3f}", f"{r['verify_ms']:.3f}",
             f"{r['decode_with_checksum_ms']:.3f}", f"{r['decode_after_verify_ms']:.3f}"]
            for r in doc["rows"]]  # fmt: skip
    t = doc["target"]
    table = _md(["delta rows", "MB", "sign ms", "verify ms", "decode ms, unsigned (checksum)",
                 "decode ms, after verify"], rows)  # fmt: skip
    return f"{table}\n\nTarget: {t['what']}: {t['added_ms']:.2f} ms, {_verdict(t['met'])}."


def _freshness(doc: dict) -> str:
    rows = []
    for r in doc["rows"]:
        met = _click_freshness_met(r)
        rows.append([str(r["trials"]), str(r["missed"]), f"**{r['p50_s']:.2f}**", f"**{r['p99_s']:.2f}**",
                     f"{r['max_s']:.2f}", f"p50 <= {r['target_p50_s']:g} s, p99 <= {r['target_p99_s']:g} s: "
                     f"{_verdict(met)}"])  # fmt: skip
    return _md(["trials", "missed", "p50 s", "p99 s", "max s", "target"], rows)


def _feast_io(doc: dict) -> str:
    """One row per (op, method, rows), a column pair per online store (SQLite, Redis side by side)."""
    stores = list(dict.fromkeys(r.get("store", "sqlite") for r in doc["rows"]))
    cells: dict[tuple[str, str, int], dict[str, dict]] = {}
    for r in doc["rows"]:
        cells.setdefault((r["op"], r["method"], r["rows"]), {})[r.get("store", "sqlite")] = r

    def pair(r: dict | None) -> list[str]:
        if r is None:
            return ["", ""]
        return [f"{r['rows_per_s']:,.0f}" if r.get("rows_per_s") else "", f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}"]

    rows = [[op, method, f"{n:,}", *(c for s in stores for c in pair(by.get(s)))]
            for (op, method, n), by in cells.items()]  # fmt: skip
    head = ["op", "method", "rows", *(h for s in stores for h in (f"{s} rows/s", f"{s} p50 / p99 ms"))]
    return _md(head, rows)


def _stream(doc: dict) -> str:
    rows = []
    for r in doc["rows"]:
        name = r["name"]
        if "events_per_s" in r:
            target = r.get("target_events_per_s")
            verdict = f"{target:,} events/s: {_verdict(r['events_per_s'] >= target)}" if target else ""
            per_event = r.get("changelog_bytes_per_event")
            extra = f" ({per_event} changelog B/event)" if per_event else ""
            if r.get("all_in_feast_s"):  # the store's side: when the last count was in it
                extra += (f"; every count in Feast after {r['all_in_feast_s']:.1f} s = "
                          f"{r['all_in_feast_events_per_s']:,.0f} events/s")  # fmt: skip
            rows.append([name, f"{r['events_per_s']:,.0f} events/s{extra}", verdict])
        elif "rows_per_s" in r:
            rows.append([name, f"{r['rows_per_s']:,.0f} rows/s", ""])
        elif "p99_s" in r:
            rows.append([f"{name}, {r['probes']:,} probes at {r['rate_events_per_s']:,.0f} events/s",
                         f"p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s ({r['visible']:,} seen)",
                         f"p99 <= {r['target_p99_s']:g} s: {_verdict(_feature_freshness_met(r))}"])  # fmt: skip
    return _md(["row", "result", "target"], rows)


def _durability(doc: dict) -> str:
    """``ctr bench durability``: per store and kill, acknowledged rows vs rows read back."""
    rows = []
    for r in doc["rows"]:
        age = f"{r['lost_oldest_ack_s']:.1f} s" if r.get("lost_oldest_ack_s") is not None else ""
        rows.append([r["store"], r["persistence"], r["killed"], f"{r['run_s']:.1f} s", f"{r['acked']:,}",
                     f"**{r['lost']:,}**" if r["lost"] else "0", age, f"{r['unacked_present']:,}"])  # fmt: skip
    return _md(["store", "persistence", "killed (kill -9 unless SIGTERM)", "writing for", "rows acknowledged", "lost",
                "oldest lost row acknowledged before the kill", "unacknowledged rows read back"], rows)  # fmt: skip


def _reliability(doc: dict) -> str:
    rows = []
    for r in doc["rows"]:
        notes = [r["notes"]] if r.get("notes") else []
        if "p99_ms" in r:
            notes.append(f"p50 / p99 {r['p50_ms']} / {r['p99_ms']} ms")
        if "peak_rss_mb" in r:
            notes.append(f"peak RSS {r['peak_rss_mb']:,.0f} MB")
        rows.append([r["scenario"], f"{r['injected']:,}", str(r["lost"]), str(r["lost_by_design"]),
                     str(r["crashes"]), "; ".join(notes)])  # fmt: skip
    lost, crashes = doc["total_lost"], doc["total_crashes"]
    note = f"Target: {doc['target']}: {_verdict(lost == 0 and crashes == 0)} (lost {lost}, crashes {crashes})."
    return f"{_md(['scenario', 'injected', 'lost', 'lost by design', 'crashes', 'notes'], rows)}\n\n{note}"


def _target_rows(name: str, d: dict) -> list[tuple[str, str, object]]:
    """The targets one result states: (target, measured, met) -- the verdict the bench computed,
    or that follows from its numbers."""
    rows: list[tuple[str, str, object]] = []

    def add(what: str, got: str, met: object) -> None:
        rows.append((what, got, met))

    if name.endswith("replay.json"):
        add(f"replay path >= {d['target_events_per_s']:,} events/s",
            f"{d['replay_path_events_per_s']:,}", d["meets_target"])  # fmt: skip
    elif name.endswith("hashing.json"):
        best = max(r["Mhash/s best"] for r in d["rows"] if r["impl"].startswith("twin"))
        add(f"CPU hashing >= {d['target_cpu_hashes_per_s'] / 1e6:,.0f} M/s on one core",
            f"{best:,.0f} M/s", d["cpu_twin_meets_target"])  # fmt: skip
    elif name.endswith("serving.json"):
        for t in d.get("targets", []):  # the bars the bench judged
            add(t["what"], t["measured"], t["met"])
    elif name.endswith("learner.json"):
        ours = next(r for r in d["rows"] if r["learner"].startswith("ctr-stream"))
        got = f"{ours['examples_per_s']:,}"
        if "sustained_examples_per_s" in ours:
            got = f"{ours['sustained_examples_per_s']:,} sustained; {got} from a fresh model"
        add(f"learner >= {d['target_examples_per_s']:,} examples/s end to end", got,
            d["meets_speed_target"])  # fmt: skip
    elif name.endswith("quality.json"):
        met = [k for k, v in d["verdicts"].items() if v["met"]]
        add("learner on every log: below the running mean, level with the best peer, calibrated",
            f"{len(met)} of {len(d['verdicts'])} logs", d["meets_target"])  # fmt: skip
    elif name.endswith("stream.json"):
        # comparison rows are no target: inline changelogs, an online store other than the default
        for r in d["rows"]:
            if r.get("online_store", "sqlite") != "sqlite":
                continue
            if r.get("target_events_per_s") and "inline" not in r["name"]:
                add(f"{r['name']} >= {r['target_events_per_s']:,} events/s",
                    f"{r['events_per_s']:,.0f}", r["events_per_s"] >= r["target_events_per_s"])  # fmt: skip
            elif r.get("target_p99_s"):
                add(f"feature freshness p99 <= {r['target_p99_s']:g} s at {r['rate_events_per_s']:,.0f} "
                    "events/s", f"p99 {r['p99_s']:.2f} s", _feature_freshness_met(r))  # fmt: skip
    elif name.endswith("reliability.json"):
        add(f"reliability bench: {d['target']}", f"lost {d['total_lost']}, crashes {d['total_crashes']}",
            d["total_lost"] == 0 and d["total_crashes"] == 0)  # fmt: skip
    elif name.endswith("chaos.json"):
        clean = sum(1 for r in d["rows"] if r.get("discrepancies") == 0)
        add(f"chaos: {d['target']}", f"{clean} of {len(d['rows'])} seeds", d["met"])
    elif name.endswith("freshness.json"):
        r = d["rows"][0]
        add(f"click -> served score p50 <= {r['target_p50_s']:g} s, p99 <= {r['target_p99_s']:g} s",
            f"p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s", _click_freshness_met(r))  # fmt: skip
    return rows


def _targets(docs: dict[str, dict]) -> str:
    """Every target a result states, one row per target -- the status of the project's
    measurable promises -- with the same bench's result with one core kept busy beside it
    (``ctr bench --busy-cores 1 ...`` into ``bench/results/loaded/``), where one was run."""
    loaded = {Path(n).name: d for n, d in docs.items() if n.startswith(LOADED_DIR)}
    rows = []
    for name, d in docs.items():
        if name.startswith(LOADED_DIR):
            continue
        busy = {what: (got, met) for what, got, met in _target_rows(name, loaded[Path(name).name])} \
            if Path(name).name in loaded else {}  # fmt: skip
        for what, got, met in _target_rows(name, d):
            if d.get("busy_cores"):  # the bench loads the machine itself
                other = f"{d['busy_cores']} kept busy in this run"
            elif Path(name).stem in LOAD_INDEPENDENT:
                other = "the same (its target times nothing)"
            elif what in busy:
                other = f"{busy[what][0]} ({_verdict(busy[what][1])})"
            else:
                other = "not run"
            rows.append([what, got, _verdict(met), other, f"`{name}`"])
    return _md(["target", "measured", "verdict", "one core busy", "result"], rows)


#: Results that state targets, and where their loaded variants go (same file name).
TARGET_RESULTS = tuple(f"bench/results/{n}.json" for n in (
    "replay", "hashing", "learner", "quality", "serving", "freshness", "stream", "reliability", "chaos"))  # fmt: skip
LOADED_DIR = "bench/results/loaded/"
#: Results whose targets time nothing (prediction quality, learned in a fixed order): a loaded
#: machine changes none of their verdicts.
LOAD_INDEPENDENT = frozenset({"quality"})


#: The README's Status table: per component, what is built (prose: no figures, no verdicts) and
#: the results whose targets decide its verdict (generated, like every number in the table).
STATUS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("foundation: packaging, CLI, embedded broker, schema, dead letters, datasets, replay",
     "done", ("replay",)),
    ("stream processing: label join, windowed features -> Feast, field reweighting",
     "built and tested", ("stream",)),
    ("online learner: hashing, unified embedding, trainer, publisher, gate",
     "built; GPU kernel verified under the CUDA simulator and by PTX compilation, not timed (no GPU); "
     "calibrated from the first event on real logs (`ctr bench quality`); served scores unbiased by the "
     "label order (provisional emission, \"Label emission\")", ("hashing", "learner", "quality")),
    ("serving: /predict, live refresh, rollback", "built; /predict answered in front of FastAPI, candidates' "
     "fields keyed from the request bytes in one compiled pass, concurrent requests batched into one "
     "NumPy forward per version; `--workers N` HTTP workers over one shared-memory "
     "copy of each version, one updater; "
     "only updates signed by the learner's key applied (\"Signed model updates\")", ("serving", "freshness")),
    ("end-to-end demo", "broker + worker + reweighter + learner + serving, a steady prediction client and "
     "freshness probes, live view, summary, HTML report (quality, reweighting, freshness, throughput, "
     "latency), `ctr up/down/status`", ()),
    ("reliability", "fault, bad-input (hypothesis), load and security tests; `ctr bench reliability` "
     "([docs/reliability.md](docs/reliability.md)); `ctr bench chaos` (broker restarted twice, every stage "
     "kill -9'd, one core busy; \"Delivery semantics\"); agents that keep input offsets refuse a consumer "
     "that skips (contiguity guard)", ("reliability", "chaos")),
    ("PyFlink windowed-feature job", "same aggregates as the Faust agent from the same spec (parity test in "
     "CI, own venv `make flink-setup`); slower than Faust on this machine "
     "([streams/flink/README.md](streams/flink/README.md))", ()),
    ("docker-compose production shape", "Kafka (KRaft) with SASL/SCRAM and ACLs (a user per service), Redis "
     "with ACL users, Faust workers, learner, serving replicas behind nginx, Feast server, Prometheus, Grafana, "
     "optional Flink; every client's security from one config (`infra/security.py`); validated by "
     "`docker-compose config` in CI, never run here (no Docker engine) ([docs/deployment.md](docs/deployment.md))",
     ()),
)  # fmt: skip


def _status(docs: dict[str, dict]) -> str:
    """The Status table: each component's targets and their verdicts, from its results."""
    rows = []
    for component, built, names in STATUS:
        targets = [t for n in names for t in _target_rows(f"bench/results/{n}.json", docs[f"bench/results/{n}.json"])]
        missed = [f"{what} ({got})" for what, got, met in targets if not met]
        if not targets:
            verdict = "no measured target"
        elif not missed:
            verdict = f"all {len(targets)} met"
        else:
            verdict = f"{len(targets) - len(missed)} of {len(targets)} met; **not met**: " + "; ".join(missed)
        rows.append([component, built, verdict])
    return _md(["component", "built", "targets (table below)"], rows)


def _loaded(results: tuple[str, ...]) -> tuple[str, ...]:
    """The committed loaded variants of ``results`` (``ctr bench --busy-cores 1 ... --json
    bench/results/loaded/NAME.json``)."""
    return tuple(p for r in results if (ROOT / (p := LOADED_DIR + Path(r).name)).exists())


TABLES: tuple[Table, ...] = (
    Table("demo-table", "bench/results/demo_summary.json", _demo),
    Table("served-bias-table", "bench/results/served_bias.json", _served_bias),
    Table("chaos-table", "bench/results/chaos.json", _chaos),
    Table("quality-table", "bench/results/quality.json", _quality),
    Table("learner-table", "bench/results/learner.json", _learner),
    Table("ablation-table", "bench/results/ablation.json", _ablation),
    Table("replay-table", "bench/results/replay.json", _replay),
    Table("hashing-table", "bench/results/hashing.json", _hashing),
    Table("feast-io-table", "bench/results/feast_io.json", _feast_io),
    Table("feast-io-table", "bench/results/feast_io.json", _feast_io, doc="features/README.md"),
    Table("serving-table", "bench/results/serving.json", _serving),
    Table("serving-workers-table", "bench/results/serving_workers.json", _serving_workers),
    Table("inference-table", "bench/results/inference.json", _inference),
    Table("signing-table", "bench/results/signing.json", _signing),
    Table("version-apply-table", "bench/results/version_apply.json", _version_apply),
    Table("learner-core-table", "bench/results/learner_core.json", _learner_core),
    Table("flink-table", "bench/results/flink.json", _flink),
    Table("flink-table", "bench/results/flink.json", _flink, doc="streams/flink/README.md"),
    Table("freshness-table", "bench/results/freshness.json", _freshness),
    Table("stream-table", "bench/results/stream.json", _stream),
    Table("reliability-table", "bench/results/reliability.json", _reliability),
    Table("durability-table", "bench/results/online_durability.json", _durability),
    Table("status-table", TARGET_RESULTS, _status),
    Table("targets-table", TARGET_RESULTS + _loaded(TARGET_RESULTS), _targets),
)


def block(table: Table, root: Path = ROOT) -> str:
    """The text a table's markers must hold: the rendered result and its source line(s)."""
    docs = {r: json.loads((root / r).read_text()) for r in table.results}
    if isinstance(table.result, str):
        return f"{table.render(docs[table.result])}\n\n{source_line(docs[table.result], table.result)}"
    return table.render(docs) + "\n\n" + "<br>\n".join(source_line(d, r) for r, d in docs.items())


def _split(text: str, marker: str) -> tuple[str, str, str]:
    """``text`` around a marker pair: (through the begin marker's line, the block, from the end
    marker on). A missing or unbalanced pair raises ``KeyError``."""
    begin, end = f"<!-- {marker}:begin -->\n", f"<!-- {marker}:end -->"
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise KeyError(f"no {marker} markers")
    head, rest = text.split(begin, 1)
    inner, tail = rest.split(end, 1)
    return head + begin, inner.removesuffix("\n"), end + tail


def problems(root: Path = ROOT, tables: tuple[Table, ...] = TABLES) -> list[str]:
    """What is wrong with the generated tables in the docs (empty: all true to their results)."""
    out = []
    for t in tables:
        for result in t.results:
            doc = json.loads((root / result).read_text())
            if not doc.get("commit") or doc.get("dirty") is not False:
                out.append(f"{result}: measured on uncommitted or unknown code (commit {doc.get('commit')!r}, "
                           f"dirty {doc.get('dirty')!r}); rerun it on a clean tree")  # fmt: skip
        try:
            _, inner, _ = _split((root / t.doc).read_text(), t.marker)
        except KeyError as err:
            out.append(f"{t.doc}: {err.args[0]}")
            continue
        if inner != block(t, root):
            out.append(f"{t.doc}: the {t.marker} block differs from {t.result} (run `ctr bench report`)")
    return out


def write(root: Path = ROOT, tables: tuple[Table, ...] = TABLES) -> list[str]:
    """Rewrite every table block from its result; returns the markers that changed."""
    changed = []
    for t in tables:
        path = root / t.doc
        head, inner, tail = _split(path.read_text(), t.marker)
        new = block(t, root)
        if new != inner:
            path.write_text(f"{head}{new}\n{tail}")
            changed.append(t.marker)
    return changed
