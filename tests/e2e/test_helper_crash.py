"""The helper killed at every step of a create and of a retire, under the real condor_master.

For each checkpoint of annex_gahp/faults.py: arm it (ANNEX_GAHP_TEST_FAULTS in a config file,
condor_reconfig), drive a create (a job naming the annex, or `htcondor-annex create` as alice)
and, for the retire checkpoints, a retire (`htcondor-annex delete` or the idle timeout). The
helper SIGKILLs itself there; condor_master starts a new one. Then:

- the annex ends with exactly the instances it asked for, counted by their tags in the
  emulator, in every state: nothing was ever launched twice;
- its collector ad is there with the right counts while it lives, and gone once it retired;
- once retired, nothing of it is left: no instance, no launch template, no SSM parameter
  (and, over the whole pool, no such thing without a live annex).

Then the state file: corrupted while an annex runs, the helper refuses to start and its log
names the file; moved aside as docs/admin.md says, the next helper rebuilds the annex from the
instances' tags: the same instances, no new ones, the ad back.

One sandbox for the whole file. The master's restart delay for ANNEXD and the reconcile
interval are shortened by a test config file, so a case takes seconds, not minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import sandbox as sb

from annex_gahp import client, names
from annex_gahp import settings as settings_mod
from annex_gahp.cloud.aws import fleet, secrets

# Serial (scripts/test runs it alone): kills the helper and reconfigures the pool.
pytestmark = [pytest.mark.sandbox, pytest.mark.serial]

USER = "alice"
WANT = 2
LOG = Path("/var/log/condor/AnnexGahpLog")
CONFIG_D = Path("/etc/condor/config.d")
TUNING = CONFIG_D / "99-zz-test-helper-crash.conf"
FAULTS = CONFIG_D / "99-zz-test-faults.conf"
RECONCILE = 1  # s, the helper's cycle here: the cases wait for a few of them

CREATE_POINTS = [
    "create.recorded",
    "create.prepared",
    "create.intent",
    "create.launched",
    "create.finished",
]
RETIRE_POINTS = ["retire.recorded", "retire.terminated", "retire.released"]


# --- the helper, its log and its knobs ----------------------------------------------------------


def log_size() -> int:
    return LOG.stat().st_size if LOG.exists() else 0


def log_since(offset: int) -> str:
    with LOG.open("rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace")


def log_tail(lines: int = 40) -> str:
    text = LOG.read_text(errors="replace") if LOG.exists() else ""
    return "AnnexGahpLog tail:\n" + "\n".join(text.splitlines()[-lines:])


def started_pids(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"annex_gahp starting \(pid (\d+)\)", text)]


def ours(pid: int) -> bool:
    """The pid is alive and in this sandbox (processes of other sandboxes are visible too)."""
    try:
        return os.readlink(f"/proc/{pid}/root") == "/"
    except OSError:
        return False


def helper_pid() -> int:
    """The running helper's pid, from its own log line, checked against /proc."""

    def find() -> int | None:
        pids = started_pids(LOG.read_text(errors="replace"))
        if pids and ours(pids[-1]) and "serving " in log_since(0).split(f"(pid {pids[-1]})")[-1]:
            return pids[-1]
        return None

    return sb.wait_for(find, timeout=60, what="a running annex_gahp", on_timeout=log_tail)


def ensure_running() -> None:
    """Start the helper now if the master holds it back (its restart delay grows with each
    quick death, up to an hour: earlier tests may have left it waiting)."""
    pids = started_pids(LOG.read_text(errors="replace")) if LOG.exists() else []
    if not (pids and ours(pids[-1])):
        subprocess.run(["condor_on", "-daemon", "ANNEXD"], check=True, capture_output=True)
    helper_pid()


def reconfig() -> None:
    subprocess.run(["condor_reconfig"], check=True, capture_output=True, text=True)


def fired_file() -> Path:
    return Path(settings().state_dir) / "test-faults-fired"


def arm(point: str) -> None:
    """Arm one checkpoint and wait until the helper says so."""
    offset = log_size()
    FAULTS.write_text(f"ANNEX_GAHP_TEST_FAULTS = {point}\n")
    reconfig()
    sb.wait_for(
        lambda: f"test faults armed: {point}" in log_since(offset),
        timeout=30,
        what=f"the helper to arm {point}",
        on_timeout=log_tail,
    )


def disarm() -> None:
    offset = log_size()
    FAULTS.unlink(missing_ok=True)
    fired_file().unlink(missing_ok=True)
    reconfig()
    sb.wait_for(
        lambda: "configuration reloaded" in log_since(offset),
        timeout=30,
        what="the helper to reload its configuration",
        on_timeout=log_tail,
    )


def wait_restarted(old_pid: int, offset: int, point: str | None = None) -> int:
    """Wait for the helper that was `old_pid` to die (at `point`) and a new one to serve."""

    def restarted() -> int | None:
        text = log_since(offset)
        if point and f"SIGKILL at checkpoint {point}" not in text:
            return None
        new = [p for p in started_pids(text) if p != old_pid]
        if new and ours(new[-1]) and "serving " in text.split(f"(pid {new[-1]})")[-1]:
            return new[-1]
        return None

    new_pid = sb.wait_for(
        restarted,
        timeout=90,
        what=f"annex_gahp to die{' at ' + point if point else ''} and be restarted",
        on_timeout=log_tail,
    )
    assert not ours(old_pid), f"the old helper {old_pid} still runs"
    return new_pid


_settings = None


def settings() -> settings_mod.Settings:
    global _settings  # noqa: PLW0603 - read once per test run
    if _settings is None:
        _settings = settings_mod.load()
    return _settings


# --- what the cloud and the collector hold --------------------------------------------------------


def tagged(owner: str, name: str, states: tuple[str, ...] = ("pending", "running")) -> list[dict]:
    return sb.instances(
        [
            {"Name": f"tag:{names.TAG_OWNER}", "Values": [owner]},
            {"Name": f"tag:{names.TAG_NAME}", "Values": [name]},
            {"Name": f"tag:{names.TAG_POOL}", "Values": [settings().pool_id]},
        ],
        states=states,
    )


def template_exists(owner: str, name: str) -> bool:
    wanted = fleet.template_name(settings().pool_id, owner, name)
    found = sb.ec2_client().describe_launch_templates(
        Filters=[{"Name": f"tag:{names.TAG_POOL}", "Values": [settings().pool_id]}]
    )["LaunchTemplates"]
    return any(t["LaunchTemplateName"] == wanted for t in found)


def parameter_name(owner: str, name: str) -> str:
    cfg = settings()
    return secrets.parameter_name(cfg.token_parameter_prefix, cfg.pool_id, owner, name)


def parameter_exists(owner: str, name: str) -> bool:
    ssm = sb.aws_client("ssm")
    try:
        ssm.get_parameter(Name=parameter_name(owner, name))
    except ssm.exceptions.ParameterNotFound:
        return False
    return True


def annex_ads(owner: str, name: str) -> list:
    return sb.query_ads("Any", f'MyType == "Annex" && Owner == "{owner}" && AnnexName == "{name}"')


def live_annexes() -> set[tuple[str, str]]:
    """(owner, name) of every annex the helper holds, as root (an admin sees all)."""
    views = json.loads(client.call("ANNEX_LIST", path=settings().socket_path)["json"])
    return {(v["Owner"], v["AnnexName"]) for v in views}


def nothing_orphaned() -> None:
    """Over the whole pool: every instance, launch template and token parameter of this pool
    belongs to an annex the helper still holds."""
    cfg = settings()
    live = live_annexes()
    pool = [{"Name": f"tag:{names.TAG_POOL}", "Values": [cfg.pool_id]}]
    for inst in sb.instances(pool):
        tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
        key = (tags.get(names.TAG_OWNER), tags.get(names.TAG_NAME))
        assert key in live, f"instance {inst['InstanceId']} of {key} has no live annex"
    for lt in sb.ec2_client().describe_launch_templates(Filters=pool)["LaunchTemplates"]:
        tags = {t["Key"]: t["Value"] for t in lt.get("Tags", [])}
        if names.TAG_OWNER not in tags:
            continue  # the setup's base template, shared by all annexes
        key = (tags.get(names.TAG_OWNER), tags.get(names.TAG_NAME))
        assert key in live, f"launch template {lt['LaunchTemplateName']} has no live annex"
    ssm = sb.aws_client("ssm")
    base = secrets.pool_path(cfg.token_parameter_prefix, cfg.pool_id)
    wanted = {parameter_name(o, n) for o, n in live}
    for page in ssm.get_paginator("get_parameters_by_path").paginate(Path=base, Recursive=True):
        for param in page["Parameters"]:
            assert param["Name"] in wanted, f"SSM parameter {param['Name']} has no live annex"


def diagnostics(name: str) -> str:
    inst = [
        (i["InstanceId"], i["State"]["Name"], _tag(i, names.TAG_REQUEST))
        for i in tagged(USER, name, states=())
    ]
    ads = [dict(a) for a in annex_ads(USER, name)]
    return f"instances: {inst}\nads: {ads}\n{log_tail()}"


def _tag(inst: dict, key: str) -> str:
    return next((t["Value"] for t in inst.get("Tags", []) if t["Key"] == key), "")


def assert_converged(name: str) -> None:
    """Exactly WANT instances, ever, for the annex; the ad says so; and it stays that way."""

    def converged() -> bool:
        ads = annex_ads(USER, name)
        return (
            len(tagged(USER, name)) == WANT
            and len(ads) == 1
            and ads[0].get("AnnexState") == names.RUNNING
            and ads[0].get("RunningInstances") == WANT
        )

    sb.wait_for(
        converged,
        timeout=90,
        what=f"annex {name} to run {WANT} instances with a correct ad",
        on_timeout=lambda: diagnostics(name),
    )
    time.sleep(3 * RECONCILE)  # a few more cycles: nothing more may be launched
    ever = tagged(USER, name, states=())
    assert len(ever) == WANT, f"{len(ever)} instances were launched for {name}:\n" + diagnostics(
        name
    )
    assert len(tagged(USER, name)) == WANT
    (ad,) = annex_ads(USER, name)
    assert ad["Owner"] == USER and ad["AnnexName"] == name
    assert ad["RequestedInstances"] == WANT and ad["RunningInstances"] == WANT
    assert ad["AnnexState"] == names.RUNNING
    assert template_exists(USER, name), "the live annex lost its launch template"
    assert parameter_exists(USER, name), "the live annex lost its token parameter"
    status = json.loads(
        client.call("ANNEX_STATUS", path=settings().socket_path, name=name, owner=USER)["json"]
    )
    recorded = {i["id"] for i in status["instances"] if i["state"] in ("pending", "running")}
    assert recorded == {i["InstanceId"] for i in ever}, "records and cloud disagree"


def assert_retired(name: str) -> None:
    def gone() -> bool:
        return (
            not tagged(USER, name)
            and not annex_ads(USER, name)
            and not template_exists(USER, name)
            and not parameter_exists(USER, name)
            and (USER, name) not in live_annexes()
        )

    sb.wait_for(
        gone,
        timeout=90,
        what=f"annex {name} to be retired without leftovers",
        on_timeout=lambda: diagnostics(name),
    )
    nothing_orphaned()


# --- driving annexes ----------------------------------------------------------------------------


def htcondor_annex(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return sb.run_as(USER, "htcondor-annex", *args, check=check, timeout=60)


def create_by_cli(name: str, idle_timeout: str = "30m") -> None:
    htcondor_annex(
        "create", "--name", name, "--instances", str(WANT), "--idle-timeout", idle_timeout
    )


def create_by_job(name: str) -> int:
    workdir = sb.user_tmpdir(USER, "annex-crash-")
    return sb.condor_submit_as(
        USER,
        "\n".join(
            [
                "executable = /bin/sleep",
                "arguments = 600",
                f"annex_name = {name}",
                f"annex_instances = {WANT}",
                "annex_idle_timeout = 30m",
                "log = job.log",
                "queue",
                "",
            ]
        ),
        cwd=str(workdir),
    )


def delete(name: str) -> None:
    htcondor_annex("delete", "--name", name)


@pytest.fixture(scope="module")
def tuned(sandbox):
    """Short reconcile interval, and the master restarts the helper 2 s after it dies
    (default: 10 s, doubling with each quick death)."""
    TUNING.write_text(
        "# tests/e2e/test_helper_crash.py\n"
        f"ANNEX_RECONCILE_INTERVAL = {RECONCILE}\n"
        "MASTER_ANNEXD_BACKOFF_CONSTANT = 1\n"
        "MASTER_ANNEXD_BACKOFF_FACTOR = 1.0\n"
    )
    FAULTS.unlink(missing_ok=True)
    ensure_running()
    disarm()
    yield
    FAULTS.unlink(missing_ok=True)
    TUNING.unlink(missing_ok=True)
    disarm()


@pytest.fixture
def clean(tuned):
    """Each case leaves no annex behind and nothing armed, whatever happened."""
    made: list[str] = []
    jobs: list[int] = []
    yield made, jobs
    for cluster in jobs:
        sb.run_as(USER, "condor_rm", str(cluster), check=False)
    if FAULTS.exists() or fired_file().exists():
        disarm()
    try:
        live = live_annexes()
    except Exception:  # the helper is down after a failure: ask for every delete
        live = None
    for name in made:
        if live is None or (USER, name) in live:
            delete(name)
    for name in made:
        sb.wait_for(
            lambda n=name: not tagged(USER, n) and (USER, n) not in live_annexes(),
            timeout=90,
            what=f"clean-up of {name}",
            on_timeout=lambda n=name: diagnostics(n),
        )


def _name(point: str) -> str:
    return f"{point.replace('.', '-')}-{uuid.uuid4().hex[:6]}"


# --- the cases ----------------------------------------------------------------------------------


@pytest.mark.parametrize("point", CREATE_POINTS)
def test_killed_while_creating(point, clean):
    made, jobs = clean
    name = _name(point)
    made.append(name)
    old = helper_pid()
    arm(point)
    offset = log_size()
    if point == "create.recorded":
        # The translate hook's JOB_ROUTED dies with the helper; the router tries again later.
        jobs.append(create_by_job(name))
    else:
        create_by_cli(name)
    wait_restarted(old, offset, point)
    assert_converged(name)
    delete(name)
    assert_retired(name)


@pytest.mark.parametrize(
    ("point", "trigger"),
    [
        ("retire.recorded", "delete"),
        ("retire.terminated", "delete"),
        ("retire.terminated", "idle"),
        ("retire.released", "delete"),
    ],
)
def test_killed_while_retiring(point, trigger, clean):
    made, _ = clean
    name = _name(point)
    made.append(name)
    if trigger == "delete":
        create_by_cli(name)
        assert_converged(name)
    old = helper_pid()
    arm(point)
    offset = log_size()
    if trigger == "delete":
        delete(name)
    else:
        # Idle: the annex retires by itself 5 s after it was made (no job ever wanted it). The
        # retire checkpoint is armed first, so a slow reconfig cannot let the retire pass it.
        create_by_cli(name, idle_timeout="5s")
    wait_restarted(old, offset, point)
    assert_retired(name)
    if trigger == "idle":
        assert "retiring: idle" in log_since(0).split(f"annex {USER}/{name} requested")[-1]


# --- the state file -----------------------------------------------------------------------------


def state_file() -> Path:
    return Path(settings().state_dir) / "annexes.sqlite"


def kill_helper(pid: int) -> None:
    assert ours(pid)
    os.kill(pid, signal.SIGKILL)


def test_corrupt_state_refuses_to_start_and_moved_aside_rebuilds_from_tags(clean):
    made, _ = clean
    name = f"state-{uuid.uuid4().hex[:6]}"
    made.append(name)
    create_by_cli(name)
    assert_converged(name)
    ids = {i["InstanceId"] for i in tagged(USER, name)}
    path = state_file()
    backup = path.with_name("annexes.sqlite.test-copy")
    shutil.copy(path, backup)  # for diagnosis only

    # The file and its write-ahead log turn to garbage under the helper (frozen meanwhile, so
    # it cannot write good pages back), then the helper crashes. (Garbage in the file alone is
    # no test: SQLite reads the pages the log still holds from the log.)
    pid = helper_pid()
    offset = log_size()
    os.kill(pid, signal.SIGSTOP)
    for victim in (path, Path(f"{path}-wal")):
        if victim.exists():
            size = victim.stat().st_size
            with victim.open("r+b") as handle:
                handle.write(os.urandom(size))
    kill_helper(pid)
    refusal = f"the state file {path} is unreadable"
    aside = path.with_name("annexes.sqlite.bad")
    try:
        sb.wait_for(
            lambda: log_since(offset).count(refusal) >= 2,  # it refuses, and refuses again
            timeout=60,
            what="the helper to refuse the corrupt state file (twice)",
            on_timeout=log_tail,
        )
        text = log_since(offset)
        assert "Move it aside" in text
        assert "serving " not in text, "a helper serves from a corrupt file"
        # Nothing was forgotten or duplicated meanwhile: the instances just run on.
        assert {i["InstanceId"] for i in tagged(USER, name)} == ids
    finally:
        # The admin's recovery, as docs/admin.md says: move the files aside, start it now.
        offset = log_size()
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(path) + suffix)
            if src.exists():
                src.rename(Path(str(aside) + suffix))
        subprocess.run(["condor_on", "-daemon", "ANNEXD"], capture_output=True, check=False)
    sb.wait_for(
        lambda: f"adopted annex {USER}/{name} from tags" in log_since(offset),
        timeout=60,
        what="the restarted helper to adopt the annex from its tags",
        on_timeout=log_tail,
    )
    assert_converged(name)
    assert {i["InstanceId"] for i in tagged(USER, name, states=())} == ids  # the same ones
    for suffix in ("", "-wal", "-shm"):
        Path(str(aside) + suffix).unlink(missing_ok=True)
    backup.unlink(missing_ok=True)
    delete(name)
    assert_retired(name)


def test_state_file_moved_aside_alone_still_rebuilds_from_tags(clean):
    """An admin who moves only annexes.sqlite and leaves its -wal/-shm files behind must not get
    a helper that replays the old journal into the new file."""
    made, _ = clean
    name = f"walonly-{uuid.uuid4().hex[:6]}"
    made.append(name)
    create_by_cli(name)
    assert_converged(name)
    ids = {i["InstanceId"] for i in tagged(USER, name)}
    path = state_file()
    pid = helper_pid()
    offset = log_size()
    kill_helper(pid)  # a crash leaves the write-ahead log behind
    aside = path.with_name("annexes.sqlite.bad")
    path.rename(aside)
    wait_restarted(pid, offset)
    sb.wait_for(
        lambda: f"adopted annex {USER}/{name} from tags" in log_since(offset),
        timeout=60,
        what="the restarted helper to adopt the annex from its tags",
        on_timeout=log_tail,
    )
    assert_converged(name)
    assert {i["InstanceId"] for i in tagged(USER, name, states=())} == ids
    aside.unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        for leftover in path.parent.glob(path.name + suffix + "*"):
            if leftover.name != path.name + suffix:
                leftover.unlink()
    delete(name)
    assert_retired(name)
