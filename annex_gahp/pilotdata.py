"""Provision mode's user data: read as the job's owner, carried to the helper, kept, rendered.

The translate hook (running as the job's owner) reads the file named by annex_user_data_file
with `read_file()` and sends it base64-encoded (`encode()`); the helper checks it again
(`decode()`), keeps it in a file of its own under ANNEX_STATE_DIR (`save()`/`load()`, mode
0600, never logged), and cloud/aws/context.py puts it into the annex's launch template, rendered
with jinja2 first when the job asked for that (`render()`: never in the helper itself, but in
pilotrender.py's confined child, jinja2's sandbox; `check()` does the same when the job is
handed over, so a bad template is refused before anything is recorded).

EC2 takes at most 16 KB of user data before its base64 encoding (names.USER_DATA_LIMIT). A
larger file is sent gzip-compressed when that fits: cloud-init (and the sandbox's booter)
unpack gzip user data. Anything larger is refused with one line naming the file and the limit.

Stdlib only: the translate hook imports this module (only for provision-mode jobs).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import os
import stat
import time
import zlib

from annex_gahp import names

GZIP_MAGIC = b"\x1f\x8b"
# What we read of a file at most: a file this large cannot compress below the limit anyway
# for any realistic script, and a bigger read is not worth doing to refuse it.
READ_LIMIT = 1024 * 1024


class UserDataError(ValueError):
    """The user data cannot be used; the message (one line) is shown to the user."""


def _too_big(path: str, size: int, packed: int | None) -> UserDataError:
    how = f"{size} bytes" if packed is None else f"{size} bytes ({packed} gzip-compressed)"
    return UserDataError(
        f"annex_user_data_file {path} is {how}, over EC2's user data limit of "
        f"{names.USER_DATA_LIMIT} bytes: make it smaller, or have it download the rest"
    )


def fit(data: bytes, path: str = "the user data") -> bytes:
    """`data` as sent to EC2: as is if it fits, else gzip-compressed if that fits; else
    UserDataError."""
    if len(data) <= names.USER_DATA_LIMIT:
        return data
    if data[:2] == GZIP_MAGIC:
        raise _too_big(path, len(data), None)
    packed = gzip.compress(data, compresslevel=9, mtime=0)
    if len(packed) > names.USER_DATA_LIMIT:
        raise _too_big(path, len(data), len(packed))
    return packed


def read_file(path: str) -> bytes:
    """The user data file's content as sent to EC2 (see fit()), read with the caller's own
    rights: run as the job's owner, it can only read what the owner can read."""
    if not path.startswith("/"):
        raise UserDataError(f"annex_user_data_file {path} is not an absolute path")
    try:
        # O_NONBLOCK: a FIFO must not hang the hook; it is refused below as not a file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise UserDataError(
            f"annex_user_data_file {path} cannot be read by the job's owner (permission "
            "denied): the user data is read with your rights"
        ) from None
    except FileNotFoundError:
        raise UserDataError(f"annex_user_data_file {path} does not exist") from None
    except OSError as exc:
        raise UserDataError(
            f"annex_user_data_file {path} cannot be opened ({exc.strerror or exc})"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserDataError(f"annex_user_data_file {path} is not a regular file")
        chunks: list[bytes] = []
        total = 0
        while total <= READ_LIMIT:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise UserDataError(
            f"annex_user_data_file {path} cannot be read ({exc.strerror or exc})"
        ) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > READ_LIMIT:
        raise _too_big(path, info.st_size, None)
    if not data.strip():
        raise UserDataError(f"annex_user_data_file {path} is empty")
    return fit(data, path)


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode(text: str) -> bytes:
    """The helper's side: base64 from the hook back to bytes, checked against the limit."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise UserDataError("user_data= is not base64") from None
    if not data:
        raise UserDataError("user_data= is empty")
    if len(data) > names.USER_DATA_LIMIT:
        raise UserDataError(
            f"the user data is {len(data)} bytes, over EC2's user data limit of "
            f"{names.USER_DATA_LIMIT} bytes"
        )
    return data


# --- the helper's copy ----------------------------------------------------------------------


def path_for(state_dir: str, annex_id: int) -> str:
    return os.path.join(state_dir, "user-data", f"annex-{int(annex_id)}")


def save(state_dir: str, annex_id: int, data: bytes) -> None:
    """Keep the annex's user data (0600, in a 0700 directory owned by the helper's user)."""
    folder = os.path.join(state_dir, "user-data")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    final = path_for(state_dir, annex_id)
    tmp = f"{final}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)


def load(state_dir: str, annex_id: int) -> bytes | None:
    try:
        with open(path_for(state_dir, annex_id), "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def remove(state_dir: str, annex_id: int) -> None:
    try:
        os.unlink(path_for(state_dir, annex_id))
    except FileNotFoundError:
        pass


def template_text(data: bytes) -> str:
    """The user data as template text: gzip unpacked (to READ_LIMIT at most: 16 KB of gzip can
    hold 16 MB), UTF-8 decoded. Raises UserDataError."""
    if data[:2] == GZIP_MAGIC:
        unpack = zlib.decompressobj(wbits=31)
        try:
            data = unpack.decompress(data, READ_LIMIT + 1)
        except zlib.error:
            raise UserDataError("the user data is not valid gzip") from None
        if len(data) > READ_LIMIT or unpack.unconsumed_tail:
            raise UserDataError(f"the user data unpacks to over {READ_LIMIT} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserDataError("the user data is not UTF-8 text, so it cannot be a template") from None


def variables(  # noqa: PLR0917 - one per documented variable
    name: str, owner: str, request_id: str, region: str, instances: int, expires: int
) -> dict[str, object]:
    """What a template may use (docs/users.md lists them): plain str and int only."""
    return {
        "annex_name": str(name),
        "annex_owner": str(owner),
        "annex_request_id": str(request_id),
        "annex_region": str(region),
        "annex_instances": int(instances),
        "annex_expires": int(expires),
        "annex_expires_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(expires))),
    }


def render(data: bytes, values: dict[str, object], timeout: float | None = None) -> bytes:
    """The user data as a jinja2 template rendered with the annex's variables, in a confined
    child (pilotrender.py: jinja2's sandbox, no privilege, time and size limits), then fitted
    to EC2's limit again. Raises UserDataError with the template's own one-line reason."""
    from annex_gahp import pilotrender  # noqa: PLC0415 - the helper only

    text = template_text(data)
    try:
        if timeout is None:
            out = pilotrender.render(text, values)
        else:
            out = pilotrender.render(text, values, timeout=timeout)
    except pilotrender.RenderError as exc:
        raise UserDataError(f"the user data template does not render: {exc}") from None
    return fit(out.encode("utf-8"))


def check(data: bytes, path: str, values: dict[str, object]) -> None:
    """Refuse a template that cannot render, before anything is recorded: rendered as at
    launch (same child, same limits) with the values known when the job is handed over.
    The message names annex_user_data_file."""
    try:
        render(data, values)
    except UserDataError as exc:
        raise UserDataError(f"annex_user_data_file {path or '(none)'}: {exc}") from None
