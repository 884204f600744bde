"""A process started by one that imported Feast must not inherit Feast's multiprocess-metrics
directory (``ctr/__init__.py``): prometheus_client would keep every metric in mmap'ed files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("import ctr.serving.metrics, os, prometheus_client.values as v;"
         "print(v.ValueClass.__name__, os.environ.get('PROMETHEUS_MULTIPROC_DIR'))")


@pytest.mark.parametrize(("directory", "expected"), [
    ("/tmp/feast_metrics_abc123", "MutexValue None"),  # Feast's: dropped
    ("/tmp/my-metrics", "MmapedValue /tmp/my-metrics"),  # the user's: kept (multiprocess values)
])
def test_feast_multiprocess_dir_is_not_inherited(tmp_path, directory: str, expected: str) -> None:
    d = tmp_path / directory.rsplit("/", 1)[1]
    d.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(d), "PROMETHEUS_MULTIPROCESS_DIR": str(d)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == expected.replace(directory, str(d)).split()


def test_feast_imported_later_cannot_switch_the_value_class() -> None:
    code = "import ctr, feast.metrics, prometheus_client.values as v; print(v.ValueClass.__name__)"
    env = {k: v for k, v in os.environ.items() if "MULTIPROC" not in k.upper()}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "MutexValue"
