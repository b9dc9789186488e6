"""Benchmark 1: start-up cost of the translate hook, as the job router pays it.

Median wall time of `annex_hook_translate` over 50 runs, fed a real job ad (taken from an idle job
alice submitted that matches no slot) against the running helper, divided by
the median wall time of `python3 -c pass` (and of the venv's `python -c pass`) measured in the
same run, interleaved with the hook runs. Target: <= 2.0.

Runs as root; re-runs itself as alice for the timing (the hook runs as the job's owner).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

BENCH = "hook"
RUNS = 50
USER = "alice"
HOOK = "/opt/annex-venv/bin/annex_hook_translate"
ANNEX = "hookbench"
ROUTE_AD = '[ Name = "Annex"; TargetUniverse = 5 ]'


def job_ad() -> tuple[int, str]:
    """(cluster, ad): a real job ad of a job naming an annex, in the router's `Name = value`
    form. The job stays idle in the queue until the end: the helper answers only for a job
    the schedd has waiting (a held one is refused). The router routes it too, to the same
    annex; nothing boots (the booter is stopped) and the annex is deleted at the end."""
    cluster, _ = common.submit(
        USER,
        "executable = /bin/sleep\narguments = 60\nrequirements = false\n"
        f"annex_name = {ANNEX}\nannex_instances = 1\nqueue 1\n",
        "hook",
    )
    done = common.run(["condor_q", "-l", f"{cluster}.0"])
    lines = [line for line in done.stdout.splitlines() if " = " in line]
    lines.sort(key=lambda x: x.split(" = ", 1)[0].lower())
    return cluster, f"{ROUTE_AD}\n------\n" + "\n".join(lines) + "\n\n"


def timed(argv: list[str], stdin: str | None) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr.strip()}")
    return elapsed


def measure(ad_path: str) -> None:
    """As alice: interleaved runs of the hook and both interpreters."""
    with open(ad_path) as handle:
        ad = handle.read()
    out = timed([HOOK], ad)
    # The hook prints the job ad back with the helper's attributes.
    check = subprocess.run([HOOK], input=ad, capture_output=True, text=True, check=False)
    if "AnnexRoutedName" not in check.stdout and "Annex" not in check.stdout:
        raise RuntimeError("the hook's output has no annex attributes")
    samples: dict[str, list[float]] = {"hook": [], "python3": [], "venv": []}
    for _ in range(3):  # warm the page cache
        timed([HOOK], ad), timed(["python3", "-c", "pass"], None)
    for _ in range(RUNS):
        samples["hook"].append(timed([HOOK], ad))
        samples["python3"].append(timed(["/usr/bin/python3", "-c", "pass"], None))
        samples["venv"].append(timed(["/opt/annex-venv/bin/python", "-c", "pass"], None))
    del out
    for key, values in samples.items():
        print(f"{key}={common.median(values)}")


def main() -> int:
    if os.geteuid() != 0:
        measure(sys.argv[1])
        return 0
    cluster, ad = job_ad()
    path = os.path.join(common.workdir(USER, "hook-ad"), "route-and-job.ad")
    common.write_as(USER, path, ad)
    common.out(f"  job ad: {ad.count(chr(10)) - 3} attributes, {len(ad)} bytes (from condor_q -l)")
    try:
        done = common.run(
            ["runuser", "-u", USER, "--", sys.executable, os.path.abspath(__file__), path]
        )
    finally:
        common.remove_jobs(cluster)
    if done.returncode != 0:
        common.out(done.stdout + done.stderr)
        return 1
    medians = dict(line.split("=", 1) for line in done.stdout.split())
    hook, py3, venv = (float(medians[k]) for k in ("hook", "python3", "venv"))
    common.out(
        f"  medians over {RUNS} runs: hook {hook * 1000:.1f} ms, python3 -c pass "
        f"{py3 * 1000:.1f} ms, venv python -c pass {venv * 1000:.1f} ms"
    )
    ok = common.result(BENCH, "translate hook / python3 -c pass", hook / py3, 2.0)
    ok &= common.result(BENCH, "translate hook / venv python -c pass", hook / venv, 2.0)
    try:
        common.helper_call("ANNEX_DELETE", name=ANNEX, owner=USER)
    except Exception as err:  # best effort: the annex retires on its own anyway
        common.out(f"  (could not delete annex {ANNEX}: {err})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
