"""The serving forward: torch (``CTRModel.forward``) vs NumPy over the same parameters
(``ctr.online_learner.inference.NumpyForward``), per call, by batch size and model shape.

    python -m bench.inference --json bench/results/inference.json

One thread for both (torch intra-op threads and NumPy's BLAS pool), the bench's own
Criteo-shaped fields (29 categorical + 18 numeric, as ``bench/serving.py`` serves), random
parameters; both outputs are compared on every row (max absolute difference of the
probabilities), so a fast wrong forward cannot pass.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import report

CATEGORICAL = tuple(f"C{i}" for i in range(1, 27)) + ("user_id", "item_id", "position")
NUMERIC = tuple(f"I{i}" for i in range(1, 14)) + (
    "user_ctr_5m", "user_ctr_1h", "item_ctr_5m", "item_ctr_1h", "item_impressions_1h")  # fmt: skip
BATCHES = (1, 10, 100, 400, 1600)


def _per_call(fn: Callable[[], object], budget_s: float) -> float:
    """Median seconds per call of ``fn()`` over repeated timed blocks."""
    for _ in range(10):
        fn()
    blocks = []
    end = time.perf_counter() + budget_s
    while time.perf_counter() < end or len(blocks) < 5:
        t = time.perf_counter()
        for _ in range(20):
            fn()
        blocks.append((time.perf_counter() - t) / 20)
    return float(np.median(blocks))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=Path("bench/results/inference.json"))
    p.add_argument("--seconds", type=float, default=0.5, help="Timing budget per row and forward")
    a = p.parse_args(argv)

    import torch
    from threadpoolctl import threadpool_limits

    from ctr.online_learner.encoding import FeatureEncoder
    from ctr.online_learner.inference import NumpyForward
    from ctr.online_learner.model import CTRModel, ModelConfig
    from ctr.online_learner.trainer import DEFAULT_MODEL_OPTIONS
    from ctr.serving.registry import score

    torch.set_num_threads(1)
    threadpool_limits(1)
    shapes = {"ctr learn defaults": dict(DEFAULT_MODEL_OPTIONS), "config defaults (cross network, gate)": {}}
    rng = np.random.default_rng(0)
    rows_in = [{"categorical": {f: f"{f}-{rng.integers(1000)}" for f in CATEGORICAL},
                "numeric": {f: float(rng.integers(100)) for f in NUMERIC}} for _ in range(max(BATCHES))]  # fmt: skip
    rows = []
    for shape, opts in shapes.items():
        torch.manual_seed(0)
        model = CTRModel(ModelConfig(CATEGORICAL, NUMERIC, **{**opts, "table_bits": 18})).eval()
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
            model.calibration.coef.copy_(torch.tensor([1.0, 0.0]))
        fw = NumpyForward(model)
        encoder = FeatureEncoder(model.config)
        for n in BATCHES:
            enc = encoder.encode(rows_in[:n])
            t_torch = _per_call(functools.partial(score, model, enc), a.seconds)
            t_numpy = _per_call(functools.partial(fw, enc.keys, enc.numeric), a.seconds)
            diff = float(np.abs(fw(enc.keys, enc.numeric) - score(model, enc)).max())
            rows.append({"model": shape, "candidates": n, "torch_us": round(t_torch * 1e6, 1),
                         "numpy_us": round(t_numpy * 1e6, 1), "speedup": round(t_torch / t_numpy, 2),
                         "max_abs_diff": diff})  # fmt: skip
    report("Serving forward: torch vs NumPy over the same parameters (one thread)", rows, a.json)


if __name__ == "__main__":
    main()
