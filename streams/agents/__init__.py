"""Faust agents of the CTR pipeline.

* :mod:`ctr.streams.agents.label_join` -- impressions + delayed clicks -> labelled training
  examples (attribution window in event time, watermarks from the data), plus the per-entity
  count deltas that feed the feature agent;
* :mod:`ctr.streams.agents.windowed_features` -- hopping-window counts and smoothed CTR per
  user / item / (field, value), written to the Feast online store.

Each module keeps its logic in small classes that need no Faust (``JoinPartition``,
``FeatureShard``) and a thin agent class around them. The app, the bulk-delivery consumer
and the worker entry point live in :mod:`ctr.streams.app` and :mod:`ctr.streams.worker`.

* :mod:`ctr.streams.agents.reweighting` -- the pure logic of dynamic feature reweighting
  (OutRank-normalised mutual information and PSI drift per field). It runs as its own
  confluent-kafka stage, :mod:`ctr.streams.reweighting` (``ctr reweight``), not inside the Faust
  worker: it needs one global view over all partitions of ``training-examples``.
"""
