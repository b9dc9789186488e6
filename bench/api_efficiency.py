"""Benchmark 2: AWS calls the helper makes, counted at the emulator (the counting proxy).

1. 1,000 jobs (one cluster, as alice) naming one 5-instance annex: CreateFleet calls for it
   once every job has been routed and a few cycles have passed. Target: exactly 1 (and 5
   instances).
2. Describe calls per reconcile cycle, before the jobs (no job, no annex) and with the 1,000
   jobs queued. A cycle = one DescribeInstances first page (no NextToken). Target: the ratio
   with/without jobs <= 1.0.
3. 100 annexes (50 of alice, 50 of bob, 1 instance each, created through the helper's socket
   by the admin for them): DescribeInstances calls per cycle divided by the pages that one
   tag-filtered query needs (ceil(reservations / 100), asked of the emulator directly), and
   every DescribeInstances call carries the pool tag filter. Target: 1.0, and no other Describe
   call per cycle.
"""

from __future__ import annotations

import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

BENCH = "api"
USER = "alice"
JOBS = 1000
ANNEX = "apibench"
ANNEXES = 100
POOL_TAG = "tag:htcondor-annex:pool"


def per_cycle(since: float, until: float) -> tuple[int, dict[str, float], list[dict]]:
    """Cycles in the window and the helper's calls per cycle, by action."""
    window = common.calls("helper", since, until)
    cycles = sum(1 for c in window if c.get("action") == "DescribeInstances" and c.get("first"))
    counts = common.by_action(window)
    return cycles, {k: v / max(cycles, 1) for k, v in counts.items()}, window


def settle(seconds: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def main() -> int:
    ok = True
    ec2 = common.ec2()
    interval = float(common.run(["condor_config_val", "ANNEX_RECONCILE_INTERVAL"]).stdout or 3)
    pool_id = (
        common.run(["condor_config_val", "ANNEX_POOL_ID"]).stdout.strip()
        or common.run(["condor_config_val", "COLLECTOR_HOST"]).stdout.strip()
    )
    window = max(15.0, 5 * interval)

    # --- baseline: no jobs --------------------------------------------------------------
    common.delete_all_annexes()
    since, until = settle(window)
    base_cycles, base, _ = per_cycle(since, until)
    base_describe = sum(v for k, v in base.items() if k.startswith("Describe"))
    common.out(f"  no jobs: {base_cycles} cycles in {window:.0f} s; calls per cycle {base}")

    # --- 1,000 jobs, one annex ----------------------------------------------------------
    cluster, returned = common.submit(
        USER,
        f"executable = /bin/true\nannex_name = {ANNEX}\nannex_instances = 5\nqueue {JOBS}\n",
        "api",
    )

    def routed() -> bool:
        rows = common.condor_q(
            f'ClusterId == {cluster} && AnnexRoutedName =?= "{ANNEX}"', ["ProcId"]
        )
        return len(rows) >= JOBS

    common.wait_for(f"the router to route all {JOBS} jobs", routed, 300, every=2)
    t_routed = time.time()
    common.out(f"  all {JOBS} jobs routed {t_routed - returned:.0f} s after condor_submit returned")
    since, until = settle(window)
    cycles, with_jobs, _ = per_cycle(since, until)
    creates = [
        c
        for c in common.calls("helper", returned - 1)
        if c.get("action") == "CreateFleet" and c.get("annex") == ANNEX
    ]
    launched = common.annex_instances(ec2, ANNEX)
    counts = [int(c.get("count") or 0) for c in creates]
    common.out(
        f"  {JOBS} jobs -> CreateFleet calls for {ANNEX}: {len(creates)} (capacity {counts}); "
        f"instances {len(launched)}"
    )
    ok &= common.result(
        BENCH, f"CreateFleet calls for 1 annex named by {JOBS} jobs", len(creates), 1, "=="
    )
    ok &= common.result(BENCH, "instances launched for annex_instances = 5", len(launched), 5, "==")
    describe = sum(v for k, v in with_jobs.items() if k.startswith("Describe"))
    common.out(f"  {JOBS} jobs: {cycles} cycles in {window:.0f} s; calls per cycle {with_jobs}")
    ok &= common.result(
        BENCH,
        f"Describe calls per cycle, {JOBS} jobs / no jobs",
        describe / base_describe if base_describe else float("inf"),
        1.0,
    )
    common.remove_jobs(cluster)
    common.helper_call("ANNEX_DELETE", owner=USER, name=ANNEX)

    # --- 100 annexes --------------------------------------------------------------------
    t0 = time.time()
    names = []
    for i in range(ANNEXES):
        owner = ("alice", "bob")[i % 2]
        name = f"many{i:03d}"
        common.helper_call("ANNEX_CREATE", owner=owner, name=name, instances=1, lease="2h")
        names.append(name)

    def all_launched() -> bool:
        found = common.instances(
            ec2,
            [
                {"Name": "tag:htcondor-annex:name", "Values": names},
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
            ],
        )
        return len(found) >= ANNEXES

    common.wait_for(f"{ANNEXES} annexes to launch", all_launched, 300, every=2)
    common.out(
        f"  {ANNEXES} annexes created through the socket, all launched in {time.time() - t0:.0f} s"
    )
    since, until = settle(window)
    cycles, many, calls = per_cycle(since, until)
    pages = 0
    reservations = 0
    kwargs = {
        "Filters": [
            {"Name": POOL_TAG, "Values": [pool_id]},
            {
                "Name": "instance-state-name",
                "Values": ["pending", "running", "stopping", "stopped", "shutting-down"],
            },
        ]
    }
    for page in ec2.get_paginator("describe_instances").paginate(**kwargs):
        pages += 1
        reservations += len(page["Reservations"])
    expected = max(1, math.ceil(reservations / 100))
    described = [c for c in calls if c.get("action") == "DescribeInstances"]
    unfiltered = [c for c in described if POOL_TAG not in c.get("filters", [])]
    other = {k: v for k, v in many.items() if k.startswith("Describe") and k != "DescribeInstances"}
    common.out(
        f"  {ANNEXES} annexes: {cycles} cycles in {window:.0f} s; {reservations} reservations "
        f"tagged with the pool = {expected} page(s) of 100; calls per cycle {many}"
    )
    ok &= common.result(
        BENCH,
        f"DescribeInstances per cycle / pages needed, {ANNEXES} annexes",
        many.get("DescribeInstances", 0) / expected,
        1.0,
    )
    ok &= common.result(
        BENCH, "DescribeInstances calls without the pool tag filter", len(unfiltered), 0, "=="
    )
    ok &= common.result(BENCH, "other Describe calls per cycle", sum(other.values()), 0, "==")

    # Clean up: retire them (the helper terminates and deletes templates and tokens).
    for i, name in enumerate(names):
        common.helper_call("ANNEX_DELETE", owner=("alice", "bob")[i % 2], name=name)
    common.delete_all_annexes()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
