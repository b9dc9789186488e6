"""Shared pytest setup. Kept minimal and generic: helpers live in annex_gahp/testing/inside.py
(`import sandbox` here), the pool's fixtures in the package's pytest plugin annex_gahp.testing.

- `import sandbox` works from any test (this directory is put on sys.path).
- Tests marked `sandbox`, and every test under tests/e2e, need the running sandbox and run
  inside it: they FAIL (never skip) when not inside one. The `sandbox` fixture gives its facts
  (/etc/annex-sandbox.env as a dict) after the plugin's `annex_sandbox` fixture reached it.
- The plugin is loaded by its entry point where the package is installed (the sandbox's venv);
  where it is not (the fast tier runs the checkout), it is registered here.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import sandbox as _sandbox

import annex_gahp.testing as _plugin


def pytest_configure(config):
    if not config.pluginmanager.is_registered(_plugin):
        config.pluginmanager.register(_plugin, "annex_gahp.testing")


def pytest_collection_modifyitems(config, items):
    e2e = Path(__file__).parent / "e2e"
    for item in items:
        if e2e in Path(item.path).parents:
            item.add_marker(pytest.mark.sandbox)


@pytest.fixture(scope="session")
def sandbox(request):
    """The running sandbox's facts; fails the test when not inside one (the project's own tests
    read the pool's files and use its bindings: never a sandbox built from the host)."""
    try:
        facts = _sandbox.check_running()
    except _sandbox.NotInSandbox as e:
        pytest.fail(f"needs the running sandbox: {e}", pytrace=False)
    request.getfixturevalue("annex_sandbox")
    return facts


@pytest.fixture(autouse=True)
def _needs_sandbox(request):
    if request.node.get_closest_marker("sandbox") is not None:
        request.getfixturevalue("sandbox")
