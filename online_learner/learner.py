"""River-style facade: an online CTR learner with ``predict_proba_many`` / ``learn_many``.

The logit is ``log_odds(running click rate) + b + a * f(x)`` (:mod:`ctr.online_learner.prior`):
a fresh learner predicts the running click rate from the first event at any click rate, the
network ``f`` learns what the features add to it, and ``(a, b)`` calibrate ``f`` on examples
it had not yet learned from. A batch is learned in updates sized by what has arrived so far
(:meth:`OnlineCTR.step_size`), with summed per-example gradients and per-coordinate adaptive
rates, so a poll of 2,048 examples at the start of a stream is not one step but many.

Progressive use (predict each batch before learning from it)::

    p = learner.predict_learn_many(batch, labels)   # one forward pass: p is pre-update
    metrics.update(labels, p)

which is equivalent to ``p = predict_proba_many(batch); learn_many(batch, labels)`` at half
the cost. ``batch`` is a sequence of Impressions / TrainingExamples / dict rows, or an
:class:`~ctr.online_learner.encoding.EncodedBatch` already encoded once (e.g. by the trainer).

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

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ctr.online_learner.encoding import EncodedBatch, FeatureEncoder
from ctr.online_learner.hashing import ValueKeyer
from ctr.online_learner.model import CTRModel, ModelConfig
from ctr.online_learner.optim import RowWiseAdagrad, TouchedRows, dense_optimizer
from ctr.online_learner.prior import CompleteCohorts

__all__ = ["OnlineCTR"]


class OnlineCTR:
    """Online unified-embedding CTR learner (predict-then-learn).

    Args:
        config: a full :class:`ModelConfig`; or pass its fields as keyword arguments
            (``categorical_fields``, ``numeric_fields``, ``table_bits``, ``chunk_dim``,
            ``probes``, ...).
        lr_table: row-wise Adagrad learning rate of the embedding table.
        lr_dense: learning rate of everything else (gates, head, dense numerics).
        table_beta: the table's Adagrad denominator is ``beta + sqrt(sum g^2)`` (McMahan et al.'s
            FTRL-Proximal ``beta``): a row's first, small gradients move it in proportion to
            their size instead of by a full ``lr`` -- at a 0.2 % click rate nearly every first
            gradient comes from a non-click, and a scale-free first step makes the whole
            table over-confident.
        dense_optimizer_kind: ``"adagrad"`` (per-coordinate rates, no momentum to ship),
            ``"adam"`` or ``"sgd"``.
        max_step, step_ratio: update sizes; see :meth:`step_size`.
        calibrate: fit the online calibration of the network's score (see
            :class:`~ctr.online_learner.prior.OnlineCalibration`); False uses the raw score.
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
        lr_table: float = 0.1,
        lr_dense: float = 0.005,
        table_beta: float = 0.3,
        dense_optimizer_kind: Literal["adagrad", "adam", "sgd"] = "adagrad",
        max_step: int = 2048,
        step_ratio: int = 64,
        calibrate: bool = True,
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
        if max_step < 1 or step_ratio < 1:
            raise ValueError("max_step and step_ratio must be >= 1")
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
        self.table_optimizer = RowWiseAdagrad(self.model.table, lr=lr_table, eps=table_beta)
        self.dense_optimizer = dense_optimizer(self.model.dense_parameters(), lr=lr_dense, kind=dense_optimizer_kind)
        self.max_step, self.step_ratio = max_step, step_ratio
        self.calibrate = calibrate
        if not calibrate:  # ablation: the network's score is used as is
            self.model.calibration.coef[0] = 1.0
        self.touched = TouchedRows(self.model.embedding.num_rows, self.device)
        #: clicks waiting for their cohort (not checkpointed: a restart forgets at most one
        #: attribution window's clicks from the base rate, never an example)
        self.cohorts = CompleteCohorts()
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

    def learn_many(
        self,
        batch: Sequence[Any] | EncodedBatch,
        labels: Sequence[int] | np.ndarray,
        event_time_ms: np.ndarray | None = None,
    ) -> float:
        """Learn the batch; returns the mean log loss before the updates. See
        :meth:`predict_learn_many` for ``event_time_ms``."""
        return self._step(self.encode(batch), labels, event_time_ms)[1]

    def predict_learn_many(
        self,
        batch: Sequence[Any] | EncodedBatch,
        labels: Sequence[int] | np.ndarray,
        event_time_ms: np.ndarray | None = None,
    ) -> np.ndarray:
        """Progressive step: the pre-update probabilities ``[B]``, then learn from the batch.

        ``event_time_ms`` (the impressions' event times, ``[B]``): the base rate and the
        calibration then count labels in complete impression-time cohorts
        (:class:`~ctr.online_learner.prior.CompleteCohorts`) -- what a stream whose clicks arrive
        before their window's non-clicks needs. Without it every label counts on arrival."""
        return self._step(self.encode(batch), labels, event_time_ms)[0]

    def predict_learn_scored(
        self, batch: Sequence[Any] | EncodedBatch, labels: Sequence[int] | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Progressive step that leaves the outcomes to the caller: the pre-update
        probabilities ``[B]`` and the network's raw scores ``[B]``. The base rate and the
        calibration learn only what :meth:`observe_arrivals` hands them (for a stream whose
        first labels may still be corrected: :class:`~ctr.online_learner.outcomes.ArrivalLearner`)."""
        scores: list[np.ndarray] = []
        p = self._step(self.encode(batch), labels, None, scores)[0]
        return p, np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)

    @torch.no_grad()
    def observe_arrivals(
        self,
        event_time_ms: np.ndarray,
        labels: np.ndarray,
        scores: np.ndarray,
        correction_scores: np.ndarray | None = None,
        corrections: int = 0,
    ) -> None:
        """Count the base rate and fit the calibration as labels arrive: first examples
        (impression times ``[B]``, labels ``[B]``, raw scores ``[B]`` from
        :meth:`predict_learn_scored`) and ``corrections`` (clicks of impressions counted earlier
        as provisional negatives; ``correction_scores`` ``[C]``, C <= corrections, the scores
        those impressions were observed with, where still known).

        Waiting for final labels would leave a fresh model at the prior for a whole attribution
        window (the base rate at 0.5, the calibration's trust in the network at 0: no click
        would move a served score). On arrival, a click -- which may leave the join before its
        impression's cohort of non-clicks -- waits in
        :class:`~ctr.online_learner.prior.CompleteCohorts` until a negative as new as it has
        arrived; a correction is one more gradient term of the calibration
        (:meth:`~ctr.online_learner.prior.OnlineCalibration.correct`), so it ends where the
        final labels would have taken it."""
        t = np.asarray(event_time_ms, dtype=np.int64)
        y = np.asarray(labels, dtype=np.float32)
        f = np.asarray(scores, dtype=np.float32)
        now = self.cohorts.admit(t, y, f)
        released, k = self.cohorts.release()
        model = self.model
        if self.calibrate:
            # the offset of the base rate before these labels, as the scores were made
            offset = model.base_rate.log_odds()
            score = torch.from_numpy(np.concatenate([f[now], released.astype(np.float32)])).to(self.device)
            y_cal = torch.from_numpy(np.concatenate([y[now], np.ones(k, dtype=np.float32)])).to(self.device)
            model.calibration.observe(score, offset, y_cal)
            if correction_scores is not None and len(correction_scores):
                model.calibration.correct(torch.as_tensor(np.asarray(correction_scores, dtype=np.float32)))
        model.base_rate.count(float(y[now].sum()) + k + corrections, int(now.sum()) + k)

    def step_size(self) -> int:
        """Examples in the next update: ``examples_seen / step_ratio``, between 1 and ``max_step``.

        Updates are sized by what has arrived, not by what one poll returned: while data is
        scarce every example counts and steps are small (the first ``step_ratio`` examples
        are learned one by one); once a step's share of the evidence is small, larger steps cost
        no quality and buy speed."""
        return max(1, min(self.max_step, self.examples_seen // self.step_ratio))

    def _step(
        self,
        enc: EncodedBatch,
        labels: Sequence[int] | np.ndarray,
        event_time_ms: np.ndarray | None = None,
        scores: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, float]:
        """``scores`` given: the raw scores are appended to it and no outcome is observed."""
        n = len(enc)
        y = torch.as_tensor(np.asarray(labels, dtype=np.float32)).to(self.device)
        if y.shape != (n,):
            raise ValueError(f"expected {n} labels, got shape {tuple(y.shape)}")
        if n == 0:
            return np.zeros(0, dtype=np.float32), float("nan")
        t = None if event_time_ms is None else np.asarray(event_time_ms, dtype=np.int64).reshape(n)
        if n <= self.step_size():
            return self._one_step(enc, y, t, scores)
        ps, total, i = [], 0.0, 0
        while i < n:
            j = min(n, i + self.step_size())
            part = enc.take(slice(i, j))
            p, loss = self._one_step(part, y[i:j], None if t is None else t[i:j], scores)
            ps.append(p)
            total += loss * (j - i)
            i = j
        return np.concatenate(ps), total / n

    def _one_step(
        self, enc: EncodedBatch, y: torch.Tensor, t: np.ndarray | None, scores: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, float]:
        n = len(enc)
        model = self.model
        if not model.training:  # train() walks every submodule: not once per step
            model.train()
        ids, numeric = self._inputs(enc)
        lookup = model.embedding.lookup(ids)  # unique rows [U, c] as a leaf; chunks [B, P, c]
        score = model.forward_chunks(lookup.chunks, numeric)
        offset = model.base_rate.log_odds()
        # the network learns what the features add to the base rate; the calibration of its
        # (pre-update) scores is fitted separately, below
        # summed, not averaged: an example moves the weights as much in a step of 1 as of 2,048
        loss = F.binary_cross_entropy_with_logits(score + offset, y, reduction="sum")
        self.dense_optimizer.zero_grad()
        loss.backward()
        self.dense_optimizer.step()
        grad = lookup.rows.grad  # summed per row
        assert grad is not None  # rows is a leaf the loss reads: backward() filled it
        self.table_optimizer.step_unique(lookup.ids, grad)
        self.touched.add(lookup.ids)
        score = score.detach()
        with torch.no_grad():
            p = torch.sigmoid(model.calibration(score, offset))
            if scores is None:
                self._observe_outcomes(score, offset, y, t)
            else:
                scores.append(score.cpu().numpy())
        self.examples_seen += n
        mean_loss = float(F.binary_cross_entropy(p, y))
        return p.cpu().numpy(), mean_loss

    def _observe_outcomes(
        self, score: torch.Tensor, offset: torch.Tensor, y: torch.Tensor, t: np.ndarray | None
    ) -> None:
        """Count labels into the base rate and fit the calibration -- at once, or (with event
        times) once their impression-time cohort is complete (:meth:`observe_arrivals`)."""
        if t is not None:
            self.observe_arrivals(t, y.cpu().numpy(), score.cpu().numpy())
            return
        if self.calibrate:
            self.model.calibration.observe(score, offset, y)
        self.model.base_rate.observe(y)

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
        # a copy: torch's optimizer keeps the loaded "step" tensors as they are, so a learner
        # restored from another's live state_dict() would advance that one's step counters too
        self.dense_optimizer.load_state_dict(copy.deepcopy(state["dense_optimizer"]))
        self.examples_seen = int(state["examples_seen"])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], **kwargs: Any) -> OnlineCTR:
        learner = cls(ModelConfig.from_dict(state["config"]), **kwargs)
        learner.load_state_dict(state)
        return learner
