"""annex_provision_job: what a provision-mode job runs, so that the job stands for its annex.

The schedd transform (condor_config.d/20-annex-submit.conf, AnnexProvision) makes every job
with `annex_mode = provision` a LOCAL universe job running this program as the job's owner on
the access point, and holds it back (its Requirements) until the route `Annex` has handed the
job to the helper: the translate hook read the user data with the owner's rights, the helper
created the annex, and the job carries `AnnexId`.

Here we only watch: every few seconds we ask the helper (ANNEX_STATUS id=..., as the owner)
how the annex is, print each change, and end when the annex ends, with an exit code that says
how (names.EXIT_*):

    0  every instance ended by itself (the pilots are done)
    2  the lease ended: the instances were terminated
    3  no instance could be launched (the error is printed)
    4  the annex was deleted (htcondor-annex delete)
    5  the annex was retired for another reason (printed)
    1  this program failed (no annex to watch)

SIGTERM (condor_rm, condor_hold) deletes the annex (ANNEX_DELETE, as the owner) and waits a
little for its instances to be gone, so condor_rm of the job terminates the instances, as it
does for a grid-universe ec2 job. Stdlib only.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from annex_gahp import client, names

PROG = "annex_provision_job"
POLL = float(os.environ.get("ANNEX_PROVISION_POLL", "5"))
# condor_rm: the starter sends SIGKILL after KILLING_TIMEOUT (30 s by default).
STOP_WAIT = 25.0

EXIT_FOR = {
    "ended": names.EXIT_ENDED,
    "lease": names.EXIT_LEASE,
    "failed": names.EXIT_LAUNCH_FAILED,
    "deleted": names.EXIT_DELETED,
}
WHY = {
    "ended": "every instance ended by itself",
    "lease": "the annex's lease ended; its instances were terminated",
    "failed": "no instance could be launched",
    "deleted": "the annex was deleted (htcondor-annex delete); its instances were terminated",
}


def read_job_ad(path: str | None) -> dict[str, str]:
    """The few attributes we need from the starter's copy of the job ad ($_CONDOR_JOB_AD):
    string values unquoted, others as their text."""
    out: dict[str, str] = {}
    if not path:
        return out
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return out
    for line in lines:
        name, eq, value = line.partition("=")
        if not eq:
            continue
        name, value = name.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"')
        out[name.lower()] = value
    return out


class Watcher:
    def __init__(self, ad: dict[str, str], call=client.call, out=sys.stdout, clock=time.time):
        self.name = ad.get(names.JOB_TARGET.lower(), "")
        self.annex_id = ad.get("annexid", "")
        self.socket = client.socket_path(ad.get(names.SOCKET_ATTR.lower()))
        self._call = call
        self.out = out
        self.clock = clock
        self.stopping = False
        self.last = ""
        self.unreachable = False

    def say(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.clock()))
        self.out.write(f"{stamp} {text}\n")
        self.out.flush()

    def who(self) -> dict[str, str]:
        return {"id": self.annex_id} if self.annex_id else {"name": self.name}

    def status(self) -> dict | None:
        """The annex as the helper sees it; None if the helper cannot be asked right now."""
        try:
            result = self._call("ANNEX_STATUS", path=self.socket, **self.who())
        except client.NotRunning as exc:
            if not self.unreachable:
                self.say(f"cannot reach the helper, will keep trying: {exc}")
            self.unreachable = True
            return None
        except client.ClientError as exc:
            if exc.code in (client.TIMEOUT, client.BUSY, client.PROTOCOL):
                return None
            raise
        self.unreachable = False
        view = json.loads(result.get("json", "{}"))
        if not self.annex_id and view.get("Id"):
            self.annex_id = str(view["Id"])
        return view

    def report(self, view: dict) -> None:
        instances = view.get("instances") or []
        line = (
            f"annex {view.get('AnnexName', self.name)}: {view.get('AnnexState')},"
            f" {view.get('RunningInstances', 0)} running, {view.get('PendingInstances', 0)}"
            f" pending of {view.get('RequestedInstances', 0)},"
            f" {view.get('FailedInstances', 0)} failed; instances: "
            + (" ".join(f"{i.get('id')}={i.get('state')}" for i in instances) or "none")
        )
        if view.get("LastError"):
            line += f"; last error: {view['LastError']}"
        if line != self.last:
            self.say(line)
            self.last = line

    def finish(self, view: dict) -> int:
        reason = str(view.get("RetireReason") or "")
        code = EXIT_FOR.get(reason, names.EXIT_IDLE)
        why = WHY.get(reason, f"the annex was retired ({reason or 'no reason given'})")
        if reason == "failed" and view.get("LastError"):
            why += f": {view['LastError']}"
        self.say(f"annex {view.get('AnnexName', self.name)} is gone: {why} (exit {code})")
        return code

    def stop(self) -> int:
        """condor_rm / condor_hold: delete the annex, wait a little for its instances to go."""
        self.say(f"asked to stop: deleting annex {self.name} and its instances")
        try:
            self._call("ANNEX_DELETE", path=self.socket, **self.who())
        except client.ClientError as exc:
            if exc.code != "NOT_FOUND":
                self.say(f"could not delete the annex: {exc}")
        deadline = time.monotonic() + STOP_WAIT
        while time.monotonic() < deadline:
            view = self.status()
            if view is not None:
                self.report(view)
                if view.get("AnnexState") == names.RETIRED:
                    self.say("the annex is gone; its instances are terminated")
                    break
            time.sleep(1.0)
        return 128 + signal.SIGTERM

    def run(self) -> int:
        if not self.name and not self.annex_id:
            self.say("this job names no annex (no TargetAnnexName in its ad)")
            return names.EXIT_ERROR
        while True:
            if self.stopping:
                return self.stop()
            try:
                view = self.status()
            except client.ClientError as exc:
                self.say(f"the helper refused: {exc}")
                return names.EXIT_ERROR
            if view is not None:
                self.report(view)
                if view.get("AnnexState") == names.RETIRED:
                    return self.finish(view)
            slept = 0.0
            while slept < POLL and not self.stopping:
                time.sleep(0.2)
                slept += 0.2


def main() -> int:
    watcher = Watcher(read_job_ad(os.environ.get("_CONDOR_JOB_AD")))

    def on_term(_signum, _frame) -> None:
        watcher.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    return watcher.run()


if __name__ == "__main__":
    sys.exit(main())
