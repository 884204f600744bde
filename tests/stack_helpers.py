"""Helpers for tests that drive a whole ``ctr up`` stack."""

from __future__ import annotations

import time

import httpx


def first_prediction(port: int, body: dict, deadline: float) -> httpx.Response:
    """POST ``body`` to the stack's ``/predict`` until it answers 200 (serving becomes ready
    once the learner's first snapshot exists); fails at ``deadline`` (``time.monotonic()``)."""
    while True:
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/predict", json=body, timeout=5)
            if r.status_code == 200:
                return r
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "serving never answered /predict"
        time.sleep(0.5)
