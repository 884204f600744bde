"""The layers, enforced: every import in the product (module level or inside a function) runs
down the order below, never up or sideways; installing adds one top-level name, ``ctr``.

Bottom to top (docs/architecture.md draws it):

* ``ctr.infra`` -- configuration, topics, broker, processes, Kafka I/O, schema, dead letters;
* ``ctr.features`` | ``ctr.online_learner`` -- independent of each other;
* ``ctr.streams`` | ``ctr.serving`` -- independent of each other;
* the application layer: the modules directly in ``ctr`` (CLI, demo, stack, probe, report, ...);
* ``bench`` -- the benchmarks, in a checkout only; ``ctr bench`` mounts it by name.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("infra", "features", "online_learner", "streams", "serving")
# rank of each layer; siblings share a rank and may not import each other
RANK = {"infra": 0, "features": 1, "online_learner": 1, "streams": 2, "serving": 2, "app": 3, "bench": 4}


def _layer(module: str) -> str | None:
    """The layer of an absolute module name, or None outside the project."""
    parts = module.split(".")
    if parts[0] == "bench":
        return "bench"
    if parts[0] != "ctr":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "app"


def _sources() -> dict[str, list[Path]]:
    """Each layer's files, from the folders the wheel maps under ``ctr``."""
    found: dict[str, list[Path]] = {p: sorted((ROOT / p).rglob("*.py")) for p in PACKAGES}
    found["app"] = sorted((ROOT / "ctr").glob("*.py"))
    found["bench"] = sorted((ROOT / "bench").glob("*.py"))
    return found


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute import in ``path``: (line, module), function-local ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def violations(sources: dict[str, list[Path]]) -> list[str]:
    found = []
    for layer, files in sources.items():
        for path in files:
            for line, module in _imports(path):
                if module.split(".")[0] in PACKAGES:
                    found.append(f"{path.name}:{line} imports {module} by its folder name")
                    continue
                target = _layer(module)
                if target is None or target == layer:
                    continue
                if RANK[target] >= RANK[layer]:
                    found.append(f"{path.name}:{line} ({layer}) imports {module} ({target})")
    return found


def test_every_import_runs_down_the_layers():
    assert violations(_sources()) == []


def test_the_check_sees_upward_sideways_and_folder_name_imports(tmp_path):
    up = tmp_path / "up.py"  # a learner module reaching the serving layer, inside a function
    up.write_text("def f():\n    from ctr.serving.app import create_app\n")
    side = tmp_path / "side.py"  # streams and serving are siblings
    side.write_text("import ctr.serving.registry\n")
    folder = tmp_path / "folder.py"  # a second copy of the module in a checkout
    folder.write_text("from infra.config import TOPICS\n")
    found = violations({"online_learner": [up, folder], "streams": [side], "infra": []})
    assert found == [
        "up.py:2 (online_learner) imports ctr.serving.app (serving)",
        "folder.py:1 imports infra.config by its folder name",
        "side.py:1 (streams) imports ctr.serving.registry (serving)",
    ]


def test_pyproject_maps_every_package_folder():
    """A folder with an ``__init__.py`` that pyproject does not list would be left out of the wheel."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    on_disk = {"ctr"}
    for folder in PACKAGES:
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            on_disk.add(".".join(("ctr", *rel)))
    assert listed == on_disk
    assert conf["package-dir"] == {"ctr": "ctr", **{f"ctr.{p}": p for p in PACKAGES}}


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_name(tmp_path):
    # built from a copy: setuptools builds in-tree, and a stale build/ would hide a missing file
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("ctr", *PACKAGES):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip_wheel, "-w", str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("ctr_stream-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"ctr"}
    assert "ctr/streams/agents/label_join.py" in names and "ctr/features/repo/feature_store.yaml" in names
    assert "ctr/infra/docker/prometheus/alerts.yml" in names  # what `ctr up --monitor` loads (ctr.monitor)
    assert not any(n.startswith(("bench/", "tests/", "ctr/bench/")) for n in names)
    # the console script runs the application layer
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheel) as z:
        assert "ctr = ctr.cli:app" in z.read(entry).decode()
