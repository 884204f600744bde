"""The pipeline's topics: their names (the one place they are spelled) and partition counts.

>>> {t.name: t.partitions for t in TOPICS}["training-examples"]
4
"""

from __future__ import annotations

from dataclasses import dataclass

IMPRESSIONS_TOPIC = "impressions"
CLICKS_TOPIC = "clicks"
EXAMPLES_TOPIC = "training-examples"
FIELD_WEIGHTS_TOPIC = "field-weights"
#: The key of every field-weights record: one key, so compaction keeps the newest weights.
FIELD_WEIGHTS_KEY = b"field-weights"
MODEL_UPDATES_TOPIC = "model-updates"
DEAD_LETTER_TOPIC = "dead-letter"
LATE_TOPIC = "late-events"
SERVED_SCORES_TOPIC = "served-scores"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    #: Why this count: impressions/clicks/examples are co-partitioned (same count, same key)
    #: so the label join is partition-local; model-updates and field-weights are versioned
    #: sequences and must keep one total order, hence one partition.
    purpose: str


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(IMPRESSIONS_TOPIC, 4, "impression events, keyed by event_id"),
    TopicSpec(CLICKS_TOPIC, 4, "click events, keyed by impression_id (co-partitioned with impressions)"),
    TopicSpec(EXAMPLES_TOPIC, 4, "labelled examples, keyed by example_id = impression event_id"),
    TopicSpec(FIELD_WEIGHTS_TOPIC, 1, "versioned per-field importance weights"),
    TopicSpec(MODEL_UPDATES_TOPIC, 1, "versioned model deltas and snapshots (one total order)"),
    TopicSpec(DEAD_LETTER_TOPIC, 1, "malformed or unprocessable messages with a reason"),
    TopicSpec(LATE_TOPIC, 1, "clicks that arrived after their attribution window"),
    TopicSpec(SERVED_SCORES_TOPIC, 1, "what serving predicted for a named impression, with the version"),
)
TOPIC_NAMES = {t.name for t in TOPICS}
