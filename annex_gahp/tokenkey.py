"""The project's own IDTOKEN signing key, set up by the admin (`htcondor-annex setup --token-key`).

Two copies of one secret, so that neither the helper nor anything it runs needs root:
- `<SEC_PASSWORD_DIRECTORY>/<ANNEX_TOKEN_KEY>`, owned by root, mode 0600: the pool's daemons
  (the collector) find it there to verify annex tokens, like the POOL key beside it;
- `<ANNEX_TOKEN_KEY_DIR>/<ANNEX_TOKEN_KEY>`, owned by the condor user, mode 0600, in a 0700
  directory of its own: the helper (running as condor) signs with it (tokens.py).
Only annex tokens are signed with it; the POOL key stays root's alone.
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import stat

from annex_gahp import tokens
from annex_gahp.errors import SetupError

log = logging.getLogger(__name__)


def _read(path: str, owner_uid: int) -> bytes | None:
    """The key at `path`, or None if absent; refuses one its owner does not keep to itself."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    tokens.check_key_file(path)
    if stat.S_ISLNK(info.st_mode) or info.st_uid != owner_uid:
        raise SetupError(f"token signing key {path} must be a file owned by uid {owner_uid}")
    with open(path, "rb") as handle:
        return handle.read()


def _write(path: str, data: bytes, uid: int, gid: int) -> None:
    partial = f"{path}.new"
    try:
        os.unlink(partial)
    except FileNotFoundError:
        pass
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchown(fd, uid, gid)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)


def _private_dir(path: str, uid: int, gid: int) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise SetupError(f"{path} is not a directory")
    os.chown(path, uid, gid)
    os.chmod(path, 0o700)


def ensure(password_dir: str, key_dir: str, key: str, user: str = "condor") -> str:
    """Create the key (or the missing copy of it); returns what was done, for the admin."""
    if os.geteuid() != 0:
        raise SetupError("the token signing key is set up by root: run this as root")
    tokens.command("x@y", 60, key)  # validates the key's name (ANNEX_TOKEN_KEY)
    if not password_dir:
        raise SetupError("SEC_PASSWORD_DIRECTORY is empty: the collector would not find the key")
    condor = pwd.getpwnam(user)
    pool_copy = os.path.join(password_dir, key)
    own_copy = os.path.join(key_dir, key)
    _private_dir(password_dir, 0, 0)
    _private_dir(key_dir, condor.pw_uid, condor.pw_gid)
    have_pool, have_own = _read(pool_copy, 0), _read(own_copy, condor.pw_uid)
    if have_pool and have_own:
        if have_pool != have_own:
            raise SetupError(
                f"{pool_copy} and {own_copy} differ: remove one and re-run "
                "`htcondor-annex setup --token-key` (existing annex tokens stop working)"
            )
        return f"token signing key {key!r} already set up ({pool_copy}, {own_copy})"
    data = have_pool or have_own or secrets.token_urlsafe(48).encode()
    if not have_pool:
        _write(pool_copy, data, 0, 0)
    if not have_own:
        _write(own_copy, data, condor.pw_uid, condor.pw_gid)
    log.info("token signing key %s set up", key)
    return f"token signing key {key!r} written to {pool_copy} (root) and {own_copy} ({user})"
