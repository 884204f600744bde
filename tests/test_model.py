"""Model, encoder, sparse optimizer, touched rows, metrics and the OnlineCTR facade."""

from __future__ import annotations

import doctest
import importlib
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ctr.infra.schema import Impression, TrainingExample
from ctr.online_learner.embedding import PerFieldHashEmbedding, UnifiedEmbedding, allocate_field_rows
from ctr.online_learner.encoding import EncodedBatch, FeatureEncoder
from ctr.online_learner.hashing import MISSING_KEY, ProbeLayout, numeric_key, value_key
from ctr.online_learner.learner import OnlineCTR
from ctr.online_learner.metrics import ProgressiveMetrics, roc_auc
from ctr.online_learner.model import CTRModel, ModelConfig
from ctr.online_learner.optim import FlatAdagrad, RowWiseAdagrad, TouchedRows

CAT = ("site", "ad", "device")
NUM = ("price", "hour")


def _config(**kw) -> ModelConfig:
    base = dict(categorical_fields=CAT, numeric_fields=NUM, table_bits=10, chunk_dim=4, mlp_dims=(16, 8))
    return ModelConfig(**{**base, **kw})


def _random_keys(n: int, fields: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64, size=(n, fields), dtype=np.uint64)


# --- shapes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("embedding", "numeric_mode"), list(itertools.product(["unified", "per_field"], ["bucket", "dense"]))
)
def test_forward_shapes(embedding: str, numeric_mode: str) -> None:
    cfg = _config(embedding=embedding, numeric_mode=numeric_mode, probes={"site": 1, "ad": 3})
    model = CTRModel(cfg)
    hashed = len(cfg.hashed_fields)
    keys = _random_keys(7, hashed)
    ids = model.bucket_ids(keys)
    # probes: site 1, ad 3, device 2 (+ price 2, hour 2 when bucketised)
    assert ids.shape == (7, 6 + (4 if numeric_mode == "bucket" else 0)) and ids.dtype == torch.int32
    numeric = torch.randn(7, 2)  # dense: embedded; bucket: the numeric fields' linear term
    assert model.embedding(ids).shape == (7, ids.shape[1] * 4)
    assert model(ids, numeric).shape == (7,)
    lookup = model.embedding.lookup(ids)
    assert lookup.chunks.shape == (7, ids.shape[1], 4)
    assert lookup.rows.is_leaf and lookup.rows.requires_grad and lookup.rows.shape == (lookup.ids.numel(), 4)
    torch.testing.assert_close(lookup.ids, torch.unique(ids.long()))
    torch.testing.assert_close(model.calibrated(model.forward_chunks(lookup.chunks, numeric)), model(ids, numeric))
    # the leaf's grad is the per-row sum of the dense-autograd table gradient
    model.forward_chunks(lookup.chunks, numeric).sum().backward()
    model.zero_grad()
    model.forward_embedded(model.embedding(ids), numeric).sum().backward()
    torch.testing.assert_close(lookup.rows.grad, model.table.grad[lookup.ids])
    assert model.input_dim == 4 * (6 + 4)  # dense numerics are 2 chunks wide too
    assert model.field_names == list(CAT + NUM)


def test_unified_and_per_field_have_the_same_parameter_budget() -> None:
    for probes in (2, {"site": 1, "ad": 3, "device": 2}, {"site": 4}):
        uni = CTRModel(_config(probes=probes, embedding="unified"))
        per = CTRModel(_config(probes=probes, embedding="per_field"))
        assert uni.table.shape == per.table.shape == (1024, 4)
        n_uni = sum(p.numel() for p in uni.parameters())
        n_per = sum(p.numel() for p in per.parameters())
        assert n_uni == n_per
        assert per.embedding.unused_rows == 0


def test_per_field_blocks_are_private() -> None:
    layout = ProbeLayout.build(["a", "b", "c"], {"a": 1, "b": 2, "c": 3}, table_bits=8)
    emb = PerFieldHashEmbedding(layout, 2)
    rows, unused = allocate_field_rows(layout.probes, 256)
    assert sum(r * k for r, k in zip(rows, layout.probes, strict=True)) + unused == 256
    ids = emb.bucket_ids(_random_keys(500, 3)).numpy()
    start = 0
    for f, (r, k) in enumerate(zip(rows, layout.probes, strict=True)):
        cols = ids[:, layout.offsets[f] : layout.offsets[f + 1]]
        assert (cols >= start).all() and (cols < start + r * k).all()
        np.testing.assert_array_equal(np.diff(cols, axis=1), 1)  # k_f consecutive chunk rows
        start += r * k


def test_unified_probes_spread_over_the_whole_table() -> None:
    emb = UnifiedEmbedding(ProbeLayout.build(["a", "b"], 2, table_bits=8), 2)
    ids = emb.bucket_ids(_random_keys(2000, 2)).numpy()
    for col in range(4):
        assert np.unique(ids[:, col]).size > 200  # every probe reaches most of the 256 rows


# --- gates ---------------------------------------------------------------------------------------------
def test_gate_starts_neutral_and_follows_stream_weights() -> None:
    torch.manual_seed(0)
    model = CTRModel(_config()).eval()
    x = model.embedding(model.bucket_ids(_random_keys(32, 5)))
    x0, gate = model.gate(x)
    torch.testing.assert_close(gate, torch.ones_like(gate))
    torch.testing.assert_close(x0, x)
    # a trained gate network: every field's embedding influences every gate
    torch.nn.init.normal_(model.gate.proj.weight, 0.0, 5.0)
    keys = _random_keys(32, 5)
    ids = model.bucket_ids(keys)
    # the network's score: a fresh model's calibrated output is the base rate whatever the features
    num = torch.randn(32, len(NUM))
    before = model.forward_embedded(model.embedding(ids), num)
    assert model.set_field_weights({"ad": 0.0, "nope": 2.0}) == ["nope"]
    assert model.field_weights()["ad"] == 0.0
    assert model.gate.prior.tolist() == pytest.approx([1.25, 0.0, 1.25, 1.25, 1.25])
    after = model.forward_embedded(model.embedding(ids), num)
    assert not torch.allclose(before, after)
    # field "ad" is switched off: changing its values no longer changes the prediction
    keys2 = keys.copy()
    keys2[:, 1] = _random_keys(32, 1, seed=9)[:, 0]
    torch.testing.assert_close(model.forward_embedded(model.embedding(model.bucket_ids(keys2)), num), after)
    # the prior travels with the state dict
    clone = CTRModel(_config())
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone.gate.prior, model.gate.prior)
    # a numeric field switched off: its value no longer counts (bucket and linear term alike)
    model.set_field_weights({NUM[0]: 0.0}, default=1.0)
    with torch.no_grad():
        model.numeric_linear.fill_(1.0)
    other = num.clone()
    other[:, 0] += 10.0
    torch.testing.assert_close(
        model.forward_embedded(model.embedding(ids), other), model.forward_embedded(model.embedding(ids), num)
    )
    with torch.no_grad():
        model.numeric_linear.zero_()
    model.set_field_weights({}, default=1.0)
    torch.testing.assert_close(model.forward_embedded(model.embedding(ids), num), before)


def test_learned_gate_is_trained() -> None:
    learner = OnlineCTR(_config(), seed=0, lr_dense=0.01)
    rows, y, _ = logistic_stream(2048, seed=1)
    for i in range(0, 2048, 256):
        learner.learn_many(rows[i : i + 256], y[i : i + 256])
    assert learner.model.gate.proj is not None and learner.model.gate.proj.weight.abs().sum() > 0
    assert set(learner.learned_gates()) == set(CAT + NUM)


# --- sparse updates ------------------------------------------------------------------------------------
@pytest.mark.parametrize("embedding", ["unified", "per_field"])
def test_sparse_step_touches_only_batch_rows(embedding: str) -> None:
    learner = OnlineCTR(_config(embedding=embedding), seed=0)
    rows, y, _ = logistic_stream(64, seed=2)
    enc = learner.encode(rows)
    ids = learner.model.bucket_ids(enc.keys).reshape(-1).long()
    batch_rows = torch.unique(ids)
    learner.take_touched()
    before = learner.model.table.detach().clone()
    dense_before = {k: v.clone() for k, v in learner.model.dense_state_dict().items()}
    learner.learn_many(enc, y)
    after = learner.model.table.detach()
    untouched = torch.ones(after.shape[0], dtype=torch.bool)
    untouched[batch_rows] = False
    assert torch.equal(after[untouched], before[untouched])  # bit-identical
    changed = (after != before).any(1)
    assert changed[batch_rows].float().mean() > 0.9  # (a row's summed grad may cancel to 0)
    assert not changed[untouched].any()
    np.testing.assert_array_equal(learner.take_touched(), batch_rows.numpy())
    assert learner.take_touched().size == 0
    assert any(not torch.equal(dense_before[k], v) for k, v in learner.model.dense_state_dict().items())


def test_fused_cross_network_gradients() -> None:
    from ctr.online_learner.heads import CrossNetworkV2, _LowRankCrossFn

    torch.manual_seed(0)
    cross = CrossNetworkV2(6, num_layers=3, rank=2).double()
    for p in cross.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(5, 6, dtype=torch.double, requires_grad=True)
    weights = [w for d, u in zip(cross.down, cross.up, strict=True) for w in (d.weight, u.weight, u.bias)]
    assert torch.autograd.gradcheck(lambda x, *w: _LowRankCrossFn.apply(x, *w), (x, *weights))
    with torch.no_grad():  # the inference path (plain ops) computes the same function
        torch.testing.assert_close(cross(x), _LowRankCrossFn.apply(x, *weights))


def test_flat_adagrad_takes_torchs_adagrad_steps_on_the_model() -> None:
    """The flat-buffer optimizer is torch's Adagrad, step for step, on every dense parameter,
    and its parameters stay views of its buffer through backward passes and state loads."""
    torch.manual_seed(0)
    ours, ref = CTRModel(_config()), CTRModel(_config())
    ref.load_state_dict(ours.state_dict())
    flat = FlatAdagrad(ours.dense_parameters(), lr=0.05)
    torch_opt = torch.optim.Adagrad(ref.dense_parameters(), lr=0.05, eps=1e-10)
    start = [p.detach().clone() for p in ours.dense_parameters()]
    ids = ours.bucket_ids(_random_keys(64, 5))
    num = torch.randn(64, len(NUM))
    y = (torch.rand(64) < 0.3).float()
    for _ in range(4):
        for model, opt in ((ours, flat), (ref, torch_opt)):
            opt.zero_grad()
            score = model.forward_embedded(model.embedding(ids), num)  # what the learner trains
            F.binary_cross_entropy_with_logits(score, y, reduction="sum").backward()
            opt.step()
    assert sum(not torch.equal(a, b) for a, b in zip(ours.dense_parameters(), start, strict=True)) > 5
    for a, b in zip(ours.dense_parameters(), ref.dense_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ours.load_state_dict(ref.state_dict())
    buffer = flat.flat.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == buffer for p in ours.dense_parameters())
    assert all(p.grad.untyped_storage().data_ptr() == flat.grad.untyped_storage().data_ptr()
               for p in ours.dense_parameters())
    assert sum(p.numel() for p in ours.dense_parameters()) == flat.flat.numel()


def test_rowwise_adagrad_cpu_kernel_matches_torch_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(50, 4, generator=gen)
    ids = torch.randint(0, 50, (300,), generator=gen)
    grads = torch.randn(300, 4, generator=gen)
    ref = table.clone()
    fast, slow = RowWiseAdagrad(table, lr=0.1), RowWiseAdagrad(ref, lr=0.1)
    for _ in range(3):
        fast.step(ids.int(), grads)
        slow._step_torch(ids, grads)
    torch.testing.assert_close(table, ref)
    torch.testing.assert_close(fast.acc, slow.acc)
    # closed form for one row touched twice: g_total = g1 + g2
    t = torch.zeros(3, 2)
    opt = RowWiseAdagrad(t, lr=1.0, eps=0.0)
    opt.step(torch.tensor([1, 1]), torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    assert opt.acc.tolist() == [0.0, 9.0, 0.0]
    assert t.tolist() == [[0.0, 0.0], [-1.0, -1.0], [0.0, 0.0]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**20 - 1), max_size=300), st.sampled_from([1, 7, 20, 31]))
def test_unique_rows_matches_torch_unique(values: list[int], bits: int) -> None:
    from ctr.online_learner.optim import unique_rows

    ids = torch.tensor([v % (1 << bits) for v in values], dtype=torch.int32)
    uniq, inverse = unique_rows(ids, 1 << bits)
    ref_u, ref_inv = torch.unique(ids.long(), sorted=True, return_inverse=True)
    assert torch.equal(uniq, ref_u) and torch.equal(inverse, ref_inv)


def test_step_unique_equals_step_with_duplicates() -> None:
    from ctr.online_learner.optim import unique_rows

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (500,), generator=gen)
    grads = torch.randn(500, 4, generator=gen)
    a, b = torch.randn(40, 4, generator=gen), None
    b = a.clone()
    opt_a, opt_b = RowWiseAdagrad(a, lr=0.1), RowWiseAdagrad(b, lr=0.1)
    opt_a.step(ids, grads)
    uniq, inverse = unique_rows(ids, 40)
    summed = torch.zeros(uniq.numel(), 4).index_add_(0, inverse, grads)
    opt_b.step_unique(uniq, summed)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(opt_a.acc, opt_b.acc)


def test_touched_rows_is_exact_and_resets() -> None:
    touched = TouchedRows(100)
    touched.add(torch.tensor([[5, 3], [5, 99]]))
    touched.add(np.array([3, 0], dtype=np.int32))
    assert len(touched) == 4
    assert touched.peek().tolist() == [0, 3, 5, 99]
    got = touched.take()
    assert got.dtype == np.int64 and got.tolist() == [0, 3, 5, 99]
    assert touched.take().tolist() == []


# --- encoder -----------------------------------------------------------------------------------------
def test_encoder_impressions_training_examples_and_dicts_agree() -> None:
    cfg = _config(categorical_fields=("site", "user_id", "position"), numeric_fields=("price",))
    enc = FeatureEncoder(cfg)
    imp = Impression(
        event_id="e1",
        event_time_ms=1,
        user_id="u1",
        item_id="i1",
        position=2,
        categorical={"site": "news", "unknown_field": "x"},
        numeric={"price": 3.0, "other": 1.0},
    )
    ex = TrainingExample(example_id="e1", label=1, impression=imp)
    flat = {"site": "news", "user_id": "u1", "position": 2, "price": 3.0, "unknown_field": "x"}
    nested = {"categorical": {"site": "news", "user_id": "u1", "position": "2"}, "numeric": {"price": 3.0}}
    expected = [value_key("news"), value_key("u1"), value_key("2"), numeric_key(3.0)]
    for rows in ([imp], [ex], [flat], [nested]):
        assert enc.encode(rows).keys.tolist() == [expected]
    missing = enc.encode([{"user_id": "u1"}]).keys[0]
    assert int(missing[0]) == MISSING_KEY and int(missing[3]) == MISSING_KEY
    dense = FeatureEncoder(_config(numeric_mode="dense")).encode([{"price": 2.0}, {"hour": "x"}])
    assert dense.keys.shape == (2, 3) and dense.numeric is not None
    assert dense.numeric[0, 0] == 2.0 and math.isnan(dense.numeric[0, 1]) and math.isnan(dense.numeric[1, 1])
    assert FeatureEncoder(cfg, empty_is_missing=True).encode([{"site": ""}]).keys[0, 0] == MISSING_KEY


# --- metrics -----------------------------------------------------------------------------------------
def _pairwise_auc(y: np.ndarray, p: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 20)), min_size=2, max_size=60))
def test_roc_auc_is_exact_with_ties(pairs: list[tuple[int, int]]) -> None:
    y = np.array([a for a, _ in pairs])
    p = np.array([b / 20 for _, b in pairs])
    if y.min() == y.max():
        assert math.isnan(roc_auc(y, p))
    else:
        assert roc_auc(y, p) == pytest.approx(_pairwise_auc(y, p), abs=1e-12)


def test_progressive_metrics_window_and_cumulative() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(10_000)
    y = (rng.random(10_000) < p).astype(int)
    m = ProgressiveMetrics(window=3_000)
    for i in range(0, 10_000, 700):  # batches straddle the ring's wrap-around
        m.update(y[i : i + 700], p[i : i + 700])
    assert m.window_auc() == pytest.approx(roc_auc(y[-3000:], p[-3000:]), abs=1e-12)
    exact = roc_auc(y, p)
    assert abs(m.auc() - exact) <= m.auc_tie_bound + 1e-12 and m.auc_tie_bound < 1e-3
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    assert m.log_loss() == pytest.approx(-np.mean(y * np.log(clipped) + (1 - y) * np.log1p(-clipped)))
    assert m.calibration() == pytest.approx(p.sum() / y.sum())
    assert m.window_calibration() == pytest.approx(p[-3000:].sum() / y[-3000:].sum())
    assert set(m.summary()) >= {"auc", "window_auc", "log_loss", "calibration"}


# --- learning --------------------------------------------------------------------------------------------
def logistic_stream(n: int, seed: int = 0) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """A seeded synthetic click stream with a known logistic truth: per-value effects on three
    Zipf-distributed categorical fields and a non-linear effect of a log-normal price."""
    rng = np.random.default_rng(seed)
    cards = {"site": 30, "ad": 400, "device": 5}
    effects = {f: rng.normal(0, 0.8, c) for f, c in cards.items()}
    cols = {f: rng.zipf(1.3, n) % c for f, c in cards.items()}
    price = rng.lognormal(2.0, 1.0, n)
    hour = rng.integers(0, 24, n).astype(float)
    logit = -1.5 + sum(effects[f][cols[f]] for f in cards) + 0.8 * np.sin(np.log1p(price))
    p = 1.0 / (1.0 + np.exp(-logit))
    y = (rng.random(n) < p).astype(np.int64)
    rows = [
        {
            "site": f"s{cols['site'][i]}",
            "ad": f"a{cols['ad'][i]}",
            "device": f"d{cols['device'][i]}",
            "price": float(price[i]),
            "hour": float(hour[i]),
        }
        for i in range(n)
    ]
    return rows, y, p


@pytest.mark.parametrize("numeric_mode", ["bucket", "dense"])
def test_progressive_auc_approaches_the_oracle(numeric_mode: str) -> None:
    torch.set_num_threads(1)
    n, batch = 40_000, 256
    rows, y, p = logistic_stream(n, seed=0)
    learner = OnlineCTR(_config(numeric_mode=numeric_mode, table_bits=12), lr_table=0.1, seed=0)
    metrics = ProgressiveMetrics(window=10_000)
    for i in range(0, n, batch):
        metrics.update(y[i : i + batch], learner.predict_learn_many(rows[i : i + batch], y[i : i + batch]))
    oracle = roc_auc(y[-10_000:], p[-10_000:])
    assert metrics.auc() > 0.7
    assert metrics.window_auc() > oracle - 0.02, (metrics.window_auc(), oracle)  # measured gap ~0.01
    assert 0.9 < metrics.window_calibration() < 1.1


def test_predict_then_learn_equals_separate_calls_and_checkpoint_round_trip() -> None:
    rows, y, _ = logistic_stream(512, seed=3)
    a = OnlineCTR(_config(), seed=0)
    b = OnlineCTR(_config(), seed=0)
    for i in range(0, 512, 128):
        batch, labels = rows[i : i + 128], y[i : i + 128]
        # a poll is learned in updates of step_size() examples, each predicted before its update
        p_sep, j = [], 0
        while j < 128:
            k = a.step_size()
            p_sep.append(a.predict_proba_many(batch[j : j + k]))
            a.learn_many(batch[j : j + k], labels[j : j + k])
            j += k
        p_fused = b.predict_learn_many(batch, labels)
        np.testing.assert_allclose(np.concatenate(p_sep), p_fused, rtol=1e-5, atol=1e-6)
    restored = OnlineCTR.from_state_dict(a.state_dict(), seed=123)
    enc = a.encode(rows[:64])
    assert isinstance(enc, EncodedBatch)
    np.testing.assert_array_equal(restored.predict_proba_many(enc), a.predict_proba_many(enc))
    restored.learn_many(enc, y[:64])
    a.learn_many(enc, y[:64])
    torch.testing.assert_close(restored.model.table, a.model.table)
    with pytest.raises(ValueError):
        OnlineCTR(_config(table_bits=11)).load_state_dict(a.state_dict())


# --- runnable docstrings --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "module",
    ["hashing", "embedding", "gates", "heads", "model", "encoding", "optim", "metrics", "learner"],
)
def test_docstring_examples_run(module: str) -> None:
    mod = importlib.import_module(f"online_learner.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
