#!/usr/bin/env bash
# Issue 21 on the GPU machine, in one go: the CUDA tests, then `ctr bench gpu`.
#
# Prepared where git is (`make gpu-carry`: the wheels the GPU image lacks, and the commit), then
# run by the device tool (README, Benchmarks, "GPU path"):
#     run(command="bash bench/gpu_device.sh", carry=[".whl"], timeout_s=480)
# Writes under $OUT: env.txt (GPU, versions, wheel install), pytest_cuda.txt, bench_gpu.txt and
# gpu.json. ctr is not installed there: bench/checkout_ctr.py imports it from the checkout.
# PYTHON, OUT and GPU_BENCH_ARGS may be set to dry-run it elsewhere.
set -u
OUT=${OUT:-/tmp/gpu-out}
PY=${PYTHON:-python3}
SITE=${GPU_SITE:-/tmp/site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# numba-cuda finds NVVM (the kernel's compiler) through CUDA_HOME where no wheel provides it
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi

{
  echo "== wheels (.whl)"
  if ls .whl/*.whl >/dev/null 2>&1; then
    # --no-deps: each dependency is a wheel of its own in .whl; the image's packages stay as they are
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" || echo "WHEEL INSTALL FAILED"
  else
    echo "no .whl/*.whl: run make gpu-carry and carry .whl"
  fi
  # no .git travels: the commit and the state of the tree come from `make gpu-carry`
  if [ -f .whl/TREE ]; then . .whl/TREE; export CTR_BENCH_COMMIT CTR_BENCH_DIRTY; cat .whl/TREE; fi
  echo "== GPU"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  echo "== python"
  "$PY" -c "import sys, torch as t, numba as n, numpy as np; print(sys.version, t.__version__, t.version.cuda,
    t.cuda.is_available(), 'numba', n.__version__, 'numpy', np.__version__)" 2>&1
  "$PY" -c "from numba import cuda; print('numba.cuda', cuda.is_available()); cuda.detect()" 2>&1
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|numba|numpy|typer|rich|psutil|pytest|hypothesis|prometheus|nvidia-ml)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"  # the brace group ran in this shell: PYTHONPATH and the commit are set here too

echo "== tests/test_cuda.py"
timeout 150 "$PY" -m pytest -p bench.checkout_ctr --noconftest -v -rs tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.txt"

echo "== ctr bench gpu"
# GPU_BENCH_ARGS: extra flags, e.g. "--section learner" to rerun one section
timeout 300 "$PY" -m bench.checkout_ctr bench gpu --json "$OUT/gpu.json" ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_gpu.txt"
echo "== done; files in $OUT:"
ls -la "$OUT"
