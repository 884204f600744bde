"""What one worker runs with: :class:`WorkerConfig` (light to import, so the command line can
show its defaults without importing Faust)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ctr.streams.agents.label_join import JoinConfig


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker runs with (``ctr worker`` / ``python -m ctr.streams.worker``).

    ``bootstrap`` is ``HOST:PORT`` (or ``kafka://HOST:PORT``); ``feast_dir`` the Feast repo
    directory (``ctr.features.store.open_store``; default ``$CTR_FEAST_DIR`` or ``.ctr/feast``);
    ``metrics_port`` serves Prometheus metrics on 127.0.0.1 (``$CTR_BIND``); ``web_port``
    enables Faust's web server. ``features=False`` runs the label join only. ``wait_for_store``
    holds consumption until the Feast writer process has opened the store (``import feast`` takes
    seconds of CPU): by default the join starts at once, so examples reach the learner while the
    writer starts. ``changelog``: ``offsets`` (the changelogs reference the records they
    consumed, the join's its impressions and the feature agent's its delta batches; a restore
    reads them back, so the impressions topic must keep its records for the attribution window
    and the deltas topic for the longest feature window plus its hop) or ``inline`` (copies
    them: hundreds of changelog bytes per event instead of a few; ``ctr bench stream``).
    """

    bootstrap: str
    feast_dir: str | Path | None = None
    app_id: str = "ctr-stream"
    # the join's knobs default to the join's own defaults
    window_ms: int = JoinConfig.window_ms
    allowed_lateness_ms: int = JoinConfig.allowed_lateness_ms
    emission: str = JoinConfig.emission
    negative_after_ms: int = JoinConfig.negative_after_ms
    features: bool = True
    online: str | None = None
    redis_url: str | None = None
    web_port: int | None = None
    metrics_port: int | None = None
    loglevel: str = "info"
    instance_id: str | None = None
    wait_for_store: bool = False
    changelog: str = JoinConfig.changelog_impressions

    def join_config(self) -> JoinConfig:
        from ctr.features.spec import SPEC

        return JoinConfig(
            window_ms=self.window_ms, allowed_lateness_ms=self.allowed_lateness_ms, emission=self.emission,
            negative_after_ms=self.negative_after_ms, spec=SPEC, changelog_impressions=self.changelog,
        )  # fmt: skip
