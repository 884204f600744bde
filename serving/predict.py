"""The ``/predict`` request path, free of the web framework: body -> features -> model inputs ->
a batched forward -> response body.

:class:`Predictor` does one request with ONE model version (acquired once, named in the
response). :class:`BatchScorer` scores the candidates of requests that are in flight together
in one forward per version (dynamic batching). :class:`PredictPath` is the ASGI app that
answers ``POST /predict`` straight from the server, in front of FastAPI's middleware, routing,
validation and dependency layers, which cost more than the scoring itself at these sizes;
FastAPI still declares the route (the OpenAPI document) and serves ``?explain=true``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
import numpy as np
from starlette.concurrency import run_in_threadpool

from ctr.online_learner.encoding import EncodedBatch
from ctr.serving.candidate_fields import DECLINE_REASONS, CandidateFields
from ctr.serving.features import Lookup, record
from ctr.serving.guard import content_length_refusal, send_json
from ctr.serving.metrics import BATCH_REQUESTS, CANDIDATE_SCAN_DECLINED, CANDIDATES, SCORE_SECONDS, observe
from ctr.serving.registry import ModelVersion
from ctr.serving.request_encoding import ATTRIBUTES, encode_request
from ctr.serving.state import ServingState

_JSON = [(b"content-type", b"application/json")]
log = logging.getLogger(__name__)


class Refusal(Exception):
    """A request answered with an error status and ``{"detail": ...}`` (or a full body)."""

    def __init__(self, status: int, detail: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.body = body if body is not None else {"detail": detail}


class _Prediction(msgspec.Struct):
    item_id: str
    position: int
    p_click: float


class BatchScorer:
    """Scores the encoded candidates of concurrent requests in shared forwards.

    A request queues its rows with the version it acquired and awaits its scores. The queue is
    flushed once the event loop has run the callbacks that were ready with the first queued
    request (``max_wait_s`` 0: requests read in the same turn of the loop share a forward, and a
    lone request waits for nothing) or ``max_wait_s`` after it, or at once when ``max_rows`` are
    queued. Each version's rows go through one forward (one ``ModelVersion.predict``): the
    forward's fixed cost is paid once per batch instead of once per request.

    The forwards run on the event loop: a replica gets one core, so a scorer thread would add
    a hand-off per batch without adding parallelism.

    >>> import asyncio
    >>> class Version:  # stands in for a ModelVersion: one forward over the stacked rows
    ...     calls = 0
    ...     def predict(self, enc):
    ...         Version.calls += 1
    ...         return enc.keys[:, 0].astype(np.float32)
    >>> v = Version()
    >>> async def three_requests():
    ...     scorer = BatchScorer()
    ...     batches = [EncodedBatch(np.full((n, 1), n, dtype=np.uint64), None) for n in (1, 2, 3)]
    ...     return await asyncio.gather(*(scorer.score(v, b) for b in batches))
    >>> [p.tolist() for p in asyncio.run(three_requests())], Version.calls
    ([[1.0], [2.0, 2.0], [3.0, 3.0, 3.0]], 1)
    """

    def __init__(self, max_wait_s: float = 0.0, max_rows: int = 8192) -> None:
        self.max_wait_s, self.max_rows = max_wait_s, max_rows
        self._queue: list[tuple[Any, EncodedBatch, asyncio.Future[np.ndarray]]] = []
        self._rows = 0
        self._timer: asyncio.Handle | asyncio.TimerHandle | None = None
        self.batches = 0
        self.requests = 0

    async def score(self, mv: Any, enc: EncodedBatch) -> np.ndarray:
        """Click probabilities ``[len(enc)]`` of ``enc`` under ``mv``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        self._queue.append((mv, enc, fut))
        self._rows += len(enc)
        if self._rows >= self.max_rows:
            self._flush()
        elif self._timer is None:
            self._timer = (loop.call_soon(self._flush) if self.max_wait_s <= 0
                           else loop.call_later(self.max_wait_s, self._flush))
        return await fut

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue, self._queue, self._rows = self._queue, [], 0
        groups: dict[int, list[tuple[Any, EncodedBatch, asyncio.Future[np.ndarray]]]] = {}
        for item in queue:
            groups.setdefault(id(item[0]), []).append(item)
        for group in groups.values():
            self.batches += 1
            self.requests += len(group)
            BATCH_REQUESTS.observe(len(group))
            _deliver(group, _forward(group))


def _forward(group: list[tuple[Any, EncodedBatch, Any]]) -> np.ndarray | BaseException:
    """One forward over the group's rows stacked (or the error, delivered to every request)."""
    try:
        encs = [enc for _, enc, _ in group]
        if len(encs) == 1:
            return group[0][0].predict(encs[0])
        keys = np.concatenate([e.keys for e in encs])
        numeric = None if encs[0].numeric is None else np.concatenate([e.numeric for e in encs])
        return group[0][0].predict(EncodedBatch(keys, numeric))
    except Exception as err:  # noqa: BLE001 - the requests answer 500, the server goes on
        return err


def _deliver(group: list[tuple[Any, EncodedBatch, asyncio.Future[np.ndarray]]], p: np.ndarray | BaseException) -> None:
    start = 0
    for _, enc, fut in group:
        end = start + len(enc)
        if not fut.done():  # done: the request went away (a client disconnect cancels it)
            if isinstance(p, BaseException):
                fut.set_exception(p)
            else:
                fut.set_result(p[start:end])
        start = end


class Predictor:
    """One ``/predict``: decode, acquire a version, features, encode, score, respond."""

    def __init__(self, state: ServingState, request_struct: type[msgspec.Struct], scorer: BatchScorer,
                 lazy_struct: type[msgspec.Struct] | None = None) -> None:
        """``lazy_struct``: the request type whose candidates keep ``categorical`` as raw JSON
        (:func:`ctr.serving.schema.lazy_request_type`), for the fast path; None: always decode
        fully."""
        self.state, self.scorer = state, scorer
        self.decoder = msgspec.json.Decoder(request_struct)
        self.lazy_decoder = msgspec.json.Decoder(lazy_struct) if lazy_struct is not None else None
        self._fields: dict[int, tuple[Any, CandidateFields]] = {}

    def decode(self, body: bytes) -> Any:
        """The request, fully decoded and validated. Raises :class:`Refusal` (422)."""
        try:
            return self.decoder.decode(body)
        except msgspec.ValidationError as err:
            raise Refusal(422, f"invalid request: {err}", {"error": f"invalid request: {err}",
                                                            "detail": [{"msg": str(err), "type": "invalid"}]}) from None
        except (msgspec.DecodeError, UnicodeDecodeError) as err:  # msgspec: bad UTF-8 is not a DecodeError
            raise Refusal(422, f"malformed JSON: {err}", {"error": f"malformed JSON: {err}",
                                                         "detail": [{"msg": str(err), "type": "json"}]}) from None

    async def respond(self, body: bytes, explain: bool = False) -> bytes:
        """The response body. Raises :class:`Refusal` for a 4xx/5xx answer.

        The fast path decodes the candidates' categorical objects lazily and keys them from the
        bytes (:mod:`ctr.serving.candidate_fields`); when it cannot (an error, an unusual
        shape, ``explain``), the request is decoded fully: the same answer, errors included."""
        lazy = None
        if self.lazy_decoder is not None and not explain:
            try:
                lazy = self.lazy_decoder.decode(body)
            except (msgspec.DecodeError, UnicodeDecodeError):
                lazy = None  # the full decode below says what is wrong
        req = self.decode(body) if lazy is None else lazy
        registry = self.state.registry
        mv = registry.acquire()  # grabbed once: this version scores the whole request
        try:
            keys = None
            if lazy is not None:
                # (a learner's empty-is-missing convention is not in the bytes pass: decoded fully)
                keys = (self._candidate_keys(mv, lazy) if mv is not None and not mv.encoder.empty_is_missing
                        else None)
                if keys is None:
                    req = self.decode(body)
            return await self._score(mv, req, explain, keys)
        finally:
            registry.release(mv)

    def _candidate_keys(self, mv: ModelVersion, req: Any) -> np.ndarray | None:
        entry = self._fields.get(id(mv.encoder))
        if entry is None or entry[0] is not mv.encoder:
            if len(self._fields) > 16:  # encoders are per model config: a handful at most
                self._fields.clear()
            entry = self._fields[id(mv.encoder)] = (mv.encoder, CandidateFields(mv.config, tuple(ATTRIBUTES)))
        fields = entry[1]
        keys = fields.keys([c.categorical for c in req.candidates])
        if keys is None:
            CANDIDATE_SCAN_DECLINED.labels(DECLINE_REASONS[fields.reason]).inc()
        return keys

    async def _score(self, mv: ModelVersion | None, req: Any, explain: bool,
                     candidate_keys: np.ndarray | None = None) -> bytes:
        state = self.state
        if mv is None:
            raise Refusal(503, "no model loaded yet")
        plan = state.plan(mv)
        cands = req.candidates
        look = Lookup({})
        if plan.needs_features or explain:
            cache = state.cache
            if cache is None:
                raise Refusal(503, "feature store not ready")
            t0 = time.perf_counter()
            wanted: dict[str, list[str]] = {}
            if plan.user or explain:
                wanted["user"] = [req.user_id]
            if plan.item or explain:
                wanted["item"] = [c.item_id for c in cands]
            if explain:
                wanted["field"] = list(mv.model.field_names)
            look, missing = cache.peek(wanted)
            if missing:
                look = await run_in_threadpool(cache.fetch, look, missing)
            look.seconds = time.perf_counter() - t0
            record(look)
        t0 = time.perf_counter()
        p = (await self.scorer.score(mv, encode_request(mv, req, plan, look, candidate_keys))).tolist()
        SCORE_SECONDS.observe(time.perf_counter() - t0)
        CANDIDATES.observe(len(cands))
        preds = [_Prediction(c.item_id, c.position if c.position is not None else i, p[i])
                 for i, c in enumerate(cands)]
        named = [(c.impression_id, p[i]) for i, c in enumerate(cands) if c.impression_id is not None]
        if named and state.score_log is not None:
            state.score_log.log(mv.model_id, mv.version, named)
        body: dict[str, Any] = {"model_id": mv.model_id, "model_version": mv.version,
                                "model_event_time_ms": mv.event_time_ms, "predictions": preds,
                                "request_id": req.request_id, "features": look.as_dict()}
        if explain:
            body["explain"] = {
                "user": look.values.get("user", {}).get(req.user_id),
                "items": look.values.get("item", {}),
                "field_weights": {f: v.get("weight") for f, v in look.values.get("field", {}).items()},
                "model_field_weights": mv.model.field_weights(),
                "filled_from_store": {"user": list(plan.user), "item": list(plan.item)},
            }
        return msgspec.json.encode(body)


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class PredictPath:
    """ASGI app for a plain ``POST /predict`` (no query string), answered by ``predictor``
    outside the FastAPI stack, with what that stack would add: the body-size limit (413, as
    :class:`~ctr.serving.guard.Guard`), the request metrics, and a 500 for an unexpected error.
    ``matches(scope)`` says which requests it answers; the app in front routes the rest to
    FastAPI (:class:`ctr.serving.app.ServingAPI`)."""

    def __init__(self, predictor: Predictor, max_body_bytes: int) -> None:
        self.predictor, self.max = predictor, max_body_bytes

    @staticmethod
    def matches(scope: Mapping[str, Any]) -> bool:
        return (scope["type"] == "http" and scope["path"] == "/predict" and scope["method"] == "POST"
                and not scope["query_string"])

    async def __call__(self, scope: Mapping[str, Any], receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        refused = content_length_refusal(scope, self.max)
        if refused is not None:
            await send_json(send, *refused)
            observe("/predict", refused[0], t0)
            return
        chunks = []
        size = 0
        status = 200
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max:
                    raise Refusal(413, f"request body exceeds {self.max} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            data = await self.predictor.respond(b"".join(chunks))
        except Refusal as refusal:
            status, data = refusal.status, msgspec.json.encode(refusal.body)
        except Exception as err:  # noqa: BLE001 - as FastAPI's handler: a 500, the server goes on
            log.exception("unhandled error")
            status, data = 500, msgspec.json.encode({"detail": f"internal error: {type(err).__name__}"})
        await send({"type": "http.response.start", "status": status,
                    "headers": [*_JSON, (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})
        observe("/predict", status, t0)
