"""The GPU path on a real GPU (issue 21); skipped, with the reason, where torch sees no CUDA device.

What the CUDA simulator and PTX compilation cannot show: the kernel's ids on the hardware, the
torch <-> Numba hand-off on torch's stream without a host sync, a training step on ``cuda``
against the same step on the CPU, and a GPU-trained model's updates applied by a CPU replica.

On the GPU machine (nothing installed there; bench/gpu_device.sh runs it)::

    python -m pytest -p bench.checkout_ctr --noconftest tests/test_cuda.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ctr.online_learner.hashing import (
    MISSING_KEY,
    ProbeLayout,
    bucket_ids_cpu,
    hash_buckets,
    numeric_key,
    value_key,
)
from ctr.online_learner.learner import OnlineCTR
from ctr.online_learner.trainer import TrainerConfig
from tests.learner_helpers import examples

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available())")

#: the device under test (a module constant, so the CPU-vs-CPU logic can be dry-run elsewhere)
GPU = "cuda"
EDGE_KEYS = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, MISSING_KEY, numeric_key(-3.5), value_key("ad7")]


def _keys(rows: int, fields: int, seed: int) -> np.ndarray:
    keys = np.random.default_rng(seed).integers(0, 2**64, (rows, fields), dtype=np.uint64)
    keys[: len(EDGE_KEYS)] = np.array(EDGE_KEYS, dtype=np.uint64)[:, None]
    return keys


def test_kernel_ids_equal_the_cpu_twin_on_10m_keys() -> None:
    # 1M rows x 10 fields = 10M keys, 1 to 3 probes per field (19M ids)
    fields = [f"f{i}" for i in range(10)]
    layout = ProbeLayout.build(fields, probes={f: 1 + i % 3 for i, f in enumerate(fields)}, table_bits=20)
    keys = _keys(1_000_000, len(fields), seed=21)
    got = hash_buckets(torch.from_numpy(keys.view(np.int64)).to(GPU), layout)
    assert got.dtype == torch.int32 and got.device.type == GPU and got.shape == (1_000_000, layout.total_probes)
    np.testing.assert_array_equal(got.cpu().numpy(), bucket_ids_cpu(keys, layout))


@pytest.mark.parametrize("table_bits", [1, 13, 31])
def test_kernel_at_every_table_size_uint64_and_strided_input(table_bits: int) -> None:
    layout = ProbeLayout.build(["a", "b", "c"], probes=2, table_bits=table_bits)
    keys = _keys(70_001, 3, seed=table_bits)  # not a multiple of any block size
    want = bucket_ids_cpu(keys, layout)
    dev = torch.from_numpy(keys.view(np.int64)).to(GPU)
    np.testing.assert_array_equal(hash_buckets(dev.view(torch.uint64), layout).cpu().numpy(), want)
    strided = torch.from_numpy(np.ascontiguousarray(keys.T).view(np.int64)).to(GPU).T  # column-major
    assert not strided.is_contiguous()
    np.testing.assert_array_equal(hash_buckets(strided, layout).cpu().numpy(), want)
    assert hash_buckets(dev[:0], layout).shape == (0, layout.total_probes)


def test_handoff_runs_on_torchs_stream_without_a_host_sync() -> None:
    """The kernel is queued on torch's *current* stream behind the work that writes its keys, and
    ``hash_buckets`` returns without waiting for the GPU: on a side stream kept busy by a sleep
    kernel, the stream is still busy when it returns (any host sync would have waited), torch
    reports no synchronising call (sync debug mode), and the ids are right -- had the kernel run
    on another stream it would have read the keys before they were written."""
    layout = ProbeLayout.build(["a", "b", "c"], probes=2, table_bits=16)
    host = _keys(200_000, 3, seed=7)
    src = torch.from_numpy(host.view(np.int64)).to(GPU)
    hash_buckets(src[:10], layout)  # once per layout: compiles the kernel, uploads the layout's seeds
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        keys = torch.zeros_like(src)
        torch.cuda._sleep(500_000_000)  # ~0.25 s at 2 GHz: the side stream is busy
        keys.copy_(src)  # the keys exist only once the sleep is over
        torch.cuda.set_sync_debug_mode("error")
        try:
            ids = hash_buckets(keys, layout)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        still_busy = not side.query()
    torch.cuda.synchronize()
    assert still_busy, "hash_buckets waited for the GPU: a host sync in the hand-off"
    np.testing.assert_array_equal(ids.cpu().numpy(), bucket_ids_cpu(host, layout))


def _shipped(model_examples: list, device: str, max_step: int = 2048) -> OnlineCTR:
    """The learner ``ctr learn`` builds (fields from the examples), on ``device``."""
    cfg = TrainerConfig(bootstrap="", state_dir=Path("."))
    model = cfg.model_for([e.impression for e in model_examples])
    return OnlineCTR(model, lr_table=cfg.lr_table, lr_dense=cfg.lr_dense, seed=cfg.seed,
                     num_threads=cfg.torch_threads, device=device, max_step=max_step)  # fmt: skip


def test_one_training_step_on_cuda_equals_the_same_step_on_cpu() -> None:
    exs = examples(3_000, seed=5)
    imps, y = [e.impression for e in exs], np.array([e.label for e in exs], dtype=np.float32)
    cpu = _shipped(exs[:1000], "cpu", max_step=512)
    cpu.learn_many(imps[:2048], y[:2048])  # a trained state: accumulators and calibration non-trivial
    gpu = _shipped(exs[:1000], GPU, max_step=512)
    gpu.load_state_dict(cpu.state_dict())
    cpu.take_touched()
    cpu.examples_seen = gpu.examples_seen = 512 * cpu.step_ratio  # the batch below is one update
    batch, yb = cpu.encode(imps[2048:2560]), y[2048:2560]
    p_cpu, p_gpu = cpu.predict_learn_many(batch, yb), gpu.predict_learn_many(batch, yb)
    np.testing.assert_allclose(p_gpu, p_cpu, rtol=1e-5, atol=1e-6)  # scored before the update
    np.testing.assert_array_equal(gpu.take_touched(), cpu.take_touched())
    got, want = gpu.state_dict(), cpu.state_dict()
    for name, w in want["model"].items():
        np.testing.assert_allclose(got["model"][name].cpu().numpy(), w.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    for opt in ("table_optimizer", "dense_optimizer"):
        np.testing.assert_allclose(got[opt]["acc"].cpu().numpy(), want[opt]["acc"].numpy(), rtol=1e-4, atol=1e-7)


class RecordingProducer:
    """In-memory stand-in for ``confluent_kafka.Producer``: keeps every message, acknowledges all
    of them at ``flush`` (the publisher's view of a healthy broker)."""

    def __init__(self) -> None:
        self.values: list[bytes] = []
        self._callbacks: list = []

    def produce(self, topic: str, value: bytes, key: bytes | None = None, on_delivery=None, headers=None) -> None:
        self.values.append(value)
        self._callbacks.append(on_delivery)

    def flush(self, timeout: float | None = None) -> int:
        for cb in self._callbacks:
            cb(None, None)
        self._callbacks.clear()
        return 0

    def poll(self, timeout: float | None = None) -> int:
        return 0


def test_updates_published_from_a_gpu_model_are_applied_by_a_cpu_replica(tmp_path: Path) -> None:
    from ctr.online_learner.publisher import Publisher, QualityGate
    from ctr.online_learner.signing import UpdateSigner, UpdateVerifier, generate_keypair
    from ctr.serving.registry import ModelRegistry
    from ctr.serving.updates import UpdateConsumer
    from tests.test_serving_registry import FakeConsumer

    exs = examples(6_000, seed=9)
    imps, y = [e.impression for e in exs], np.array([e.label for e in exs], dtype=np.float32)
    learner = _shipped(exs[:1000], GPU)
    private, public = generate_keypair()
    producer = RecordingProducer()
    pub = Publisher(producer, learner, model_id="gpu", snapshot_dir=tmp_path / "snapshots",  # type: ignore[arg-type]
                    gate=QualityGate(sample_every=0), signer=UpdateSigner(private))  # fmt: skip
    pub.publish_snapshot(event_time_ms=0, metrics={}, new_version=True)
    for i in range(0, 4_000, 1_000):
        learner.learn_many(imps[i : i + 1000], y[i : i + 1000])
        assert pub.publish_delta(event_time_ms=i, metrics={})["published"]
    # the replica, on the CPU, verifying the learner's signature on every message and file
    replica = ModelRegistry()
    uc = UpdateConsumer(replica, "unused:9092", snapshot_dir=tmp_path / "snapshots",
                        verifier=UpdateVerifier([public]))  # fmt: skip
    uc._consumer = FakeConsumer()
    for value in producer.values:
        uc._handle(value)
    served = replica.current
    assert served.version == pub.version == 5 and served.model.table.device.type == "cpu"
    assert uc.last_rejection is None, uc.last_rejection
    np.testing.assert_array_equal(served.model.table.detach().numpy(), learner.model.table.detach().cpu().numpy())
    held_out = imps[5_000:]
    np.testing.assert_allclose(served.predict(served.encoder.encode(held_out)), learner.predict_proba_many(held_out),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
