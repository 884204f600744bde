"""Configuration shared by every component: connection settings and processing modes (the
topics are :mod:`ctr.infra.topics`).

Everything a deployment changes comes from environment variables (``CTR_*``), so the same
code runs on the embedded default and in docker-compose. Command-line flags override them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: How the agents' changelog records hold the source records they consumed: ``offsets`` (a
#: reference into the source topic, read back at a restore, as Kafka Streams reuses a source
#: topic as a changelog) or ``inline`` (a copy). The join's impressions, the feature agent's
#: delta batches.
CHANGELOG_MODES: tuple[str, ...] = ("offsets", "inline")
#: When the label join sends an example (``ctr.streams.agents.label_join``); the first is the default.
EMISSIONS: tuple[str, ...] = ("provisional", "click", "window")




def fetch_backoff_s() -> float:
    """How long a consumer waits before fetching again after finding nothing
    (``CTR_FETCH_BACKOFF_MS``, default 10; 0 turns pacing off).

    A Kafka broker parks an empty fetch for ``fetch.wait.max.ms``; noida-db answers at once,
    so without pacing every idle consumer spins, a core's worth of CPU for doing nothing
    (``ctr bench pacing`` measures it). New data waits at most this.
    """
    ms = float(os.environ.get("CTR_FETCH_BACKOFF_MS", "10"))
    if not 0 <= ms <= 1000:
        raise ValueError(f"CTR_FETCH_BACKOFF_MS={ms:g}: must be within 0..1000")
    return ms / 1000.0


COMPRESSION_CODECS = ("none", "gzip", "snappy", "lz4", "zstd")


def kafka_compression() -> str:
    """The codec every producer of the pipeline uses (``CTR_KAFKA_COMPRESSION``, default zstd).

    Why zstd: the pipeline's records are JSON with repeated field names and Zipf-distributed
    values, which zstd shrinks far more than lz4 does.
    Every byte a broker keeps costs it memory and, on the embedded noida-db, CPU: it rewrites
    its whole state as one JSON file, so its load grows with what it retains.
    """
    codec = os.environ.get("CTR_KAFKA_COMPRESSION", "zstd").strip().lower()
    if codec not in COMPRESSION_CODECS:
        raise ValueError(f"CTR_KAFKA_COMPRESSION={codec!r}: choose one of {', '.join(COMPRESSION_CODECS)}")
    return codec


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
        return str(json.loads(state.read_text())["bootstrap"])
    raise RuntimeError(
        "no Kafka bootstrap address: pass --bootstrap HOST:PORT, set CTR_BOOTSTRAP, "
        "or start the embedded broker with `ctr broker start --detach`"
    )
