"""Hostile input to the privileged helper through provision templates and start-up paths
(sandbox, real condor_master, moto).

- alice's provision-mode templates try to reach Python from jinja2 (`cycler.__init__.
  __globals__.os.system(...)`, the same through `namespace`): nothing runs (no marker file in
  the sandbox root or an instance's), each job is held with the template's own one-line
  refusal naming annex_user_data_file, also in AnnexLastError, and nothing is launched or
  recorded for them; bob's provision annex, submitted at the same time, is served.
- One that renders at hand-over but loops forever for the real annex is stopped after 5 s:
  that annex fails with the reason, the job exits 3; bob's annex is launched meanwhile.
- As the condor user, a symlink where the helper's log goes (-> a root-only file) and one in
  place of its state dir (-> a root-owned dir): restarted as root by the master, the helper
  changes neither target; it moves the log symlink aside and says so in its new log, and
  refuses the state dir, naming it in its log.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
import sandbox as sb

from annex_gahp import names
from annex_gahp import settings as settings_mod

pytestmark = pytest.mark.sandbox

LOG = sb.HELPER_LOG
logs = sb.line_logs  # router, helper and booter tails for a timeout's message
tail = sb.file_tail
CONFIG = Path("/etc/condor/config.d/99-zz-test-hostile-templates.conf")
BACKOFF = "MASTER_ANNEXD_BACKOFF_CONSTANT = 1\nMASTER_ANNEXD_BACKOFF_FACTOR = 1.0\n"

BOB_PILOT = """#!/bin/sh
echo "pilot of {{ annex_name }} for {{ annex_owner }}" > /var/tmp/pilot-marker
exec sleep 100000
"""




def write_as(user: str, path: Path, text: str) -> None:
    path.write_text(text)
    subprocess.run(["chown", f"{user}:{user}", str(path)], check=True)


def submit(user: str, workdir: Path, name: str, *extra: str) -> int:
    return sb.condor_submit_as(
        user,
        "\n".join(
            [
                "executable = /bin/true",
                f"annex_name = {name}",
                "annex_mode = provision",
                "annex_user_data_file = ud.sh",
                "annex_user_data_template = true",
                "annex_lease = 30m",
                "output = job.out",
                "log = job.log",
                *extra,
                "queue",
                "",
            ]
        ),
        cwd=str(workdir),
    )


def tagged(name: str, states=("pending", "running")) -> list[dict]:
    return sb.instances([{"Name": f"tag:{names.TAG_NAME}", "Values": [name]}], states=tuple(states))


def annex_ads(name: str) -> list:
    return sb.query_ads("Any", f'MyType == "Annex" && AnnexName == "{name}"')


def held(cluster: int):
    def check():
        ad = sb.job_ad(cluster)
        return ad if ad is not None and ad.get("JobStatus") == 5 else None

    return sb.wait_for(check, timeout=90, what=f"job {cluster}.0 held", on_timeout=logs)


def found_anywhere(marker: str) -> list[str]:
    """Every file named `marker` in the sandbox root and the instances' roots."""
    out = subprocess.run(
        ["find", "/", "/srv/instances", "-xdev", "-name", marker],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    return [line for line in out.stdout.splitlines() if line]


def test_template_exploits_run_nothing_and_hold_only_their_own_jobs() -> None:
    sb.check_running()
    tag = uuid.uuid4().hex[:8]
    marker = f"pwned-{tag}"
    alice_dir = sb.user_tmpdir("alice", "annex-hostile-")
    bob_dir = sb.user_tmpdir("bob", "annex-hostile-")
    payloads = {
        "cycler": f"{{{{ cycler.__init__.__globals__.os.system('touch /tmp/{marker}') }}}}",
        "namespace": f"{{{{ namespace.__init__.__globals__.os.system('touch /tmp/{marker}') }}}}",
    }
    expected = {
        "cycler": "line 2: access to attribute '__init__' of 'StrictUndefined' object is unsafe",
        "namespace": "line 2: access to attribute '__init__' of 'type' object is unsafe",
    }
    jobs: dict[str, tuple[int, str, Path]] = {}
    for kind, payload in payloads.items():
        folder = alice_dir / kind
        sb.run_as("alice", "mkdir", str(folder))
        write_as("alice", folder / "ud.sh", f"#!/bin/sh\n{payload}\n")
        name = f"evil-{kind}-{tag}"
        jobs[kind] = (submit("alice", folder, name), name, folder / "ud.sh")
    write_as("bob", bob_dir / "ud.sh", BOB_PILOT)
    bob_name = f"fine-{tag}"
    bob_job = submit("bob", bob_dir, bob_name)
    try:
        for kind, (cluster, name, path) in jobs.items():
            ad = held(cluster)
            reason = str(ad["HoldReason"])
            want = f"annex_user_data_file {path}: the user data template does not render: "
            assert reason.startswith(want + expected[kind]), reason
            assert "\n" not in reason and "Traceback" not in reason
            last = sb.wait_for(
                lambda c=cluster: (sb.job_ad(c) or {}).get("AnnexLastError"),
                timeout=30,
                what=f"AnnexLastError of job {cluster}",
                on_timeout=logs,
            )
            assert str(last).startswith(want + expected[kind]), last
            assert not annex_ads(name) and not tagged(name, states=())

        def bob_served():
            ad = sb.job_ad(bob_job)
            if ad is None or ad.get("JobStatus") not in (1, 2):
                raise AssertionError(f"bob's job left: {dict(ad) if ad else None}")
            return ad if ad.get("AnnexRunningInstances") == 1 else None

        sb.wait_for(bob_served, timeout=150, what="bob's annex running", on_timeout=logs)
        (instance,) = tagged(bob_name)
        pilot = sb.instance_root(instance["InstanceId"]) / "var/tmp/pilot-marker"
        text = sb.wait_for(
            lambda: pilot.exists() and pilot.read_text(),
            timeout=60,
            what="bob's pilot ran",
            on_timeout=logs,
        )
        assert text == f"pilot of {bob_name} for bob\n"
        assert found_anywhere(marker) == []
    finally:
        for cluster, _name, _path in jobs.values():
            sb.run_as("alice", "condor_rm", str(cluster), check=False)
        sb.run_as("bob", "condor_rm", str(bob_job), check=False)
    sb.wait_for(
        lambda: not tagged(bob_name),
        timeout=90,
        what="bob's instance terminated",
        on_timeout=logs,
    )


def finished(cluster: int, timeout: float = 120):
    def done():
        ad = sb.job_ad(cluster)
        return ad if ad is not None and ad.get("JobStatus") == 4 else None

    return sb.wait_for(done, timeout=timeout, what=f"job {cluster}.0 done", on_timeout=logs)


def test_template_that_stalls_only_at_launch_is_stopped_and_fails_only_its_annex() -> None:
    """It passes the hand-over check (rendered as annex-0 there), then loops forever for the
    real annex: stopped after 5 s, its annex fails with that reason, the job exits 3 saying
    it; bob's annex, due in the same reconcile cycle, is launched all the same."""
    sb.check_running()
    tag = uuid.uuid4().hex[:8]
    alice_dir = sb.user_tmpdir("alice", "annex-hostile-")
    bob_dir = sb.user_tmpdir("bob", "annex-hostile-")
    stall = (
        "#!/bin/sh\n{% if annex_request_id != 'annex-0' %}{% for i in range(100000) %}"
        "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}\n"
    )
    write_as("alice", alice_dir / "ud.sh", stall)
    write_as("bob", bob_dir / "ud.sh", BOB_PILOT)
    name, bob_name = f"slow-{tag}", f"fine-{tag}"
    cluster = submit("alice", alice_dir, name)
    bob_job = submit("bob", bob_dir, bob_name)
    try:
        ad = finished(cluster)
        assert ad["ExitCode"] == names.EXIT_LAUNCH_FAILED
        why = "the user data template does not render: rendering took longer than 5 s"
        assert str(ad["AnnexLastError"]).startswith(why), ad["AnnexLastError"]
        assert why in (alice_dir / "job.out").read_text()
        assert not tagged(name, states=())
        sb.wait_for(lambda: tagged(bob_name), timeout=60, what="bob's instance", on_timeout=logs)
    finally:
        sb.run_as("alice", "condor_rm", str(cluster), check=False)
        sb.run_as("bob", "condor_rm", str(bob_job), check=False)
    sb.wait_for(
        lambda: not tagged(bob_name),
        timeout=90,
        what="bob's instance terminated",
        on_timeout=logs,
    )


# --- start-up as root amid the condor user's symlinks ----------------------------------------


def log_since(offset: int) -> str:
    with LOG.open("rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace")


def ours(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/root") == "/"
    except OSError:
        return False


def serving_pid(not_pid: int | None = None) -> int:
    def find() -> int | None:
        if not LOG.exists() or LOG.is_symlink():
            return None
        text = log_since(0)
        pids = [int(p) for p in re.findall(r"annex_gahp starting \(pid (\d+)\)", text)]
        pids = [p for p in pids if p != not_pid]
        if pids and ours(pids[-1]) and "serving " in text.split(f"(pid {pids[-1]})")[-1]:
            return pids[-1]
        return None

    return sb.wait_for(find, timeout=90, what="annex_gahp serving", on_timeout=lambda: tail(LOG))


def reconfig() -> None:
    subprocess.run(["condor_reconfig"], check=True, capture_output=True)


@pytest.fixture
def quick_restarts(sandbox):
    CONFIG.write_text("# tests/e2e/test_hostile_templates.py\n" + BACKOFF)
    reconfig()
    if not LOG.exists() or not re.search(r"serving ", LOG.read_text(errors="replace")):
        subprocess.run(["condor_on", "-daemon", "ANNEXD"], check=False, capture_output=True)
    yield
    CONFIG.unlink(missing_ok=True)
    reconfig()


def victim_file(tag: str) -> Path:
    victim = Path(f"/etc/annex-victim-{tag}")
    victim.write_text("root:only\n")
    os.chmod(victim, 0o600)
    return victim


def owner_mode(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_uid, info.st_gid, info.st_mode & 0o7777


# Serial (quick_restarts): reconfigures the pool and restarts the helper.
@pytest.mark.serial
def test_log_symlink_planted_by_condor_is_not_followed_at_start_up(quick_restarts) -> None:
    tag = uuid.uuid4().hex[:8]
    victim = victim_file(tag)
    keep = LOG.with_name(f"AnnexGahpLog.before-{tag}")
    pid = serving_pid()
    try:
        # The condor user owns /var/log/condor: it can put anything there.
        sb.run_as("condor", "mv", str(LOG), str(keep), cwd="/")
        sb.run_as("condor", "ln", "-s", str(victim), str(LOG), cwd="/")
        os.kill(pid, signal.SIGTERM)
        new = serving_pid(not_pid=pid)
        assert new != pid
        assert owner_mode(victim) == (0, 0, 0o600) and victim.read_text() == "root:only\n"
        assert not LOG.is_symlink() and LOG.stat().st_uid == pwd.getpwnam("condor").pw_uid
        first = LOG.read_text().splitlines()[0]
        assert f"ANNEX_GAHP_LOG {LOG} was a symlink to {victim}: not followed" in first, first
        asides = list(LOG.parent.glob("AnnexGahpLog.refused-*"))
        assert any(p.is_symlink() and os.readlink(p) == str(victim) for p in asides)
    finally:
        for path in LOG.parent.glob("AnnexGahpLog.refused-*"):
            path.unlink()
        keep.unlink(missing_ok=True)
        victim.unlink(missing_ok=True)


@pytest.mark.serial
def test_state_dir_symlink_planted_by_condor_is_refused_at_start_up(quick_restarts) -> None:
    tag = uuid.uuid4().hex[:8]
    state = Path(settings_mod.load().state_dir)
    moved = state.with_name(f"{state.name}.hostile-{tag}")
    victim = Path(f"/etc/annex-victim-dir-{tag}")
    victim.mkdir(mode=0o755)
    pid = serving_pid()
    offset = LOG.stat().st_size
    try:
        subprocess.run(["condor_off", "-daemon", "ANNEXD"], check=True, capture_output=True)
        sb.wait_for(lambda: not ours(pid), timeout=60, what="the helper to stop")
        sb.run_as("condor", "mv", str(state), str(moved), cwd="/")
        sb.run_as("condor", "ln", "-s", str(victim), str(state), cwd="/")
        offset = LOG.stat().st_size
        subprocess.run(["condor_on", "-daemon", "ANNEXD"], check=True, capture_output=True)
        refusal = r"annex_gahp cannot start \(pid \d+\): " + re.escape(
            f"ANNEX_STATE_DIR {state}: {state} is a symlink (to {victim}) owned by uid "
            f"{pwd.getpwnam('condor').pw_uid}; refusing to use it as root"
        )
        sb.wait_for(
            lambda: re.search(refusal, log_since(offset)),
            timeout=60,
            what="the helper to refuse the state dir",
            on_timeout=lambda: tail(LOG),
        )
        assert owner_mode(victim) == (0, 0, 0o755) and os.listdir(victim) == []
        assert "serving " not in log_since(offset)
    finally:
        subprocess.run(["condor_off", "-daemon", "ANNEXD"], check=False, capture_output=True)
        if state.is_symlink():
            state.unlink()
        if moved.exists():
            moved.rename(state)
        victim.rmdir()
        offset = LOG.stat().st_size
        subprocess.run(["condor_on", "-daemon", "ANNEXD"], check=False, capture_output=True)
    sb.wait_for(
        lambda: "serving " in log_since(offset),
        timeout=90,
        what="the helper back",
        on_timeout=lambda: tail(LOG),
    )
