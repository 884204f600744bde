"""``ctr bench gpu``: the GPU path measured against the CPU on the same machine (issue 21).

    ctr bench gpu [--json bench/results/gpu.json] [--quick] [--section hashing ...]
    python -m bench.checkout_ctr bench gpu ...   # where ctr is not installed (the GPU machine)

Three sections, each guarded: one that fails records its error and the others still run, and
the JSON is rewritten after every section, so a run cut short keeps what it measured.

1. ``hashing`` -- bucket ids/s of the Numba-CUDA kernel (``hash_buckets`` on torch CUDA tensors:
   the torch <-> Numba hand-off included) for 2^16..2^24 rows, against the CPU twin on one core
   and on every core (it releases the GIL); every GPU result is checked against the twin.
2. ``training`` -- examples/s of ``OnlineCTR`` as ``ctr learn`` ships it, per batch size
   (:mod:`bench.gpu_learner`).
3. ``learner`` -- the whole ``ctr learn --device cuda`` fed by the embedded broker
   (:mod:`bench.gpu_learner`).

With no CUDA device every section runs its CPU side only and the JSON says ``"cuda": false``.
``--quick`` shrinks everything to seconds (the test suite runs it so the script cannot rot).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import bench.checkout_ctr  # noqa: F401 - ctr.* from this checkout, installed or not
from bench.common import machine, print_table, provenance, timings

if TYPE_CHECKING:
    import torch

    from ctr.online_learner.hashing import ProbeLayout

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("hashing", "training", "learner")
#: issue 21's targets
TARGET_HASH_IDS_PER_S = 1e9
TARGET_STEP_EXAMPLES_PER_S = 2e6


class Skipped(Exception):
    """A section that cannot run here; its reason is recorded (status "skipped")."""


@dataclass(frozen=True)
class Plan:
    """How much of each section to run (full: ~3 min on an H100-class machine; quick: seconds)."""

    hash_rows: tuple[int, ...]
    hash_gpu_reps: int
    hash_cpu_reps: int
    train_batches: tuple[int, ...]
    train_examples: int
    #: seconds each (device, mode, batch size) measurement runs for, after its warm-up
    train_seconds: float
    #: examples on the topic for the whole learner; 0 skips it
    learn_examples: int


FULL = Plan(
    hash_rows=tuple(2**k for k in range(16, 25)),
    hash_gpu_reps=10,
    hash_cpu_reps=3,
    train_batches=tuple(2**k for k in range(8, 15)),
    train_examples=2**17,
    train_seconds=1.5,
    learn_examples=300_000,
)
QUICK = Plan(
    hash_rows=(2**10, 2**12),
    hash_gpu_reps=2,
    hash_cpu_reps=1,
    train_batches=(256, 512),
    train_examples=1024,
    train_seconds=0.1,
    learn_examples=0,
)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def nvidia_smi(query: str) -> str | None:
    """One ``nvidia-smi --query-gpu`` field of GPU 0, or None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_facts() -> dict:
    """The accelerator and the software that drives it (what a reader needs to compare runs)."""
    import numba
    import torch

    facts: dict = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "numba": numba.__version__,
                   "numba_cuda": _version("numba-cuda"), "cpu_count": os.cpu_count()}  # fmt: skip
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(name=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                     memory_gb=round(p.total_memory / 2**30, 1), driver=nvidia_smi("driver_version"))  # fmt: skip
    return facts


class Utilisation:
    """GPU busy % sampled in a thread while a measurement runs: ``torch.cuda.utilization`` (NVML,
    via nvidia-ml-py), else ``nvidia-smi``, else nothing (``source`` None). NVML reports the share
    of its last sample period (1/6 s to 1 s) in which a kernel ran, so short runs read coarse."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.source = self._probe()
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _probe(self) -> str | None:
        if not cuda_available():
            return None
        for source in ("nvml", "nvidia-smi"):
            if self._read(source) is not None:
                return source
        return None

    @staticmethod
    def _read(source: str | None) -> float | None:
        try:
            if source == "nvml":
                import torch

                return float(torch.cuda.utilization(0))
            if source == "nvidia-smi":
                v = nvidia_smi("utilization.gpu")
                return None if v is None else float(v)
        except Exception:  # no NVML, no driver tool: the reading is simply absent
            return None
        return None

    def __enter__(self) -> Utilisation:
        self.samples = []
        if self.source is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            v = self._read(self.source)
            if v is not None:
                self.samples.append(v)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict:
        s = self.samples
        return {"gpu_util_mean": round(float(np.mean(s)), 1) if s else None,
                "gpu_util_max": round(float(np.max(s)), 1) if s else None}  # fmt: skip


# --------------------------------------------------------------------------------------- hashing
def _all_cores(keys: np.ndarray, layout: ProbeLayout, out: np.ndarray, pool: ThreadPoolExecutor, n: int) -> None:
    """The CPU twin over row blocks on every core (its njit loop releases the GIL)."""
    from ctr.online_learner.hashing import bucket_ids_cpu

    bounds = np.linspace(0, keys.shape[0], n + 1).astype(int)
    list(pool.map(lambda i: bucket_ids_cpu(keys[bounds[i] : bounds[i + 1]], layout, out[bounds[i] : bounds[i + 1]]),
                  range(n)))  # fmt: skip


def hashing_section(plan: Plan) -> dict:
    """Bucket ids/s by batch rows: CUDA kernel (where there is one) vs the CPU twin."""
    import torch

    from ctr.online_learner.hashing import ProbeLayout, bucket_ids_cpu, hash_buckets
    from ctr.streams.datasets.criteo import CATEGORICAL

    # the hashing bench's shape (bench/hashing.py): 26 Criteo fields x 2 probes = 52 ids per row
    layout = ProbeLayout.build(list(CATEGORICAL), probes=2, table_bits=20)
    top, cuda = max(plan.hash_rows), torch.cuda.is_available()
    cores = os.cpu_count() or 1
    if cuda:  # random 64-bit keys drawn on the GPU and copied once (3.5 GB at 2^24 rows)
        shape = (top, layout.num_fields)
        high = torch.randint(-(2**31), 2**31, shape, dtype=torch.int64, device="cuda")
        dkeys_all = (high << 32) | torch.randint(0, 2**32, shape, dtype=torch.int64, device="cuda")
        del high
        keys_all = dkeys_all.cpu().numpy()
    else:
        keys_all = np.random.default_rng(0).integers(0, 2**64, (top, layout.num_fields), dtype=np.uint64)
    # the twin on every core over all rows: the reference every GPU result is checked against
    # (rows hash independently, so a prefix of it is the answer for a prefix of the keys)
    twin_all = np.empty((top, layout.total_probes), dtype=np.int32)
    rows: list[dict] = []
    with ThreadPoolExecutor(cores) as pool:
        _all_cores(keys_all[:1024], layout, twin_all[:1024], pool, cores)  # compile, not timed
        t = time.perf_counter()
        _all_cores(keys_all, layout, twin_all, pool, cores)
        print(f"  reference ids for {top:,} rows on {cores} cores in {time.perf_counter() - t:.1f} s", flush=True)
        for n in plan.hash_rows:
            keys, out, ids = keys_all[:n], twin_all[:n], n * layout.total_probes
            # (the lambdas run at once, inside this iteration: B023's late binding cannot bite)
            one = timings(lambda: bucket_ids_cpu(keys, layout, out), plan.hash_cpu_reps)  # noqa: B023
            every = timings(lambda: _all_cores(keys, layout, out, pool, cores), plan.hash_cpu_reps)  # noqa: B023
            row: dict = {"rows": n, "ids": ids, "cpu_1core_Mids_s": ids / min(one) / 1e6,
                         f"cpu_{cores}cores_Mids_s": ids / min(every) / 1e6}  # fmt: skip
            if cuda:
                row.update(_cuda_hash(dkeys_all[:n], layout, twin_all[:n], plan.hash_gpu_reps, hash_buckets))
                row["gpu_vs_all_cores"] = round(row["gpu_Mids_s"] / row[f"cpu_{cores}cores_Mids_s"], 2)
            rows.append(row)
            print_table(f"hashing, {n:,} rows", [row])
    best = max((r.get("gpu_Mids_s", 0.0) for r in rows), default=0.0) * 1e6
    return {"rows": rows, "layout": {"fields": layout.num_fields, "probes_per_field": 2, "table_bits": 20},
            "target_gpu_ids_per_s": TARGET_HASH_IDS_PER_S, "best_gpu_ids_per_s": best if cuda else None,
            "meets_target": best >= TARGET_HASH_IDS_PER_S if cuda else None}  # fmt: skip


def _cuda_hash(dkeys: torch.Tensor, layout: ProbeLayout, want: np.ndarray, reps: int, hash_buckets: Callable) -> dict:
    """GPU time per call by CUDA events (the output's allocation and Numba's launch included: what
    the trainer pays), host time per launch, and a check against the twin."""
    import torch

    got = hash_buckets(dkeys, layout)  # the first call compiles the kernel
    torch.cuda.synchronize()
    if not np.array_equal(got.cpu().numpy(), want):
        raise AssertionError(f"CUDA kernel != CPU twin at {want.shape[0]:,} rows")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    gpu_s, host_s = [], []
    for _ in range(reps):
        start.record()
        t = time.perf_counter()
        hash_buckets(dkeys, layout)
        host_s.append(time.perf_counter() - t)
        end.record()
        end.synchronize()
        gpu_s.append(start.elapsed_time(end) / 1e3)
    ids = want.size
    return {"gpu_Mids_s": ids / min(gpu_s) / 1e6, "gpu_Mids_s_median": ids / float(np.median(gpu_s)) / 1e6,
            "gpu_ms": min(gpu_s) * 1e3, "launch_us": float(np.median(host_s)) * 1e6, "checked": True}  # fmt: skip


# --------------------------------------------------------------------------------------- driver
def _guarded(name: str, fn: Callable[[], dict]) -> dict:
    """Run one section; an exception becomes its recorded error (the other sections still run)."""
    print(f"== {name}", flush=True)
    t = time.perf_counter()
    try:
        out = {"status": "ok", **fn()}
    except Skipped as why:
        out = {"status": "skipped", "reason": str(why)}
    except Exception as err:  # recorded, never fatal: the point of the guard
        traceback.print_exc()
        out = {"status": "error", "error": f"{type(err).__name__}: {err}",
               "traceback": traceback.format_exc(limit=8)[-4000:]}  # fmt: skip
    out["seconds"] = round(time.perf_counter() - t, 1)
    print(f"== {name}: {out['status']} in {out['seconds']} s", flush=True)
    return out


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(path)  # a reader never sees half a file, even if the run is killed mid-write


def main(json_path: Path, quick: bool = False, sections: tuple[str, ...] = SECTIONS,
         learn_examples: int | None = None) -> dict:  # fmt: skip
    """Run the chosen sections; returns the document written to ``json_path``."""
    from bench import gpu_learner

    plan = QUICK if quick else FULL
    if learn_examples is not None:
        plan = Plan(**{**asdict(plan), "learn_examples": learn_examples})
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    cuda = cuda_available()
    doc: dict = {"bench": "gpu path: CUDA hashing kernel, model step and learner vs the CPU",
                 "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                 "cuda": cuda, "quick": quick, "plan": asdict(plan), "device": device_facts(),
                 "sections": {}, "rows": []}  # fmt: skip
    print(f"cuda: {cuda}; {doc['device']}", flush=True)
    runs: dict[str, Callable[[], dict]] = {
        "hashing": lambda: hashing_section(plan),
        "training": lambda: gpu_learner.training_section(plan, Utilisation),
        "learner": lambda: gpu_learner.learner_section(plan, Utilisation),
    }
    for name in SECTIONS:
        if name not in sections:
            doc["sections"][name] = {"status": "skipped", "reason": "not asked for (--section)"}
            continue
        doc["sections"][name] = result = _guarded(name, runs[name])
        doc["rows"] += [{"section": name, **r} for r in result.get("rows", [])]
        doc.update(provenance())  # the load and the tree as of now, each time the file is written
        _write(Path(json_path), doc)
    print(render(doc), flush=True)
    print(f"wrote {json_path}", flush=True)
    return doc


def render(doc: dict) -> str:
    """The result as README tables (markdown) -- for ``bench/report.py`` once a GPU run exists."""
    from bench.gpu_learner import render_learner, render_training

    out = [f"cuda: {doc.get('cuda')}; device: {doc.get('device', {}).get('name', 'none')}"]
    for name, sec in doc.get("sections", {}).items():
        if sec.get("status") != "ok":
            out.append(f"{name}: {sec.get('status')} ({sec.get('error') or sec.get('reason')})")
    hashing = doc.get("sections", {}).get("hashing", {})
    if hashing.get("status") == "ok":
        out.append(render_hashing(hashing))
    training = doc.get("sections", {}).get("training", {})
    if training.get("status") == "ok":
        out.append(render_training(training))
    learner = doc.get("sections", {}).get("learner", {})
    if learner.get("status") == "ok":
        out.append(render_learner(learner))
    return "\n\n".join(out)


def md_table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table (as bench/report.py writes them)."""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(r) + " |" for r in rows)])  # fmt: skip


def render_hashing(sec: dict) -> str:
    def f(v: float | None) -> str:
        return "" if v is None else f"{v:,.0f}"

    cpu_all = next((k for k in sec["rows"][0] if k.startswith("cpu_") and k.endswith("cores_Mids_s")), "")
    head = ["rows", "CUDA kernel M ids/s", "CPU twin 1 core", f"CPU twin {cpu_all[4:-12]} cores", "GPU ms / batch"]
    body = [[f"{r['rows']:,}", f(r.get("gpu_Mids_s")), f(r["cpu_1core_Mids_s"]), f(r.get(cpu_all)),
             "" if r.get("gpu_ms") is None else f"{r['gpu_ms']:.3f}"] for r in sec["rows"]]  # fmt: skip
    verdict = "no GPU" if sec.get("meets_target") is None else ("met" if sec["meets_target"] else "**not met**")
    return md_table(head, body) + f"\n\nTarget >= 1e9 ids/s on the GPU: {verdict}."
