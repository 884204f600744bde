"""Faust agents of the CTR pipeline.

* :mod:`streams.agents.label_join` -- impressions + delayed clicks -> labelled training
  examples (attribution window in event time, watermarks from the data), plus the per-entity
  count deltas that feed the feature agent;
* :mod:`streams.agents.windowed_features` -- hopping-window counts and smoothed CTR per
  user / item / (field, value), written to the Feast online store.

Each module keeps its logic in small classes that need no Faust (``JoinPartition``,
``FeatureShard``) and a thin agent class around them. The app, the bulk-delivery consumer
and the worker entry point live in :mod:`streams.app` and :mod:`streams.worker`.

A third agent, dynamic feature reweighting (per-field importance and drift on the stream,
published to ``field-weights``), plugs in the same way: a class fed by the same delta or
example stream, registered in :func:`streams.worker.build`.
"""
