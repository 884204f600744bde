"""Final labels for the learner: held first examples, corrections, and the arrival learner."""

from __future__ import annotations

import numpy as np
import pytest

from ctr.infra.schema import TrainingExample
from ctr.online_learner.learner import OnlineCTR
from ctr.online_learner.metrics import log_loss
from ctr.online_learner.outcomes import ArrivalLearner, HeldLabels
from ctr.streams.datasets import open_source


def test_held_labels_release_rows_once_final_and_apply_corrections() -> None:
    held = HeldLabels(window_ms=1_000)
    held.admit(["a", "b", "c"], np.array([0, 500, 900]), np.zeros(3), final=np.zeros(3, dtype=bool),
               p=np.array([0.1, 0.2, 0.3]))  # fmt: skip
    assert held.correct(["c", "zz"]) == 1 and held.late_corrections == 1  # zz was never held
    out = held.release(now_ms=1_600)  # a and b are a window old, c is not: the batch is split
    assert out["p"].tolist() == [0.1, 0.2] and out["label"].tolist() == [0.0, 0.0] and len(held) == 1
    assert held.correct(["a"]) == 1  # released already: too late to change
    out = held.release(now_ms=1_900)
    assert out["p"].tolist() == [0.3] and out["label"].tolist() == [1.0] and len(held) == 0
    assert held.release(now_ms=10**9) is None


def test_a_final_negative_completes_its_cohort_and_capacity_bounds_memory() -> None:
    held = HeldLabels(window_ms=30_000, capacity=4)
    # a click (final, label 1) waits until a non-click as new as it has come
    held.admit(["a"], np.array([100]), np.ones(1), final=np.ones(1, dtype=bool), p=np.array([0.5]))
    assert held.release(now_ms=100) is None
    held.admit(["b"], np.array([100]), np.zeros(1), final=np.ones(1, dtype=bool), p=np.array([0.4]))
    assert held.release(now_ms=100)["p"].tolist() == [0.5, 0.4]
    # provisional negatives past the capacity are released early
    held.admit([f"x{i}" for i in range(6)], np.arange(6) + 200, np.zeros(6), final=np.zeros(6, dtype=bool),
               p=np.zeros(6))  # fmt: skip
    assert len(held.release(now_ms=300)["p"]) == 6 and len(held) == 0


def _examples(n: int, seed: int = 0, **options) -> list[TrainingExample]:
    return [r.example() for r in open_source("synthetic", seed=seed, events=n, **options)]


@pytest.mark.parametrize("profile", ["default", "low-ctr"])
def test_one_poll_is_learned_update_by_update_from_the_first_event(profile: str) -> None:
    """A fresh learner given its first 2,048 examples in one poll (as ``ctr learn`` gets them)
    predicts near the running click rate within the poll, not the prior's 0.5 for all of it."""
    exs = _examples(2_048, seed=3, profile=profile)
    arrivals = ArrivalLearner(OnlineCTR(categorical_fields=("user_id", "item_id", "C1"), table_bits=14, seed=0))
    done = arrivals.learn(exs, row=np.arange(len(exs)))
    rest = arrivals.drain()
    p = np.empty(len(exs))
    for d in (done, rest):
        if d is not None:
            p[d["row"]] = d["p"]
    y = np.array([e.label for e in exs], dtype=np.float64)
    rate = y.mean()
    assert 0.5 * rate < p[1_024:].mean() < 2 * rate, (p[1_024:].mean(), rate)
    running = (np.cumsum(y) - y + 0.5) / (np.arange(len(y)) + 1.0)
    assert log_loss(y, p) < 1.1 * log_loss(y, running)


def test_provisional_negatives_and_corrections_give_final_labels_to_the_calibration() -> None:
    """The join's default order: unclicked impressions leave as provisional negatives, clicks
    as corrections. What is released carries the final labels, each impression once."""
    exs = _examples(3_000, seed=5)
    timed: list[tuple[int, TrainingExample]] = []
    for e in exs:  # each impression provisional at once, its click 500 ms later (inside the window)
        t = e.impression.event_time_ms
        timed.append((t, TrainingExample(example_id=e.example_id, label=0, impression=e.impression, provisional=True)))
        if e.label:
            timed.append((t + 500, TrainingExample(example_id=e.example_id, label=1, impression=e.impression,
                                                   correction=True, click_time_ms=t + 500)))  # fmt: skip
    stream = [e for _, e in sorted(timed, key=lambda x: (x[0], x[1].correction))]
    arrivals = ArrivalLearner(OnlineCTR(categorical_fields=("user_id", "item_id"), table_bits=12, seed=0),
                              window_ms=1_000)  # fmt: skip
    got: dict[str, float] = {}
    for i in range(0, len(stream), 500):
        done = arrivals.learn(stream[i : i + 500], eid=np.array([e.example_id for e in stream[i : i + 500]
                                                                  if not e.correction], dtype=object))  # fmt: skip
        if done is not None:
            got.update(zip(done["eid"], done["label"], strict=True))
    rest = arrivals.drain()
    if rest is not None:
        got.update(zip(rest["eid"], rest["label"], strict=True))
    assert got == {e.example_id: float(e.label) for e in exs}
    assert arrivals.corrections == sum(e.label for e in exs) and arrivals.held.late_corrections == 0


def test_a_correction_takes_the_calibration_where_the_final_label_would_have() -> None:
    """Observing provisional negatives then correcting the clicked ones equals observing the
    final labels (one batch: exactly, in the fit's quadratic model)."""
    import torch

    from ctr.online_learner.prior import OnlineCalibration

    rng = np.random.default_rng(0)
    f = torch.from_numpy(rng.normal(size=400).astype(np.float32))
    y = (rng.random(400) < 1 / (1 + np.exp(-2 * f.numpy() + 3))).astype(np.float32)
    offset = torch.tensor(-3.0)
    final, provisional = OnlineCalibration(a0=0.3), OnlineCalibration(a0=0.3)
    final.observe(f, offset, torch.from_numpy(y))
    provisional.observe(f, offset, torch.zeros(400))
    provisional.correct(f[torch.from_numpy(y) == 1])
    assert np.allclose(final.coefficients(), provisional.coefficients(), atol=1e-5)
    assert final.coefficients()[0] > 0.3  # the scores predict the clicks: trust rises


def test_the_calibration_learns_before_any_attribution_window_has_passed() -> None:
    """A live stream with a 30 s window: within its first 20 s (no label final yet) the
    calibration's trust in the network must already have moved off 0, so a click can move a
    served score after a fresh start."""
    exs = _examples(4_000, seed=7)
    t0 = exs[0].impression.event_time_ms
    early = [e for e in exs if e.impression.event_time_ms - t0 < 20_000]
    stream = []
    for e in early:  # provisional at once; clicks as corrections in the same poll
        stream.append(TrainingExample(example_id=e.example_id, label=0, impression=e.impression, provisional=True))
        if e.label:
            stream.append(TrainingExample(example_id=e.example_id, label=1, impression=e.impression,
                                          correction=True, click_time_ms=e.impression.event_time_ms + 100))  # fmt: skip
    learner = OnlineCTR(categorical_fields=("user_id", "item_id", "C1"), table_bits=14, seed=0)
    arrivals = ArrivalLearner(learner, window_ms=30_000)
    for i in range(0, len(stream), 256):
        assert arrivals.learn(stream[i : i + 256]) is None  # nothing is final yet
    a, _ = learner.model.calibration.coefficients()
    assert a > 0.1, a
    y = np.array([e.label for e in early], dtype=np.float64)
    assert 0.5 * y.mean() < learner.model.base_rate.rate() < 2 * y.mean()
