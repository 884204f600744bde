"""River-style facade: an online CTR learner with ``predict_proba_many`` / ``learn_many``.

Progressive use (predict each batch before learning from it)::

    p = learner.predict_learn_many(batch, labels)   # one forward pass: p is pre-update
    metrics.update(labels, p)

which is equivalent to ``p = predict_proba_many(batch); learn_many(batch, labels)`` at half
the cost. ``batch`` is a sequence of Impressions / TrainingExamples / dict rows, or an
:class:`~online_learner.encoding.EncodedBatch` already encoded once (e.g. by the trainer).

What a trainer / delta publisher needs (the Kafka parts live elsewhere):

* ``model.table`` -- the ``[num_rows, chunk_dim]`` embedding table; ``take_touched()`` -- sorted
  int64 ids of the rows updated since the last call; ``model.dense_state_dict()`` -- the rest;
* ``state_dict()`` / ``load_state_dict()`` -- config + model + optimizer state (checkpoints);
* ``set_field_weights({...})`` -- the stream's published field weights.

>>> learner = OnlineCTR(categorical_fields=["site", "ad"], numeric_fields=["price"], table_bits=10, seed=0)
>>> rows = [{"site": "news", "ad": "a1", "price": 1.0}, {"site": "blog", "ad": "a2", "price": 9.0}]
>>> p = learner.predict_proba_many(rows)
>>> p.shape, bool(((p > 0) & (p < 1)).all())
((2,), True)
>>> loss = learner.learn_many(rows, [1, 0])
>>> touched = learner.take_touched()
>>> len(touched) <= 2 * 3 * 2, learner.take_touched().size
(True, 0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from online_learner.encoding import EncodedBatch, FeatureEncoder
from online_learner.hashing import ValueKeyer
from online_learner.model import CTRModel, ModelConfig
from online_learner.optim import RowWiseAdagrad, TouchedRows, dense_optimizer

__all__ = ["OnlineCTR"]


class OnlineCTR:
    """Online unified-embedding CTR learner (predict-then-learn).

    Args:
        config: a full :class:`ModelConfig`; or pass its fields as keyword arguments
            (``categorical_fields``, ``numeric_fields``, ``table_bits``, ``chunk_dim``,
            ``probes``, ...).
        lr_table: row-wise Adagrad learning rate of the embedding table.
        lr_dense: Adam learning rate of everything else.
        device: ``"cpu"``, ``"cuda"``... (default: CUDA if available). On CUDA the hash runs as
            the Numba-CUDA kernel on torch's stream.
        seed: torch seed for the initial weights.
        num_threads: ``torch.set_num_threads`` (None leaves it alone).
        empty_is_missing: treat ``""`` categorical values as missing.
        keyer: a shared string-key cache (e.g. one per process across learners).

    Threading: one thread trains; ``take_touched()`` may be called from another thread, but read
    rows (``table_rows``) between steps -- a step updates the table in place.
    """

    def __init__(
        self,
        config: ModelConfig | None = None,
        *,
        lr_table: float = 0.05,
        lr_dense: float = 1e-3,
        device: str | torch.device | None = None,
        seed: int | None = None,
        num_threads: int | None = None,
        empty_is_missing: bool = False,
        keyer: ValueKeyer | None = None,
        **config_kwargs: Any,
    ) -> None:
        if config is None:
            config = ModelConfig(**config_kwargs)
        elif config_kwargs:
            raise TypeError("pass either config or its fields as keyword arguments, not both")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if seed is not None:
            torch.manual_seed(seed)
        self.config = config
        self.model = CTRModel(config).to(self.device)
        self.encoder = FeatureEncoder(config, keyer, empty_is_missing)
        self.table_optimizer = RowWiseAdagrad(self.model.table, lr=lr_table)
        self.dense_optimizer = dense_optimizer(self.model.dense_parameters(), lr=lr_dense)
        self.touched = TouchedRows(self.model.embedding.num_rows, self.device)
        self.examples_seen = 0

    # -- inputs ---------------------------------------------------------------------------------
    def encode(self, batch: Sequence[Any] | EncodedBatch) -> EncodedBatch:
        """Rows -> :class:`EncodedBatch` (pass-through if already encoded)."""
        return batch if isinstance(batch, EncodedBatch) else self.encoder.encode(batch)

    def _inputs(self, enc: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        keys = torch.from_numpy(enc.keys.view(np.int64))
        if self.device.type != "cpu":
            keys = keys.to(self.device, non_blocking=True)
        ids = self.model.bucket_ids(keys)  # [B, P] int32, hashed where the keys are
        numeric = None
        if enc.numeric is not None:
            numeric = torch.from_numpy(enc.numeric).to(self.device)
        return ids, numeric

    # -- River-style API -----------------------------------------------------------------------
    @torch.no_grad()
    def predict_proba_many(self, batch: Sequence[Any] | EncodedBatch) -> np.ndarray:
        """Click probabilities ``[B]`` (float32), no learning."""
        enc = self.encode(batch)
        if len(enc) == 0:
            return np.zeros(0, dtype=np.float32)
        self.model.eval()
        ids, numeric = self._inputs(enc)
        return torch.sigmoid(self.model(ids, numeric)).cpu().numpy()

    def learn_many(self, batch: Sequence[Any] | EncodedBatch, labels: Sequence[int] | np.ndarray) -> float:
        """One sparse training step on the batch; returns the mean log loss before the step."""
        return self._step(self.encode(batch), labels)[1]

    def predict_learn_many(self, batch: Sequence[Any] | EncodedBatch, labels: Sequence[int] | np.ndarray) -> np.ndarray:
        """Progressive step: the pre-update probabilities ``[B]``, then learn from the batch."""
        return self._step(self.encode(batch), labels)[0]

    def _step(self, enc: EncodedBatch, labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, float]:
        n = len(enc)
        y = torch.as_tensor(np.asarray(labels, dtype=np.float32)).to(self.device)
        if y.shape != (n,):
            raise ValueError(f"expected {n} labels, got shape {tuple(y.shape)}")
        if n == 0:
            return np.zeros(0, dtype=np.float32), float("nan")
        model = self.model
        model.train()
        ids, numeric = self._inputs(enc)
        lookup = model.embedding.lookup(ids)  # unique rows [U, c] as a leaf; chunks [B, P, c]
        logits = model.forward_chunks(lookup.chunks, numeric)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        self.dense_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.dense_optimizer.step()
        self.table_optimizer.step_unique(lookup.ids, lookup.rows.grad)  # grad: summed per row
        self.touched.add(lookup.ids)
        self.examples_seen += n
        return torch.sigmoid(logits.detach()).cpu().numpy(), float(loss.detach())

    # -- field weights / publishing ---------------------------------------------------------------
    def set_field_weights(self, weights: Mapping[str, float], default: float | None = None) -> list[str]:
        """Apply the stream's field weights (by field name); returns unknown names."""
        return self.model.set_field_weights(weights, default)

    def field_weights(self) -> dict[str, float]:
        return self.model.field_weights()

    def learned_gates(self) -> dict[str, float]:
        return self.model.learned_gates()

    def take_touched(self) -> np.ndarray:
        """Sorted unique int64 table rows updated since the last call (resets)."""
        return self.touched.take()

    def table_rows(self, ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """Current values ``[len(ids), chunk_dim]`` of table rows (e.g. the touched ones)."""
        idx = torch.as_tensor(np.asarray(ids, dtype=np.int64)).to(self.device)
        return self.model.table.detach().index_select(0, idx).cpu().numpy()

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "table_optimizer": self.table_optimizer.state_dict(),
            "dense_optimizer": self.dense_optimizer.state_dict(),
            "examples_seen": self.examples_seen,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if ModelConfig.from_dict(state["config"]) != self.config:
            raise ValueError("checkpoint config differs from this learner's config")
        self.model.load_state_dict(state["model"])
        self.table_optimizer.load_state_dict(state["table_optimizer"])
        self.dense_optimizer.load_state_dict(state["dense_optimizer"])
        self.examples_seen = int(state["examples_seen"])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], **kwargs: Any) -> OnlineCTR:
        learner = cls(ModelConfig.from_dict(state["config"]), **kwargs)
        learner.load_state_dict(state)
        return learner
