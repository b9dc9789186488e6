"""pytest plugin `htcondor_annex`: a real HTCondor pool with the annex line installed, the AWS
emulator as AWS and the emulated-instance booter, for any test suite (docs/testing.md).

Registered under the `pytest11` entry point `htcondor_annex` (annex_gahp.testing.entrypoint,
which loads this module by name), so it loads in every pytest run of an environment where this
package is installed: importing it starts nothing and imports neither boto3 nor the
HTCondor bindings; only a test that asks for `annex_pool` (or `annex_sandbox`) gets a sandbox.
Without the entry point: `pytest -p annex_gahp.testing`.

Fixtures:
- `annex_sandbox` (session): the Sandbox (annex_gahp.testing.pool): reused when one runs (the
  test process is inside one, or --annex-pool-dir holds a running one), else built and started,
  and taken down at the end unless --annex-keep.
- `annex_pool` (per test): that sandbox plus `.config(**knobs)`, undone when the test ends.
- `boot_instance`: `boot_instance(instance_id)` or `boot_instance(annex="name")` waits for the
  booter to boot the instance from its user data; `.stop()` on what it returns terminates it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from annex_gahp.testing.pool import (
    DEFAULT_POOL_DIR,
    BootedInstance,
    Sandbox,
    SandboxError,
    boot,
)
from annex_gahp.testing.waiting import wait_for

__all__ = ["AnnexPool", "BootedInstance", "Sandbox", "SandboxError", "wait_for"]

CONFIG_FILE = "99-zzz-annex-pytest.conf"  # read last: a test's knobs win over the pool's


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("htcondor_annex", "HTCondor annex pool (annex_gahp.testing)")
    group.addoption(
        "--annex-pool-dir", default=None, metavar="DIR",
        help="where the sandbox pool lives on the host (default: $ANNEX_SANDBOX, else "
             f"{DEFAULT_POOL_DIR}); a sandbox already running there is reused")
    group.addoption(
        "--annex-keep", action="store_true", default=False,
        help="leave a sandbox this run started running at the end")
    group.addoption(
        "--annex-source", default=None, metavar="DIR",
        help="the project's source tree to install into a new sandbox (default: "
             "$ANNEX_SANDBOX_SRC, else the checkout this package is in)")


class AnnexPool:
    """The sandbox as one test sees it: everything of Sandbox, plus knobs undone afterwards."""

    def __init__(self, sandbox: Sandbox):
        self.sandbox = sandbox
        self.knobs: dict[str, object] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sandbox, name)

    def config(self, **knobs: object) -> None:
        """Set pool knobs (condor_reconfig included); removed again when the test ends."""
        self.knobs.update(knobs)
        self.sandbox.set_config(CONFIG_FILE, self.knobs)

    def undo_config(self) -> None:
        if self.knobs:
            self.knobs.clear()
            self.sandbox.set_config(CONFIG_FILE, {})


@pytest.fixture(scope="session")
def annex_sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    opt = request.config.getoption
    pool_dir = opt("--annex-pool-dir") or os.environ.get("ANNEX_SANDBOX") or DEFAULT_POOL_DIR
    source = opt("--annex-source") or os.environ.get("ANNEX_SANDBOX_SRC")
    try:
        sandbox = Sandbox.open(Path(pool_dir), Path(source) if source else None)
    except SandboxError as e:
        pytest.fail(f"no annex pool: {e}", pytrace=False)
    yield sandbox
    sandbox.close(keep=opt("--annex-keep"))


@pytest.fixture
def annex_pool(annex_sandbox: Sandbox) -> Iterator[AnnexPool]:
    pool = AnnexPool(annex_sandbox)
    yield pool
    pool.undo_config()


@pytest.fixture
def boot_instance(annex_sandbox: Sandbox) -> Any:
    # No termination when the test ends: an instance belongs to whoever launched it (an annex's
    # to the helper, which ends it with the annex; a module fixture's to that fixture).
    def boot_one(instance_id: str | None = None, *, annex: str | None = None,
                 timeout: float = 120) -> BootedInstance:
        return boot(annex_sandbox, instance_id, annex=annex, timeout=timeout)

    return boot_one
