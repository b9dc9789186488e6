"""A running sandbox pool (HTCondor + this project + the AWS emulator + the instance booter), and
the one way tests reach it: a shell command run inside it as some user.

Two places a test process can be, one `Sandbox` for both:
- inside the sandbox's root (the project's own tests: scripts/test runs pytest there), known by
  /etc/annex-sandbox.env: commands run directly (runuser for another user);
- on the host, as root (an outside suite): the packaged sandbox script (data/sandbox) builds or
  reuses a sandbox in a directory, and commands run through its `run --user U --` verb.
Either way the emulator and the collector are on this host's 127.0.0.1 (the root shares the
host's network), so `ec2` is a plain boto3 client in both.

Stdlib only at import time: the pytest plugin imports this in every pytest run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from annex_gahp.testing.waiting import wait_for

LOG = logging.getLogger("annex_gahp.testing")

SCRIPT = Path(__file__).parent / "data" / "sandbox"
INSIDE_ENV = Path("/etc/annex-sandbox.env")
DEFAULT_POOL_DIR = Path("/var/tmp/annex-pytest-sandbox")
CONFIG_DIR = "/etc/condor/config.d"
ANNEX_CONSTRAINT = 'MyType == "Annex"'
_KNOB = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class SandboxError(RuntimeError):
    """The sandbox could not be built, reached or used."""


def parse_env(text: str) -> dict[str, str]:
    """KEY=value lines (the sandbox's ports.env / /etc/annex-sandbox.env)."""
    facts = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            facts[key] = value
    return facts


def inside_sandbox() -> bool:
    return INSIDE_ENV.exists()


@dataclass
class Sandbox:
    """One sandbox, reached from inside its root (`pool_dir` None) or from the host."""

    pool_dir: Path | None = None
    source: Path | None = None
    started_here: bool = False
    _facts: dict[str, str] = field(default_factory=dict, repr=False)

    # --- lifecycle (host side) -------------------------------------------------------------

    @classmethod
    def open(cls, pool_dir: Path | None = None, source: Path | None = None) -> Sandbox:
        """The sandbox this process is in; else the one in `pool_dir` (started when down)."""
        if inside_sandbox():
            sandbox = cls()
            sandbox.check_running()
            return sandbox
        if os.geteuid() != 0:
            raise SandboxError("building or reaching a sandbox from the host needs root "
                               "(it mounts and chroots): run pytest as root")
        sandbox = cls(pool_dir=Path(pool_dir or DEFAULT_POOL_DIR), source=source)
        if sandbox._script("status", check=False).returncode == 0:
            LOG.info("reusing the sandbox at %s", sandbox.pool_dir)
        else:
            LOG.info("starting a sandbox at %s (minutes the first time)", sandbox.pool_dir)
            sandbox._script("up", timeout=1800)
            sandbox.started_here = True
        sandbox.check_running()
        return sandbox

    def close(self, keep: bool = False) -> None:
        """Take the sandbox down if this process started it (and `keep` is false)."""
        if self.pool_dir is not None and self.started_here and not keep:
            self._script("down", check=False, timeout=300)

    def _script(self, *args: str, check: bool = True, timeout: float = 600
                ) -> subprocess.CompletedProcess[str]:
        assert self.pool_dir is not None
        environment = dict(os.environ, ANNEX_SANDBOX=str(self.pool_dir))
        if self.source is not None:
            environment["ANNEX_SANDBOX_SRC"] = str(self.source)
        res = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                             env=environment, timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise SandboxError(f"sandbox {' '.join(args[:1])} at {self.pool_dir} failed "
                               f"(exit {res.returncode}):\n{res.stderr[-3000:]}")
        return res

    # --- facts -------------------------------------------------------------------------------

    @property
    def facts(self) -> dict[str, str]:
        """Ports, endpoint, default image id: the sandbox's /etc/annex-sandbox.env."""
        if not self._facts:
            where = INSIDE_ENV if self.pool_dir is None else self.pool_dir / "ports.env"
            if not where.exists():
                raise SandboxError(f"{where} is missing: that sandbox is not up")
            self._facts = parse_env(where.read_text())
        return self._facts

    def check_running(self) -> None:
        if self.pool_dir is None:
            from annex_gahp.testing import inside  # noqa: PLC0415 - inside only

            try:
                inside.check_running()
            except inside.NotInSandbox as e:
                raise SandboxError(str(e)) from e
            return
        res = self.run("condor_status -collector -af Name", timeout=60)
        if res.returncode != 0 or not res.stdout.strip():
            raise SandboxError(f"the sandbox's collector does not answer: {res.stderr.strip()}")

    # --- the one way in --------------------------------------------------------------------

    def run(self, cmd: str, user: str | None = None, timeout: float = 120, *,
            input: str | None = None, cwd: str | None = None, check: bool = False
            ) -> subprocess.CompletedProcess[str]:
        """Shell command `cmd` run inside the pool as `user` (root when None), in `cwd` (that
        user's home when None), the sandbox's venv first on PATH."""
        user = user or "root"
        script = f"cd {shlex.quote(cwd) if cwd else ''} || exit 125\n{cmd}"
        if self.pool_dir is None:
            from annex_gahp.testing import inside  # noqa: PLC0415 - pwd lookups, inside only

            res = inside.run_as(user, "/bin/sh", "-c", script, input=input, check=False,
                                timeout=timeout)
        else:
            environment = dict(os.environ, ANNEX_SANDBOX=str(self.pool_dir))
            res = subprocess.run(["bash", str(SCRIPT), "run", "--user", user, "--",
                                  "/bin/sh", "-c", script], input=input, capture_output=True,
                                 text=True, timeout=timeout, env=environment, check=False)
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, cmd, output=res.stdout,
                                                stderr=res.stderr)
        return res

    # --- conveniences on top of run ------------------------------------------------------------

    def write(self, user: str, relpath: str, text: str) -> str:
        """Write `text` to `relpath` under `user`'s home, as that user; the path inside."""
        q = shlex.quote(relpath)
        res = self.run(f'mkdir -p "$(dirname {q})" && cat > {q} && readlink -f {q}',
                       user=user, input=text, check=True)
        return res.stdout.strip()

    def submit(self, text: str, user: str = "alice", cwd: str | None = None) -> int:
        """condor_submit the description `text` as `user`; the cluster id. A refused
        submission raises CalledProcessError carrying condor_submit's ERROR line."""
        res = self.run("condor_submit -terse -", user=user, input=text, cwd=cwd, check=True)
        m = re.match(r"\s*(\d+)\.\d+", res.stdout)
        if not m:
            raise SandboxError(f"condor_submit said: {res.stdout!r} {res.stderr!r}")
        return int(m.group(1))

    def json_ads(self, cmd: str) -> list[dict[str, Any]]:
        """The ads a condor_status / condor_q / condor_history command prints with -json."""
        res = self.run(f"{cmd} -json", check=True)
        return json.loads(res.stdout) if res.stdout.strip() else []

    def annex_ads(self, name: str | None = None) -> list[dict[str, Any]]:
        """The `Annex` ads in the collector (only annex `name`'s when given)."""
        constraint = ANNEX_CONSTRAINT
        if name is not None:
            constraint += f" && AnnexName == {json.dumps(name)}"
        return self.json_ads(f"condor_status -any -constraint {shlex.quote(constraint)}")

    def job_ad(self, cluster: int, proc: int = 0) -> dict[str, Any] | None:
        """The job's ad from the queue, else from the history."""
        for cmd in (f"condor_q {cluster}.{proc}", f"condor_history {cluster}.{proc} -limit 1"):
            ads = self.json_ads(cmd)
            if ads:
                return ads[0]
        return None

    def wait_for_job(self, cluster: int, timeout: float = 180, proc: int = 0) -> dict[str, Any]:
        """Wait until the job completed and return its ad; fail at once on hold or removal."""
        def done() -> dict[str, Any] | None:
            ad = self.job_ad(cluster, proc)
            status = ad and ad.get("JobStatus")
            if status in (3, 5):
                raise AssertionError(f"job {cluster}.{proc} is "
                                     f"{'removed' if status == 3 else 'held'}: "
                                     f"{ad.get('HoldReason', '')}")
            return ad if status == 4 else None

        return wait_for(done, timeout=timeout, what=f"job {cluster}.{proc} to complete",
                        on_timeout=self.logs_tail)

    def logs_tail(self, lines: int = 20) -> str:
        """The tails of the router's, the helper's and the booter's logs (for a failure)."""
        logs = "/var/log/condor/JobRouterLog /var/log/condor/AnnexGahpLog /var/log/annex-booter.log"
        return self.run(f"for f in {logs}; do echo \"== $f\"; tail -n {lines} \"$f\"; done").stdout

    def set_config(self, filename: str, knobs: dict[str, object]) -> None:
        """Write knobs to config.d/`filename` (empty: remove it) and condor_reconfig."""
        lines = []
        for knob, value in knobs.items():
            text = str(value)
            if not _KNOB.match(knob) or "\n" in text:
                raise ValueError(f"config knob {knob!r} = {text!r}: one knob name, one line")
            lines.append(f"{knob} = {text}\n")
        path = shlex.quote(f"{CONFIG_DIR}/{filename}")
        cmd = f"cat > {path}" if lines else f"rm -f {path}"
        self.run(f"{cmd} && condor_reconfig", input="".join(lines), check=True)

    @property
    def ec2(self) -> Any:
        """A boto3 EC2 client on the sandbox's emulator."""
        return self.aws_client("ec2")

    def aws_client(self, service: str) -> Any:
        import boto3  # noqa: PLC0415 - only when a test asks: the plugin loads in every run

        return boto3.client(service, endpoint_url=self.facts["ANNEX_AWS_ENDPOINT_URL"],
                            region_name=self.facts.get("ANNEX_AWS_REGION", "us-east-1"),
                            aws_access_key_id="sandbox-fake-access-key",
                            aws_secret_access_key="sandbox-fake-secret-key")  # noqa: S106

    def instances(self, annex: str | None = None, states: tuple[str, ...] = ("pending", "running")
                  ) -> list[dict[str, Any]]:
        """The emulator's instances (of annex `annex` when given) in `states` (() = all)."""
        filters = [{"Name": "tag:htcondor-annex:name", "Values": [annex]}] if annex else []
        found = []
        for page in self.ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for r in page["Reservations"]:
                found += [i for i in r["Instances"] if not states or i["State"]["Name"] in states]
        return found


@dataclass
class BootedInstance:
    """An emulated instance the sandbox's booter booted from its user data."""

    sandbox: Sandbox
    instance_id: str

    @property
    def dir(self) -> str:
        """Where the booter keeps it inside the pool: merged/ (its root), console.log."""
        return f"/srv/instances/{self.instance_id}"

    def console_log(self) -> str:
        """What its user data printed (kept after it is gone)."""
        q = shlex.quote(self.instance_id)
        return self.sandbox.run(f"cat /srv/instances/{q}/console.log 2>/dev/null "
                                f"|| cat /var/log/annex-instances/{q}.console.log").stdout

    def booter_log(self, lines: int = 50) -> str:
        return self.sandbox.run(f"tail -n {lines} /var/log/annex-booter.log").stdout

    def state(self) -> str | None:
        res = self.sandbox.ec2.describe_instances(InstanceIds=[self.instance_id])
        for r in res["Reservations"]:
            for i in r["Instances"]:
                return i["State"]["Name"]
        return None

    def stop(self, timeout: float = 60) -> None:
        """Terminate it in EC2; the booter then stops its processes and removes its root."""
        if self.state() not in (None, "terminated"):
            self.sandbox.ec2.terminate_instances(InstanceIds=[self.instance_id])
        wait_for(lambda: self.sandbox.run(f"test -e {self.dir}").returncode != 0,
                 timeout=timeout, what=f"the booter to tear {self.instance_id} down",
                 on_timeout=self.booter_log)


def boot(sandbox: Sandbox, instance_id: str | None = None, annex: str | None = None,
         timeout: float = 120) -> BootedInstance:
    """Wait until the booter has booted `instance_id` (or the first instance of annex `annex`,
    waiting for EC2 to have one) from its user data, and return it."""
    if instance_id is None:
        if annex is None:
            raise ValueError("boot_instance needs an instance id or an annex name")
        found = wait_for(lambda: sandbox.instances(annex), timeout=timeout,
                         what=f"an EC2 instance of annex {annex!r}",
                         on_timeout=sandbox.logs_tail)
        instance_id = found[0]["InstanceId"]
    inst = BootedInstance(sandbox, instance_id)
    # The booter writes imds-url once the instance's root and IMDS are ready, then runs the
    # user data (console.log).
    wait_for(lambda: sandbox.run(f"test -s {inst.dir}/imds-url").returncode == 0,
             timeout=timeout, what=f"the booter to boot {instance_id}",
             on_timeout=inst.booter_log)
    return inst
