"""Just enough of HTCondor's `Attr = value` ad text for the job router hooks. Stdlib only.

The job router hands its hooks ads in the "old ClassAd" text form that `sPrintAd` writes: one
`Name = expression` per line, names case-insensitive, no comments (docs/router.md has what was
seen on HTCondor 23.9). We never evaluate expressions: we read a few literal values (strings,
integers) and pass the rest through as text.

Strings the router gives are in the old ClassAd text form (checked on 23.9): only `\\"` is an
escape, every other backslash stands for itself; `unquote()` reads that. What the hooks print
comes from the helper as it wrote it (compat.quote, the bindings' quoting): no hook quotes.
"""

from __future__ import annotations

import sys

from annex_gahp import client, names

# A job ad is ~5-10 KB; the router's own copies stay well below this. Anything larger is not
# a job ad we were given by the router, and we refuse it before sending anything anywhere.
MAX_AD_BYTES = 512 * 1024
MAX_LINES = 4000
MAX_LINE_CHARS = 64 * 1024

# No `re`: every millisecond of import counts for the translate hook (docs/router.md).
_ALPHA = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_DIGITS = frozenset("0123456789")
_NAME_START = _ALPHA | {"_"}
_NAME_CHARS = _NAME_START | _DIGITS


def is_name(text: str) -> bool:
    """A ClassAd attribute name as our hooks accept it: [A-Za-z_][A-Za-z0-9_]*."""
    return bool(text) and text[0] in _NAME_START and set(text) <= _NAME_CHARS


def is_annex_name(text: str) -> bool:
    """names.NAME_PATTERN, ^[A-Za-z][A-Za-z0-9-]{0,62}$, without the re module."""
    return (
        0 < len(text) <= names.NAME_MAX
        and text[0] in _ALPHA
        and set(text) <= _ALPHA | _DIGITS | {"-"}
    )


def _is_int(text: str) -> bool:
    body = text[1:] if text[:1] in ("+", "-") else text
    return bool(body) and set(body) <= _DIGITS


# The separator the router puts between two ads (route ad / job ad, source / routed).
SEPARATOR = "------"


class AdError(ValueError):
    """The text is not an ad we accept; the message says why, in one line."""


class Ad:
    """Attributes in their original order and spelling, looked up case-insensitively."""

    def __init__(self) -> None:
        self._attrs: dict[str, tuple[str, str]] = {}  # lower name -> (name, expression text)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._attrs

    def __len__(self) -> int:
        return len(self._attrs)

    def items(self) -> list[tuple[str, str]]:
        return list(self._attrs.values())

    def set(self, name: str, expr: str) -> None:
        key = name.lower()
        old = self._attrs.get(key)
        self._attrs[key] = (old[0] if old else name, expr)

    def raw(self, name: str) -> str | None:
        got = self._attrs.get(name.lower())
        return got[1] if got else None

    def string(self, name: str) -> str | None:
        """The value of a string literal attribute; None if absent or not a string literal."""
        expr = self.raw(name)
        if expr is None:
            return None
        try:
            return unquote(expr)
        except AdError:
            return None

    def integer(self, name: str) -> int | None:
        expr = self.raw(name)
        if expr is None or not _is_int(expr):
            return None
        return int(expr)

    def text(self) -> str:
        return "".join(f"{name} = {expr}\n" for name, expr in self._attrs.values())


def parse(text: str, *, what: str = "ad") -> Ad:
    """Parse `Name = expression` lines; blank lines are skipped. Raises AdError."""
    if len(text) > MAX_AD_BYTES:
        raise AdError(f"{what} is {len(text)} bytes, more than the {MAX_AD_BYTES} accepted")
    if "\0" in text:
        raise AdError(f"{what} contains a NUL byte")
    lines = text.split("\n")
    if len(lines) > MAX_LINES:
        raise AdError(f"{what} has {len(lines)} lines, more than the {MAX_LINES} accepted")
    ad = Ad()
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        if len(line) > MAX_LINE_CHARS:
            raise AdError(f"{what} line {number} is longer than {MAX_LINE_CHARS} characters")
        name, eq, expr = line.partition("=")
        name, expr = name.strip(), expr.strip()
        if not eq or not expr or not is_name(name):
            raise AdError(f"{what} line {number} is not 'Name = value': {_short(line)!r}")
        if name.lower() in ad:
            raise AdError(f"{what} line {number} repeats attribute {name}")
        ad.set(name, expr)
    return ad


def split_ads(text: str) -> list[str]:
    """Split hook input at the router's `------` separator lines."""
    parts: list[list[str]] = [[]]
    for line in text.split("\n"):
        if line.rstrip("\r") == SEPARATOR:
            parts.append([])
        else:
            parts[-1].append(line)
    return ["\n".join(part) for part in parts]


def unquote(expr: str) -> str:
    """A string literal's value, in the old ClassAd text form the router reads and writes.

    HTCondor 23.9 (checked, docs/router.md): `\\"` is a quote and every other backslash is
    itself, so `"a\\b"` is the four characters a, backslash, backslash, b. A backslash right
    before the closing quote is a backslash. Raises AdError if `expr` is not one string literal.
    """
    if len(expr) < 2 or expr[0] != '"' or expr[-1] != '"':
        raise AdError(f"not a string literal: {_short(expr)!r}")
    body = expr[1:-1]
    out: list[str] = []
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c == "\\" and i + 1 < n and body[i + 1] == '"':
            out.append('"')
            i += 2
            continue
        if c == '"':
            raise AdError(f"unescaped quote inside a string: {_short(expr)!r}")
        out.append(c)
        i += 1
    return "".join(out)


def check_update(name: object, expr: object) -> tuple[str, str]:
    """Validate one attribute update from the helper before it is printed to the router."""
    if not isinstance(name, str) or not is_name(name) or len(name) > 100:
        raise AdError(f"helper sent a bad attribute name {_short(str(name))!r}")
    if not isinstance(expr, str) or not expr.strip():
        raise AdError(f"helper sent an empty or non-text value for {name}")
    if "\n" in expr or "\r" in expr or "\0" in expr or len(expr) > MAX_LINE_CHARS:
        raise AdError(f"helper sent a value for {name} that does not fit on one line")
    return name, expr.strip()


def format_updates(updates: dict[str, str]) -> str:
    return "".join(f"{name} = {expr}\n" for name, expr in updates.items())


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_stdin(limit: int = MAX_AD_BYTES) -> str:
    """All of stdin as text, refusing more than `limit` bytes (read at most limit + 1)."""
    data = sys.stdin.buffer.read(limit + 1)
    if len(data) > limit:
        raise AdError(f"input is larger than the {limit} bytes accepted")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AdError(f"input is not UTF-8 (byte {exc.start})") from None


# -- what the hooks share --------------------------------------------------------------------

# What the helper is sent: the job's identity, placement, state and every Annex* attribute,
# not the whole ad (a 1000-job cluster means 1000 requests; ~1 KB each instead of ~10 KB).
HELPER_ATTRS = frozenset(
    name.lower()
    for name in (
        "ClusterId", "ProcId", "Owner", "User", "AcctGroup", "AcctGroupUser", "NTDomain",
        "GlobalJobId", "QDate", "JobStatus", "EnteredCurrentStatus", "JobUniverse",
        "Requirements", "JobMachineAttrs", "RequestCpus", "RequestMemory", "RequestDisk",
        "RequestGPUs", "RoutedFromJobId", "RoutedToJobId", "RouteName", "RoutedBy",
        "HoldReason", "HoldReasonCode", "ExitCode", "ExitBySignal", "CompletionDate",
        "RemoteWallClockTime", "NumJobStarts", "LastRemoteHost", "RemoteHost",
        names.JOB_TARGET, names.SOCKET_ATTR,
    )
)  # fmt: skip
# Attributes the helper may never change through a hook: identity and HTCondor's own state.
PROTECTED = frozenset(
    name.lower()
    for name in (
        "ClusterId", "ProcId", "Owner", "User", "GlobalJobId", "QDate", "JobStatus",
        "JobUniverse", "MyType", "TargetType", "Managed", "ManagedManager", "RoutedBy",
        "RoutedFromJobId", "RoutedToJobId", "Cmd", "Iwd",
    )
)  # fmt: skip
HOOK_TIMEOUT = 20.0
# Our route's name (JOB_ROUTER_ROUTE_NAMES in 30-annex-router.conf). JOB_ROUTER_HOOK_KEYWORD is
# global: jobs of every other route run our hooks too, and must pass through untouched.
ROUTE_NAME = "Annex"


def route_name(route_ad: str) -> str | None:
    """`Name` from the route ad line the router gives the translate hook,
    `[ Name = "Annex"; TargetUniverse = 5 ]`; None if there is none."""
    text = route_ad.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    for part in text[1:-1].split(";"):
        key, eq, value = part.partition("=")
        if eq and key.strip().lower() == "name":
            try:
                return unquote(value.strip())
            except AdError:
                return None
    return None


def other_route(ad: Ad) -> bool:
    """True for a routed job of some other route (its RouteName is set and is not ours)."""
    name = ad.string("RouteName")
    return name is not None and name.lower() != ROUTE_NAME.lower()


def helper_text(ad: Ad) -> str:
    """The part of `ad` the helper gets, as `Name = value` lines."""
    return "".join(
        f"{name} = {expr}\n"
        for name, expr in ad.items()
        if name.lower() in HELPER_ATTRS or name.lower().startswith("annex")
    )


def job_id(ad: Ad) -> str:
    cluster, proc = ad.integer("ClusterId"), ad.integer("ProcId")
    if cluster is None or proc is None or cluster < 0 or proc < 0:
        raise AdError("job ad has no integer ClusterId and ProcId")
    return f"{cluster}.{proc}"


def check_job(ad: Ad, what: str = "job ad") -> str:
    """Refuse an ad that is not a job of ours; return its TargetAnnexName."""
    job_id(ad)
    owner = ad.string("Owner")
    if not owner:
        raise AdError(f"{what} has no Owner string")
    target = ad.string(names.JOB_TARGET)
    if target is None:
        raise AdError(f"{what} has no {names.JOB_TARGET} string: not an annex job")
    if not is_annex_name(target):
        raise AdError(
            f"{names.JOB_TARGET} {_short(target)!r} is not a valid annex name "
            "(a letter, then letters, digits or '-', at most 63)"
        )
    return target


def ask(command: str, ad: Ad, timeout: float = HOOK_TIMEOUT, **extra: str) -> dict[str, str]:
    """Send `command ad=<helper_text(ad)> [extra...]` to the helper. Raises
    client.ClientError."""
    path = client.socket_path(ad.string(names.SOCKET_ATTR))
    return client.call(command, timeout=timeout, path=path, ad=helper_text(ad), **extra)


def user_data_args(ad: Ad) -> dict[str, str]:
    """Provision mode: the user data file, read here, as the job's owner (the hook runs as
    the owner), for the helper: `user_data=` (base64), or `user_data_error=` (one line) when
    it cannot be used, so the helper can hold the job with that reason. Pool mode: nothing."""
    mode = ad.string(names.JOB_ATTRS["mode"])
    if mode is None or mode.strip().lower() != "provision":
        return {}
    from annex_gahp import pilotdata  # noqa: PLC0415 - provision-mode jobs only

    path = ad.string(names.JOB_ATTRS["user_data_file"])
    if not path:
        return {}  # the helper refuses the request with the submit side's message
    try:
        return {"user_data": pilotdata.encode(pilotdata.read_file(path))}
    except pilotdata.UserDataError as exc:
        return {"user_data_error": str(exc)}


def updates_from(result: dict[str, str]) -> dict[str, str]:
    """The helper's answer, `Name = value` lines in `ad=`, checked: each line one attribute
    the hooks may set (never identity or HTCondor's own state), each value one line."""
    updates = parse(result.get("ad", ""), what="helper's answer")
    out: dict[str, str] = {}
    for key, value in updates.items():
        name, expr = check_update(key, value)
        if name.lower() in PROTECTED:
            raise AdError(f"helper tried to set {name}, which hooks never change")
        out[name] = expr
    return out


def fail(prog: str, message: object) -> int:
    """One line on stderr (the router copies it into JobRouterLog); exit status 1."""
    text = " ".join(str(message).split())
    sys.stderr.write(f"{prog}: {_short(text, 400)}\n")
    sys.stderr.flush()
    return 1


def print_updates(prog: str, command: str, ad: Ad, on_failure: str) -> int:
    """Ask the helper for attribute updates and print them. A failure is reported on stderr
    but exits 0: for update/finalize a non-zero exit stalls or strands the job (docs/router.md),
    and the helper learns the job's state from the schedd anyway."""
    try:
        updates = updates_from(ask(command, ad))
    except (client.ClientError, AdError) as exc:
        fail(prog, f"{on_failure}: {exc}")
        return 0
    sys.stdout.write(format_updates(updates))
    sys.stdout.flush()
    return 0
