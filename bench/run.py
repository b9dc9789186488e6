"""Run every benchmark inside a running sandbox (as root): `scripts/bench` calls this.

    /opt/annex-venv/bin/python /src/bench/run.py [NAME ...]

NAME: hook, latency, peers, spot, api, socket (default: all, in that order). Before the benchmarks:
start the counting proxy (bench/awsproxy.py) in front of the emulator, point the helper at it
(a config file after the sandbox's own, then a restart of the helper by condor_master), raise
the per-user instance cap so the 100-annex run fits, and give the gridmanager the emulator's
per-service host names. At the end: a summary of every PASS/FAIL line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

HERE = os.path.dirname(os.path.abspath(__file__))
# Peers before the benchmarks that leave hundreds of instances (terminated ones included) in the
# emulator: HTCondor's ec2_gahp probes with one DescribeInstances and does not follow
# NextToken, and moto pages at 100 reservations (docs/benchmarks.md, "Caveats"). Spot before
# them too: it times one reconcile cycle, and moto keeps every terminated instance, filtering
# them all for each describe (real EC2 drops them within about an hour): after socket's 1,000
# its ad-to-CreateFleet median was 2.31 reconcile intervals, after api alone 1.11, alone 0.2.
ORDER = ["hook", "latency", "peers", "spot", "api", "socket"]
SCRIPTS = {
    "hook": "hook_startup.py",
    "socket": "socket_throughput.py",
    "api": "api_efficiency.py",
    "latency": "latency.py",
    "peers": "peers.py",
    "spot": "spot.py",
}
CONFIG = "/etc/condor/config.d/99-zz-bench.conf"
TAGS = ("helper", "gahp", "annex", "fill")


def helper_pids() -> list[int]:
    """The helper processes of THIS sandbox's condor_master (same root as us, parent master)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/root") != "/":
                continue  # another sandbox's process
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{ppid}/cmdline", "rb") as handle:
                parent = handle.read().split(b"\0")[0]
        except (OSError, ValueError, IndexError):
            continue
        if any(a.endswith(b"/annex_gahp") for a in argv[:2]) and parent.endswith(b"condor_master"):
            found.append(int(entry))
    return found


def restart_helper() -> None:
    old = helper_pids()
    for pid in old:
        os.kill(pid, signal.SIGTERM)
    common.wait_for("the old helper to stop", lambda: not set(old) & set(helper_pids()), 30)
    common.wait_for("condor_master to start the helper again", helper_pids, 60, every=0.5)

    def answers() -> bool:
        common.helper_call("ANNEX_LIST")
        return True

    common.wait_for("the helper's socket", answers, 30, every=0.5)


def setup() -> subprocess.Popen:
    env = common.sandbox_env()
    os.makedirs(common.BENCH_DIR, exist_ok=True)
    for name in ("results.jsonl", "aws-calls.jsonl"):
        path = os.path.join(common.BENCH_DIR, name)
        if os.path.exists(path):
            os.unlink(path)
    ports = {tag: common.free_port() for tag in TAGS}
    proxy_log = os.path.join(common.BENCH_DIR, "aws-calls.jsonl")
    upstream = env["ANNEX_AWS_ENDPOINT_URL"]
    proxy = subprocess.Popen(
        [
            sys.executable,
            os.path.join(HERE, "awsproxy.py"),
            "--upstream",
            upstream,
            "--log",
            proxy_log,
            *[f"--listen={tag}={port}" for tag, port in ports.items()],
        ],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    suffix = env.get("ANNEX_EMULATOR_HOST_SUFFIX", "us-east-1.emulator.internal")
    with open(common.BENCH_ENV, "w") as handle:
        json.dump(
            {
                "proxy_log": proxy_log,
                "ports": ports,
                "upstream": upstream,
                "proxy_pid": proxy.pid,
                "helper_endpoint": f"http://127.0.0.1:{ports['helper']}",
                "gahp_endpoint": f"http://ec2.{suffix}:{ports['gahp']}/",
                "host_suffix": suffix,
            },
            handle,
            indent=1,
        )
    for port in ports.values():
        common.wait_for(f"the proxy on {port}", lambda p=port: _connects(p), 20)
    with open(CONFIG, "w") as handle:
        handle.write(
            "# Written by bench/run.py: the helper's AWS calls go through the counting proxy.\n"
            f"ANNEX_AWS_ENDPOINT_URL = http://127.0.0.1:{ports['helper']}\n"
            "ANNEX_MAX_INSTANCES = 100\n"
            "ANNEX_MAX_INSTANCES_PER_USER = 5000\n"
            "ANNEX_IDLE_TIMEOUT = 3600\n"
            "# The grid-universe ec2 peer (one VM per grid job, as GlideinWMS does it).\n"
            "GRIDMANAGER_JOB_PROBE_INTERVAL = 5\n"
            "GRIDMANAGER_MAX_SUBMITTED_JOBS_PER_RESOURCE = 1000\n"
        )
    common.run(["condor_reconfig"])
    restart_helper()
    return proxy


def _connects(port: int) -> bool:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def summary() -> int:
    failed = 0
    common.out("\n=== summary")
    if not os.path.exists(common.RESULTS):
        common.out("  no results")
        return 1
    with open(common.RESULTS) as handle:
        for line in handle:
            entry = json.loads(line)
            if entry["pass"] is None:
                continue
            verdict = "PASS" if entry["pass"] else "FAIL"
            failed += not entry["pass"]
            common.out(
                f"  {verdict}  [{entry['bench']}] {entry['name']}: {entry['value']:.3g}"
                f"{entry['unit']} (target {entry['op']} {entry['target']}{entry['unit']})"
            )
    return 1 if failed else 0


def main() -> int:
    wanted = sys.argv[1:] or ORDER
    unknown = [w for w in wanted if w not in SCRIPTS]
    if unknown:
        print(f"unknown benchmark(s): {unknown}; choose from {ORDER}", file=sys.stderr)
        return 2
    t0 = time.time()
    proxy = setup()
    rc = 0
    try:
        for name in wanted:
            common.out(f"\n=== {name} ({SCRIPTS[name]}), {time.time() - t0:.0f} s in")
            started = time.time()
            done = subprocess.run([sys.executable, os.path.join(HERE, SCRIPTS[name])], check=False)
            common.out(f"--- {name}: exit {done.returncode} after {time.time() - started:.0f} s")
            rc = rc or (done.returncode != 0)
    finally:
        proxy.terminate()
    rc = summary() or rc
    common.out(f"=== all benchmarks: {time.time() - t0:.0f} s, exit {int(rc)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
