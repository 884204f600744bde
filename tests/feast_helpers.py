"""Reading the windowed-stats rows back from a Feast store (lives in :mod:`bench.ground_truth`)."""

from bench.ground_truth import stats_rows

__all__ = ["stats_rows"]
