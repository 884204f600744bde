"""What a serving replica can be configured with (``ctr serve`` / ``python -m ctr.serving``)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ctr.infra.topics import MODEL_UPDATES_TOPIC


@dataclass
class ServingConfig:
    """Everything ``ctr serve`` / ``python -m ctr.serving`` can set.

    ``bootstrap=None`` serves the newest snapshot of ``snapshot_dir`` without live updates.
    ``admin_token=None`` reads ``$CTR_ADMIN_TOKEN``; unset or empty disables admin calls (403).
    """

    bootstrap: str | None = None
    snapshot_dir: Path | None = None
    feast_dir: Path | None = None
    online: str | None = None
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    topic: str = MODEL_UPDATES_TOPIC
    #: Ed25519 public keys (PEM files) a model update must be signed with; empty: the
    #: comma-separated files of ``$CTR_VERIFY_KEYS``; none there either: updates are accepted
    #: unsigned. Several keys are accepted at once (a key rotation).
    verify_keys: tuple[Path, ...] = ()
    keep_versions: int = 5
    feature_cache: bool = True
    #: Read Feast in a worker process (default) or in this process's threads (the baseline).
    feast_process: bool = True
    cache_ttl_s: float = 5.0
    cache_max_stale_s: float = 60.0
    max_candidates: int = 500
    max_body_bytes: int = 1 << 20
    admin_token: str | None = None
    #: torch intra-op threads and the BLAS pool NumPy's forward uses (threadpoolctl): one, so a
    #: replica's matrix products do not spin threads against the other processes on the machine
    torch_threads: int = 1
    #: Dynamic batching: how long the first queued request waits for others to share its
    #: forward. 0: only the requests read in the same turn of the event loop (no added wait).
    batch_wait_ms: float = 0.0
    #: sys.setswitchinterval: how long a background thread may hold the GIL before a waiting
    #: request thread gets it (CPython's default 5 ms would show up directly in p99).
    gil_switch_interval_s: float = 0.0005
    #: gc.set_threshold's first generation (allocations between young collections; CPython's
    #: default 700). A 100-candidate request allocates thousands of short-lived objects: at 700
    #: the collector runs several times per request. 0: leave CPython's.
    gc_threshold: int = 50_000
    #: HTTP worker processes. 1: this process serves alone. N > 1: this process becomes the
    #: updater (it applies updates, in shared memory) and N workers answer on the port
    #: (:mod:`ctr.serving.workers`).
    workers: int = 1
    log_level: str = "info"
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
