"""``ctr up --monitor``: a real Prometheus watching the stack, with the alert rules the compose
deployment loads (infra/docker/prometheus/alerts.yml, one file for both).

The compose config finds its targets through Docker's DNS; here the stages listen on free
loopback ports chosen by ``ctr up``, so the config is written per stack (same job names, hence
the same rules) into the stack's state dir, next to Prometheus' own data dir. Prometheus itself
listens on a free loopback port too: never 9090, where a system Prometheus (Debian's package
ships a service) may already be.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

import ctr.infra
from ctr.supervisor import Service

#: the rules both setups load (shipped in the wheel as package data of ctr.infra)
RULES = Path(ctr.infra.__file__).resolve().parent / "docker" / "prometheus" / "alerts.yml"
#: Scrape and evaluation interval of the local config. Short, so "stage down" (``for: 10s``)
#: fires within seconds of a kill; one scrape of four local endpoints costs next to nothing.
INTERVAL = "2s"


def find_prometheus() -> str:
    exe = shutil.which("prometheus")
    if exe is None:
        raise RuntimeError("--monitor needs the prometheus binary on PATH (Debian: apt-get install -y "
                           "--no-install-recommends prometheus)")  # fmt: skip
    return exe


def write_config(out_dir: Path, targets: Mapping[str, int | Sequence[int]], rules: Path = RULES) -> Path:
    """``prometheus.yml`` scraping ``job -> port`` (or ports: one job, several processes) on
    127.0.0.1, loading ``rules``."""
    cfg = {
        "global": {"scrape_interval": INTERVAL, "scrape_timeout": INTERVAL, "evaluation_interval": INTERVAL},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [
                f"127.0.0.1:{port}" for port in ([ports] if isinstance(ports, int) else ports)]}]}
            for job, ports in targets.items()
        ],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "prometheus.yml"
    path.write_text("# written by `ctr up --monitor` (ctr/monitor.py); rewritten on every start\n"
                    + yaml.safe_dump(cfg, sort_keys=False))  # fmt: skip
    return path


def prometheus_service(out_dir: Path, targets: Mapping[str, int | Sequence[int]], port: int) -> Service:
    """The Prometheus process for the supervisor: config and data under ``out_dir``."""
    config = write_config(out_dir, targets)
    argv = [
        find_prometheus(),
        f"--config.file={config}",
        f"--storage.tsdb.path={out_dir / 'data'}",
        "--storage.tsdb.retention.time=2d",  # a local stack's history, not an archive
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    return Service("prometheus", argv, detach=True)


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - a loopback URL we built
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, b""
    except OSError:
        return 0, b""


def ready(url: str) -> bool:
    return _get(f"{url}/-/ready")[0] == 200


def wait_ready(url: str, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not ready(url):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def alerts(url: str) -> list[dict]:
    """Prometheus' active alerts (pending and firing): name, state, labels."""
    code, body = _get(f"{url}/api/v1/alerts")
    if code != 200:
        return []
    return [{"alert": a["labels"].get("alertname"), "state": a["state"],
             "labels": {k: v for k, v in a["labels"].items() if k != "alertname"}}
            for a in json.loads(body)["data"]["alerts"]]  # fmt: skip


def health(url: str) -> dict:
    """What ``ctr status`` shows of Prometheus: ready or not, and the alerts it holds."""
    if not ready(url):
        return {"url": url, "ready": False}
    active = alerts(url)
    return {
        "url": url,
        "ready": True,
        "firing": [a for a in active if a["state"] == "firing"],
        "pending": [a for a in active if a["state"] == "pending"],
    }
