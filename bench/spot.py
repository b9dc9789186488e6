"""Benchmark 6: a spot interruption notice, to the job idle and to the replacement's call.

As alice, one job (`sleep 600`) naming a fresh spot annex of 1 instance over two subnets (two
zones) runs on an emulated instance; then the instance's IMDS serves an interruption notice
(the booter's test control, as EC2 serves it two minutes before it reclaims the instance).
Measured, RUNS times, each from the moment the notice is served:
- to the job idle again in the schedd (the agent's poll, the startd's cron file, its policy
  evaluation, the shadow's report), as a ratio to the agent's poll interval
  (ANNEX_AGENT_SPOT_INTERVAL, 5 s);
- to the startd ad in the collector carrying AnnexInterruption (what the helper reads);
- to the replacement's CreateFleet reaching the emulator (the counting proxy's arrival time),
  and from the ad to that call as a ratio to ANNEX_RECONCILE_INTERVAL: the helper must ask for
  the replacement within one reconcile cycle of seeing the notice.
Targets: job idle <= 3 poll intervals (5 s poll + 1 s cron + the startd's 5 s policy
evaluation); ad-to-CreateFleet <= 1 reconcile interval (+ 1 s for the collector query and
the call); both medians.

Needs the instance booter, which scripts/bench stops for the other benchmarks: started here
for this benchmark (and stopped after) when the sandbox's own is not running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

BENCH = "spot"
USER = "alice"
RUNS = 3
AGENT_POLL = 5.0  # ANNEX_AGENT_SPOT_INTERVAL's default: what the instances run with
BOOTER = "/usr/local/libexec/annex-sandbox-booter"
INSTANCES = "/srv/instances"


def booter_running() -> bool:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/root") != "/":
                continue  # another sandbox's
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if BOOTER.encode() in handle.read():
                    return True
        except OSError:
            continue
    return False


def start_booter() -> subprocess.Popen | None:
    if booter_running():
        return None
    upstream = common.bench_env()["upstream"]  # the emulator itself, not the counting proxy
    return subprocess.Popen(
        [
            sys.executable,
            BOOTER,
            "--endpoint",
            upstream,
            "--region",
            common.sandbox_env().get("ANNEX_AWS_REGION", "us-east-1"),
            "--log",
            os.path.join(common.BENCH_DIR, "spot-booter.log"),
        ],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def two_subnets() -> list[str]:
    by_zone: dict[str, str] = {}
    for subnet in sorted(
        common.ec2().describe_subnets()["Subnets"],
        key=lambda s: (s["AvailabilityZone"], s["SubnetId"]),
    ):
        by_zone.setdefault(subnet["AvailabilityZone"], subnet["SubnetId"])
    return list(by_zone.values())[:2]


def job_status(cluster: int) -> int | None:
    rows = common.condor_q(f"ClusterId == {cluster}", ["JobStatus"])
    return int(rows[0][0]) if rows and rows[0] and rows[0][0].isdigit() else None


def startd_noticed(instance: str) -> bool:
    out = common.run(
        [
            "condor_status",
            "-constraint",
            f'AnnexInstanceId == "{instance}" && AnnexInterruption =!= undefined',
            "-af",
            "Name",
        ]
    ).stdout
    return bool(out.strip())


def serve_notice(instance: str) -> float:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))
    path = os.path.join(INSTANCES, instance, "spot-instance-action")
    with open(path + ".tmp", "w") as handle:
        handle.write(f'{{"action": "terminate", "time": "{when}"}}')
    os.replace(path + ".tmp", path)
    return time.time()


def one_run(n: int, subnets: list[str]) -> tuple[float, float, float]:
    name = f"spot{int(time.time()) % 100000}-{n}"
    cluster, _ = common.submit(
        USER,
        "executable = /bin/sleep\narguments = 600\n"
        f"annex_name = {name}\nannex_instances = 1\nannex_instance_types = m6i.large\n"
        f"annex_spot_prices = 0.10\nannex_subnets = {','.join(subnets)}\nqueue 1\n",
        "spot",
    )
    try:
        common.wait_for(f"the job of {name} to run", lambda: job_status(cluster) == 2, 180, 0.5)
        # Past the instance's start-up, as a notice comes in practice (the startd's cron
        # job's first reruns are late for a few seconds after it starts).
        time.sleep(5)
        (first,) = common.annex_instances(common.ec2(), name)
        instance = first["InstanceId"]
        t0 = serve_notice(instance)
        seen_ad = None
        idle = None
        fleet = None
        deadline = t0 + 120
        while time.time() < deadline and None in (seen_ad, idle, fleet):
            now = time.time()
            if idle is None and job_status(cluster) == 1:
                idle = now - t0
            if seen_ad is None and startd_noticed(instance):
                seen_ad = now - t0
            if fleet is None:
                for call in common.calls("helper", since=t0):
                    if call.get("action") == "CreateFleet" and call.get("annex") == name:
                        fleet = call["t"] - t0
                        break
            time.sleep(0.1)
        if None in (seen_ad, idle, fleet):
            raise RuntimeError(f"{name}: ad {seen_ad}, idle {idle}, CreateFleet {fleet}")
        common.out(
            f"  run {n + 1}: job idle {idle:.1f} s, startd ad {seen_ad:.1f} s, "
            f"replacement CreateFleet {fleet:.1f} s after the notice"
        )
        return idle, seen_ad, fleet
    finally:
        common.remove_jobs(cluster)
        try:
            common.helper_call("ANNEX_DELETE", owner=USER, name=name)
        except Exception as err:
            common.out(f"  (delete {name}: {err})")


def main() -> int:
    interval = float(
        common.run(["condor_config_val", "ANNEX_RECONCILE_INTERVAL"]).stdout.strip() or 10
    )
    booter = start_booter()
    try:
        subnets = two_subnets()
        results = [one_run(n, subnets) for n in range(RUNS)]
    finally:
        if booter is not None:
            booter.send_signal(signal.SIGTERM)
            booter.wait(timeout=120)
    idle = common.median(r[0] for r in results)
    seen = common.median(r[1] for r in results)
    fleet = common.median(r[2] for r in results)
    ad_to_fleet = common.median(r[2] - r[1] for r in results)
    common.out(
        f"  medians: job idle {idle:.1f} s, ad {seen:.1f} s, CreateFleet {fleet:.1f} s; "
        f"agent poll {AGENT_POLL:.0f} s, ANNEX_RECONCILE_INTERVAL {interval:.0f} s"
    )
    common.result(BENCH, "median notice-to-job-idle", idle, None, unit=" s")
    common.result(BENCH, "median notice-to-replacement-CreateFleet", fleet, None, unit=" s")
    ok = common.result(
        BENCH, "median notice-to-job-idle / agent poll interval", idle / AGENT_POLL, 3.0
    )
    ok &= common.result(
        BENCH,
        "median notice-to-CreateFleet / (agent poll + reconcile interval)",
        fleet / (AGENT_POLL + interval),
        None,
    )
    ok &= common.result(
        BENCH,
        "median startd-ad-to-CreateFleet / reconcile interval",
        ad_to_fleet / interval,
        round((interval + 1) / interval, 2),
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
