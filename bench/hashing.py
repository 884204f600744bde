"""Multi-probe hashing throughput: CPU twin (one core) vs pure-Python spec vs torch integer ops.

    python -m bench.hashing --json bench/results/hashing.json

Shape: a Criteo-like batch, 26 categorical fields x 2 probes = 52 bucket ids per row. Every
implementation's output is checked against the twin before it is timed. Also times the string
-> key step (njit XXH64 batch, and the cached :class:`ValueKeyer` path). On a machine with CUDA
the Numba-CUDA kernel is timed too (torch CUDA tensors in and out, torch's stream).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from bench.common import report, timings
from ctr.online_learner.hashing import (
    ProbeLayout,
    ValueKeyer,
    bucket_ids_cpu,
    hash_buckets,
    spec_bucket_ids,
    value_keys,
)
from ctr.streams.datasets.criteo import CATEGORICAL

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_CPU_HASHES_PER_S = 200e6


def _torch_mix_buckets(keys: torch.Tensor, layout: ProbeLayout) -> torch.Tensor:
    """Baseline: the same hash with torch int64 ops (wrapping mul; logical shifts by masking)."""

    def shr(z: torch.Tensor, s: int) -> torch.Tensor:
        return (z >> s) & ((1 << (64 - s)) - 1)

    def s64(v: int) -> int:  # uint64 constant as the int64 with the same bits
        return v - (1 << 64) if v >= 1 << 63 else v

    seeds = torch.from_numpy(layout.probe_seed.view(np.int64))
    z = keys.index_select(1, torch.from_numpy(layout.probe_field.astype(np.int64))) ^ seeds
    z = z + s64(0x9E3779B97F4A7C15)
    z = (z ^ shr(z, 30)) * s64(0xBF58476D1CE4E5B9)
    z = (z ^ shr(z, 27)) * s64(0x94D049BB133111EB)
    z = z ^ shr(z, 31)
    return (z & layout.mask).int()


def _row(name: str, hashes: int, times: list[float], **extra: object) -> dict:
    best, med = min(times), float(np.median(times))
    return {
        "impl": name,
        "hashes": hashes,
        "Mhash/s best": hashes / best / 1e6,
        "Mhash/s median": hashes / med / 1e6,
        **extra,
    }


def run(rows: int, repeats: int) -> tuple[list[dict], dict]:
    torch.set_num_threads(1)  # per-core numbers for every CPU implementation
    layout = ProbeLayout.build(list(CATEGORICAL), probes=2, table_bits=20)
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**64, size=(rows, layout.num_fields), dtype=np.uint64)
    out = np.empty((rows, layout.total_probes), dtype=np.int32)
    n_hashes = out.size
    results = []

    twin = bucket_ids_cpu(keys, layout)
    results.append(_row("twin: njit, 1 core", n_hashes, timings(lambda: bucket_ids_cpu(keys, layout, out), repeats)))

    small = keys[:2000]
    assert (spec_bucket_ids(small, layout) == twin[:2000]).all()
    results.append(
        _row(
            "spec: pure Python",
            small.shape[0] * layout.total_probes,
            timings(lambda: spec_bucket_ids(small, layout), 1),
        )
    )

    tkeys = torch.from_numpy(keys.view(np.int64))
    assert torch.equal(_torch_mix_buckets(tkeys[:1000], layout), torch.from_numpy(twin[:1000]))
    results.append(_row("torch int64, 1 thread", n_hashes, timings(lambda: _torch_mix_buckets(tkeys, layout), repeats)))

    if torch.cuda.is_available():  # pragma: no cover - no GPU on the dev machines
        dkeys = tkeys.cuda()
        ids = hash_buckets(dkeys, layout)
        assert torch.equal(ids.cpu(), torch.from_numpy(twin)), "CUDA kernel != CPU twin"
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats + 1):
            start.record()
            hash_buckets(dkeys, layout)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        results.append(_row("numba-cuda kernel", n_hashes, times[1:], device=torch.cuda.get_device_name()))

    # strings -> uint64 keys, the once-per-value step on the way in
    values = [f"{v:08x}" for v in rng.integers(0, 2**32, size=200_000)]
    n_vals = len(values)
    t_xxh = timings(lambda: value_keys(values), repeats)
    keyer = ValueKeyer()
    keyer(values)
    t_cached = timings(lambda: keyer(values), repeats)
    strings = [
        {"impl": "str->key: njit XXH64", "Mvalues/s": n_vals / min(t_xxh) / 1e6},
        {"impl": "str->key: cached", "Mvalues/s": n_vals / min(t_cached) / 1e6},
    ]
    twin_rate = results[0]["Mhash/s best"] * 1e6
    extra = {
        "layout": {"fields": layout.num_fields, "probes_per_field": 2, "table_bits": layout.table_bits},
        "batch_rows": rows,
        "target_cpu_hashes_per_s": TARGET_CPU_HASHES_PER_S,
        "cpu_twin_meets_target": twin_rate >= TARGET_CPU_HASHES_PER_S,
        "speedup_twin_vs_spec": twin_rate / (results[1]["Mhash/s best"] * 1e6),
        "speedup_twin_vs_torch": twin_rate / (results[2]["Mhash/s best"] * 1e6),
        "string_keys": strings,
        "load_average": os.getloadavg(),
        "cuda": torch.cuda.is_available(),
    }
    return results, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=RESULTS / "hashing.json")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rows, extra = run(args.rows, args.repeats)
    report(
        "hashing throughput (26 fields x 2 probes; strings -> keys)", rows + extra.pop("string_keys"), args.json, extra
    )


if __name__ == "__main__":
    main()
