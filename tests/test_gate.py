"""The quality gate decides at real-log click rates: its window grows until it holds enough
clicks, versions before that pass undecided (and are counted), and then a worse live model is
withheld."""

from __future__ import annotations

import numpy as np

from ctr.online_learner.publisher import QualityGate


def _batches(rate: float, n_batches: int, size: int = 2048, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n_batches):
        x = rng.normal(size=size)
        # E[exp(1.5 x)] = exp(1.125): shift the intercept so the realised rate is about `rate`
        p = 1 / (1 + np.exp(-(np.log(rate / (1 - rate)) - 1.125 + 1.5 * x)))
        yield (rng.random(size) < p).astype(np.float32), x


def _run(live_is_good: bool, rate: float = 0.003) -> tuple[list, int]:
    gate = QualityGate(margin=0.02, min_positives=50, sample_every=1)
    decisions = []
    rng = np.random.default_rng(1)
    for y, x in _batches(rate, 40):
        good = 1 / (1 + np.exp(-x))
        noise = rng.random(len(y))
        gate.observe(y, good if live_is_good else noise, noise if live_is_good else good)
        decisions.append(gate.decide())
    clicks = 0
    for y, _ in _batches(rate, 40):
        clicks += int(y.sum())
    return decisions, clicks


def test_gate_waits_for_enough_clicks_then_decides_at_a_0_3_percent_click_rate() -> None:
    decisions, clicks = _run(live_is_good=False)
    assert 0.002 < clicks / (40 * 2048) < 0.004
    undecided = [d for d in decisions if not d.decided]
    decided = [d for d in decisions if d.decided]
    # one publish a batch: the first ~8 batches (50 clicks at 0.3 % = ~17k examples) pass undecided
    first = next(i for i, d in enumerate(decisions) if d.decided)
    assert 5 <= first <= 12 and all(d.passed for d in undecided)
    # then one decision per ~50 clicks, each on a fresh window
    assert 2 <= len(decided) <= clicks // 50
    assert "undecided" in undecided[0].reason and "clicks" in undecided[0].reason
    # a live model that ranks at random against a served model with signal is withheld
    assert decided and not any(d.passed for d in decided)
    assert all(d.window_auc is not None and d.window_auc < d.served_auc - 0.02 for d in decided)


def test_gate_passes_a_better_live_model_and_restarts_its_window() -> None:
    decisions, _ = _run(live_is_good=True)
    decided = [i for i, d in enumerate(decisions) if d.decided]
    assert decided and all(decisions[i].passed for i in decided)
    # after a decision the window starts afresh: the next publish is undecided again
    assert not decisions[decided[0] + 1].decided


def test_gate_refuses_non_finite_weights_even_undecided() -> None:
    d = QualityGate().decide(live_finite=False)
    assert not d.passed and d.decided
