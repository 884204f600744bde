"""The body-size guard: ASGI middleware that refuses an oversized body (413) before or while
reading it, and records every request's latency per endpoint."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
from starlette.exceptions import HTTPException

from ctr.serving.metrics import (
    ENDPOINTS,
    observe,
)


class PayloadTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes")


class Guard:
    """ASGI middleware: body-size limit (413 before reading when Content-Length says so, else
    while streaming) and the per-endpoint latency histogram."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_body_bytes: int) -> None:
        self.app, self.max = app, max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = [500]
        limit = self.max
        refused = content_length_refusal(scope, limit)
        if refused is not None:
            await send_json(send, *refused)
            observe(endpoint, refused[0], t0)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(limit)
            return message

        async def tracking_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        finally:
            observe(endpoint, status[0], t0)


def content_length_refusal(scope: Mapping[str, Any], limit: int) -> tuple[int, dict] | None:
    """(status, body) when the request's Content-Length exceeds ``limit`` (413) or is not a
    number (400); None otherwise (absent: the body is counted while it is read)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit():
                return 400, {"detail": "bad Content-Length"}
            if int(value) > limit:
                return 413, {"detail": f"request body exceeds {limit} bytes"}
            return None
    return None


async def send_json(send: Callable, status: int, body: dict) -> None:
    data = msgspec.json.encode(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})
