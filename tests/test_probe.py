"""Pure logic of the freshness probe's summary (the probe itself runs in test_demo against the
real pipeline)."""

from ctr.probe import ProbeResult, freshness_summary


def r(i: int, fresh: float | None) -> ProbeResult:
    return ProbeResult(trial=i, fresh_s=fresh, specific=0.2, threshold=0.05, version=None if fresh is None else i)


def test_percentiles_count_only_trials_that_moved_and_report_the_misses() -> None:
    s = freshness_summary([r(0, 0.5), r(1, None), r(2, 1.5), r(3, 0.7), r(4, 3.0)])
    assert s["freshness_trials"] == 5 and s["freshness_missed"] == 1
    assert s["freshness_p50_s"] == 1.5  # nearest rank of [0.5, 0.7, 1.5, 3.0]
    assert s["freshness_p99_s"] == 3.0 and s["freshness_max_s"] == 3.0


def test_no_trial_moved_gives_no_percentiles() -> None:
    s = freshness_summary([r(0, None)])
    assert s["freshness_p50_s"] is None and s["freshness_missed"] == 1
    assert freshness_summary([])["freshness_trials"] == 0


def test_the_move_is_judged_in_log_odds_so_a_low_scoring_context_is_not_missed() -> None:
    """The same evidence (odds x 1.13) is 0.002 in probability at p 0.02 but 0.011 at p 0.1:
    a probability threshold of 0.005 would call the first 'not moved'."""
    from ctr.probe import log_odds_gap

    def after(p: float, odds: float) -> float:
        o = p / (1 - p) * odds
        return o / (1 + o)

    low, typical = 0.02, 0.1
    assert after(low, 1.13) - low < 0.005 < after(typical, 1.13) - typical
    moved_low = log_odds_gap(after(low, 1.13), low) - log_odds_gap(low, low)
    moved_typical = log_odds_gap(after(typical, 1.13), typical)
    assert abs(moved_low - moved_typical) < 1e-9 and moved_low > 0.05
