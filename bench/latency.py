"""Benchmark 3: submit-to-request latency.

From `condor_submit` returning (as alice, one job naming a fresh annex of 1 instance) to the
helper's CreateFleet for that annex reaching the emulator (the counting proxy's arrival time
for the call tagged with that annex's name), 10 times in a row. Target: median <=
JOB_ROUTER_POLLING_PERIOD + 2 s. The path: the router's next poll runs the translate hook
(JOB_ROUTED), the helper records the annex and wakes its reconcile loop, which mints the
token, writes the launch template and calls CreateFleet.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

BENCH = "latency"
USER = "alice"
RUNS = 10


def main() -> int:
    period = float(common.run(["condor_config_val", "JOB_ROUTER_POLLING_PERIOD"]).stdout.strip())
    tag = f"lat{int(time.time()) % 100000}"
    latencies = []
    clusters = []
    for n in range(RUNS):
        name = f"{tag}-{n}"
        cluster, returned = common.submit(
            USER,
            f"executable = /bin/true\nannex_name = {name}\nannex_instances = 1\nqueue 1\n",
            "latency",
        )
        clusters.append(cluster)

        def created(name: str = name, returned: float = returned) -> float | None:
            for call in common.calls("helper", since=returned - 5):
                if call.get("action") == "CreateFleet" and call.get("annex") == name:
                    return call["t"]
            return None

        t_call = common.wait_for(f"the CreateFleet of {name}", created, 60, every=0.1)
        latencies.append(t_call - returned)
        common.out(f"  run {n + 1}: {t_call - returned:.2f} s")
    for cluster in clusters:
        common.remove_jobs(cluster)
    for n in range(RUNS):
        try:
            common.helper_call("ANNEX_DELETE", owner=USER, name=f"{tag}-{n}")
        except Exception as err:
            common.out(f"  (delete {tag}-{n}: {err})")
    med = common.median(latencies)
    common.out(
        f"  min {min(latencies):.2f} s, median {med:.2f} s, max {max(latencies):.2f} s; "
        f"JOB_ROUTER_POLLING_PERIOD = {period:.0f} s"
    )
    common.result(BENCH, "median submit-to-CreateFleet latency", med, None, unit=" s")
    ok = common.result(BENCH, "median latency / (polling period + 2 s)", med / (period + 2), 1.0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
