"""The one feature specification: which windowed statistics exist, over which horizons, with
which prior. The Faust feature agent, the PyFlink job, the Feast repository and the serving
tier all read it, so they cannot drift apart.

Smoothed CTR uses a Beta prior (``prior_ctr``, ``prior_strength`` pseudo-impressions), so a
new ad starts at the prior instead of 0 or 1:

    ctr = (clicks + prior_strength * prior_ctr) / (impressions + prior_strength)

>>> SPEC.smoothed_ctr(clicks=0, impressions=0) == SPEC.prior_ctr
True
>>> [w.name for w in SPEC.windows]
['5m', '1h']
>>> SPEC.feature_names("item")[:3]
['item_impressions_5m', 'item_clicks_5m', 'item_ctr_5m']
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Window:
    """A hopping window: ``size_s`` long, advancing every ``hop_s`` (tumbling when equal)."""

    name: str
    size_s: int
    hop_s: int

    def __post_init__(self) -> None:
        if self.size_s <= 0 or self.hop_s <= 0 or self.size_s % self.hop_s:
            raise ValueError(f"window {self.name}: size must be a positive multiple of hop")

    @property
    def hops(self) -> int:
        return self.size_s // self.hop_s


#: The entities statistics are kept for. ``field_value`` keys look like ``"site=news"``.
ENTITIES: tuple[str, ...] = ("user", "item", "field_value")


@dataclass(frozen=True)
class FeatureSpec:
    windows: tuple[Window, ...] = (Window("5m", 300, 60), Window("1h", 3600, 60))
    #: Categorical fields whose (field, value) pairs get windowed statistics.
    stat_fields: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6")
    prior_ctr: float = 0.05
    prior_strength: float = 20.0
    stats: tuple[str, ...] = field(default=("impressions", "clicks", "ctr"))

    def smoothed_ctr(self, clicks: float, impressions: float) -> float:
        return (clicks + self.prior_strength * self.prior_ctr) / (impressions + self.prior_strength)

    def feature_names(self, entity: str) -> list[str]:
        """Column names of one entity's feature view, e.g. ``item_ctr_1h``."""
        if entity not in ENTITIES:
            raise ValueError(f"unknown entity {entity!r}; one of {ENTITIES}")
        return [f"{entity}_{stat}_{w.name}" for w in self.windows for stat in self.stats]


def field_value_key(field_name: str, value: str) -> str:
    """The entity key of one categorical (field, value) pair."""
    return f"{field_name}={value}"


def from_env() -> FeatureSpec:
    """The spec, with ``CTR_STAT_FIELDS`` (comma-separated) and ``CTR_PRIOR_CTR`` overrides."""
    base = FeatureSpec()
    fields = os.environ.get("CTR_STAT_FIELDS")
    prior = os.environ.get("CTR_PRIOR_CTR")
    return FeatureSpec(
        windows=base.windows,
        stat_fields=tuple(f for f in fields.split(",") if f) if fields else base.stat_fields,
        prior_ctr=float(prior) if prior else base.prior_ctr,
        prior_strength=base.prior_strength,
    )


SPEC = from_env()
