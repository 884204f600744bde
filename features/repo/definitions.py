"""The Feast repository, generated from the one feature specification (:mod:`ctr.features.spec`).

Nothing here is hand-copied: the windowed-statistics columns come from
``SPEC.feature_names(entity)`` and the names, join keys and field-weight columns from the
feast-free layout in :mod:`ctr.features.store`, so the Faust agent, this repository and the
serving tier cannot drift apart.

* entities ``user`` (``user_id``), ``item`` (``item_id``), ``field_value`` (``field_value``,
  e.g. ``"C3=ab12"``) and ``field`` (``field``);
* feature views ``user_stats``, ``item_stats``, ``field_value_stats`` (impressions and clicks
  as Int64, smoothed CTR as Float64, per window) and ``field_weights`` (``weight``,
  ``importance``, ``psi`` Float64, ``version`` Int64);
* every view also has ``<entity>_event_time_us`` (Int64): the row's event time in µs, kept
  by ``FeatureWriter`` for newest-wins (Feast's SQLite store truncates event times to seconds);
* one push source per view (``<view>_push``), backed by a parquet file source under
  ``data/`` relative to the repository directory (only used by offline pushes/retrieval).

``ctr.features.store.open_store`` applies :data:`OBJECTS`; ``feast -c features/repo apply`` finds
the same objects by scanning this module.
"""

from __future__ import annotations

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Float64, Int64, PrimitiveFeastType, String

from ctr.features.spec import SPEC
from ctr.features.store import (
    FIELD_WEIGHT_FEATURES,
    FIELD_WEIGHTS_VIEW,
    JOIN_KEYS,
    STATS_VIEWS,
    TIMESTAMP_FIELD,
    event_time_feature,
    push_source_name,
    stat_of,
)

#: Generous: online reads do not enforce it; it bounds point-in-time joins offline.
STATS_TTL = timedelta(days=1)
FIELD_WEIGHTS_TTL = timedelta(days=7)

_STAT_DTYPES: dict[str, PrimitiveFeastType] = {"impressions": Int64, "clicks": Int64, "ctr": Float64}
_KIND_DTYPES: dict[str, PrimitiveFeastType] = {"float": Float64, "int": Int64}

_DESCRIPTIONS = {
    "user": "A user seeing impressions.",
    "item": "An item / ad being shown.",
    "field_value": 'One categorical (field, value) pair, keyed "field=value" (spec.field_value_key).',
    "field": "A categorical field (column) of the model, for the field weights.",
}

ENTITY_OBJECTS: dict[str, Entity] = {
    name: Entity(name=name, join_keys=[key], value_type=ValueType.STRING, description=_DESCRIPTIONS[name])
    for name, key in JOIN_KEYS.items()
}


def _push_source(view: str) -> PushSource:
    return PushSource(
        name=push_source_name(view),
        batch_source=FileSource(
            name=f"{view}_batch",
            path=f"data/{view}.parquet",
            timestamp_field=TIMESTAMP_FIELD,
        ),
        description=f"Stream-processor pushes into {view}.",
    )


def _feature_view(view: str, entity: str, schema: list[Field], ttl: timedelta, description: str) -> FeatureView:
    return FeatureView(
        name=view,
        entities=[ENTITY_OBJECTS[entity]],
        schema=[
            Field(name=JOIN_KEYS[entity], dtype=String),
            *schema,
            # Bookkeeping for newest-wins: Feast's SQLite store keeps event times in whole seconds.
            Field(name=event_time_feature(view), dtype=Int64),
        ],
        source=_push_source(view),
        ttl=ttl,
        online=True,
        description=description,
        tags={"generated_from": "ctr.features.spec"},
    )


STATS_FEATURE_VIEWS: dict[str, FeatureView] = {
    entity: _feature_view(
        view,
        entity,
        # Counts are Int64; the CTR (and any stat added to the spec later) Float64.
        [Field(name=n, dtype=_STAT_DTYPES.get(stat_of(entity, n), Float64)) for n in SPEC.feature_names(entity)],
        STATS_TTL,
        f"Windowed impressions/clicks/smoothed CTR per {entity} over "
        + ", ".join(w.name for w in SPEC.windows)
        + f" (prior ctr {SPEC.prior_ctr}, strength {SPEC.prior_strength}).",
    )
    for entity, view in STATS_VIEWS.items()
}

FIELD_WEIGHTS_FEATURE_VIEW = _feature_view(
    FIELD_WEIGHTS_VIEW,
    "field",
    [Field(name=name, dtype=_KIND_DTYPES[kind]) for name, kind in FIELD_WEIGHT_FEATURES.items()],
    FIELD_WEIGHTS_TTL,
    "Per-field weight, OutRank importance, PSI drift and publishing version.",
)

_VIEWS: list[FeatureView] = [*STATS_FEATURE_VIEWS.values(), FIELD_WEIGHTS_FEATURE_VIEW]

#: Everything ``apply`` registers: entities, feature views, their push and batch sources.
OBJECTS: list = [
    *ENTITY_OBJECTS.values(),
    *_VIEWS,
    *(fv.stream_source for fv in _VIEWS),
    *(fv.batch_source for fv in _VIEWS),
]

# `feast apply` (the CLI) only finds objects bound to module-level names: bind each one,
# e.g. ``entity_user``, ``featureview_user_stats``, ``pushsource_user_stats_push``.
globals().update({f"{type(o).__name__.lower()}_{o.name}": o for o in OBJECTS})
