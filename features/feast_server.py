"""Feast's feature server for a store directory, as ``ctr features serve`` runs it (a process
of its own): the server ``feast serve`` starts, on a store opened by
:func:`ctr.features.store.open_store`, so a Redis online store logs in with the credentials
of :mod:`ctr.infra.security`. Feast's own CLI would read only ``feature_store.yaml``, which
never holds a password.
"""

from __future__ import annotations

import argparse
import sys

from ctr.features.store import open_store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="the store directory (feature_store.yaml, registry)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    # max_requests 0: Feast's default (1000) recycles workers and stalls requests meanwhile
    open_store(a.path, apply=False).serve(host=a.host, port=a.port, no_access_log=True, workers=a.workers,
                                          max_requests=0, max_requests_jitter=0)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
