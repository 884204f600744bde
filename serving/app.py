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

The request path (``predict``: ``Predictor``, answered in front of FastAPI by ``PredictPath``)
grabs ``registry.current`` ONCE, fetches features (cache, or one batched Feast read for what
the cache lacks, in a worker thread), encodes, scores with that one immutable version in a
forward shared with the requests in flight (``BatchScorer``), and reports that version. See
``serving/README.md``.

The parts: ``config``, ``schema`` (request/response types), ``guard`` (body-size middleware),
``metrics``, ``state`` (a replica's moving parts), ``request_encoding``.
"""

# No ``from __future__ import annotations``: FastAPI must see the real class of the request
# model built per app (``request_type``), not a string it would resolve in module globals.

import asyncio
import logging
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import msgspec
from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ctr.serving.config import ServingConfig
from ctr.serving.features import FeatureSource
from ctr.serving.guard import Guard
from ctr.serving.metrics import READY, bind_gauges
from ctr.serving.predict import BatchScorer, Predictor, PredictPath, Refusal
from ctr.serving.registry import ModelRegistry, RegistryError
from ctr.serving.schema import (
    EXAMPLE_REQUEST,
    PredictResponse,
    Problem,
    RollbackRequest,
    lazy_request_type,
    request_type,
)
from ctr.serving.state import ServingState, UpdatesView

log = logging.getLogger(__name__)


def create_app(config: ServingConfig | None = None, *, registry: ModelRegistry | None = None,
               features: FeatureSource | None = None, updates: UpdatesView | None = None,
               exposition: Callable[[], bytes] | None = None, features_wait_s: float = 0.0) -> FastAPI:
    """The FastAPI app of one replica. ``registry`` / ``features`` may be injected (tests);
    otherwise the lifespan starts the update consumer and opens Feast in the background.
    A worker of ``ctr serve --workers`` passes ``updates`` (the updater's consumer as reported;
    ``registry`` follows the updater), ``exposition`` (what ``/metrics`` answers: every
    process's metrics, gathered by the updater; default: this process's) and ``features_wait_s``
    (how long start-up waits for the feature store to open: uvicorn listens after it)."""
    config = config or ServingConfig()
    state = ServingState(config, registry, features, updates)
    request_struct = request_type(config.max_candidates)
    scorer = BatchScorer(max_wait_s=config.batch_wait_ms / 1000)
    predictor = Predictor(state, request_struct, scorer, lazy_request_type(config.max_candidates))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start()
        deadline = time.monotonic() + features_wait_s
        while state.cache is None and state.feature_error is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        try:
            yield
        finally:
            state.stop()

    app = ServingAPI(title="ctr serve", version="1.0", lifespan=lifespan,
                     description="Real-time CTR scoring with live model refresh. See serving/README.md.")
    app.predict_path = PredictPath(predictor, config.max_body_bytes)
    app.state.serving = state
    app.state.predictor = predictor
    bearer = HTTPBearer(auto_error=False, description="Admin token ($CTR_ADMIN_TOKEN)")

    bind_gauges(state.registry)

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
                  "schema": {"$ref": "#/components/schemas/PredictRequest"}, "example": EXAMPLE_REQUEST}}}})
    async def predict(request: Request,
                      explain: Annotated[bool, Query(description="Return the features and weights used")] = False,
                      ) -> Response:
        """Score every candidate with ONE model version (named in the response)."""
        try:
            return Response(await predictor.respond(await request.body(), explain), media_type="application/json")
        except Refusal as refusal:
            return JSONResponse(refusal.body, status_code=refusal.status)

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
                "head_version": state.registry.head_version()}

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
        cur = state.registry.current
        version = cur.version if cur else None
        if state.updates is not None and state.updates.state == "failed":
            return JSONResponse({"status": "failing", "detail": state.updates.error, "version": version},
                                status_code=503)
        return JSONResponse({"status": "ok", "version": version})

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
        return Response(exposition() if exposition is not None else generate_latest(),
                        media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, components = msgspec.json.schema_components([request_struct], ref_template="#/components/schemas/{name}")
            doc.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # User middleware sits inside the server-error middleware (an unexpected error is a 500
    # from ``_unexpected``) and outside FastAPI's exception middleware: a PayloadTooLarge raised
    # while a route reads the body is an HTTPException and renders as a 413.
    app.add_middleware(Guard, max_body_bytes=config.max_body_bytes)
    return app


class ServingAPI(FastAPI):
    """The FastAPI app, with a plain ``POST /predict`` answered in front of it by
    :class:`PredictPath`: routing, validation, dependencies and the middleware stack cost more
    than scoring a small request. FastAPI still declares the route (OpenAPI) and serves
    ``/predict?explain=true``."""

    predict_path: PredictPath | None = None

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if self.predict_path is not None and PredictPath.matches(scope):
            await self.predict_path(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def setup_process(config: ServingConfig, name: str = "") -> None:
    """Logging and the interpreter settings of a serving process (``name``: who logs, if not alone)."""
    logging.basicConfig(level=getattr(logging, config.log_level.upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s {name + ' ' if name else ''}%(name)s: %(message)s")
    if config.gil_switch_interval_s:
        sys.setswitchinterval(config.gil_switch_interval_s)


def serve(app: FastAPI, config: ServingConfig, sock: socket.socket | None = None) -> None:
    """Run ``app`` on uvicorn (uvloop + httptools) until SIGINT/SIGTERM, on ``config``'s host
    and port or on ``sock`` (bound already: a worker of ``ctr serve --workers``)."""
    import uvicorn

    uv = uvicorn.Config(app, host=config.host, port=config.port, loop="uvloop", http="httptools",
                        lifespan="on", access_log=False, log_level=config.log_level.lower(),
                        timeout_keep_alive=30, server_header=False)

    def stopped(sig: int, _frame: object) -> None:
        raise SystemExit(0)

    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler
    # it found (uvicorn/server.py ``capture_signals``): with the default one the process would
    # die by the signal (exit -15) after a clean shutdown; this one makes the exit status say 0.
    signal.signal(signal.SIGTERM, stopped)
    uvicorn.Server(uv).run(sockets=[sock] if sock is not None else None)


def run_server(config: ServingConfig) -> None:
    """Serve until SIGINT/SIGTERM: one process, or with ``config.workers`` > 1 an updater and
    that many HTTP worker processes sharing its model versions (:mod:`ctr.serving.workers`)."""
    setup_process(config, "updater" if config.workers > 1 else "")
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the API is reachable beyond loopback", config.host)
    if config.workers > 1:
        from ctr.serving.workers import run_workers

        run_workers(config)
        return
    serve(create_app(config), config)
