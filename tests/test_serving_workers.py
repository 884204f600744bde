"""``ctr serve --workers 2``: two HTTP worker processes on one port over ONE shared copy of
each model version, one updater applying the updates.

``test_two_workers_end_to_end`` runs the real thing (embedded broker, Feast SQLite store, the
real trainer publishing a version every 0.1 s, the server as subprocesses, a single-process
replica beside it as the reference):

1. concurrent clients on connections to both workers while versions land: 0 errors; every
   response names a version of the published chain and its scores equal an offline
   recomputation of that version; every update was applied once, by the updater;
2. at the final version both workers answer bit-for-bit what the single-process replica answers;
3. a rollback through one worker changes what both serve (and equals the single replica rolled
   back the same way); unpin through the other returns both to the head;
4. a worker killed with SIGKILL is restarted while the other keeps answering (0 errors on new
   connections), and comes back at the current version;
5. the shared memory: memfd mappings in the workers, no fd held per version in them, a bounded
   number in the updater; after SIGTERM no process is left and nothing in /dev/shm.

``test_a_version_held_elsewhere_is_never_rewritten`` is the invariant underneath, in one process.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch

from ctr.online_learner.delta import snapshot_tensors
from ctr.online_learner.model import CTRModel, ModelConfig
from ctr.online_learner.update_format import UpdateHeader
from ctr.serving.metrics import merge_expositions
from ctr.serving.registry import ModelRegistry
from ctr.serving.shared import attach, segment_of, share_model, shared_copy
from tests.learner_helpers import examples, produce_examples
from tests.test_serving import (
    ADMIN,
    ATOL,
    MODEL_ID,
    Replica,
    expected_rows,
    make_request,
    published_states,
    reference_scores,
    start_trainer,
    stats_for,
    write_stats,
)


class Workers(Replica):
    """``python -m ctr.serving --workers 2``: an updater and two HTTP workers on one port."""

    def __init__(self, tmp: Path, bootstrap: str, snapshots: Path, feast: Path) -> None:
        super().__init__(tmp, "workers", bootstrap, snapshots, feast)
        self.args += ["--workers", "2", "--log-level", "info"]

    def connection(self) -> tuple[httpx.Client, int]:
        """A client on ONE keep-alive connection, and the worker that connection reached."""
        c = httpx.Client(base_url=self.url, timeout=10.0, limits=httpx.Limits(max_connections=1))
        return c, c.get("/model").json()["worker"]["index"]

    def per_worker(self, timeout_s: float = 30.0) -> dict[int, httpx.Client]:
        """One connection to each worker (the kernel picks the worker per connection; a worker
        listens once its feature store is open)."""
        got: dict[int, httpx.Client] = {}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            c, index = self.connection()
            if index in got:
                c.close()
                time.sleep(0.05)
            else:
                got[index] = c
            if len(got) == 2:
                return got
        raise AssertionError(f"connections for {timeout_s:g} s reached only workers {sorted(got)}\n{self.tail()}")

    def metrics(self) -> dict[tuple[str, str], float]:
        """(metric{labels without worker}, worker) -> value, from any worker's /metrics."""
        out = {}
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith("#") or "{" not in line:
                continue
            name, value = line.rsplit(" ", 1)
            head, labels = name[:-1].split("{", 1)
            parts = [p for p in labels.split(",") if not p.startswith("worker=")]
            worker = next(p for p in labels.split(",") if p.startswith("worker="))[8:-1]
            out[(f"{head}{{{','.join(parts)}}}", worker)] = float(value)
        return out

    def pids(self) -> dict[str, int]:
        """The updater's pid and each worker's (from the workers' /model)."""
        got = {"updater": self.proc.pid}
        for index, c in self.per_worker().items():
            got[str(index)] = c.get("/model").json()["worker"]["pid"]
            c.close()
        return got


def _fds(pid: int, target: str) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += target in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    return n


def _maps(pid: int, target: str) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return len({line.split()[0] for line in f if target in line})



def _same_answers(clients: dict[str, httpx.Client], reqs: list[dict]) -> int:
    """Every client answers every request identically (version and scores, bit for bit)."""
    version = None
    for req in reqs:
        got = {name: c.post("/predict", json=req).json() for name, c in clients.items()}
        first = next(iter(got.values()))
        for name, resp in got.items():
            assert resp["model_version"] == first["model_version"], (name, resp["model_version"])
            assert resp["predictions"] == first["predictions"], name
        version = first["model_version"]
    assert version is not None
    return version


@pytest.mark.integration
@pytest.mark.slow
def test_two_workers_end_to_end(broker, tmp_path: Path) -> None:
    from ctr.features.store import open_store

    bs = broker.bootstrap
    state_dir, feast_dir = tmp_path / "learner", tmp_path / "feast"
    snapshots = state_dir / "snapshots"
    snapshots.mkdir(parents=True)
    pool = examples(16_000, seed=11)
    ustats, istats = stats_for(pool[:400])
    shm_before = set(os.listdir("/dev/shm"))

    store = open_store(feast_dir)
    w = Workers(tmp_path, bs, snapshots, feast_dir).start()
    single = Replica(tmp_path, "single", bs, snapshots, feast_dir).start()
    write_stats(store, ustats, istats)

    trainer, stop_training, result, thread = start_trainer(bs, state_dir, publish_interval_s=0.1)
    pids: dict[str, int] = {}
    try:
        w.wait_ready(timeout_s=180)
        single.wait_ready(timeout_s=180)
        for c in w.per_worker(timeout_s=180).values():  # both workers listen
            c.close()
        pids = w.pids()

        # 1. load on both workers while versions land every ~0.1 s
        done = threading.Event()
        responses: list[tuple[int, dict, dict]] = []
        errors: list[str] = []

        def feed() -> None:
            for i in range(0, len(pool), 400):
                produce_examples(bs, pool[i:i + 400])
                time.sleep(0.1)
            done.set()

        def client(seed: int, c: httpx.Client, index: int) -> None:
            rng = np.random.default_rng(seed)
            while not done.is_set() or len(responses) < 300:
                req = make_request(rng, pool[:400], int(rng.integers(1, 24)))
                try:
                    r = c.post("/predict", json=req)
                except httpx.HTTPError as err:
                    errors.append(repr(err))
                    continue
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                responses.append((index, req, r.json()))
            c.close()

        conns = [w.per_worker() for _ in range(2)]  # two connections to each worker
        threads = [threading.Thread(target=feed)] + [
            threading.Thread(target=client, args=(10 * k + i, c, i)) for k, cs in enumerate(conns)
            for i, c in cs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        deadline = time.monotonic() + 60
        while trainer.learner.examples_seen < len(pool) and time.monotonic() < deadline:
            time.sleep(0.1)
        stop_training.set()
        thread.join(60)
        final = result["version"]
        w.wait_version(final)
        single.wait_version(final)

        assert not errors, errors[:3]
        by_worker = defaultdict(set)
        for index, _, resp in responses:
            by_worker[index].add(resp["model_version"])
        assert set(by_worker) == {0, 1}, sorted(by_worker)
        assert all(len(v) >= 3 for v in by_worker.values()), f"versions must land during the load: {by_worker}"
        states = published_states(bs)
        by_version: dict[int, list[tuple[dict, dict]]] = defaultdict(list)
        for _, req, resp in responses:
            by_version[resp["model_version"]].append((req, resp))
        assert set(by_version) <= set(states), "a response named a version the learner never published"
        for v, items in sorted(by_version.items()):
            rows, got = [], []
            for req, resp in items:
                rows += expected_rows(req, ustats, istats)
                got += [p["p_click"] for p in resp["predictions"]]
            np.testing.assert_allclose(np.array(got), reference_scores(states[v], rows), rtol=0, atol=ATOL,
                                       err_msg=f"version {v}")
        deltas = len([v for v in states if v > min(states)])
        m = w.metrics()
        assert m[('ctr_serving_updates_applied_total{kind="delta"}', "updater")] >= deltas - 1
        assert not [k for k in m if k[0].startswith("ctr_serving_updates_applied_total") and k[1] != "updater"]
        for index in ("0", "1"):
            assert m[('ctr_serving_model_version{which="current"}', index)] == final
        assert m[('ctr_serving_requests_total{endpoint="/predict",status="200"}', "0")] > 0
        assert m[('ctr_serving_requests_total{endpoint="/predict",status="200"}', "1")] > 0

        # shared memory: memfd segments, none in /dev/shm; fds and mappings per live version
        # (the updater: kept + retired + held by workers; a worker: what it serves), never one per
        # version applied (Python's mmap keeps a duplicate fd while mapped: 2 per segment there)
        assert final > 30
        assert 1 <= _fds(pids["updater"], "memfd:ctr-model") <= 2 * 12
        for index in ("0", "1"):
            mapped = _maps(pids[index], "memfd:ctr-model")
            assert 1 <= mapped <= 3 and _fds(pids[index], "memfd:ctr-model") == mapped
            assert _maps(pids[index], "/dev/shm/") == 0

        # 2. the final version: both workers == the single-process replica, bit for bit
        reqs = [make_request(np.random.default_rng(100 + k), pool[:400], 12) for k in range(10)]
        clients = {f"worker {i}": c for i, c in w.per_worker().items()}
        clients["single"] = single.client
        assert _same_answers(clients, reqs) == final

        # 3. rollback through one worker: both serve the previous version (== single's rollback)
        r = clients["worker 0"].post("/model/rollback", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json() == {"pinned": True, "version": final - 1, "model_id": MODEL_ID, "head_version": final}
        assert single.client.post("/model/rollback", headers=ADMIN).json()["version"] == final - 1
        assert _same_answers(clients, reqs) == final - 1
        for name in ("worker 0", "worker 1"):
            info = clients[name].get("/model").json()
            assert info["version"] == final - 1 and info["pinned"] and info["head_version"] == final
            assert clients[name].get("/healthz").json() == {"status": "ok", "version": final - 1}
        assert clients["worker 1"].post("/model/rollback", headers=ADMIN, json={"version": 10**6}).status_code == 404
        assert clients["worker 1"].post("/model/unpin").status_code == 401
        r = clients["worker 1"].post("/model/unpin", headers=ADMIN)
        assert r.status_code == 200 and r.json()["version"] == final
        single.client.post("/model/unpin", headers=ADMIN)
        assert _same_answers(clients, reqs) == final

        # 4. SIGKILL one worker: the other keeps answering, the killed one comes back
        victim = psutil.Process(pids["1"])
        orphans = victim.children(recursive=True)  # its Feast reader: it must not outlive it
        assert orphans
        victim.kill()
        victim.wait(10)
        gone, alive = psutil.wait_procs(orphans, timeout=15)
        assert not alive, f"the killed worker's children outlived it: {alive}"
        ok = 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            with httpx.Client(base_url=w.url, timeout=10.0) as c:  # a new connection each time
                r = c.post("/predict", json=reqs[ok % len(reqs)])
                assert r.status_code == 200, r.text
                assert r.json()["model_version"] == final
                ok += 1
                info = c.get("/model").json()["worker"]
            if info["index"] == 1 and info["pid"] != pids["1"]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"worker 1 was not restarted: {w.tail()}")
        assert ok >= 3
        assert w.metrics()[("ctr_serving_worker_restarts_total{}", "updater")] == 1
        clients = {f"worker {i}": c for i, c in w.per_worker().items()}
        clients["single"] = single.client
        assert _same_answers(clients, reqs[:3]) == final
        pids = w.pids()
    finally:
        stop_training.set()
        procs = [psutil.Process(p) for p in pids.values() if psutil.pid_exists(p)]
        procs += [c for p in procs[:1] for c in p.children(recursive=True)]
        w.stop()
        single.stop()
        thread.join(30)

    # 5. a clean stop: exit 0, no process left, nothing left in /dev/shm (named semaphores of
    # other programs on this machine come and go: not ours, we use none)
    assert w.proc.returncode == 0, w.tail()
    assert not [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not [f for f in set(os.listdir("/dev/shm")) - shm_before if not f.startswith("sem.mp-")]


def test_a_version_held_elsewhere_is_never_rewritten() -> None:
    """The updater's invariant: a version a worker holds (mapped, maybe scoring) is never
    recycled as a shadow, so its mapping reads the same bytes until the worker drops it; what
    nobody holds is recycled (touched-row copies instead of a copy of the table)."""
    cfg = ModelConfig(("site",), table_bits=12)
    reg = ModelRegistry(keep=2)
    reg.place, reg.clone = share_model, shared_copy
    head = UpdateHeader(kind="snapshot", model_id="m", version=1, base_version=1, model_config=cfg.to_dict())
    reg.install_snapshot(head, snapshot_tensors(CTRModel(cfg)))
    rng = np.random.default_rng(0)
    rows = reg.current.model.table.shape[0]
    held: list[tuple] = []
    recycled = 0
    for v in range(2, 80):
        ids = np.unique(rng.integers(0, rows, 12)).astype(np.int64)
        delta = {"table.ids": ids, "table.rows": rng.normal(size=(len(ids), 4)).astype(np.float32)}
        d = reg.offer(UpdateHeader(kind="delta", model_id="m", version=v, base_version=v - 1), delta)
        assert d.outcome == "applied", d
        recycled += d.version.copied_rows >= 0
        if rng.random() < 0.4:  # a worker maps the new current version and holds it
            mv = reg.current
            reg.hold(mv)
            seg = segment_of(mv.model)
            mapped = attach(os.dup(seg.fd), seg.layout, cfg)
            held.append((mv, mapped, mapped.table.clone(), mv.model.table.clone()))
        for mv, mapped, seen, built in held:
            assert torch.equal(mapped.table, seen), f"v{mv.version} changed under a worker holding it"
            assert torch.equal(seen, built)
        if held and rng.random() < 0.35:
            reg.release(held.pop(int(rng.integers(len(held))))[0])
    # (copied_rows >= 0: built on a recycled model by copying the rows it lacked)
    assert recycled > 40, f"released versions are recycled as shadows: {recycled} of 78"


def test_metrics_of_every_process_in_one_exposition() -> None:
    a = b'# HELP x_total c\n# TYPE x_total counter\nx_total{kind="d"} 3.0\nx_created{kind="d"} 1.7e9\n'
    b = b'# HELP x_total c\n# TYPE x_total counter\nx_total{kind="d"} 2.0\n# HELP g g\n# TYPE g gauge\ng 5.0\n'
    text = merge_expositions({"updater": a, "0": b}).decode()
    assert 'x_total{kind="d",worker="updater"} 3.0' in text and 'x_total{kind="d",worker="0"} 2.0' in text
    assert 'g{worker="0"} 5.0' in text and "created" not in text
    assert text.count("# TYPE x_total counter") == 1


if os.name != "posix" or not hasattr(os, "memfd_create"):  # pragma: no cover
    pytestmark = pytest.mark.skip("memfd_create: Linux only")
