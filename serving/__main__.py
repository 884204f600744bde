"""``python -m ctr.serving``: run one serving replica (the same entry ``ctr serve`` mounts).

    CTR_ADMIN_TOKEN=secret python -m ctr.serving --bootstrap 127.0.0.1:9092 \\
        --snapshot-dir .ctr/learner/snapshots --feast-dir .ctr/feast --port 8000
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ctr.serving.app import ServingConfig, run_server


def parse_args(argv: list[str] | None = None) -> ServingConfig:
    d = ServingConfig()
    p = argparse.ArgumentParser(prog="python -m ctr.serving", description=__doc__.split("\n")[0])
    p.add_argument("--bootstrap", default=os.environ.get("CTR_BOOTSTRAP"),
                   help="Kafka bootstrap HOST:PORT (default $CTR_BOOTSTRAP); without it the newest snapshot "
                        "of --snapshot-dir is served with no live updates")
    p.add_argument("--snapshot-dir", type=Path, default=Path(".ctr/learner/snapshots"),
                   help="The learner's snapshot directory (start-up and re-sync)")
    p.add_argument("--feast-dir", type=Path, default=None,
                   help="Feast config dir (ctr.features.store.open_store; default $CTR_FEAST_DIR or .ctr/feast)")
    p.add_argument("--online", choices=("sqlite", "redis"), default=d.online, help="Feast online store")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--host", default=d.host, help="Bind address (default loopback only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--topic", default=d.topic)
    p.add_argument("--keep-versions", type=int, default=d.keep_versions, help="Versions kept for rollback")
    p.add_argument("--no-feature-cache", dest="feature_cache", action="store_false",
                   help="Read Feast on every request (baseline)")
    p.add_argument("--feast-in-process", dest="feast_process", action="store_false",
                   help="Read Feast in this process's threads instead of a worker process (baseline)")
    p.add_argument("--cache-ttl", type=float, default=d.cache_ttl_s, help="Feature cache freshness, seconds")
    p.add_argument("--cache-max-stale", type=float, default=d.cache_max_stale_s,
                   help="Serve a cached value this old at most (while it is refreshed), seconds")
    p.add_argument("--max-candidates", type=int, default=d.max_candidates)
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--torch-threads", type=int, default=d.torch_threads)
    p.add_argument("--gil-switch-interval", type=float, default=d.gil_switch_interval_s,
                   help="sys.setswitchinterval in seconds (0: leave CPython's 5 ms)")
    p.add_argument("--log-level", default=d.log_level)
    a = p.parse_args(argv)
    return ServingConfig(
        bootstrap=a.bootstrap, snapshot_dir=a.snapshot_dir, feast_dir=a.feast_dir, online=a.online,
        redis_url=a.redis_url, host=a.host, port=a.port, topic=a.topic, keep_versions=a.keep_versions,
        feature_cache=a.feature_cache, feast_process=a.feast_process, cache_ttl_s=a.cache_ttl,
        cache_max_stale_s=a.cache_max_stale,
        max_candidates=a.max_candidates, max_body_bytes=a.max_body_bytes, torch_threads=a.torch_threads,
        gil_switch_interval_s=a.gil_switch_interval,
        log_level=a.log_level,
    )


def main(argv: list[str] | None = None) -> None:
    run_server(parse_args(argv))


if __name__ == "__main__":
    main()
