"""The fast path of ``/predict`` (candidates' categorical fields keyed from the request's bytes,
``ctr.serving.candidate_fields``) answers exactly as the full decode does: the same model
inputs on random requests, and the same status and body on malformed, unusual and byte-mutated
ones (where it declines and the full decode answers)."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest

from ctr.features.spec import SPEC
from ctr.online_learner.delta import snapshot_tensors
from ctr.online_learner.model import CTRModel, ModelConfig
from ctr.online_learner.update_format import UpdateHeader
from ctr.serving.candidate_fields import CandidateFields
from ctr.serving.features import FeaturePlan, Lookup
from ctr.serving.registry import ModelRegistry
from ctr.serving.request_encoding import ATTRIBUTES, encode_request, merged_rows
from ctr.serving.schema import lazy_request_type, request_type

CATS = ("C1", "C2", "C3", "campaign", "user_id", "item_id", "position")
NUMS = ("I1", "user_ctr_1h", "item_ctr_1h")
#: what candidates send: model fields, attributes, a numeric field's name, one the model lacks
SENT = ("C2", "C3", "campaign", "X", "user_id", "item_id", "position", "I1")


def _version(empty_is_missing: bool = False):
    cfg = ModelConfig(CATS, NUMS, table_bits=10)
    reg = ModelRegistry()
    header = UpdateHeader(kind="snapshot", model_id="m", version=1, base_version=1, model_config=cfg.to_dict())
    mv = reg.install_snapshot(header, snapshot_tensors(CTRModel(cfg)))
    mv.encoder.empty_is_missing = empty_is_missing
    return mv


def _request(rng: np.random.Generator, uniform: bool) -> dict:
    """A random request; ``uniform``: every candidate names the same fields in one order."""
    order = [f for f in SENT if rng.random() < 0.6]
    cands = []
    for _ in range(int(rng.integers(1, 40))):
        names = order if uniform else [f for f in SENT if rng.random() < 0.5]
        c: dict = {"item_id": f"ad{rng.integers(5)}"}
        if rng.random() < 0.9:
            c["categorical"] = {f: ("" if rng.random() < 0.1 else f"v{rng.integers(6)}") for f in names}
        if rng.random() < 0.3:
            c["numeric"] = {"I1": float(rng.normal())}
        if rng.random() < 0.2:
            c["position"] = int(rng.integers(0, 9))
        cands.append(c)
    return {"user_id": f"u{rng.integers(3)}", "candidates": cands,
            "context": {"categorical": {f: f"v{rng.integers(6)}" for f in ("C1", "C2", "campaign")
                                        if rng.random() < 0.6},
                        "numeric": {"I1": float(rng.normal())}}}


@pytest.mark.parametrize("empty_is_missing", [False, True])
def test_keys_from_bytes_equal_the_full_decode(empty_is_missing: bool) -> None:
    """... and ``encode_request`` equals the learner's encoder on the merged rows, in both
    empty-value conventions (a candidate's "" hides the context's value when it means missing)."""
    mv = _version(empty_is_missing)
    plan = FeaturePlan.for_fields(mv.config.numeric_fields)
    full = msgspec.json.Decoder(request_type(100)).decode
    lazy = msgspec.json.Decoder(lazy_request_type(100)).decode
    fields = CandidateFields(mv.config, tuple(ATTRIBUTES))
    rng = np.random.default_rng(7)
    for trial in range(200):
        body = msgspec.json.encode(_request(rng, uniform=trial % 2 == 0))
        req, lreq = full(body), lazy(body)
        look = Lookup({"user": {"u0": {f: 0.3 for f in SPEC.feature_names("user")}},
                       "item": {f"ad{k}": {f: 0.1 * k for f in SPEC.feature_names("item")} for k in range(3)}})
        want = encode_request(mv, req, plan, look)
        if not empty_is_missing:  # (serving's encoders never are; the bytes pass is not used then)
            keys = fields.keys([c.categorical for c in lreq.candidates])
            assert keys is not None, trial
            got = encode_request(mv, lreq, plan, look, keys)
            np.testing.assert_array_equal(got.keys, want.keys)
            np.testing.assert_array_equal(got.numeric, want.numeric)
        # and both are what the learner's encoder makes of the merged rows
        np.testing.assert_array_equal(want.keys, mv.encoder.encode(merged_rows(req, plan, look)).keys)


class _Features:
    def stats(self, users, items):
        return {"user": {u: {f: 0.3 for f in SPEC.feature_names("user")} for u in users},
                "item": {i: {f: 0.4 for f in SPEC.feature_names("item")} for i in items}}

    def field_weights(self, fields):
        return {f: 1.0 for f in fields}


@pytest.fixture(scope="module")
def clients():
    """Two replicas of one model: the fast path on, and off (full decode only)."""
    from fastapi.testclient import TestClient

    from ctr.serving.app import create_app
    from ctr.serving.config import ServingConfig

    mv = _version()
    out = []
    for fast in (True, False):
        reg = ModelRegistry()
        header = UpdateHeader(kind="snapshot", model_id="m", version=1, base_version=1,
                              model_config=mv.config.to_dict())
        reg.install_snapshot(header, snapshot_tensors(mv.model))
        app = create_app(ServingConfig(max_candidates=50, cache_ttl_s=600), registry=reg, features=_Features())
        if not fast:
            app.state.predictor.lazy_decoder = None
        out.append(TestClient(app).__enter__())
    yield out
    for c in out:
        c.__exit__(None, None, None)


def _answer(client, body: bytes) -> tuple[int, object]:
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    try:
        data = r.json()
    except ValueError:
        return r.status_code, r.text
    if isinstance(data, dict) and isinstance(data.get("features"), dict):
        data["features"].pop("ms", None)  # timing
    return r.status_code, data


UNUSUAL = [
    '{"C2": "caf\\u00e9"}', '{"C2": "a\\"b"}', '{"C2": "a\\\\b"}', '{"C2": "tab\\there"}', '{"C2": "café"}',
    '{"C2": "x", "C2": "y"}', '{"C2": "x", "C2": ""}', '{"C2": 1}', '{"C2": null}', '{"C2": ["x"]}',
    '{"C2": {"a": "b"}}', '{"": "x"}', '{"' + "n" * 64 + '": "x"}', '{"' + "n" * 65 + '": "x"}',
    '{"C2": "' + "v" * 256 + '"}', '{"C2": "' + "v" * 257 + '"}',
    "{" + ",".join(f'"f{i}": "x"' for i in range(256)) + "}", "{" + ",".join(f'"f{i}": "x"' for i in range(257)) + "}",
    'null', '[]', '"C2"', '7', '{ }', '{\n\t"C2" :\r "x" ,"C3":"y"\n}', '{"C2":"x","C3":"y"}',
    '{"campaign": "", "C3": ""}', '{"item_id": "zz", "position": "3", "user_id": "other"}',
]


def _declined() -> float:
    from prometheus_client import REGISTRY

    return sum(s.value for m in REGISTRY.collect() if m.name == "ctr_serving_candidate_scan_declined"
               for s in m.samples if s.name.endswith("_total"))


def test_unusual_candidate_fields_answer_as_the_full_decode(clients) -> None:
    fast, full = clients
    for cat in UNUSUAL:
        body = ('{"user_id": "u1", "context": {"categorical": {"C1": "a"}}, "candidates": ['
                '{"item_id": "ad1", "categorical": ' + cat + '}, {"item_id": "ad2", "categorical": {"C2": "b"}}]}')
        before = _declined()
        assert _answer(fast, body.encode()) == _answer(full, body.encode()), cat
        if cat in ('{ }', '{"C2":"x","C3":"y"}', '{"campaign": "", "C3": ""}'):
            assert _declined() == before, cat  # keyed from the bytes
        elif "\\u00e9" in cat or "café" in cat or '"C2": "x", "C2"' in cat:
            assert _declined() == before + 1, cat  # declined, then decoded fully


def test_byte_mutated_requests_answer_as_the_full_decode(clients) -> None:
    """Random edits of a valid body: every one gets the same status and body on both paths
    (most are malformed: both 422 with the full decoder's message)."""
    fast, full = clients
    rng = np.random.default_rng(3)
    alphabet = list(b'"\\{}[]:, \t\nab0-\x7f') + list("é".encode())
    base = json.dumps(_request(np.random.default_rng(5), uniform=True)).encode()
    same = 0
    for _ in range(400):
        b = bytearray(base)
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(len(b)))
            op = rng.integers(3)
            if op == 0:
                b[i] = alphabet[int(rng.integers(len(alphabet)))]
            elif op == 1:
                b.insert(i, alphabet[int(rng.integers(len(alphabet)))])
            else:
                del b[i]
        a, f = _answer(fast, bytes(b)), _answer(full, bytes(b))
        assert a == f, bytes(b)
        same += a[0] == 200
    assert same > 20  # some edits left a valid request (inside values): the fast path answered those
