"""Serving against the real thing: an embedded broker, a Feast SQLite store in tmp, the real
online trainer publishing versions, and uvicorn replicas as subprocesses on free ports.

``test_live_refresh_end_to_end`` runs the scenario in phases (each a helper below):

1. bad requests get a 4xx with a message and the replica keeps serving;
2. concurrent load while the trainer publishes a version every 0.2 s: every response names a
   version, and its scores equal an offline recomputation with that version's weights
   (snapshot + deltas read back from the topic, loaded into a fresh learner);
3. a forked (out-of-order) delta and a gap are rejected; the gap re-syncs from the newest
   snapshot file and the replica catches up past it;
4. rollback pins a kept version while a multi-part delta advances the head; unpin;
   the Feast worker process is killed: serving goes on (flagged ``degraded``), /readyz says
   why, a new worker comes up;
5. a restarted replica and a brand-new one come back at the latest version and converge
   with each other on the next announced snapshot + delta.

The in-process tests at the end (FastAPI TestClient, a fake feature source) cover request
validation, limits, auth and degraded features without a broker.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from ctr.features.spec import SPEC
from ctr.infra.kafka_io import DeliveryTracker, flush, make_producer, produce
from ctr.infra.procs import die_with_parent, free_port, stop_process
from ctr.online_learner.delta import apply_tensors, delta_tensors, snapshot_tensors
from ctr.online_learner.learner import OnlineCTR
from ctr.online_learner.model import CTRModel, ModelConfig
from ctr.online_learner.update_format import UpdateHeader, decode_update, encode_update, split_delta
from tests.kafka_helpers import end_offsets, read_topic_confluent
from tests.learner_helpers import CATEGORICAL, NUMERIC, examples, produce_examples

TOKEN = "test-admin-token"
MODEL_ID = "ctr-serving-test"
STORE_FIELDS = ("user_ctr_1h", "item_ctr_1h", "item_impressions_5m")
MODEL = ModelConfig(CATEGORICAL + ("user_id", "item_id"), NUMERIC + STORE_FIELDS, table_bits=14)
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ATOL = 2e-6
T0_MS = 1_700_000_000_000


# --------------------------------------------------------------------------- helpers
class Replica:
    """``python -m ctr.serving`` as a subprocess on a free loopback port."""

    def __init__(self, tmp: Path, name: str, bootstrap: str, snapshots: Path, feast: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"replica-{name}.log"
        self.args = [sys.executable, "-m", "ctr.serving", "--bootstrap", bootstrap, "--snapshot-dir", str(snapshots),
                     "--feast-dir", str(feast), "--port", str(self.port), "--cache-ttl", "0.5",
                     "--max-candidates", "64", "--max-body-bytes", str(64 * 1024), "--log-level", "warning"]
        self.proc: subprocess.Popen | None = None
        self.client = httpx.Client(base_url=self.url, timeout=10.0)

    def start(self) -> Replica:
        env = {**os.environ, "CTR_ADMIN_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         preexec_fn=die_with_parent)
        return self

    def wait_ready(self, timeout_s: float = 90.0, version: int | None = None) -> dict:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"replica exited {self.proc.returncode}: {self.tail()}"
            try:
                r = self.client.get("/readyz")
                last = r.json()
                if r.status_code == 200 and (version is None or last["version"] == version):
                    return last
            except httpx.HTTPError as err:
                last = str(err)
            time.sleep(0.2)
        raise AssertionError(f"replica not ready (want v{version}): {last}\n{self.tail()}")

    def wait_version(self, version: int, timeout_s: float = 30.0, head: bool = False) -> dict:
        deadline = time.monotonic() + timeout_s
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.client.get("/model").json()
            if (info["head_version"] if head else info["version"]) == version:
                return info
            time.sleep(0.05)
        raise AssertionError(f"replica never reached v{version}: {info}\n{self.tail()}")

    def metric(self, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(f"{name}{{{want}}}") or (not labels and line.startswith(f"{name} ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s=10)

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""


def write_stats(store, ustats: dict[str, dict], istats: dict[str, dict]) -> None:
    """The users' and items' Feast rows (at T0_MS) that the scenario's requests read."""
    from ctr.features.store import FeatureWriter

    writer = FeatureWriter(store)
    writer.write("user_stats", [{"user_id": u, **v} for u, v in ustats.items()], event_time_ms=T0_MS)
    writer.write("item_stats", [{"item_id": i, **v} for i, v in istats.items()], event_time_ms=T0_MS)


def start_trainer(bs: str, state_dir: Path, publish_interval_s: float):
    """The real trainer on the test's MODEL, publishing every ``publish_interval_s``, in a
    thread: (trainer, stop event, its result dict, the thread)."""
    from ctr.online_learner.trainer import Trainer, TrainerConfig

    cfg = TrainerConfig(bootstrap=bs, state_dir=state_dir, batch_size=256, publish_interval_s=publish_interval_s,
                        checkpoint_interval_s=60, snapshot_interval_s=3600, gate_margin=1.0, model=MODEL,
                        model_id=MODEL_ID, lr_table=0.2, lr_dense=3e-3)
    stop_training, result = threading.Event(), {}
    trainer = Trainer(cfg)
    thread = threading.Thread(target=lambda: result.update(trainer.run(stop_training)), daemon=True)
    thread.start()
    return trainer, stop_training, result, thread


def stats_for(exs) -> tuple[dict[str, dict], dict[str, dict]]:
    """Distinct, known Feast stats for some users/items (the rest read as the prior)."""
    users = sorted({e.impression.user_id for e in exs})[::2]
    items = sorted({e.impression.item_id for e in exs})[::2]
    ustats = {u: {f: (0.01 + (i % 37) / 100 if "ctr" in f else i % 50) for f in SPEC.feature_names("user")}
              for i, u in enumerate(users)}
    istats = {a: {f: (0.02 + (i % 41) / 100 if "ctr" in f else (i * 7) % 300) for f in SPEC.feature_names("item")}
              for i, a in enumerate(items)}
    return ustats, istats


def make_request(rng: np.random.Generator, pool, n: int) -> dict:
    """A user with its context (C1-C4, I1-I3) and n candidates (item + C5-C8) from real impressions."""
    first = pool[rng.integers(len(pool))].impression
    cands = []
    for j, k in enumerate(rng.choice(len(pool), size=n, replace=False)):
        imp = pool[k].impression
        cands.append({"item_id": imp.item_id, "categorical": {f: v for f, v in imp.categorical.items()
                                                                  if f in ("C5", "C6", "C7", "C8")},
                      **({"position": j + 3} if j % 3 == 0 else {})})
    return {"user_id": first.user_id,
            "context": {"categorical": {f: v for f, v in first.categorical.items() if f in ("C1", "C2", "C3", "C4")},
                        "numeric": dict(first.numeric)},
            "candidates": cands}


def expected_rows(req: dict, ustats: dict, istats: dict) -> list[dict]:
    """The documented request -> model input mapping, written independently of serving/app.py."""
    prior = {f: (SPEC.smoothed_ctr(0, 0) if "_ctr_" in f else 0) for e in ("user", "item")
             for f in SPEC.feature_names(e)}
    out = []
    for i, c in enumerate(req["candidates"]):
        cat = {**req["context"].get("categorical", {}), **c.get("categorical", {}), "user_id": req["user_id"],
               "item_id": c["item_id"]}
        num = {**req["context"].get("numeric", {}), **c.get("numeric", {})}
        u, it = ustats.get(req["user_id"], prior), istats.get(c["item_id"], prior)
        num.update({f: (u if f.startswith("user_") else it).get(f, prior[f]) for f in STORE_FIELDS})
        cat["position"] = str(c.get("position", i))
        out.append({"categorical": cat, "numeric": num})
    return out


def reference_scores(state: dict, rows: list[dict]) -> np.ndarray:
    """Scores from a fresh learner loaded with ``state`` (load_state_dict: an independent path)."""
    ref = OnlineCTR(MODEL, device="cpu")
    ref.model.load_state_dict(state)
    return ref.predict_proba_many(rows)


def read_updates(bootstrap: str) -> list[tuple[UpdateHeader, dict]]:
    n = end_offsets(bootstrap, "model-updates")[0]
    msgs = read_topic_confluent(bootstrap, "model-updates", n, f"chk-{time.monotonic_ns()}")
    return [decode_update(m.value()) for m in sorted(msgs, key=lambda m: m.offset())]


def published_states(bootstrap: str) -> dict[int, dict]:
    """Every published version's state dict, rebuilt offline from ``model-updates``: the first
    announced snapshot, then the deltas in version order."""
    updates = read_updates(bootstrap)
    first = next(h for h, _ in updates if h.kind == "snapshot" and h.snapshot_uri)
    model = CTRModel(MODEL)
    apply_tensors(model, decode_update(Path(first.snapshot_uri).read_bytes())[1])
    states = {first.version: copy.deepcopy(model.state_dict())}
    parts: dict[int, list[dict]] = defaultdict(list)
    for h, t in updates:
        if h.kind == "delta":
            parts[h.version].append(t)
    for v in sorted(parts):
        for t in parts[v]:
            apply_tensors(model, t)
        states[v] = copy.deepcopy(model.state_dict())
    return states


class Publisher:
    """Hand-made updates on the learner's lineage, for the gap / rollback / restart phases."""

    def __init__(self, bootstrap: str, snapshots: Path) -> None:
        self.producer, self.tracker = make_producer(bootstrap), DeliveryTracker()
        self.snapshots = snapshots
        self.rng = np.random.default_rng(7)

    def send(self, data: list[bytes]) -> None:
        for d in data:
            produce(self.producer, "model-updates", d, None, self.tracker)
        flush(self.producer, self.tracker)

    def perturbed(self, model: CTRModel, rows: int = 300) -> tuple[CTRModel, np.ndarray]:
        new = copy.deepcopy(model)
        ids = np.sort(self.rng.choice(new.table.shape[0], size=rows, replace=False)).astype(np.int64)
        with torch.no_grad():
            new.table[torch.from_numpy(ids)] += torch.from_numpy(self.rng.normal(0, 0.3, (rows, 4)).astype(np.float32))
            new.head.out_deep.bias += 0.05
        return new, ids

    def delta(self, model: CTRModel, ids: np.ndarray, version: int, base: int, max_bytes: int = 900_000) -> list[bytes]:
        header = UpdateHeader(kind="delta", model_id=MODEL_ID, version=version, base_version=base,
                              event_time_ms=T0_MS + version)
        return split_delta(header, delta_tensors(model, ids), max_bytes=max_bytes)

    def snapshot_file(self, model: CTRModel, version: int) -> Path:
        header = UpdateHeader(kind="snapshot", model_id=MODEL_ID, version=version, base_version=version,
                              model_config=MODEL.to_dict(), event_time_ms=T0_MS + version)
        path = self.snapshots / f"snapshot-{version:012d}.ctru"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(encode_update(header, snapshot_tensors(model)))
        tmp.replace(path)
        return path

    def announce(self, path: Path, version: int) -> None:
        header = UpdateHeader(kind="snapshot", model_id=MODEL_ID, version=version, base_version=version,
                              model_config=MODEL.to_dict(), snapshot_uri=str(path.resolve()))
        self.send([encode_update(header, {})])


def predict_ok(rep: Replica, req: dict) -> dict:
    r = rep.client.post("/predict", json=req)
    assert r.status_code == 200, r.text
    return r.json()


def assert_scores(resp: dict, req: dict, state: dict, ustats: dict, istats: dict) -> None:
    got = np.array([p["p_click"] for p in resp["predictions"]])
    want = reference_scores(state, expected_rows(req, ustats, istats))
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------- the scenario
@pytest.mark.integration
def test_live_refresh_end_to_end(broker, tmp_path: Path) -> None:
    from ctr.features.store import open_store

    bs = broker.bootstrap
    state_dir, feast_dir = tmp_path / "learner", tmp_path / "feast"
    snapshots = state_dir / "snapshots"
    snapshots.mkdir(parents=True)
    pool = examples(16_000, seed=11)
    ustats, istats = stats_for(pool[:400])

    a = Replica(tmp_path, "a", bs, snapshots, feast_dir)
    store = open_store(feast_dir)  # applies the repo before the replica opens it
    a.start()
    write_stats(store, ustats, istats)

    trainer, stop_training, result, thread = start_trainer(bs, state_dir, publish_interval_s=0.2)
    b: Replica | None = None
    try:
        a.wait_ready()
        _bad_requests(a, pool)
        final = _load_while_updating(a, bs, pool, ustats, istats, stop_training, trainer, thread, result)
        model_f = _rebuild(bs, snapshots, final)
        pub = Publisher(bs, snapshots)
        s, model_s1 = _gap_and_out_of_order(a, pub, model_f, final, pool, ustats, istats)
        model_s2 = _rollback_and_unpin(a, pub, model_f, model_s1, final, s, pool, ustats, istats)
        _feature_worker_dies(a, model_s2, pool, ustats, istats)
        b = _restart_and_converge(a, tmp_path, bs, snapshots, feast_dir, pub, model_s2, s, pool, ustats, istats)
    finally:
        stop_training.set()
        a.stop()
        if b is not None:
            b.stop()
        thread.join(30)


def _bad_requests(rep: Replica, pool) -> None:
    good = make_request(np.random.default_rng(0), pool, 5)
    first = predict_ok(rep, good)
    assert isinstance(first["model_version"], int) and len(first["predictions"]) == 5
    cases = [
        ({"user_id": "u1", "candidates": []}, 422, "candidates"),
        ({"candidates": [{"item_id": "a"}]}, 422, "user_id"),
        ({**good, "candidates": good["candidates"] * 13}, 422, "length <= 64"),
        ({**good, "surprise": 1}, 422, "surprise"),
        ({**good, "candidates": [{"item_id": "a", "position": -1}]}, 422, "position"),
        ({**good, "context": {"numeric": {"I1": "many"}}}, 422, "context.numeric"),
    ]
    for body, status, needle in cases:
        r = rep.client.post("/predict", json=body)
        assert r.status_code == status and needle in r.text, (body, r.status_code, r.text)
        assert "error" in r.json()
    r = rep.client.post("/predict", content=b'{"user_id": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.text
    r = rep.client.post("/predict", content=b"{" + b" " * (80 * 1024) + b"}",
                        headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds" in r.json()["detail"]
    assert rep.client.post("/model/rollback").status_code == 401
    assert rep.client.post("/model/rollback", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert rep.client.post("/model/unpin", headers={"X-Admin-Token": "nope"}).status_code == 403
    assert rep.client.get("/nowhere").status_code == 404
    again = predict_ok(rep, good)  # still serving
    assert again["predictions"][0]["item_id"] == good["candidates"][0]["item_id"]
    assert rep.client.get("/healthz").json()["status"] == "ok"
    doc = rep.client.get("/openapi.json").json()
    assert doc["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert doc["components"]["schemas"]["PredictRequest"]["properties"]["candidates"]["maxItems"] == 64


def _load_while_updating(rep: Replica, bs: str, pool, ustats, istats, stop_training: threading.Event,
                         trainer, thread: threading.Thread, result: dict) -> int:
    """Phase 2: concurrent clients while versions are applied; verify every response offline."""
    done = threading.Event()

    def feed() -> None:
        for i in range(0, len(pool), 400):  # ~4k examples/s for ~4 s
            produce_examples(bs, pool[i:i + 400])
            time.sleep(0.1)
        done.set()

    responses: list[tuple[dict, dict]] = []
    errors: list[str] = []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=rep.url, timeout=10.0) as c:
            while not done.is_set() or len(responses) < 200:
                req = make_request(rng, pool[:400], int(rng.integers(1, 24)))
                explain = rng.random() < 0.2
                r = c.post("/predict" + ("?explain=true" if explain else ""), json=req)
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                responses.append((req, r.json()))

    threads = [threading.Thread(target=feed)] + [threading.Thread(target=client, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # let the trainer drain every example, then stop it (it publishes its last delta on the way out)
    deadline = time.monotonic() + 60
    while trainer.learner.examples_seen < len(pool) and time.monotonic() < deadline:
        time.sleep(0.1)
    stop_training.set()
    thread.join(60)
    final = result["version"]
    assert result["examples"] == len(pool), result
    rep.wait_version(final)

    assert not errors, errors[:3]
    versions = [resp["model_version"] for _, resp in responses]
    assert len(set(versions)) >= 3, f"updates must land during the load: saw versions {sorted(set(versions))}"
    assert all(1 <= v <= final for v in versions)
    # explain shows the store's values (or the prior) and the fields they filled
    for req, resp in responses:
        if "explain" in resp and resp["explain"]:
            ex = resp["explain"]
            assert ex["filled_from_store"] == {"user": ["user_ctr_1h"], "item": ["item_ctr_1h", "item_impressions_5m"]}
            for c in req["candidates"]:
                item = c["item_id"]
                if item in istats:
                    assert ex["items"][item]["item_ctr_1h"] == pytest.approx(istats[item]["item_ctr_1h"])
            break
    else:
        raise AssertionError("no explained response")

    # offline: replay snapshot + deltas from the topic; check each response with its version
    by_version: dict[int, list[tuple[dict, dict]]] = defaultdict(list)
    for req, resp in responses:
        by_version[resp["model_version"]].append((req, resp))
    states = published_states(bs)
    assert set(by_version) <= set(states), "a response named a version the learner never published"
    checked, sensitive = 0, 0
    for v, items in sorted(by_version.items()):
        rows, got = [], []
        for req, resp in items:
            r = expected_rows(req, ustats, istats)
            rows += r
            got += [p["p_click"] for p in resp["predictions"]]
        want = reference_scores(states[v], rows)
        np.testing.assert_allclose(np.array(got), want, rtol=0, atol=ATOL, err_msg=f"version {v}")
        checked += len(items)
        if v - 1 in states and np.abs(reference_scores(states[v - 1], rows) - want).max() > 50 * ATOL:
            sensitive += 1
    assert checked == len(responses)
    assert sensitive >= 1, "consecutive versions score differently: the check can tell versions apart"
    assert rep.metric("ctr_serving_updates_applied_total", kind="delta") >= len(states) - 2  # deltas, less one
    return final


def _rebuild(bs: str, snapshots: Path, final: int) -> CTRModel:
    """The learner's final model, rebuilt from its first snapshot + every delta on the topic."""
    updates = read_updates(bs)
    snap = next(h for h, _ in updates if h.kind == "snapshot")
    model = CTRModel(MODEL)
    apply_tensors(model, decode_update(Path(snap.snapshot_uri).read_bytes())[1])
    for h, t in updates:
        if h.kind == "delta":
            apply_tensors(model, t)
    assert max(h.version for h, _ in updates) == final
    return model


def _gap_and_out_of_order(rep: Replica, pub: Publisher, model_f: CTRModel, f: int, pool, ustats, istats):
    """Phase 3: a fork (base older than the head) and a gap are rejected; the gap re-syncs."""
    req = make_request(np.random.default_rng(3), pool[:400], 8)
    fork, ids = pub.perturbed(model_f)
    pub.send(pub.delta(fork, ids, version=f + 2, base=f - 1))
    deadline = time.monotonic() + 20
    while rep.metric("ctr_serving_updates_rejected_total", reason="out_of_order") < 1:
        assert time.monotonic() < deadline, rep.tail()
        time.sleep(0.1)
    info = rep.client.get("/model").json()
    assert info["version"] == f and info["updates"]["state"] == "stalled"
    assert info["updates"]["last_rejection"]["reason"] == "out_of_order"
    assert_scores(predict_ok(rep, req), req, model_f.state_dict(), ustats, istats)  # still serving v_f

    # the learner (say, after a restart) wrote snapshot S; its announcement was lost; then S+1 on S
    s = f + 5
    model_s, _ = pub.perturbed(model_f)
    pub.snapshot_file(model_s, s)
    model_s1, ids = pub.perturbed(model_s)
    pub.send(pub.delta(model_s1, ids, version=s + 1, base=s))
    info = rep.wait_version(s + 1)
    assert rep.metric("ctr_serving_updates_rejected_total", reason="gap") >= 1
    assert rep.metric("ctr_serving_resyncs_total", reason="gap", result="loaded") == 1
    assert info["updates"]["last_resync"]["version"] == s
    resp = predict_ok(rep, req)
    assert resp["model_version"] == s + 1
    assert_scores(resp, req, model_s1.state_dict(), ustats, istats)
    return s, model_s1


def _rollback_and_unpin(rep: Replica, pub: Publisher, model_f, model_s1, f: int, s: int, pool, ustats, istats):
    """Phase 4: rollback pins the previous version while a multi-part delta advances the head."""
    req = make_request(np.random.default_rng(4), pool[:400], 6)
    r = rep.client.post("/model/rollback", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json() == {"pinned": True, "version": s, "model_id": MODEL_ID, "head_version": s + 1}
    resp = predict_ok(rep, req)
    assert resp["model_version"] == s
    model_s2, ids = pub.perturbed(model_s1, rows=3000)
    data = pub.delta(model_s2, ids, version=s + 2, base=s + 1, max_bytes=20_000)
    assert len(data) >= 3
    pub.send(data)
    info = rep.wait_version(s + 2, head=True)
    assert info["version"] == s and info["pinned"] and info["kept"][-1] == s + 2
    assert predict_ok(rep, req)["model_version"] == s
    r = rep.client.post("/model/rollback", headers=ADMIN, json={"version": f})
    assert r.status_code == 200 and r.json()["version"] == f
    resp = predict_ok(rep, req)
    assert resp["model_version"] == f
    assert_scores(resp, req, model_f.state_dict(), ustats, istats)
    r = rep.client.post("/model/rollback", headers=ADMIN, json={"version": 123456})
    assert r.status_code == 404 and "not kept" in r.json()["detail"]
    assert rep.metric("ctr_serving_pinned") == 1
    r = rep.client.post("/model/unpin", headers=ADMIN)
    assert r.status_code == 200 and r.json()["version"] == s + 2
    resp = predict_ok(rep, req)
    assert resp["model_version"] == s + 2
    assert_scores(resp, req, model_s2.state_dict(), ustats, istats)
    return model_s2


def _feature_worker_dies(rep: Replica, model, pool, ustats, istats) -> None:
    """The Feast worker process is killed: requests keep being served (cached values, or the
    prior for a key never seen, flagged ``degraded``), /readyz says why, a new worker comes up."""
    import psutil

    req = make_request(np.random.default_rng(6), pool[:400], 6)
    predict_ok(rep, req)  # its keys are cached now
    worker = rep.client.get("/model").json()["feature_source"]
    assert worker["kind"] == "worker process" and worker["healthy"]
    psutil.Process(worker["pid"]).kill()
    deadline = time.monotonic() + 10
    while rep.client.get("/readyz").status_code == 200:
        assert time.monotonic() < deadline, "a dead feature worker must make the replica unready"
        time.sleep(0.05)
    assert "feature store worker restarting" in rep.client.get("/readyz").json()["problems"][0]
    assert_scores(predict_ok(rep, req), req, model.state_dict(), ustats, istats)
    unseen = {"user_id": "never-seen-user", "candidates": [{"item_id": "never-seen-item"}]}
    r = predict_ok(rep, unseen)
    assert r["features"]["degraded"] and r["model_version"] == rep.client.get("/model").json()["version"]
    rep.wait_ready(timeout_s=90)
    info = rep.client.get("/model").json()["feature_source"]
    assert info["healthy"] and info["restarts"] == 1 and info["pid"] != worker["pid"]
    assert not predict_ok(rep, {**unseen, "user_id": "another-new-user"})["features"]["degraded"]


def _restart_and_converge(a: Replica, tmp: Path, bs: str, snapshots: Path, feast: Path, pub: Publisher,
                          model_s2, s: int, pool, ustats, istats) -> Replica:
    """Phase 5: restart A and start a new replica B: both come back at S+2 (snapshot S + the
    deltas after it), then converge on an announced snapshot + delta."""
    a.stop()
    a.proc = None
    a.port = free_port()
    a.url = f"http://127.0.0.1:{a.port}"
    a.args[a.args.index("--port") + 1] = str(a.port)
    a.client = httpx.Client(base_url=a.url, timeout=10.0)
    b = Replica(tmp, "b", bs, snapshots, feast)
    a.start()
    b.start()
    for rep in (a, b):
        rep.wait_ready(version=s + 2)
    req = make_request(np.random.default_rng(5), pool[:400], 10)
    ra, rb = predict_ok(a, req), predict_ok(b, req)
    assert ra["model_version"] == rb["model_version"] == s + 2
    assert_scores(ra, req, model_s2.state_dict(), ustats, istats)
    assert ra["predictions"] == rb["predictions"]

    model_s3, _ = pub.perturbed(model_s2)
    pub.announce(pub.snapshot_file(model_s3, s + 3), s + 3)
    model_s4, ids = pub.perturbed(model_s3)
    pub.send(pub.delta(model_s4, ids, version=s + 4, base=s + 3))
    for rep in (a, b):
        rep.wait_version(s + 4)
    ra, rb = predict_ok(a, req), predict_ok(b, req)
    assert ra["model_version"] == rb["model_version"] == s + 4 and ra["predictions"] == rb["predictions"]
    assert_scores(ra, req, model_s4.state_dict(), ustats, istats)
    return b


# --------------------------------------------------------------------------- in-process (no broker)
class FakeFeatures:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    def stats(self, users, items):
        self.calls += 1
        if self.fail:
            raise RuntimeError("store down")
        return {"user": {u: {f: 0.3 for f in SPEC.feature_names("user")} for u in users},
                "item": {i: {f: 0.4 for f in SPEC.feature_names("item")} for i in items}}

    def field_weights(self, fields):
        return {f: 1.0 for f in fields}


@pytest.fixture
def local_app():
    from fastapi.testclient import TestClient

    from ctr.serving.app import create_app
    from ctr.serving.config import ServingConfig
    from ctr.serving.registry import ModelRegistry

    reg = ModelRegistry()
    header = UpdateHeader(kind="snapshot", model_id="m", version=3, base_version=3, model_config=MODEL.to_dict())
    reg.install_snapshot(header, snapshot_tensors(CTRModel(MODEL)))
    feats = FakeFeatures()
    app = create_app(ServingConfig(admin_token=TOKEN, max_candidates=10, max_body_bytes=4096, cache_ttl_s=60),
                     registry=reg, features=feats)
    with TestClient(app) as client:
        yield client, feats, reg


def test_cache_serves_repeat_lookups_and_degrades_to_priors(local_app) -> None:
    client, feats, _ = local_app
    body = {"user_id": "u1", "candidates": [{"item_id": "a"}, {"item_id": "b"}]}
    r1 = client.post("/predict", json=body).json()
    assert r1["features"]["misses"] == 3 and feats.calls == 1
    r2 = client.post("/predict", json=body).json()
    assert r2["features"] == {**r2["features"], "source": "cache", "hits": 3, "misses": 0}
    assert feats.calls == 1 and r1["predictions"] == r2["predictions"]
    feats.fail = True
    r3 = client.post("/predict?explain=true", json={"user_id": "u2", "candidates": [{"item_id": "c"}]})
    assert r3.status_code == 200 and r3.json()["features"]["degraded"]
    assert r3.json()["explain"]["items"]["c"]["item_ctr_1h"] == SPEC.smoothed_ctr(0, 0)


def test_limits_and_auth_in_process(local_app) -> None:
    client, _, reg = local_app
    r = client.post("/predict", json={"user_id": "u", "candidates": [{"item_id": f"i{k}"} for k in range(11)]})
    assert r.status_code == 422 and "length <= 10" in r.json()["error"]
    r = client.post("/predict", content=b"x" * 5000, headers={"content-type": "application/json"})
    assert r.status_code == 413

    def chunks():
        for _ in range(10):
            yield b" " * 1000

    r = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text  # no Content-Length: counted while streaming
    for bad in (b"1e400", b"NaN"):
        raw = b'{"user_id": "u", "candidates": [{"item_id": "i", "numeric": {"x": ' + bad + b"}}]}"
        r = client.post("/predict", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and ("out of range" in r.text or "malformed JSON" in r.text), r.text
    assert client.post("/model/unpin").status_code == 401
    assert client.post("/model/unpin", headers=ADMIN).json()["version"] == 3
    r = client.post("/model/rollback", headers=ADMIN)
    assert r.status_code == 409 and "no kept version older" in r.json()["detail"]
    assert client.get("/readyz").json() == {"ready": True, "problems": [], "version": 3}
    metrics = client.get("/metrics").text
    assert 'ctr_serving_model_version{which="current"} 3.0' in metrics
    assert "ctr_serving_request_seconds_bucket" in metrics


def test_admin_disabled_without_a_token() -> None:
    from fastapi.testclient import TestClient

    from ctr.serving.app import create_app
    from ctr.serving.config import ServingConfig

    os.environ.pop("CTR_ADMIN_TOKEN", None)
    app = create_app(ServingConfig(admin_token=None), features=FakeFeatures())
    with TestClient(app) as client:
        r = client.post("/model/rollback", headers=ADMIN)
        assert r.status_code == 403 and "CTR_ADMIN_TOKEN" in r.json()["detail"]
        r = client.post("/predict", json={"user_id": "u", "candidates": [{"item_id": "i"}]})
        assert r.status_code == 503 and "no model" in r.json()["detail"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "no model loaded" in ready.json()["problems"][0]


def test_concurrent_requests_share_forwards_and_each_gets_its_own_scores() -> None:
    """Dynamic batching: requests in flight together are scored in one forward per version, and
    each response carries exactly its own candidates' scores -- the ones it gets alone, through
    FastAPI's route (a query string bypasses the direct /predict path)."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from ctr.serving.app import create_app
    from ctr.serving.config import ServingConfig
    from ctr.serving.registry import ModelRegistry

    reg = ModelRegistry()
    torch.manual_seed(1)
    model = CTRModel(MODEL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.calibration.coef.copy_(torch.tensor([1.0, 0.0]))  # trust the network's score
    header = UpdateHeader(kind="snapshot", model_id="m", version=3, base_version=3, model_config=MODEL.to_dict())
    reg.install_snapshot(header, snapshot_tensors(model))
    # a wide batching window: every request below lands in a forward shared with others
    app = create_app(ServingConfig(batch_wait_ms=200, max_candidates=10), registry=reg, features=FakeFeatures())
    bodies = [{"user_id": f"u{k}", "candidates": [{"item_id": f"i{k}-{j}", "categorical": {CATEGORICAL[0]: f"v{j}"}}
                                                  for j in range(1 + k % 4)]} for k in range(12)]
    with TestClient(app) as client:
        alone = [client.post("/predict?explain=false", json=b).json() for b in bodies]
        scorer = app.state.predictor.scorer
        batches, requests = scorer.batches, scorer.requests
        with ThreadPoolExecutor(len(bodies)) as pool:
            together = list(pool.map(lambda b: client.post("/predict", json=b), bodies))
    assert all(r.status_code == 200 for r in together), [r.text for r in together]
    assert scorer.requests - requests == len(bodies) and scorer.batches - batches < len(bodies)
    for got, want in zip(together, alone, strict=True):
        got = got.json()
        assert got["model_version"] == want["model_version"] == 3
        assert [p["item_id"] for p in got["predictions"]] == [p["item_id"] for p in want["predictions"]]
        np.testing.assert_allclose([p["p_click"] for p in got["predictions"]],
                                   [p["p_click"] for p in want["predictions"]], rtol=1e-5, atol=1e-7)
    assert len({p["p_click"] for r in alone for p in r["predictions"]}) > 10  # the scores differ


@pytest.mark.parametrize("numeric_mode", ["bucket", "dense"])
def test_column_wise_encoding_equals_encoding_merged_rows(numeric_mode: str) -> None:
    """encode_request (context once + candidate columns) == the learner's encoder on the merged
    rows, including overrides: candidate over context, attributes and the store over both."""
    import msgspec

    from ctr.serving.features import FeaturePlan, Lookup
    from ctr.serving.registry import ModelRegistry
    from ctr.serving.request_encoding import encode_request, merged_rows
    from ctr.serving.schema import request_type

    cfg = ModelConfig(("C1", "C2", "C3", "user_id", "item_id", "position"),
                      ("I1", "I2", "user_ctr_1h", "item_ctr_1h"), table_bits=10, numeric_mode=numeric_mode)
    reg = ModelRegistry()
    header = UpdateHeader(kind="snapshot", model_id="m", version=1, base_version=1, model_config=cfg.to_dict())
    mv = reg.install_snapshot(header, snapshot_tensors(CTRModel(cfg)))
    plan = FeaturePlan.for_fields(cfg.numeric_fields)
    rng = np.random.default_rng(1)
    decode = msgspec.json.Decoder(request_type(100)).decode
    for trial in range(30):
        def fields(names, p=0.5):
            return {f: f"v{rng.integers(4)}" for f in names if rng.random() < p}

        cands = []
        for _ in range(int(rng.integers(1, 12))):
            c = {"item_id": f"ad{rng.integers(5)}", "categorical": fields(("C2", "C3", "X", "user_id", "I1"))}
            if rng.random() < 0.5:
                c["numeric"] = {f: float(rng.normal()) for f in ("I2", "item_ctr_1h", "user_ctr_1h", "C1")
                                if rng.random() < 0.5}
            if rng.random() < 0.3:
                c["position"] = int(rng.integers(0, 9))
            cands.append(c)
        body = {"user_id": f"u{trial}", "candidates": cands,
                "context": {"categorical": fields(("C1", "C2", "item_id", "position")),
                            "numeric": {f: float(rng.normal()) for f in ("I1", "I2", "user_ctr_1h")
                                        if rng.random() < 0.6}}}
        req = decode(msgspec.json.encode(body))
        look = Lookup({"user": {f"u{trial}": {f: 0.3 for f in SPEC.feature_names("user")}},
                       "item": {f"ad{k}": {f: 0.1 * k for f in SPEC.feature_names("item")} for k in range(3)}})
        got = encode_request(mv, req, plan, look)
        want = mv.encoder.encode(merged_rows(req, plan, look))
        np.testing.assert_array_equal(got.keys, want.keys)
        # the numeric values travel in both modes (dense: embedded; bucket: the linear term)
        np.testing.assert_array_equal(got.numeric, want.numeric)
