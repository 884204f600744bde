"""Property tests of the serving HTTP API: malformed, truncated, oversized and type-confused
requests get a 4xx with a reason, never a 5xx, and never change the model being served.

The property tests drive the real app (``ctr.serving.app.create_app``) in process through
Starlette's ASGI client; the model registry is real (a snapshot and a delta on top), only
the feature store is a fake (pure lookups). The last tests send raw bytes to the same app
behind a real uvicorn server (httptools, as ``ctr serve`` runs it) on a free loopback port.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctr.features.spec import SPEC
from ctr.infra.procs import free_port
from ctr.online_learner.delta import delta_tensors, snapshot_tensors
from ctr.online_learner.model import CTRModel, ModelConfig
from ctr.online_learner.update_format import UpdateHeader

TOKEN = "prop-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
MAX_CANDIDATES, MAX_BODY = 16, 8192
MODEL = ModelConfig(("site", "device", "user_id", "item_id", "position"), ("I1", "user_ctr_1h", "item_ctr_1h"),
                    table_bits=10)
SETTINGS = settings(max_examples=int(os.environ.get("CTR_HYPOTHESIS_EXAMPLES", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class StaticFeatures:
    """A feature source with fixed values (the store itself is exercised in test_serving)."""

    def stats(self, users, items):
        return {"user": {u: {f: 0.1 for f in SPEC.feature_names("user")} for u in users},
                "item": {i: {f: 0.2 for f in SPEC.feature_names("item")} for i in items}}

    def field_weights(self, fields):
        return {f: 1.0 for f in fields}


def _registry():
    from ctr.serving.registry import ModelRegistry

    reg = ModelRegistry()
    model = CTRModel(MODEL)
    reg.install_snapshot(UpdateHeader(kind="snapshot", model_id="m", version=3, base_version=3,
                                      model_config=MODEL.to_dict()), snapshot_tensors(model))
    with np.errstate(all="ignore"):
        model.table.data[:5] += 0.5
    d = reg.offer(UpdateHeader(kind="delta", model_id="m", version=4, base_version=3),
                  delta_tensors(model, np.arange(5)))
    assert d.outcome == "applied", d
    return reg


def _app(reg):
    from ctr.serving.app import create_app
    from ctr.serving.config import ServingConfig

    cfg = ServingConfig(admin_token=TOKEN, max_candidates=MAX_CANDIDATES, max_body_bytes=MAX_BODY, cache_ttl_s=60)
    return create_app(cfg, registry=reg, features=StaticFeatures())


@pytest.fixture(scope="module")
def served() -> Iterator[tuple]:
    from fastapi.testclient import TestClient

    reg = _registry()
    with TestClient(_app(reg), raise_server_exceptions=True) as client:
        yield client, reg


def _unchanged(reg, version: int = 4) -> None:
    """Nothing a bad request does may move what is served (or pin anything)."""
    assert reg.current is reg.head and reg.current.version == version and reg.pinned is None


# ------------------------------------------------------------------------------ strategies
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
JSON = st.recursive(JSON_SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                             max_size=4),
                    max_leaves=20)
FIELD = st.text(min_size=1, max_size=12)
CANDIDATE = st.fixed_dictionaries(
    {"item_id": st.text(min_size=1, max_size=20)},
    optional={"position": st.integers(0, 10_000), "categorical": st.dictionaries(FIELD, st.text(max_size=20),
                                                                                 max_size=3),
              "numeric": st.dictionaries(FIELD, st.floats(-1e300, 1e300), max_size=3)})
VALID = st.fixed_dictionaries(
    {"user_id": st.text(min_size=1, max_size=20),
     "candidates": st.lists(CANDIDATE, min_size=1, max_size=MAX_CANDIDATES)},
    optional={"context": st.fixed_dictionaries({}, optional={
        "categorical": st.dictionaries(FIELD, st.text(max_size=20), max_size=3),
        "numeric": st.dictionaries(FIELD, st.floats(-1e300, 1e300), max_size=3)}),
        "request_id": st.text(max_size=20)})


@st.composite
def near_valid(draw: st.DrawFn) -> object:
    """A valid request with one to three paths replaced, deleted or added (type confusion)."""
    req = draw(VALID)
    for _ in range(draw(st.integers(1, 3))):
        node, path = req, []
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
            path.append((node, key))
            node = node[key]
        if not path:
            return draw(JSON)
        parent, key = path[-1]
        action = draw(st.sampled_from(["replace", "delete", "add", "huge"]))
        if action == "replace":
            parent[key] = draw(JSON)
        elif action == "delete" and isinstance(parent, dict):
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON)
        elif action == "huge":
            parent[key] = draw(st.sampled_from(["x" * 300, 2**64, -1, 1.7e308, [0] * 600]))
    return req


def _post(client, body: bytes, **headers: str):
    return client.post("/predict", content=body, headers={"content-type": "application/json", **headers})


def _check_predict(client, reg, body: bytes, parsed: object | None = None) -> int:
    r = _post(client, body)
    assert r.status_code < 500, (r.status_code, r.text, body[:200])
    assert r.status_code in (200, 413, 422), (r.status_code, r.text)
    doc = r.json()
    if r.status_code == 200:
        assert doc["model_version"] == 4
        if isinstance(parsed, dict):
            assert len(doc["predictions"]) == len(parsed["candidates"])
        assert all(0.0 <= p["p_click"] <= 1.0 for p in doc["predictions"])
    else:
        assert doc.get("error") or doc.get("detail"), doc  # a reason, not an empty 4xx
    _unchanged(reg)
    return r.status_code


# ------------------------------------------------------------------------------ /predict
@SETTINGS
@given(VALID)
def test_every_valid_request_is_scored(served, req) -> None:
    client, reg = served
    body = json.dumps(req).encode()
    status = _check_predict(client, reg, body, req)
    assert status == 200 or len(body) > MAX_BODY


@SETTINGS
@given(st.one_of(JSON, near_valid()))
def test_any_json_gets_a_score_or_a_4xx(served, doc) -> None:
    client, reg = served
    _check_predict(client, reg, json.dumps(doc).encode(), doc)


@SETTINGS
@given(VALID, st.data())
def test_truncated_bodies_are_422(served, req, data) -> None:
    client, reg = served
    body = json.dumps(req).encode()
    cut = data.draw(st.integers(0, len(body) - 1))
    assert _check_predict(client, reg, body[:cut]) == 422


# msgspec raises UnicodeDecodeError (not DecodeError) for invalid UTF-8 inside a JSON string,
# which serving/app.py predict() does not catch: a 500. Until that is fixed (catch it with
# msgspec.DecodeError -> 422 "malformed JSON"), the property runs on bytes whose strings are
# valid UTF-8 and the invalid-UTF-8 case is a strict xfail below.
VALID_UTF8 = st.text(max_size=300).map(str.encode)


@SETTINGS
@given(VALID_UTF8 | st.binary(max_size=300).filter(lambda b: b'"' not in b)
       | st.text(max_size=40).map(lambda t: b'{"user_id": "' + t.encode() + b'", "candidates": [{'))
def test_random_bytes_are_422(served, raw: bytes) -> None:
    client, reg = served
    assert _check_predict(client, reg, raw) in (422, 200)


# msgspec raises UnicodeDecodeError (not DecodeError) for invalid UTF-8 inside a string: this
# found predict() answering 500 to it; it is caught there now.
def test_invalid_utf8_inside_a_string_is_422(served) -> None:
    client, reg = served
    for raw in (b'{"user_id": "\xff\xfe", "candidates": [{"item_id": "a"}]}', b'{"user_id": "\xed\xa0\x80"}'):
        assert _check_predict(client, reg, raw) == 422


@SETTINGS
@given(st.integers(MAX_BODY + 1, 4 * MAX_BODY), st.booleans())
def test_oversized_bodies_are_413_with_or_without_content_length(served, size: int, chunked: bool) -> None:
    client, reg = served
    body = b'{"user_id": "u", "candidates": [' + b" " * size + b"]}"
    content = iter([body[i:i + 1000] for i in range(0, len(body), 1000)]) if chunked else body
    r = client.post("/predict", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds" in r.text
    _unchanged(reg)


@SETTINGS
@given(st.text(max_size=10), st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]))
def test_wrong_query_or_method_is_4xx(served, explain: str, method: str) -> None:
    client, reg = served
    ok = {"user_id": "u", "candidates": [{"item_id": "i"}]}
    r = client.post("/predict", params={"explain": explain}, json=ok)
    assert r.status_code in (200, 422), r.text
    assert client.request(method, "/predict").status_code == 405
    _unchanged(reg)


# ------------------------------------------------------------------------------ admin endpoints
#: header values as raw bytes (any latin-1 text is legal on the wire, and what servers decode)
LATIN1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40).map(
    lambda t: t.strip().encode("latin-1"))
AUTH = st.one_of(
    st.just({}),
    LATIN1.map(lambda t: {"Authorization": b"Bearer " + t}),
    LATIN1.map(lambda t: {"Authorization": t}),
    LATIN1.map(lambda t: {"X-Admin-Token": t}),
    st.just({"Authorization": f"Basic {TOKEN}".encode()}),
    st.just({"Authorization": f"Bearer {TOKEN}x".encode()}),
)


@SETTINGS
@given(AUTH, st.sampled_from(["/model/rollback", "/model/unpin"]), st.one_of(st.none(), JSON))
def test_admin_without_the_token_is_refused_and_changes_nothing(served, headers, path, body) -> None:
    client, reg = served
    assert headers.get("Authorization") != f"Bearer {TOKEN}".encode() and headers.get("X-Admin-Token") != TOKEN.encode()
    r = client.post(path, headers=headers, content=None if body is None else json.dumps(body).encode())
    assert r.status_code in (401, 403), (r.status_code, r.text)
    _unchanged(reg)


@SETTINGS
@given(st.one_of(st.none(), JSON, st.fixed_dictionaries({}, optional={
    "version": st.one_of(st.integers(-5, 10), JSON_SCALARS), "model_id": st.one_of(st.just("m"), JSON_SCALARS)})),
    st.binary(max_size=30))
def test_admin_with_the_token_gets_a_4xx_or_a_valid_rollback(served, body, raw: bytes) -> None:
    client, reg = served
    try:
        r = client.post("/model/rollback", headers=ADMIN, content=None if body is None else json.dumps(body).encode())
        assert r.status_code in (200, 404, 409, 422), (r.status_code, r.text, body)
        if r.status_code == 200:
            assert reg.pinned is not None and reg.current.version == r.json()["version"] == 3
        else:
            _unchanged(reg)
        r = client.post("/model/rollback", headers={**ADMIN, "content-type": "application/json"}, content=raw)
        assert r.status_code < 500, (r.status_code, r.text, raw)
    finally:
        assert client.post("/model/unpin", headers=ADMIN).status_code == 200
    _unchanged(reg)


# ------------------------------------------------------------------------------ a real uvicorn server
@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, object]]:
    """The same app behind uvicorn (uvloop + httptools, as run_server) on a free loopback port."""
    import uvicorn

    reg = _registry()
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(_app(reg), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                                        lifespan="on", log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port, reg
    finally:
        srv.should_exit = True
        thread.join(15)
        assert not thread.is_alive()


def _raw(port: int, data: bytes, shut: bool = False) -> bytes:
    """Send raw bytes (``shut``: then EOF), read until the server closes (or 5 s): the response,
    or b'' when the server dropped the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1]) if resp.startswith(b"HTTP/1.1 ") else 0


GOOD = b'{"user_id": "u1", "candidates": [{"item_id": "a"}, {"item_id": "b"}]}'


def _request(body: bytes, *extra: bytes, length: int | None = None) -> bytes:
    size = b"%d" % (len(body) if length is None else length)
    head = [b"POST /predict HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json", b"Connection: close",
            b"Content-Length: " + (b"x" + size if length == -1 else size), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@pytest.mark.parametrize("name, data, statuses", [
    ("good", _request(GOOD), {200}),
    ("truncated JSON", _request(GOOD[:30]), {422}),
    ("body shorter than Content-Length, then EOF", _request(GOOD, length=len(GOOD) + 50), {0, 400}),
    ("non-numeric Content-Length", _request(GOOD, length=-1), {0, 400}),
    ("oversized by Content-Length", _request(b"{}", length=MAX_BODY + 1), {413}),
    ("oversized chunked", b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     + (b"400\r\n" + b" " * 1024 + b"\r\n") * 10 + b"0\r\n\r\n", {413}),
    ("garbage request line", b"\x00\xff NOT HTTP\r\n\r\n", {0, 400}),
    # uvicorn's httptools parser sets no header size limit (h11's is 64 KiB): a 1 MiB header is
    # accepted. What matters here is that the server survives it and goes on answering.
    ("1 MiB header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * (1 << 20)
     + b"\r\n\r\n", {0, 200, 400, 431}),
    ("invalid UTF-8 body", _request(b'{"user_id": "\xff\xfe", "candidates": [{"item_id": "a"}]}'), {422}),
    ("NaN literal", _request(b'{"user_id": "u", "candidates": [{"item_id": "a", "numeric": {"x": NaN}}]}'), {422}),
])
def test_raw_requests_over_a_real_server(server, name: str, data: bytes, statuses: set[int]) -> None:
    port, reg = server
    got = _status(_raw(port, data, shut="then EOF" in name))
    assert got in statuses, (name, got)
    assert _status(_raw(port, _request(GOOD))) == 200, f"server stopped answering after: {name}"
    _unchanged(reg)


def test_a_client_that_vanishes_mid_body_does_not_hurt_the_server(server) -> None:
    port, reg = server
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(_request(GOOD, length=len(GOOD) + 100)[:-10])  # then close without the rest
    assert _status(_raw(port, _request(GOOD))) == 200
    _unchanged(reg)
