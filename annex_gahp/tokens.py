"""Per-annex IDTOKENs for pool-mode instances.

Each annex's token names the annex and its owner (`identity`), is scoped to what a startd on
an annex needs (advertising itself and its master, reading) and expires with the lease, so a
leaked token is worth one annex and not for long. The pool's collector accepts an ad from such
an identity only when the ad's AnnexName/AnnexOwner are the ones the identity names
(ANNEX_COLLECTOR_REQUIREMENTS in condor_config.d/10-annex-gahp.conf, `requirement`).

Minting needs no root: tokens are signed with the project's own key (ANNEX_TOKEN_KEY), of
which the admin step (`htcondor-annex setup --token-key`, docs/admin.md) put one copy in the
pool's SEC_PASSWORD_DIRECTORY (root's, for the collector that verifies) and one, owned by the
condor user and readable by it alone, in ANNEX_TOKEN_KEY_DIR, which condor_token_create is
pointed at through `_CONDOR_SEC_PASSWORD_DIRECTORY`.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess

from annex_gahp.errors import SetupError

log = logging.getLogger(__name__)

AUTHZ = ("ADVERTISE_STARTD", "ADVERTISE_MASTER", "READ")

# Annex names are a letter then letters, digits or '-' (spec.NAME_RULE): never a '.', so the
# first '.' after "annex." ends the name and no (name, owner) pair shares an identity with
# another. Owners are the schedd's Unix account names.
_KEY_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_OWNER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_ANNEX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,62}$")
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,127}$")


def identity(annex: str, owner: str, domain: str) -> str:
    """`annex.<annex>.<owner>@<domain>`: what the annex's startd authenticates as."""
    if not _ANNEX_RE.match(annex):
        raise SetupError(f"annex name {annex!r} cannot be part of a token identity")
    if not _OWNER_RE.match(owner):
        raise SetupError(f"owner {owner!r} cannot be part of a token identity")
    if not _DOMAIN_RE.match(domain):
        raise SetupError(f"ANNEX_TOKEN_DOMAIN = {domain!r} is not a domain name")
    return f"annex.{annex}.{owner}@{domain}"


def requirement(domain: str) -> str:
    """The collector's check (COLLECTOR_REQUIREMENTS) for ads from annex identities: an ad sent
    with a token of `domain` must carry the AnnexName and AnnexOwner its identity names (and an
    AnnexName without '.', so `annex.a.b.c` of owner `b.c` cannot claim annex `a.b` of `c`); any
    other identity is not this check's business. The shipped 10-annex-gahp.conf spells the
    same expression with $(ANNEX_TOKEN_DOMAIN) (tests/unit/test_tokens.py keeps them equal)."""
    suffix = f"@{domain}"
    return (
        f'(substr(TARGET.AuthenticatedIdentity ?: "", -size("{suffix}")) != "{suffix}") || '
        '(!regexp("[.]", TARGET.AnnexName) && TARGET.AuthenticatedIdentity =?= '
        f'strcat("annex.", TARGET.AnnexName, ".", TARGET.AnnexOwner, "{suffix}"))'
    )


def check_key_file(path: str) -> None:
    """Refuse a signing key anyone but its owner may read or write: whoever reads it can mint
    tokens for any annex."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise SetupError(
            f"no token signing key at {path} (ANNEX_TOKEN_KEY_DIR/ANNEX_TOKEN_KEY): "
            "run `htcondor-annex setup --token-key` as root"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise SetupError(f"token signing key {path} is not a regular file")
    if info.st_mode & 0o077:
        raise SetupError(
            f"token signing key {path} has mode {stat.S_IMODE(info.st_mode):04o}: "
            "it must be readable by its owner only (chmod 600)"
        )


def command(identity: str, lifetime: int, key: str) -> list[str]:
    if not _KEY_NAME_RE.match(key):
        raise SetupError(f"ANNEX_TOKEN_KEY = {key!r} is not a key file name")
    cmd = ["condor_token_create", "-identity", identity, "-lifetime", str(int(lifetime))]
    for authz in AUTHZ:
        cmd += ["-authz", authz]
    return [*cmd, "-key", key]


def mint(identity: str, lifetime: int, key: str, key_dir: str) -> str:
    """A token for `identity`, signed with `key_dir/key`, as the helper's own (condor) user."""
    cmd = command(identity, lifetime, key)
    check_key_file(os.path.join(key_dir, key))
    env = dict(os.environ, _CONDOR_SEC_PASSWORD_DIRECTORY=key_dir)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=60)
    token = result.stdout.strip()
    if result.returncode != 0 or not token:
        # stderr of condor_token_create names the key file or the config problem, never a token.
        raise SetupError(
            "could not mint an annex token with condor_token_create: "
            + (result.stderr.strip().splitlines() or ["no output"])[-1]
        )
    log.info("minted an annex token for %s, valid %d s", identity, lifetime)
    return token
