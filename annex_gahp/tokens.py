"""Per-annex IDTOKENs for pool-mode instances.

Scoped to what a startd on an annex needs (advertising itself and its master, reading), and
expiring with the lease, so a leaked token is worth little and not for long. Minting needs
the pool signing key, which only root can read: the helper keeps root as its saved uid and
regains it only in the child that runs condor_token_create.
"""

from __future__ import annotations

import logging
import os
import subprocess

from annex_gahp.errors import SetupError

log = logging.getLogger(__name__)

AUTHZ = ("ADVERTISE_STARTD", "ADVERTISE_MASTER", "READ")


def _become_root() -> None:
    if os.geteuid() != 0:
        try:
            os.setresuid(0, 0, 0)
        except PermissionError:
            pass  # not started as root (tests, stdio mode): condor_token_create says why


def mint(identity: str, lifetime: int, key: str = "POOL") -> str:
    command = ["condor_token_create", "-identity", identity, "-lifetime", str(int(lifetime))]
    for authz in AUTHZ:
        command += ["-authz", authz]
    if key:
        command += ["-key", key]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        preexec_fn=_become_root,
        check=False,
        timeout=60,
    )
    token = result.stdout.strip()
    if result.returncode != 0 or not token:
        # stderr of condor_token_create names the key file or the config problem, never a token.
        raise SetupError(
            "could not mint an annex token with condor_token_create: "
            + (result.stderr.strip().splitlines() or ["no output"])[-1]
        )
    log.info("minted an annex token for %s, valid %d s", identity, lifetime)
    return token
