"""Import ``ctr`` from this checkout without installing it.

Why: the GPU machine lent to this project (the ``device`` tool) has Python, torch and
numba-cuda but no way to ``pip install -e .``. Installed, the stage folders at the top of the
checkout (``infra/``, ``online_learner/``, ...) become ``ctr.infra``, ``ctr.online_learner``,
... (pyproject's ``[tool.setuptools.package-dir]``); an editable install does that with a
meta-path finder. This module installs the same finder, built from the same table, so the
mapping cannot drift from pyproject:

* ``python -m bench.checkout_ctr ARGS`` is ``ctr ARGS`` (``bench gpu``, ``learn``, ...);
* ``python -m pytest -p bench.checkout_ctr --noconftest tests/test_cuda.py`` imports ``ctr.*``
  the same way (importing this module installs the finder);
* :func:`command` is the argv prefix for a ``ctr`` subprocess that works either way.

A ``sys.path`` entry would not do: the checkout root is on ``sys.path`` (``python -m``, pytest's
``pythonpath``), where ``ctr/`` is the application layer alone, so ``import ctr.infra`` fails. A
finder at the front of ``sys.meta_path`` wins over ``sys.path`` whatever its order. Where ctr is
installed from this checkout (the dev machines' editable install) both finders agree.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """``ctr`` package name -> folder, from pyproject's ``[tool.setuptools.package-dir]``."""
    table = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name: (root / folder).resolve() for name, folder in table.items()}


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the mapped packages (``ctr``, ``ctr.infra``, ...) in their folders; everything below
    them (``ctr.streams.agents``, ``ctr.cli``) is found through the parent's ``__path__``."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        folder = self.dirs.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def install(root: Path = ROOT) -> str:
    """Make ``import ctr.*`` load this checkout; idempotent. Returns how ctr is found."""
    if any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
        return "checkout finder"
    loaded = sys.modules.get("ctr")
    if loaded is not None and Path(loaded.__file__ or "").resolve() != root / "ctr" / "__init__.py":
        # ctr.* already imported from elsewhere: mixing two copies would be worse than failing
        raise RuntimeError(f"ctr is already imported from {loaded.__file__}, not from the checkout {root}")
    sys.meta_path.insert(0, CheckoutFinder(package_dirs(root)))
    return "checkout finder"


def command(*args: str) -> list[str]:
    """argv of ``ctr ARGS`` run from this checkout (installed or not); run it with ``cwd=ROOT``."""
    return [sys.executable, "-m", "bench.checkout_ctr", *args]


install()


if __name__ == "__main__":
    from ctr.cli import main

    # the result files record the command as `ctr ...`, as when the installed script runs it
    sys.argv[0] = "ctr"
    main()
