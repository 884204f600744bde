"""``ctr up`` / ``ctr down`` / ``ctr status``: the pipeline as long-running background
processes for someone who wants to keep them (the demo runs the same services for a bounded
time). State (pids, ports, log files) lives in ``.ctr/stack.json``; logs in ``.ctr/logs``.

Every stage serves Prometheus metrics on a free loopback port (serving on its own port), recorded
in the state; ``--monitor`` adds a Prometheus scraping them with the project's alert rules
(:mod:`ctr.monitor`), its config and data under ``.ctr/prometheus``.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctr.infra.config import state_dir
from ctr.infra.procs import free_port, pid_alive, port_open, stop_process
from ctr.online_learner.signing import run_keys, stage_flags
from ctr.supervisor import BATCH_NICE, Service, Supervisor, ctr_argv, stage_nice

#: Stop order: the watcher first (the others stopping are no alert), then consumers before what
#: they consume from. ``flink``: the Flink cluster, its job and the pusher (``--features flink``).
STOP_ORDER = ("prometheus", "serve", "learner", "reweighter", "worker", "worker-2", "flink", "valkey", "broker")
#: ``dev``: one process per stage, the SQLite online store. ``full``: the production topology on
#: one machine -- two Faust workers sharing the partitions, a Redis-protocol online store
#: (Valkey), two serving worker processes, Prometheus with the alert rules.
PROFILES = ("dev", "full")
#: Who computes the windowed features that reach Feast: the Faust worker's feature agent, or
#: the PyFlink job on a standalone Flink cluster with the pusher writing its rows to Feast.
FEATURE_ENGINES = ("faust", "flink")


def flink_home() -> Path:
    """FLINK_HOME and state of the cluster ``ctr flink up`` / ``ctr up --features flink`` start."""
    return state_dir() / "flink"


def start_pusher(home: Path, bootstrap: str, feast_dir: Path, topic: str = "flink-features",
                 online: tuple[str, ...] = ()) -> dict:
    """Start the pusher (``python -m ctr.streams.flink.push``) detached beside the Flink
    cluster at ``home``, recorded in its state so ``ctr flink down`` stops it too."""
    from ctr.streams.flink import cluster

    sup = Supervisor(home / "log")
    svc = sup.start(Service("pusher", [sys.executable, "-m", "ctr.streams.flink.push", "--bootstrap", bootstrap,
                                       "--feast-dir", str(feast_dir), "--topic", topic, *online],
                            detach=True, nice=BATCH_NICE))  # fmt: skip
    assert svc.proc is not None  # started
    cluster.register_process(home, "pusher", svc.proc.pid, str(svc.log_path))
    return {"pid": svc.proc.pid, "log": str(svc.log_path)}


def flink_features(bootstrap: str, feast_dir: Path, *, home: Path | None = None, taskmanagers: int = 1,
                   parallelism: int = 1, say: Callable[[str], object] = print,
                   online: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """The Flink path for the windowed features: a standalone cluster (JobManager +
    ``taskmanagers`` TaskManagers) unless one is up at ``home``, the job submitted (unbounded)
    against ``bootstrap``, the pusher writing its rows to ``feast_dir``. Returns the cluster state."""
    from ctr.streams.flink import cluster
    from ctr.streams.flink.harness import create_output_topic

    home = home or flink_home()
    state = cluster.load_state(home)
    if state is None or not pid_alive(state["processes"]["jobmanager"]["pid"]):
        say(f"starting a Flink cluster in {home} (JobManager + {taskmanagers} TaskManager(s))")
        state = cluster.up(home, cluster.ClusterConfig(taskmanagers=taskmanagers))
    try:
        create_output_topic(bootstrap, "flink-features")
        job = cluster.submit(home, bootstrap, parallelism=parallelism)
        say(f"submitted the windowed-feature job {job['job_id']} ({state['rest_url']})")
        start_pusher(home, bootstrap, feast_dir, online=online)
    except BaseException:
        cluster.down(home)
        raise
    return cluster.load_state(home) or {}


def _state_path() -> Path:
    return state_dir() / "stack.json"


def up(kind: str = "noida", feast_dir: Path | None = None, serve_port: int = 8000,
       say: Callable[[str], object] = print, monitor: bool = False, monitor_port: int = 0,
       profile: str = "dev", features: str = "faust", taskmanagers: int = 1) -> dict:
    """Start broker, worker, reweighter, learner and serving detached (and Prometheus with
    ``monitor``, on ``monitor_port`` or a free one); returns the recorded state.
    ``profile="full"`` (:data:`PROFILES`): two workers, a Valkey online store, two serving
    workers and Prometheus.
    ``features="flink"``: the worker runs the label join only, and the windowed features come
    from the Flink job on a standalone cluster (``taskmanagers`` TaskManagers) through the
    pusher (:func:`flink_features`).
    Model updates are signed (a key pair for the stack unless the environment names one)."""
    from ctr.infra.broker import EmbeddedBroker

    if profile not in PROFILES:
        raise RuntimeError(f"profile={profile!r}: choose one of {', '.join(PROFILES)}")
    if features not in FEATURE_ENGINES:
        raise RuntimeError(f"features={features!r}: choose one of {', '.join(FEATURE_ENGINES)}")
    full = profile == "full"
    monitor = monitor or full
    path = _state_path()
    if path.exists() and any(pid_alive(s["pid"]) for s in json.loads(path.read_text())["services"].values()):
        raise RuntimeError("the stack is already up: `ctr status`, or `ctr down` first")
    if monitor:
        from ctr.monitor import find_prometheus

        find_prometheus()  # before anything starts: a missing binary leaves nothing behind
    root = state_dir()
    feast_dir = feast_dir or root / "feast"
    broker = EmbeddedBroker(kind=kind, data_dir=root / f"broker-{kind}", detach=True).start()
    bs = broker.bootstrap
    assert broker.proc is not None  # started
    pid = broker.proc.pid
    (root / "broker.json").write_text(
        json.dumps({"kind": kind, "bootstrap": bs, "pid": pid, "data_dir": str(root / f"broker-{kind}")})
    )
    sup = Supervisor(root / "logs")
    key, created = run_keys(root / "keys")
    if created:
        say(f"model updates are signed with a key pair created for this stack ({root / 'keys'}; "
                      "set $CTR_SIGNING_KEY and $CTR_VERIFY_KEYS to use your own)")
    sign, verify = stage_flags(key)
    services: dict[str, dict[str, Any]] = {"broker": {"pid": pid, "log": str(root / f"broker-{kind}" / "broker.log"),
                           "health": {"tcp": bs}}}  # fmt: skip

    def undo() -> None:
        """A start-up step failed: stop what is already running (the online store, the broker)."""
        from ctr.infra.broker import stop_broker

        if "valkey" in services:
            stop_process(services["valkey"]["pid"])
        stop_broker(pid, kind, str(root / f"broker-{kind}"), grace_s=15.0)
        (root / "broker.json").unlink(missing_ok=True)

    online: tuple[str, ...] = ()
    if full:  # the online store first: the stages that use it open it at start
        from ctr.features.valkey import Valkey

        store = Valkey(root / "valkey")
        valkey = sup.start(Service("valkey", store.argv(), detach=True))
        assert valkey.proc is not None and valkey.log_path is not None  # started
        services["valkey"] = {"pid": valkey.proc.pid, "log": str(valkey.log_path), "health": {"redis": store.url}}
        try:
            store.wait_ready(valkey.proc, valkey.log_path)
        except RuntimeError:
            undo()
            raise
        online = ("--online", "redis", "--redis-url", store.url)
    workers = [f"worker-{i}" if i > 1 else "worker" for i in range(1, 3 if full else 2)]
    # where each stage serves /metrics (serving on its own port); Prometheus' job names
    metrics = {**{w: free_port() for w in workers}, "reweighter": free_port(), "learner": free_port(),
               "serve": serve_port}  # fmt: skip
    mflag = {name: ("--metrics-port", str(port)) for name, port in metrics.items() if name != "serve"}
    plan = [
        *(Service(
            w,
            ctr_argv("worker", "--bootstrap", bs, "--feast-dir", str(feast_dir), "--instance-id",
                     f"stack-worker-{i}", *online, *mflag[w], *(["--no-features"] if features == "flink" else [])),
            detach=True,
            nice=stage_nice("worker"),
        ) for i, w in enumerate(workers, 1)),
        Service("reweighter", ctr_argv("reweight", "--bootstrap", bs, "--feast-dir", str(feast_dir), *online,
                                       *mflag["reweighter"]), detach=True, nice=stage_nice("reweighter")),
        Service("learner", ctr_argv("learn", "--bootstrap", bs, "--state-dir", str(root / "learner"), *sign,
                                    *mflag["learner"]), detach=True, nice=stage_nice("learner")),
        Service(
            "serve",
            ctr_argv(
                "serve",
                "--bootstrap",
                bs,
                "--snapshot-dir",
                str(root / "learner" / "snapshots"),
                "--feast-dir",
                str(feast_dir),
                "--port",
                str(serve_port),
                *online,
                *(["--workers", "2"] if full else []),
                *verify,
            ),
            detach=True,
        ),
    ]
    if features == "flink":
        try:
            fl = flink_features(bs, feast_dir, taskmanagers=taskmanagers, say=say, online=online)
        except BaseException:
            undo()
            raise
        # one entry; `ctr down` stops the whole cluster (its state: .ctr/flink/cluster.json)
        services["flink"] = {"pid": fl["processes"]["jobmanager"]["pid"], "log": str(flink_home() / "log"),
                             "rest_url": fl["rest_url"], "health": {"http": f"{fl['rest_url']}/overview"}}  # fmt: skip
    prometheus_url = None
    if monitor:
        from ctr.monitor import prometheus_service

        monitor_port = monitor_port or free_port()
        prometheus_url = f"http://127.0.0.1:{monitor_port}"
        # the compose config's job names, so both load the same rules (the workers: one job)
        jobs: dict[str, list[int]] = {}
        for n, p in metrics.items():
            jobs.setdefault("serving" if n == "serve" else n.split("-")[0], []).append(p)
        plan.append(prometheus_service(root / "prometheus", jobs, monitor_port))
    for svc in plan:
        sup.start(svc)
        assert svc.proc is not None  # started
        services[svc.name] = {"pid": svc.proc.pid, "log": str(svc.log_path)}
        if svc.name in metrics:
            services[svc.name]["metrics"] = f"http://127.0.0.1:{metrics[svc.name]}/metrics"
            services[svc.name]["health"] = {"http": services[svc.name]["metrics"]}
    services["serve"]["health"] = {"http": f"http://127.0.0.1:{serve_port}/readyz"}
    if prometheus_url:
        services["prometheus"]["health"] = {"http": f"{prometheus_url}/-/ready"}
    state = {
        "profile": profile,
        "bootstrap": bs,
        "feast_dir": str(feast_dir),
        "features": features,
        "predict_url": f"http://127.0.0.1:{serve_port}/predict",
        "services": services,
    }
    if prometheus_url:
        state["prometheus_url"] = prometheus_url
    path.write_text(json.dumps(state, indent=2))
    if prometheus_url:
        from ctr.monitor import wait_ready

        if not wait_ready(prometheus_url):
            down()
            log = services["prometheus"]["log"]
            raise RuntimeError(f"Prometheus did not become ready; the stack is stopped (log: {log})")
    return state


def healthy(check: dict[str, str], timeout_s: float = 2.0) -> bool:
    """One service's health check as recorded in the state: ``{"http": url}`` answers 2xx,
    ``{"tcp": "host:port"}`` accepts a connection, ``{"redis": "host:port"}`` answers PING."""
    if "http" in check:
        try:
            with urllib.request.urlopen(check["http"], timeout=timeout_s) as r:  # noqa: S310 - loopback URLs we wrote
                return 200 <= r.status < 300
        except (OSError, ValueError):
            return False
    host, _, port = (check.get("tcp") or check.get("redis") or "").rpartition(":")
    if not port_open(host, int(port or 0)):
        return False
    if "redis" in check:
        import redis

        try:
            return bool(redis.Redis(host=host, port=int(port), socket_timeout=timeout_s).ping())
        except redis.RedisError:
            return False
    return True


def down() -> dict[str, str]:
    path = _state_path()
    if not path.exists():
        return {}
    from ctr.infra.broker import stop_broker

    state = json.loads(path.read_text())
    broker_file = state_dir() / "broker.json"
    out = {}
    for name in STOP_ORDER:
        svc = state["services"].get(name)
        if svc:
            was = pid_alive(svc["pid"])
            if name == "flink":
                from ctr.streams.flink import cluster

                cluster.down(flink_home())
            elif name == "broker" and broker_file.exists():
                info = json.loads(broker_file.read_text())
                stop_broker(svc["pid"], info["kind"], info.get("data_dir"), grace_s=15.0)
            else:
                stop_process(svc["pid"], grace_s=15.0)
            out[name] = "stopped" if was else "was not running"
    path.unlink()
    broker_file.unlink(missing_ok=True)
    return out


def status() -> dict:
    path = _state_path()
    if not path.exists():
        return {"up": False}
    state = json.loads(path.read_text())
    out = {
        "up": True,
        "profile": state.get("profile", "dev"),
        "bootstrap": state["bootstrap"],
        "feast_dir": state["feast_dir"],
        "services": {n: {**s, "alive": (alive := pid_alive(s["pid"])),
                         **({"healthy": alive and healthy(s["health"])} if "health" in s else {})}
                     for n, s in state["services"].items()},  # fmt: skip
    }
    if state.get("features") == "flink":  # the cluster's own view: TaskManagers, jobs, pusher
        from ctr.streams.flink import cluster

        out["flink"] = cluster.status(flink_home())
    if "prometheus_url" in state:  # ctr up --monitor: its readiness and the alerts it holds
        from ctr.monitor import health

        out["prometheus"] = health(state["prometheus_url"])
    return out
