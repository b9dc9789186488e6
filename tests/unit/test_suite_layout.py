"""The marks scripts/test partitions the suite by (pyproject.toml): a test that lacks them runs
in the wrong part, beside tests it disturbs, and fails only now and then. Read from the source,
so this needs no pool."""

from __future__ import annotations

import ast
from pathlib import Path

E2E = Path(__file__).resolve().parents[1] / "e2e"
SERIAL = "pytest.mark.serial"
SERIAL_GROUP = "pytest.mark.xdist_group('serial')"


def _files() -> list[Path]:
    files = sorted(E2E.glob("test_*.py"))
    assert len(files) >= 15, files  # the glob found the e2e tests
    return files


def _pytestmark(tree: ast.Module) -> str:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            return ast.unparse(node.value)
    return ""


def test_every_e2e_file_marks_its_tests_sandbox():
    """`-m` deselects before the conftest hook that marks tests/e2e runs: the mark must be in
    the file, or its tests run in the part beside the serial tests."""
    marks = {f.name: _pytestmark(ast.parse(f.read_text())) for f in _files()}
    missing = [name for name, mark in marks.items() if "pytest.mark.sandbox" not in mark]
    assert missing == [], f"no `pytestmark = pytest.mark.sandbox` in {missing}"


def test_every_serial_test_is_in_the_serial_xdist_group():
    """Marked serial without the group, a test of the second part could run beside another
    serial test on the other worker."""
    found, unpaired = [], []
    for path in _files():
        tree = ast.parse(path.read_text())
        module = _pytestmark(tree)
        if SERIAL in module:
            found.append(path.name)
            if SERIAL_GROUP not in module:
                unpaired.append(path.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                marks = [ast.unparse(d) for d in node.decorator_list]
                if SERIAL in marks:
                    found.append(f"{path.name}::{node.name}")
                    if SERIAL_GROUP not in marks:
                        unpaired.append(f"{path.name}::{node.name}")
    assert "test_daemon.py" in found and "test_helper_crash.py" in found, found
    assert unpaired == [], unpaired
