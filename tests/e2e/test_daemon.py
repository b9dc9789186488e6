"""annex_gahp as a daemon under the real condor_master, and as a plain GAHP on stdio.

- SIGTERM: a clean exit ("annex_gahp stopped"), and the master starts a new one.
- condor_reconfig: a changed knob is used at once (seen in behaviour); a knob that does not
  parse is reported and the previous knobs are kept, the helper serving on.
- The log speaks HTCondor's `MM/DD/YY HH:MM:SS` like the master's own.
- The master hears the helper's keep-alives (DC_CHILDALIVE): with a short
  ANNEXD_NOT_RESPONDING_TIMEOUT the master logs each one with that timeout, always before the
  last one's deadline, and the helper lives on; once it is frozen (SIGSTOP) the master kills
  it as hung and starts a new one.
- `annex_gahp --stdio` run as a user relays to the daemon: banner, COMMANDS, VERSION, and an
  ANNEX_LIST of that user's annexes only.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import sandbox as sb

from annex_gahp import __version__, names
from annex_gahp import settings as settings_mod
from annex_gahp.protocol import split_args

# Serial (scripts/test runs it alone): reconfigures the pool, stops, freezes, restarts the helper.
pytestmark = [pytest.mark.sandbox, pytest.mark.serial]

LOG = Path("/var/log/condor/AnnexGahpLog")
MASTER_LOG = Path("/var/log/condor/MasterLog")
CONFIG = Path("/etc/condor/config.d/99-zz-test-daemon.conf")
# (After the sandbox's own 99-sandbox.conf, so that our values win.)
# So that the restart delay does not depend on how many quick deaths earlier tests caused
# (the master doubles it each time, up to an hour): a fixed 2 s.
BACKOFF = "MASTER_ANNEXD_BACKOFF_CONSTANT = 1\nMASTER_ANNEXD_BACKOFF_FACTOR = 1.0\n"
DATE = re.compile(r"^(\d\d/\d\d/\d\d \d\d:\d\d:\d\d) ")


def log_size(path: Path = LOG) -> int:
    return path.stat().st_size if path.exists() else 0


def log_since(offset: int, path: Path = LOG) -> str:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace")


def log_tail(lines: int = 30) -> str:
    text = LOG.read_text(errors="replace") if LOG.exists() else ""
    return "AnnexGahpLog tail:\n" + "\n".join(text.splitlines()[-lines:])


def ours(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/root") == "/"
    except OSError:
        return False


def started(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"annex_gahp starting \(pid (\d+)\)", text)]


def serving_pid(since: int = 0, not_pid: int | None = None, timeout: float = 90) -> int:
    def find() -> int | None:
        text = log_since(since)
        pids = [p for p in started(text) if p != not_pid]
        if pids and ours(pids[-1]) and "serving " in text.split(f"(pid {pids[-1]})")[-1]:
            return pids[-1]
        return None

    return sb.wait_for(find, timeout=timeout, what="annex_gahp serving", on_timeout=log_tail)


def reconfig(text: str | None) -> int:
    """Write (or with None remove) this test's config file and condor_reconfig; wait until the
    helper has reloaded. Returns the log offset from before."""
    offset = log_size()
    if text is None:
        CONFIG.unlink(missing_ok=True)
    else:
        CONFIG.write_text("# tests/e2e/test_daemon.py\n" + BACKOFF + text)
    subprocess.run(["condor_reconfig"], check=True, capture_output=True)
    sb.wait_for(
        lambda: re.search(r"configuration reload", log_since(offset)),
        timeout=30,
        what="the helper to reload its configuration",
        on_timeout=log_tail,
    )
    return offset


def banner_of_socket() -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(settings_mod.load().socket_path)
        return conn.makefile("rb").readline().decode()


@pytest.fixture(scope="module")
def daemon(sandbox):
    pids = started(LOG.read_text(errors="replace"))
    if not (pids and ours(pids[-1])):  # held back by the master's restart delay
        subprocess.run(["condor_on", "-daemon", "ANNEXD"], check=True, capture_output=True)
    serving_pid()
    reconfig("")
    yield serving_pid()
    reconfig(None)


def test_log_lines_use_htcondors_date_format(daemon):
    offset = reconfig("")  # makes a fresh line: "configuration reloaded"
    new = [line for line in log_since(offset).splitlines() if line.strip()]
    assert new, log_tail()
    for line in new:
        assert DATE.match(line), f"not in HTCondor's format: {line!r}"
    stamp = datetime.datetime.strptime(DATE.match(new[-1]).group(1), "%m/%d/%y %H:%M:%S")
    assert abs((datetime.datetime.now() - stamp).total_seconds()) < 120
    # The same shape as the master's own log lines.
    master = MASTER_LOG.read_text(errors="replace").splitlines()[-1]
    assert DATE.match(master), master
    # Every record of the whole log starts that way (a traceback's lines follow their record).
    for line in LOG.read_text(errors="replace").splitlines():
        if line and not line[0].isspace() and not line.startswith("Traceback"):
            assert DATE.match(line) or re.match(r"^\w+(\.\w+)*(Error|Exception)\b", line), line


def test_sigterm_exits_cleanly_and_the_master_restarts_it(daemon):
    pid = serving_pid()
    offset, master_offset = log_size(), log_size(MASTER_LOG)
    os.kill(pid, signal.SIGTERM)
    sb.wait_for(
        lambda: "annex_gahp stopped" in log_since(offset),
        timeout=30,
        what="the helper to log its clean stop",
        on_timeout=log_tail,
    )
    text = log_since(offset)
    assert "signal 15: shutting down" in text
    assert text.index("signal 15") < text.index("annex_gahp stopped")
    assert "Traceback" not in text.split("annex_gahp stopped")[0]
    new = serving_pid(offset, not_pid=pid)
    assert not ours(pid)
    master = log_since(master_offset, MASTER_LOG)
    assert f"The ANNEXD (pid {pid}) exited with status 0" in master, master
    assert re.search(r"restarting \S*annex_gahp in \d+ seconds", master), master
    assert banner_of_socket().startswith("$GahpVersion:")
    assert new != pid


def test_reconfig_uses_a_changed_knob_and_survives_a_bad_one(daemon):
    name = f"knob-{uuid.uuid4().hex[:6]}"
    pid = serving_pid()

    def create(count: int) -> subprocess.CompletedProcess[str]:
        return sb.run_as(
            "alice",
            "htcondor-annex",
            "create",
            "--name",
            name,
            "--instances",
            str(count),
            "--idle-timeout",
            "30m",
            check=False,
        )

    over = "annex_instances = 3 is over the limit of 1 instances per annex (ANNEX_MAX_INSTANCES)"
    try:
        reconfig("ANNEX_MAX_INSTANCES = 1\n")
        res = create(3)
        assert res.returncode == 1 and over in res.stderr, res.stdout + res.stderr

        offset = reconfig("ANNEX_MAX_INSTANCES = 1\nANNEX_RECONCILE_INTERVAL = soon\n")
        text = log_since(offset)
        assert "configuration reload failed; keeping the previous knobs" in text, log_tail()
        assert "ANNEX_RECONCILE_INTERVAL" in text
        time.sleep(5)
        assert ours(pid) and serving_pid() == pid, "a bad knob took the helper down"
        assert banner_of_socket().startswith("$GahpVersion:")
        res = create(3)  # the previous knobs still hold
        assert res.returncode == 1 and over in res.stderr, res.stdout + res.stderr

        reconfig("")  # back to the sandbox's knobs: the same request is granted
        res = create(3)
        assert res.returncode == 0 and "3 instance(s) requested" in res.stdout, res.stderr
    finally:
        reconfig("")
        sb.run_as("alice", "htcondor-annex", "delete", "--name", name, check=False)
    assert serving_pid() == pid


def alives_received(text: str, pid: int) -> list[tuple[datetime.datetime, int]]:
    """(time, timeout) of each DC_CHILDALIVE from `pid` the master logged (D_DAEMONCORE)."""
    found = re.findall(
        rf"^(\d\d/\d\d/\d\d \d\d:\d\d:\d\d) received childalive, pid={pid}, secs=(\d+)",
        text,
        re.M,
    )
    return [(datetime.datetime.strptime(t, "%m/%d/%y %H:%M:%S"), int(s)) for t, s in found]


def test_the_master_hears_alive_and_replaces_a_frozen_helper(daemon):
    """The master's own record of the keep-alives, then a freeze.

    The master kills a child at its scan for hung children (once a minute, no knob:
    DaemonKeepAlive) when the deadline of the child's last alive has passed; each alive moves
    that deadline to its arrival + the timeout it carries. So a helper lives on exactly while
    every alive arrives within the timeout of the one before. That is read from the master's
    log (D_DAEMONCORE: "received childalive, pid=P, secs=S") over more than one timeout,
    instead of sleeping through a whole scan; the freeze then shows the scan acting on those
    deadlines: killed as hung and replaced."""
    # 15 s: the helper sends every third of it at a cycle's end (every 2 cycles of 3 s here),
    # so the gaps stay under it even when a busy machine slows a cycle to 3 s.
    timeout = 15
    offset, master_offset = log_size(), log_size(MASTER_LOG)
    reconfig(f"ANNEXD_NOT_RESPONDING_TIMEOUT = {timeout}\nMASTER_DEBUG = D_DAEMONCORE\n")
    try:
        pid = serving_pid()
        sb.wait_for(
            lambda: f"told condor_master: alive, next within {timeout} s" in log_since(offset),
            timeout=30,
            what="the helper's keep-alive with the new timeout",
            on_timeout=log_tail,
        )

        def alives() -> list[datetime.datetime]:
            text = log_since(master_offset, MASTER_LOG)
            return [at for at, secs in alives_received(text, pid) if secs == timeout]

        # Alive messages keep coming, each within the timeout of the one before, for longer
        # than the timeout: the deadline never passes while the helper runs.
        span = timeout + 2
        sb.wait_for(
            lambda: (got := alives()) and (got[-1] - got[0]).total_seconds() >= span,
            timeout=span + 30,
            what=f"{span} s of keep-alives with secs={timeout} in the MasterLog",
            on_timeout=lambda: log_since(master_offset, MASTER_LOG)[-3000:],
        )
        seen = alives()
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(seen)]
        # Whole seconds in the log: a gap read as g was shorter than g + 1.
        assert gaps and max(gaps) + 1 <= timeout, f"alive gaps {gaps} s against {timeout} s"
        assert ours(pid), "the master killed a helper that was alive"
        assert f"Child pid {pid} appears hung" not in log_since(master_offset, MASTER_LOG)

        master_offset, offset = log_size(MASTER_LOG), log_size()
        os.kill(pid, signal.SIGSTOP)
        try:
            # Killed at the first scan after the deadline: within timeout + a minute.
            new = serving_pid(offset, not_pid=pid, timeout=timeout + 90)
        finally:
            if ours(pid):
                os.kill(pid, signal.SIGCONT)
        master = log_since(master_offset, MASTER_LOG)
        assert f"Child pid {pid} appears hung! Killing it hard." in master, master[-3000:]
        assert "was killed because it was no longer responding" in master, master[-3000:]
        assert new != pid
    finally:
        reconfig("")


def test_stdio_gahp_as_a_user_relays_to_the_daemon(daemon):
    mine, theirs = f"stdio-a-{uuid.uuid4().hex[:6]}", f"stdio-b-{uuid.uuid4().hex[:6]}"
    for user, name in (("alice", mine), ("bob", theirs)):
        sb.run_as(
            user,
            "htcondor-annex",
            "create",
            "--name",
            name,
            "--instances",
            "1",
            "--idle-timeout",
            "30m",
        )
    proc = subprocess.Popen(
        ["runuser", "-u", "alice", "--", "/opt/annex-venv/bin/annex_gahp", "--stdio"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def ask(line: str) -> str:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().rstrip("\n")

    try:
        banner = proc.stdout.readline().rstrip("\n")
        assert re.fullmatch(
            rf"\$GahpVersion: {re.escape(__version__)} \w{{3}} +\d+ \d{{4}} htcondor-annex-gahp \$",
            banner,
        ), banner
        commands = ask("COMMANDS").split(" ")
        assert commands[0] == "S"
        assert {
            "ANNEX_CREATE",
            "ANNEX_DELETE",
            "ANNEX_EXTEND",
            "ANNEX_LIST",
            "ANNEX_STATUS",
            "COMMANDS",
            "VERSION",
            "RESULTS",
            "QUIT",
        } <= set(commands[1:])
        assert ask("VERSION") == f"S {banner}"
        assert ask("ANNEX_LIST 7") == "S"
        result = None
        for _ in range(100):
            count = int(ask("RESULTS").split(" ")[1])
            lines = [proc.stdout.readline().rstrip("\n") for _ in range(count)]
            if lines:
                (result,) = lines
                break
            time.sleep(0.1)
        assert ask("QUIT") == "S"
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        for user, name in (("alice", mine), ("bob", theirs)):
            sb.run_as(user, "htcondor-annex", "delete", "--name", name, check=False)
    words = split_args(result)
    assert words[:2] == ["7", "0"], words
    listed = json.loads(words[2].split("=", 1)[1])
    assert {v["Owner"] for v in listed} == {"alice"}
    assert mine in {v["AnnexName"] for v in listed}
    assert theirs not in {v["AnnexName"] for v in listed}
    assert all(v["AnnexState"] in names.STATES for v in listed)


def test_delete_right_after_create_amid_reconfigs_is_not_lost(daemon):
    """A delete that lands while the loop is busy launching the annex used to be overwritten by
    the loop's older view (the annex stayed 'provisioning' until its idle timeout). And a burst
    of SIGHUPs must leave the loop running (its handler only notes the signal)."""
    name = f"burst-{uuid.uuid4().hex[:6]}"
    pid = serving_pid()
    offset = log_size()
    try:
        for _ in range(2):
            for _ in range(30):
                os.kill(pid, signal.SIGHUP)
                time.sleep(0.005)
            time.sleep(0.2)
        sb.run_as(
            "alice",
            "htcondor-annex",
            "create",
            "--name",
            name,
            "--instances",
            "2",
            "--idle-timeout",
            "30m",
        )
        sb.run_as("alice", "htcondor-annex", "delete", "--name", name)
        for _ in range(30):
            os.kill(pid, signal.SIGHUP)
            time.sleep(0.005)
        sb.wait_for(
            lambda: f"annex alice/{name} retired (deleted)" in log_since(offset),
            timeout=45,
            what="the annex deleted right after its create to be retired",
            on_timeout=log_tail,
        )
        ec2 = [
            i
            for i in sb.instances([{"Name": f"tag:{names.TAG_NAME}", "Values": [name]}])
            if any(t["Key"] == names.TAG_OWNER and t["Value"] == "alice" for t in i["Tags"])
        ]
        sb.wait_for(
            lambda: (
                not [i for i in sb.instances([{"Name": f"tag:{names.TAG_NAME}", "Values": [name]}])]
            ),
            timeout=60,
            what=f"no instance of {name} left (had {[i['InstanceId'] for i in ec2]})",
            on_timeout=log_tail,
        )
        assert serving_pid() == pid
    finally:
        sb.run_as("alice", "htcondor-annex", "delete", "--name", name, check=False)
