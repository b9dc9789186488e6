"""Benchmark 5: the same work through peers on the same emulator, counted at the same proxy.

(a) upstream `condor_annex` (Debian's condor 23.9): see docs/benchmarks.md for why it is not
    run here.
(b) 8 instances for 1,000 short jobs:
    ours: one submit of 1,000 jobs naming one annex of 8 instances (pool mode);
    grid:  8 grid-universe `ec2` jobs (one VM per grid job, as GlideinWMS does it) through
           Debian's ec2_gahp, its endpoint http://ec2.us-east-1.<suffix>:PORT/ (the proxy).
(c) 50 pilots: one provision-mode annex of 50 instances (pool mode if provision mode does not
    launch yet: said in the output) vs 50 grid-universe `ec2` jobs.

For each: AWS calls from condor_submit returning until every instance is running in EC2 (the
emulator's state, polled directly, uncounted), and that time. For the grid jobs also the time
until condor_q shows them all Running. Printed as ours / peer ratios.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

BENCH = "peers"
USER = "alice"
PERIOD = float(common.run(["condor_config_val", "JOB_ROUTER_POLLING_PERIOD"]).stdout or 10)
LIMIT = 240  # s for the grid jobs; 50 of them stalled at 20 VMs in every run here (benchmarks.md)
PILOT = "#!/bin/sh\n# a pilot: report home and stay up\necho pilot up; sleep 3600\n"


def existing_ids(ec2) -> set[str]:
    return {i["InstanceId"] for i in common.instances(ec2)}


def calls_between(tag: str, since: float, until: float) -> tuple[int, dict[str, int]]:
    entries = common.calls(tag, since, until)
    return len(entries), common.by_action(entries)


def ours(label: str, instances: int, jobs: int, mode: str = "pool") -> dict:
    ec2 = common.ec2()
    name = f"{label}{int(time.time()) % 100000}"
    where = common.workdir(USER, f"peer-{label}")
    extra = ""
    if mode == "provision":
        common.write_as(USER, os.path.join(where, "pilot.sh"), PILOT, 0o755)
        extra = f"annex_mode = provision\nannex_user_data_file = {where}/pilot.sh\n"
    sub = (
        "executable = /bin/true\n"
        f"annex_name = {name}\nannex_instances = {instances}\n{extra}queue {jobs}\n"
    )
    common.write_as(USER, os.path.join(where, "job.sub"), sub)
    cluster, returned = common.submit_retry(USER, where)

    def all_running() -> float | None:
        found = common.annex_instances(common.ec2(), name, ("running",))
        return time.time() if len(found) >= instances else None

    def failed() -> str:
        try:
            status = json.loads(common.helper_call("ANNEX_STATUS", owner=USER, name=name)["json"])
        except Exception as err:
            return str(err)
        return status.get("LastError", "") or f"annex state {status.get('AnnexState')}"

    result: dict = {"name": name, "cluster": cluster, "mode": mode}
    try:
        limit = 60 if mode == "provision" else 300
        t_all = common.wait_for(f"{instances} running instances of {name}", all_running, limit, 0.2)
    except TimeoutError:
        result["error"] = failed() or "instances did not all run"
        t_all = None
    if t_all is not None:
        result["seconds"] = t_all - returned
        result["calls"], result["by_action"] = calls_between("helper", returned, t_all)
        result["instances"] = len(common.annex_instances(ec2, name, ("running",)))
    common.remove_jobs(cluster)
    try:
        common.helper_call("ANNEX_DELETE", owner=USER, name=name)
    except Exception as err:
        common.out(f"  (delete {name}: {err})")
    return result


def grid(label: str, count: int) -> dict:
    env = common.bench_env()
    ec2 = common.ec2()
    before = existing_ids(ec2)
    where = common.workdir(USER, f"grid-{label}")
    common.write_as(USER, os.path.join(where, "ak"), "bench-access-key\n", 0o600)
    common.write_as(USER, os.path.join(where, "sk"), "bench-secret-key\n", 0o600)
    common.write_as(USER, os.path.join(where, "pilot"), PILOT, 0o755)
    ami = common.sandbox_env()["ANNEX_DEFAULT_IMAGE_ID"]
    sub = (
        "universe = grid\n"
        f"grid_resource = ec2 {env['gahp_endpoint']}\n"
        "executable = pilot\n"
        f"ec2_access_key_id = {where}/ak\n"
        f"ec2_secret_access_key = {where}/sk\n"
        f"ec2_ami_id = {ami}\n"
        "ec2_instance_type = m5.large\n"
        f"ec2_user_data_file = {where}/pilot\n"
        "log = grid.log\n"
        f"queue {count}\n"
    )
    common.write_as(USER, os.path.join(where, "job.sub"), sub)
    cluster, returned = common.submit_retry(USER, where)
    result: dict = {"cluster": cluster}
    marks: dict[str, float] = {}

    def progress() -> bool:
        now = time.time()
        if "instances" not in marks:
            running = [
                i
                for i in common.instances(
                    ec2, [{"Name": "instance-state-name", "Values": ["running"]}]
                )
                if i["InstanceId"] not in before
                and not any(t["Key"].startswith("htcondor-annex:") for t in i.get("Tags", []))
            ]
            if len(running) >= count:
                marks["instances"] = now
        if "jobs" not in marks:
            rows = common.condor_q(f"ClusterId == {cluster} && JobStatus == 2", ["ProcId"])
            if len(rows) >= count:
                marks["jobs"] = now
        return len(marks) == 2

    try:
        common.wait_for(f"{count} grid jobs and their instances running", progress, LIMIT, 0.5)
    except TimeoutError as err:
        result["error"] = str(err)
        states = common.condor_q(f"ClusterId == {cluster}", ["JobStatus"])
        result["jobs_running_at_timeout"] = sum(1 for row in states if row == ["2"])
        result["instances_running_at_timeout"] = len(
            [
                i
                for i in common.instances(
                    ec2, [{"Name": "instance-state-name", "Values": ["running"]}]
                )
                if i["InstanceId"] not in before and i.get("KeyName", "").startswith("SSH_")
            ]
        )
        result["timeout_seconds"] = LIMIT
    if "instances" in marks:
        result["seconds"] = marks["instances"] - returned
        result["calls"], result["by_action"] = calls_between("gahp", returned, marks["instances"])
    if "jobs" in marks:
        result["seconds_jobs"] = marks["jobs"] - returned
        result["calls_jobs"], _ = calls_between("gahp", returned, marks["jobs"])
    # condor_rm: the gridmanager terminates each VM; then make sure nothing is left behind.
    common.run(["condor_rm", cluster])
    try:
        common.wait_for(
            "the grid jobs to leave the queue",
            lambda: not common.condor_q(f"ClusterId == {cluster}", ["ProcId"]),
            120,
            1,
        )
    except TimeoutError:
        common.run(["condor_rm", "-forcex", cluster])
    leftover = [
        i["InstanceId"]
        for i in common.instances(
            ec2, [{"Name": "instance-state-name", "Values": ["pending", "running"]}]
        )
        if i["InstanceId"] not in before
        and not any(t["Key"].startswith("htcondor-annex:") for t in i.get("Tags", []))
    ]
    if leftover:
        result["left_running_after_rm"] = len(leftover)
        ec2.terminate_instances(InstanceIds=leftover)
    return result


def compare(case: str, mine: dict, peer: dict, peer_name: str) -> bool:
    common.out(f"  {case}: ours {json.dumps(mine)}")
    common.out(f"  {case}: {peer_name} {json.dumps(peer)}")
    if "calls" in mine and "calls" not in peer and "timeout_seconds" in peer:
        # The peer had not finished: ours / peer is at most ours / the time waited.
        common.out(
            f"  {case}: {peer_name} not finished after {peer['timeout_seconds']} s "
            f"({peer.get('instances_running_at_timeout')} instances, "
            f"{peer.get('jobs_running_at_timeout')} jobs running)"
        )
        return common.result(
            BENCH,
            f"{case}: time until all instances run, ours / {peer_name} (upper bound)",
            mine["seconds"] / peer["timeout_seconds"],
            1.0,
        )
    if "calls" not in mine or "calls" not in peer:
        common.out(f"  {case}: cannot compare (see errors above)")
        return False
    ok = common.result(
        BENCH,
        f"{case}: AWS calls until all run, ours / {peer_name}",
        mine["calls"] / peer["calls"],
        1.0,
    )
    ok &= common.result(
        BENCH,
        f"{case}: time until all instances run, ours / {peer_name}",
        mine["seconds"] / peer["seconds"],
        1.0,
    )
    if "seconds_jobs" in peer:
        common.result(
            BENCH,
            f"{case}: ours (instances running) / {peer_name} (grid jobs Running in condor_q)",
            mine["seconds"] / peer["seconds_jobs"],
            None,
        )
    return ok


def main() -> int:
    ok = True
    common.delete_all_annexes()
    common.out("  (a) upstream condor_annex: not run; docs/benchmarks.md says exactly why")

    # The grid-universe runs first: they do not involve the job router, whose backlog of
    # translate hooks after a removed 1,000-job cluster takes minutes to drain.
    grid8 = grid("8", 8)
    grid50 = grid("50", 50)

    common.out("  (c) 50 pilots")
    mine = ours("pilots-", 50, 50, mode="provision")
    if "calls" not in mine:
        common.out(
            f"  provision mode did not launch ({mine.get('error', '?')}); measuring ours in "
            "POOL mode with 50 instances instead"
        )
        mine = ours("pilots-", 50, 50)
        mine["note"] = "pool mode (provision mode did not launch)"
    ok &= compare("(c) 50 pilots", mine, grid50, "grid ec2 x50")

    common.out("  (b) 8 instances for 1,000 short jobs")
    common.delete_all_annexes()  # the (c) annex's retirement calls must not count for (b)
    mine = ours("peer8-", 8, 1000)
    ok &= compare("(b) 8 instances", mine, grid8, "grid ec2 x8")
    common.delete_all_annexes()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
