"""The README's benchmark tables are generated from committed results (``ctr bench report``):
every table equals what its result renders, every result names a clean commit, and a number
edited by hand, a dirty result or a lost marker is caught."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import report


def test_every_generated_table_is_true_to_its_committed_result():
    assert report.problems() == []


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the docs with tables and the results the tables read."""
    for t in report.TABLES:
        for f in (t.doc, *t.results):
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(report.ROOT / f, tmp_path / f)
    return tmp_path


def test_a_number_edited_by_hand_fails_the_check_and_write_restores_it(tree: Path):
    readme = tree / "README.md"
    text = readme.read_text()
    block = report.block(report.TABLES[0], tree)
    assert block in text
    edited = block.replace("0.", "9.", 1)
    readme.write_text(text.replace(block, edited))
    assert [p for p in report.problems(tree) if report.TABLES[0].marker in p]
    assert report.write(tree) == [report.TABLES[0].marker]
    assert report.problems(tree) == [] and readme.read_text() == text


def test_a_result_from_uncommitted_code_fails_the_check(tree: Path):
    t = next(t for t in report.TABLES if isinstance(t.result, str))
    doc = json.loads((tree / t.result).read_text())
    (tree / t.result).write_text(json.dumps({**doc, "dirty": True}))
    report.write(tree)  # the table itself is true to the result; the result is not quotable
    assert any("uncommitted" in p and t.result in p for p in report.problems(tree))
    (tree / t.result).write_text(json.dumps({k: v for k, v in doc.items() if k != "commit"}))
    assert any("unknown" in p for p in report.problems(tree))


def test_a_lost_marker_fails_the_check(tree: Path):
    readme = tree / "README.md"
    marker = report.TABLES[1].marker
    readme.write_text(readme.read_text().replace(f"<!-- {marker}:end -->", ""))
    assert any(f"no {marker} markers" in p for p in report.problems(tree))
