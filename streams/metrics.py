"""Prometheus metrics of the stream agents, registered idempotently: a worker builds its agents
once, but tests and the bench build many in one process, and prometheus-client refuses a
second collector of the same name."""

from __future__ import annotations

from typing import Any


def metric(name: str, factory: Any, *args: Any) -> Any:
    """The registered collector called ``name``, or a new ``factory(name, *args)``.

    >>> from prometheus_client import Counter
    >>> metric("ctr_doc_total", Counter, "doc") is metric("ctr_doc_total", Counter, "doc")
    True
    """
    from prometheus_client import REGISTRY

    existing = REGISTRY._names_to_collectors.get(name)  # noqa: SLF001 - no public lookup by name
    return existing if existing is not None else factory(name, *args)


def changelog_bytes() -> Any:
    """``ctr_changelog_bytes_total{table}``: value bytes the agents sent to their tables'
    changelogs (before compression) -- what the broker must acknowledge before outputs leave."""
    from prometheus_client import Counter

    return metric("ctr_changelog_bytes_total", Counter, "Table changelog value bytes sent", ["table"])
