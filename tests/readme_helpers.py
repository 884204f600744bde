"""README tables generated from committed results: the block between markers, and the result."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_block_and_result(marker: str, result: str) -> tuple[str, dict]:
    """The README text between ``<!-- marker:begin -->`` and ``<!-- marker:end -->``, and the
    JSON result at ``result`` (repo-relative), which must be measured on committed code."""
    doc = json.loads((ROOT / result).read_text())
    readme = (ROOT / "README.md").read_text()
    block = readme.split(f"<!-- {marker}:begin -->\n", 1)[1].split(f"\n<!-- {marker}:end -->", 1)[0]
    assert doc["commit"] and doc["dirty"] is False, "quote only results measured on committed code"
    return block, doc
