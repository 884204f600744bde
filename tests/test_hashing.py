"""The multi-probe hash: published vectors, twin == spec, golden ids, distribution, PTX.

The CUDA kernel's bit-for-bit check lives in ``test_hashing_cudasim.py`` (own process).
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctr.online_learner.hashing import (
    MISSING_KEY,
    ProbeLayout,
    ValueKeyer,
    bucket,
    bucket_ids_cpu,
    compile_ptx,
    field_seeds,
    hash_buckets,
    numeric_key,
    numeric_keys,
    probe_hash,
    spec_bucket_ids,
    splitmix64_stream,
    value_key,
    value_keys,
    xxh64,
)

# --- published known-answer vectors ---------------------------------------------------------
# XXH64, seed 0. Values from the xxHash reference implementation as reproduced in independent
# test suites: Zig's std.hash.XxHash64 tests (lib/std/hash/xxhash.zig), LLVM's
# unittests/Support/xxhashTest.cpp ("", "a", "abc") and the python-xxhash README ("Nobody
# inspects the spammish repetition").
XXH64_VECTORS = [
    (b"", 0xEF46DB3751D8E999),
    (b"a", 0xD24EC4F1A98C6E5B),
    (b"abc", 0x44BC2CF5AD770999),
    (b"message digest", 0x066ED728FCEEB3BE),
    (b"abcdefghijklmnopqrstuvwxyz", 0xCFE1F278FA89835C),
    (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", 0xAAA46907D3047814),
    (b"Nobody inspects the spammish repetition", 0xFBCEA83C8A378BF1),
]
# SplitMix64 seeded with 1234567: Rosetta Code, "Pseudo-random numbers/Splitmix64" (the task's
# required output, matching Vigna's splitmix64.c); seed 0's first output 0xE220A8397B1DCDAF.
SPLITMIX64_1234567 = [
    6457827717110365317,
    3203168211198807973,
    9817491932198370423,
    4593380528125082431,
    16408922859458223821,
]


@pytest.mark.parametrize(("data", "expected"), XXH64_VECTORS)
def test_xxh64_spec_matches_published_vectors(data: bytes, expected: int) -> None:
    assert xxh64(data) == expected


def test_xxh64_twin_matches_published_vectors() -> None:
    keys = value_keys([d.decode() for d, _ in XXH64_VECTORS])
    assert keys.tolist() == [e for _, e in XXH64_VECTORS]


def test_splitmix64_matches_published_vectors() -> None:
    assert splitmix64_stream(1234567, 5) == SPLITMIX64_1234567
    # probe_hash(key, seed) is the first SplitMix64 output of state key ^ seed
    assert probe_hash(1234567, 0) == SPLITMIX64_1234567[0]
    assert probe_hash(0, 1234567) == SPLITMIX64_1234567[0]
    assert probe_hash(0, 0) == 0xE220A8397B1DCDAF


# --- golden values: the model file format ------------------------------------------------------
GOLDEN_LAYOUT = dict(fields=["C1", "site", "I1"], probes={"C1": 1, "site": 2, "I1": 3}, table_bits=20)
GOLDEN_SEEDS = [
    0x7893FF88722DEE0F,
    0xB9DDF4B267D9BC9E,
    0x1D9D2292FA469A9F,
    0xB18A50E81F794C88,
    0x444C762F36F9FCFE,
    0xDF3E6F8CBB88A112,
]
GOLDEN_ROWS = [
    ("68fd1e64", "news", 3.0),
    (None, "", None),
    ("é日本", "x" * 40, -1234.5),
]
GOLDEN_KEYS = [
    [6718470718629228516, 8086903887255937518, 7959388198925853481],
    [0, 17241709254077376921, 0],
    [14414712312941965223, 10551747345416853717, 10487355874783698169],
]
GOLDEN_IDS = [
    [775621, 634765, 276607, 1018065, 539751, 598524],
    [740778, 961992, 519497, 422893, 645309, 1000034],
    [815635, 40098, 470567, 292473, 456202, 227469],
]


def _golden_layout() -> ProbeLayout:
    g = GOLDEN_LAYOUT
    return ProbeLayout.build(g["fields"], g["probes"], g["table_bits"])


def test_golden_keys_seeds_and_bucket_ids() -> None:
    """Changing any of these changes every checkpoint's meaning: bump HASH_VERSION instead."""
    layout = _golden_layout()
    assert layout.probe_seed.tolist() == GOLDEN_SEEDS
    keys = [[value_key(c), value_key(s), numeric_key(x)] for c, s, x in GOLDEN_ROWS]
    assert keys == GOLDEN_KEYS
    arr = np.array(GOLDEN_KEYS, dtype=np.uint64)
    assert spec_bucket_ids(arr, layout).tolist() == GOLDEN_IDS
    assert bucket_ids_cpu(arr, layout).tolist() == GOLDEN_IDS
    assert hash_buckets(torch.from_numpy(arr.view(np.int64)), layout).tolist() == GOLDEN_IDS


def test_seeds_depend_on_field_name_not_position() -> None:
    a = ProbeLayout.build(["user", "ad"], 2, 16)
    b = ProbeLayout.build(["ad", "user", "new_field"], 2, 16)
    assert a.probe_seed[2:4].tolist() == b.probe_seed[0:2].tolist() == field_seeds("ad", 2)
    assert len(set(b.probe_seed.tolist())) == b.total_probes


# --- twin == spec, bit for bit -------------------------------------------------------------------
@st.composite
def layouts_and_keys(draw: st.DrawFn) -> tuple[ProbeLayout, np.ndarray]:
    n_fields = draw(st.integers(1, 5))
    probes = tuple(draw(st.integers(1, 4)) for _ in range(n_fields))
    layout = ProbeLayout(
        tuple(f"f{i}" for i in range(n_fields)),
        probes,
        draw(st.integers(1, 31)),
        draw(st.integers(0, 2**64 - 1)),
    )
    n = draw(st.integers(0, 20))
    keys = draw(st.lists(st.integers(0, 2**64 - 1), min_size=n * n_fields, max_size=n * n_fields))
    return layout, np.array(keys, dtype=np.uint64).reshape(n, n_fields)


@settings(max_examples=150, deadline=None)
@given(layouts_and_keys(), st.booleans())
def test_twin_equals_spec(case: tuple[ProbeLayout, np.ndarray], as_int64: bool) -> None:
    layout, keys = case
    expected = spec_bucket_ids(keys, layout)
    got = bucket_ids_cpu(keys.view(np.int64) if as_int64 else keys, layout)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    assert (got >= 0).all() and (got < layout.num_buckets).all()


def test_twin_equals_spec_large_random_batch() -> None:
    rng = np.random.default_rng(7)
    layout = ProbeLayout.build([f"C{i}" for i in range(26)], 2, 20)
    keys = rng.integers(0, 2**64, size=(300, 26), dtype=np.uint64)
    np.testing.assert_array_equal(bucket_ids_cpu(keys, layout), spec_bucket_ids(keys, layout))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=70)), max_size=30))
def test_value_keys_twin_equals_spec(values: list[str | None]) -> None:
    assert value_keys(values).tolist() == [value_key(v) for v in values]


def test_value_keys_cover_every_length_branch() -> None:
    values = ["x" * n for n in range(0, 80)]  # 0..79 bytes: every 32/8/4/1-byte tail combination
    assert value_keys(values).tolist() == [xxh64(v.encode()) for v in values]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), max_size=40),
    st.sampled_from([1, 2, 4, 8, 16]),
)
def test_numeric_keys_vectorised_equals_spec(xs: list[float], resolution: int) -> None:
    got = numeric_keys(np.array(xs, dtype=np.float64), resolution).tolist()
    assert got == [numeric_key(x, resolution) for x in xs]


def test_numeric_buckets_are_monotone_and_sign_aware() -> None:
    xs = np.geomspace(1e-3, 1e9, 2000)
    keys = numeric_keys(xs) ^ np.uint64(numeric_key(0.0))  # back to the bucket index q
    q = keys.astype(np.int64)
    assert (np.diff(q) >= 0).all() and q[-1] < 4 * 32
    assert numeric_key(-5.0) != numeric_key(5.0)
    assert numeric_key(float("inf")) == numeric_key(None) == MISSING_KEY


def test_value_keyer_bulk_and_cached_paths_agree() -> None:
    """A training poll (hashed whole) and a serving request (cached) key every kind of value
    the same: absent, None, non-ASCII, empty, non-string."""
    rng = np.random.default_rng(0)
    pool = ["news", "ünïcode", "", "a" * 40, 7, None, 3.5, "日本"]
    rows = []
    for _ in range(600):  # 600 rows x 3 fields >= the bulk threshold
        row = {}
        for f in ("a", "b", "c"):
            if rng.random() < 0.8:
                row[f] = pool[int(rng.integers(len(pool)))]
        rows.append(row)
    bulk = ValueKeyer().columns(rows, ["a", "b", "c"])
    small = ValueKeyer()
    cached = np.concatenate([small.columns(rows[i : i + 10], ["a", "b", "c"]) for i in range(0, 600, 10)])
    want = [[value_key(None if r.get(f) is None else str(r[f])) for f in ("a", "b", "c")] for r in rows]
    assert bulk.tolist() == cached.tolist() == want


def test_value_keyer_caches_and_bounds() -> None:
    keyer = ValueKeyer(max_entries=10)
    vals = [f"v{i % 7}" for i in range(50)] + [None]
    keys = keyer(vals)
    assert keys.tolist() == [value_key(v) for v in vals]
    assert keyer.misses == 7
    keyer([f"new{i}" for i in range(20)])  # overflows: cache cleared, still correct
    assert keyer(["v1"]).tolist() == [value_key("v1")]
    assert len(keyer._cache) <= 10 + 20
    # a batch mixing cached values with enough new ones to overflow: all of it still keyed
    mixed = ["v1", *[f"more{i}" for i in range(12)], "v1"]
    assert keyer(mixed).tolist() == [value_key(v) for v in mixed]


# --- dispatch ----------------------------------------------------------------------------------
def test_dispatch_numpy_and_torch_cpu_agree() -> None:
    layout = ProbeLayout.build(["a", "b"], {"a": 3, "b": 1}, 12)
    keys = np.random.default_rng(1).integers(0, 2**64, size=(64, 2), dtype=np.uint64)
    ids_np = hash_buckets(keys, layout)
    ids_t = hash_buckets(torch.from_numpy(keys.view(np.int64)), layout)
    assert isinstance(ids_t, torch.Tensor) and ids_t.dtype == torch.int32
    np.testing.assert_array_equal(ids_t.numpy(), ids_np)
    with pytest.raises(ValueError):
        bucket_ids_cpu(keys[:, :1], layout)


# --- distribution --------------------------------------------------------------------------------
def test_bucket_load_is_uniform_even_for_sequential_keys() -> None:
    """Chi-square over 4096 buckets for 1M consecutive integer keys (the worst case for a weak mix)."""
    layout = ProbeLayout.build(["f"], 2, 12)
    keys = np.arange(1_000_000, dtype=np.uint64).reshape(-1, 1)
    ids = bucket_ids_cpu(keys, layout)
    for p in range(2):
        counts = np.bincount(ids[:, p], minlength=layout.num_buckets)
        expected = keys.shape[0] / layout.num_buckets
        chi2_per_dof = ((counts - expected) ** 2 / expected).sum() / (layout.num_buckets - 1)
        assert 0.9 < chi2_per_dof < 1.1, chi2_per_dof  # sd of chi2/dof here is ~0.022


def test_probes_collide_independently() -> None:
    """Values that share a bucket on probe 0 almost never share it on probe 1 too."""
    layout = ProbeLayout.build(["f"], 2, 16)
    keys = value_keys([f"value-{i}" for i in range(100_000)]).reshape(-1, 1)
    ids = bucket_ids_cpu(keys, layout).astype(np.int64)
    pair = ids[:, 0] * layout.num_buckets + ids[:, 1]
    both = keys.shape[0] - np.unique(pair).size  # expected C(1e5, 2) / 2**32 ~ 1.2
    single = keys.shape[0] - np.unique(ids[:, 0]).size
    assert single > 10_000 and both <= 10


def test_fields_do_not_share_buckets_for_equal_values() -> None:
    layout = ProbeLayout.build(["a", "b"], 1, 20)
    keys = value_keys([str(i) for i in range(10_000)])
    ids = bucket_ids_cpu(np.stack([keys, keys], 1), layout)
    assert (ids[:, 0] == ids[:, 1]).mean() < 0.001


def test_bucket_helper_masks() -> None:
    assert bucket(1234567, 0, 31) == SPLITMIX64_1234567[0] & ((1 << 31) - 1)


# --- PTX for Hopper --------------------------------------------------------------------------------
def test_compile_ptx_sm90() -> None:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("compile_ptx does not exist under the CUDA simulator")
    try:
        ptx_u64 = compile_ptx((9, 0), "uint64")
        ptx_i64 = compile_ptx((9, 0), "int64")
    except Exception as err:  # only a missing NVRTC is an acceptable reason
        if "nvrtc" in str(err).lower() or "NVRTC" in type(err).__name__:
            pytest.skip(f"NVRTC unavailable: {err}")
        raise
    for ptx in (ptx_u64, ptx_i64):
        assert ".target sm_90" in ptx
        assert ".entry" in ptx
        assert not re.search(r"\bcall(\.uni)?\b", ptx)  # every device helper inlined
