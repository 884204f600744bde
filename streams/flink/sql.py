"""The Flink SQL of the windowed-feature job, generated from :mod:`ctr.features.spec` (stdlib only).

Why generated: the Faust agent and this job must compute the same numbers. Windows (size,
hop), the stat fields and the Beta prior all come from one ``FeatureSpec``, so changing the
spec changes both; nothing here hard-codes a window or a field.

Semantics (mirroring ``streams/agents/label_join.py`` + ``windowed_features.py``):

* an impression counts 1 impression for its user, its item and ``field=value`` of every stat
  field present, at its event time;
* a click counts 1 click for the same entities *at the click's event time*, only when it is
  attributed: ``0 <= click_time - impression_time <= attribution window`` (an interval join
  on ``impression_id = event_id``); only the first attributed click of an impression counts;
* window ``[end - size, end)`` with ``end`` on a multiple of the hop since the epoch (Flink
  HOP windows and the Faust agent's buckets align the same way); smoothed CTR
  ``(clicks + k*p) / (impressions + k)``.

>>> from ctr.features.spec import FeatureSpec
>>> s = statements(FeatureSpec(stat_fields=("C1",)), JobConfig(bootstrap="b:9092"))
>>> [line.split("(")[0].strip() for line in s][:3]
['CREATE TABLE impressions', 'CREATE TABLE clicks', 'CREATE TABLE features_sink']
>>> "INTERVAL '0 00:05:00.000' DAY TO SECOND(3)" in s[-2] and "'5m'" in s[-2]
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ctr.features.spec import FeatureSpec, field_value_key

#: ``ctr.infra.schema.WATERMARK_HEADER`` (that module needs msgspec, which the Flink
#: environment does not have; tests/test_flink_cluster.py checks they agree).
WATERMARK_HEADER = "ctr.watermark"

#: Same default as the label join (``ctr.streams.agents.label_join.DEFAULT_WINDOW_MS``); that
#: module imports msgspec/Faust pieces, which the Flink environment does not have.
DEFAULT_ATTRIBUTION_MS = 30_000
DEFAULT_OUTPUT_TOPIC = "flink-features"


@dataclass(frozen=True)
class JobConfig:
    bootstrap: str
    group: str = "ctr-flink-features"
    impressions_topic: str = "impressions"
    clicks_topic: str = "clicks"
    output_topic: str = DEFAULT_OUTPUT_TOPIC
    attribution_ms: int = DEFAULT_ATTRIBUTION_MS
    #: Watermark delay: an event further behind the newest one on its source than this is late
    #: and dropped by the join and the windows (the Faust agent counts late events). Bounded
    #: replays in event-time order lose nothing even at 0; live, a click is usually consumed a
    #: moment after newer impressions, and 5 s absorbs that at 5 s of latency per window.
    out_of_orderness_ms: int = 5_000
    #: ``None``: unbounded. Otherwise the end offsets to stop at, per topic and partition
    #: (``scan.bounded.mode = specific-offsets``). Tansu reports wrong end offsets, so a
    #: ``latest-offset`` bounded read may stop early; callers pass what they produced.
    end_offsets: dict[str, dict[int, int]] | None = None
    #: Bounded at whatever the broker reports as the end when the job starts (exact on noida
    #: and Apache Kafka, not on Tansu).
    bounded_latest: bool = False
    #: Extra Kafka client properties of the sources and the sink, without the ``properties.``
    #: prefix: the security settings (:meth:`ctr.infra.security.KafkaSecurity.flink_properties`).
    kafka_properties: dict[str, str] = field(default_factory=dict)


def _q(s: str) -> str:
    """A SQL string literal."""
    return "'" + s.replace("'", "''") + "'"


def _double(x: float) -> str:
    # repr() is the shortest decimal that round-trips, so the cast lands on the same double
    # Python uses in FeatureSpec.smoothed_ctr.
    return f"CAST({x!r} AS DOUBLE)"


def _interval_ms(ms: int) -> str:
    # A day-to-second literal: a plain SECOND literal has 2 digits of precision in Calcite
    # (300 s would not parse) and Flink rejects any other leading precision.
    d, rest = divmod(ms, 86_400_000)
    h, rest = divmod(rest, 3_600_000)
    m, rest = divmod(rest, 60_000)
    sec, milli = divmod(rest, 1000)
    return f"INTERVAL '{d} {h:02d}:{m:02d}:{sec:02d}.{milli:03d}' DAY TO SECOND(3)"


def _source_options(cfg: JobConfig, topic: str) -> str:
    opts = {
        "connector": "kafka",
        "topic": topic,
        "properties.bootstrap.servers": cfg.bootstrap,
        "properties.group.id": cfg.group,
        "scan.startup.mode": "earliest-offset",
        # The value as it is (a JSON event, or empty for a watermark control message) --
        # the json format would drop the control messages, and with them the watermark
        # they carry. Fields are taken out with JSON_VALUE (:func:`_json`); malformed records
        # get NULL fields and are skipped (the Faust join dead-letters them), so both
        # count the same valid events.
        "format": "raw",
        "raw.charset": "UTF-8",
        **{f"properties.{k}": v for k, v in cfg.kafka_properties.items()},
    }
    if cfg.end_offsets is not None:
        ends = cfg.end_offsets.get(topic, {})
        opts["scan.bounded.mode"] = "specific-offsets"
        opts["scan.bounded.specific-offsets"] = ";".join(f"partition:{p},offset:{o}" for p, o in sorted(ends.items()))
    elif cfg.bounded_latest:
        opts["scan.bounded.mode"] = "latest-offset"
    return ",\n  ".join(f"{_q(k)} = {_q(v)}" for k, v in opts.items())


def _extra_properties(cfg: JobConfig) -> str:
    """The sink's share of ``kafka_properties`` (security settings: the sink writes with them too)."""
    return "".join(f"\n  {_q('properties.' + k)} = {_q(v)}," for k, v in cfg.kafka_properties.items())


def _watermark(cfg: JobConfig) -> str:
    return f"WATERMARK FOR ts AS ts - {_interval_ms(cfg.out_of_orderness_ms)}"


def _json(*path: str) -> str:
    """``JSON_VALUE`` of ``payload`` at ``path`` (a STRING; NULL when absent or not JSON).

    >>> _json("categorical", "C1")
    "JSON_VALUE(payload, '$[''categorical''][''C1'']')"
    """
    return "JSON_VALUE(payload, " + _q("$" + "".join(f"['{p}']" for p in path)) + ")"


def _bigint(expr: str) -> str:
    # JSON_VALUE ... RETURNING BIGINT is rejected by the code generator (Flink 2.3.0).
    return f"TRY_CAST({expr} AS BIGINT)"


def _source_table(name: str, cfg: JobConfig, topic: str) -> str:
    """A raw source on ``topic``: the value, the record headers, and the event time ``ts``
    that drives the watermark -- a data record's ``event_time_ms``, or for a watermark
    control message (empty value, header ``ctr.watermark``) the time in its header. The
    Kafka source keeps a watermark per partition, so a marker moves its partition's watermark
    on even when no event comes there: an idle partition stops holding the windows back
    without an idle timeout, and without making anything late (a marker at ``T`` promises no
    event before ``T`` on its partition; the watermark follows at ``T - out-of-orderness``).
    A record that is neither gets time 0, which never moves a watermark."""
    marker = _bigint(f"CAST(headers[{_q(WATERMARK_HEADER)}] AS STRING)")
    return f"""CREATE TABLE {name} (
  payload STRING,
  headers MAP<STRING, BYTES> METADATA VIRTUAL,
  ts AS TO_TIMESTAMP_LTZ(COALESCE({_bigint(_json("event_time_ms"))}, {marker}, 0), 3),
  {_watermark(cfg)}
) WITH (
  {_source_options(cfg, topic)}
)"""


def _entities(spec: FeatureSpec, alias: str) -> str:
    """``CROSS JOIN UNNEST`` of (entity_type, entity_id) pairs of one impression; a missing
    stat field gives a NULL id, filtered by the caller."""
    rows = [f"ROW(CAST('user' AS STRING), {alias}.user_id)", f"ROW(CAST('item' AS STRING), {alias}.item_id)"]
    for f in spec.stat_fields:
        prefix = field_value_key(f, "")
        rows.append(f"ROW(CAST('field_value' AS STRING), {_q(prefix)} || {alias}.categorical[{_q(f)}])")
    return "CROSS JOIN UNNEST(ARRAY[\n    " + ",\n    ".join(rows) + "\n  ]) AS e(entity_type, entity_id)"


def statements(spec: FeatureSpec, cfg: JobConfig) -> list[str]:
    """DDL, views and one INSERT per window of ``spec`` (run the INSERTs as one statement set)."""
    categorical = ", ".join(f"{_q(f)}, {_json('categorical', f)}" for f in spec.stat_fields)
    ddl = [
        _source_table("impressions", cfg, cfg.impressions_topic),
        _source_table("clicks", cfg, cfg.clicks_topic),
        f"""CREATE TABLE features_sink (
  entity_type STRING, entity_id STRING, `window` STRING, window_end_ms BIGINT,
  impressions BIGINT, clicks BIGINT, ctr DOUBLE
) WITH (
  'connector' = 'kafka', 'topic' = {_q(cfg.output_topic)},
  'properties.bootstrap.servers' = {_q(cfg.bootstrap)},{_extra_properties(cfg)}
  'key.format' = 'raw', 'key.fields' = 'entity_id',
  'value.format' = 'json', 'value.fields-include' = 'ALL'
)""",
        # Valid events only: JSON that parsed but lacks the required fields is what the Faust
        # join would dead-letter.
        f"""CREATE TEMPORARY VIEW valid_impressions AS
SELECT * FROM (
  SELECT {_json("event_id")} AS event_id, {_bigint(_json("event_time_ms"))} AS event_time_ms,
    {_json("user_id")} AS user_id, {_json("item_id")} AS item_id,
    {f"MAP[{categorical}]" if spec.stat_fields else "CAST(NULL AS MAP<STRING, STRING>)"} AS categorical, ts
  FROM impressions
)
WHERE event_id IS NOT NULL AND event_time_ms IS NOT NULL AND user_id IS NOT NULL AND item_id IS NOT NULL""",
        f"""CREATE TEMPORARY VIEW valid_clicks AS
SELECT * FROM (SELECT {_json("impression_id")} AS impression_id, {_bigint(_json("event_time_ms"))} AS event_time_ms, ts
  FROM clicks)
WHERE impression_id IS NOT NULL AND event_time_ms IS NOT NULL""",
        f"""CREATE TEMPORARY VIEW attributed_clicks AS
SELECT c.impression_id, c.ts, i.user_id, i.item_id, i.categorical
FROM valid_clicks c, valid_impressions i
WHERE c.impression_id = i.event_id
  AND c.ts BETWEEN i.ts AND i.ts + {_interval_ms(cfg.attribution_ms)}""",
        # The label join counts only the first attributed click of an impression.
        """CREATE TEMPORARY VIEW first_clicks AS
SELECT ts, user_id, item_id, categorical FROM (
  SELECT *, ROW_NUMBER() OVER (PARTITION BY impression_id ORDER BY ts ASC) AS rn FROM attributed_clicks
) WHERE rn = 1""",
        f"""CREATE TEMPORARY VIEW entity_events AS
SELECT e.entity_type, e.entity_id, i.ts, 1 AS imp, 0 AS clk
FROM valid_impressions i
{_entities(spec, "i")}
WHERE e.entity_id IS NOT NULL
UNION ALL
SELECT e.entity_type, e.entity_id, c.ts, 0 AS imp, 1 AS clk
FROM first_clicks c
{_entities(spec, "c")}
WHERE e.entity_id IS NOT NULL""",
    ]
    k, pk = _double(spec.prior_strength), _double(spec.prior_strength * spec.prior_ctr)
    inserts = [
        f"""INSERT INTO features_sink
SELECT entity_type, entity_id, {_q(w.name)},
  UNIX_TIMESTAMP(DATE_FORMAT(window_end, 'yyyy-MM-dd HH:mm:ss'), 'yyyy-MM-dd HH:mm:ss') * 1000,
  CAST(SUM(imp) AS BIGINT), CAST(SUM(clk) AS BIGINT),
  (CAST(SUM(clk) AS DOUBLE) + {pk}) / (CAST(SUM(imp) AS DOUBLE) + {k})
FROM TABLE(HOP(TABLE entity_events, DESCRIPTOR(ts), {_interval_ms(w.hop_s * 1000)}, {_interval_ms(w.size_s * 1000)}))
GROUP BY window_start, window_end, entity_type, entity_id"""
        for w in spec.windows
    ]
    return ddl + inserts
