"""A standalone Flink cluster from the PyFlink wheel: ``ctr flink up|submit|status|down``.

The ``apache-flink`` wheel in ``.venv-flink`` ships Flink's distribution (``pyflink/bin``,
``lib``, ``opt``, ``plugins``). :func:`up` makes a FLINK_HOME under a state directory whose
``bin plugins`` (and every file of ``lib opt``) link into the wheel and whose ``conf/config.yaml`` is written here
(process sizes ~1 GiB, everything bound to 127.0.0.1 on free ports, checkpoints on local
disk, a restart strategy), then starts a JobManager and N TaskManagers as separate
processes (``jobmanager.sh`` / ``taskmanager.sh start-foreground`` -- each one ``exec``\\ s
its JVM, so the recorded pid *is* the JVM), detached, through :class:`ctr.supervisor`'s
sibling plumbing (:mod:`ctr.infra.procs`). :func:`submit` runs ``flink run -py
streams/flink/job.py`` against it; :func:`status` asks the REST API; :func:`down` cancels
the jobs and stops the processes (SIGTERM, then SIGKILL).

State (ports, pids, logs) lives in ``<state>/cluster.json``; logs in ``<state>/log``.
Main venv only (the job itself runs with ``.venv-flink``'s interpreter).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctr.infra.procs import free_port, pid_alive, port_open, stop_process

REPO = Path(__file__).resolve().parents[2]
FLINK_VENV = REPO / ".venv-flink"
JOB = REPO / "streams" / "flink" / "job.py"
#: What the wheel provides and the FLINK_HOME links to (``conf`` is written, never linked).
LINKED = ("bin", "plugins")
#: Directories made here with one link per file: ``config.sh`` lists their jars with ``find DIR``,
#: which does not descend into a starting point that is itself a symlink.
JAR_DIRS = ("lib", "opt")
STATE_FILE = "cluster.json"


@dataclass(frozen=True)
class ClusterConfig:
    """The knobs of :func:`up` (the rest of ``config.yaml`` is fixed by :func:`config_yaml`)."""

    taskmanagers: int = 1
    slots: int = 1
    #: Process sizes. 1 GiB leaves a TaskManager ~200 MiB of task heap once managed memory is
    #: cut to 64 MiB (the job keeps its state on the heap, so RocksDB's managed memory is unused).
    jobmanager_mb: int = 1024
    taskmanager_mb: int = 1024
    managed_mb: int = 64
    checkpoint_interval_s: float = 10.0
    #: How soon a TaskManager that stopped answering (kill -9) is declared lost.
    heartbeat_timeout_ms: int = 10_000


def flink_venv() -> Path | None:
    """The Flink environment (``make flink-setup``; ``$CTR_FLINK_VENV`` overrides), or None."""
    venv = Path(os.environ.get("CTR_FLINK_VENV", FLINK_VENV))
    return venv if (venv / "bin" / "python").exists() else None


def pyflink_dir(venv: Path) -> Path:
    """``<venv>/lib/pythonX.Y/site-packages/pyflink``: the wheel's Flink distribution."""
    found = sorted(venv.glob("lib/python3*/site-packages/pyflink/bin/flink"))
    if not found:
        raise RuntimeError(f"no PyFlink distribution in {venv} (`make flink-setup`)")
    return found[0].parents[1]


def java_home() -> str | None:
    """``$JAVA_HOME``, else Debian's Java 17 if present; None: the ``java`` on PATH."""
    if os.environ.get("JAVA_HOME"):
        return os.environ["JAVA_HOME"]
    jdk17 = Path("/usr/lib/jvm/java-17-openjdk-amd64")
    return str(jdk17) if (jdk17 / "bin" / "java").exists() else None


def _java_opts(dist: Path) -> str:
    """The wheel config's ``env.java.opts.all`` (the ``--add-opens`` Flink needs on Java 17)."""
    m = re.search(r"^\s+all:\s*(.+)$", (dist / "conf" / "config.yaml").read_text(), re.M)
    return m.group(1).strip() if m else ""


def config_yaml(home: Path, cfg: ClusterConfig, rest_port: int, rpc_port: int, python: Path, java_opts: str) -> str:
    """The cluster's ``config.yaml`` (flat keys, which Flink's YAML parser accepts)."""
    conf = {
        "env.java.opts.all": java_opts,
        "env.log.dir": str(home / "log"),
        "env.pid.dir": str(home / "pids"),
        # Everything on loopback: the wheel's defaults bind REST to every interface on 8081.
        "jobmanager.bind-host": "127.0.0.1",
        "jobmanager.rpc.address": "127.0.0.1",
        "jobmanager.rpc.port": str(rpc_port),
        "jobmanager.memory.process.size": f"{cfg.jobmanager_mb}m",
        "jobmanager.execution.failover-strategy": "region",
        "taskmanager.bind-host": "127.0.0.1",
        "taskmanager.host": "127.0.0.1",
        "taskmanager.numberOfTaskSlots": str(cfg.slots),
        "taskmanager.memory.process.size": f"{cfg.taskmanager_mb}m",
        "taskmanager.memory.managed.size": f"{cfg.managed_mb}m",
        "rest.address": "127.0.0.1",
        "rest.bind-address": "127.0.0.1",
        "rest.port": str(rest_port),
        "parallelism.default": "1",
        # Checkpoints on local disk (one machine: every TaskManager sees the same directory).
        "state.backend.type": "hashmap",
        "execution.checkpointing.dir": (home / "checkpoints").resolve().as_uri(),
        "execution.checkpointing.savepoint-dir": (home / "savepoints").resolve().as_uri(),
        "execution.checkpointing.interval": f"{int(cfg.checkpoint_interval_s * 1000)} ms",
        # A lost TaskManager fails its tasks; restart them (from the last checkpoint) as soon
        # as slots exist again, for as long as it takes a new TaskManager to arrive.
        "restart-strategy.type": "fixed-delay",
        "restart-strategy.fixed-delay.attempts": "1000",
        "restart-strategy.fixed-delay.delay": "2 s",
        "heartbeat.interval": "2000",
        "heartbeat.timeout": str(cfg.heartbeat_timeout_ms),
        # Python workers (UDFs) and `flink run -py`'s client: the Flink venv, not PATH's python.
        "python.executable": str(python),
        "python.client.executable": str(python),
    }
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in conf.items())


def make_home(home: Path, venv: Path, cfg: ClusterConfig, rest_port: int, rpc_port: int) -> Path:
    """Create (or refresh) FLINK_HOME at ``home``: links into the wheel, a written ``conf/``."""
    dist = pyflink_dir(venv)
    home.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = home / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(dist / name, target_is_directory=True)
    for name in JAR_DIRS:
        d = home / name
        if d.is_symlink():
            d.unlink()
        elif d.exists():
            shutil.rmtree(d)
        d.mkdir()
        for f in sorted((dist / name).iterdir()):
            (d / f.name).symlink_to(f)
    conf = home / "conf"
    if conf.exists():
        shutil.rmtree(conf)
    shutil.copytree(dist / "conf", conf)
    (conf / "config.yaml").write_text(
        config_yaml(home, cfg, rest_port, rpc_port, venv / "bin" / "python", _java_opts(dist))
    )
    for sub in ("log", "pids", "checkpoints", "savepoints"):
        (home / sub).mkdir(exist_ok=True)
    return home


def flink_env(home: Path) -> dict[str, str]:
    """Environment of every Flink script run against ``home``. ``bin`` links into the wheel and
    ``config.sh`` resolves its own location with ``pwd -P``: without ``_FLINK_HOME_DETERMINED``
    it would take the wheel as FLINK_HOME and read the wheel's ``conf``."""
    env = {
        **os.environ,
        "FLINK_HOME": str(home),
        "_FLINK_HOME_DETERMINED": "1",
        "FLINK_CONF_DIR": str(home / "conf"),
        "FLINK_LOG_DIR": str(home / "log"),
        "FLINK_PID_DIR": str(home / "pids"),
    }
    env.pop("JVM_ARGS", None)  # the process sizes decide the heap
    if jh := java_home():
        env["JAVA_HOME"] = jh
    return env


def _start(home: Path, name: str, script: str) -> dict[str, Any]:
    """Start ``bin/<script> start-foreground`` detached (own session, outlives the caller);
    its stdout/stderr go to ``log/<name>.out``."""
    out_path = home / "log" / f"{name}.out"
    with open(out_path, "ab") as out:
        proc = subprocess.Popen(
            [str(home / "bin" / script), "start-foreground"],
            cwd=home,
            env=flink_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return {"pid": proc.pid, "log": str(out_path)}


def load_state(home: Path) -> dict[str, Any] | None:
    path = home / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _save_state(home: Path, state: dict[str, Any]) -> None:
    (home / STATE_FILE).write_text(json.dumps(state, indent=2))


def rest(state: dict[str, Any], path: str, method: str = "GET", timeout: float = 5.0) -> Any:
    """One call to the cluster's REST API; the decoded JSON answer."""
    req = urllib.request.Request(state["rest_url"] + path, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body else {}


def wait_taskmanagers(state: dict[str, Any], n: int, timeout_s: float = 90.0) -> dict[str, Any]:
    """Wait until the REST API answers and reports at least ``n`` TaskManagers; the overview."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        dead = [k for k, p in state["processes"].items() if not pid_alive(p["pid"])]
        if "jobmanager" in dead:
            raise RuntimeError(f"the JobManager exited; log: {state['processes']['jobmanager']['log']}")
        try:
            last = rest(state, "/overview")
            if last.get("taskmanagers", 0) >= n:
                return dict(last)
        except (OSError, urllib.error.URLError, ValueError) as err:
            last = err
        time.sleep(0.5)
    raise TimeoutError(f"the cluster has not {n} TaskManager(s) after {timeout_s}s (last: {last}); logs in "
                       f"{Path(state['home']) / 'log'}")  # fmt: skip


def up(home: Path, cfg: ClusterConfig = ClusterConfig(), venv: Path | None = None, wait_s: float = 120.0) -> dict:
    """Make FLINK_HOME at ``home`` and start a JobManager and ``cfg.taskmanagers`` TaskManagers;
    return once the REST API reports them all. Raises if one is already running there."""
    venv = venv or flink_venv()
    if venv is None:
        raise RuntimeError(f"no Flink environment at {FLINK_VENV}: run `make flink-setup`")
    home = home.resolve()
    old = load_state(home)
    if old and any(pid_alive(p["pid"]) for p in old["processes"].values()):
        raise RuntimeError(f"a Flink cluster is already up at {old['rest_url']}: `ctr flink down` first")
    rest_port, rpc_port = free_port(), free_port()
    make_home(home, venv, cfg, rest_port, rpc_port)
    state: dict[str, Any] = {
        "home": str(home),
        "venv": str(venv),
        "rest_url": f"http://127.0.0.1:{rest_port}",
        "rpc_port": rpc_port,
        "config": cfg.__dict__,
        "processes": {},
        "jobs": {},
    }
    state["processes"]["jobmanager"] = _start(home, "jobmanager", "jobmanager.sh")
    _save_state(home, state)
    try:
        deadline = time.monotonic() + wait_s
        while not port_open("127.0.0.1", rest_port):
            if not pid_alive(state["processes"]["jobmanager"]["pid"]):
                raise RuntimeError(f"the JobManager exited; log: {state['processes']['jobmanager']['log']}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the JobManager's REST port {rest_port} did not open in {wait_s}s")
            time.sleep(0.3)
        for _ in range(cfg.taskmanagers):
            add_taskmanager(home, state)
        wait_taskmanagers(state, cfg.taskmanagers, max(10.0, deadline - time.monotonic()))
    except BaseException:
        down(home)
        raise
    return state


def add_taskmanager(home: Path, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Start one more TaskManager (e.g. to replace a lost one); returns its process entry."""
    state = state or load_state(home)
    if state is None:
        raise RuntimeError(f"no Flink cluster at {home}: `ctr flink up` first")
    n = 1 + max((int(k.split("-")[1]) for k in state["processes"] if k.startswith("taskmanager-")), default=0)
    name = f"taskmanager-{n}"
    state["processes"][name] = _start(Path(state["home"]), name, "taskmanager.sh")
    _save_state(Path(state["home"]), state)
    return dict(state["processes"][name])


def register_process(home: Path, name: str, pid: int, log: str) -> None:
    """Record a process started beside the cluster (the pusher) so :func:`down` stops it too."""
    state = load_state(home)
    if state is None:
        raise RuntimeError(f"no Flink cluster at {home}")
    state["processes"][name] = {"pid": pid, "log": log}
    _save_state(Path(state["home"]), state)


def running_jobs(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Jobs the cluster holds that have not finished (RUNNING, RESTARTING, CREATED, ...)."""
    done = {"FINISHED", "CANCELED", "FAILED"}
    return [j for j in rest(state, "/jobs/overview")["jobs"] if j["state"] not in done]


def submit(
    home: Path,
    bootstrap: str,
    *,
    parallelism: int = 1,
    group: str = "ctr-flink-features",
    job_args: tuple[str, ...] = (),
    timeout_s: float = 300.0,
    log: Path | None = None,
) -> dict[str, Any]:
    """``flink run -py streams/flink/job.py --bootstrap ...`` against the cluster at ``home``.

    An unbounded job returns once submitted (the cluster owns it); a bounded one (``job_args``
    with ``--end-offsets``) once it finished. Returns ``{"job_id", "output"...}``; raises with
    the client's output on failure."""
    state = load_state(home)
    if state is None:
        raise RuntimeError(f"no Flink cluster at {home}: `ctr flink up` first")
    home = Path(state["home"])
    python = Path(state["venv"]) / "bin" / "python"
    argv = [
        str(home / "bin" / "flink"), "run",
        "-pyclientexec", str(python), "-pyexec", str(python),
        "-py", str(JOB),
        "--bootstrap", bootstrap, "--parallelism", str(parallelism), "--group", group, *job_args,
    ]  # fmt: skip
    env = flink_env(home)
    env["PYFLINK_CLIENT_EXECUTABLE"] = str(python)
    out = log or home / "log" / f"submit-{int(time.time())}.out"
    with open(out, "wb") as f:
        proc = subprocess.run(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s,
                              check=False)  # fmt: skip
    text = out.read_text(errors="replace")
    ids = re.findall(r"JobID ([0-9a-f]{32})", text)
    if proc.returncode != 0 or not ids:
        raise RuntimeError(f"`flink run` failed (rc {proc.returncode}); output {out}:\n{text[-4000:]}")
    summary = [json.loads(line) for line in text.splitlines() if line.startswith('{"flink_job"')]
    job = {"job_id": ids[-1], "bootstrap": bootstrap, "group": group, "log": str(out),
           **(summary[-1] if summary else {})}  # fmt: skip
    state["jobs"][ids[-1]] = job
    _save_state(home, state)
    return job


def status(home: Path) -> dict[str, Any]:
    """The recorded processes (alive or not) and, if the REST API answers, its overview
    (TaskManagers, slots, version) and the jobs with their states."""
    state = load_state(home)
    if state is None:
        return {"up": False}
    out: dict[str, Any] = {
        "up": True,
        "rest_url": state["rest_url"],
        "processes": {k: {**p, "alive": pid_alive(p["pid"])} for k, p in state["processes"].items()},
    }
    try:
        ov = rest(state, "/overview")
        out["overview"] = {k: ov.get(k) for k in ("flink-version", "taskmanagers", "slots-total", "slots-available",
                                                  "jobs-running", "jobs-finished", "jobs-failed", "jobs-cancelled")}
        out["jobs"] = [{"id": j["jid"], "name": j["name"], "state": j["state"]}
                       for j in rest(state, "/jobs/overview")["jobs"]]  # fmt: skip
    except (OSError, urllib.error.URLError, ValueError) as err:
        out["rest_error"] = str(err)
    return out


def cancel_jobs(state: dict[str, Any]) -> list[str]:
    """Cancel every job that has not finished; their ids."""
    ids = []
    try:
        for j in running_jobs(state):
            rest(state, f"/jobs/{j['jid']}?mode=cancel", method="PATCH")
            ids.append(j["jid"])
    except (OSError, urllib.error.URLError, ValueError):
        pass  # the JobManager is gone: stopping the processes ends the jobs too
    return ids


def down(home: Path, grace_s: float = 15.0) -> dict[str, str]:
    """Cancel the jobs, stop the TaskManagers then the JobManager; forget the state."""
    home = home.resolve()
    state = load_state(home)
    if state is None:
        return {}
    out: dict[str, str] = {f"job {j}": "cancelled" for j in cancel_jobs(state)}
    procs = state["processes"]
    extras = [k for k in procs if k != "jobmanager" and not k.startswith("taskmanager-")]
    names = extras + sorted((k for k in procs if k.startswith("taskmanager-")), reverse=True) + ["jobmanager"]
    for name in names:
        p = state["processes"].get(name)
        if p is None:
            continue
        was = pid_alive(p["pid"])
        stop_process(p["pid"], grace_s=grace_s)
        out[name] = "stopped" if was else "was not running"
    (home / STATE_FILE).unlink(missing_ok=True)
    return out
