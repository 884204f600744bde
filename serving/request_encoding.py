"""A ``/predict`` request as model inputs: context, candidates and the store's values merged
column-wise (:func:`encode_request`), with the row-wise reference (:func:`merged_rows`)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ctr.online_learner.encoding import EMPTY_KEY, EncodedBatch, numeric_table
from ctr.online_learner.hashing import MISSING_KEY, numeric_keys, value_keys
from ctr.serving.features import (
    DEFAULTS,
    FeaturePlan,
    Lookup,
)
from ctr.serving.registry import ModelVersion

#: Impression attributes set per request/candidate; a same-named categorical field is overridden.
ATTRIBUTES = frozenset({"user_id", "item_id", "position"})


@functools.lru_cache(maxsize=8)
def _index_keys(n: int) -> np.ndarray:
    """Keys of the default positions ``"0" .. str(n - 1)`` (a candidate's index)."""
    return value_keys([str(i) for i in range(n)])


def encode_request(mv: ModelVersion, req: Any, plan: FeaturePlan, look: Lookup,
                   candidate_keys: np.ndarray | None = None) -> EncodedBatch:
    """Model inputs, one row per candidate, with the semantics of encoding, per candidate, the
    merged row (what :func:`merged_rows` builds)::

        {**context fields, **candidate fields, user_id, item_id, position (default: index),
         **the store's values for the fields the plan fills}

    i.e. the candidate wins over the context, the impression attributes and the store win
    over both. Computed column-wise instead: the context (+ user, + the user's store values)
    is encoded once by the version's ``FeatureEncoder`` and repeated, then only the columns
    the candidates carry are encoded (``ValueKeyer`` / ``numeric_keys``, the encoder's own
    parts) and written over it where a candidate has a value: for 100 candidates a fraction of
    the model's columns, where encoding every merged row used to cost more than the forward
    pass. ``tests/test_serving.py`` checks the equivalence on random requests and end to end
    against the learner's encoder.

    ``candidate_keys`` ``[n, H]``: the candidates' categorical keys already computed from the
    request's bytes (:class:`ctr.serving.candidate_fields.CandidateFields`; MISSING_KEY where a
    candidate lacks the field); ``req.candidates[i].categorical`` is then not read."""
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
    col = enc.column_of
    keyer = enc.keyer

    def put_keys(names: list[str], block: np.ndarray, has: np.ndarray | None = None) -> None:
        """Candidate keys ``[n, len(names)]`` over the context's, where a candidate has a value
        (``has``; default: where its key is not MISSING_KEY)."""
        cols = [col[name] for name in names]
        keys[:, cols] = np.where(block != MISSING_KEY if has is None else has, block, keys[:, cols])

    categorical = set(cfg.categorical_fields)
    if candidate_keys is not None:
        np.copyto(keys, candidate_keys, where=candidate_keys != MISSING_KEY)
        names = []
    else:
        names = sorted(set().union(*[c.categorical for c in cands]) & categorical - ATTRIBUTES)
    if names:  # every candidate column in one keyer call
        block = keyer.columns([c.categorical for c in cands], names)
        has = block != MISSING_KEY
        if enc.empty_is_missing:  # a candidate's "" is its value (missing): the context's does not show
            block[block == EMPTY_KEY] = MISSING_KEY
        put_keys(names, block, has)
    if "item_id" in categorical:
        keys[:, col["item_id"]] = keyer([c.item_id for c in cands])
    if "position" in categorical:
        positions = [c.position for c in cands]
        keys[:, col["position"]] = (_index_keys(n) if positions.count(None) == n else
                                    keyer([str(i if p is None else p) for i, p in enumerate(positions)]))

    store_fields = set(plan.user) | set(plan.item)
    numeric_present = set().union(*[c.numeric for c in cands])
    own = sorted(numeric_present & set(cfg.numeric_fields) - store_fields)
    names = own + list(plan.item)
    if names:
        items = look.values.get("item", {})
        stored = [items.get(c.item_id) or DEFAULTS["item"] for c in cands] if plan.item else []
        values = numeric_table(stored, plan.item)  # [n, len(plan.item)]
        if own:
            values = np.hstack([numeric_table([c.numeric for c in cands], own), values.reshape(n, len(plan.item))])
        if cfg.numeric_mode == "bucket":
            put_keys(names, numeric_keys(values, cfg.numeric_resolution))
        if numeric is not None:  # dense mode, or the numeric fields' linear term
            cols = [cfg.numeric_fields.index(name) for name in names]
            numeric[:, cols] = np.where(np.isnan(values), numeric[:, cols], values)
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
