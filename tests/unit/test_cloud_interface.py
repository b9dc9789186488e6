"""The cloud interface's rules (issue 13): the loop reaches a cloud only through
annex_gahp.cloud's Protocol, a strategy is one registry line, nothing outside annex_gahp/cloud
imports the AWS SDK or names a strategy to decide something, and what prepare made survives a
state file of schema 2."""

from __future__ import annotations

import ast
import dataclasses
import sqlite3
from pathlib import Path

from aws_fixtures import REGION, moto_server_url, moto_url  # noqa: F401
from test_reconcile import build, want

from annex_gahp import names
from annex_gahp.cloud import LaunchOutcome, Observed
from annex_gahp.cloud.aws import backends
from annex_gahp.cloud.aws.cloud import AwsCloud
from annex_gahp.cloud.aws.tokenstores import recorded_token
from annex_gahp.store import SCHEMA_VERSION, Annex, Store

PACKAGE = Path(__file__).parents[2] / "annex_gahp"
CLOUD = PACKAGE / "cloud"
# The pytest plugin hands a test an EC2 client on the emulator (issue 19's `annex_pool.ec2`): it
# is a test harness beside the helper, not a path of the helper's to a cloud.
TEST_HARNESS = PACKAGE / "testing"
SDK = ("boto3", "botocore", "s3transfer")
# What the cloud package serves and so must not import: the loop, the request handlers, the
# transports (and the daemon that wires them).
ABOVE_THE_CLOUD = ("reconcile", "service", "transports", "gahp", "daemon", "controllers")


def modules(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "templates" not in p.parts)


def imported(path: Path) -> list[str]:
    """Every module name an import statement in `path` names, wherever it is (lazy ones too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def strategy_comparisons(path: Path) -> list[str]:
    """`x == "stack"`, `"fleet" != y`, `x in ("fleet", ...)`, `match x: case "stack"`: a
    decision made on a strategy's name."""
    strategies = set(backends.BACKENDS) | set(names.STRATEGIES)
    found = []

    def literal_names(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return {e.value for e in node.elts if isinstance(e, ast.Constant)}
        return set()

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            named = set().union(*(literal_names(n) for n in (node.left, *node.comparators)))
            if named & strategies:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
        elif isinstance(node, ast.MatchValue) and literal_names(node.value) & strategies:
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_no_module_outside_the_cloud_package_imports_the_aws_sdk():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path in modules(PACKAGE)
        if CLOUD not in path.parents and TEST_HARNESS not in path.parents
        for name in imported(path)
        if name.split(".")[0] in SDK
    ]
    assert offenders == []


def test_the_cloud_package_imports_nothing_above_it():
    above = {f"annex_gahp.{m}" for m in ABOVE_THE_CLOUD}
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path in modules(CLOUD)
        for name in imported(path)
        if any(name == m or name.startswith(m + ".") for m in above)
    ]
    assert offenders == []


def test_no_module_outside_the_cloud_package_decides_on_a_strategy_name():
    offenders = [
        hit
        for path in modules(PACKAGE)
        if CLOUD not in path.parents
        for hit in strategy_comparisons(path)
    ]
    assert offenders == []


def test_the_scans_find_what_they_look_for(tmp_path):
    """The scans above would see a broken rule (they are not vacuous)."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import botocore.session\n"
        "from annex_gahp.service import AnnexService\n"
        "def f(s):\n"
        "    from boto3 import client\n"
        "    return s.strategy == 'stack' or s.strategy in ('fleet', 'x')\n"
    )
    assert {"botocore.session", "boto3", "annex_gahp.service"} <= set(imported(bad))
    global PACKAGE  # noqa: PLW0603 - the hit's path is shown relative to it
    kept, PACKAGE = PACKAGE, tmp_path
    try:
        assert len(strategy_comparisons(bad)) == 2
    finally:
        PACKAGE = kept


# --- a third backend ----------------------------------------------------------------------------


class ThirdBackend:
    """A strategy the loop has never heard of; records what it is asked."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.calls: list[tuple] = []

    def prepare(self, annex: Annex) -> dict[str, str]:
        self.calls.append(("prepare", annex.name))
        return {"thing": f"third-{annex.name}"}

    def ensure(self, annex: Annex, target: int, have: int, request: str) -> LaunchOutcome:
        self.calls.append(("ensure", annex.cloud_resources["thing"], target, have))
        return LaunchOutcome(instance_ids=[], errors=[])  # capacity comes later, in its time

    def extend(self, annex: Annex, ids: list[str]) -> None:
        self.calls.append(("extend", annex.name))

    def release(self, annex: Annex) -> None:
        self.calls.append(("release", annex.cloud_resources["thing"]))

    def release_leftovers(self, annex: Annex) -> None:
        self.calls.append(("release_leftovers", annex.name))

    def observed(self, region: str, seen: list[Observed]) -> None:
        self.calls.append(("observed", region))

    def remove(self, region: str, ids: list[str]) -> list[str]:
        return ids

    def purge(self, *, dry_run: bool = False) -> dict[str, list[str]]:
        return {"things": []}


def test_a_third_backend_in_the_registry_is_used_without_touching_the_loop(moto_url, tmp_path):  # noqa: F811
    world = build(moto_url, tmp_path)
    made: list[ThirdBackend] = []

    def third(ctx):
        made.append(ThirdBackend(ctx))
        return made[-1]

    cloud = AwsCloud(
        world.cloud.settings,
        mint=lambda identity, lifetime: "t",
        registry={**backends.BACKENDS, "third": third},
    )
    world.loop.cloud = cloud
    annex = want(world, instances=3)
    third_spec = dataclasses.replace(annex.spec, strategy="third")
    annex = world.store.update_annex(annex.id, spec=third_spec)

    world.loop.run_once()
    (backend,) = made
    assert ("prepare", "burst") in backend.calls
    assert ("ensure", "third-burst", 3, 0) in backend.calls
    assert ("observed", REGION) in backend.calls  # it sees every observation
    annex = world.store.get(annex.id)
    assert annex.cloud_resources == {"thing": "third-burst"}  # recorded before ensure
    assert annex.state == names.PROVISIONING and annex.last_error == ""
    assert world.fleet_calls == []  # the fleet backend was not asked

    annex = world.service.retire(annex, "deleted")  # as `htcondor-annex delete` does
    world.loop.run_once()
    assert ("release", "third-burst") in backend.calls
    assert world.store.get(annex.id).state == names.RETIRED
    assert "things" in cloud.purge(dry_run=True)


# --- the store: what prepare made, from a schema 2 file ----------------------------------------


def test_a_version_2_state_file_keeps_what_prepare_made(tmp_path):
    path = str(tmp_path / "v2.sqlite")
    Store(path).close()
    db = sqlite3.connect(path)  # made into what version 2 wrote: two named columns
    db.execute("ALTER TABLE annexes DROP COLUMN cloud_resources")
    db.execute("ALTER TABLE annexes ADD COLUMN template_id TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE annexes ADD COLUMN token_parameter TEXT NOT NULL DEFAULT ''")
    for name, template, token in (
        ("stacked", "annex-p-alice-stacked", "s3://htcondor-annex-b1/token"),
        ("fleeted", "lt-0123", "/htcondor-annex/tokens/p/alice/fleeted"),
        ("fresh", "", ""),
    ):
        db.execute(
            "INSERT INTO annexes(owner, name, state, spec, region, requested, lease_expiration,"
            " created, updated, template_id, token_parameter)"
            " VALUES ('alice', ?, 'running', '{}', 'us-east-1', 2, 9, 1, 1, ?, ?)",
            (name, template, token),
        )
    db.execute("UPDATE meta SET value='2' WHERE key='schema'")
    db.commit()
    db.close()

    store = Store(path)
    assert store._db.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION) == "4"
    stacked = store.live("alice", "stacked")
    assert stacked.cloud_resources == {
        "template_id": "annex-p-alice-stacked",
        "token_parameter": "s3://htcondor-annex-b1/token",
    }
    assert recorded_token(stacked) == "s3://htcondor-annex-b1/token"  # the backends read it
    assert store.live("alice", "fleeted").cloud_resources["template_id"] == "lt-0123"
    assert store.live("alice", "fresh").cloud_resources == {}
    updated = store.update_annex(stacked.id, cloud_resources={"stack": "s", "token": "t"})
    assert updated.cloud_resources == {"stack": "s", "token": "t"}
    store.close()
    assert Store(path).get(stacked.id).cloud_resources == {"stack": "s", "token": "t"}
