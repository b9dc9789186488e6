"""Shared pieces of the benchmarks (run inside the sandbox, as root, by bench/run.py).

Every benchmark prints its figures as ratios against a baseline or target measured in the same
run, then one `PASS`/`FAIL` line per target; the lines are also appended to RESULTS (JSON lines)
so bench/run.py can print a summary. Nothing here asserts on wall time.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

BENCH_DIR = "/var/tmp/bench"
BENCH_ENV = f"{BENCH_DIR}/bench.json"  # written by run.py: proxy ports, log path
RESULTS = f"{BENCH_DIR}/results.jsonl"


# One reader of /etc/annex-sandbox.env: the demo's (scripts/burst_demo.py).
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
)
from burst_demo import sandbox_env  # noqa: E402


def bench_env() -> dict[str, Any]:
    with open(BENCH_ENV) as handle:
        return json.load(handle)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def out(text: str = "") -> None:
    print(text, flush=True)


def result(
    bench: str, name: str, value: float, target: float | None, op: str = "<=", *, unit: str = ""
) -> bool:
    """Print one figure against its target (or just the figure) and record it."""
    passed = None
    if target is not None:
        passed = (
            value <= target if op == "<=" else value >= target if op == ">=" else value == target
        )
    verdict = "" if passed is None else ("PASS" if passed else "FAIL")
    shown = f"{value:.3g}" if isinstance(value, float) else str(value)
    goal = "" if target is None else f" (target {op} {target}{unit})"
    out(f"  {verdict or 'INFO':4}  {name}: {shown}{unit}{goal}")
    os.makedirs(BENCH_DIR, exist_ok=True)
    with open(RESULTS, "a") as handle:
        entry = {"bench": bench, "name": name, "value": value, "target": target, "op": op}
        handle.write(json.dumps(entry | {"unit": unit, "pass": passed}) + "\n")
    return bool(passed) if passed is not None else True


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        try:
            got = check()
        except Exception as err:  # the pool or the emulator may be settling
            last, got = err, None
        if got:
            return got
        time.sleep(every)
    raise TimeoutError(
        f"timed out after {timeout:.0f} s waiting for {what}" + (f": {last}" if last else "")
    )


# --- the counting proxy's log -----------------------------------------------------------------


def calls(tag: str | None = None, since: float = 0.0, until: float | None = None) -> list[dict]:
    """AWS calls the proxy logged, optionally of one listener (tag) and time window."""
    path = bench_env()["proxy_log"]
    found = []
    with open(path) as handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line being written
            if tag is not None and entry.get("tag") != tag:
                continue
            if entry["t"] < since or (until is not None and entry["t"] > until):
                continue
            found.append(entry)
    return found


def by_action(entries: Iterable[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.get("action", "?")] = counts.get(entry.get("action", "?"), 0) + 1
    return dict(sorted(counts.items()))


# --- the emulator, directly (not through the proxy: these calls are not counted) --------------


def ec2() -> Any:
    import boto3  # noqa: PLC0415

    env = sandbox_env()
    return boto3.client(
        "ec2", endpoint_url=env["ANNEX_AWS_ENDPOINT_URL"], region_name=env["ANNEX_AWS_REGION"]
    )


def instances(client: Any, filters: list[dict] | None = None) -> list[dict]:
    found = []
    kwargs = {"Filters": filters} if filters else {}
    for page in client.get_paginator("describe_instances").paginate(**kwargs):
        for reservation in page["Reservations"]:
            found.extend(reservation["Instances"])
    return found


def annex_instances(client: Any, name: str, states: tuple[str, ...] = ("pending", "running")):
    return instances(
        client,
        [
            {"Name": "tag:htcondor-annex:name", "Values": [name]},
            {"Name": "instance-state-name", "Values": list(states)},
        ],
    )


def terminate_all(client: Any) -> None:
    """End every live instance in the emulator (between benchmarks)."""
    ids = [
        i["InstanceId"] for i in instances(client) if i["State"]["Name"] in ("pending", "running")
    ]
    for start in range(0, len(ids), 500):
        client.terminate_instances(InstanceIds=ids[start : start + 500])


# --- HTCondor -----------------------------------------------------------------------------------


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


def workdir(user: str, label: str) -> str:
    entry = pwd.getpwnam(user)
    path = os.path.join(entry.pw_dir, f"bench-{label}-{int(time.time() * 1000)}")
    os.makedirs(path)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def write_as(user: str, path: str, text: str, mode: int = 0o644) -> None:
    entry = pwd.getpwnam(user)
    with open(path, "w") as handle:
        handle.write(text)
    os.chmod(path, mode)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def submit(user: str, submit_text: str, label: str) -> tuple[int, float]:
    """condor_submit as `user`; returns (cluster id, epoch time condor_submit returned)."""
    where = workdir(user, label)
    write_as(user, os.path.join(where, "job.sub"), submit_text)
    cluster, returned = submit_retry(user, where)
    return int(cluster), returned


def remove_jobs(cluster: int | str, timeout: float = 120) -> None:
    """condor_rm a cluster and wait until it has left the queue.

    Wait before retiring its annex: a job the router has not edited yet would otherwise meet a
    retiring annex in the translate hook, fail it, and enough such failures make the job router
    throttle the whole Annex route (docs/benchmarks.md, "Found")."""
    run(["condor_rm", str(cluster)])
    try:
        wait_for(
            f"cluster {cluster} to leave the queue",
            lambda: not condor_q(f"ClusterId == {cluster}", ["ProcId"]),
            timeout,
            0.5,
        )
    except TimeoutError:
        run(["condor_rm", "-forcex", str(cluster)])


def router_quiet(period: float, timeout: float = 300) -> float:
    """Wait until the job router has done nothing but its periodic table for 4 polling periods.

    The router runs the translate hook for every job it picked up, even for jobs removed since
    (seen: ~900 hooks for a removed 1,000-job cluster over the next 2 minutes). Returns the
    seconds waited."""
    import datetime  # noqa: PLC0415

    periodic = ("Checking for candidate jobs", "Route Name ", "Annex ")
    started = time.time()

    def last_activity() -> float:
        last = 0.0
        with open("/var/log/condor/JobRouterLog", errors="replace") as handle:
            for line in handle.readlines()[-400:]:
                if any(mark in line for mark in periodic) or len(line) < 18:
                    continue
                try:
                    stamp = datetime.datetime.strptime(line[:17], "%m/%d/%y %H:%M:%S")
                except ValueError:
                    continue
                last = max(last, stamp.timestamp())
        return last

    wait_for(
        "the job router to go quiet",
        lambda: time.time() - last_activity() >= 4 * period + 1,
        timeout,
        1,
    )
    return time.time() - started


def submit_retry(user: str, where: str, tries: int = 12) -> tuple[str, float]:
    """condor_submit job.sub in `where`; retried (every 5 s) on a failed commit.

    Seen every time a cluster naming an annex had just been removed while the router was still
    editing its jobs in place: another submit by the same user failed with "Failed to commit job
    submission into the queue. ERROR: Modifying attribute AnnexGahpSocket in nonexistent job
    N.M" (the schedd logs the router's SetAttribute on the removed job)."""
    for attempt in range(tries):
        done = run(["runuser", "-u", user, "--", "condor_submit", "job.sub"], cwd=where)
        returned = time.time()
        if done.returncode == 0:
            cluster = done.stdout.split("submitted to cluster ")[-1].strip().rstrip(".")
            return cluster, returned
        why = f"{done.stdout.strip()} {done.stderr.strip()}"
        out(f"  condor_submit failed (try {attempt + 1}): {why}")
        time.sleep(5)
    raise RuntimeError(f"condor_submit kept failing: {why}")


def remove_all() -> None:
    run(["condor_rm", "-all"])
    # Grid jobs whose gridmanager is gone linger in X; force them out.
    run(["condor_rm", "-all", "-forcex"])


def condor_q(constraint: str, attrs: list[str]) -> list[list[str]]:
    done = run(["condor_q", "-allusers", "-constraint", constraint, "-af", *attrs])
    return [line.split() for line in done.stdout.splitlines() if line.strip()]


def helper_call(command: str, user: str | None = None, **kwargs: str | int) -> dict[str, str]:
    """One helper command through the project's own client, as root (admin) or as `user`."""
    from annex_gahp import client  # noqa: PLC0415

    if user is None:
        return client.call(command, **kwargs)
    args = " ".join(f"{k}={v}" for k, v in kwargs.items())
    code = (
        "import json, sys\nfrom annex_gahp import client\n"
        "kv = dict(a.split('=', 1) for a in sys.argv[2:])\n"
        "print(json.dumps(client.call(sys.argv[1], **kv)))"
    )
    done = run(["runuser", "-u", user, "--", sys_python(), "-c", code, command, *args.split()])
    if done.returncode != 0:
        raise RuntimeError(f"{command} as {user}: {done.stderr.strip()}")
    return json.loads(done.stdout)


def delete_all_annexes(timeout: float = 240) -> None:
    """Retire every live annex of every owner (admin) and wait until they are gone."""
    for annex in json.loads(helper_call("ANNEX_LIST")["json"]):
        try:
            helper_call("ANNEX_DELETE", owner=annex["Owner"], name=annex["AnnexName"])
        except Exception as err:
            out(f"  (delete {annex.get('Owner')}/{annex.get('AnnexName')}: {err})")
    wait_for("every annex to retire", lambda: helper_call("ANNEX_LIST")["json"] == "[]", timeout, 1)


def sys_python() -> str:
    return "/opt/annex-venv/bin/python"


def which(name: str) -> str:
    return shutil.which(name) or name
