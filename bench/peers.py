"""Peers on the same stream, predict-then-learn: Vowpal Wabbit (with pairwise interactions)
and River (logistic regression, factorisation machine). Used by ``ctr bench learner``.

Each runner takes the same list of :class:`~ctr.infra.schema.TrainingExample` and returns the
progressive predictions (each made before the model learned from that example) and the time
spent, so AUC / log loss are computed identically for every learner.
"""

from __future__ import annotations

import math
import string
import time
from collections.abc import Sequence

import numpy as np

from ctr.infra.schema import TrainingExample

# VW namespaces are single characters: one per categorical field, all numerics in "n".
_NS = string.ascii_lowercase + string.ascii_uppercase


def _clean(value: str) -> str:
    return value.replace(" ", "_").replace(":", ";").replace("|", "/")


def vw_line(ex: TrainingExample, fields: Sequence[str], numeric: Sequence[str], with_label: bool) -> str:
    imp = ex.impression
    parts = []
    if with_label:
        parts.append("1" if ex.label else "-1")
    for ns, f in zip(_NS, fields, strict=False):
        v = imp.categorical.get(f)
        if v is not None:
            parts.append(f"|{ns} {f}={_clean(v)}")
    nums = " ".join(f"{f}:{math.log1p(max(0.0, v)):.5g}" for f in numeric if (v := imp.numeric.get(f)) is not None)
    parts.append(f"|0 {nums}")
    return " ".join(parts)


def run_vw(
    examples: Sequence[TrainingExample],
    fields: Sequence[str],
    numeric: Sequence[str],
    bits: int = 18,
    quadratic: bool = True,
) -> tuple[np.ndarray, float]:
    """Vowpal Wabbit logistic regression, ``-q ::`` = all pairwise namespace interactions."""
    from vowpalwabbit import Workspace

    args = f"--loss_function logistic --link logistic -b {bits} --quiet --learning_rate 0.5"
    if quadratic:
        ns = _NS[: min(len(fields), len(_NS))]
        args += f" --interactions {' --interactions '.join(a + b for i, a in enumerate(ns) for b in ns[i + 1 :])}"
    ws = Workspace(args)
    p = np.empty(len(examples), dtype=np.float64)
    t = time.perf_counter()
    for i, ex in enumerate(examples):
        e = ws.parse(vw_line(ex, fields, numeric, with_label=True))
        p[i] = ws.predict(e)
        ws.learn(e)
        ws.finish_example(e)
    dt = time.perf_counter() - t
    ws.finish()
    return p, dt


def _river_x(ex: TrainingExample, fields: Sequence[str], numeric: Sequence[str]) -> dict:
    imp = ex.impression
    x = {f"{f}={v}": 1.0 for f in fields if (v := imp.categorical.get(f)) is not None}
    x.update({f: math.log1p(max(0.0, v)) for f in numeric if (v := imp.numeric.get(f)) is not None})
    return x


def run_river(
    examples: Sequence[TrainingExample], fields: Sequence[str], numeric: Sequence[str], kind: str = "lr"
) -> tuple[np.ndarray, float]:
    """River ``LogisticRegression`` (``kind="lr"``: SGD 0.05; ``"lr-adagrad"``: AdaGrad) or
    ``FMClassifier`` (``"fm"``, 10 factors), one example at a time."""
    from river import facto, linear_model, optim

    if kind == "lr":
        model = linear_model.LogisticRegression(optimizer=optim.SGD(0.05))
    elif kind == "lr-adagrad":  # per-coordinate rates, as VW's defaults
        model = linear_model.LogisticRegression(optimizer=optim.AdaGrad())
    else:
        model = facto.FMClassifier(n_factors=10, seed=0)
    p = np.empty(len(examples), dtype=np.float64)
    t = time.perf_counter()
    for i, ex in enumerate(examples):
        x = _river_x(ex, fields, numeric)
        p[i] = model.predict_proba_one(x).get(True, 0.5)
        model.learn_one(x, bool(ex.label))
    return p, time.perf_counter() - t
