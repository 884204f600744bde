"""The updater <-> worker channel of ``ctr serve --workers``: pickled tuples over one Unix
socket pair per worker, a model's segment handed over as a file descriptor (SCM_RIGHTS).

Messages, updater -> worker:

* ``("serve", seq, token, meta, config, layout)`` + the segment's fd: serve this version now
  (``meta``: the :class:`~ctr.serving.registry.ModelVersion` fields, ``config``: the model
  config as a dict). Every serve is one hold on the version in the updater, returned by one
  ``drop``.
* ``("status", status)``: the updater's registry and consumer state (what ``/model`` shows).
* ``("collect", call_id)``: send this process's metrics.
* ``("reply", call_id, result)``: the answer to a ``call``.

Worker -> updater:

* ``("serving", seq)``: the version of serve ``seq`` answers requests now.
* ``("drop", token)``: the worker no longer reads that version (not current, no request in
  flight on it): the updater may write into its segment again.
* ``("call", call_id, op, args)``: ``rollback`` / ``unpin`` / ``metrics``, done by the updater.
* ``("metrics", call_id, text)``: the answer to ``collect``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

__all__ = ["Channel", "bind_port"]


def bind_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT``, not listening yet.

    Every worker binds its own (uvicorn listens on it once the worker is ready): the kernel
    spreads new connections over the listening ones, and a worker that dies or has not started
    yet gets none. The updater binds one it never listens on, to hold the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Channel:
    """One end of a worker's socket pair. ``send`` from any thread; ``recv`` from one."""

    def __init__(self, sock: socket.socket) -> None:
        self._conn = Connection(sock.detach())
        self._lock = threading.Lock()

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        return cls(socket.socket(fileno=fd))

    def send(self, message: tuple[Any, ...], fd: int | None = None) -> None:
        """Send ``message`` (and ``fd``, duplicated into the receiver). Raises OSError when
        the other end is gone."""
        with self._lock:
            self._conn.send(message)
            if fd is not None:
                send_handle(self._conn, fd, 0)

    def recv(self) -> tuple[tuple[Any, ...], int | None]:
        """The next message and the fd that came with it (a ``serve``'s; the caller owns it).
        Raises EOFError / OSError when the other end is gone."""
        message = self._conn.recv()
        fd = recv_handle(self._conn) if message[0] == "serve" else None
        return message, fd

    def close(self) -> None:
        """Shut the socket down (a thread blocked in ``recv`` sees the end), then close it."""
        with contextlib.suppress(OSError), socket.fromfd(self._conn.fileno(), socket.AF_UNIX,
                                                         socket.SOCK_STREAM) as sock:
            sock.shutdown(socket.SHUT_RDWR)
        self._conn.close()
