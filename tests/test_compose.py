"""docker-compose.yml against the code it runs.

The compose files are validated by a real Compose implementation (Debian's ``docker-compose``
1.29, which runs ``config`` without a Docker engine; ``.ci/run`` installs it). Everything else
is checked against the real code: each ``ctr`` command is parsed by the real click command
tree (an unknown option fails), each environment variable is read somewhere in the sources,
each port, healthcheck, scrape target and upstream matches the flags the services get, and the
Grafana dashboard only queries metric names the code registers.
"""

from __future__ import annotations

import inspect
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


def kafka_listeners(kafka: dict) -> dict[str, dict[str, str]]:
    """Listener name -> its bind address, advertised address and security protocol."""
    env = env_of(kafka)
    protocols = dict(x.split(":") for x in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    bound = dict(x.split("://") for x in env["KAFKA_LISTENERS"].split(","))
    advertised = dict(x.split("://") for x in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    return {n: {"bind": bound[n], "advertised": advertised.get(n, ""), "protocol": protocols[n]} for n in bound}


def test_kafka_and_redis_addresses(cfg: dict) -> None:
    services = cfg["services"]
    listeners = kafka_listeners(services["kafka"])
    by_address = {v["advertised"]: v for v in listeners.values() if v["advertised"]}
    for name, svc in services.items():
        env = env_of(svc)
        if "CTR_BOOTSTRAP" in env:
            listener = by_address[env["CTR_BOOTSTRAP"]]
            assert listener["protocol"] == env["CTR_KAFKA_SECURITY_PROTOCOL"], name  # the one config says SASL
        if "REDIS_CONNECTION_STRING" in env:
            host, port = env["REDIS_CONNECTION_STRING"].split(",")[0].split(":")
            assert host in services and int(port) == 6379, name  # redis-server's default port
            assert "--port" not in services[host]["command"]
    for p in container_ports(services["kafka"]):
        assert listeners["EXTERNAL"]["bind"] == f":{p}" and listeners["EXTERNAL"]["advertised"] == f"localhost:{p}"
    # a plaintext listener is reachable from the broker's own container only
    for name, listener in listeners.items():
        assert listener["protocol"].startswith("SASL_") or listener["bind"].startswith("127.0.0.1:"), name
    kafka = env_of(services["kafka"])
    assert kafka["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false" and kafka["KAFKA_SUPER_USERS"] == "User:ANONYMOUS"
    assert f"127.0.0.1:{listeners['INTERNAL']['bind'].rsplit(':', 1)[1]}" in " ".join(
        services["kafka"]["healthcheck"]["test"]
    )


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
    import ctr.infra.lag  # noqa: F401
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
    # the topic is created as kafka-init creates users: on the broker's loopback listener
    assert services["flink-topic"]["network_mode"] == "service:kafka"
    internal = kafka_listeners(services["kafka"])["INTERNAL"]
    assert topic_cmd[topic_cmd.index("--bootstrap-server") + 1] == internal["advertised"] == internal["bind"]
    assert env_of(services["flink-job"])["CTR_KAFKA_USERNAME"] == "flink"
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


# --------------------------------------------------------------------------- authentication
ACLS = DOCKER / "kafka" / "acls.conf"
REDIS_ACL = DOCKER / "redis" / "users.acl"


def kafka_acls() -> list[tuple[str, set[str], str, str, str]]:
    """``(principal, operations, resource, pattern, name)`` of each line of acls.conf."""
    rows = []
    for line in ACLS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            principal, ops, resource, pattern, name = line.split()
            rows.append((principal, set(ops.split(",")), resource, pattern, name))
    return rows


def allowed(principal: str, op: str, resource: str = "topic") -> set[str]:
    """Names (prefixed ones end with '*') ``principal`` may ``op`` (Read and Write imply Describe)."""
    return {name + ("*" if pattern == "prefixed" else "") for p, ops, res, pattern, name in kafka_acls()
            if p == principal and res == resource and op in ops}  # fmt: skip


def secret_mounts(svc: dict) -> dict[str, str]:
    """target file name -> compose secret, for one service."""
    out = {}
    for s in svc.get("secrets", []):
        source, target = (s, s) if isinstance(s, str) else (s["source"], s.get("target", s["source"]))
        out[target] = source
    return out


def test_every_kafka_client_service_logs_in_as_its_own_user(cfg: dict, tmp_path: Path) -> None:
    from ctr.infra.security import kafka_security

    services, principals = cfg["services"], {row[0] for row in kafka_acls()}
    users = {}
    for name, svc in services.items():
        env = env_of(svc)
        if "CTR_BOOTSTRAP" not in env or name in ("feature-server", "keys"):  # no Kafka client in these
            continue
        user = env["CTR_KAFKA_USERNAME"]
        assert user in principals, f"{name}: {user} has no ACLs"
        assert secret_mounts(svc)["kafka-password"] == f"kafka-{user}-password", name
        assert env["CTR_KAFKA_PASSWORD_FILE"] == "/run/secrets/kafka-password", name
        (tmp_path / "pw").write_text("x\n")
        k = kafka_security({**env, "CTR_KAFKA_PASSWORD_FILE": str(tmp_path / "pw")})  # what the service builds
        assert (k.protocol, k.mechanism, k.username) == ("SASL_PLAINTEXT", "SCRAM-SHA-512", user), name
        assert env_of(services["kafka"])["KAFKA_SASL_ENABLED_MECHANISMS"] == k.mechanism
        users[name] = user
    assert users == {"topics": "topics", "worker": "worker", "reweighter": "reweighter", "learner": "learner",
                     "serving": "serving", "replay": "replay", "flink-job": "flink"}  # fmt: skip
    # kafka-init creates every principal's credential from that principal's secret
    init = services["kafka-init"]
    assert set(secret_mounts(init)) == {f"kafka-{p}-password" for p in principals}
    assert init["network_mode"] == "service:kafka" and init["command"] == ["bash", "/etc/ctr/kafka/init.sh"]
    assert services["topics"]["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"


def test_kafka_acls_match_the_code() -> None:
    from ctr.infra.topics import (
        CLICKS_TOPIC,
        DEAD_LETTER_TOPIC,
        EXAMPLES_TOPIC,
        FIELD_WEIGHTS_TOPIC,
        IMPRESSIONS_TOPIC,
        LATE_TOPIC,
        MODEL_UPDATES_TOPIC,
        SERVED_SCORES_TOPIC,
        TOPIC_NAMES,
    )
    from ctr.online_learner.trainer import TrainerConfig
    from ctr.streams.app import DEFAULT_APP_ID
    from ctr.streams.flink.sql import DEFAULT_OUTPUT_TOPIC, JobConfig
    from ctr.streams.reweighting import Reweighter
    from ctr.streams.worker import internal_topics

    for principal, _, resource, pattern, name in kafka_acls():
        assert resource in ("topic", "group") and pattern in ("literal", "prefixed"), name
        if resource == "topic" and pattern == "literal":
            assert name in TOPIC_NAMES | {DEFAULT_OUTPUT_TOPIC}, f"{principal}: no topic {name} in the code"
    # only the learner may write what serving applies; serving reads it and writes only its prediction log
    assert {p for p, ops, res, _, n in kafka_acls() if n == MODEL_UPDATES_TOPIC and "Write" in ops} == {"learner"}
    assert allowed("serving", "Read") == {MODEL_UPDATES_TOPIC} and allowed("serving", "Write") == {SERVED_SCORES_TOPIC}
    # the worker: raw events in, examples (and late clicks, dead letters) out, plus its own topics
    assert allowed("worker", "Read") == {IMPRESSIONS_TOPIC, CLICKS_TOPIC, f"{DEFAULT_APP_ID}-*"}
    assert allowed("worker", "Write") == {EXAMPLES_TOPIC, LATE_TOPIC, DEAD_LETTER_TOPIC, f"{DEFAULT_APP_ID}-*"}
    assert all(t.name.startswith(f"{DEFAULT_APP_ID}-") for t in internal_topics(DEFAULT_APP_ID))
    assert allowed("learner", "Read") == {EXAMPLES_TOPIC, FIELD_WEIGHTS_TOPIC, SERVED_SCORES_TOPIC, MODEL_UPDATES_TOPIC}
    assert allowed("learner", "Write") == {MODEL_UPDATES_TOPIC, DEAD_LETTER_TOPIC}
    assert allowed("reweighter", "Write") == {FIELD_WEIGHTS_TOPIC, DEAD_LETTER_TOPIC}
    assert allowed("replay", "Write") == {IMPRESSIONS_TOPIC, CLICKS_TOPIC} and not allowed("replay", "Read")
    assert allowed("topics", "Create") == TOPIC_NAMES
    # consumer groups: the ones the code joins or commits
    learner_group = TrainerConfig.__dataclass_fields__["group_id"].default
    assert allowed("learner", "Read", "group") == {learner_group, f"{learner_group}-tail"}
    assert allowed("worker", "Read", "group") == {DEFAULT_APP_ID, "ctr-range-reader", "ctr-gap-probe"}
    reweighting = inspect.signature(Reweighter).parameters["group_id"].default
    assert allowed("reweighter", "Read", "group") == {reweighting, f"{reweighting}-tail"}
    assert allowed("serving", "Read", "group") == {"ctr-serving-*"}  # serving/updates.py: one group per replica
    assert allowed("flink", "Read", "group") == {JobConfig("x").group}
    updates = (REPO / "serving" / "updates.py").read_text()
    assert 'f"ctr-serving-{socket.gethostname()}-{os.getpid()}"' in updates
    kafka_io = (REPO / "infra" / "kafka_io.py").read_text()
    assert '"ctr-range-reader"' in kafka_io and '"ctr-gap-probe"' in kafka_io


def test_redis_users_are_the_ones_the_services_log_in_as(cfg: dict) -> None:
    services = cfg["services"]
    rules = {line.split()[1]: line for line in REDIS_ACL.read_text().splitlines() if line.startswith("user ")}
    roles = {"ctr-features-writer": "writer", "ctr-features-reader": "reader"}
    assert set(rules) == {"default", *roles}
    assert rules["default"].endswith("-@all +ping")  # unauthenticated: the healthcheck's PING only
    assert "+@write" not in rules["ctr-features-reader"] and "+@write" in rules["ctr-features-writer"]
    logins = {}
    for name, svc in services.items():
        env = env_of(svc)
        if env.get("CTR_ONLINE_STORE") == "redis" and name not in ("topics", "keys", "learner", "replay"):
            user = env["CTR_REDIS_USERNAME"]
            assert secret_mounts(svc)["redis-password"] == f"redis-{roles[user]}-password", name
            assert env["CTR_REDIS_PASSWORD_FILE"] == "/run/secrets/redis-password", name
            assert "password=" not in env["REDIS_CONNECTION_STRING"], name
            logins[name] = roles[user]
    assert logins == {"worker": "writer", "reweighter": "writer", "serving": "reader", "feature-server": "reader"}
    redis = services["redis"]
    start = (DOCKER / "redis" / "start.sh").read_text()
    assert redis["entrypoint"] == ["sh", "/etc/ctr/redis/start.sh"]
    assert "./infra/docker/redis:/etc/ctr/redis:ro" in redis["volumes"]
    for role in roles.values():
        assert f"/run/secrets/redis-{role}-password" in start and f"redis-{role}-password" in secret_mounts(redis)
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"]) and "ping" in redis["healthcheck"]["test"]


def test_compose_secrets_are_the_files_ctr_secrets_writes(cfg: dict) -> None:
    from ctr.cli import COMPOSE_SECRETS

    assert cfg["secrets"] == {f"{n}-password": {"file": f"./secrets/{n}.password"} for n in COMPOSE_SECRETS}
    mounted = {src for svc in cfg["services"].values() for src in secret_mounts(svc).values()}
    assert mounted == set(cfg["secrets"])
    assert "/secrets/" in (REPO / ".gitignore").read_text().splitlines()
    # no secret value in the compose file itself: every password comes from a secret file
    for name, svc in cfg["services"].items():
        for var in env_of(svc):
            assert not (var.endswith("PASSWORD") and var.startswith(("CTR_KAFKA", "CTR_REDIS"))), name
