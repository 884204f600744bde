"""``ctr serve``: the FastAPI app (``create_app``) and its runner (``run_server``).

Endpoints (OpenAPI at ``/openapi.json``, docs at ``/docs``):

* ``POST /predict[?explain=true]`` -- a user, request context and 1..``max_candidates``
  candidates -> a click probability per candidate and the model version that scored them.
* ``GET /model`` -- the version served, its age, how far behind the learner, the last gate
  decision, the kept versions, the update consumer's state.
* ``POST /model/rollback`` / ``POST /model/unpin`` -- admin (token): pin a kept version / serve
  the newest again.
* ``GET /healthz`` (process alive, update thread alive), ``GET /readyz`` (a model and the
  feature store), ``GET /metrics`` (Prometheus).

The request path grabs ``registry.current`` ONCE, fetches features (cache, or one batched
Feast read for what the cache lacks, in a worker thread), encodes and scores with that one
immutable version, and reports that version. See ``serving/README.md``.
"""

# No ``from __future__ import annotations``: FastAPI must see the real class of the request
# model built per app (``_request_model``), not a string it would resolve in module globals.
import gc
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np
from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ctr.infra.topics import MODEL_UPDATES_TOPIC
from ctr.online_learner.encoding import EncodedBatch
from ctr.online_learner.hashing import MISSING_KEY, numeric_keys
from ctr.serving.features import (
    DEFAULTS,
    FeastProcessSource,
    FeastSource,
    FeatureCache,
    FeaturePlan,
    FeatureSource,
    Lookup,
    record,
)
from ctr.serving.registry import ModelRegistry, ModelVersion, RegistryError
from ctr.serving.score_log import ScoreLog
from ctr.serving.updates import UpdateConsumer, read_snapshot_header, snapshot_files

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- configuration


@dataclass
class ServingConfig:
    """Everything ``ctr serve`` / ``python -m ctr.serving`` can set.

    ``bootstrap=None`` serves the newest snapshot of ``snapshot_dir`` without live updates.
    ``admin_token=None`` reads ``$CTR_ADMIN_TOKEN``; unset or empty disables admin calls (403).
    """

    bootstrap: str | None = None
    snapshot_dir: Path | None = None
    feast_dir: Path | None = None
    online: str = "sqlite"
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    topic: str = MODEL_UPDATES_TOPIC
    keep_versions: int = 5
    feature_cache: bool = True
    #: Read Feast in a worker process (default) or in this process's threads (the baseline).
    feast_process: bool = True
    cache_ttl_s: float = 5.0
    cache_max_stale_s: float = 60.0
    max_candidates: int = 500
    max_body_bytes: int = 1 << 20
    admin_token: str | None = None
    torch_threads: int = 1
    #: sys.setswitchinterval: how long a background thread may hold the GIL before a waiting
    #: request thread gets it (CPython's default 5 ms would show up directly in p99).
    gil_switch_interval_s: float = 0.0005
    log_level: str = "info"
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")


# --------------------------------------------------------------------------- metrics
_LAT_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0)
REQUEST_SECONDS = Histogram("ctr_serving_request_seconds", "HTTP request latency in the server (first byte "
                            "received -> response sent)", ["endpoint"], buckets=_LAT_BUCKETS)
SCORE_SECONDS = Histogram("ctr_serving_score_seconds", "Encode + model forward per /predict",
                          buckets=_LAT_BUCKETS)
REQUESTS = Counter("ctr_serving_requests_total", "HTTP requests", ["endpoint", "status"])
CANDIDATES = Histogram("ctr_serving_candidates", "Candidates per /predict",
                       buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
MODEL_VERSION = Gauge("ctr_serving_model_version", "Model version: current (serving), head (newest applied), "
                      "learner (newest seen on model-updates)", ["which"])
VERSIONS_BEHIND = Gauge("ctr_serving_versions_behind", "Learner version seen minus head version applied")
MODEL_AGE = Gauge("ctr_serving_model_age_seconds", "Now minus the serving version's created_ms (learner clock)")
EVENT_LAG = Gauge("ctr_serving_event_lag_seconds", "Now minus the newest event time the serving version "
                  "was trained on (freshness hook)")
PINNED = Gauge("ctr_serving_pinned", "1 while a rolled-back version is pinned")
READY = Gauge("ctr_serving_ready", "1 when /readyz answers 200")

_ENDPOINTS = {"/predict", "/model", "/model/rollback", "/model/unpin", "/healthz", "/readyz", "/metrics"}


# --------------------------------------------------------------------------- request / response schema
# The request is decoded AND validated by msgspec in one pass (~70 us for 60 candidates, vs
# ~420 us for json.loads + pydantic at 100); its JSON schema is put into the OpenAPI document.
FieldName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Value = Annotated[str, msgspec.Meta(max_length=256)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
#: Finite only: JSON has no NaN/Infinity tokens, and 1e400 (-> inf) is out of this range.
Num = Annotated[float, msgspec.Meta(ge=-1.7e308, le=1.7e308)]
Fields = Annotated[dict[FieldName, Value], msgspec.Meta(max_length=256)]
Numerics = Annotated[dict[FieldName, Num], msgspec.Meta(max_length=256)]


class Context(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Request-level fields shared by every candidate (site, device, hour...)."""

    categorical: Fields = {}
    numeric: Numerics = {}


class Candidate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One item/ad to score; its fields override the context's fields of the same name."""

    item_id: Id
    #: Slot; default: the candidate's index in the list.
    position: Annotated[int, msgspec.Meta(ge=0, le=10_000)] | None = None
    categorical: Fields = {}
    numeric: Numerics = {}
    #: The impression this candidate will be shown as: its score and version are logged on
    #: ``served-scores`` so the learner can measure the served model's online quality.
    impression_id: Id | None = None


def _request_type(max_candidates: int) -> type[msgspec.Struct]:
    return msgspec.defstruct(
        "PredictRequest",
        [("user_id", Id), ("context", Context, msgspec.field(default_factory=Context)),
         ("candidates", Annotated[list[Candidate], msgspec.Meta(min_length=1, max_length=max_candidates)]),
         ("request_id", Annotated[str, msgspec.Meta(max_length=128)] | None, None)],
        forbid_unknown_fields=True, kw_only=True)


_EXAMPLE = {"user_id": "u42",
            "context": {"categorical": {"site": "news", "device": "mobile"}, "numeric": {"hour": 13}},
            "candidates": [{"item_id": "ad7", "categorical": {"campaign": "c1"}}, {"item_id": "ad9", "position": 1}]}


class Prediction(BaseModel):
    item_id: str
    position: int
    p_click: float = Field(description="Click probability (sigmoid of the model's logit)")


class PredictResponse(BaseModel):
    model_id: str
    model_version: int = Field(description="The version that scored every candidate of this response")
    model_event_time_ms: int = Field(description="Newest event time that version was trained on (freshness)")
    predictions: list[Prediction]
    request_id: str | None = None
    features: dict[str, Any] = Field(description="Where the features came from: cache hits, Feast misses, ms")
    explain: dict[str, Any] | None = None


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(None, ge=0, description="A kept version; default: the one before the current")
    model_id: str | None = Field(None, description="Lineage (default: the current one)")


class Problem(BaseModel):
    detail: Any


# --------------------------------------------------------------------------- the body-size guard
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
        endpoint = path if path in _ENDPOINTS else "other"
        status = [500]
        limit = self.max
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    status[0] = 413 if value.isdigit() else 400
                    msg = f"request body exceeds {limit} bytes" if value.isdigit() else "bad Content-Length"
                    await _send_json(send, status[0], {"detail": msg})
                    _observe(endpoint, status[0], t0)
                    return
                break
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
            _observe(endpoint, status[0], t0)


def _observe(endpoint: str, status: int, t0: float) -> None:
    REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - t0)
    REQUESTS.labels(endpoint, str(status)).inc()


async def _send_json(send: Callable, status: int, body: dict) -> None:
    data = msgspec.json.encode(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


# --------------------------------------------------------------------------- state
class ServingState:
    """A replica's moving parts: registry, update consumer, feature cache, readiness."""

    def __init__(self, config: ServingConfig, registry: ModelRegistry | None = None,
                 features: FeatureSource | None = None) -> None:
        self.config = config
        self.registry = registry or ModelRegistry(keep=config.keep_versions)
        self.updates: UpdateConsumer | None = None
        self.cache: FeatureCache | None = None
        self.feature_error: str | None = None
        self.started_ms = int(time.time() * 1000)
        self.warm_version: tuple[str, int] | None = None
        self._plans: dict[int, tuple[Any, FeaturePlan]] = {}
        token = config.admin_token if config.admin_token is not None else os.environ.get("CTR_ADMIN_TOKEN", "")
        self.admin_token = token or None
        self._given_features = features
        self._source: FeatureSource | None = None
        self._threads: list[threading.Thread] = []
        self.registry.listeners.append(self._on_swap)
        self.score_log: ScoreLog | None = None

    # -- lifecycle
    def start(self) -> None:
        import torch

        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        if self.registry.current is not None:
            self._warm(self.registry.current)
        if self._given_features is not None:
            self._install_features(self._given_features)
        else:
            t = threading.Thread(target=self._open_feast, name="feast-open", daemon=True)
            t.start()
            self._threads.append(t)
        cfg = self.config
        if cfg.bootstrap:
            self.updates = UpdateConsumer(self.registry, cfg.bootstrap, topic=cfg.topic,
                                          snapshot_dir=cfg.snapshot_dir).start()
            self.score_log = ScoreLog(cfg.bootstrap)
        elif cfg.snapshot_dir is not None:
            t = threading.Thread(target=self._load_static, name="snapshot-load", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        if self.updates is not None:
            self.updates.stop()
        if self.score_log is not None:
            self.score_log.close()
        if self.cache is not None:
            self.cache.stop()
        close = getattr(self._source, "close", None)
        if close is not None:
            close()

    def _install_features(self, source: FeatureSource) -> None:
        cfg = self.config
        self.cache = FeatureCache(source, enabled=cfg.feature_cache, ttl_s=cfg.cache_ttl_s,
                                  max_stale_s=cfg.cache_max_stale_s).start()

    def _open_feast(self) -> None:
        cfg = self.config
        try:
            kind = FeastProcessSource if cfg.feast_process else FeastSource
            self._source = kind(cfg.feast_dir, cfg.online, cfg.redis_url)
            self._install_features(self._source)
        except Exception as err:  # noqa: BLE001 - reported by /readyz
            log.exception("feature store failed to open")
            self.feature_error = f"{type(err).__name__}: {err}"

    def _load_static(self) -> None:
        from ctr.online_learner.update_format import decode_update

        files = snapshot_files(self.config.snapshot_dir)
        if not files:
            log.error("no snapshot in %s", self.config.snapshot_dir)
            return
        path = max(files, key=lambda p: read_snapshot_header(p).created_ms)
        header, tensors = decode_update(path.read_bytes())
        self.registry.install_snapshot(header, tensors)

    def _on_swap(self, mv: ModelVersion) -> None:
        if self.warm_version is None or self.warm_version[0] != mv.model_id:
            self._warm(mv)

    def _warm(self, mv: ModelVersion) -> None:
        """First scoring compiles/loads the Numba hash kernels: do it before reporting ready.

        Then ``gc.freeze()``: torch, FastAPI, pydantic and the model leave ~300k objects that
        every full collection would walk (measured: a 245 ms pause, once per few thousand
        requests); frozen, they are never scanned again (refcounting still frees them)."""
        row = {"categorical": {"user_id": "warmup", "item_id": "warmup", "position": "0"}, "numeric": {}}
        mv.predict(mv.encoder.encode([row] * 4))
        gc.collect()
        gc.freeze()
        self.warm_version = mv.key

    # -- helpers
    def plan(self, mv: ModelVersion) -> FeaturePlan:
        got = self._plans.get(id(mv.config))
        if got is None or got[0] is not mv.config:
            if len(self._plans) > 32:
                self._plans.clear()
            got = self._plans[id(mv.config)] = (mv.config, FeaturePlan.for_fields(mv.config.numeric_fields))
        return got[1]

    def readiness(self) -> tuple[bool, list[str]]:
        problems = []
        if self.registry.current is None:
            st = self.updates.status() if self.updates else {}
            problems.append(f"no model loaded yet ({st.get('state', 'no update consumer')}"
                            f"{': ' + st['stall_reason'] if st.get('stall_reason') else ''})")
        elif self.warm_version is None:
            problems.append("model warming up")
        if self.cache is None:
            problems.append(f"feature store not open: {self.feature_error}" if self.feature_error
                            else "feature store opening")
        elif not getattr(self._source, "healthy", True):
            problems.append(f"feature store worker restarting: {getattr(self._source, 'error', '')}")
        if self.updates is not None and not self.updates.alive:
            problems.append(f"update consumer stopped: {self.updates.error}")
        return not problems, problems

    def model_status(self) -> dict[str, Any]:
        reg = self.registry.status()
        cur = reg["current"] or {}
        return {
            "replica": self.config.replica_id,
            "model_id": cur.get("model_id"),
            "version": cur.get("version"),
            "age_s": cur.get("age_s"),
            "pinned": reg["pinned"],
            "head_version": reg["head_version"],
            "learner_version": reg["learner_version"],
            "versions_behind": reg["versions_behind"],
            "gate": cur.get("gate"),
            "event_time_ms": cur.get("event_time_ms"),
            "current": reg["current"],
            "kept": reg["kept"],
            "pending": reg["pending"],
            "updates": self.updates.status() if self.updates else None,
            "features": self.cache.status() if self.cache else None,
            "feature_source": self._source_status(),
        }

    def _source_status(self) -> dict[str, Any] | None:
        src = self._source
        if src is None:
            return None
        if isinstance(src, FeastProcessSource):
            return {"kind": "worker process", "pid": src._proc.pid, "healthy": src.healthy,
                    "restarts": src.restarts, "error": src.error, "open_s": round(src.open_s, 1)}
        return {"kind": type(src).__name__, "healthy": True}


# --------------------------------------------------------------------------- the app
def create_app(config: ServingConfig | None = None, *, registry: ModelRegistry | None = None,
               features: FeatureSource | None = None) -> FastAPI:
    """The FastAPI app of one replica. ``registry`` / ``features`` may be injected (tests);
    otherwise the lifespan starts the update consumer and opens Feast in the background."""
    config = config or ServingConfig()
    state = ServingState(config, registry, features)
    request_type = _request_type(config.max_candidates)
    decoder = msgspec.json.Decoder(request_type)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(title="ctr serve", version="1.0", lifespan=lifespan,
                  description="Real-time CTR scoring with live model refresh. See serving/README.md.")
    app.state.serving = state
    bearer = HTTPBearer(auto_error=False, description="Admin token ($CTR_ADMIN_TOKEN)")

    _bind_gauges(state)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()[:20]]
        summary = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5])
        return JSONResponse({"error": f"invalid request: {summary}", "detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    def require_admin(request: Request,
                      creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        token = state.admin_token
        if token is None:
            raise HTTPException(403, "admin endpoints are disabled: set CTR_ADMIN_TOKEN when starting the server")
        given = creds.credentials if creds is not None else request.headers.get("x-admin-token")
        if not given:
            raise HTTPException(401, "admin token required: Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(403, "wrong admin token")

    # ---- scoring
    @app.post("/predict", response_model=PredictResponse, tags=["scoring"],
              responses={413: {"model": Problem}, 422: {"model": Problem}, 503: {"model": Problem}},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/PredictRequest"}, "example": _EXAMPLE}}}})
    async def predict(request: Request,
                      explain: Annotated[bool, Query(description="Return the features and weights used")] = False,
                      ) -> Response:
        """Score every candidate with ONE model version (named in the response)."""
        try:
            req = decoder.decode(await request.body())
        except msgspec.ValidationError as err:
            return JSONResponse({"error": f"invalid request: {err}", "detail": [{"msg": str(err), "type": "invalid"}]},
                                status_code=422)
        except (msgspec.DecodeError, UnicodeDecodeError) as err:  # msgspec: bad UTF-8 is not a DecodeError
            return JSONResponse({"error": f"malformed JSON: {err}", "detail": [{"msg": str(err), "type": "json"}]},
                                status_code=422)
        registry = state.registry
        mv = registry.acquire()  # grabbed once: this version scores the whole request
        try:
            return await _score(mv, req, explain)
        finally:
            registry.release(mv)

    async def _score(mv: ModelVersion | None, req: Any, explain: bool) -> Response:
        if mv is None:
            raise HTTPException(503, "no model loaded yet")
        plan = state.plan(mv)
        cands = req.candidates
        look = Lookup({})
        if plan.needs_features or explain:
            cache = state.cache
            if cache is None:
                raise HTTPException(503, "feature store not ready")
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
        p = mv.predict(encode_request(mv, req, plan, look)).tolist()
        SCORE_SECONDS.observe(time.perf_counter() - t0)
        CANDIDATES.observe(len(cands))
        preds = [{"item_id": c.item_id, "position": c.position if c.position is not None else i, "p_click": p[i]}
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
        return Response(msgspec.json.encode(body), media_type="application/json")

    # ---- model admin
    @app.get("/model", tags=["model"])
    def model_info() -> dict[str, Any]:
        """The version served, its age, how far behind the learner, the last gate decision."""
        return state.model_status()

    @app.post("/model/rollback", tags=["model"], dependencies=[Depends(require_admin)],
              responses={401: {"model": Problem}, 403: {"model": Problem}, 404: {"model": Problem},
                         409: {"model": Problem}})
    def rollback(body: Annotated[RollbackRequest | None, Body()] = None) -> dict[str, Any]:
        """Serve a kept version (default: the one before the current) and pin it until unpin."""
        body = body or RollbackRequest()
        try:
            mv = state.registry.rollback(body.version, body.model_id)
        except RegistryError as err:
            raise HTTPException(err.status, str(err)) from None
        log.warning("rolled back to v%d of %s (pinned)", mv.version, mv.model_id)
        return {"pinned": True, "version": mv.version, "model_id": mv.model_id,
                "head_version": state.registry.head.version if state.registry.head else None}

    @app.post("/model/unpin", tags=["model"], dependencies=[Depends(require_admin)],
              responses={401: {"model": Problem}, 403: {"model": Problem}})
    def unpin() -> dict[str, Any]:
        """Serve the newest applied version again."""
        mv = state.registry.unpin()
        return {"pinned": False, "version": mv.version if mv else None, "model_id": mv.model_id if mv else None}

    # ---- health
    @app.get("/healthz", tags=["ops"])
    def healthz() -> JSONResponse:
        """Liveness: the process answers and its update consumer thread is alive."""
        if state.updates is not None and state.updates.state == "failed":
            return JSONResponse({"status": "failing", "detail": state.updates.error}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", tags=["ops"])
    def readyz() -> JSONResponse:
        """Readiness: a model is loaded (and warm) and the feature store is open."""
        ok, problems = state.readiness()
        READY.set(1 if ok else 0)
        cur = state.registry.current
        return JSONResponse({"ready": ok, "problems": problems, "version": cur.version if cur else None},
                            status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"])
    def metrics() -> Response:
        ok, _ = state.readiness()
        READY.set(1 if ok else 0)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, components = msgspec.json.schema_components([request_type], ref_template="#/components/schemas/{name}")
            doc.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # A user middleware sits outside FastAPI's exception middleware: a PayloadTooLarge raised
    # while the route reads the body is an HTTPException and renders as a 413.
    app.add_middleware(Guard, max_body_bytes=config.max_body_bytes)
    return app


#: Impression attributes set per request/candidate; a same-named categorical field is overridden.
_ATTRIBUTES = frozenset({"user_id", "item_id", "position"})


def encode_request(mv: ModelVersion, req: Any, plan: FeaturePlan, look: Lookup) -> EncodedBatch:
    """Model inputs, one row per candidate, with the semantics of encoding, per candidate, the
    merged row (what :func:`merged_rows` builds)::

        {**context fields, **candidate fields, user_id, item_id, position (default: index),
         **the store's values for the fields the plan fills}

    i.e. the candidate wins over the context, the impression attributes and the store win
    over both. Computed column-wise instead: the context (+ user, + the user's store values)
    is encoded once by the version's ``FeatureEncoder`` and repeated, then only the columns
    the candidates carry are encoded (``ValueKeyer`` / ``numeric_keys``, the encoder's own
    parts) and written over it where a candidate has a value. For 100 candidates that is ~18
    columns instead of all 47 of the bench model: encoding took ~2 ms per request in the server
    before, the forward pass ~1.5 ms. ``tests/test_serving.py`` checks the equivalence on random
    requests and end to end against the learner's encoder."""
    cfg, enc = mv.config, mv.encoder
    cands = req.candidates
    n = len(cands)
    user = req.user_id
    ctx_num = dict(req.context.numeric)
    if plan.user:
        uvals = look.values.get("user", {}).get(user) or DEFAULTS["user"]
        ctx_num.update({f: uvals[f] for f in plan.user})
    ctx = enc.encode([{"categorical": {**req.context.categorical, "user_id": user}, "numeric": ctx_num}])
    keys = np.repeat(ctx.keys, n, axis=0)
    numeric = np.repeat(ctx.numeric, n, axis=0) if ctx.numeric is not None else None
    col = {name: j for j, name in enumerate(cfg.hashed_fields)}
    keyer = enc.keyer

    def put_keys(name: str, k: np.ndarray) -> None:
        j = col[name]
        keys[:, j] = np.where(k == MISSING_KEY, keys[:, j], k)

    categorical = set(cfg.categorical_fields)
    present: set[str] = set()
    for c in cands:
        present.update(c.categorical)
    for name in present & categorical - _ATTRIBUTES:
        values = [c.categorical.get(name) for c in cands]
        if enc.empty_is_missing:
            values = [None if v == "" else v for v in values]
        put_keys(name, keyer(values))
    if "item_id" in categorical:
        keys[:, col["item_id"]] = keyer([c.item_id for c in cands])
    if "position" in categorical:
        keys[:, col["position"]] = keyer([str(c.position if c.position is not None else i)
                                          for i, c in enumerate(cands)])

    store_fields = set(plan.user) | set(plan.item)
    numeric_present: set[str] = set()
    for c in cands:
        numeric_present.update(c.numeric)
    columns: dict[str, np.ndarray] = {}
    nan = float("nan")
    for name in numeric_present & set(cfg.numeric_fields) - store_fields:
        columns[name] = np.array([c.numeric.get(name, nan) for c in cands], dtype=np.float64)
    if plan.item:
        items = look.values.get("item", {})
        rows = [items.get(c.item_id) or DEFAULTS["item"] for c in cands]
        for name in plan.item:
            columns[name] = np.array([r[name] for r in rows], dtype=np.float64)
    index = {name: j for j, name in enumerate(cfg.numeric_fields)}
    for name, values in columns.items():
        if cfg.numeric_mode == "bucket":
            put_keys(name, numeric_keys(values, cfg.numeric_resolution))
        if numeric is not None:  # dense mode, or the numeric fields' linear term
            j = index[name]
            numeric[:, j] = np.where(np.isnan(values), numeric[:, j], values)
    return EncodedBatch(keys, numeric)


def merged_rows(req: Any, plan: FeaturePlan, look: Lookup) -> list[dict[str, Any]]:
    """The reference semantics of :func:`encode_request`: one merged row per candidate."""
    uvals = look.values.get("user", {}).get(req.user_id) or DEFAULTS["user"]
    items = look.values.get("item", {})
    out = []
    for i, c in enumerate(req.candidates):
        ivals = items.get(c.item_id) or DEFAULTS["item"]
        num = {**req.context.numeric, **c.numeric, **{f: uvals[f] for f in plan.user},
               **{f: ivals[f] for f in plan.item}}
        cat = {**req.context.categorical, **c.categorical, "user_id": req.user_id, "item_id": c.item_id,
               "position": str(c.position if c.position is not None else i)}
        out.append({"categorical": cat, "numeric": num})
    return out


def _bind_gauges(state: ServingState) -> None:
    reg = state.registry

    def version(which: str) -> Callable[[], float]:
        def get() -> float:
            if which == "current":
                mv = reg.current
                return float(mv.version) if mv else -1.0
            if which == "head":
                return float(reg.head.version) if reg.head else -1.0
            head = reg.head
            return float(reg.newest_seen.get(head.model_id, head.version)) if head else -1.0
        return get

    for which in ("current", "head", "learner"):
        MODEL_VERSION.labels(which).set_function(version(which))

    def behind() -> float:
        head = reg.head
        return float(reg.newest_seen.get(head.model_id, head.version) - head.version) if head else 0.0

    def age() -> float:
        mv = reg.current
        return max(0.0, time.time() - mv.created_ms / 1000) if mv and mv.created_ms else 0.0

    def event_lag() -> float:
        mv = reg.current
        return max(0.0, time.time() - mv.event_time_ms / 1000) if mv and mv.event_time_ms else 0.0

    VERSIONS_BEHIND.set_function(behind)
    MODEL_AGE.set_function(age)
    EVENT_LAG.set_function(event_lag)
    PINNED.set_function(lambda: 1.0 if reg.pinned is not None else 0.0)


# --------------------------------------------------------------------------- runner
def run_server(config: ServingConfig) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn, one process, uvloop + httptools)."""
    import uvicorn

    logging.basicConfig(level=getattr(logging, config.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.gil_switch_interval_s:
        sys.setswitchinterval(config.gil_switch_interval_s)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the API is reachable beyond loopback", config.host)
    app = create_app(config)
    uv = uvicorn.Config(app, host=config.host, port=config.port, loop="uvloop", http="httptools",
                        lifespan="on", access_log=False, log_level=config.log_level.lower(),
                        timeout_keep_alive=30, server_header=False)

    def stopped(sig: int, _frame: object) -> None:
        raise SystemExit(0)

    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler
    # it found (uvicorn/server.py ``capture_signals``): with the default one the process would
    # die by the signal (exit -15) after a clean shutdown; this one makes the exit status say 0.
    signal.signal(signal.SIGTERM, stopped)
    uvicorn.Server(uv).run()
