"""The NumPy inference forward is the model's forward: every model shape, random parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctr.online_learner.encoding import FeatureEncoder
from ctr.online_learner.inference import NumpyForward
from ctr.online_learner.model import CTRModel, ModelConfig
from ctr.online_learner.trainer import DEFAULT_MODEL_OPTIONS

CAT = ("site", "ad", "user_id", "item_id", "position")
NUM = ("price", "count")
SHAPES = {
    "config defaults": {},
    "ctr learn defaults": dict(DEFAULT_MODEL_OPTIONS),
    "dense numerics": {"numeric_mode": "dense"},
    "per-field tables": {"embedding": "per_field"},
    "no first-order, no numeric linear": {"first_order": False, "numeric_linear": False},
    "cross, no gate, three probes": {"gate": False, "cross_layers": 3, "default_probes": 3},
    "no MLP": {"mlp_dims": ()},
}


def _rows(n: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    for i in range(n):
        num = {"price": float(rng.normal() * 100), "count": float("nan") if i % 3 == 0 else float(rng.integers(9))}
        if i % 4 == 0:
            del num["price"]  # absent: NaN in the encoded batch
        rows.append({"categorical": {f: f"{f}-{rng.integers(50)}" for f in CAT if rng.random() > 0.1}, "numeric": num})
    return rows


def _model(opts: dict, numeric: tuple[str, ...] = NUM) -> CTRModel:
    torch.manual_seed(0)
    model = CTRModel(ModelConfig(CAT, numeric, **{"table_bits": 10, **opts})).eval()
    with torch.no_grad():  # move every parameter off its (often zero) start
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        model.calibration.coef.copy_(torch.tensor([0.8, -0.3]))
        model.base_rate.counts.add_(torch.tensor([3.0, 500.0], dtype=model.base_rate.counts.dtype))
    return model


def _reference(model: CTRModel, keys: np.ndarray, numeric: np.ndarray | None) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(numeric) if numeric is not None else None
        return torch.sigmoid(model(model.bucket_ids(keys), x)).numpy()


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("field_weights", [None, {"site": 0.0, "ad": 3.0, "price": 0.5}])
def test_numpy_forward_matches_the_model(shape, field_weights):
    model = _model(SHAPES[shape])
    if field_weights:
        model.set_field_weights(field_weights)
    enc = FeatureEncoder(model.config).encode(_rows(300, np.random.default_rng(1)))
    got = NumpyForward(model)(enc.keys, enc.numeric)
    want = _reference(model, enc.keys, enc.numeric)
    assert got.dtype == np.float32 and got.shape == (300,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert want.std() > 1e-3  # the parameters moved: a comparison of constants would prove nothing


def test_no_numeric_fields_and_empty_batches():
    model = _model({}, numeric=())
    enc = FeatureEncoder(model.config).encode(_rows(20, np.random.default_rng(2)))
    fw = NumpyForward(model)
    np.testing.assert_allclose(fw(enc.keys, None), _reference(model, enc.keys, None), rtol=1e-5, atol=1e-7)
    assert fw(enc.keys[:0], None).shape == (0,)


def test_a_model_that_reads_numerics_refuses_none():
    model = _model({})
    enc = FeatureEncoder(model.config).encode(_rows(2, np.random.default_rng(3)))
    with pytest.raises(ValueError, match="numeric"):
        NumpyForward(model)(enc.keys, None)


def test_built_once_per_version_parameters_read_at_build():
    """Scalars are read when the forward is built: a later change to the model is not seen
    (serving builds one per immutable version)."""
    model = _model(dict(DEFAULT_MODEL_OPTIONS))
    enc = FeatureEncoder(model.config).encode(_rows(5, np.random.default_rng(4)))
    fw = NumpyForward(model)
    before = fw(enc.keys, enc.numeric)
    with torch.no_grad():
        model.calibration.coef.copy_(torch.tensor([0.1, 2.0]))
    np.testing.assert_array_equal(fw(enc.keys, enc.numeric), before)
    np.testing.assert_allclose(NumpyForward(model)(enc.keys, enc.numeric), _reference(model, enc.keys, enc.numeric),
                               rtol=1e-5, atol=1e-7)
