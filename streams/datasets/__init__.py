"""Click-log sources: public datasets, any CSV with a mapping, and a synthetic stream with a
known ground truth — all as one iterator of :class:`LabeledImpression`.

Every source yields impressions in file (= event-time) order with their label and a click
delay (real files carry no click times, so :class:`ClickDelay` draws one), streamed from
disk in constant memory. File sources skip unparseable rows and count them in
``source.skipped`` (or raise with ``strict=True``); see :class:`~ctr.streams.datasets.base.CsvSource`.

===================== ====================================================================
spec                  source
===================== ====================================================================
``synthetic``         :class:`SyntheticStream` (options: :class:`SyntheticConfig` fields)
``synthetic:PROFILE`` the same from a named profile of defaults (``default``, ``low-ctr``:
                      see :data:`~ctr.streams.datasets.synthetic.PROFILES`); options override it
``criteo:PATH``       :class:`CriteoSource` (Kaggle DAC / 1TB layout, tab or comma)
``avazu:PATH``        :class:`AvazuSource` (Kaggle Avazu ``train``)
``obd:PATH``          :class:`ObdSource` (Open Bandit Dataset ``all.csv``)
``csv:PATH``          :class:`CsvMappedSource`; needs ``mapping=`` (TOML/JSON, see
                      ``mapping.example.toml``)
===================== ====================================================================

>>> src = open_source("synthetic", seed=7, events=1_000, n_categorical=4, n_numeric=2,
...                   cardinalities=(10, 100, 1000, 5), n_informative=2, n_drift_fields=1)
>>> examples = list(src)
>>> len(examples), examples[0].impression.event_id
(1000, 'syn7-0')
>>> sum(e.clicked for e in examples) == sum(e.click() is not None for e in examples)
True
>>> low = open_source("synthetic:low-ctr", events=1_000, base_ctr=0.002)
>>> low.config.n_users, low.config.base_ctr
(1000000, 0.002)
>>> open_source("parquet:/tmp/x")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: unknown source kind 'parquet' in 'parquet:/tmp/x'; expected one of: synthetic, criteo:PATH, ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctr.streams.datasets.avazu import AvazuSource
from ctr.streams.datasets.base import (
    DEFAULT_ATTRIBUTION_WINDOW_MS,
    MISSING_ID,
    BadRowError,
    ClickDelay,
    CsvSource,
    LabeledImpression,
    SkippedRows,
    Source,
    interleave_clicks,
)
from ctr.streams.datasets.criteo import CriteoSource
from ctr.streams.datasets.csv_mapping import CsvMappedSource, CsvMapping
from ctr.streams.datasets.obd import ObdSource
from ctr.streams.datasets.synthetic import (
    GroundTruth,
    SyntheticChunk,
    SyntheticConfig,
    SyntheticStream,
    best_auc,
)

_FILE_SOURCES: dict[str, type[CsvSource]] = {
    "criteo": CriteoSource,
    "avazu": AvazuSource,
    "obd": ObdSource,
    "csv": CsvMappedSource,
}
SPEC_FORMS = ("synthetic", *(f"{k}:PATH" for k in _FILE_SOURCES))


def open_source(
    spec: str,
    *,
    mapping: Path | str | None = None,
    seed: int = 0,
    events: int | None = None,
    delay: ClickDelay | None = None,
    strict: bool = False,
    profile: str | None = None,
    **options: Any,
) -> Source:
    """Open the source named by ``spec`` (see the module table).

    ``seed`` seeds the synthetic stream or the click-delay draws of a file; ``events`` caps
    the number of events (for ``synthetic`` it is ``n_events``; ``None`` keeps the default
    of one million); ``delay`` replaces the default ``ClickDelay(seed=seed)`` of a file
    source; ``strict`` makes a file source raise :class:`BadRowError` on its first bad row;
    ``options`` go to the source's constructor (e.g. ``user_column="C3"`` for Criteo) or
    to :class:`SyntheticConfig`, where they override the profile's values. ``profile``
    names the synthetic profile like ``synthetic:PROFILE`` does (``None``: the spec's, else
    ``default``). Raises :class:`ValueError` for an unknown kind, a missing
    file or mapping, or an unusable header, before any event is read.
    """
    kind, sep, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "synthetic":
        from ctr.streams.datasets.synthetic import PROFILES

        named = path.strip() or None
        if named is not None and profile is not None and named != profile:
            raise ValueError(f"synthetic: profile {profile!r} contradicts {spec!r}")
        profile = named or profile
        if profile is not None and profile not in PROFILES:
            raise ValueError(
                f"synthetic: unknown profile {profile!r} in {spec!r} (it takes no path, only "
                f"'synthetic:PROFILE'); known profiles: {', '.join(PROFILES)}"
            )
        if mapping is not None or delay is not None:
            raise ValueError("synthetic: mapping/delay do not apply (set click_delay_* options instead)")
        config = {"seed": seed, **options}
        if events is not None:
            config["n_events"] = events
        try:
            return SyntheticStream(SyntheticConfig.from_profile(profile, **config))
        except TypeError as err:
            raise ValueError(f"synthetic: {err}") from None
    reader = _FILE_SOURCES.get(kind)
    if reader is None:
        raise ValueError(
            f"unknown source kind {kind!r} in {spec!r}; expected one of: {', '.join(SPEC_FORMS)}"
        )
    if not sep or not path:
        raise ValueError(f"{kind}: missing path, expected '{kind}:PATH'")
    if kind == "csv":
        if mapping is None:
            raise ValueError(
                "csv: a mapping file is required (mapping=PATH; see streams/datasets/mapping.example.toml)"
            )
        options["mapping"] = mapping
    elif mapping is not None:
        raise ValueError(f"{kind}: mapping only applies to csv:PATH sources")
    if profile is not None:
        raise ValueError(f"{kind}: profile only applies to synthetic sources")
    try:
        return reader(
            Path(path).expanduser(), seed=seed, delay=delay, events=events, strict=strict, **options
        )
    except TypeError as err:  # an option the reader does not take
        raise ValueError(f"{kind}: {err}") from None


__all__ = [
    "DEFAULT_ATTRIBUTION_WINDOW_MS",
    "MISSING_ID",
    "SPEC_FORMS",
    "AvazuSource",
    "BadRowError",
    "ClickDelay",
    "CriteoSource",
    "CsvMappedSource",
    "CsvMapping",
    "CsvSource",
    "GroundTruth",
    "LabeledImpression",
    "ObdSource",
    "SkippedRows",
    "Source",
    "SyntheticChunk",
    "SyntheticConfig",
    "SyntheticStream",
    "best_auc",
    "interleave_clicks",
    "open_source",
]
