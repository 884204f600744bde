"""Every docstring example in the ``ctr`` namespace runs, imported as the installed package
(``ctr.streams.replay``, not ``streams.replay``: a second copy of a module would register its
metrics twice)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import ctr

SUBPACKAGES = ("infra", "features", "online_learner", "streams", "serving")


def modules() -> list[str]:
    names = [f"ctr.{m.name}" for m in pkgutil.iter_modules(ctr.__path__) if m.name != "__main__"]
    for sub in SUBPACKAGES:
        pkg = importlib.import_module(f"ctr.{sub}")
        names.append(pkg.__name__)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg.__name__}.")]
    return sorted(n for n in names if not n.endswith("__main__"))


@pytest.mark.parametrize("name", modules())
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
