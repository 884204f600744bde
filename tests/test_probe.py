"""Pure logic of the freshness probe's summary (the probe itself runs in test_demo against the
real pipeline)."""

from ctr.probe import ProbeResult, freshness_summary


def r(i: int, fresh: float | None) -> ProbeResult:
    return ProbeResult(trial=i, fresh_s=fresh, specific=0.02, threshold=0.005, version=None if fresh is None else i)


def test_percentiles_count_only_trials_that_moved_and_report_the_misses() -> None:
    s = freshness_summary([r(0, 0.5), r(1, None), r(2, 1.5), r(3, 0.7), r(4, 3.0)])
    assert s["freshness_trials"] == 5 and s["freshness_missed"] == 1
    assert s["freshness_p50_s"] == 1.5  # nearest rank of [0.5, 0.7, 1.5, 3.0]
    assert s["freshness_p99_s"] == 3.0 and s["freshness_max_s"] == 3.0


def test_no_trial_moved_gives_no_percentiles() -> None:
    s = freshness_summary([r(0, None)])
    assert s["freshness_p50_s"] is None and s["freshness_missed"] == 1
    assert freshness_summary([])["freshness_trials"] == 0
