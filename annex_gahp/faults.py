"""Named checkpoints, and the test-only way to die at one of them.

Every step of creating and retiring an annex logs `checkpoint <name>`. When the helper talks to
an emulator (ANNEX_AWS_ENDPOINT_URL is set: never against real AWS), the knob
ANNEX_GAHP_TEST_FAULTS may name checkpoints at which it SIGKILLs itself, once each: the crash
tests use this to prove that a helper killed at any step ends, after condor_master restarts it,
with exactly the instances it should have.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

CHECKPOINTS = (
    "create.recorded",  # the annex record exists, nothing in the cloud yet
    "create.prepared",  # token stored and launch template made
    "create.intent",  # the launch intent is written, the call not made
    "create.launched",  # CreateFleet answered, the result not recorded
    "create.finished",  # the result is recorded
    "retire.recorded",  # the annex is marked retiring
    "retire.terminated",  # TerminateInstances answered
    "retire.released",  # token and launch template deleted, the annex not yet retired
)

_armed: set[str] = set()
_fired_file = ""


def arm(names: str, endpoint_url: str, state_dir: str) -> None:
    """Arm the named checkpoints (comma separated), only when talking to an emulator."""
    global _fired_file  # noqa: PLW0603 - one process-wide switch, set at start and reconfig
    _armed.clear()
    if not names.strip():
        return
    if not endpoint_url:
        log.warning("ANNEX_GAHP_TEST_FAULTS ignored: it only works against an emulator")
        return
    _fired_file = os.path.join(state_dir, "test-faults-fired")
    fired = set()
    if os.path.exists(_fired_file):
        with open(_fired_file) as handle:
            fired = {line.strip() for line in handle}
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    unknown = wanted - set(CHECKPOINTS)
    if unknown:
        log.warning("ANNEX_GAHP_TEST_FAULTS names unknown checkpoints: %s", sorted(unknown))
    _armed.update(wanted - fired - unknown)
    if _armed:
        log.warning("test faults armed: %s", ", ".join(sorted(_armed)))


def checkpoint(name: str) -> None:
    log.info("checkpoint %s", name)
    if name not in _armed:
        return
    with open(_fired_file, "a") as handle:
        handle.write(name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    log.warning("test fault: SIGKILL at checkpoint %s", name)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
