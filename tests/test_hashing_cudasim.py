"""The real ``@cuda.jit`` bucket-id kernel == the CPU twin, bit for bit, under the CUDA simulator.

The simulator must be switched on before numba is first imported, and it replaces
``numba.cuda`` for the whole process (``compile_ptx`` disappears). So these tests run in their
OWN pytest process: collected in a normal run, :func:`test_simulator_suite_in_own_process`
re-invokes this file with ``NUMBA_ENABLE_CUDASIM=1`` and asserts that every simulator test
passed; in that child process the launcher skips itself and the simulator tests run.
Inputs stay tiny (the simulator runs one Python thread per CUDA thread).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

IN_SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
SIM_TESTS = 4  # number of @simulator tests below; the launcher checks they all passed

simulator = pytest.mark.skipif(not IN_SIMULATOR, reason="runs in its own process under NUMBA_ENABLE_CUDASIM=1")


@pytest.mark.skipif(IN_SIMULATOR, reason="launcher; already inside the simulator process")
def test_simulator_suite_in_own_process() -> None:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--noconftest", __file__]
    proc = subprocess.run(
        cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) == SIM_TESTS, out


def _kernel_ids(keys: np.ndarray, layout, grid=None, block=None) -> np.ndarray:
    from ctr.online_learner.hashing import cuda_kernel, launch_config

    out = np.full((keys.shape[0], layout.total_probes), -1, dtype=np.int32)
    if grid is None:
        grid, block = launch_config(keys.shape[0], layout.total_probes)
    with warnings.catch_warnings():
        # numpy scalars warn when uint64 arithmetic wraps; wrapping is the point of the hash
        warnings.simplefilter("ignore", RuntimeWarning)
        cuda_kernel()[grid, block](keys, layout.probe_field, layout.probe_seed, np.uint64(layout.mask), out)
    return out


@simulator
def test_simulator_is_active() -> None:
    from numba import config, cuda

    from ctr.online_learner.hashing import compile_ptx

    assert config.ENABLE_CUDASIM
    assert getattr(cuda, "compile_ptx", None) is None  # why this file needs its own process

    with pytest.raises(RuntimeError, match="simulator"):
        compile_ptx()


@simulator
@pytest.mark.parametrize("key_dtype", [np.uint64, np.int64])
def test_kernel_equals_twin(key_dtype: type) -> None:
    from ctr.online_learner.hashing import ProbeLayout, bucket_ids_cpu, value_keys

    layout = ProbeLayout.build(["C1", "site", "I1"], {"C1": 1, "site": 2, "I1": 3}, table_bits=20)
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 2**64, size=(5, 3), dtype=np.uint64)
    keys[0] = value_keys(["68fd1e64", "news", None])  # include MISSING_KEY = 0
    keys[1] = np.uint64(2**64 - 1)
    keys = keys.view(key_dtype)
    got = _kernel_ids(keys, layout)  # one block of 32 x 8 threads
    np.testing.assert_array_equal(got, bucket_ids_cpu(keys, layout))


@simulator
def test_kernel_grid_stride_covers_rows_beyond_the_grid() -> None:
    from ctr.online_learner.hashing import ProbeLayout, bucket_ids_cpu

    layout = ProbeLayout.build(["a", "b"], 2, table_bits=13, hash_seed=99)
    keys = np.random.default_rng(4).integers(0, 2**64, size=(7, 2), dtype=np.uint64)
    got = _kernel_ids(keys, layout, grid=(1, 1), block=(4, 2))  # 2 rows per pass, 4 passes
    np.testing.assert_array_equal(got, bucket_ids_cpu(keys, layout))
