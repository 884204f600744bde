"""What the pipeline must produce from a generated stream, recounted by brute force from the
generator's records -- for the tests and ``ctr bench chaos`` to compare the real outputs with.

* :func:`truth_labels`: one label per impression (1 iff its click came within the window);
* :func:`late_ids`: the impressions whose click came after the window (a ``late-events`` key);
* :func:`brute_force_buckets` / :func:`feast_mismatches`: the windowed counts per entity, and
  the Feast rows that differ from them as of each row's own event time.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from ctr.features.spec import SPEC, field_value_key
from ctr.streams.agents.label_join import DEFAULT_WINDOW_MS
from ctr.streams.agents.windowed_features import WindowPlan


def truth_labels(records: Iterable[Any], window_ms: int = DEFAULT_WINDOW_MS) -> dict[str, int]:
    return {r.impression.event_id: int(r.clicked and r.click_delay_ms <= window_ms) for r in records}


def late_ids(records: Iterable[Any], window_ms: int = DEFAULT_WINDOW_MS) -> Counter:
    return Counter(r.impression.event_id for r in records if r.clicked and r.click_delay_ms > window_ms)


def brute_force_buckets(records: Iterable[Any]) -> dict[tuple[str, str], dict[int, list[int]]]:
    """entity -> hop bucket -> [impressions, attributed clicks], recounted from the generator."""
    b = WindowPlan.of(SPEC).bucket_ms
    out: dict = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in records:
        imp = r.impression
        ents = [("user", imp.user_id), ("item", imp.item_id)]
        ents += [("field_value", field_value_key(f, imp.categorical[f])) for f in SPEC.stat_fields
                 if f in imp.categorical]  # fmt: skip
        clicked = r.clicked and r.click_delay_ms <= DEFAULT_WINDOW_MS
        for e in ents:
            out[e][imp.event_time_ms // b][0] += 1
            if clicked:
                out[e][(imp.event_time_ms + r.click_delay_ms) // b][1] += 1
    return out


def stats_rows(store: Any, entities: Iterable[tuple[str, str]], chunk: int = 1000) -> Iterator[tuple[str, str, dict]]:
    """``(entity type, id, row)`` for each entity, ``row`` = feature name -> value plus the
    row's ``event_time_us`` (None when the store has no row), read 1,000 entities a call."""
    from ctr.features.store import JOIN_KEYS, STATS_VIEWS, event_time_feature, view_features

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


def feast_mismatches(store: Any, expected: dict, limit: int = 5) -> tuple[int, list]:
    """Compare every entity's Feast row with the brute-force window sums *as of the row's own
    event time* (``<entity>_event_time_us``). Returns (mismatch count, a few examples)."""
    plan = WindowPlan.of(SPEC)
    bad, examples = 0, []
    for entity, key, row in stats_rows(store, list(expected)):
        us = row["event_time_us"]
        if us is None:
            bad += 1
            if len(examples) < limit:
                examples.append((entity, key, "missing"))
            continue
        buckets = expected[(entity, key)]
        for name, lo, hi in plan.ranges(us // 1000):
            imps = sum(v[0] for bk, v in buckets.items() if lo <= bk < hi)
            clicks = sum(v[1] for bk, v in buckets.items() if lo <= bk < hi)
            got = (row[f"{entity}_impressions_{name}"], row[f"{entity}_clicks_{name}"],
                   row[f"{entity}_ctr_{name}"])  # fmt: skip
            want = (imps, clicks, SPEC.smoothed_ctr(clicks, imps))
            if got[:2] != want[:2] or abs(got[2] - want[2]) > 1e-9:
                bad += 1
                if len(examples) < limit:
                    examples.append((entity, key, name, got, want))
    return bad, examples
