"""The candidates' categorical fields keyed straight from the request's bytes.

A 100-candidate ``/predict`` carries a thousand or more categorical values. Decoded the usual
way each becomes a Python string in a dict, and then a dict lookup for its key: most of the
request's CPU time. Here the request is decoded with each candidate's ``categorical`` object
left as raw JSON (``msgspec.Raw``, syntax checked by msgspec), and one njit pass over all of
them reads the ``"name": "value"`` pairs, checks what the request schema checks (strings,
name 1..64 and value <= 256 characters, <= 256 fields) and writes each value's key -- XXH64 of
its UTF-8 bytes, as :func:`ctr.online_learner.hashing.value_keys` computes it -- into the
model's column for that field.

The pass handles the common shape only: plain ASCII strings without escapes, no field named
twice. Anything else makes it decline (:meth:`CandidateFields.keys` returns ``None``) and the
request takes the general path (full decode, :func:`encode_request` over dicts), which also
produces every validation error. So the fast path never answers differently, only sooner;
``tests/test_candidate_fields.py`` checks that on random and malformed requests.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numba
import numpy as np

from ctr.online_learner.hashing import MISSING_KEY, xxh64, xxh64_span
from ctr.online_learner.model import ModelConfig

_QUOTE, _BACKSLASH, _COLON, _COMMA, _OPEN, _CLOSE = 34, 92, 58, 44, 123, 125
#: The schema's limits (``ctr.serving.schema.Fields``); ASCII only, so characters are bytes.
_NAME_MAX, _VALUE_MAX, _FIELDS_MAX = 64, 256, 256

#: Why the pass declined (``CandidateFields.reason``; 0: it did not).
DECLINE_REASONS = ("", "not an object", "malformed", "escape, control or non-ASCII byte",
                   "name or value length", "a field named twice", "too many fields", "a value not a string")


@numba.njit(inline="always")
def _skip_ws(buf, p, end):  # type: ignore[no-untyped-def]
    while p < end and (buf[p] == 32 or buf[p] == 10 or buf[p] == 13 or buf[p] == 9):
        p += 1
    return p


@numba.njit(inline="always")
def _plain_string(buf, p, end, shortest, longest, not_a_string):  # type: ignore[no-untyped-def]
    """The plain string whose opening quote should be at ``p``: ``(start, close, 0)`` with
    ``buf[close]`` its closing quote, or ``(0, 0, reason)``: ``not_a_string`` (no quote at
    ``p``), 2 (unterminated), 3 (an escape, a control or non-ASCII byte), 4 (its length is out
    of ``[shortest, longest]``)."""
    if p >= end or buf[p] != _QUOTE:
        return 0, 0, not_a_string
    start = q = p + 1
    while q < end and buf[q] != _QUOTE:
        c = buf[q]
        if c == _BACKSLASH or c < 32 or c >= 128:
            return 0, 0, 3
        q += 1
    if q >= end:
        return 0, 0, 2
    if q - start < shortest or q - start > longest:
        return 0, 0, 4
    return start, q, 0


@numba.njit(nogil=True, boundscheck=False, cache=True)
def _scan(buf, offsets, names, name_off, name_hash, name_col, out):  # type: ignore[no-untyped-def]
    """Keys of every candidate object ``buf[offsets[i]:offsets[i + 1]]`` into ``out[i, col]``
    (``out`` holds MISSING_KEY where a candidate lacks the field). Returns 0, or the index
    of the reason it declined in DECLINE_REASONS."""
    seed = np.uint64(0)
    seen = np.empty(_FIELDS_MAX, dtype=np.uint64)
    # The k-th name of the previous object (its span) and its model column (-1: none): client
    # serialisers write every candidate's fields in one order, so a name is usually found by
    # one comparison with the name at its place in the candidate before.
    hint_at = np.full(_FIELDS_MAX, -1, dtype=np.int64)
    hint_len = np.zeros(_FIELDS_MAX, dtype=np.int64)
    hint_col = np.full(_FIELDS_MAX, -1, dtype=np.int64)
    for i in range(out.shape[0]):
        p, end = offsets[i], offsets[i + 1]
        if p == end:  # no "categorical" in this candidate
            continue
        p = _skip_ws(buf, p, end)
        if p >= end or buf[p] != _OPEN:
            return 1
        p = _skip_ws(buf, p + 1, end)
        k = 0
        if p < end and buf[p] == _CLOSE:
            p += 1
        else:
            while True:
                s, q, reason = _plain_string(buf, p, end, 1, _NAME_MAX, 2)
                if reason:
                    return reason
                length = q - s
                h = xxh64_span(buf, s, length, seed)
                for j in range(k):
                    if seen[j] == h:
                        return 5
                if k == _FIELDS_MAX:
                    return 6
                seen[k] = h
                k += 1
                p = _skip_ws(buf, q + 1, end)
                if p >= end or buf[p] != _COLON:
                    return 2
                v, q, reason = _plain_string(buf, _skip_ws(buf, p + 1, end), end, 0, _VALUE_MAX, 7)
                if reason:
                    return reason
                col = -2
                a = hint_at[k - 1]
                if a >= 0 and hint_len[k - 1] == length:
                    t = 0
                    while t < length and buf[a + t] == buf[s + t]:
                        t += 1
                    if t == length:
                        col = hint_col[k - 1]
                if col == -2:  # the model's column for this name, if any
                    col = -1
                    for j in range(name_hash.shape[0]):
                        a = name_off[j]
                        if name_hash[j] != h or name_off[j + 1] - a != length:
                            continue
                        t = 0
                        while t < length and names[a + t] == buf[s + t]:
                            t += 1
                        if t == length:
                            col = name_col[j]
                            break
                    hint_at[k - 1], hint_len[k - 1], hint_col[k - 1] = s, length, col
                if col >= 0:
                    out[i, col] = xxh64_span(buf, v, q - v, seed)
                p = _skip_ws(buf, q + 1, end)
                if p < end and buf[p] == _COMMA:
                    p = _skip_ws(buf, p + 1, end)
                    continue
                if p < end and buf[p] == _CLOSE:
                    p += 1
                    break
                return 2
        if _skip_ws(buf, p, end) != end:
            return 2
    return 0


class CandidateFields:
    """Keys ``[n, H]`` of the candidates' categorical fields for one model config.

    >>> from ctr.online_learner.hashing import value_keys
    >>> cfg = ModelConfig(("site", "campaign", "item_id"), (), table_bits=8)
    >>> raws = [msgspec.Raw(b'{"campaign": "c1", "other": "x"}'), msgspec.Raw(b"")]
    >>> keys = CandidateFields(cfg, ("item_id",)).keys(raws)
    >>> keys[:, 1].tolist() == [int(value_keys(["c1"])[0]), 0], keys[:, 0].tolist()
    (True, [0, 0])
    >>> CandidateFields(cfg, ()).keys([msgspec.Raw(b'{"campaign": "caf\\\\u00e9"}')]) is None  # an escape
    True
    """

    def __init__(self, config: ModelConfig, skip: Sequence[str]) -> None:
        """``skip``: categorical fields a candidate's ``categorical`` cannot set (the
        request's own attributes: user_id, item_id, position)."""
        self.width = len(config.hashed_fields)
        fields = [(name.encode(), j) for j, name in enumerate(config.hashed_fields)
                  if name in config.categorical_fields and name not in skip and name.isascii()]
        self._names = np.frombuffer(b"".join(n for n, _ in fields) or b"\0", dtype=np.uint8)
        self._name_off = np.zeros(len(fields) + 1, dtype=np.int64)
        np.cumsum([len(n) for n, _ in fields], out=self._name_off[1:])
        self._name_hash = np.array([xxh64(n) for n, _ in fields], dtype=np.uint64)
        self._name_col = np.array([j for _, j in fields], dtype=np.int64)
        #: Why the last call declined (an index into DECLINE_REASONS; 0: it did not).
        self.reason = 0

    def keys(self, raws: Sequence[msgspec.Raw]) -> np.ndarray | None:
        """uint64 ``[len(raws), H]``: each candidate's keys in its fields' columns, MISSING_KEY
        elsewhere; ``None`` if a candidate is not of the plain shape (see the module doc)."""
        n = len(raws)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, raws), dtype=np.int64, count=n), out=offsets[1:])
        buf = np.frombuffer(b"".join(raws) or b"\0", dtype=np.uint8)
        out = np.full((n, self.width), MISSING_KEY, dtype=np.uint64)
        self.reason = _scan(buf, offsets, self._names, self._name_off, self._name_hash, self._name_col, out)
        return None if self.reason else out
