"""The scenarios of ``bench/reliability.py``; each returns table rows with the same columns:
``scenario``, ``injected``, ``lost`` (a promise broken: acknowledged then gone, applied when it
must not be), ``lost_by_design`` (what the broker's storage is documented not to keep),
``crashes`` (an unexpected exception or a 5xx), and ``notes``."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

from ctr.infra.broker import EmbeddedBroker
from ctr.infra.kafka_io import DeliveryTracker, make_consumer, make_producer, produce
from ctr.infra.procs import free_port
from ctr.infra.schema import SchemaError, decode_click, decode_impression, decode_training_example, encode
from ctr.streams.datasets import CriteoSource, open_source

SMALL = dict(n_categorical=8, n_numeric=3, n_informative=4, n_drift_fields=2)


def _row(scenario: str, injected: int, lost: int | None = 0, crashes: int = 0, by_design: int = 0,
         notes: str = "", **extra: object) -> dict:
    return {"scenario": scenario, "injected": injected, "lost": lost, "lost_by_design": by_design,
            "crashes": crashes, "notes": notes, **extra}


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    how = rng.choice(["flip", "truncate", "splice", "retype", "oversize"])
    if how == "flip":
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= rng.randint(1, 255)
    elif how == "truncate":
        buf = buf[: rng.randrange(len(buf))]
    elif how == "splice":
        at = rng.randrange(len(buf) + 1)
        buf[at:at] = rng.randbytes(rng.randint(1, 16))
    elif how == "retype":
        try:
            doc = json.loads(data)
            key = rng.choice(sorted(doc))
            doc[key] = rng.choice([None, "x", -1, 2**70, [1], {"a": 1}, 1.5, True, "\ud800"])
            return json.dumps(doc).encode("utf-8", "surrogatepass")
        except (ValueError, TypeError, IndexError):
            return bytes(buf[:-1])
    else:
        buf += b" " * (70 * 1024)
    return bytes(buf)


# ----------------------------------------------------------------------------- bad input
def bad_events(rng: random.Random, n: int) -> list[dict]:
    """Mutated impressions/clicks/examples through the stages' decoders: SchemaError or a valid event."""
    recs = list(open_source("synthetic", seed=5, events=300, **SMALL))
    goods = [encode(r.impression) for r in recs] + [encode(c) for r in recs if (c := r.click())]
    rejected = accepted = crashes = 0
    for _ in range(n):
        raw = _mutate(rng, rng.choice(goods))
        for dec in (decode_impression, decode_click, decode_training_example):
            try:
                dec(raw)
                accepted += 1
            except SchemaError:
                rejected += 1
            except Exception:  # noqa: BLE001 - the count is the result
                crashes += 1
    return [_row("bad input: event decoders", n, crashes=crashes,
                 notes=f"{rejected} SchemaError (-> dead-letter), {accepted} still valid")]


def bad_updates(rng: random.Random, n: int) -> list[dict]:
    """Corrupted model updates through a replica's per-message path: none applied, all counted."""
    import torch

    from ctr.online_learner.delta import delta_tensors, snapshot_tensors
    from ctr.online_learner.model import CTRModel, ModelConfig
    from ctr.online_learner.update_format import UpdateHeader, split_delta
    from ctr.serving.registry import ModelRegistry
    from ctr.serving.updates import REJECTED, SKIPPED, UpdateConsumer

    cfg = ModelConfig(("site", "user_id", "item_id"), ("I1",), table_bits=9)
    reg, model = ModelRegistry(), CTRModel(cfg)
    reg.install_snapshot(UpdateHeader(kind="snapshot", model_id="m", version=1, base_version=1,
                                      model_config=cfg.to_dict()), snapshot_tensors(model))
    with torch.no_grad():
        model.table[:40] += 0.25
    parts = split_delta(UpdateHeader(kind="delta", model_id="m", version=2, base_version=1),
                        delta_tensors(model, np.arange(40)), max_bytes=4500)
    consumer = UpdateConsumer(reg, "127.0.0.1:9")

    def counted() -> float:
        return sum(s.value for c in (REJECTED, SKIPPED) for m in c.collect() for s in m.samples
                   if s.name.endswith("_total"))

    before, applied, crashes = counted(), 0, 0
    for _ in range(n):
        bad = _mutate(rng, rng.choice(parts))
        try:
            consumer._handle(bad)
        except Exception:  # noqa: BLE001
            crashes += 1
        if reg.head.version != 1:
            applied += 1
    not_counted = n - int(counted() - before)
    for p in parts:  # the stream is not poisoned: the real version still applies
        consumer._handle(p)
    return [_row("bad input: model updates (serving path)", n, lost=applied, crashes=crashes + not_counted,
                 notes=f"applied {applied}, uncounted {not_counted}; valid v2 afterwards: "
                       f"{'applied' if reg.head.version == 2 else 'NOT applied'}")]


def bad_datasets(rng: random.Random, tmp: Path, files: int) -> list[dict]:
    """Hostile Criteo files: rows yielded are valid events, the rest skipped and counted."""
    good = ["1", *[str(i) for i in range(13)], *[f"{i:08x}" for i in range(26)]]
    junk = ["", '"', "\t", "\r", "\x00", "nan", "inf", "1e400", "²", "x" * 300, "\udcff"]
    rows_total = yielded = skipped = invalid = crashes = refused = 0
    for f in range(files):
        lines = []
        for _ in range(rng.randint(1, 40)):
            row = list(good)
            for _ in range(rng.randint(0, 3)):
                row[rng.randrange(len(row))] = rng.choice(junk)
            lines.append("\t".join(row).encode("utf-8", "surrogateescape"))
        path = tmp / f"hostile-{f}.txt"
        path.write_bytes(b"\n".join(lines))
        rows_total += len(lines)
        try:
            src = CriteoSource(path, delimiter="\t")
            for ex in src:
                yielded += 1
                try:
                    decode_impression(encode(ex.impression))
                except SchemaError:
                    invalid += 1
            skipped += src.skipped.total
        except ValueError:
            refused += 1
        except Exception:  # noqa: BLE001
            crashes += 1
    return [_row("bad input: dataset reader files", files, lost=invalid, crashes=crashes,
                 notes=f"{rows_total} rows: {yielded} yielded, {skipped} skipped+counted, {refused} files refused, "
                       f"{invalid} invalid yielded")]


def _static_app():
    from ctr.features.spec import SPEC
    from ctr.online_learner.delta import snapshot_tensors
    from ctr.online_learner.model import CTRModel, ModelConfig
    from ctr.online_learner.update_format import UpdateHeader
    from ctr.serving.app import create_app
    from ctr.serving.config import ServingConfig
    from ctr.serving.registry import ModelRegistry

    class Static:
        def stats(self, users, items):
            return {"user": {u: {f: 0.1 for f in SPEC.feature_names("user")} for u in users},
                    "item": {i: {f: 0.2 for f in SPEC.feature_names("item")} for i in items}}

        def field_weights(self, fields):
            return {f: 1.0 for f in fields}

    cfg = ModelConfig(("site", "user_id", "item_id", "position"), ("I1", "user_ctr_1h"), table_bits=10)
    reg = ModelRegistry()
    reg.install_snapshot(UpdateHeader(kind="snapshot", model_id="m", version=1, base_version=1,
                                      model_config=cfg.to_dict()), snapshot_tensors(CTRModel(cfg)))
    app = create_app(ServingConfig(admin_token="t", max_candidates=50, max_body_bytes=16384), registry=reg,
                     features=Static())
    return app, reg


def bad_http(rng: random.Random, n: int) -> list[dict]:
    """Hostile requests to a real uvicorn server: a 4xx each, never a 5xx, the model unchanged."""
    import uvicorn

    app, reg = _static_app()
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                                        lifespan="on", log_level="error", access_log=False))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    good = json.dumps({"user_id": "u1", "context": {"categorical": {"site": "s"}},
                       "candidates": [{"item_id": f"a{i}", "numeric": {"I1": 1.0}} for i in range(5)]}).encode()
    status: dict[str, int] = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            for i in range(n):
                kind = i % 4
                path, headers = "/predict", {"content-type": "application/json"}
                if kind == 3:
                    path = "/model/rollback"
                    headers["authorization"] = rng.choice(["Bearer t", "Bearer x", "t", ""])
                body = _mutate(rng, good) if kind else rng.randbytes(rng.randint(0, 200))
                try:
                    code = c.post(path, content=body, headers=headers).status_code
                except httpx.HTTPError:
                    # an oversized body is answered 413 and the connection closed before the
                    # client finished sending: httpx reports that as a transport error
                    code = 413 if len(body) > 16384 else 0
                key = "conn" if code == 0 else f"{code // 100}xx"
                status[key] = status.get(key, 0) + 1
                if kind == 3 and code == 200:
                    c.post("/model/unpin", headers={"authorization": "Bearer t"})
    finally:
        srv.should_exit = True
        th.join(10)
    five = status.get("5xx", 0) + status.get("conn", 0)
    return [_row("bad input: HTTP API (uvicorn)", n, lost=0 if reg.current.version == 1 else 1, crashes=five,
                 notes=" ".join(f"{k}={v}" for k, v in sorted(status.items())))]


# ----------------------------------------------------------------------------- broker faults
def _count(bootstrap: str, topic: str) -> tuple[int, int]:
    """(messages, distinct values) readable from the start of every partition."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    c = make_consumer(bootstrap, f"count-{uuid.uuid4().hex[:6]}", **{"enable.partition.eof": True})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    values, eof, deadline = [], set(), time.monotonic() + 20
    while len(eof) < len(parts) and time.monotonic() < deadline:
        for m in c.consume(5000, 0.2):
            if m.error() is None:
                values.append(m.value())
            elif m.error().code() == -191:
                eof.add(m.partition())
    c.close()
    return len(values), len(set(values))


def _produce_stream(bootstrap: str, stop: threading.Event, tr: DeliveryTracker, rate: float = 5000) -> None:
    p, i, t0 = make_producer(bootstrap), 0, time.monotonic()
    while not stop.is_set():
        produce(p, "impressions", b"m-%d" % i, b"k%d" % i, tr)
        i += 1
        if i % 100 == 0:
            p.poll(0)
            time.sleep(max(0.0, i / rate - (time.monotonic() - t0)))
    p.flush(120)


def broker_restart(tmp: Path) -> list[dict]:
    b = EmbeddedBroker(kind="noida", data_dir=tmp / "restart").start()
    try:
        stop, tr = threading.Event(), DeliveryTracker()
        th = threading.Thread(target=_produce_stream, args=(b.bootstrap, stop, tr), daemon=True)
        th.start()
        time.sleep(2)
        t0 = time.monotonic()
        b.restart()
        down = time.monotonic() - t0
        time.sleep(2)
        stop.set()
        th.join(150)
        n, distinct = _count(b.bootstrap, "impressions")
        lost = max(0, tr.delivered - distinct)
        return [_row("broker: noida clean restart under a producer", tr.delivered + tr.failed, lost=lost,
                     notes=f"down {down:.2f} s; acked {tr.delivered}, failed {tr.failed}, on topic {distinct} "
                           f"distinct ({n - distinct} retry duplicates)")]
    finally:
        b.stop()


def broker_outage(tmp: Path) -> list[dict]:
    b = EmbeddedBroker(kind="noida", data_dir=tmp / "outage").start()
    try:
        b.stop(keep_data=True)
        p, tr = make_producer(b.bootstrap, **{"message.timeout.ms": 1500}), DeliveryTracker()
        for i in range(200):
            produce(p, "dead-letter", b"outage-%d" % i, None, tr)
        p.flush(30)
        b.start()
        on_topic, _ = _count(b.bootstrap, "dead-letter")
        false_ok = tr.delivered  # success reported for something the broker never took
        return [_row("broker: producer while the broker is down", 200, lost=false_ok + on_topic,
                     notes=f"delivery reports: {tr.failed} failed, {tr.delivered} succeeded; {on_topic} on topic")]
    finally:
        b.stop()


def broker_kill9(tmp: Path) -> list[dict]:
    rows = []
    for delay in (0.0, 1.0, 3.0):
        b = EmbeddedBroker(kind="noida", data_dir=tmp / f"k9-{delay}").start()
        try:
            time.sleep(1.0)
            p, tr = make_producer(b.bootstrap), DeliveryTracker()
            for i in range(20_000):
                produce(p, "impressions", b"v%d" % i, b"k%d" % i, tr)
            p.flush(60)
            time.sleep(delay)
            b.proc.kill()
            b.proc.wait()
            b.proc = None
            b.start()
            _, kept = _count(b.bootstrap, "impressions")
            rows.append(_row(f"broker: noida kill -9 {delay:.0f} s after the last ack", tr.delivered,
                             by_design=tr.delivered - kept,
                             notes=f"kept {kept} of {tr.delivered} acked (debounced JSON file)"))
        finally:
            b.stop()
    return rows


def tansu_restart(tmp: Path) -> list[dict]:
    b = EmbeddedBroker(kind="tansu", data_dir=tmp / "tansu").start()
    try:
        p, tr = make_producer(b.bootstrap), DeliveryTracker()
        for i in range(2000):
            produce(p, "impressions", b"t%d" % i, b"k%d" % i, tr)
        p.flush(60)
        b.restart()
        _, kept = _count(b.bootstrap, "impressions")
        # the producers are idempotent and tansu forgot their ids: a new producer is needed
        p.purge()
        p = make_producer(b.bootstrap)
        for i in range(500):
            produce(p, "impressions", b"after%d" % i, b"k%d" % i, tr)
        p.flush(60)
        _, after = _count(b.bootstrap, "impressions")
        return [_row("broker: tansu restart (memory storage)", 2000, by_design=2000 - kept,
                     crashes=int(after - kept != 500), notes=f"kept {kept}; a new producer then delivered "
                                                             f"{after - kept}/500 to the recreated topics")]
    finally:
        b.stop()


# ----------------------------------------------------------------------------- serving + memory
from bench.reliability_load import memory_under_replay, serving_under_load  # noqa: E402

__all__ = ["bad_events", "bad_updates", "bad_datasets", "bad_http", "broker_restart", "broker_outage",
           "broker_kill9", "tansu_restart", "serving_under_load", "memory_under_replay"]
