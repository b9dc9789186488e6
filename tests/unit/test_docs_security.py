"""docs/security.md names the test behind every claim: each name must exist, so the page cannot
go on citing a test that was renamed or removed."""

from __future__ import annotations

import re
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
DOC = TOP / "docs" / "security.md"


def _defined() -> tuple[set[str], set[str]]:
    files, functions = set(), set()
    for path in (TOP / "tests").rglob("test_*.py"):
        files.add(path.name)
        functions.update(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M))
    return files, functions


def test_every_test_the_threat_model_names_exists() -> None:
    text = DOC.read_text()
    files, functions = _defined()
    named_files = set(re.findall(r"\b(test_\w+\.py)\b", text))
    # `..._holds_no_job` style shorthands name a suffix of a test cited just before them.
    named = {n for n in re.findall(r"\b(test_\w+)\b(?!\.py)", text)}
    suffixes = set(re.findall(r"\.\.\.(_\w+)", text))
    assert named_files and named, "the page names no tests"
    assert named_files <= files, sorted(named_files - files)
    assert named <= functions, sorted(named - functions)
    for suffix in suffixes:
        assert any(f.endswith(suffix) for f in functions), suffix
