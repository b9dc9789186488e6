"""Two users and one helper: an annex belongs to the user who asked for it.

bob can neither delete, extend nor read the details of alice's annex: not through a GAHP client
written by hand (raw lines on the socket, run as bob), not through `htcondor-annex`, not
through `annex_gahp --stdio`, and a forged `owner=alice` (or a job ad claiming to be alice's)
changes nothing. ANNEX_LIST shows bob only his own. alice's and bob's annexes of the same name
are two annexes, each with its own instances and its own ad. root and condor act on all.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import pytest
import sandbox as sb

from annex_gahp import client, names
from annex_gahp import settings as settings_mod
from annex_gahp.protocol import split_args

pytestmark = pytest.mark.sandbox

# A GAHP client written by hand: stdlib only, raw lines, no async mode, polls RESULTS.
# stdin: JSON [[COMMAND, {key: value}], ...]; stdout: JSON {"banner": ..., "replies": [...]}.
RAW_CLIENT = r"""
import json, socket, sys, time
commands = json.load(sys.stdin)
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(sys.argv[1])
stream = conn.makefile("rwb", buffering=0)

def readline():
    return stream.readline().decode().rstrip("\n")

def escape(text):
    return text.replace("\\", "\\\\").replace(" ", "\\ ").replace("\n", "\\\n")

out = {"banner": readline(), "replies": []}
for reqid, (command, args) in enumerate(commands, 1):
    words = [command, str(reqid)] + [escape(f"{k}={v}") for k, v in args.items()]
    stream.write((" ".join(words) + "\n").encode())
    ack = readline()
    result = None
    for _ in range(400):
        if not ack.startswith("S"):
            break
        stream.write(b"RESULTS\n")
        count = int(readline().split(" ")[1])
        lines = [readline() for _ in range(count)]
        if lines:
            result = lines[0]
            break
        time.sleep(0.05)
    out["replies"].append({"ack": ack, "result": result})
stream.write(b"QUIT\n")
out["quit"] = readline()
print(json.dumps(out))
"""


def socket_path() -> str:
    return settings_mod.load().socket_path


def raw_gahp(user: str, *commands: tuple[str, dict[str, str]]) -> list[tuple[str, list[str]]]:
    """Run the hand-written client as `user`; (ack, result words after the request id)."""
    res = sb.run_as(
        user,
        "python3",
        "-c",
        RAW_CLIENT,
        socket_path(),
        input=json.dumps([[c, a] for c, a in commands]),
    )
    out = json.loads(res.stdout)
    assert out["banner"].startswith("$GahpVersion:"), out
    assert out["quit"] == "S"
    replies = []
    for reply in out["replies"]:
        assert reply["ack"] == "S", reply
        words = split_args(reply["result"])
        replies.append((reply["ack"], words[1:]))
    return replies


def refused(words: list[str], code: str) -> str:
    assert words[0] == "1", f"expected a refusal, got {words}"
    assert words[1] == code, words
    return words[2]


def kv(words: list[str]) -> dict[str, str]:
    assert words[0] == "0", f"expected success, got {words}"
    return dict(w.split("=", 1) for w in words[1:])


def annex(user: str, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return sb.run_as(user, "htcondor-annex", *args, check=check, timeout=60)


def tagged(owner: str, name: str) -> list[dict]:
    return sb.instances(
        [
            {"Name": f"tag:{names.TAG_OWNER}", "Values": [owner]},
            {"Name": f"tag:{names.TAG_NAME}", "Values": [name]},
        ]
    )


def ad(owner: str, name: str) -> dict | None:
    ads = sb.query_ads("Any", f'MyType == "Annex" && Owner == "{owner}" && AnnexName == "{name}"')
    return dict(ads[0]) if len(ads) == 1 else None


def admin_view(owner: str, name: str) -> dict:
    return json.loads(
        client.call("ANNEX_STATUS", path=socket_path(), name=name, owner=owner)["json"]
    )


def running(owner: str, name: str, count: int) -> dict:
    def ready():
        found = ad(owner, name)
        if found and found.get("RunningInstances") == count and len(tagged(owner, name)) == count:
            return found
        return None

    return sb.wait_for(ready, timeout=90, what=f"{owner}'s annex {name} to run {count}")


@pytest.fixture(scope="module")
def shared_name(sandbox):
    """alice's annex (1 instance) and bob's annex of the same name (2 instances)."""
    name = f"shared-{uuid.uuid4().hex[:6]}"
    try:
        client.call("COMMANDS", path=socket_path(), timeout=5)
    except client.NotRunning:  # held back by the master's restart delay after earlier tests
        subprocess.run(["condor_on", "-daemon", "ANNEXD"], check=True, capture_output=True)
        sb.wait_for(lambda: os.path.exists(socket_path()), timeout=30, what="the helper")
    except client.ClientError:
        pass  # it answers
    annex(
        "alice", "create", "--name", name, "--instances", "1", "--idle-timeout", "30m", check=True
    )
    annex("bob", "create", "--name", name, "--instances", "2", "--idle-timeout", "30m", check=True)
    running("alice", name, 1)
    running("bob", name, 2)
    yield name
    for user in ("alice", "bob"):
        annex(user, "delete", "--name", name)
    sb.wait_for(
        lambda: not tagged("alice", name) and not tagged("bob", name),
        timeout=90,
        what="both annexes to be retired",
    )


def test_bob_cannot_touch_alices_annex_through_a_raw_gahp_client(shared_name):
    name = shared_name
    alone = f"alice-only-{uuid.uuid4().hex[:6]}"
    # An annex only alice has: bob naming it finds nothing of his own.
    annex(
        "alice", "create", "--name", alone, "--instances", "1", "--idle-timeout", "30m", check=True
    )
    try:
        ad_before = running("alice", alone, 1)
        before = admin_view("alice", alone)
        forged_ad = f'Owner = "alice"\n{names.JOB_TARGET} = "{alone}"\nClusterId = 1\nProcId = 0'
        replies = raw_gahp(
            "bob",
            ("ANNEX_DELETE", {"name": alone}),
            ("ANNEX_DELETE", {"name": alone, "owner": "alice"}),
            ("ANNEX_EXTEND", {"name": alone, "lease": "5h"}),
            ("ANNEX_EXTEND", {"name": alone, "owner": "alice", "instances": "3"}),
            ("ANNEX_STATUS", {"name": alone}),
            ("ANNEX_STATUS", {"name": alone, "owner": "alice"}),
            ("ANNEX_LIST", {"owner": "alice"}),
            ("ANNEX_CREATE", {"name": alone, "owner": "alice", "instances": "3"}),
            ("JOB_ROUTED", {"ad": forged_ad}),
            ("JOB_UPDATE", {"ad": forged_ad}),
            ("ANNEX_LIST", {}),
        )
        words = [w for _, w in replies]
        for i in (0, 2, 4):
            message = refused(words[i], "NOT_FOUND")
            assert message.startswith(f"bob has no annex named '{alone}'"), message
        for i in (1, 3, 5, 6, 7):
            message = refused(words[i], "PERMISSION_DENIED")
            assert "bob may not act on annexes of alice" in message, message
        for i in (8, 9):
            message = refused(words[i], "PERMISSION_DENIED")
            assert "bob sent a job ad owned by alice" in message, message
        listed = json.loads(kv(words[10])["json"])
        assert {v["Owner"] for v in listed} == {"bob"}
        assert alone not in {v["AnnexName"] for v in listed}
        assert {v["AnnexName"] for v in listed} >= {name}
        # Nothing of alice's annex changed.
        after = admin_view("alice", alone)
        for key in ("AnnexState", "RequestedInstances", "LeaseExpiration", "Owner"):
            assert after[key] == before[key], key
        assert {i["id"] for i in after["instances"]} == {i["id"] for i in before["instances"]}
        now = ad("alice", alone)
        assert now["LeaseExpiration"] == ad_before["LeaseExpiration"]
        assert now["RequestedInstances"] == 1
        assert len(tagged("alice", alone)) == 1
        assert ad("bob", alone) is None and not tagged("bob", alone)
    finally:
        annex("alice", "delete", "--name", alone)


def test_bob_cannot_touch_alices_annex_through_the_cli(shared_name):
    name = shared_name
    before = admin_view("alice", name)
    for args in (
        ("delete", "--name", name, "--owner", "alice"),
        ("extend", "--name", name, "--owner", "alice", "--lease", "5h"),
        ("extend", "--name", name, "--owner", "alice", "--instances", "4"),
        ("status", "--name", name, "--owner", "alice"),
        ("status", "--owner", "alice"),
    ):
        res = annex("bob", *args)
        assert res.returncode != 0, (args, res.stdout)
        assert "bob may not act on annexes of alice" in res.stderr, (args, res.stderr)
        assert alice_lease_unchanged(before, name)
    # Without --owner, bob's commands reach bob's own annex of that name, never alice's.
    res = annex("bob", "status", "--name", name, "--json", check=True)
    mine = json.loads(res.stdout)
    assert mine["Owner"] == "bob" and mine["RequestedInstances"] == 2
    bob_ids = {i["InstanceId"] for i in tagged("bob", name)}
    assert {i["id"] for i in mine["instances"] if i["state"] == "running"} == bob_ids
    res = annex("bob", "status", "--json", check=True)
    assert {v["Owner"] for v in json.loads(res.stdout)} == {"bob"}
    assert alice_lease_unchanged(before, name)


def alice_lease_unchanged(before: dict, name: str) -> bool:
    after = admin_view("alice", name)
    return all(
        after[k] == before[k] for k in ("AnnexState", "RequestedInstances", "LeaseExpiration")
    )


def test_bob_through_the_stdio_gahp_sees_only_his_own(shared_name):
    """`annex_gahp --stdio` as bob relays to the daemon; the daemon sees bob, whatever he says."""
    lines = [
        "ANNEX_LIST 1",
        f"ANNEX_STATUS 2 name={shared_name} owner=alice",
        f"ANNEX_DELETE 3 name={shared_name} owner=alice",
    ]
    proc = subprocess.Popen(
        ["runuser", "-u", "bob", "--", "/opt/annex-venv/bin/annex_gahp", "--stdio"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("$GahpVersion:")
        for line in lines:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "S"
        results: dict[str, list[str]] = {}
        for _ in range(100):
            proc.stdin.write("RESULTS\n")
            proc.stdin.flush()
            count = int(proc.stdout.readline().split()[1])
            for _ in range(count):
                words = split_args(proc.stdout.readline().rstrip("\n"))
                results[words[0]] = words[1:]
            if len(results) == len(lines):
                break
            time.sleep(0.1)
        proc.stdin.write("QUIT\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "S"
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    listed = json.loads(kv(results["1"])["json"])
    assert {v["Owner"] for v in listed} == {"bob"}
    assert "bob may not act on annexes of alice" in refused(results["2"], "PERMISSION_DENIED")
    assert "bob may not act on annexes of alice" in refused(results["3"], "PERMISSION_DENIED")
    assert ad("alice", shared_name)["AnnexState"] == names.RUNNING


def test_same_name_two_owners_are_two_annexes(shared_name):
    name = shared_name
    alice_ad, bob_ad = ad("alice", name), ad("bob", name)
    assert alice_ad and bob_ad and alice_ad["Name"] != bob_ad["Name"]
    assert (alice_ad["RequestedInstances"], alice_ad["RunningInstances"]) == (1, 1)
    assert (bob_ad["RequestedInstances"], bob_ad["RunningInstances"]) == (2, 2)
    alice_ids = {i["InstanceId"] for i in tagged("alice", name)}
    bob_ids = {i["InstanceId"] for i in tagged("bob", name)}
    assert len(alice_ids) == 1 and len(bob_ids) == 2 and not alice_ids & bob_ids
    assert {i["id"] for i in admin_view("alice", name)["instances"]} == alice_ids
    assert {i["id"] for i in admin_view("bob", name)["instances"]} == bob_ids
    # Each sees their own under the same name.
    for user, count in (("alice", 1), ("bob", 2)):
        (reply,) = raw_gahp(user, ("ANNEX_STATUS", {"name": name}))
        view = json.loads(kv(reply[1])["json"])
        assert (view["Owner"], view["RequestedInstances"]) == (user, count)


@pytest.mark.parametrize("admin", ["root", "condor"])
def test_root_and_condor_act_on_all(shared_name, admin):
    name = shared_name
    replies = raw_gahp(
        admin,
        ("ANNEX_LIST", {}),
        ("ANNEX_STATUS", {"name": name, "owner": "alice"}),
        ("ANNEX_STATUS", {"name": name, "owner": "bob"}),
        ("ANNEX_EXTEND", {"name": name, "owner": "bob", "lease": "3h"}),
        ("ANNEX_LIST", {"owner": "alice"}),
    )
    words = [w for _, w in replies]
    owners = {(v["Owner"], v["AnnexName"]) for v in json.loads(kv(words[0])["json"])}
    assert {("alice", name), ("bob", name)} <= owners
    assert json.loads(kv(words[1])["json"])["Owner"] == "alice"
    assert json.loads(kv(words[2])["json"])["Owner"] == "bob"
    extended = kv(words[3])
    assert extended["name"] == name and int(extended["lease_expiration"]) > 0
    assert {v["Owner"] for v in json.loads(kv(words[4])["json"])} == {"alice"}


def test_alice_deleting_hers_leaves_bobs(shared_name):
    name = shared_name
    bob_ids = {i["InstanceId"] for i in tagged("bob", name)}
    annex("alice", "delete", "--name", name, check=True)
    sb.wait_for(
        lambda: not tagged("alice", name) and ad("alice", name) is None,
        timeout=90,
        what="alice's annex to be retired",
    )
    assert {i["InstanceId"] for i in tagged("bob", name)} == bob_ids
    bob_ad = ad("bob", name)
    assert bob_ad and bob_ad["AnnexState"] == names.RUNNING and bob_ad["RunningInstances"] == 2
