"""The CTR model: hashed field embeddings -> field gates -> DCN-V2 head -> one logit per example.

::

    keys [B, H] uint64 ──hash──► ids [B, P] int32 ──table──► [B, P*c] ─┐
    numeric [B, F_num] (dense mode) ──DenseNumericEmbedding──► [B, F_num*w] ─┴► x [B, D]
    x ──FieldGate (learned x stream prior)──► x0 [B, D] ──DCNv2Head──► deep score [B]
    first float of each chunk [B, P] + numeric [B, F_num] ──linear──► wide score [B]
    base-rate log-odds + calibration(deep + wide) ──► logits [B]

``H`` hashed fields are the categorical fields, plus the numeric fields when
``numeric_mode="bucket"``; ``P = sum_f k_f`` probes; ``D`` = sum of field widths.

Numeric fields, two modes (both implemented; ``bench/learner_core.py`` measures both):

* ``"bucket"`` (default): ``numeric_key`` = log2-octave bucket of ``1+|x|`` with 4 linear
  sub-buckets, hashed into the SAME unified table like any categorical value. One code path,
  one table (the delta publisher ships numerics like everything else), a free non-linear
  response per bucket, and exact, platform-stable bucketing (see :mod:`ctr.online_learner.hashing`).
* ``"dense"``: ``sign(x) log1p|x|`` times a learned vector per field (AutoInt-style). Smooth in
  ``x`` and cheaper, but only monotone in ``x`` before the head's non-linearity.

In both modes ``numeric_linear`` adds ``sign(x) log1p|x|`` times one weight per field to the
wide score: a bucket's own weights learn only from the examples that land in that bucket,
the linear term from every example, which is what a linear model (VW) reads from a count
and why it learned faster than we did on a small Criteo log (``ctr bench quality``).

>>> cfg = ModelConfig(categorical_fields=("site", "ad"), numeric_fields=("price",), table_bits=10)
>>> model = CTRModel(cfg)
>>> keys = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint64)
>>> price = torch.tensor([[1.5], [float("nan")]])  # [B, F_num], NaN = missing
>>> model(model.bucket_ids(keys), price).shape
torch.Size([2])
>>> model.field_names
['site', 'ad', 'price']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ctr.online_learner.embedding import (
    DenseNumericEmbedding,
    HashedChunkTable,
    PerFieldHashEmbedding,
    UnifiedEmbedding,
    signed_log1p,
)
from ctr.online_learner.gates import FieldGate
from ctr.online_learner.hashing import HASH_VERSION, ProbeLayout
from ctr.online_learner.heads import DCNv2Head
from ctr.online_learner.prior import ClickRatePrior, OnlineCalibration

__all__ = ["CTRModel", "ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """Everything that shapes the model (and its file format). JSON-able via :meth:`to_dict`.

    Attributes:
        categorical_fields: field names hashed into the table, in order.
        numeric_fields: numeric field names.
        table_bits: the table has ``2**table_bits`` rows of ``chunk_dim`` floats.
        chunk_dim: width ``c`` of one chunk.
        probes: ``k_f`` for all fields (int) or per field (mapping; others get ``default_probes``).
        numeric_mode: ``"bucket"`` (hashed into the table) or ``"dense"``.
        numeric_resolution: sub-buckets per octave in bucket mode (a power of two).
        embedding: ``"unified"`` or ``"per_field"`` (baseline, same budget).
        gate: learn a FinalMLP-style field gate (the stream prior is always applied).
        gate_stop_gradient: the gate network's input is detached (see :class:`FieldGate`).
        prior_strength: exponent on the normalised stream field weights.
        cross_layers, cross_rank, mlp_dims: DCN-V2 head.
        hash_seed: salt of every field seed (a different seed = a different model file format).
        init_std: embedding init scale.
        base_rate_horizon: decay horizon of the counted click rate whose log-odds offsets the logit.
    """

    categorical_fields: tuple[str, ...]
    numeric_fields: tuple[str, ...] = ()
    table_bits: int = 20
    chunk_dim: int = 4
    probes: int | Mapping[str, int] = 2
    default_probes: int = 2
    numeric_mode: Literal["bucket", "dense"] = "bucket"
    numeric_resolution: int = 4
    embedding: Literal["unified", "per_field"] = "unified"
    gate: bool = True
    gate_stop_gradient: bool = True
    prior_strength: float = 1.0
    cross_layers: int = 2
    cross_rank: int = 16
    # (64, 32): on the Criteo-shaped bench stream (128, 64) gave the same progressive AUC
    # (+-0.0005) at ~15 % lower examples/s on 2 CPU cores.
    mlp_dims: tuple[int, ...] = (64, 32)
    hash_seed: int = 0
    init_std: float = 0.01
    #: Examples over which the click-rate prior (the logit's offset) forgets; see
    #: :mod:`ctr.online_learner.prior`.
    base_rate_horizon: float = 200_000.0
    #: Add a first-order (linear) term: the first float of each chunk, summed, times
    #: ``first_order_scale / sqrt(hashed fields)``.
    first_order: bool = True
    first_order_scale: float = 1.0
    #: Add a linear term on each numeric field's value, ``sign(x) log1p|x|`` times a weight per
    #: field (bucket mode too): what a linear model reads from a count, available from the first
    #: examples, where a bucket's own weights need clicks in that bucket.
    numeric_linear: bool = True
    #: Starting trust ``a`` of the online calibration and its prior precision.
    calibration_a0: float = 0.0
    calibration_precision: tuple[float, float] = (10.0, 1000.0)
    hash_version: str = field(default=HASH_VERSION)

    def __post_init__(self) -> None:
        object.__setattr__(self, "categorical_fields", tuple(self.categorical_fields))
        object.__setattr__(self, "numeric_fields", tuple(self.numeric_fields))
        object.__setattr__(self, "mlp_dims", tuple(self.mlp_dims))
        object.__setattr__(self, "calibration_precision", tuple(self.calibration_precision))
        if isinstance(self.probes, Mapping):
            object.__setattr__(self, "probes", dict(self.probes))
        if self.numeric_mode not in ("bucket", "dense"):
            raise ValueError("numeric_mode must be 'bucket' or 'dense'")
        if self.embedding not in ("unified", "per_field"):
            raise ValueError("embedding must be 'unified' or 'per_field'")
        r = self.numeric_resolution
        if r < 1 or r & (r - 1):
            raise ValueError("numeric_resolution must be a power of two")
        if self.hash_version != HASH_VERSION:
            raise ValueError(f"model hashed with {self.hash_version!r}, this code implements {HASH_VERSION!r}")
        names = self.categorical_fields + self.numeric_fields
        if len(set(names)) != len(names):
            raise ValueError("field names must be unique across categorical and numeric fields")

    @property
    def hashed_fields(self) -> tuple[str, ...]:
        """Fields whose keys go through the hash (categorical, + numeric in bucket mode)."""
        return self.categorical_fields + (self.numeric_fields if self.numeric_mode == "bucket" else ())

    @property
    def dense_fields(self) -> tuple[str, ...]:
        return self.numeric_fields if self.numeric_mode == "dense" else ()

    def probes_of(self, name: str) -> int:
        if isinstance(self.probes, Mapping):
            return int(self.probes.get(name, self.default_probes))
        return int(self.probes)

    def layout(self) -> ProbeLayout:
        fields = self.hashed_fields
        return ProbeLayout(fields, tuple(self.probes_of(f) for f in fields), self.table_bits, self.hash_seed)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["categorical_fields"] = list(self.categorical_fields)
        d["numeric_fields"] = list(self.numeric_fields)
        d["mlp_dims"] = list(self.mlp_dims)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class CTRModel(nn.Module):
    """Unified-embedding CTR model. See the module docstring for the data flow.

    Submodules: ``embedding`` (:class:`UnifiedEmbedding` or :class:`PerFieldHashEmbedding`),
    ``numeric`` (:class:`DenseNumericEmbedding` or None), ``gate`` (:class:`FieldGate`),
    ``head`` (:class:`DCNv2Head`).
    """

    # buffers (register_buffer): declared so they type as Tensor, not as nn.Module.__getattr__'s union
    probe_field: Tensor
    numeric_field: Tensor  # registered only with the numeric linear term

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        layout = config.layout()
        table_cls = UnifiedEmbedding if config.embedding == "unified" else PerFieldHashEmbedding
        self.embedding: HashedChunkTable = table_cls(layout, config.chunk_dim, config.init_std)
        widths = list(self.embedding.field_widths)
        dense = config.dense_fields
        self.numeric: DenseNumericEmbedding | None = None
        if dense:
            width = max(config.probes_of(f) for f in dense) * config.chunk_dim
            self.numeric = DenseNumericEmbedding(len(dense), width, config.init_std)
            widths += [width] * len(dense)
        self.input_dim = sum(widths)
        self.field_names = list(config.hashed_fields) + list(dense)
        self.gate = FieldGate(
            self.input_dim, widths, self.field_names, config.gate, config.prior_strength, config.gate_stop_gradient
        )
        self.head = DCNv2Head(self.input_dim, config.cross_layers, config.cross_rank, config.mlp_dims)
        self.base_rate = ClickRatePrior(config.base_rate_horizon)
        self.first_order_scale = float(config.first_order_scale) / len(config.hashed_fields) ** 0.5
        #: field index of each probe ``[P]`` (the first-order term's field prior)
        probe_field = [f for f, name in enumerate(config.hashed_fields) for _ in range(config.probes_of(name))]
        self.register_buffer("probe_field", torch.tensor(probe_field, dtype=torch.int64), persistent=False)
        #: per numeric field: the weight of its linear term ``[F_num]`` (None: off)
        self.numeric_linear: nn.Parameter | None = None
        if config.numeric_linear and config.numeric_fields:
            self.numeric_linear = nn.Parameter(torch.zeros(len(config.numeric_fields)))
            numeric_field = [self.field_names.index(f) for f in config.numeric_fields]
            self.register_buffer("numeric_field", torch.tensor(numeric_field, dtype=torch.int64), persistent=False)
        self.calibration = OnlineCalibration(
            config.calibration_a0, config.calibration_precision, config.base_rate_horizon
        )

    # -- inputs --------------------------------------------------------------------------
    def bucket_ids(self, keys: np.ndarray | Tensor) -> Tensor:
        """uint64 keys ``[B, H]`` -> int32 row ids ``[B, P]`` (GPU kernel for CUDA tensors)."""
        return self.embedding.bucket_ids(keys)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, ids: Tensor, numeric: Tensor | None = None) -> Tensor:
        """Row ids ``[B, P]`` (+ dense numerics ``[B, F_num]``) -> calibrated logits ``[B]``."""
        return self.calibrated(self.forward_embedded(self.embedding(ids), numeric))

    def forward_chunks(self, chunks: Tensor, numeric: Tensor | None = None) -> Tensor:
        """Table rows per probe ``[B, P, c]`` (``embedding.lookup(ids).chunks``) -> scores ``[B]``."""
        return self.forward_embedded(chunks.flatten(1), numeric)

    def calibrated(self, score: Tensor) -> Tensor:
        """Network scores ``[B]`` -> logits ``[B]``: ``base-rate log-odds + b + a * score``."""
        return self.calibration(score, self.base_rate.log_odds())

    def forward_embedded(self, emb: Tensor, numeric: Tensor | None = None) -> Tensor:
        """Hashed field embeddings ``[B, P*c]`` (+ numerics) -> the network's score ``[B]``
        (what the features add to the base rate's log-odds, before calibration)."""
        score = None
        if self.config.first_order:
            # the first float of every chunk doubles as a hashed linear weight (the "wide" part
            # of wide & deep, VW's model): learned directly by the table's per-row Adagrad, it
            # picks up a value's own click rate from its first clicks, before the deep path has
            # learned to read the embeddings
            # (times the stream's field prior, so a field switched off is off here too)
            wide = emb[:, :: self.config.chunk_dim] * self.gate.prior[self.probe_field]
            score = wide.sum(1) * self.first_order_scale
        if (self.numeric is not None or self.numeric_linear is not None) and numeric is None:
            raise ValueError("this model reads numeric values: pass numeric [B, F_num]")
        if self.numeric_linear is not None:
            assert numeric is not None  # raised above otherwise
            linear = signed_log1p(numeric) @ (self.numeric_linear * self.gate.prior[self.numeric_field])
            score = linear if score is None else score + linear
        if self.numeric is not None:
            emb = torch.cat([emb, self.numeric(numeric)], dim=1)
        x0, _ = self.gate(emb)
        deep = self.head(x0)
        return deep if score is None else deep + score

    # -- field weights / parameters --------------------------------------------------------
    def set_field_weights(self, weights: Mapping[str, float], default: float | None = None) -> list[str]:
        """Apply the stream's published field weights (see :mod:`ctr.online_learner.gates`)."""
        return self.gate.set_field_weights(weights, default)

    def field_weights(self) -> dict[str, float]:
        return dict(zip(self.field_names, self.gate.field_weights.tolist(), strict=True))

    def learned_gates(self) -> dict[str, float]:
        """Running mean of the learned gate per field (1 = neutral)."""
        return dict(zip(self.field_names, self.gate.learned_mean.tolist(), strict=True))

    @property
    def table(self) -> nn.Parameter:
        """The embedding table ``[num_rows, chunk_dim]`` (sparse-updated)."""
        return self.embedding.table

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter except the embedding table (dense optimizer)."""
        return [p for n, p in self.named_parameters() if n != "embedding.table"]

    def dense_state_dict(self) -> dict[str, Tensor]:
        """``state_dict`` without the table: what a delta ships besides the touched rows."""
        return {k: v for k, v in self.state_dict().items() if k != "embedding.table"}
