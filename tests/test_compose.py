"""docker-compose.yml against the code it runs.

The compose files are validated by a real Compose implementation (Debian's ``docker-compose``
1.29, which runs ``config`` without a Docker engine; ``.ci/run`` installs it). Everything else
is checked against the real code: each ``ctr`` command is parsed by the real click command
tree (an unknown option fails), each environment variable is read somewhere in the sources,
each port, healthcheck, scrape target and upstream matches the flags the services get, and the
Grafana dashboard only queries metric names the code registers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer.core
import typer.main
import yaml

from ctr.cli import app

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
GPU = REPO / "docker-compose.gpu.yml"
DOCKER = REPO / "infra" / "docker"
SOURCE_DIRS = ("streams", "features", "online_learner", "serving", "infra", "bench")
#: Interpolation variants: every default, and the production-style overrides docs/deployment.md names.
VARIANTS: list[dict[str, str]] = [
    {},
    {"CTR_REPLICATION_FACTOR": "3", "CTR_HTTP_PORT": "8080", "REDIS_APPENDONLY": "no", "CTR_ADMIN_TOKEN": "s3cret"},
]
#: Variables read by something other than the project's Python code, and by what.
NOT_OURS = {
    "PYTHONUNBUFFERED": "the Python interpreter",
    "FLINK_PROPERTIES": "the Flink image's entrypoint (appended to the Flink config)",
}
_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*))?\}")


# --------------------------------------------------------------------------- loading
def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` / ``${VAR-default}`` / ``$$`` on every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.groups()
        got = env.get(name)
        if op == ":-":
            return got if got else default
        if op == "-":
            return default if got is None else got
        return got or ""

    return _VAR.sub(sub, value)


def load(*files: Path, env: dict[str, str] | None = None) -> dict:
    """The merged model of ``files`` (later files override services key by key, as Compose does
    for the mappings used here) with variables interpolated."""
    merged: dict = {}
    for f in files:
        cfg = interpolate(yaml.safe_load(f.read_text()), env or {})
        for key, val in cfg.items():
            if key == "services":
                services = merged.setdefault("services", {})
                for name, svc in val.items():
                    services[name] = {**services.get(name, {}), **svc}
            elif not key.startswith("x-"):
                merged[key] = val
    return merged


def env_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def is_project(svc: dict) -> bool:
    return str(svc.get("image", "")).startswith("ctr-stream:")


def is_flink(svc: dict) -> bool:
    return str(svc.get("image", "")).startswith("ctr-flink:")


def container_ports(svc: dict) -> list[int]:
    out = []
    for p in svc.get("ports", []):
        out.append(int(str(p).split(":")[-1].split("/")[0]))
    return out


def parse_ctr(args: list[str]) -> list[Any]:
    """Parse ``ctr ARGS`` down the real command tree without running anything; returns the
    contexts from the root to the leaf command. Unknown commands/options raise UsageError."""
    cmd: Any = typer.main.get_command(app)
    name, rest, parent, chain = "ctr", list(args), None, []
    assert "--help" not in rest, "a --help would stop the parse before the options are checked"
    while True:
        ctx = cmd.make_context(name, rest, parent=parent, resilient_parsing=False)
        chain.append(ctx)
        if not isinstance(cmd, typer.core.TyperGroup):  # typer's own (vendored) click classes
            assert not ctx.args, f"ctr {' '.join(args)}: unexpected arguments {ctx.args}"
            return chain
        # the group keeps the subcommand name apart from its arguments (TyperGroup.parse_args)
        name, sub, rest = cmd.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        assert sub is not None, f"ctr {' '.join(args)}: no such command {name}"
        cmd, parent = sub, ctx


@pytest.fixture(scope="module", params=range(len(VARIANTS)), ids=["defaults", "overridden"])
def variant(request: pytest.FixtureRequest) -> dict[str, str]:
    return VARIANTS[request.param]


@pytest.fixture(scope="module")
def cfg(variant: dict[str, str]) -> dict:
    return load(COMPOSE, env=variant)


@pytest.fixture(scope="module")
def parsed(cfg: dict) -> dict[str, dict[str, Any]]:
    """Each project service's leaf command params, parsed with exactly its environment."""
    out = {}
    saved = dict(os.environ)
    try:
        for name, svc in cfg["services"].items():
            if not is_project(svc):
                continue
            # Only the service's own environment: an option backed by an env var (--online
            # from CTR_ONLINE_STORE) must get its value from the compose file, not from us.
            os.environ.clear()
            os.environ.update({k: v for k, v in saved.items() if not k.startswith(("CTR_", "REDIS_"))})
            os.environ.update(env_of(svc))
            leaf = parse_ctr([str(a) for a in svc["command"]])[-1]
            out[name] = {"command": leaf.command_path, **leaf.params}
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return out


def listening_ports(params: dict[str, Any]) -> set[int]:
    return {p for p in (params.get("port"), params.get("metrics_port")) if p}


# --------------------------------------------------------------------------- the real validator
def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        msg = "docker-compose not installed (Debian: apt-get install docker-compose; .ci/run does this)"
        if os.environ.get("CI"):
            pytest.fail(msg)  # never skipped in CI
        pytest.skip(msg)
    return exe


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, GPU]], ids=["base", "gpu"])
def test_compose_files_are_valid_and_read_as_we_read_them(files: list[Path], variant: dict[str, str]) -> None:
    exe = _docker_compose()
    args = [exe, "--project-directory", str(REPO), "-p", "ctr"]
    for f in files:
        args += ["-f", str(f)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **variant}
    run = subprocess.run([*args, "config"], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr + run.stdout
    resolved = yaml.safe_load(run.stdout)
    ours = load(*files, env=variant)
    assert set(resolved["services"]) == set(ours["services"])
    # What the rest of this file checks is what Compose will run: commands and environments.
    for name, svc in ours["services"].items():
        real = resolved["services"][name]
        if "command" in svc:
            assert [str(a) for a in real["command"]] == [str(a) for a in svc["command"]], name
        assert env_of(real) == env_of(svc), name


# --------------------------------------------------------------------------- commands
def test_every_ctr_command_parses_with_the_real_cli(parsed: dict[str, dict[str, Any]]) -> None:
    expected = {
        "topics": "ctr topics create",
        "keys": "ctr keygen",
        "worker": "ctr worker",
        "reweighter": "ctr reweight",
        "learner": "ctr learn",
        "serving": "ctr serve",
        "feature-server": "ctr features serve",
        "replay": "ctr replay",
    }
    assert {k: v["command"] for k, v in parsed.items()} == expected
    # Every stage that touches Feast selects Redis through the environment it is given.
    for name in ("worker", "reweighter", "serving", "feature-server"):
        assert parsed[name]["online"] == "redis", name
    assert parsed["reweighter"]["feast_dir"] is not None, "without --feast-dir the weights never reach Feast"
    assert parsed["serving"]["host"] == parsed["feature-server"]["host"] == "0.0.0.0"


def test_every_environment_variable_is_read_by_the_code(cfg: dict) -> None:
    sources = "\n".join(p.read_text() for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py"))
    checked = 0
    for name, svc in cfg["services"].items():
        if not (is_project(svc) or is_flink(svc)):
            continue
        for var in env_of(svc):
            if var in NOT_OURS:
                continue
            assert re.search(rf"[\"']{var}[\"']", sources), f"{name}: {var} is read nowhere in {SOURCE_DIRS}"
            checked += 1
    assert checked > 20


def test_metrics_servers_listen_beyond_loopback(cfg: dict, parsed: dict[str, dict[str, Any]]) -> None:
    for name, params in parsed.items():
        if params.get("metrics_port"):
            assert env_of(cfg["services"][name]).get("CTR_BIND") == "0.0.0.0", name


# --------------------------------------------------------------------------- ports and addresses
def test_ports_and_healthchecks_match_the_flags(cfg: dict, parsed: dict[str, dict[str, Any]]) -> None:
    services = cfg["services"]
    for name, params in parsed.items():
        svc = services[name]
        ports = listening_ports(params)
        for p in container_ports(svc):
            assert p in ports, f"{name} publishes {p} but listens on {ports}"
        check = " ".join(map(str, svc.get("healthcheck", {}).get("test", [])))
        for p in re.findall(r"127\.0\.0\.1:(\d+)", check):
            assert int(p) in ports, f"{name} healthcheck asks port {p}; it listens on {ports}"
        restart = svc.get("restart")
        if not ports:  # one-shot jobs have no healthcheck and must not be restarted
            assert "healthcheck" not in svc and restart == "no", name
        else:
            assert "healthcheck" in svc, f"{name} listens on {ports} but has no healthcheck"


def test_kafka_and_redis_addresses(cfg: dict) -> None:
    services = cfg["services"]
    kafka = env_of(services["kafka"])
    advertised = kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")
    listeners = {int(x.rsplit(":", 1)[1]) for x in kafka["KAFKA_LISTENERS"].split(",")}
    for name, svc in services.items():
        env = env_of(svc)
        if "CTR_BOOTSTRAP" in env:
            assert f"PLAINTEXT://{env['CTR_BOOTSTRAP']}" in advertised, name
        if "REDIS_CONNECTION_STRING" in env:
            host, port = env["REDIS_CONNECTION_STRING"].split(",")[0].split(":")
            assert host in services and int(port) == 6379, name  # redis-server's default port
            assert "--port" not in services[host]["command"]
    for p in container_ports(services["kafka"]):
        assert p in listeners and f"EXTERNAL://localhost:{p}" in advertised


def test_learner_state_reaches_serving(cfg: dict, parsed: dict[str, dict[str, Any]]) -> None:
    services = cfg["services"]
    mounts = {n: {v.split(":")[1]: v.split(":")[0] for v in s.get("volumes", [])} for n, s in services.items()}
    state = str(parsed["learner"]["state_dir"])
    volume = mounts["learner"][state]
    snap = Path(parsed["serving"]["snapshot_dir"])
    assert any(mounts["serving"].get(str(p)) == volume for p in snap.parents), "serving cannot see the snapshots"
    assert Path(state) / "snapshots" == snap  # where online_learner/trainer.py writes them
    for name, m in mounts.items():  # bind mounts point at files in the repository
        for src in m.values():
            if src.startswith("./"):
                assert (REPO / src).exists(), f"{name}: {src} missing"


def test_load_balancer_reaches_serving(cfg: dict, parsed: dict[str, dict[str, Any]]) -> None:
    conf = (DOCKER / "nginx" / "nginx.conf").read_text()
    host, port = re.search(r"^\s*server\s+([\w-]+):(\d+)\s+resolve;", conf, re.M).groups()
    assert host == "serving" and int(port) == parsed["serving"]["port"]
    assert container_ports(cfg["services"]["lb"]) == [int(re.search(r"listen\s+(\d+);", conf).group(1))]
    assert "/lb-health" in " ".join(cfg["services"]["lb"]["healthcheck"]["test"])
    assert "ports" not in cfg["services"]["serving"], "replicas cannot share a host port; nginx publishes"


# --------------------------------------------------------------------------- observability
def test_prometheus_scrapes_every_metrics_endpoint(cfg: dict, parsed: dict[str, dict[str, Any]]) -> None:
    prom = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    scraped: dict[str, int] = {}
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                scraped[host] = sd["port"]
        for sc in job.get("static_configs", []):
            for target in sc["targets"]:
                host, port = target.rsplit(":", 1)
                scraped[host] = int(port)
    metrics_at = {
        name: params.get("metrics_port") or (params["port"] if params["command"] == "ctr serve" else None)
        for name, params in parsed.items()
    }
    assert scraped == {k: v for k, v in metrics_at.items() if v}
    assert container_ports(cfg["services"]["prometheus"]) == [9090]  # Prometheus' default listen port


def exposed_metric_names() -> set[str]:
    """Every sample name the code's metrics expose, from the real prometheus_client registry."""
    from prometheus_client import REGISTRY

    import ctr.infra.deadletter  # noqa: F401
    import ctr.online_learner.publisher  # noqa: F401 - importing registers the metrics
    import ctr.online_learner.trainer  # noqa: F401
    import ctr.serving.app  # noqa: F401
    import ctr.serving.features  # noqa: F401
    import ctr.serving.updates  # noqa: F401
    import ctr.streams.reweighting  # noqa: F401
    from ctr.streams.agents import label_join_agent, windowed_features
    from ctr.streams.metrics import changelog_bytes

    label_join_agent._metrics()  # registered lazily, when the worker builds its agents
    windowed_features._metrics()
    changelog_bytes()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    names = set()
    for fam in REGISTRY.collect():
        names.add(fam.name)
        names.update(fam.name + s for s in suffixes.get(fam.type, ()))
    return {n for n in names if n.startswith("ctr_")}


def test_grafana_is_provisioned_with_real_metric_names(cfg: dict) -> None:
    grafana = cfg["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (ds,) = datasource["datasources"]
    assert ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/ctr.yml").read_text())["providers"][0]
    dash_dir = REPO / mounts[provider["options"]["path"]]
    home = env_of(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dash_dir / Path(home).relative_to(provider["options"]["path"])).exists()
    assert mounts["/etc/grafana/provisioning"] == "./infra/docker/grafana/provisioning"

    known = exposed_metric_names()
    used = set()
    for path in dash_dir.glob("*.json"):
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            assert panel["datasource"]["uid"] == ds["uid"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == ds["uid"]
                used.update(re.findall(r"\bctr_[a-z0-9_]+", target["expr"]))
    assert used, "the dashboard queries nothing"
    assert used <= known, f"not exposed by the code: {sorted(used - known)}"


# --------------------------------------------------------------------------- flink and gpu
def test_flink_services_run_the_job_file(cfg: dict, capsys: pytest.CaptureFixture[str]) -> None:
    services = cfg["services"]
    flink = {n: s for n, s in services.items() if s.get("profiles")}
    assert {n for n, s in flink.items() if is_flink(s)} == {"jobmanager", "taskmanager", "flink-job"}
    assert set(flink) == {"jobmanager", "taskmanager", "flink-job", "flink-topic"}
    assert all(s["profiles"] == ["flink"] for s in flink.values()), "Flink is opt-in"
    dockerfile = (DOCKER / "flink" / "Dockerfile").read_text()
    assert "flink-sql-connector-kafka" in dockerfile and "/opt/flink/lib/" in dockerfile
    cmd = services["flink-job"]["command"]
    job = cmd[cmd.index("-py") + 1]
    assert job.startswith("/app/") and "COPY streams streams" in dockerfile and "WORKDIR /app" in dockerfile
    assert (REPO / job.removeprefix("/app/")).exists(), f"{job}: the PyFlink job is not in the repository"
    # The job's own arguments parse with its real parser (--explain: print the SQL, run nothing),
    # and its output topic is the one the flink-topic service creates.
    from ctr.streams.flink import job as flink_job

    job_args = cmd[cmd.index("-py") + 2 :]
    assert flink_job.main([*job_args, "--explain"]) == 0 and "INSERT INTO" in capsys.readouterr().out
    topic_cmd = services["flink-topic"]["command"]
    assert job_args[job_args.index("--output-topic") + 1] == topic_cmd[topic_cmd.index("--topic") + 1]
    kafka = env_of(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert f"PLAINTEXT://{topic_cmd[topic_cmd.index('--bootstrap-server') + 1]}" in kafka
    venv_python = cmd[cmd.index("-pyexec") + 1]
    assert venv_python.startswith("/opt/venv/") and "python3 -m venv /opt/venv" in dockerfile
    rest_port = next(int(a.split("=")[1]) for a in cmd if a.startswith("-Drest.port="))
    assert container_ports(services["jobmanager"]) == [rest_port]
    assert f"127.0.0.1:{rest_port}/" in " ".join(services["jobmanager"]["healthcheck"]["test"])


def test_gpu_override_only_changes_the_learner() -> None:
    base, gpu = load(COMPOSE), load(COMPOSE, GPU)
    assert yaml.safe_load(GPU.read_text())["services"].keys() == {"learner"}
    learner = gpu["services"]["learner"]
    (device,) = learner["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert "cu" in learner["build"]["args"]["TORCH_SPEC"] and learner["image"] != base["services"]["learner"]["image"]
    assert learner["command"] == base["services"]["learner"]["command"]


def test_deployment_docs_cover_every_service_and_knob() -> None:
    docs = (REPO / "docs" / "deployment.md").read_text()
    raw = re.sub(r"#.*", "", COMPOSE.read_text() + GPU.read_text())  # the knobs, not the comments
    for knob in set(re.findall(r"\$\{(\w+)", raw)):
        assert f"`{knob}`" in docs, f"docs/deployment.md does not explain {knob}"
    for name in load(COMPOSE)["services"]:
        assert f"`{name}`" in docs, f"docs/deployment.md does not mention the service {name}"
