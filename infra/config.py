"""Configuration shared by every component: topic layout and connection settings.

Everything a deployment changes comes from environment variables (``CTR_*``), so the same
code runs on the embedded default and in docker-compose. Command-line flags override them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    #: Why this count: impressions/clicks/examples are co-partitioned (same count, same key)
    #: so the label join is partition-local; model-updates and field-weights are versioned
    #: sequences and must keep one total order, hence one partition.
    purpose: str


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("impressions", 4, "impression events, keyed by event_id"),
    TopicSpec("clicks", 4, "click events, keyed by impression_id (co-partitioned with impressions)"),
    TopicSpec("training-examples", 4, "labelled examples, keyed by example_id = impression event_id"),
    TopicSpec("field-weights", 1, "versioned per-field importance weights"),
    TopicSpec("model-updates", 1, "versioned model deltas and snapshots (one total order)"),
    TopicSpec("dead-letter", 1, "malformed or unprocessable messages with a reason"),
    TopicSpec("late-events", 1, "clicks that arrived after their attribution window"),
)
TOPIC_NAMES = {t.name for t in TOPICS}


def state_dir() -> Path:
    """Where ``ctr broker start --detach`` and ``ctr up`` keep pid/port files."""
    return Path(os.environ.get("CTR_STATE_DIR", ".ctr")).resolve()


def resolve_bootstrap(explicit: str | None = None) -> str:
    """The Kafka bootstrap address: flag > ``CTR_BOOTSTRAP`` > the detached embedded broker.

    Raises ``RuntimeError`` with what to do when none is known.
    """
    if explicit:
        return explicit
    env = os.environ.get("CTR_BOOTSTRAP")
    if env:
        return env
    state = state_dir() / "broker.json"
    if state.exists():
        return json.loads(state.read_text())["bootstrap"]
    raise RuntimeError(
        "no Kafka bootstrap address: pass --bootstrap HOST:PORT, set CTR_BOOTSTRAP, "
        "or start the embedded broker with `ctr broker start --detach`"
    )
