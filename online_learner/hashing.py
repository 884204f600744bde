"""Multi-probe hashing of (field, value) into ONE shared, power-of-two embedding table.

This module *is* part of the model file format: a checkpoint's embedding rows are only
meaningful together with the exact function that maps a feature value to its rows.
``HASH_VERSION`` names the definition below; ``tests/test_hashing.py`` pins it with
published test vectors of the two building blocks and with golden bucket ids.

The definition (all arithmetic modulo 2**64)::

    value_key(value)       = XXH64(utf8(value), seed=0)                  # strings, once per value
    numeric_key(x, r)      = uint64(sign(x) * octave_bucket(|x|, r)) ^ NUMERIC_TAG   # NaN/inf: missing
    octave_bucket(a, r)    = (e - 1) * r + floor((2m - 1) * r)  where 1 + a = m * 2**e, m in [0.5, 1)
    MISSING_KEY            = 0                                            # absent field / value
    seeds(field, k, s)     = first k outputs of SplitMix64 seeded with XXH64(utf8(field), seed=s)
    probe_hash(key, seed)  = first SplitMix64 output of state (key ^ seed)
                           = mix64((key ^ seed) + 0x9E3779B97F4A7C15)
    bucket(key, seed, b)   = probe_hash(key, seed) & (2**b - 1)          # int32, b <= 31

Why this shape:

* the field enters through its *seeds*, derived from the field **name** (not its position),
  so adding or reordering fields never moves the rows of the other fields;
* probe ``p`` of field ``f`` uses its own seed, so two values that collide on one probe
  almost never collide on the others (the whole point of multiplexing, Coleman et al. 2023);
* ``mix64`` is a bijection of 64-bit words, so distinct keys of one field never collide
  before the mask, and the mask (not ``%``) keeps the GPU path free of 64-bit division;
* XXH64 and SplitMix64 both have widely published known-answer vectors, so the spec is
  checkable against independent implementations (sources cited in the tests).

Write-once scalar code, compiled three ways: the scalar functions ``_mix64``, ``_probe_hash``,
``_bucket`` (and ``_xxh64`` for strings) are written once below and re-bound to three
namespaces of constants and helpers:

1. **spec** -- plain Python ints, every operation masked to 64 bits; slow, obviously correct;
2. **CPU twin** -- the same bytecode under ``numba.njit`` with ``np.uint64`` constants (the
   masks are no-ops the compiler removes);
3. **CUDA kernel** -- the same bytecode as ``cuda.jit(device=True, inline="always")`` helpers
   called from one ``cuda.jit`` kernel (built lazily: nothing is compiled at import time).

Layout of the output: for fields ``f = 0..F-1`` with ``k_f`` probes each, the output has
``P = sum(k_f)`` columns; columns ``offset_f .. offset_f + k_f - 1`` hold field ``f``'s probes
in probe order, so a lookup ``table[ids]`` of shape ``[B, P, chunk]`` flattens to the
concatenation of the per-field embeddings ``[B, sum_f k_f * chunk]``.

>>> layout = ProbeLayout.build(["site", "ad"], probes={"site": 1, "ad": 2}, table_bits=10)
>>> keys = np.array([[value_key("news"), value_key("ad7")]], dtype=np.uint64)
>>> ids = hash_buckets(keys, layout)
>>> ids.shape, ids.dtype, int(ids.max()) < 1024
((1, 3), dtype('int32'), True)
>>> bool((ids == spec_bucket_ids(keys, layout)).all())
True
"""

from __future__ import annotations

import functools
import itertools
import math
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np

__all__ = [
    "HASH_VERSION",
    "MISSING_KEY",
    "NUMERIC_TAG",
    "ProbeLayout",
    "ValueKeyer",
    "bucket",
    "bucket_ids_cpu",
    "compile_ptx",
    "cuda_kernel",
    "field_seeds",
    "hash_buckets",
    "launch_config",
    "numeric_key",
    "numeric_keys",
    "probe_hash",
    "spec_bucket_ids",
    "splitmix64_stream",
    "value_key",
    "value_keys",
    "xxh64",
]

#: Name of the hash definition above. Bump it (and the golden values) on ANY change.
HASH_VERSION = "ue-splitmix64-xxh64-v1"
#: Key of an absent field / value. Each field still gets its own "missing" rows (seeds differ).
MISSING_KEY = 0
#: XORed into bucketised numeric keys so they live apart from small integers ("numeric!").
NUMERIC_TAG = 0x6E756D6572696321
#: Largest supported table: ids must fit a non-negative int32.
MAX_TABLE_BITS = 31

_MASK64 = (1 << 64) - 1
# SplitMix64 (Steele, Lea, Flood, OOPSLA 2014; Vigna's splitmix64.c): Weyl increment and the
# "Stafford variant 13" finaliser (mix64).
_GAMMA = 0x9E3779B97F4A7C15
_SM_M1 = 0xBF58476D1CE4E5B9
_SM_M2 = 0x94D049BB133111EB
# XXH64 primes (Yann Collet, xxHash spec doc/xxhash_spec.md).
_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5

# Shift / rotate amounts and zero as named constants: the compiled namespaces turn them into
# np.uint64 so numba never mixes uint64 with int64 (which it would promote to float64).
_ZERO = 0
_S1, _S7, _S8, _S11, _S12, _S16, _S18, _S23, _S24 = 1, 7, 8, 11, 12, 16, 18, 23, 24
_S27, _S29, _S30, _S31, _S32, _S33, _S40, _S48, _S56, _S64 = 27, 29, 30, 31, 32, 33, 40, 48, 56, 64
#: Integer conversion used by the scalar code (``int`` in the spec, ``np.uint64`` compiled).
_U64 = int

_INT_CONSTANTS: dict[str, int] = {
    name: value
    for name, value in globals().items()
    if name in ("_MASK64", "_GAMMA", "_SM_M1", "_SM_M2", "_ZERO") or (name[:2] in ("_P", "_S") and name[2:].isdigit())
}


# ----------------------------------------------------------------------------------------
# Write-once scalar code. Only names from the namespaces above; every +, *, << is masked so
# the pure-Python spec stays in 64 bits (the masks compile to nothing under numba). As
# written (module globals) these functions ARE the spec; _build_namespace re-binds them.
# ----------------------------------------------------------------------------------------
def _mix64(z):
    z = ((z ^ (z >> _S30)) * _SM_M1) & _MASK64
    z = ((z ^ (z >> _S27)) * _SM_M2) & _MASK64
    return z ^ (z >> _S31)


def _probe_hash(key, seed):
    return _mix64(((key ^ seed) + _GAMMA) & _MASK64)


def _bucket(key, seed, mask):
    return _probe_hash(key, seed) & mask


def _rotl(x, r):
    return ((x << r) & _MASK64) | (x >> (_S64 - r))


def _xxh_round(acc, lane):
    acc = (acc + lane * _P2) & _MASK64
    return (_rotl(acc, _S31) * _P1) & _MASK64


def _xxh_merge(acc, v):
    acc = acc ^ _xxh_round(_ZERO, v)
    return (acc * _P1 + _P4) & _MASK64


def _read64(buf, p):
    return (
        _U64(buf[p])
        | (_U64(buf[p + 1]) << _S8)
        | (_U64(buf[p + 2]) << _S16)
        | (_U64(buf[p + 3]) << _S24)
        | (_U64(buf[p + 4]) << _S32)
        | (_U64(buf[p + 5]) << _S40)
        | (_U64(buf[p + 6]) << _S48)
        | (_U64(buf[p + 7]) << _S56)
    )


def _read32(buf, p):
    return _U64(buf[p]) | (_U64(buf[p + 1]) << _S8) | (_U64(buf[p + 2]) << _S16) | (_U64(buf[p + 3]) << _S24)


def _xxh64(buf, start, length, seed):
    """XXH64 of ``buf[start:start+length]`` (little-endian lanes), as in the xxHash spec."""
    p = start
    end = start + length
    if length >= 32:
        v1 = (seed + _P1 + _P2) & _MASK64
        v2 = (seed + _P2) & _MASK64
        v3 = seed
        v4 = (seed - _P1) & _MASK64
        while p + 32 <= end:
            v1 = _xxh_round(v1, _read64(buf, p))
            v2 = _xxh_round(v2, _read64(buf, p + 8))
            v3 = _xxh_round(v3, _read64(buf, p + 16))
            v4 = _xxh_round(v4, _read64(buf, p + 24))
            p += 32
        h = (_rotl(v1, _S1) + _rotl(v2, _S7) + _rotl(v3, _S12) + _rotl(v4, _S18)) & _MASK64
        h = _xxh_merge(h, v1)
        h = _xxh_merge(h, v2)
        h = _xxh_merge(h, v3)
        h = _xxh_merge(h, v4)
    else:
        h = (seed + _P5) & _MASK64
    h = (h + _U64(length)) & _MASK64
    while p + 8 <= end:
        h = h ^ _xxh_round(_ZERO, _read64(buf, p))
        h = (_rotl(h, _S27) * _P1 + _P4) & _MASK64
        p += 8
    if p + 4 <= end:
        h = h ^ ((_read32(buf, p) * _P1) & _MASK64)
        h = (_rotl(h, _S23) * _P2 + _P3) & _MASK64
        p += 4
    while p < end:
        h = h ^ ((_U64(buf[p]) * _P5) & _MASK64)
        h = (_rotl(h, _S11) * _P1) & _MASK64
        p += 1
    h = h ^ (h >> _S33)
    h = (h * _P2) & _MASK64
    h = h ^ (h >> _S29)
    h = (h * _P3) & _MASK64
    return h ^ (h >> _S32)


# Batch loops (CPU twin only; the CUDA kernel is defined further down).
def _bucket_ids_loop(keys, probe_field, probe_seed, mask, out):
    n = keys.shape[0]
    n_probes = probe_field.shape[0]
    for i in range(n):
        for j in range(n_probes):
            out[i, j] = _bucket(_U64(keys[i, probe_field[j]]), probe_seed[j], mask)


def _xxh64_many(buf, offsets, seed, out):
    for i in range(out.shape[0]):
        out[i] = _xxh64(buf, offsets[i], offsets[i + 1] - offsets[i], seed)


def _rebind(fn: Callable[..., Any], namespace: dict[str, Any]) -> Callable[..., Any]:
    """The same bytecode with another set of globals (constants + helpers)."""
    return types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)


_SCALARS = (_mix64, _probe_hash, _bucket, _rotl, _xxh_round, _xxh_merge, _read64, _read32, _xxh64)


def _build_namespace(constant: Callable[[int], Any], u64: Callable[[Any], Any], wrap) -> dict[str, Any]:
    # __name__ lets numba's on-disk cache rebuild the function's environment from this module.
    ns: dict[str, Any] = {"__name__": __name__}
    ns.update({name: constant(value) for name, value in _INT_CONSTANTS.items()})
    ns["_U64"] = u64
    for fn in _SCALARS:
        ns[fn.__name__] = wrap(_rebind(fn, ns))
    return ns


# (1) the pure-Python spec
_SPEC = _build_namespace(int, int, lambda f: f)
# (2) the numba CPU twin: helpers inline into the loops; np.uint64 everywhere (no int64 mixing,
# which numba would promote to float64).
_JIT = _build_namespace(np.uint64, np.uint64, lambda f: numba.njit(inline="always")(f))
# ``cache=True``: compiled kernels are kept in __pycache__ and reused while this file keeps
# its size and mtime; they record the module's import name, so a rename must change the file
# (this note came with the move under ``ctr``: caches from before it failed to load).
_twin_bucket_ids = numba.njit(nogil=True, boundscheck=False, cache=True)(_rebind(_bucket_ids_loop, _JIT))
_twin_xxh64_many = numba.njit(nogil=True, boundscheck=False, cache=True)(_rebind(_xxh64_many, _JIT))
#: XXH64 of ``buf[start:start + length]`` (uint8 buffer; ``seed`` an ``np.uint64``) for other
#: njit code: what :func:`value_keys` computes per value, callable on spans of a larger buffer.
xxh64_span = _JIT["_xxh64"]


# ----------------------------------------------------------------------------------------
# Spec API (pure Python ints)
# ----------------------------------------------------------------------------------------
def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 of ``data`` (pure-Python spec).

    >>> hex(xxh64(b"abc"))
    '0x44bc2cf5ad770999'
    """
    return _SPEC["_xxh64"](data, 0, len(data), seed & _MASK64)


def probe_hash(key: int, seed: int) -> int:
    """64-bit probe hash = first SplitMix64 output of state ``key ^ seed`` (spec)."""
    return _SPEC["_probe_hash"](key & _MASK64, seed & _MASK64)


def bucket(key: int, seed: int, table_bits: int) -> int:
    """Bucket id of ``key`` under ``seed`` in a table of ``2**table_bits`` rows (spec)."""
    return _SPEC["_bucket"](key & _MASK64, seed & _MASK64, (1 << table_bits) - 1)


def splitmix64_stream(state: int, n: int) -> list[int]:
    """First ``n`` outputs of SplitMix64 seeded with ``state`` (spec; Rosetta Code vectors).

    >>> splitmix64_stream(1234567, 2)
    [6457827717110365317, 3203168211198807973]
    """
    out = []
    for _ in range(n):
        out.append(_SPEC["_mix64"]((state + _GAMMA) & _MASK64))
        state = (state + _GAMMA) & _MASK64
    return out


def field_seeds(field: str, probes: int, hash_seed: int = 0) -> list[int]:
    """Per-probe seeds of ``field``: SplitMix64 stream seeded with XXH64(utf8(field))."""
    return splitmix64_stream(xxh64(field.encode("utf-8"), hash_seed), probes)


def value_key(value: str | None) -> int:
    """uint64 key of a categorical value: XXH64 of its UTF-8 bytes; ``None`` -> MISSING_KEY."""
    if value is None:
        return MISSING_KEY
    return xxh64(value.encode("utf-8"))


def _octave_bucket(ax: float, resolution: int) -> int:
    # 1 + |x| = m * 2**e with m in [0.5, 1): octave e - 1, then ``resolution`` linear
    # sub-buckets inside the octave. frexp and the power-of-two scaling are exact in IEEE 754,
    # so every platform computes the same bucket (np.log2 would not be bit-stable).
    m, e = math.frexp(1.0 + ax)
    return (e - 1) * resolution + int((2.0 * m - 1.0) * resolution)


def numeric_key(x: float | None, resolution: int = 4) -> int:
    """uint64 key of a numeric value bucketised on a log2 scale (spec).

    ``resolution`` (a power of two) sub-buckets per octave of ``1 + |x|``; the sign is kept;
    ``None``, NaN and +-inf are missing.

    >>> numeric_key(0.0) == numeric_key(0.2) != numeric_key(0.3)
    True
    >>> numeric_key(float("nan")) == MISSING_KEY
    True
    """
    if x is None or not math.isfinite(x):
        return MISSING_KEY
    q = _octave_bucket(abs(x), resolution)
    if x < 0:
        q = -q
    return (q & _MASK64) ^ NUMERIC_TAG


# ----------------------------------------------------------------------------------------
# Probe layout: which output column is which (field, probe), and its seed
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeLayout:
    """Fields, their probe counts ``k_f`` and the table size: everything the hash needs.

    Attributes (derived arrays are numpy, ready for the twin / kernel):
        probe_field: int32 ``[P]``  -- input column (field index) of each output column
        probe_seed:  uint64 ``[P]`` -- seed of each output column
        offsets:     int64 ``[F+1]`` -- field f owns output columns ``offsets[f]:offsets[f+1]``
    """

    fields: tuple[str, ...]
    probes: tuple[int, ...]
    table_bits: int
    hash_seed: int = 0
    probe_field: np.ndarray = field(init=False, repr=False, compare=False)
    probe_seed: np.ndarray = field(init=False, repr=False, compare=False)
    offsets: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.fields) != len(self.probes):
            raise ValueError("one probe count per field")
        if len(set(self.fields)) != len(self.fields):
            raise ValueError("duplicate field names")
        if not 1 <= self.table_bits <= MAX_TABLE_BITS:
            raise ValueError(f"table_bits must be in 1..{MAX_TABLE_BITS} (int32 bucket ids)")
        if any(k < 1 for k in self.probes):
            raise ValueError("every field needs at least one probe")
        seeds = [s for f, k in zip(self.fields, self.probes, strict=True) for s in field_seeds(f, k, self.hash_seed)]
        object.__setattr__(self, "probe_seed", np.array(seeds, dtype=np.uint64))
        object.__setattr__(self, "probe_field", np.repeat(np.arange(len(self.fields), dtype=np.int32), self.probes))
        object.__setattr__(self, "offsets", np.concatenate([[0], np.cumsum(self.probes)]).astype(np.int64))

    @classmethod
    def build(
        cls,
        fields: Iterable[str],
        probes: int | Mapping[str, int] = 2,
        table_bits: int = 20,
        hash_seed: int = 0,
        default_probes: int = 2,
    ) -> ProbeLayout:
        """Layout with ``probes`` per field (an int for all, or a per-field mapping)."""
        fields = tuple(fields)
        if isinstance(probes, Mapping):
            ks = tuple(int(probes.get(f, default_probes)) for f in fields)
        else:
            ks = (int(probes),) * len(fields)
        return cls(fields, ks, int(table_bits), int(hash_seed))

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    @property
    def total_probes(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_buckets(self) -> int:
        return 1 << self.table_bits

    @property
    def mask(self) -> int:
        return (1 << self.table_bits) - 1


# ----------------------------------------------------------------------------------------
# Keys: strings -> uint64 once on the way in (cached), numerics vectorised
# ----------------------------------------------------------------------------------------
#: Stands for an absent value while a column is keyed in bulk (its key is replaced by
#: MISSING_KEY, so a real value equal to it would read as missing: it starts with a NUL).
ABSENT_TEXT = "\x00ctr:absent"
_ABSENT_KEY = np.uint64(value_key(ABSENT_TEXT))


def value_keys(values: Sequence[str | None]) -> np.ndarray:
    """uint64 ``[n]`` keys of ``values`` (uncached batch: one njit XXH64 pass over one buffer).

    ``None`` and :data:`ABSENT_TEXT` -> MISSING_KEY; other non-strings are keyed as ``str(v)``.
    All strings are joined and encoded once: for ASCII text a value's byte length is its
    length, so no per-value ``encode`` is needed.

    >>> int(value_keys(["abc", None])[0]) == xxh64(b"abc"), int(value_keys(["abc", None])[1])
    (True, 0)
    """
    values = values if isinstance(values, list) else list(values)
    n = len(values)
    try:
        text = "".join(values)  # type: ignore[arg-type]  # the common case: all strings
    except TypeError:  # None, or a non-string
        strings = [ABSENT_TEXT if v is None else v if isinstance(v, str) else str(v) for v in values]
        values, text = strings, "".join(strings)
    buf = text.encode("utf-8")
    if len(buf) == len(text):
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=n)
    else:  # non-ASCII somewhere: byte lengths per value
        lengths = np.fromiter(map(len, map(str.encode, values)), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    keys = np.empty(n, dtype=np.uint64)
    _twin_xxh64_many(np.frombuffer(buf or b"\0", dtype=np.uint8), offsets, np.uint64(0), keys)
    keys[keys == _ABSENT_KEY] = MISSING_KEY
    return keys


#: Values per call from which :class:`ValueKeyer` hashes them all instead of using its cache:
#: a training poll's columns hash faster than they are looked up in a cache grown to hundreds
#: of thousands of values (whose dict misses the CPU caches on nearly every lookup), while a
#: serving request's column of a few hundred candidates is faster from the cache.
_BULK = 1024
#: What a cache miss reads as until its key is computed (a real key equal to it is re-read, so
#: a collision costs a lookup, never a wrong key).
_PENDING = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


class _KeyCache(dict):
    """``value -> key`` whose misses are noted (and read as ``_PENDING``) instead of raising, so a
    whole column is looked up in one C-level ``map`` and only the misses are handled after."""

    def __init__(self) -> None:
        super().__init__({None: MISSING_KEY, ABSENT_TEXT: MISSING_KEY})
        self.missed: list[str] = []

    def __missing__(self, value: Any) -> int:
        if not isinstance(value, str):  # keyed as str(value), never cached as itself: 1 == True
            value = str(value)
            key = self.get(value)
            if key is not None:
                return key
        self.missed.append(value)
        return int(_PENDING)


class ValueKeyer:
    """``value -> uint64 key`` for categorical columns, cached for small calls.

    A call of at least ``_BULK`` values (a training poll) is hashed whole in one njit pass.
    Smaller ones (serving requests) are looked up in a cache -- values repeat heavily on a click
    stream -- whose misses are hashed in one njit batch. The cache is bounded: when it exceeds
    ``max_entries`` it is cleared (amortised O(1), no LRU bookkeeping on the hot path).

    >>> keyer = ValueKeyer()
    >>> ks = keyer(["a", "b", None, "a"])
    >>> ks.dtype, bool(ks[0] == ks[3]), int(ks[2]) == MISSING_KEY
    (dtype('uint64'), True, True)
    """

    def __init__(self, max_entries: int = 2_000_000) -> None:
        self.max_entries = max_entries
        self._cache = _KeyCache()
        self.hits = 0
        self.misses = 0

    def __call__(self, values: Sequence[str | None]) -> np.ndarray:
        """Keys ``[len(values)]``; non-string values are keyed as ``str(value)``."""
        return self._keys(values if isinstance(values, list) else list(values))

    def column(self, rows: Sequence[Mapping[str, Any]], name: str) -> np.ndarray:
        """Keys of ``row.get(name)`` for every row: one dict lookup per row when cached.

        ``None`` (absent) -> MISSING_KEY; non-string values are keyed as ``str(value)``.

        >>> ValueKeyer().column([{"a": "x"}, {}, {"a": 7}], "a").tolist() == [value_key("x"), 0, value_key("7")]
        True
        """
        return self.columns(rows, [name])[:, 0]

    def columns(self, rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> np.ndarray:
        """Keys ``[len(rows), len(names)]`` of ``row.get(name)``, one column per name, with the
        per-value work in C-level ``map`` calls (one dict lookup for the value, one for its key)
        instead of a Python loop per column.

        >>> k = ValueKeyer()
        >>> rows = [{"a": "x", "b": "y"}, {"b": "x"}]
        >>> bool((k.columns(rows, ["a", "b"]) == np.stack([k.column(rows, "a"), k.column(rows, "b")], 1)).all())
        True
        """
        n = len(rows)
        if n > 1 and isinstance(rows[0], dict):
            # Rows that name the same fields in the same order (what one client's serialiser
            # sends): key every value in one pass over the dicts' values, then pick the columns.
            order = tuple(rows[0])
            if set(names) <= set(order) and list(map(tuple, rows)).count(order) == n:
                try:
                    every = self._keys(list(itertools.chain.from_iterable(map(dict.values, rows))))  # type: ignore[arg-type]
                except TypeError:  # a row not a dict, or an unhashable value in a field not asked for: per name
                    pass
                else:
                    return every.reshape(n, len(order))[:, [order.index(name) for name in names]]
        flat: list[Any] = []
        extend = flat.extend
        absent = [ABSENT_TEXT] * len(names)  # an all-string column joins in one go
        for r in rows:
            extend(map(r.get, names, absent))
        return self._keys(flat).reshape(n, len(names))

    def _keys(self, values: list[Any]) -> np.ndarray:
        if len(values) >= _BULK:  # hashing all beats looking up in a big cache (cache misses)
            self.misses += len(values)
            return value_keys(values)
        cache = self._cache
        keys = np.fromiter(map(cache.__getitem__, values), dtype=np.uint64, count=len(values))
        if not cache.missed:
            self.hits += len(values)
            return keys
        new = list(dict.fromkeys(cache.missed))
        cache.missed.clear()
        if len(cache) + len(new) > self.max_entries:
            cache.clear()
            cache.update({None: MISSING_KEY, ABSENT_TEXT: MISSING_KEY})
        cache.update(zip(new, value_keys(new).tolist(), strict=True))
        pending = np.flatnonzero(keys == _PENDING)
        keys[pending] = np.fromiter(
            map(cache.__getitem__, map(values.__getitem__, pending.tolist())), dtype=np.uint64, count=len(pending)
        )
        self.misses += len(new)  # distinct values hashed
        self.hits += len(values) - len(pending)  # lookups served from the cache
        return keys


def numeric_keys(x: np.ndarray, resolution: int = 4) -> np.ndarray:
    """Vectorised :func:`numeric_key`: float ``[...]`` -> uint64 ``[...]`` (NaN/inf -> missing).

    >>> xs = np.array([0.0, 3.0, -3.0, np.nan])
    >>> [int(k) for k in numeric_keys(xs)] == [numeric_key(float(v)) for v in xs]
    True
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.empty(x.shape, dtype=np.uint64)
    _numeric_keys_loop(x.reshape(-1), np.int64(resolution), out.reshape(-1))
    return out


@numba.njit(nogil=True, cache=True)
def _numeric_keys_loop(x, resolution, out):
    # numeric_key's arithmetic per value (one compiled loop: a serving request's few hundred
    # values cost less than the NumPy ufunc calls' overhead)
    tag, missing = np.uint64(NUMERIC_TAG), np.uint64(MISSING_KEY)
    for i in range(x.shape[0]):
        v = x[i]
        if not math.isfinite(v):
            out[i] = missing
            continue
        m, e = math.frexp(1.0 + abs(v))
        q = (np.int64(e) - 1) * resolution + np.int64((2.0 * m - 1.0) * resolution)
        if v < 0:
            q = -q
        out[i] = np.uint64(q) ^ tag


# ----------------------------------------------------------------------------------------
# Bucket ids: spec, CPU twin, CUDA kernel, dispatch
# ----------------------------------------------------------------------------------------
def spec_bucket_ids(keys: np.ndarray, layout: ProbeLayout) -> np.ndarray:
    """Pure-Python reference: uint64 ``[n, F]`` -> int32 ``[n, P]``. Slow; for tests."""
    keys = np.asarray(keys)
    out = np.empty((keys.shape[0], layout.total_probes), dtype=np.int32)
    seeds = [int(s) for s in layout.probe_seed]
    cols = [int(c) for c in layout.probe_field]
    for i in range(keys.shape[0]):
        row = [int(k) & _MASK64 for k in keys[i].tolist()]
        for j, (c, s) in enumerate(zip(cols, seeds, strict=True)):
            out[i, j] = bucket(row[c], s, layout.table_bits)
    return out


def bucket_ids_cpu(keys: np.ndarray, layout: ProbeLayout, out: np.ndarray | None = None) -> np.ndarray:
    """CPU twin: uint64 (or int64 bit pattern) ``[n, F]`` -> int32 ``[n, P]``, one core, nogil."""
    keys = np.ascontiguousarray(keys)
    if keys.ndim != 2 or keys.shape[1] != layout.num_fields:
        raise ValueError(f"keys must be [n, {layout.num_fields}], got {keys.shape}")
    if keys.dtype not in (np.uint64, np.int64):
        raise TypeError(f"keys must be uint64 (or int64 bits), got {keys.dtype}")
    if out is None:
        out = np.empty((keys.shape[0], layout.total_probes), dtype=np.int32)
    _twin_bucket_ids(keys, layout.probe_field, layout.probe_seed, np.uint64(layout.mask), out)
    return out


def _bucket_ids_kernel(keys, probe_field, probe_seed, mask, out):
    # 2-D grid: x = probe column (fastest, coalesced writes of one row), y = row, grid-stride.
    j, i0 = cuda.grid(2)  # noqa: F821 - `cuda` is bound in the kernel's namespace (_cuda_build)
    stride = cuda.gridsize(2)[1]  # noqa: F821
    if j < out.shape[1]:
        col = probe_field[j]
        seed = probe_seed[j]
        for i in range(i0, out.shape[0], stride):
            out[i, j] = _bucket(_U64(keys[i, col]), seed, mask)


#: Threads per block of the kernel (x = probes, y = rows).
CUDA_BLOCK = (32, 8)


@functools.cache
def _cuda_build() -> tuple[Callable[..., Any], Any]:
    """(python kernel function, cuda.jit dispatcher); built on first use, never at import."""
    from numba import cuda

    ns = _build_namespace(np.uint64, np.uint64, lambda f: cuda.jit(device=True, inline="always")(f))
    ns["cuda"] = cuda
    kernel_fn = _rebind(_bucket_ids_kernel, ns)
    return kernel_fn, cuda.jit(kernel_fn)


def cuda_kernel() -> Any:
    """The ``cuda.jit`` bucket-id kernel ``(keys[n,F], probe_field[P], probe_seed[P], mask, out[n,P])``."""
    return _cuda_build()[1]


def launch_config(n_rows: int, n_probes: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(grid, block) for the kernel; rows beyond 65535 blocks are covered by the grid-stride loop."""
    bx, by = CUDA_BLOCK
    return ((n_probes + bx - 1) // bx, max(1, min(65535, (n_rows + by - 1) // by))), CUDA_BLOCK


def compile_ptx(cc: tuple[int, int] = (9, 0), key_dtype: str = "uint64") -> str:
    """PTX of the kernel for compute capability ``cc`` (no GPU needed; NVRTC is).

    Raises ``RuntimeError`` under the CUDA simulator (it has no compiler).
    """
    from numba import cuda

    if getattr(cuda, "compile_ptx", None) is None:
        raise RuntimeError("numba.cuda.compile_ptx is unavailable (CUDA simulator?)")
    kernel_fn, _ = _cuda_build()
    sig = f"void({key_dtype}[:, ::1], int32[::1], uint64[::1], uint64, int32[:, ::1])"
    ptx, _ = cuda.compile_ptx(kernel_fn, sig, cc=cc)
    return ptx


def _bucket_ids_cuda(keys: Any, layout: ProbeLayout) -> Any:
    """torch CUDA int64/uint64 ``[n, F]`` -> torch CUDA int32 ``[n, P]`` (zero copy, torch's stream)."""
    import torch
    from numba import cuda

    keys = keys.contiguous()
    if keys.dtype == torch.uint64:  # torch's CUDA array interface is surest for int64
        keys = keys.view(torch.int64)
    out = torch.empty((keys.shape[0], layout.total_probes), dtype=torch.int32, device=keys.device)
    if keys.shape[0] == 0:
        return out
    tables = _device_tables(layout, keys.device)
    stream = cuda.external_stream(torch.cuda.current_stream(keys.device).cuda_stream)
    grid, block = launch_config(keys.shape[0], layout.total_probes)
    # sync=False: the kernel runs on torch's current stream, which already orders it after the
    # producers of `keys` and before the consumers of `out` -- no extra stream synchronisation.
    cuda_kernel()[grid, block, stream](
        cuda.as_cuda_array(keys, sync=False),
        cuda.as_cuda_array(tables[0], sync=False),
        cuda.as_cuda_array(tables[1], sync=False).view(np.uint64),
        np.uint64(layout.mask),
        cuda.as_cuda_array(out, sync=False),
    )
    return out


@functools.lru_cache(maxsize=64)
def _device_tables(layout: ProbeLayout, device: Any) -> tuple[Any, Any]:
    import torch

    return (
        torch.from_numpy(layout.probe_field).to(device),
        torch.from_numpy(layout.probe_seed.view(np.int64)).to(device),
    )


def hash_buckets(keys: Any, layout: ProbeLayout) -> Any:
    """Runtime dispatch: bucket ids of ``keys [n, F]`` -> int32 ``[n, P]``, same type/device.

    * numpy array -> CPU twin -> numpy int32;
    * torch CPU tensor -> CPU twin (zero-copy via ``.numpy()``) -> torch int32;
    * torch CUDA tensor (and ``torch.cuda.is_available()``) -> CUDA kernel on torch's current
      stream -> torch CUDA int32. Both paths return identical ids (tests: twin == spec,
      kernel == twin under the simulator).
    """
    if isinstance(keys, np.ndarray):
        return bucket_ids_cpu(keys, layout)
    import torch

    if not isinstance(keys, torch.Tensor):
        return bucket_ids_cpu(np.asarray(keys, dtype=np.uint64), layout)
    if keys.is_cuda and torch.cuda.is_available():
        return _bucket_ids_cuda(keys, layout)
    arr = keys.detach().cpu().contiguous()
    if arr.dtype == torch.uint64:
        arr = arr.view(torch.int64)
    return torch.from_numpy(bucket_ids_cpu(arr.numpy(), layout))
