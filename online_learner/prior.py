"""The click-rate prior: the model's logit is ``log_odds(running click rate) + f(x)``.

Real ad logs click at 0.1-1 %. A network whose output starts at logit 0 predicts 0.5 and
needs tens of thousands of examples before its bias comes down, and a per-coordinate
optimizer then over-shoots it: progressive log loss worse than just predicting the click
rate. Here the base rate is not learned by gradient at all. It is counted: an exponentially
decayed count of clicks and impressions (the running mean of the label, with a Beta prior
and a horizon, so it follows drift in the base rate), whose log-odds is added to the network's
output as an offset, as GLMs do. The network starts at ``f(x) = 0``, so a fresh model
predicts the running click rate from the first event at any click rate, and its gradients
only carry what the features add to that.

The counts are buffers: they travel in ``state_dict`` (checkpoints, snapshots, and the dense
part of every delta), so serving adds the same offset as the learner.

>>> prior = ClickRatePrior()
>>> round(prior.rate(), 3)
0.5
>>> prior.observe(torch.tensor([0.0] * 998 + [1.0, 1.0]))
>>> round(prior.rate(), 4)
0.0025
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["ClickRatePrior", "CompleteCohorts", "OnlineCalibration"]


class ClickRatePrior(nn.Module):
    """Decayed counts of clicks and impressions -> the log-odds offset ``[]`` of the logit.

    Args:
        horizon: examples after which an old example's weight has decayed to ``1/e`` (the
            counts forget the base rate of long ago, at the speed a click rate drifts).
        pseudo_clicks, pseudo_impressions: the Beta prior (``0.5 / 1`` is the
            Krichevsky-Trofimov estimator: 0.5 before anything is seen).
    """

    # buffers (register_buffer): declared so they type as Tensor, not as nn.Module.__getattr__'s union
    counts: Tensor

    def __init__(self, horizon: float = 200_000.0, pseudo_clicks: float = 0.5, pseudo_impressions: float = 1.0):
        super().__init__()
        self.horizon = float(horizon)
        self.pseudo = (float(pseudo_clicks), float(pseudo_impressions))
        # [decayed clicks, decayed impressions]; the pseudo-counts are added at read time (they
        # never decay, so the rate can never reach 0 or 1)
        # float32: buffers ship in model updates, whose format carries no float64
        self.register_buffer("counts", torch.zeros(2))

    @torch.no_grad()
    def observe(self, labels: Tensor) -> None:
        """Count a batch of labels ``[B]`` (after predicting it: progressive)."""
        self.count(float(labels.sum()), labels.numel())

    @torch.no_grad()
    def count(self, clicks: float, impressions: int) -> None:
        """Count ``impressions`` and ``clicks`` that arrived separately (an impression's click
        may come after it: a stream of provisional negatives and corrections)."""
        if impressions == 0 and clicks == 0:
            return
        keep = math.exp(-impressions / self.horizon)
        self.counts.mul_(keep).add_(torch.tensor([float(clicks), float(impressions)], device=self.counts.device))

    def rate(self) -> float:
        clicks, seen = self.counts.tolist()
        return (clicks + self.pseudo[0]) / (seen + self.pseudo[1])

    def log_odds(self) -> Tensor:
        """``log(rate / (1 - rate))`` as a float32 scalar on the model's device."""
        counts = self.counts.double()
        clicks = counts[0] + self.pseudo[0]
        seen = counts[1] + self.pseudo[1]
        return torch.log(clicks / (seen - clicks)).float()


class OnlineCalibration(nn.Module):
    """Online Platt scaling of the network's score: ``logit = offset + b + a * f(x)``.

    ``(a, b)`` is a two-parameter logistic regression on the network's *progressive* scores
    (each made before the network learned that example), fitted online by a Laplace-approximated
    Bayesian update (one Newton step per batch, as in Chapelle and Li 2011): the precision
    grows with the evidence (``sum p (1 - p) [f, 1] [f, 1]^T``), so steps shrink as the fit
    firms up, at 0.2 % and at 30 % click rates alike, with no learning rate to tune.

    What it buys: ``a`` starts at ``a0`` (default 0: trust the features only once they
    have proven themselves on examples they had not seen) and settles where the network's
    scores are worth their weight; ``a < 1`` takes the over-confidence out of an
    over-fitting network, and on a log with no signal ``a`` stays near 0, leaving the
    running click rate. Forgetting (``horizon``) lets the fit follow drift.

    Args:
        a0: the starting trust in the network's score.
        prior_precision: Gaussian prior precision of ``(a, b)``. ``b``'s is strong: the offset
            already tracks the base rate, ``b`` only corrects the mean shift of a scaled score,
            and a weak prior lets a handful of early clicks swing every prediction.
        horizon: examples over which old evidence decays.

    >>> cal = OnlineCalibration()
    >>> f = torch.linspace(-2, 2, 400)
    >>> y = (torch.rand(400, generator=torch.Generator().manual_seed(0)) < torch.sigmoid(f)).float()
    >>> for _ in range(5):
    ...     cal.observe(f, torch.zeros(400), y)
    >>> a, b = cal.coefficients()
    >>> 0.6 < a < 1.4, abs(b) < 0.3
    (True, True)
    """

    # buffers (register_buffer): declared so they type as Tensor, not as nn.Module.__getattr__'s union
    coef: Tensor
    precision: Tensor

    def __init__(
        self, a0: float = 0.0, prior_precision: tuple[float, float] = (10.0, 1000.0), horizon: float = 200_000.0
    ) -> None:
        super().__init__()
        self.horizon = float(horizon)
        self.prior = torch.diag(torch.tensor(prior_precision, dtype=torch.float64))
        # float32 buffers (they ship in model updates); the fit itself runs in float64
        self.register_buffer("coef", torch.tensor([a0, 0.0]))  # [a, b]
        self.register_buffer("precision", self.prior.float())

    def coefficients(self) -> tuple[float, float]:
        a, b = self.coef.tolist()
        return a, b

    def forward(self, score: Tensor, offset: Tensor) -> Tensor:
        """Calibrated logits ``[B]`` from network scores ``[B]`` and the offset (``[]`` or ``[B]``)."""
        a, b = self.coef.float().unbind()
        return offset + b + a * score

    @torch.no_grad()
    def observe(self, score: Tensor, offset: Tensor, labels: Tensor) -> None:
        """One Newton step of the MAP fit on a batch of progressive scores ``[B]`` with labels ``[B]``."""
        n = labels.numel()
        if n == 0:
            return
        # float64 numpy on the host: a 2x2 fit is a handful of reductions, and torch's per-op
        # dispatch (and a batched linalg.solve) cost more than the arithmetic at small batches
        f = score.detach().reshape(-1).double().cpu().numpy()
        y = labels.detach().reshape(-1).double().cpu().numpy()
        off = offset.detach().double().cpu().numpy()
        a, b = self.coef.tolist()
        p = 0.5 * (1.0 + np.tanh(0.5 * (off + b + a * f)))  # sigmoid, without overflow warnings
        r = p - y
        w = p * (1.0 - p)
        wf = w * f
        grad = np.array([r @ f, r.sum()])
        hess = np.array([[wf @ f, wf.sum()], [wf.sum(), w.sum()]])
        # forget old evidence (never below the prior), then add this batch's
        keep = math.exp(-n / self.horizon)
        precision = self.precision.double().cpu().numpy() * keep + self.prior.numpy() * (1 - keep) + hess
        coef = np.array([a, b]) - np.linalg.solve(precision, grad)
        coef[0] = max(coef[0], 0.0)  # a feature score is never trusted upside down
        self.precision.copy_(torch.from_numpy(precision))
        self.coef.copy_(torch.from_numpy(coef))

    @torch.no_grad()
    def correct(self, score: Tensor) -> None:
        """Examples observed as non-clicks whose click came later: scores ``[C]`` they were
        observed with. In the fit's quadratic (Laplace) model an example's gradient is linear
        in its label and its curvature does not depend on it, so turning a 0 into a 1 is exactly
        one more gradient term, ``-[f, 1]``, and no new precision: the calibration can learn
        every impression on arrival (provisional negatives included) and still end where
        final labels alone would have taken it, without waiting for the attribution window."""
        if score.numel() == 0:
            return
        f = score.detach().reshape(-1).double().cpu().numpy()
        step = np.linalg.solve(self.precision.double().cpu().numpy(), np.array([f.sum(), float(f.size)]))
        coef = np.array(self.coefficients()) + step
        coef[0] = max(coef[0], 0.0)
        self.coef.copy_(torch.from_numpy(coef))


class CompleteCohorts:
    """Hands labels to the base rate and the calibration in complete impression-time cohorts.

    When a positive example leaves the label join at its click and a negative only when its
    attribution window closes, the newest examples are all clicks: counted on arrival, the
    click rate of the last window's impressions reads as 100 % (a fresh model then serves
    p near 1 until the first negatives arrive), and in steady state it stays inflated by a
    window's worth of clicks. So a click whose impression is newer than the newest negative
    seen (the join's closed-window watermark) waits here until that watermark passes it;
    negatives, and clicks of closed windows, go through at once. Replays in impression order
    release everything immediately.

    >>> c = CompleteCohorts()
    >>> c.admit(np.array([10, 20, 5]), np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3])).tolist()
    [False, False, True]
    >>> c.release()  # nothing: the newest negative is from t=5
    (array([], dtype=float64), 0)
    >>> _ = c.admit(np.array([15]), np.array([0]), np.array([0.0]))
    >>> c.release()  # the click from t=10 is complete now, the one from t=20 is not
    (array([0.1]), 1)
    """

    def __init__(self, capacity: int = 1_000_000) -> None:
        self.capacity = capacity
        self.watermark = -math.inf
        self._pending: list[tuple[int, int, float]] = []  # heap of (event time, seq, score)
        self._seq = 0

    def admit(self, event_ms: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Which examples count now (bool ``[B]``); the others (recent clicks) wait, with their score."""
        negatives = labels == 0
        if negatives.any():
            self.watermark = max(self.watermark, float(event_ms[negatives].max()))
        wait = ~negatives & (event_ms > self.watermark)
        for t, s in zip(event_ms[wait].tolist(), scores[wait].tolist(), strict=True):
            heapq.heappush(self._pending, (t, self._seq, s))
            self._seq += 1
        return ~wait

    def release(self) -> tuple[np.ndarray, int]:
        """Scores of the waiting clicks whose cohort is now complete (and how many)."""
        out = []
        while self._pending and (self._pending[0][0] <= self.watermark or len(self._pending) > self.capacity):
            out.append(heapq.heappop(self._pending)[2])
        return np.asarray(out, dtype=np.float64), len(out)

    def __len__(self) -> int:
        return len(self._pending)
