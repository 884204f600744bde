"""Feed labelled examples straight to ``training-examples`` (what the label join emits)."""

from __future__ import annotations

from ctr.infra.kafka_io import DeliveryTracker, flush, make_producer, produce
from ctr.infra.schema import TrainingExample, encode
from ctr.streams.datasets import open_source

SMALL = dict(n_categorical=8, n_numeric=3, n_informative=4, n_drift_fields=2)
CATEGORICAL = tuple(f"C{i}" for i in range(1, 9))
NUMERIC = tuple(f"I{i}" for i in range(1, 4))


def examples(n: int, seed: int = 0, **options) -> list[TrainingExample]:
    return [r.example() for r in open_source("synthetic", seed=seed, events=n, **{**SMALL, **options})]


def produce_examples(bootstrap: str, exs: list[TrainingExample], extra: list[bytes] = ()) -> None:
    p, tr = make_producer(bootstrap), DeliveryTracker()
    for e in exs:
        produce(p, "training-examples", encode(e), e.example_id.encode(), tr)
    for raw in extra:
        produce(p, "training-examples", raw, b"bad", tr)
    flush(p, tr)
