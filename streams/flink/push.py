"""Pusher: the Flink job's window rows (topic ``flink-features``) into the Feast online store.
Main venv (Feast); ``python -m ctr.streams.flink.push --bootstrap HOST:PORT --feast-dir DIR``.

A Flink row carries ONE window of one entity, closed at ``window_end_ms``; a Feast row holds
every window of the entity (``<entity>_impressions_5m``, ..., ``_ctr_1h``). Rows of the same
entity and end (the 5 m and 1 h windows close together) are merged; a window without a row at
that end had no event of the entity, so it is written as 0 impressions, 0 clicks and the prior
CTR -- which is also how an entity's 5 m values drop back to zero while its 1 h window is still
open. The Feast event time is ``window_end_ms - 1``: under the Faust agent's convention a row at
event time ``t`` holds the windows ending at the first hop boundary after ``t``, so readers
find the same window with either producer. Offsets are committed after the Feast write
(at-least-once; :class:`ctr.features.store.FeatureWriter` lets an equal event time overwrite, so a
replayed row is harmless).

>>> m = RowMerger()
>>> m.add({"entity_type": "item", "entity_id": "ad7", "window": "1h", "window_end_ms": 120_000,
...        "impressions": 4, "clicks": 1, "ctr": 0.0833})
>>> m.add({"entity_type": "item", "entity_id": "ad7", "window": "5m", "window_end_ms": 120_000,
...        "impressions": 2, "clicks": 0, "ctr": 0.0455})
>>> rows = m.take()["item"]; rows[0][0]["item_impressions_5m"], rows[0][0]["item_clicks_1h"], rows[0][1]
(2, 1, 119999)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from ctr.features.spec import SPEC, FeatureSpec

log = logging.getLogger(__name__)


class RowMerger:
    """Collects Flink rows; :meth:`take` returns one Feast row per touched entity, at its
    newest end. Keeps each entity's newest end and values (one small entry per entity, as the
    Faust agent keeps its buckets), so a window row arriving in a later batch than its sibling
    of the same end is merged, not written over it with zeros."""

    def __init__(self, spec: FeatureSpec = SPEC) -> None:
        self.spec = spec
        self.windows = [w.name for w in spec.windows]
        #: (entity_type, entity_id) -> (window_end_ms, {window: (impressions, clicks, ctr)})
        self.latest: dict[tuple[str, str], tuple[int, dict[str, tuple[int, int, float]]]] = {}
        self.dirty: set[tuple[str, str]] = set()

    def add(self, row: dict[str, Any]) -> None:
        key = (row["entity_type"], row["entity_id"])
        end = int(row["window_end_ms"])
        cur = self.latest.get(key)
        if cur is None or end > cur[0]:
            # A later end: the windows that did not close again at it are empty now.
            cur = self.latest[key] = (end, {})
        elif end < cur[0]:
            return  # older than what we hold (a replay): never move an entity back in time
        cur[1][row["window"]] = (int(row["impressions"]), int(row["clicks"]), float(row["ctr"]))
        self.dirty.add(key)

    def take(self) -> dict[str, list[tuple[dict[str, Any], int]]]:
        """entity_type -> [(Feast row, event time ms)] of the entities touched since the last call."""
        from ctr.features.store import JOIN_KEYS

        empty = (0, 0, self.spec.smoothed_ctr(0, 0))
        out: dict[str, list[tuple[dict[str, Any], int]]] = {}
        for etype, eid in self.dirty:
            end, vals = self.latest[(etype, eid)]
            row: dict[str, Any] = {JOIN_KEYS[etype]: eid}
            for w in self.windows:
                i, c, ctr = vals.get(w, empty)
                row[f"{etype}_impressions_{w}"], row[f"{etype}_clicks_{w}"], row[f"{etype}_ctr_{w}"] = i, c, ctr
            out.setdefault(etype, []).append((row, end - 1))
        self.dirty.clear()
        return out


def push(
    bootstrap: str,
    topic: str,
    feast_dir: Path | None,
    *,
    group: str = "ctr-flink-push",
    until_end: bool = False,
    online: str | None = None,
    redis_url: str | None = None,
    merger: RowMerger | None = None,
) -> int:
    """Consume ``topic`` and write to Feast until interrupted (or, with ``until_end``, until
    the end offsets as of the start). Returns the Feast rows written. ``merger`` carries the
    per-entity state from an earlier call (a fresh one knows nothing: if a restart falls
    between the 5 m and the 1 h row of one end, the window written before it reads 0 until the
    entity's next end)."""
    from confluent_kafka import TopicPartition

    from ctr.features.store import STATS_VIEWS, FeatureWriter, open_store
    from ctr.infra.kafka_io import make_consumer, offset_of
    from ctr.streams.flink.harness import end_offsets

    writer = FeatureWriter(open_store(feast_dir, online=online, redis_url=redis_url))  # type: ignore[arg-type]
    ends = end_offsets(bootstrap, (topic,))[topic] if until_end else {}
    c = make_consumer(bootstrap, group, **{"enable.auto.commit": False, "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    merger, written = merger or RowMerger(), 0
    # Where the group resumes (its committed offsets, or the start), so --until-end stops at
    # once for partitions that have nothing new.
    pos = {tp.partition: max(tp.offset, 0) for tp in c.committed([TopicPartition(topic, p) for p in ends], timeout=10)}
    try:
        while not until_end or any(pos[p] < e for p, e in ends.items()):
            msgs = [m for m in c.consume(5000, 0.5) if m.error() is None]
            for m in msgs:
                p, value = m.partition(), m.value()
                assert p is not None and value is not None  # the job's append-only sink writes a JSON row
                pos[p] = offset_of(m) + 1
                merger.add(json.loads(value))
            if not msgs:
                continue
            for etype, rows in merger.take().items():
                written += writer.write(STATS_VIEWS[etype], [r for r, _ in rows], [t for _, t in rows])
            c.commit(offsets=[TopicPartition(topic, p, o) for p, o in pos.items()], asynchronous=False)
    finally:
        c.close()
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", default="flink-features")
    ap.add_argument("--feast-dir", type=Path, default=None)
    ap.add_argument("--group", default="ctr-flink-push")
    ap.add_argument("--online", default=None, choices=("sqlite", "redis"), help="default: the store directory's")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--until-end", action="store_true", help="stop at the topic's end offsets as of the start")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    t0 = time.perf_counter()
    n = push(a.bootstrap, a.topic, a.feast_dir, group=a.group, until_end=a.until_end, online=a.online,
             redis_url=a.redis_url)  # fmt: skip
    print(json.dumps({"feast_rows": n, "seconds": round(time.perf_counter() - t0, 2)}))


if __name__ == "__main__":
    main()
