"""One security config for every Kafka and Redis client: read once from the environment,
turned into the settings each client library spells its own way.

Why one module: the project talks to Kafka through four libraries (confluent-kafka for the hot
paths, aiokafka under Faust, kafka-python in the benchmarks, the Java client under Flink's
Kafka connector) and to Redis through Feast. Each names the same four facts differently; if
each call site read its own variables, one of them would be forgotten and connect in the
clear. Every builder of a client takes its settings from :func:`kafka_security` /
:func:`redis_security` (``tests/test_security.py`` checks each one).

Variables (a password comes from a file or a variable, never both; a file is what compose's
secrets give, ``docs/deployment.md``)::

    CTR_KAFKA_SECURITY_PROTOCOL   PLAINTEXT (default) | SASL_PLAINTEXT | SASL_SSL
    CTR_KAFKA_SASL_MECHANISM      SCRAM-SHA-512 (default) | SCRAM-SHA-256 | PLAIN
    CTR_KAFKA_USERNAME            CTR_KAFKA_PASSWORD_FILE | CTR_KAFKA_PASSWORD
    CTR_KAFKA_SSL_CA_FILE         SASL_SSL: the CA bundle that signed the brokers' certificates
    CTR_REDIS_USERNAME            CTR_REDIS_PASSWORD_FILE | CTR_REDIS_PASSWORD

Passwords are :class:`Secret` objects: their ``repr``/``str`` name where they came from,
never the value, so a config can be logged or shown in an error. Only the client builders call
:meth:`Secret.reveal`. Stdlib only: the PyFlink job imports this in a venv without Faust.

>>> k = kafka_security({"CTR_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "CTR_KAFKA_USERNAME": "worker",
...                     "CTR_KAFKA_PASSWORD": "s3cret"})
>>> k.password, k.librdkafka()["sasl.mechanism"], "s3cret" in repr(k)
(Secret(from $CTR_KAFKA_PASSWORD), 'SCRAM-SHA-512', False)
"""

from __future__ import annotations

import os
import secrets
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROTOCOLS = ("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")
#: The Java client's login module per mechanism (Flink's Kafka connector).
_JAAS_MODULE = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}


class SecurityConfigError(ValueError):
    """A missing or contradictory setting; the message names variables, never values."""


class Secret:
    """A password that does not print itself."""

    __slots__ = ("_value", "origin")

    def __init__(self, value: str, origin: str) -> None:
        self._value, self.origin = value, origin

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(from {self.origin})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def read_secret(env: Mapping[str, str], var: str, file_var: str) -> Secret | None:
    """The content of the file ``$file_var`` names (without its trailing newline), or ``$var``,
    or None when neither is set."""
    path, value = env.get(file_var) or None, env.get(var) or None
    if path and value:
        raise SecurityConfigError(f"both ${var} and ${file_var} are set: keep one (the file)")
    if path:
        try:
            text = Path(path).read_text().rstrip("\r\n")
        except OSError as err:
            raise SecurityConfigError(f"${file_var}={path}: cannot read it ({err.strerror})") from None
        if not text:
            raise SecurityConfigError(f"${file_var}={path} is empty")
        return Secret(text, f"${file_var}={path}")
    return Secret(value, f"${var}") if value else None


@dataclass(frozen=True)
class KafkaSecurity:
    """How a Kafka client authenticates; the default is the embedded broker's plaintext."""

    protocol: str = "PLAINTEXT"
    mechanism: str | None = None
    username: str | None = None
    password: Secret | None = None
    ca_file: str | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise SecurityConfigError(f"CTR_KAFKA_SECURITY_PROTOCOL={self.protocol}: one of {', '.join(PROTOCOLS)}")
        if not self.sasl:
            return
        if self.mechanism not in MECHANISMS:
            raise SecurityConfigError(f"CTR_KAFKA_SASL_MECHANISM={self.mechanism}: one of {', '.join(MECHANISMS)}")
        if not self.username or self.password is None:
            raise SecurityConfigError(f"{self.protocol} needs $CTR_KAFKA_USERNAME and a password "
                                      "($CTR_KAFKA_PASSWORD_FILE or $CTR_KAFKA_PASSWORD)")

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    def _password(self) -> str:
        assert self.password is not None  # __post_init__: SASL has one
        return self.password.reveal()

    def librdkafka(self) -> dict[str, str]:
        """confluent-kafka ``Producer`` / ``Consumer`` / ``AdminClient`` settings."""
        cfg = {"security.protocol": self.protocol.lower()}
        if self.sasl:
            cfg |= {"sasl.mechanism": str(self.mechanism), "sasl.username": str(self.username),
                    "sasl.password": self._password()}  # fmt: skip
        if self.ca_file:
            cfg["ssl.ca.location"] = self.ca_file
        return cfg

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of a ``SASL_SSL`` connection (system CAs unless ``ca_file``)."""
        return ssl.create_default_context(cafile=self.ca_file) if self.protocol == "SASL_SSL" else None

    def aiokafka(self) -> dict[str, Any]:
        """``AIOKafkaProducer`` / ``AIOKafkaConsumer`` keyword arguments."""
        if not self.sasl:
            return {"security_protocol": "PLAINTEXT"}
        return {"security_protocol": self.protocol, "sasl_mechanism": self.mechanism,
                "sasl_plain_username": self.username, "sasl_plain_password": self._password(),
                "ssl_context": self.ssl_context()}  # fmt: skip

    def kafka_python(self) -> dict[str, Any]:
        """kafka-python ``KafkaProducer`` / ``KafkaConsumer`` keyword arguments."""
        out = self.aiokafka()
        if out.pop("ssl_context", None) is not None and self.ca_file:
            out["ssl_cafile"] = self.ca_file
        return out

    def faust_credentials(self) -> dict[str, Any] | None:
        """Keyword arguments of ``faust.SASLCredentials`` (None: plaintext). Faust hands them to
        aiokafka for every consumer, producer and admin connection of a worker."""
        if not self.sasl:
            return None
        return {"username": self.username, "password": self._password(), "mechanism": self.mechanism,
                "ssl_context": self.ssl_context()}  # fmt: skip

    def flink_properties(self) -> dict[str, str]:
        """Kafka client properties of Flink's Kafka connector (``properties.`` prefix added by
        the job). The Java client takes the password inside a JAAS line; it travels with the job."""
        if not self.sasl:
            return {}
        user, password = str(self.username), self._password()
        if any(c in s for s in (user, password) for c in '"\\'):
            raise SecurityConfigError("a Kafka username or password with '\"' or '\\' cannot go into a JAAS line")
        props = {"security.protocol": self.protocol, "sasl.mechanism": str(self.mechanism),
                 "sasl.jaas.config": f'{_JAAS_MODULE[str(self.mechanism)]} required username="{user}" '
                                     f'password="{password}";'}  # fmt: skip
        if self.ca_file:
            props |= {"ssl.truststore.type": "PEM", "ssl.truststore.location": self.ca_file}
        return props


@dataclass(frozen=True)
class RedisSecurity:
    """The Redis ACL user the Feast online store logs in as (none: Redis' default user)."""

    username: str | None = None
    password: Secret | None = None

    def __post_init__(self) -> None:
        if self.username and self.password is None:
            raise SecurityConfigError("$CTR_REDIS_USERNAME needs a password "
                                      "($CTR_REDIS_PASSWORD_FILE or $CTR_REDIS_PASSWORD)")
        # Feast splits its connection string on ',' and json-decodes each value
        if self.password is not None and ("," in self.password.reveal() or "," in (self.username or "")):
            raise SecurityConfigError("a Redis username or password with ',' cannot go into Feast's connection string")

    def connection_params(self) -> str:
        """What Feast's Redis ``connection_string`` gets appended (``,username=..,password=..``)."""
        out = f",username={self.username}" if self.username else ""
        return out + (f",password={self.password.reveal()}" if self.password is not None else "")

    def redis_kwargs(self) -> dict[str, str]:
        """``redis.Redis(...)`` keyword arguments."""
        out = {"username": self.username} if self.username else {}
        return out | ({"password": self.password.reveal()} if self.password is not None else {})


def kafka_security(env: Mapping[str, str] | None = None) -> KafkaSecurity:
    """The Kafka settings of this process (``os.environ`` unless ``env``); read on every call,
    so a client built after a password file changed uses the new password."""
    env = os.environ if env is None else env
    protocol = (env.get("CTR_KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT").strip().upper()
    if not protocol.startswith("SASL_"):
        return KafkaSecurity(protocol)
    mechanism = (env.get("CTR_KAFKA_SASL_MECHANISM") or "SCRAM-SHA-512").strip().upper()
    secret = read_secret(env, "CTR_KAFKA_PASSWORD", "CTR_KAFKA_PASSWORD_FILE")
    return KafkaSecurity(protocol, mechanism, env.get("CTR_KAFKA_USERNAME") or None, secret,
                         env.get("CTR_KAFKA_SSL_CA_FILE") or None)


def redis_security(env: Mapping[str, str] | None = None) -> RedisSecurity:
    """The Redis settings of this process (``os.environ`` unless ``env``)."""
    env = os.environ if env is None else env
    secret = read_secret(env, "CTR_REDIS_PASSWORD", "CTR_REDIS_PASSWORD_FILE")
    return RedisSecurity(env.get("CTR_REDIS_USERNAME") or None, secret)


@dataclass(frozen=True)
class SecurityConfig:
    """Both halves, for code that shows or checks the whole configuration."""

    kafka: KafkaSecurity
    redis: RedisSecurity

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SecurityConfig:
        return cls(kafka_security(env), redis_security(env))

    def secrets(self) -> list[str]:
        """The secret values, for :func:`redact` (and the tests that grep for them)."""
        return [s.reveal() for s in (self.kafka.password, self.redis.password) if s is not None]


def redact(text: str, values: list[str]) -> str:
    """``text`` with every secret value replaced by ``***`` (for output that must quote a
    config holding one, such as the Flink job's generated SQL)."""
    for s in sorted(values, key=len, reverse=True):
        text = text.replace(s, "***")
    return text


def write_password_files(directory: Path, names: Sequence[str]) -> dict[str, bool]:
    """``directory/<name>.password`` with a new random password for each name that has none
    (an existing file is kept: a deployment's users already have those). Returns name -> created.

    32 random bytes, URL-safe base64: no ',', quote, bracket or '=' that a client's syntax
    (Feast's connection string, a JAAS line, kafka-configs' list) would split on. The directory
    is 0700 (only its owner gets at the files); the files 0644, because compose mounts each one
    into containers whose users (the Kafka image's uid 1000, redis) are not the owner."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    created = {}
    for name in names:
        path = directory / f"{name}.password"
        created[name] = not path.exists()
        if created[name]:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
    return created
