"""The PyFlink windowed-feature job and its harness (README.md beside this file)."""

#: Producer settings for topics the Flink job reads. Flink's Kafka connector reads with
#: kafka-clients, which decodes zstd only with the zstd-jni jar -- not in PyFlink 2.3.0's lib
#: nor among the two connector jars we install (checked: no ``com/github/luben/zstd``), while
#: lz4-java and snappy-java ship in ``flink-dist``. So what Flink reads is lz4, not the
#: project's zstd default (``ctr.infra.config.kafka_compression``).
KAFKA_PRODUCER_CONFIG: dict[str, object] = {"compression.type": "lz4"}
