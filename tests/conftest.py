"""Shared fixtures: real brokers on free loopback ports, stopped in teardown."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctr.infra.broker import DEFAULT_KIND, KINDS, EmbeddedBroker

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A fresh default broker per test (it starts in well under a second)."""
    kind = os.environ.get("CTR_TEST_BROKER", DEFAULT_KIND)
    b = EmbeddedBroker(kind=kind, data_dir=tmp_path / "broker").start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(params=KINDS)
def any_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """The compatibility subset: the same test against every embedded broker."""
    b = EmbeddedBroker(kind=request.param, data_dir=tmp_path / "broker").start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def group_id() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    return SHARED_DATA
