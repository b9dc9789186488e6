"""The loop and its controllers stand below the request handlers and above the cloud: they never
import service.py, the transports or an SDK (the cloud reaches them as the `Cloud` they are
given, the schedd as `DemandSource`)."""

from __future__ import annotations

import ast
import inspect
import pathlib
import subprocess
import sys

from annex_gahp import controllers, schedd
from annex_gahp.controllers import DemandSource

PACKAGE = pathlib.Path(controllers.__file__).parent
LOOP = [*sorted(PACKAGE.glob("*.py")), PACKAGE.parent / "reconcile.py"]
FORBIDDEN = (
    "annex_gahp.service",
    "annex_gahp.transports",
    "annex_gahp.gahp",
    "annex_gahp.cli",
    "annex_gahp.aws",
    "annex_gahp.cloud.aws",
    "boto3",
    "botocore",
)


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_no_controller_imports_the_handlers_the_transports_or_an_sdk():
    assert len(LOOP) >= 7  # the package's modules were found
    for path in LOOP:
        for name in _imports(path):
            bad = [f for f in FORBIDDEN if name == f or name.startswith(f + ".")]
            assert not bad, f"{path.name} imports {name}"


def test_importing_the_loop_loads_no_sdk_and_no_handler():
    code = (
        "import sys, annex_gahp.reconcile\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('boto3', 'botocore') or m in ('annex_gahp.service', 'annex_gahp.transports'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_demand_protocol_is_what_the_schedd_offers():
    """Every method the loop may call on the schedd exists on the real one, with the same
    parameters: no getattr fallback hides a missing one."""
    wanted = {n for n, _ in inspect.getmembers(DemandSource) if not n.startswith("_")}
    assert wanted >= {"counts", "hold", "annotate", "reschedule", "hold_left_behind", "reroute"}
    for name in wanted:
        real = inspect.signature(getattr(schedd.ScheddDemand, name)).parameters.values()
        declared = inspect.signature(getattr(DemandSource, name)).parameters.values()
        assert [(p.name, p.kind) for p in real] == [(p.name, p.kind) for p in declared], name


def test_no_getattr_fallbacks_in_the_loop():
    for path in LOOP:
        assert "getattr(self" not in path.read_text(), path.name
