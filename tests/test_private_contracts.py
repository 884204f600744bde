"""Contracts with the private Faust / aiokafka internals the stream agents use.

The pins in constraints.txt hold these in place; when a pin moves, the test that names the
internal fails and says what to re-check, instead of the worker misbehaving at run time.

* ``ctr.streams.app.BulkConsumer._drain_messages`` mirrors ``faust.transport.consumer.Consumer.
  _drain_messages`` (bulk delivery needs the chunk, not message by message): its source is
  fingerprinted; a different fingerprint means the copy must be re-synced.
* ``BulkConsumer._deliver_bulk`` / ``bulk_ack`` write the consumer's ack bookkeeping
  (``_acked``, ``_acked_index``, ``_n_acked``, ``_committed_offset``, ``_waiting_for_ack``) the
  way ``Consumer.ack`` does.
* ``ctr.streams.app.install_fetch_backoff`` wraps ``aiokafka.consumer.fetcher.Fetcher.
  _proc_fetch_request(assignment, node_id, request) -> bool``, called by
  ``_fetch_requests_routine``.
* ``ctr.streams.app.send_changelog`` writes ``table.data`` (the store: a mapping) and sends on
  ``table.changelog_topic``.
* ``ctr.features.sqlite_direct.SqliteDirect`` (Feast's SQLite online table, written directly)
  names ``feast.infra.online_stores.sqlite._table_id(project, table, enable_versioning)`` and
  ``SqliteOnlineStore._get_conn(config)``, and repeats the upsert of ``online_write_batch``.
"""

from __future__ import annotations

import hashlib
import inspect

import pytest

#: sha256 (first 16 hex) of faust 0.15.3's Consumer._drain_messages, which BulkConsumer copies
DRAIN_MESSAGES_FINGERPRINT = "44a2500309e83c63"


def _fingerprint(fn) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]


def test_the_copied_drain_loop_matches_faust() -> None:
    from faust.transport.consumer import Consumer

    got = _fingerprint(Consumer._drain_messages)
    assert got == DRAIN_MESSAGES_FINGERPRINT, (
        "faust changed Consumer._drain_messages (fingerprint "
        f"{got}): re-sync ctr.streams.app.BulkConsumer._drain_messages with it, then update the fingerprint"
    )


@pytest.mark.parametrize("name", ["_committed_offset", "_acked", "_acked_index", "_n_acked", "_waiting_for_ack",
                                  "_add_gap", "_read_offset", "_buffered_partitions", "_wait_next_records",
                                  "flow_active", "perform_seek", "_to_message", "wait_first", "suspend_flow",
                                  "consumer_stopped_errors", "diag"])  # fmt: skip
def test_faust_consumer_still_has_what_the_bulk_consumer_touches(name: str) -> None:
    from faust.transport.consumer import Consumer

    src = inspect.getsource(Consumer)
    assert f"self.{name}" in src or f"def {name}" in src, (
        f"faust's Consumer no longer has {name!r}, which ctr.streams.app.BulkConsumer reads or writes"
    )


def test_faust_ack_bookkeeping_is_what_bulk_ack_repeats() -> None:
    from faust.transport.consumer import Consumer

    ack = inspect.getsource(Consumer.ack)
    for piece in ("self._committed_offset[", "self._acked_index[", "self._acked[", "self._n_acked"):
        assert piece in ack, f"faust Consumer.ack no longer uses {piece!r}: re-check BulkConsumer.bulk_ack"


def test_aiokafka_fetch_request_hook_has_its_shape() -> None:
    from aiokafka.consumer.fetcher import Fetcher

    params = list(inspect.signature(Fetcher._proc_fetch_request).parameters)
    assert params == ["self", "assignment", "node_id", "request"], (
        f"aiokafka Fetcher._proc_fetch_request is now {params}: re-check ctr.streams.app.install_fetch_backoff"
    )
    assert "self._proc_fetch_request(" in inspect.getsource(Fetcher._fetch_requests_routine), (
        "aiokafka's _fetch_requests_routine no longer calls _proc_fetch_request: the fetch backoff would do nothing"
    )


def test_faust_tables_expose_a_mapping_store_and_a_changelog_topic() -> None:
    import faust
    from faust.stores.memory import Store

    assert "self.data" in inspect.getsource(Store.__post_init__), "faust's memory Store no longer keeps .data"
    assert isinstance(getattr(faust.Table, "changelog_topic", None), property), (
        "faust.Table.changelog_topic is gone: re-check ctr.streams.app.send_changelog"
    )


def test_feast_sqlite_internals_the_direct_writer_names() -> None:
    from feast.infra.online_stores.sqlite import SqliteOnlineStore, _table_id

    assert list(inspect.signature(_table_id).parameters)[:2] == ["project", "table"], (
        "feast changed _table_id: re-check ctr.features.sqlite_direct (table names)"
    )
    assert list(inspect.signature(SqliteOnlineStore._get_conn).parameters)[:2] == ["self", "config"]
    upsert = inspect.getsource(SqliteOnlineStore.online_write_batch)
    for column in ("entity_key", "feature_name", "value_text", "event_ts", "created_ts", "ON CONFLICT"):
        assert column in upsert, f"feast's SQLite upsert no longer names {column!r}: re-sync ctr.features.sqlite_direct"
