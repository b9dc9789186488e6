"""Jobs removed while the job router routes them, and what that does to the next submits.

Not one of the timed benchmarks (bench/run.py does not run it): the reproduction behind
docs/router.md, "Jobs that leave before their hook runs". Inside a sandbox, as root:

    scripts/sandbox run -- /opt/annex-venv/bin/python /src/bench/rm_resubmit.py [JOBS] [PROBES]

As alice: submits JOBS (default 1000) jobs naming a new annex (they never run), waits until
the route has edited 20 of them, removes the cluster, then submits a held one-job cluster
about once a second, PROBES (default 90) times, removing each again. Prints each failed
probe submit, then what the logs say happened after the removal: the schedd's refused edits
of removed jobs, the translate hooks the helper refused (JOB_GONE), the probes that failed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

LOGS = Path("/var/log/condor")
USER = "alice"


def as_user(*cmd: str, text: str | None = None, cwd: str = "/") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["runuser", "-u", USER, "--", *cmd],
        input=text,
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
    )


def size(name: str) -> int:
    return (LOGS / name).stat().st_size


def count_since(name: str, offset: int, pattern: str) -> int:
    with (LOGS / name).open(errors="replace") as handle:
        handle.seek(offset)
        return len(re.findall(pattern, handle.read()))


def main(jobs: int, probes: int) -> int:
    workdir = tempfile.mkdtemp(prefix="rm-resubmit-")
    os.chmod(workdir, 0o777)  # noqa: S103 - the user's job writes nothing there; a scratch dir
    name = f"rmtest-{uuid.uuid4().hex[:6]}"
    cluster_text = (
        "executable = /bin/sleep\narguments = 600\nrequirements = false\n"
        f"annex_name = {name}\nannex_instances = 1\nannex_idle_timeout = 10m\nqueue {jobs}\n"
    )
    started = time.time()
    res = as_user("condor_submit", "-terse", "-", text=cluster_text, cwd=workdir)
    if res.returncode != 0:
        print(f"submit failed: {res.stderr.strip()}")
        return 1
    cluster = int(res.stdout.split(".", 1)[0])
    edited = 0
    while edited < 20:
        res = subprocess.run(
            [
                "condor_q",
                str(cluster),
                "-constraint",
                "AnnexRoutedName isnt undefined",
                "-af",
                "ProcId",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        edited = len(res.stdout.split())
        time.sleep(0.5)
    offsets = {log: size(log) for log in ("SchedLog", "AnnexGahpLog")}
    as_user("condor_rm", str(cluster))
    print(f"[{time.time() - started:6.1f} s] {edited} of {jobs} edited: condor_rm {cluster}")
    failed = 0
    for _ in range(probes):
        res = as_user(
            "condor_submit",
            "-terse",
            "-",
            text="executable = /bin/true\nhold = true\nqueue\n",
            cwd=workdir,
        )
        if res.returncode != 0:
            failed += 1
            print(f"[{time.time() - started:6.1f} s] submit failed: {' '.join(res.stderr.split())}")
        else:
            as_user("condor_rm", res.stdout.split(".", 1)[0].strip())
        time.sleep(1)
    refused_edits = count_since("SchedLog", offsets["SchedLog"], r"in nonexistent job")
    gone = count_since("AnnexGahpLog", offsets["AnnexGahpLog"], r"JOB_ROUTED .*JOB_GONE")
    print(
        f"after condor_rm: {refused_edits} edits of removed jobs refused by the schedd, "
        f"{gone} translate hooks refused by the helper (JOB_GONE), "
        f"{failed} of {probes} probe submits failed"
    )
    return 0


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    sys.exit(main(*(args + [1000, 90][len(args) :])))
