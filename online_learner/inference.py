"""The model's inference forward in NumPy, over the version's own parameter memory.

Serving scores a batch of a few to a few thousand candidates per call. At that size torch's
per-op dispatch and ``nn.Module`` call overhead outweigh the arithmetic; the same forward as a
dozen NumPy calls on zero-copy views of the parameters (``Tensor.numpy()``) has a fraction of
that fixed cost and the same BLAS matrix products (``bench/inference.py`` times both). ``tests/test_inference.py``
checks this twin against :meth:`CTRModel.forward` for every model shape the config allows.

A :class:`NumpyForward` reads scalars (calibration, base rate) and derived vectors (the field
prior per column) when it is built: it belongs to one immutable :class:`ModelVersion` and must
be rebuilt for another (serving's registry recycles model objects between versions).

>>> import torch
>>> from ctr.online_learner.encoding import FeatureEncoder
>>> from ctr.online_learner.model import CTRModel, ModelConfig
>>> model = CTRModel(ModelConfig(("site", "ad"), ("price",), table_bits=10)).eval()
>>> enc = FeatureEncoder(model.config).encode([{"categorical": {"site": "a", "ad": "x"}, "numeric": {"price": 3.0}}])
>>> with torch.no_grad():
...     ref = torch.sigmoid(model(model.bucket_ids(enc.keys), torch.from_numpy(enc.numeric))).numpy()
>>> bool(np.allclose(NumpyForward(model)(enc.keys, enc.numeric), ref, atol=1e-6))
True
"""

from __future__ import annotations

import numpy as np

from ctr.online_learner.model import CTRModel


def _np(t: object) -> np.ndarray:
    """A zero-copy float32 view of a parameter or buffer."""
    return t.detach().numpy()  # type: ignore[attr-defined]


def _signed_log1p(x: np.ndarray) -> np.ndarray:
    """``sign(x) log1p|x|``, missing (NaN / inf) as 0 (``embedding.signed_log1p``)."""
    x = np.where(np.isfinite(x), x, np.float32(0.0))
    return np.sign(x) * np.log1p(np.abs(x))


class NumpyForward:
    """``keys [B, H] uint64`` (+ ``numeric [B, F_num]``) -> click probabilities ``[B]`` float32,
    the computation of ``sigmoid(model(model.bucket_ids(keys), numeric))`` in eval mode."""

    def __init__(self, model: CTRModel) -> None:
        cfg = model.config
        self._model = model  # keeps the parameter memory alive; bucket ids through its layout
        self.chunk_dim = cfg.chunk_dim
        self.table = _np(model.embedding.table)  # [rows, c]
        gate = model.gate
        prior = _np(gate.prior).astype(np.float32)  # [F]
        widths = list(model.embedding.field_widths)
        if model.numeric is not None:
            widths += [model.numeric.width] * model.numeric.num_fields
        field_of_col = np.repeat(np.arange(len(widths)), widths)  # [D]
        self.field_of_col = field_of_col
        # the learned-gate-free path scales each column once by its field's prior (None: all 1)
        self.col_prior = None if gate._neutral_prior else prior[field_of_col]
        self.gate_w = _np(gate.proj.weight) if gate.proj is not None else None  # [F, D]
        self.gate_b = _np(gate.proj.bias) if gate.proj is not None else None
        self.first_order = cfg.first_order
        self.wide_w = (prior[_np(model.probe_field)] * np.float32(model.first_order_scale)).astype(np.float32)
        self.linear = None
        if model.numeric_linear is not None:
            self.linear = (_np(model.numeric_linear) * prior[_np(model.numeric_field)]).astype(np.float32)
        dense = model.numeric
        self.dense = None if dense is None else (_np(dense.weight), _np(dense.bias), _np(dense.missing))
        head = model.head
        cross = [] if head.cross is None else zip(head.cross.down, head.cross.up, strict=True)
        self.cross = [(_np(down.weight), _np(up.weight), _np(up.bias)) for down, up in cross]
        self.out_cross = _np(head.out_cross.weight)[0] if head.out_cross is not None else None
        self.mlp = [(_np(m.weight), _np(m.bias)) for m in head.deep if hasattr(m, "weight")]
        self.out_w = _np(head.out_deep.weight)[0]
        self.out_b = float(_np(head.out_deep.bias)[0])
        a, b = model.calibration.coefficients()
        self.a = np.float32(a)
        self.offset = np.float32(float(model.base_rate.log_odds()) + b)

    def __call__(self, keys: np.ndarray, numeric: np.ndarray | None = None) -> np.ndarray:
        n = len(keys)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        ids = self._model.bucket_ids(keys).numpy()  # [B, P]
        emb = np.take(self.table, ids, axis=0).reshape(n, -1)  # [B, P * c] (take: ~10x fancy indexing)
        score = np.zeros(n, dtype=np.float32)
        if self.first_order:
            score += emb[:, :: self.chunk_dim] @ self.wide_w
        if self.linear is not None or self.dense is not None:
            if numeric is None:
                raise ValueError("this model reads numeric values: pass numeric [B, F_num]")
            num = numeric.astype(np.float32, copy=False)
            log_num = _signed_log1p(num)
        if self.linear is not None:
            score += log_num @ self.linear
        x = emb
        if self.dense is not None:
            w, bias, missing = self.dense
            e = log_num[:, :, None] * w + bias
            e = np.where(np.isfinite(num)[:, :, None], e, missing)
            x = np.concatenate([x, e.reshape(n, -1)], axis=1)
        if self.col_prior is not None:
            x = x * self.col_prior
        if self.gate_w is not None:
            learned = 2.0 / (1.0 + np.exp(-(x @ self.gate_w.T + self.gate_b)))  # [B, F]
            x = x * learned[:, self.field_of_col]
        deep = x
        for w, bias in self.mlp:
            deep = np.maximum(deep @ w.T + bias, 0.0)
        logit = deep @ self.out_w + self.out_b
        if self.cross:
            xl = x
            for down, up, bias in self.cross:
                xl = xl + x * ((xl @ down.T) @ up.T + bias)
            logit = logit + xl @ self.out_cross
        z = self.offset + self.a * (logit + score)
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
