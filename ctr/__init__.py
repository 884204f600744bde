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
