"""docs/getting-started.md, followed word for word in the sandbox (issue 18).

The commands are read from the document itself: every ```sh block there is preceded by a
marker, `<!-- getting-started: run as=USER id=ID -->` or `<!-- getting-started: not run:
REASON -->`. The runnable blocks are run in document order, each in a fresh `bash -e` as its
user, and each id has a check here of what the block must have achieved; a block added,
removed or renamed in the document without its check here fails the test, so the two cannot
drift apart.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import sandbox
from test_lifecycle import ALICE, annex_instances, htcondor_annex, status

# Serial: it runs install-config and condor_restart on the pool the other tests share.
pytestmark = [pytest.mark.sandbox, pytest.mark.serial]

DOC = Path(os.environ.get("ANNEX_SRC", "/src")) / "docs" / "getting-started.md"
MARKER = re.compile(
    r"^<!-- getting-started: (run as=(?P<user>\w+) id=(?P<id>[\w-]+)|not run: .+) -->$"
)
VENV = Path("/opt/annex-venv")  # docs/getting-started.md's venv, and the sandbox's
CONFIG_DIR = Path("/etc/condor/config.d")
LINK = Path("/usr/local/bin/htcondor-annex")
HELP = Path("/etc/condor/annex-submit-help.txt")
ANNEX = "first"


@dataclass(frozen=True)
class Block:
    line: int
    user: str
    id: str
    script: str


def blocks(text: str) -> list[Block]:
    """The runnable blocks, in order; every sh block must carry a marker."""
    lines = text.splitlines()
    found = []
    for number, line in enumerate(lines):
        if line.strip() != "```sh":
            continue
        marker = MARKER.match(lines[number - 1].strip()) if number else None
        assert marker, f"{DOC.name}:{number + 1}: a sh block without a getting-started marker"
        end = lines.index("```", number + 1)
        if marker.group("id"):
            script = "\n".join(lines[number + 1 : end]) + "\n"
            found.append(Block(number + 1, marker.group("user"), marker.group("id"), script))
    return found


def run(block: Block) -> subprocess.CompletedProcess[str]:
    res = sandbox.run_as(block.user, "bash", "-e", "-c", block.script, check=False, timeout=1900)
    assert res.returncode == 0, (
        f"{DOC.name}:{block.line} ({block.id}) exited {res.returncode}\n"
        f"--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"
    )
    return res


# -- what each block must have done ---------------------------------------------------------


def check_prereqs(res) -> None:
    assert re.search(r"\$CondorVersion: 2[3-9]\.", res.stdout), res.stdout
    found = re.search(r"^python (\d+)\.(\d+)\.\d+ bindings \S+", res.stdout, re.M)
    assert found and (int(found[1]), int(found[2])) >= (3, 9), res.stdout
    assert "/etc/condor/config.d" in res.stdout


SOURCE = Path("/root/htcondor-annex-gahp")  # the reader's source directory, as the doc names it


def source_directory() -> None:
    """What the reader has before the install: the project's source directory, here a copy of
    the tree the sandbox was started from (as scripts/sandbox copies it; /src is read-only)."""
    shutil.rmtree(SOURCE, ignore_errors=True)
    skip = shutil.ignore_patterns(".git", "*.egg-info", "build", "__pycache__", ".pytest_cache")
    shutil.copytree(DOC.parents[1], SOURCE, ignore=skip)


def check_venv(res) -> None:
    # pip installed the project from the doc's directory (the sandbox's own install came from
    # /tmp/annex-src): the record pip keeps says where from.
    found = list(VENV.glob("lib/python3*/site-packages/htcondor_annex_gahp-*.dist-info"))
    assert len(found) == 1, found
    origin = json.loads((found[0] / "direct_url.json").read_text())
    assert origin["url"] == SOURCE.as_uri(), origin
    assert "Successfully installed" in res.stdout and "htcondor-annex-gahp" in res.stdout
    for program in ("annex_gahp", "htcondor-annex", "annex_hook_translate", "annex_provision_job"):
        assert (VENV / "bin" / program).is_file(), program
    # The venv sees the system's bindings and runs the installed package, which is the tree's.
    out = subprocess.run(
        [str(VENV / "bin" / "python"), "-c",
         "import htcondor2, annex_gahp.service as s; print(s.__file__)"],
        capture_output=True, text=True, check=True, cwd="/",  # not /src's tree
    ).stdout.strip()  # fmt: skip
    assert out.startswith(str(VENV)), out
    assert Path(out).read_bytes() == (SOURCE / "annex_gahp" / "service.py").read_bytes()


def check_install_config(res) -> None:
    shipped = VENV / "share" / "htcondor-annex-gahp"
    for conf in sorted((shipped / "condor_config.d").glob("*.conf")):
        assert (CONFIG_DIR / conf.name).read_bytes() == conf.read_bytes(), conf.name
        assert str(CONFIG_DIR / conf.name) in res.stdout
    assert f"ANNEX_BIN_DIR = {VENV}/bin\n" in (CONFIG_DIR / "11-annex-bin-dir.conf").read_text()
    assert HELP.read_bytes() == (shipped / "submit-help.txt").read_bytes()
    assert LINK.is_symlink() and LINK.resolve() == (VENV / "bin" / "htcondor-annex").resolve()
    # The help text is what condor_submit shows for the typed keywords.
    caps = sandbox.run_as(ALICE, "condor_submit", "-capabilities").stdout
    assert "annex_name" in caps


def check_aws_setup(res) -> None:
    assert "setup OK" in res.stdout, res.stdout
    assert (CONFIG_DIR / "15-annex-setup.conf").is_file()


MASTER_LOG: dict[str, int] = {}


def master_log() -> Path:
    return Path(subprocess.run(
        ["condor_config_val", "MASTER_LOG"], capture_output=True, text=True, check=True
    ).stdout.strip())  # fmt: skip


def before_restart() -> None:
    MASTER_LOG["offset"] = master_log().stat().st_size


def check_restart(res) -> None:
    # condor_restart only asks: the master restarts once every daemon has exited (a schedd in
    # a graceful shutdown can take minutes). Wait for the master's own start-up line after the
    # request, so the later blocks (and the serial tests after this one) do not meet a pool
    # that is about to go down; then the pool and the helper answer again.
    def restarted() -> bool:
        path = master_log()
        offset = MASTER_LOG["offset"] if path.stat().st_size >= MASTER_LOG["offset"] else 0
        with path.open("rb") as log:  # (from the start when the log was rotated meanwhile)
            log.seek(offset)
            return b"STARTING UP" in log.read()

    sandbox.wait_for(restarted, timeout=180, interval=1, what="condor_master to restart")
    sandbox.wait_for(
        lambda: htcondor_annex(ALICE, "status", check=False).returncode == 0
        and sandbox.run_as(ALICE, "condor_q", check=False).returncode == 0,
        timeout=90, interval=2, what="the pool and the helper after condor_restart",
    )  # fmt: skip


def check_check(res) -> None:
    # The helper's log, in HTCondor's date format, is its last lines.
    assert re.search(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d ", res.stdout, re.M), res.stdout


SEEN: dict[str, str] = {}


def check_first_annex(res) -> None:
    found = re.search(r"2 job\(s\) submitted to cluster (\d+)", res.stdout)
    assert found, res.stdout
    SEEN["cluster"] = found[1]


def rows_of_our_cluster(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.startswith(SEEN["cluster"] + " ")]


def check_watch(res) -> None:
    rows = rows_of_our_cluster(res.stdout)
    assert len(rows) == 2, res.stdout
    assert all(row[2] in ("requested", "provisioning", "running", "undefined") for row in rows)
    assert all(row[3] == "1" for row in rows if row[2] != "undefined"), res.stdout


def check_wait(res) -> None:
    rows = rows_of_our_cluster(res.stdout)
    assert len(rows) == 2 and all(row[2] == ANNEX for row in rows), res.stdout
    # out.0 and out.1 hold the host name of the annex instance each job ran on.
    lines = res.stdout.splitlines()
    assert lines[0] == "All jobs done.", res.stdout  # condor_wait's
    printed = lines[1:3]
    remote_hosts = {row[3].split("@", 1)[1] for row in rows}
    for host in printed:
        assert host and host != socket.gethostname(), res.stdout
        assert any(r.split(".")[0] == host.split(".")[0] for r in remote_hosts), res.stdout


def check_cleanup(res) -> None:
    sandbox.wait_for(
        lambda: not annex_instances(ALICE, ANNEX)
        and (status(ALICE, ANNEX) or {}).get("AnnexState") in (None, "retired"),
        timeout=90, interval=2, what=f"annex {ANNEX}'s instances to be terminated",
    )  # fmt: skip


CHECKS: dict[str, Callable[[subprocess.CompletedProcess[str]], None]] = {
    "prereqs": check_prereqs,
    "venv": check_venv,
    "install-config": check_install_config,
    "aws-setup": check_aws_setup,
    "restart": check_restart,
    "check": check_check,
    "first-annex": check_first_annex,
    "watch": check_watch,
    "wait": check_wait,
    "cleanup": check_cleanup,
}


def routed() -> None:
    """What the reader waits for before watching: the router has handed the jobs over."""
    sandbox.wait_for(
        lambda: all(
            ad.get("AnnexState") is not None
            for ad in sandbox.schedd().query(f"ClusterId == {SEEN['cluster']}")
        ),
        timeout=60, interval=1, what="the first annex's jobs to be routed",
    )  # fmt: skip


# What the document tells the reader to wait for before a block, if anything.
BEFORE: dict[str, Callable[[], None]] = {
    "venv": source_directory,
    "restart": before_restart,
    "watch": routed,
}


@pytest.fixture
def restore_sandbox():
    """Take away what the document adds that the sandbox did not have."""
    before = {p.name for p in CONFIG_DIR.iterdir()}
    yield
    for path in CONFIG_DIR.iterdir():
        if path.name not in before:
            path.unlink()
    for path in (LINK, HELP):
        if path.is_symlink() or path.exists():
            path.unlink()
    shutil.rmtree(SOURCE, ignore_errors=True)
    htcondor_annex(ALICE, "delete", "--name", ANNEX, check=False)
    subprocess.run(["condor_reconfig"], check=False, capture_output=True)


def test_every_sh_block_is_marked_and_every_runnable_one_has_its_check() -> None:
    ids = [b.id for b in blocks(DOC.read_text())]
    assert len(ids) == len(set(ids))
    assert ids == list(CHECKS), "docs/getting-started.md and CHECKS differ: update both"


def test_getting_started_word_for_word(restore_sandbox) -> None:
    for block in blocks(DOC.read_text()):
        started = time.monotonic()
        BEFORE.get(block.id, lambda: None)()
        CHECKS[block.id](run(block))
        print(f"{block.id}: {time.monotonic() - started:.1f} s")
