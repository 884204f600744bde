"""What a model version costs a serving replica to build, by rows touched.

    python -m bench.version_apply --json bench/results/version_apply.json

A replica builds each version on a recycled model (a retired version nobody scores with,
:class:`~ctr.serving.registry.ModelRegistry`): it copies the table rows the versions since that
model changed, the dense tensors whole, then applies the delta. Before, it copied the whole
table. Both are timed here on a Criteo-shaped model (26 categorical + 13 numeric fields), in one
process and one torch thread, for deltas that touch 100 to 100,000 rows, at table_bits 20 and
22: ``touched rows`` is the per-version rows, ``copied rows`` what the recycled model lacked
(``keep`` = 5 versions: about six deltas' worth, repeats included; ``all`` when that is more than
1/32 of the table and a sequential copy is cheaper), ``ms`` the median build time over the
versions after warm-up. ``without history`` clears the registry's history first, which is what it
falls back to without one (a snapshot in between, another lineage): what every version cost before.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch

from bench.common import report
from ctr.online_learner.delta import delta_tensors, snapshot_tensors
from ctr.online_learner.model import CTRModel, ModelConfig
from ctr.online_learner.update_format import UpdateHeader
from ctr.serving.registry import ModelRegistry
from ctr.streams.datasets.criteo import CATEGORICAL, NUMERIC


def _run(bits: int, touched: int, versions: int, whole_table: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    cfg = ModelConfig(tuple(CATEGORICAL), tuple(NUMERIC), table_bits=bits)
    learner = CTRModel(cfg)
    reg = ModelRegistry(keep=5)
    reg.install_snapshot(
        UpdateHeader(kind="snapshot", model_id="m", version=1, base_version=1, model_config=cfg.to_dict()),
        snapshot_tensors(learner),
    )
    rows = learner.table.shape[0]
    times, copied = [], []
    for v in range(2, versions + 2):
        ids = np.unique(rng.integers(0, rows, touched))
        with torch.no_grad():
            learner.table[torch.from_numpy(ids)] += 0.01
        if whole_table:
            reg._changes.clear()  # what the replica falls back to without history
        d = reg.offer(UpdateHeader(kind="delta", model_id="m", version=v, base_version=v - 1),
                      delta_tensors(learner, ids))  # fmt: skip
        assert d.outcome == "applied" and d.version is not None, d
        if v >= 12:  # past the first recycled models and warm-up
            times.append(d.version.build_ms)
            copied.append(d.version.copied_rows)
    assert torch.equal(reg.current.model.table, learner.table)  # the point: still exact
    warm = times
    return {
        "table_bits": bits,
        "table_rows": rows,
        "touched_rows": touched,
        "registry": "without history" if whole_table else "default",
        "copied_rows": "all" if statistics.median(copied) < 0 else int(statistics.median(copied)),
        "build_ms_p50": round(statistics.median(warm), 2),
        "build_ms_max": round(max(warm), 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=Path("bench/results/version_apply.json"))
    p.add_argument("--versions", type=int, default=30, help="versions per row")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for bits in (20, 22):
        for touched in (100, 1_000, 10_000, 100_000):
            rows.append(_run(bits, touched, a.versions, whole_table=False))
        rows.append(_run(bits, 10_000, a.versions, whole_table=True))
    report("Version apply cost by rows touched (a serving replica, one thread)", rows, a.json)


if __name__ == "__main__":
    main()
