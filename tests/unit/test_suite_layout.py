"""The marks scripts/test partitions the suite by (pyproject.toml): a test that lacks them runs
in the wrong part, beside tests it disturbs, and fails only now and then. Read from the source,
so this needs no pool."""

from __future__ import annotations

import ast
from pathlib import Path

E2E = Path(__file__).resolve().parents[1] / "e2e"
SERIAL = "pytest.mark.serial"


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


def test_no_test_relies_on_xdist_group():
    """pytest-xdist 3.8 groups by rewriting item._nodeid, which pytest 9.2 no longer reads:
    `xdist_group` silently groups nothing, and tests that must not run side by side are
    marked serial instead (scripts/test runs those alone)."""
    used = [f.name for f in _files() if "xdist_group" in f.read_text()]
    assert used == [], used


def test_the_pool_wide_tests_are_serial():
    serial = []
    for path in _files():
        tree = ast.parse(path.read_text())
        if SERIAL in _pytestmark(tree):
            serial.append(path.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                if SERIAL in [ast.unparse(d) for d in node.decorator_list]:
                    serial.append(f"{path.name}::{node.name}")
    assert {"test_daemon.py", "test_helper_crash.py", "test_submit_interface.py"} <= set(
        serial
    ), serial


def test_no_e2e_file_shares_its_name_with_a_unit_test():
    """tests/ has no packages (rootdir import mode): two test files of one name are one module
    to pytest, and the run that collects both (scripts/test's no-pool part in the sandbox, with
    the e2e tests' conftest on the path) fails to collect the second - which the fast tier on
    the host, collecting tests/unit alone, never shows."""
    unit = {f.name for f in (E2E.parent / "unit").glob("test_*.py")}
    assert len(unit) >= 30, unit  # the glob found the unit tests
    shared = sorted(unit & {f.name for f in _files()})
    assert shared == [], f"rename these e2e files (say what they test end to end): {shared}"
