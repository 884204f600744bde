"""Real-time CTR adaptation: Kafka click streams -> Faust agents -> Feast -> an online
unified-embedding learner -> live serving.

One namespace, layered bottom to top (``tests/test_layers.py`` holds the order):

* :mod:`ctr.infra` -- what every stage shares: configuration, topics, the broker, processes,
  Kafka I/O, the event schema, validation, dead letters.
* :mod:`ctr.features` -- the feature specification and the Feast store.
* :mod:`ctr.online_learner` -- the model, the learner, the trainer and its publisher.
* :mod:`ctr.streams` -- the Faust worker and its agents, the reweighter, replay, dataset readers.
* :mod:`ctr.serving` -- the prediction server.
* ``ctr`` itself (``ctr.cli``, ``ctr.demo``, ``ctr.stack``, ...) -- the application layer.

In a checkout the stage folders sit at the top (``streams/``, ``features/``, ...); installing
maps them under ``ctr`` (pyproject's package-dir).
"""

import os as _os

# Importing Feast (its ``feast.metrics``) puts PROMETHEUS_MULTIPROC_DIR in os.environ, pointing
# at a fresh ``feast_metrics_*`` temp directory, and every process started by one that imported
# Feast inherits it: prometheus_client then keeps each metric in an mmap'ed file (twice the
# cost per update, files left per pid) although no stage asked for multiprocess metrics. A
# directory Feast made is dropped here, before any stage imports prometheus_client; one a
# user set on purpose is kept.
for _var in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir", "PROMETHEUS_MULTIPROCESS_DIR"):
    if _os.path.basename(_os.environ.get(_var, "").rstrip("/")).startswith("feast_metrics_"):
        del _os.environ[_var]
# ... and prometheus_client's value class is chosen now, so a later Feast import in this
# process cannot switch it either. (A checkout without the dependencies -- the GPU device's
# ``bench/checkout_ctr.py`` -- imports ``ctr`` with the standard library only.)
try:
    import prometheus_client.values  # noqa: F401
except ImportError:
    pass
