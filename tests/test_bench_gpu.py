"""``ctr bench gpu`` runs where there is no GPU (so it cannot rot before a GPU machine runs it),
and ``bench.checkout_ctr`` imports ``ctr.*`` from a checkout with nothing installed (how it runs
on the GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from bench.checkout_ctr import package_dirs
from ctr.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_quick_bench_runs_without_a_gpu_and_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    run = CliRunner().invoke(app, ["bench", "gpu", "--quick", "--json", str(out)])
    assert run.exit_code == 0, run.output[-3000:]
    doc = json.loads(out.read_text())
    assert doc["cuda"] is torch.cuda.is_available()
    assert doc["quick"] is True and doc["commit"] is not None
    sections = doc["sections"]
    assert sections["hashing"]["status"] == "ok", sections["hashing"]
    assert sections["training"]["status"] == "ok", sections["training"]
    assert sections["learner"]["status"] == "skipped" and sections["learner"]["reason"]
    hashing = sections["hashing"]["rows"]
    assert [r["rows"] for r in hashing] == [1024, 4096] and all(r["cpu_1core_Mids_s"] > 0 for r in hashing)
    training = sections["training"]["rows"]
    assert [r["batch"] for r in training] == [256, 512] and all(r["cpu_step_ex_s"] > 0 for r in training)
    if not doc["cuda"]:  # no GPU numbers may appear where there is no GPU
        assert not any(k.startswith("cuda_") or k.startswith("gpu_") for r in doc["rows"] for k in r)
        assert sections["hashing"]["meets_target"] is None and sections["training"]["meets_target"] is None
    assert "| batch |" in run.output  # the README-ready tables were printed


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path: Path, monkeypatch) -> None:
    from bench import gpu

    def broken(plan: gpu.Plan) -> dict:
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu, "hashing_section", broken)
    doc = gpu.main(tmp_path / "gpu.json", quick=True, sections=("hashing", "learner"))
    assert doc["sections"]["hashing"]["status"] == "error" and "boom" in doc["sections"]["hashing"]["error"]
    assert doc["sections"]["learner"]["status"] == "skipped"
    assert doc["sections"]["training"]["status"] == "skipped"
    assert json.loads((tmp_path / "gpu.json").read_text())["sections"] == doc["sections"]


def test_ctr_imports_from_a_checkout_with_nothing_installed() -> None:
    # -S: no site-packages, so neither the editable install nor any third-party package exists;
    # the modules imported here need the standard library only
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import bench.checkout_ctr; "
        "import ctr, ctr.infra.config, ctr.infra.topics; "
        "print(ctr.__file__, ctr.infra.config.__file__, ctr.infra.topics.TOPICS[0].name)"
    )
    done = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    pkg, config, _ = done.stdout.split()
    assert Path(pkg) == ROOT / "ctr" / "__init__.py" and Path(config) == ROOT / "infra" / "config.py"


def test_the_mapping_is_pyprojects() -> None:
    dirs = package_dirs()
    assert dirs["ctr"] == ROOT / "ctr" and dirs["ctr.online_learner"] == ROOT / "online_learner"
    assert all((d / "__init__.py").is_file() for d in dirs.values())
