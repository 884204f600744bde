"""The Faust app: factory, a bulk-delivery consumer, and the plumbing the agents share.

Why a custom consumer
---------------------
Faust hands every record to its agents one at a time: ``Consumer._drain_messages``
(``faust/transport/consumer.py``) awaits ``wait_first(callback(message), suspend_flow.wait())``
per record -- two tasks and an ``asyncio.wait`` each -- then the conductor
(``faust/transport/conductor.py: on_message``) takes a lock, decodes and queues an ``Event``,
and the stream iterator (``faust/streams.py: _py_aiter``/``_c_aiter``) yields it after an
``await sleep(0)``. An agent doing *nothing* inside ``stream.take_events`` stays far below
the join's target rate (``bench/pacing.py`` and streams/README.md measure it). ``take()`` only
batches what reaches the agent; it cannot remove the per-record cost upstream of it.

:class:`BulkConsumer` keeps everything Faust does for a worker -- group membership, the
co-partitioned assignment of source topics and table changelogs, changelog recovery, commits,
rebalancing, the web/sensor machinery -- and changes one thing: records of the *bulk topics*
(the agents' source topics) are delivered as one :class:`Chunk` per fetched partition batch
to an ``asyncio.Queue`` the agent reads, instead of record by record through the conductor.
Changelog records (recovery) still take Faust's normal path. Offsets are acked in bulk
(:meth:`BulkConsumer.bulk_ack`, the same bookkeeping ``Consumer.ack`` does), only after the
agent's effects for those records are durable, so Faust's periodic commit never moves past
unprocessed input.

Outputs with many small messages (training examples, feature deltas, late clicks, dead
letters) go through confluent-kafka (:class:`OutputProducer`): aiokafka's producer costs tens of
µs per message in Python, librdkafka a few. Table changelog records -- few and large,
one per partition per micro-batch -- go through Faust's own producer.

Faust version: written against faust-streaming 0.15.3 (pinned); :class:`BulkConsumer` overrides
a private method and touches the consumer's private ack bookkeeping, so a Faust upgrade must
re-run ``tests/test_stream_agents.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import faust
from faust.transport.consumer import CONSUMER_FETCHING, ack_lock
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, FutureMessage, TableT
from mode.utils.futures import notify

from ctr.infra.config import fetch_backoff_s, kafka_compression
from ctr.infra.kafka_io import DeliveryTracker, first_offset_from, make_producer
from ctr.infra.lag import set_lag
from ctr.infra.security import KafkaSecurity, kafka_security
from ctr.streams.contiguity import ContiguityGuard
from ctr.streams.metrics import changelog_bytes

log = logging.getLogger(__name__)

DEFAULT_APP_ID = "ctr-stream"
PARTITIONS = 4
#: Topic configs of the agents' changelog topics (Faust adds ``cleanup.policy=compact``). Each
#: micro-batch record is tombstoned once its effects are confirmed, so a compacted changelog holds
#: only the live records -- but a broker compacts only closed segments. Without a roll, noida-db
#: never compacted (one segment, ``clean_offset`` 0) and kept every record of the run, rewriting
#: them all in its JSON state file (and memory); segments that roll let it (and Kafka's log
#: cleaner) drop them. Not too small: compacting costs the broker CPU, and with much shorter
#: segments feature freshness at the demo's rate got worse -- so a minute, which bounds long
#: runs and leaves short ones alone.
CHANGELOG_TOPIC_CONFIGS: dict[str, str] = {"segment.bytes": str(64 * 2**20), "segment.ms": "60000"}

#: An agent's state table: raw keys and values (its changelog records).
StateTable = TableT[bytes, bytes]
#: ``(partition, key, value)`` of a changelog record; ``value=None`` deletes (a tombstone).
ChangelogRecord = tuple[int, bytes, bytes | None]


@dataclass
class Chunk:
    """Records of one topic partition from one fetch, in offset order.

    ``ack_from`` is the lowest offset acking this chunk may cover: the offsets between the
    previous chunk (or the committed offset) and the first record are records the broker did
    not return (compaction, transaction markers); acking them keeps Faust's commit moving.
    """

    tp: TP
    records: list[Any]  # aiokafka ConsumerRecord: offset, key, value, headers, timestamp
    generation: int
    ack_from: int
    highwater: int | None = None

    @property
    def partition(self) -> int:
        return self.tp.partition

    @property
    def topic(self) -> str:
        return self.tp.topic


class BulkConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with bulk delivery for the topics in ``app.bulk_queues``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: tp -> offset of the last record queued (where the next chunk's acks may start)
        self._bulk_last: dict[TP, int] = {}
        #: tp -> how many times an agent moved its position (:meth:`bulk_seek`)
        self._bulk_seeks: dict[TP, int] = {}

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - exercised by integration tests
        # Mirrors Consumer._drain_messages (faust/transport/consumer.py) for non-bulk topics.
        app = self.app
        bulk_queues: dict[str, asyncio.Queue] = app.bulk_queues  # type: ignore[attr-defined]
        callback = self.callback
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        read_offset = self._read_offset
        acks_enabled_for = app.topics.acks_enabled_for
        self._bulk_last.clear()
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                records, active = await self._wait_next_records(1.0)
                await asyncio.sleep(0)
                if records is None or self.should_stop:
                    continue
                if not self.flow_active:
                    try:
                        await self.perform_seek()
                    except Exception as exc:  # noqa: BLE001 - same as Faust: log and go on
                        self.log.warning(f"exception performing seek when flow not active {exc}")
                    continue
                generation = app.consumer_generation_id
                for tp, recs in records.items():
                    if not recs or not self.flow_active:
                        continue
                    if active is not None and tp not in active and tp not in self._buffered_partitions:
                        continue
                    if app.consumer_generation_id != generation:
                        break
                    r_offset = read_offset[tp]
                    if r_offset is not None and recs[0].offset < r_offset:
                        recs = [r for r in recs if r.offset >= r_offset]
                        if not recs:
                            continue
                    queue = bulk_queues.get(tp.topic)
                    if queue is not None:
                        await self._deliver_bulk(queue, tp, recs, generation)
                        continue
                    for rec in recs:
                        message = self._to_message(tp, rec)
                        offset = message.offset
                        r_offset = read_offset[tp]
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                                await self._add_gap(tp, r_offset + 1, offset)
                            await self.wait_first(callback(message), self.suspend_flow.wait())
                            read_offset[tp] = offset
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)

    async def _deliver_bulk(self, queue: asyncio.Queue, tp: TP, recs: list, generation: int) -> None:
        app = self.app
        seeks = self.bulk_seeks(tp)
        first = recs[0].offset
        ack_from = first
        committed = self._committed_offset[tp]
        if committed is not None and committed < ack_from:
            ack_from = committed
        prev = self._bulk_last.get(tp)
        if prev is not None and prev + 1 < ack_from:
            ack_from = prev + 1
        chunk = Chunk(tp, recs, generation, ack_from, self.highwater(tp))
        while True:
            if app.consumer_generation_id != generation or self.should_stop or self.bulk_seeks(tp) != seeks:
                return  # stale: the rebalance (or the agent's seek) moved the position
            if not app.flow_control.is_active():
                await asyncio.sleep(0.01)
                continue
            try:
                await asyncio.wait_for(queue.put(chunk), timeout=0.1)
                break
            except TimeoutError:
                continue
        if self.bulk_seeks(tp) != seeks:
            # an agent seeked while the chunk was being queued: the chunk is stale (the agent
            # drops it), and a read offset set from it would make Faust's drain filter out the
            # re-fetch from the seek target -- the position the agent needs
            return
        self._read_offset[tp] = recs[-1].offset
        self._bulk_last[tp] = recs[-1].offset
        if chunk.highwater is not None and chunk.highwater >= 0:  # aiokafka's, from the fetch
            set_lag(app.conf.id, tp.topic, tp.partition, chunk.highwater - recs[-1].offset - 1)

    def bulk_seeks(self, tp: TP) -> int:
        """How many times an agent moved ``tp``'s position (:meth:`bulk_seek`)."""
        return self._bulk_seeks.get(tp, 0)

    async def bulk_seek(self, tp: TP, offset: int) -> None:
        """Move ``tp``'s fetch position to ``offset`` (an agent whose input skipped records its
        state has not applied). Chunks fetched before it are dropped before they are queued."""
        self._bulk_seeks[tp] = self._bulk_seeks.get(tp, 0) + 1
        self._bulk_last.pop(tp, None)
        await self.seek(tp, offset)

    def bulk_ack(self, tp: TP, first: int, last: int) -> int:
        """Ack every offset in ``[first, last]`` (what ``Consumer.ack`` does per message)."""
        if last < first:
            return 0
        with ack_lock:
            committed = self._committed_offset[tp]
            lo = first if committed is None else max(first, committed)
            index = self._acked_index[tp]
            new = [o for o in range(lo, last + 1) if o not in index]
            if new:
                index.update(new)
                self._acked[tp].extend(new)
                self._n_acked += len(new)
            notify(self._waiting_for_ack)
            return len(new)


class BulkTransport(faust_aiokafka.Transport):
    Consumer = BulkConsumer


class CtrApp(faust.App):
    """A :class:`faust.App` whose consumer delivers the bulk topics in chunks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: topic name -> queue of :class:`Chunk` (registered by :func:`bulk_queue`).
        self.bulk_queues: dict[str, asyncio.Queue] = {}

    def _new_transport(self) -> Any:
        return BulkTransport(self.conf.broker_consumer, self)

    def bulk_queue(self, topics: Iterable[str], maxsize: int = 256) -> asyncio.Queue:
        """The one queue that receives the chunks of ``topics``."""
        q: asyncio.Queue = asyncio.Queue(maxsize=maxsize)
        for t in topics:
            if t in self.bulk_queues:
                raise ValueError(f"topic {t} already has a bulk consumer")
            self.bulk_queues[t] = q
        return q


def install_fetch_backoff(backoff_s: float | None = None) -> float:
    """Make aiokafka wait ``backoff_s`` before re-fetching from a broker whose last fetch
    returned no records (default :func:`ctr.infra.config.fetch_backoff_s`, 10 ms). Returns it.

    Why: a Kafka broker holds an empty fetch for up to ``fetch_max_wait_ms`` (Faust asks for
    1.5 s), so an idle consumer sends a few fetches a second. noida-db ignores the wait (and
    ``fetch_min_bytes``) and answers at once, so aiokafka re-fetches in a tight loop: thousands
    of fetches a second on an empty topic, nearly **a whole core** of the worker spent building
    and parsing empty fetch responses (``ctr bench pacing`` measures it; Tansu, which honours
    the wait, does not spin). The fetcher keeps one request in flight per broker and starts the
    next one when it finishes (``Fetcher._fetch_requests_routine``), so sleeping inside
    ``_proc_fetch_request`` after an empty answer paces it; a fetch that brought records
    returns at once, so a backlog drains at full speed. New data waits at most the backoff.
    Against Apache Kafka an empty answer already took the broker's wait: the extra 10 ms is noise.
    """
    from aiokafka.consumer.fetcher import Fetcher

    if backoff_s is None:
        backoff_s = fetch_backoff_s()
    original = getattr(Fetcher, "_ctr_original_proc_fetch_request", None)
    if original is None:
        original = Fetcher._ctr_original_proc_fetch_request = Fetcher._proc_fetch_request
    if backoff_s <= 0:
        Fetcher._proc_fetch_request = original
        return 0.0

    async def _proc_fetch_request(self: Any, assignment: Any, node_id: Any, request: Any) -> bool:
        got_records = await original(self, assignment, node_id, request)
        if not got_records and assignment.active:
            try:
                await asyncio.sleep(backoff_s)
            except asyncio.CancelledError:
                # like the original on cancellation: ``Fetcher.close`` cancels and then awaits
                # this task without suppressing the error; raising would break the shutdown
                return got_records
        return got_records

    Fetcher._proc_fetch_request = _proc_fetch_request
    return backoff_s


def kafka_url(bootstrap: str) -> str:
    return bootstrap if "://" in bootstrap else f"kafka://{bootstrap}"


def create_app(
    bootstrap: str,
    *,
    app_id: str = DEFAULT_APP_ID,
    datadir: str | None = None,
    web_port: int | None = None,
    commit_interval_s: float = 1.0,
    instance_id: str | None = None,
    security: KafkaSecurity | None = None,
) -> CtrApp:
    """A Faust app for the CTR agents (agents are attached by :func:`ctr.streams.worker.build`).

    Settings and why:

    * ``store="memory://"`` -- rocksdb is not installed here; tables are rebuilt from their
      changelog topics on every (re)assignment, which is what the kill -9 test exercises;
    * ``topic_partitions=4`` -- every internal topic (changelogs) gets the source topics'
      count, so Faust's assignor puts partition *p* of impressions, clicks, the feature-delta
      topic and both changelogs on the same worker;
    * ``table_standby_replicas=0`` -- standbys cost a second changelog read per worker and buy
      nothing with the memory store: ``faust/stores/memory.py: Store.on_recovery_completed``
      drops every key of a partition that is not *active* after each recovery;
    * ``processing_guarantee="at_least_once"`` -- always: the agents' versioned effects make it
      exactly-once in effect (:mod:`ctr.streams.agents.label_join`);
    * session timeout 10 s / heartbeat 1 s -- quick rebalances after a kill -9;
    * ``producer_max_request_size`` 4 MiB -- one changelog record holds a micro-batch;
    * ``broker_credentials`` from ``security`` (default: :func:`ctr.infra.security.kafka_security`):
      Faust gives them to every aiokafka consumer, producer and admin client of the worker.
    """
    install_fetch_backoff()
    sasl = (security or kafka_security()).faust_credentials()
    codec = kafka_compression()
    datadir = datadir or tempfile.mkdtemp(prefix=f"{app_id}-faust-")
    return CtrApp(
        app_id,
        broker=kafka_url(bootstrap),
        broker_credentials=None if sasl is None else faust.SASLCredentials(**sasl),
        store="memory://",
        topic_partitions=PARTITIONS,
        # the changelog topics Faust creates itself: as many replicas as infra/broker.py gives ours
        topic_replication_factor=int(os.environ.get("CTR_REPLICATION_FACTOR", "1")),
        table_standby_replicas=0,
        processing_guarantee="at_least_once",
        datadir=datadir,
        web_enabled=web_port is not None,
        web_port=web_port or 6066,
        web_host="127.0.0.1",
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        broker_rebalance_timeout=float(os.environ.get("CTR_REBALANCE_TIMEOUT_S", "10")),
        broker_commit_interval=commit_interval_s,
        producer_max_request_size=4 * 1024 * 1024,
        producer_linger=0.005,
        # changelog records hold a micro-batch of raw impressions: zstd shrinks them several-fold
        # (aiokafka needs cramjam for it; consumers decompress whatever the producer chose)
        producer_compression_type=None if codec == "none" else codec,
        consumer_max_fetch_size=4 * 1024 * 1024,
        stream_wait_empty=False,
        consumer_group_instance_id=instance_id,
    )


class _Both:
    """Delivery callback feeding two trackers (the producer's and a round's)."""

    __slots__ = ("a", "b")

    def __init__(self, a: DeliveryTracker, b: DeliveryTracker) -> None:
        self.a, self.b = a, b

    def __call__(self, err: Any, msg: Any) -> None:
        self.a(err, msg)
        self.b(err, msg)


class OutputProducer:
    """confluent-kafka producer for the agents' many small outputs, with an awaitable
    "everything sent so far is acknowledged" (:meth:`delivered`)."""

    def __init__(self, bootstrap: str, **overrides: object) -> None:
        cfg: dict[str, object] = {"linger.ms": 20, **overrides}  # see ctr.infra.kafka_io: bigger zstd batches
        self.producer = make_producer(bootstrap.split("://", 1)[-1], **cfg)
        self.tracker = DeliveryTracker()
        self.sent = 0

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int,
        headers: Sequence[tuple[str, str | bytes | None]] | None = None,
        tracker: DeliveryTracker | None = None,
    ) -> None:
        """Enqueue one message; ``tracker`` (a second :class:`DeliveryTracker`) also counts it."""
        produce = self.producer.produce
        cb = self.tracker if tracker is None else _Both(self.tracker, tracker)
        while True:
            try:
                if headers:
                    produce(topic, value, key, partition, cb, headers=list(headers))
                else:
                    produce(topic, value, key, partition, cb)
                break
            except BufferError:
                self.producer.poll(0.01)
        self.sent += 1
        if self.sent & 0x3FF == 0:
            self.producer.poll(0)

    def send_many(
        self,
        topic: str,
        partition: int,
        items: Sequence[tuple[bytes, bytes, int]],
        tracker: DeliveryTracker | None = None,
    ) -> int:
        """Send ``(key, value, flag)`` items to one partition; returns the sum of the flags."""
        produce = self.producer.produce
        cb = self.tracker if tracker is None else _Both(self.tracker, tracker)
        flags = 0
        for key, value, flag in items:
            flags += flag
            try:
                produce(topic, value, key, partition, cb)
            except BufferError:
                self.producer.poll(0.01)
                self.send(topic, key, value, partition, tracker=tracker)
                continue
            self.sent += 1
        self.producer.poll(0)
        return flags

    @property
    def outstanding(self) -> int:
        t = self.tracker
        return self.sent - t.delivered - t.failed

    async def delivered(self, timeout_s: float = 60.0) -> None:
        """Wait until every message sent so far is acknowledged; raise if any was rejected."""
        deadline = time.monotonic() + timeout_s
        poll = self.producer.poll
        poll(0)
        while self.outstanding > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.outstanding} output messages unacknowledged after {timeout_s}s")
            await asyncio.sleep(0.001)
            poll(0)
        if self.tracker.failed:
            raise RuntimeError(f"{self.tracker.failed} output messages rejected: {self.tracker.errors[:3]}")

    def close(self, timeout_s: float = 10.0) -> None:
        self.producer.flush(timeout_s)


class InputAcker(Protocol):
    """What an agent's batch logic needs of the runner that fed it (:class:`BulkAgentBase`):
    acking input offsets once the batch's effects are durable."""

    def ack_ranges(self, ranges: Iterable[tuple[TP, int, int]]) -> None: ...


@dataclass
class Batch:
    """One micro-batch handed to an agent: the live chunks, in arrival order."""

    chunks: list[Chunk]
    events: int = 0


@dataclass
class BulkAgentBase:
    """The loop every bulk agent runs inside its Faust agent function.

    Forms micro-batches from the chunk queue (up to ``max_events``, waiting at most
    ``within_s`` after the first chunk), drops chunks from an older consumer generation
    (a rebalance seeks back to the committed offset, so they come again), keeps per-partition
    state in step with the assignment, and acks a batch's offsets after its effects are durable.
    Subclasses implement :meth:`owned_topic`, :meth:`build_partitions`, :meth:`drop_partitions`,
    :meth:`process` and optionally :meth:`on_idle`.
    """

    app: CtrApp
    queue: asyncio.Queue
    max_events: int = 8000
    within_s: float = 0.02
    idle_s: float = 0.2
    generation: int | None = field(default=None, init=False)
    owned: set[int] = field(default_factory=set, init=False)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    stale: bool = field(default=True, init=False)
    #: wall seconds spent waiting for input (the agent was faster than the fetcher)
    waited_s: float = field(default=0.0, init=False)
    _guard: ContiguityGuard | None = field(default=None, init=False, repr=False)

    # ---- subclass hooks
    def owned_topic(self) -> str:
        raise NotImplementedError

    async def build_partitions(self, partitions: set[int]) -> None:
        raise NotImplementedError

    def drop_partitions(self, partitions: set[int]) -> None:
        raise NotImplementedError

    async def process(self, batch: Batch) -> None:
        raise NotImplementedError

    async def on_idle(self) -> None:
        return None

    def next_offset(self, tp: TP) -> int | None:
        """The input offset the agent's state applies next from ``tp``, or ``None`` when it
        keeps no offsets (then its input is not checked for skips)."""
        return None

    async def quiesce(self) -> None:
        """Finish the work in flight (called with the lock held, before a revoke)."""
        return None

    def ack_ranges(self, ranges: Iterable[tuple[TP, int, int]]) -> None:
        consumer: BulkConsumer = self.app.consumer  # type: ignore[assignment]
        for tp, first, last in ranges:
            consumer.bulk_ack(tp, first, last)

    # ---- machinery
    def install(self) -> None:
        self.app.on_partitions_revoked.connect(self._on_revoked)

    async def _on_revoked(self, *args: Any, **kwargs: Any) -> None:
        # Eager rebalancing revokes everything; wait for the batch in flight so no changelog
        # record of a partition is written after another worker may own it.
        async with self.lock:
            if not self.stale:
                await self.quiesce()
            self.stale = True

    async def sync_assignment(self) -> None:
        app = self.app
        if not self.stale and self.generation == app.consumer_generation_id:
            return
        while app.rebalancing and not app.should_stop:
            await asyncio.sleep(0.01)
        async with self.lock:
            topic = self.owned_topic()
            now = {tp.partition for tp in app.consumer.assignment() if tp.topic == topic}
            self.drop_partitions(set(self.owned))
            self.owned = set()
            await self.build_partitions(now)
            self.owned = now
            self.generation = app.consumer_generation_id
            self.stale = False
            log.info("%s owns partitions %s (generation %s)", type(self).__name__, sorted(now), self.generation)

    async def next_batch(self) -> Batch | None:
        q = self.queue
        t0 = time.perf_counter()
        try:
            first = await asyncio.wait_for(q.get(), timeout=self.idle_s)
        except TimeoutError:
            return None
        finally:
            self.waited_s += time.perf_counter() - t0
        chunks = [first]
        n = len(first.records)
        deadline = time.monotonic() + self.within_s
        while n < self.max_events:
            try:
                c = q.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    c = await asyncio.wait_for(q.get(), timeout=remaining)
                except TimeoutError:
                    break
            chunks.append(c)
            n += len(c.records)
        return Batch(chunks, n)

    async def run(self) -> None:
        self.install()
        app = self.app
        try:
            while not app.should_stop:
                batch = await self.next_batch()
                await self.sync_assignment()
                if batch is None:
                    async with self.lock:
                        if not self.stale:
                            await self.on_idle()
                    continue
                gen = app.consumer_generation_id
                live = [c for c in batch.chunks if c.generation == gen and c.partition in self.owned]
                if not live:
                    continue
                async with self.lock:
                    if self.stale:
                        continue
                    live = await self._contiguous(live)
                    if live:
                        await self.process(Batch(live, sum(len(c.records) for c in live)))
        except asyncio.CancelledError:
            raise
        except Exception:
            # Every effect is idempotent and recoverable from the changelogs: dying loudly
            # and being restarted is safer than running on with half-applied state.
            log.exception("%s crashed; exiting so the worker restarts from its changelogs", type(self).__name__)
            logging.shutdown()
            os._exit(70)

    async def _contiguous(self, chunks: list[Chunk]) -> list[Chunk]:
        """The chunks that continue the state's offsets; seeks back where the consumer skipped."""
        if self._guard is None:
            self._guard = ContiguityGuard(self._probe, agent=type(self).__name__)
        admitted = await self._guard.admit(chunks, self.next_offset)
        consumer: BulkConsumer = self.app.consumer  # type: ignore[assignment]
        for tp, offset in admitted.seeks.items():
            await consumer.bulk_seek(tp, offset)
        return admitted.chunks

    async def _probe(self, tp: TP, offset: int) -> int | None:
        brokers = ",".join(f"{u.host}:{u.port}" for u in self.app.conf.broker)
        return await asyncio.to_thread(first_offset_from, brokers, tp.topic, tp.partition, offset)

    def ack(self, chunks: Iterable[Chunk], upto: dict[TP, int] | None = None) -> None:
        """Ack the chunks' offsets (all of them, or up to ``upto[tp]`` inclusive)."""
        consumer: BulkConsumer = self.app.consumer  # type: ignore[assignment]
        for c in chunks:
            last = c.records[-1].offset if upto is None else upto.get(c.tp, c.records[-1].offset)
            consumer.bulk_ack(c.tp, c.ack_from, last)


async def send_changelog(
    table: StateTable, records: Sequence[ChangelogRecord], wait: bool = True
) -> list[FutureMessage]:
    """Write ``(partition, key, value)`` to ``table``'s changelog and to the table itself
    (``value=None`` deletes); with ``wait``, until the broker acknowledged every one. Returns
    the acknowledgement futures."""
    topic = table.changelog_topic
    data = table.data
    futures: list[FutureMessage] = []
    size = 0
    for partition, key, value in records:
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
            size += len(value)
        # faust types Topic.send's result as an Awaitable; it is its FutureMessage (an
        # asyncio.Future), whose done() and callbacks the label join's pipeline uses
        futures.append(cast(FutureMessage, await topic.send(key=key, value=value, partition=partition)))
    if records:
        changelog_bytes().labels(table.name).inc(size)
    if wait and futures:
        await asyncio.gather(*futures)
    return futures


def table_items(table: StateTable, prefix: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs of ``table`` whose key starts with ``prefix``, sorted by key."""
    return sorted((k, v) for k, v in list(table.data.items()) if isinstance(k, bytes) and k.startswith(prefix) and v)


Callback = Callable[..., Any]
