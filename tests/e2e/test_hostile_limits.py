"""Hostile limits on a shared access point (issue #12), with the real pool and helper.

- alice holds 200 connections to the helper's socket (reconnecting whatever it closes):
  bob's `htcondor-annex status`/`delete` and bob's hook-routed job are still served promptly,
  and the helper's log names alice's uid at the per-user cap.
- submit files with hostile tags, control characters and huge numbers are refused by
  condor_submit with the ERROR line naming the keyword, and nothing is queued or created.
- alice's `Burst` and `burst` are two annexes: their jobs' status attributes and their
  collector ads never mix.
"""

from __future__ import annotations

import json
import pwd
import subprocess
import time
import uuid

import pytest
import sandbox as sb

from annex_gahp import settings as settings_mod

pytestmark = pytest.mark.sandbox

# Run as alice: keep `count` connections open for `seconds`, reopening what the helper closes,
# or until its stdin closes (the test is done with it).
FLOOD = r"""
import json, select, socket, sys, time
path, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
socks, admitted, refused, errors = [], 0, 0, 0
def first_line(s):
    data = b""
    while b"\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n")[0].decode(errors="replace")
end = time.monotonic() + seconds
print("started", flush=True)
while time.monotonic() < end:
    alive = []
    for s in socks:
        try:
            s.setblocking(False)
            gone = s.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            gone = False
        except OSError:
            gone = True
        (s.close() if gone else alive.append(s))
    socks = alive
    while len(socks) < count:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(path)
            line = first_line(s)
        except OSError:
            errors += 1
            s.close()
            continue
        if line.startswith("$GahpVersion"):
            admitted += 1
        else:
            refused += 1
        socks.append(s)
    if select.select([sys.stdin], [], [], 0.2)[0]:
        break
print(json.dumps({"admitted": admitted, "refused": refused, "errors": errors}), flush=True)
"""


def socket_path() -> str:
    return settings_mod.load().socket_path


def annex(user: str, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return sb.run_as(user, "htcondor-annex", *args, check=check, timeout=60)


def timed(user: str, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    res = annex(user, *args)
    return time.monotonic() - start, res


def ec2_tagged(name: str) -> list[dict]:
    return sb.instances([{"Name": "tag:htcondor-annex:name", "Values": [name]}])


def helper_log() -> str:
    try:
        with open(settings_mod.load().log_file, errors="replace") as f:
            return f.read()[-200_000:]
    except OSError:
        return ""


# Serial: alice's flood takes all her connections; other tests act as alice.
@pytest.mark.serial
def test_one_users_connection_flood_does_not_block_others(sandbox):
    alice_uid = pwd.getpwnam("alice").pw_uid
    flood = subprocess.Popen(
        ["runuser", "-u", "alice", "--", "python3", "-c", FLOOD, socket_path(), "200", "40"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    name = f"bob-{uuid.uuid4().hex[:6]}"
    cluster = None
    try:
        assert flood.stdout is not None and flood.stdout.readline().strip() == "started"
        time.sleep(3)  # alice's 200 are (re)connecting
        # bob's commands: answered at once.
        took, res = timed("bob", "status")
        assert res.returncode == 0, res.stderr
        assert took < 5, took
        took, res = timed("bob", "delete", "--name", "nothing-here")
        assert took < 5, took
        assert "too many connections" not in res.stderr + res.stdout
        assert "nothing-here" in res.stderr + res.stdout
        # bob's job, routed through the hooks (which run as bob): its annex gets made.
        cluster = sb.condor_submit_as(
            "bob",
            "\n".join(
                [
                    "executable = /bin/sleep",
                    "arguments = 1",
                    f"annex_name = {name}",
                    "annex_instances = 1",
                    "annex_lease = 10m",
                    "queue",
                ]
            ),
        )

        def stated():
            ads = sb.schedd().query(f"ClusterId == {cluster}", ["AnnexState"])
            return ads and ads[0].get("AnnexState")

        sb.wait_for(stated, timeout=40, what="bob's routed job to get its AnnexState")
        took, res = timed("bob", "status", "--name", name)
        assert res.returncode == 0 and name in res.stdout and took < 5, (took, res.stderr)
        # root is served too.
        took, res = timed("root", "status")
        assert res.returncode == 0 and took < 5
        assert flood.poll() is None, "alice's flood ended early"
    finally:
        out, err = flood.communicate(timeout=90)  # closes its stdin: it stops at once
        if cluster is not None:
            subprocess.run(["condor_rm", str(cluster)], capture_output=True, check=False)
        annex("bob", "delete", "--name", name)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["refused"] > 0, (summary, err)
    assert summary["admitted"] >= 1
    log = helper_log()
    assert f"refused a connection from uid {alice_uid} (alice" in log


HOSTILE = [
    ("annex_tags", "annex_tags = " + ",".join(f"k{i}=v" for i in range(60))),
    ("annex_tags", "annex_tags = htcondor-annex:owner=bob"),
    ("annex_tags", "annex_tags = aws:createdBy=me"),
    ("annex_tags", "annex_tags = k=" + "v" * 300),
    ("annex_keypair", "annex_keypair = key\x1b]0;pwned\x07"),
    ("annex_central_manager", "annex_central_manager = cm\x01.example.org"),
    ("annex_instances", "annex_instances = " + "9" * 5000),
    ("annex_lease", "annex_lease = " + "1" * 4400),
    ("annex_expiry", "annex_expiry = " + "2" * 5000),
    ("annex_security_groups", "annex_security_groups = " + "sg-1," * 600),
]


@pytest.mark.parametrize(
    ("keyword", "line"), HOSTILE, ids=[f"{k}-{i}" for i, (k, _) in enumerate(HOSTILE)]
)
def test_hostile_submit_files_are_refused_naming_the_keyword(sandbox, keyword, line):
    name = f"hostile-{uuid.uuid4().hex[:6]}"
    text = f"executable = /bin/true\nannex_name = {name}\n{line}\nqueue\n"
    res = sb.run_as("alice", "condor_submit", "-", input=text, check=False)
    assert res.returncode != 0
    errors = [x for x in (res.stdout + res.stderr).splitlines() if x.startswith("ERROR:")]
    named = [x for x in errors if x.startswith(f"ERROR: {keyword}")]
    assert len(named) == 1, (res.stdout + res.stderr)[-2000:]
    assert "Traceback" not in res.stderr and "INTERNAL" not in res.stderr
    assert not sb.schedd().query(f'TargetAnnexName =?= "{name}"', ["ClusterId"])
    assert not ec2_tagged(name)


def test_burst_and_burst_are_two_annexes(sandbox):
    stem = f"Case{uuid.uuid4().hex[:5]}"
    upper, lower = stem, stem.lower()
    clusters = {}
    try:
        for name, count in ((upper, 2), (lower, 1)):
            clusters[name] = sb.condor_submit_as(
                "alice",
                "\n".join(
                    [
                        "executable = /bin/sleep",
                        "arguments = 600",
                        f"annex_name = {name}",
                        f"annex_instances = {count}",
                        "annex_lease = 10m",
                        "queue",
                    ]
                ),
            )

        def job(name: str) -> dict:
            ads = sb.schedd().query(
                f"ClusterId == {clusters[name]}",
                ["AnnexState", "AnnexRequestedInstances", "TargetAnnexName"],
            )
            return dict(ads[0]) if ads else {}

        sb.wait_for(
            lambda: all(job(n).get("AnnexRequestedInstances") is not None for n in clusters),
            timeout=60,
            what="both jobs to get their annex's status",
        )

        def ads() -> dict[str, dict]:
            found = sb.query_ads("Any", 'MyType == "Annex" && Owner == "alice"')
            return {a["AnnexName"]: dict(a) for a in found if a["AnnexName"].lower() == lower}

        sb.wait_for(lambda: len(ads()) == 2, timeout=60, what="two Annex ads")
        seen = ads()
        assert seen[upper]["RequestedInstances"] == 2 and seen[lower]["RequestedInstances"] == 1
        assert seen[upper]["Name"] != seen[lower]["Name"]
        # Over several status cycles, each job carries its own annex's numbers only.
        for _ in range(4):
            assert job(upper)["AnnexRequestedInstances"] == 2, job(upper)
            assert job(lower)["AnnexRequestedInstances"] == 1, job(lower)
            time.sleep(2)
        # Deleting one leaves the other's ad and job alone.
        assert annex("alice", "delete", "--name", upper).returncode == 0
        sb.wait_for(lambda: upper not in ads(), timeout=60, what=f"{upper}'s ad to go")
        assert lower in ads()
        assert job(lower).get("AnnexState") not in ("retired", "failed", "retiring"), job(lower)
    finally:
        for name, cluster in clusters.items():
            subprocess.run(["condor_rm", str(cluster)], capture_output=True, check=False)
            annex("alice", "delete", "--name", name)
