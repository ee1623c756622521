"""Docstrings and comments cite only files that ship in the repository."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import PROJECT_ROOT

SOURCES = [*sorted((PROJECT_ROOT / "src").rglob("*.py")), *sorted((PROJECT_ROOT / "benchmarks").rglob("*.py")),
           *sorted((PROJECT_ROOT / "tests").rglob("*.py"))]
# Notes that live outside the repository (a team's design card, research notes): not to be cited.
OUTSIDE = re.compile(r"DESIGN\.md|research/\w+\.md|\bshared/")
CITED_DOC = re.compile(r"\bdocs/[\w.-]+\.md")


def test_no_source_cites_a_file_outside_the_repository():
    hits = [f"{path.relative_to(PROJECT_ROOT)}:{n}" for path in SOURCES if path.name != "test_docs.py"
            for n, line in enumerate(path.read_text().splitlines(), start=1) if OUTSIDE.search(line)]
    assert hits == []


def test_every_cited_doc_exists():
    cited = {m.group(0) for path in SOURCES for m in CITED_DOC.finditer(path.read_text())}
    assert "docs/algorithm.md" in cited
    assert sorted(doc for doc in cited if not (PROJECT_ROOT / doc).is_file()) == []
