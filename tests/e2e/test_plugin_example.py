"""The pytest plugin works for an outside suite (issue 19): docs/testing.md's example, taken
from the page as written, run by a pytest of its own in a directory outside the checkout, with
the plugin loaded by its entry point from the installed package (not from /src)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

pytestmark = pytest.mark.sandbox

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"


def example_test() -> str:
    """The one python block of docs/testing.md's "A complete example"."""
    section = DOC.read_text().split("## A complete example", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "docs/testing.md: one python block expected in the example"
    return blocks[0]


def test_the_docs_example_passes_from_outside_the_checkout(annex_pool):
    outside = annex_pool.run("mktemp -d /tmp/outside-suite-XXXXXX", check=True).stdout.strip()
    try:
        annex_pool.write("root", f"{outside}/test_annex_example.py", example_test())
        # A clean environment and cwd: the package comes from the venv's site-packages.
        where = annex_pool.run("python -c 'import annex_gahp.testing as t; print(t.__file__)'",
                               cwd=outside, check=True).stdout.strip()
        assert where.startswith("/opt/annex-venv/") and "site-packages" in where, where
        res = annex_pool.run(
            "env -u PYTHONPATH python -m pytest -p no:cacheprovider -v -rA "
            f"{shlex.quote(outside)}", cwd=outside, timeout=600)
        summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
        print(f"outside suite in {outside}: {summary}")
        assert res.returncode == 0, f"{res.stdout[-4000:]}\n{res.stderr[-2000:]}"
        assert re.search(r"\b1 passed\b", summary), res.stdout[-4000:]
        plugins = next((line for line in res.stdout.splitlines() if line.startswith("plugins:")),
                       "")
        assert "htcondor-annex-gahp" in plugins, res.stdout[:2000]
    finally:
        annex_pool.run(f"rm -rf {shlex.quote(outside)}")
