"""Shared pytest setup. Kept minimal and generic: helpers live in tests/sandbox.py.

- `import sandbox` works from any test (this directory is put on sys.path).
- Tests marked `sandbox`, and every test under tests/e2e, need the running sandbox: they FAIL
  (never skip) when not inside one. The `sandbox` fixture gives the sandbox's facts
  (/etc/annex-sandbox.env as a dict).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import sandbox as _sandbox


def pytest_collection_modifyitems(config, items):
    e2e = Path(__file__).parent / "e2e"
    for item in items:
        if e2e in Path(item.path).parents:
            item.add_marker(pytest.mark.sandbox)


@pytest.fixture(scope="session")
def sandbox():
    """The running sandbox's facts; fails the test when there is none."""
    try:
        return _sandbox.check_running()
    except _sandbox.NotInSandbox as e:
        pytest.fail(f"needs the running sandbox: {e}", pytrace=False)


@pytest.fixture(autouse=True)
def _needs_sandbox(request):
    if request.node.get_closest_marker("sandbox") is not None:
        request.getfixturevalue("sandbox")
