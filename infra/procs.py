"""Child-process hygiene: children die with their parent, stops escalate SIGTERM -> SIGKILL."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
from contextlib import closing

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """``preexec_fn`` that asks Linux to SIGTERM the child when the parent dies, so a
    ``kill -9`` of the launcher never orphans a broker or a worker."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (the OS picks; a tiny race is accepted)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen[bytes] | int, grace_s: float = 10.0) -> int | None:
    """SIGTERM, wait ``grace_s``, then SIGKILL. Accepts a Popen or a bare pid.

    Returns the exit code when it is known (Popen), else None.
    """
    if isinstance(proc, int):
        _stop_pid(proc, grace_s)
        return None
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _stop_pid(pid: int, grace_s: float) -> None:
    import time

    if not pid_alive(pid):
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return None
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return None
