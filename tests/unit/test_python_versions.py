"""The package runs on Python 3.9, the system Python of EL9 that carries HTCondor's bindings
there (issue 18; setup.cfg python_requires, docs/admin.md "Requirements").

vermin (pinned in scripts/sandbox's PIP_PACKAGES) finds any library call or syntax newer than
3.9 in the package, and ruff's target version keeps its upgrade rules from proposing one. What
vermin does not see is checked here by reading the code: a `X | Y` annotation outside a module
with `from __future__ import annotations` (evaluated at import on 3.9), `isinstance(x, A | B)`
(a union as a value needs 3.10), and `except TimeoutError` (a socket timeout is one only from
3.10 on). Found by running the fast tier under 3.9 once (docs/admin.md, "Requirements").
"""

from __future__ import annotations

import ast
import configparser
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "annex_gahp"
MINIMUM = "3.9"


def python_sources() -> list[Path]:
    """The package's Python: modules, and scripts with a python shebang (hooks, booter)."""
    found = sorted(PACKAGE.rglob("*.py"))
    for path in sorted(PACKAGE.rglob("*")):
        if path.is_file() and path.suffix == "" and path.stat().st_size:
            with path.open("rb") as handle:
                first = handle.readline()
            if first.startswith(b"#!") and b"python" in first:
                found.append(path)
    return found


def test_python_requires_and_ruffs_target_say_the_minimum() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["options"]["python_requires"] == f">={MINIMUM}"
    target = re.search(r'^target-version = "(\w+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert target and target[1] == "py" + MINIMUM.replace(".", "")


def test_vermin_finds_nothing_newer_than_the_minimum() -> None:
    vermin = Path(sys.executable).with_name("vermin")
    res = subprocess.run(
        [str(vermin), f"--target={MINIMUM}-", "--violations", "--eval-annotations",
         "--no-tips", "--processes=1", *map(str, python_sources())],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Minimum required versions: " in res.stdout, res.stdout


def _union(node: ast.AST | None) -> bool:
    return node is not None and any(
        isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(node)
    )


def _annotations(tree: ast.AST) -> list[ast.AST]:
    found: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            found += [a.annotation for a in every if a is not None and a.annotation]
            found += [node.returns] if node.returns else []
        elif isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
    return found


def test_no_union_that_python_3_9_would_evaluate() -> None:
    problems = []
    for path in python_sources():
        tree = ast.parse(path.read_text(), str(path))
        postponed = any(
            isinstance(n, ast.ImportFrom)
            and n.module == "__future__"
            and any(a.name == "annotations" for a in n.names)
            for n in tree.body
        )
        if not postponed:
            problems += [
                f"{path}:{a.lineno}: X | Y annotation without `from __future__ import annotations`"
                for a in _annotations(tree)
                if _union(a)
            ]
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass")
                and len(node.args) == 2
                and _union(node.args[1])
            ):
                problems.append(f"{path}:{node.lineno}: {node.func.id}() with an X | Y union")
            # A socket's timeout is TimeoutError only from 3.10 on (on 3.9 socket.timeout is
            # a plain OSError): catching TimeoutError lets it through, as vermin cannot see.
            if (
                isinstance(node, ast.ExceptHandler)
                and node.type is not None
                and "TimeoutError" in {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}
            ):
                problems.append(f"{path}:{node.lineno}: except TimeoutError (use socket.timeout)")
    assert not problems, "\n".join(problems)
