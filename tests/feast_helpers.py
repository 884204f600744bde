"""Reading the windowed-stats rows back from a Feast store, for tests that check them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any


def stats_rows(store: Any, entities: Iterable[tuple[str, str]], chunk: int = 1000) -> Iterator[tuple[str, str, dict]]:
    """``(entity type, id, row)`` for each entity, ``row`` = feature name -> value plus the
    row's ``event_time_us`` (None when the store has no row), read 1,000 entities a call."""
    from features.store import JOIN_KEYS, STATS_VIEWS, event_time_feature, view_features

    by_type: dict[str, list[str]] = defaultdict(list)
    for etype, eid in entities:
        by_type[etype].append(eid)
    for etype, ids in by_type.items():
        view = STATS_VIEWS[etype]
        ts = event_time_feature(view)
        feats = [*view_features(view), ts]
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            resp = store.get_online_features(features=[f"{view}:{f}" for f in feats],
                                             entity_rows={JOIN_KEYS[etype]: part}).to_dict()  # fmt: skip
            for i, eid in enumerate(part):
                row = {f: resp[f][i] for f in feats if f != ts}
                row["event_time_us"] = resp[ts][i]
                yield etype, eid, row
