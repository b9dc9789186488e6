"""The helper under condor_master as ANNEXD (not ANNEX_GAHP, upstream condor_annex's knob).

- The master runs the program named by ANNEXD, and `condor_fetchlog <master> ANNEXD` returns
  the helper's log (ANNEXD_LOG = $(ANNEX_GAHP_LOG)).
- ANNEXD is one of the master's built-in DaemonCore names, so the master starts the helper with
  every signal blocked and hands it TCP and UDP command sockets. The helper unblocks the
  signals (no thread of it blocks any; test_daemon.py sees reconfig and SIGTERM work) and
  closes the sockets: it holds no TCP listener nor UDP socket.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import sandbox as sb

pytestmark = pytest.mark.sandbox

LOG = Path("/var/log/condor/AnnexGahpLog")


def _ours(pid: int) -> bool:
    # Other sandboxes' processes are visible here too: ours see our root as theirs.
    try:
        return os.readlink(f"/proc/{pid}/root") == "/"
    except OSError:
        return False


def _serving_pid() -> int:
    def find() -> int | None:
        text = LOG.read_text(errors="replace") if LOG.exists() else ""
        pids = [int(p) for p in re.findall(r"annex_gahp starting \(pid (\d+)\)", text)]
        if pids and _ours(pids[-1]) and "serving " in text.split(f"(pid {pids[-1]})")[-1]:
            return pids[-1]
        return None

    return sb.wait_for(find, timeout=60, what="annex_gahp serving")


def _inet_inodes(kinds: tuple[str, ...], listening_only: bool) -> set[str]:
    inodes = set()
    for kind in kinds:
        for line in Path(f"/proc/net/{kind}").read_text().splitlines()[1:]:
            fields = line.split()
            # tcp state 0A is LISTEN; every udp socket counts
            if not listening_only or fields[3] == "0A":
                inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


# Serial: asks the pool for its first master, which must be the access point's (an emulated
# instance booted by a test beside it advertises a master too).
@pytest.mark.serial
def test_the_master_runs_the_helper_as_annexd(sandbox):
    daemons = subprocess.run(
        ["condor_config_val", "DAEMON_LIST"], capture_output=True, text=True, check=True
    ).stdout.upper()
    assert "ANNEXD" in daemons.split() and "ANNEX_GAHP" not in daemons.replace(",", " ").split()
    pid = _serving_pid()
    program = subprocess.run(
        ["condor_config_val", "ANNEXD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert Path(os.readlink(f"/proc/{pid}/exe")).name.startswith("python")
    assert program in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    master = subprocess.run(
        ["condor_status", "-master", "-af", "MyAddress"], capture_output=True, text=True, check=True
    ).stdout.split("\n")[0]
    fetched = subprocess.run(
        ["condor_fetchlog", master, "ANNEXD"], capture_output=True, text=True, check=True
    ).stdout
    assert f"annex_gahp starting (pid {pid})" in fetched


def test_the_helper_keeps_no_daemoncore_command_socket(sandbox):
    pid = _serving_pid()
    held = _socket_inodes(pid)
    assert held, "the helper holds its own unix socket at least"
    tcp = _inet_inodes(("tcp", "tcp6"), listening_only=True)
    udp = _inet_inodes(("udp", "udp6"), listening_only=False)
    assert not held & tcp, "the helper holds a TCP listener (the master's command socket)"
    assert not held & udp, "the helper holds a UDP socket (the master's command socket)"


def test_no_thread_of_the_helper_blocks_a_signal(sandbox):
    pid = _serving_pid()
    blocked = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        blocked[task] = re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.M)[1]
    assert set(blocked.values()) == {"0" * 16}, blocked
