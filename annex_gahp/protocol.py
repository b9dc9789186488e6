"""GAHP line codec: framing, argument escaping, `key=value` arguments, limits.

Stdlib only and cheap to import (no dataclasses, no logging): `client.py`, and through it the
job router hooks, import this module and must start fast.

The rules (docs/protocol.md has the full text):
- A line ends at a line feed that is not escaped; a carriage return right before it is dropped,
  so `\\r\\n` and `\\n` both end a line.
- Arguments are separated by single spaces; `a  b` has an empty argument in the middle.
- A backslash escapes exactly one of: space, backslash, carriage return, line feed. This is the
  set upstream's `escapeGahpString` produces, so lines written by HTCondor's gridmanager decode
  the same here. Anything else after a backslash is a bad escape, reported as such, because a
  client that sends one almost certainly meant something we would otherwise silently misread.
- A line is UTF-8 and at most MAX_LINE_BYTES long, not counting its terminator.
"""

from __future__ import annotations

# Annotations only: importing collections.abc loads `collections`, a measurable part of the
# hooks' start-up (docs/benchmarks.md, benchmark 1).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

# Job ads are ~10 KB; 1 MiB leaves room for the largest sane request while bounding what one
# connection can make the helper buffer. Upstream's gridmanager reads lines into 500 KB.
MAX_LINE_BYTES = 1024 * 1024
# Replies may carry JSON for many annexes; clients accept more than the helper does.
MAX_REPLY_BYTES = 16 * 1024 * 1024

_ESCAPABLE = frozenset(" \\\r\n")
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


class ProtocolError(ValueError):
    """A line or argument that does not follow the protocol; the message says what is wrong."""


class LineTooLong(ProtocolError):
    """A line exceeded the limit. The stream cannot be resynchronised, so callers close it.

    `lines` holds the complete lines that came before it in the same data, so they can still
    be answered.
    """

    def __init__(self, message: str, lines: list[bytes] | None = None) -> None:
        super().__init__(message)
        self.lines: list[bytes] = lines or []


def _escaped_at(data: bytes | bytearray | str, index: int, start: int = 0) -> bool:
    """Whether the character at `index` is escaped: an odd run of backslashes right before it.

    A run of backslashes pairs up left to right, so only the run's parity matters.
    """
    backslash = "\\" if isinstance(data, str) else 0x5C
    run = 0
    i = index - 1
    while i >= start and data[i] == backslash:
        run += 1
        i -= 1
    return run % 2 == 1


class LineSplitter:
    """Incremental framer: feed bytes as they arrive, get back complete lines.

    Escape-aware, because an escaped line feed is part of an argument (a job ad's text has
    many). Lines are returned without their terminator but otherwise raw (still escaped, still
    bytes): decoding is `decode_line`'s job so a bad line can be answered and skipped.
    """

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._scan = 0  # where to resume looking for a line feed in _buf

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held so far."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add `data`; return the lines it completed. Raises LineTooLong past the limit."""
        self._buf += data
        lines: list[bytes] = []
        start = 0
        pos = self._scan
        while True:
            nl = self._buf.find(b"\n", pos)
            if nl < 0:
                break
            if _escaped_at(self._buf, nl, start):
                pos = nl + 1
                continue
            line = bytes(self._buf[start:nl])
            if len(line) > self.max_bytes + 1:  # +1: a terminating \r is not content
                raise LineTooLong(_too_long(self.max_bytes), lines)
            lines.append(line)
            start = pos = nl + 1
        del self._buf[:start]
        # Every line feed before the end is now known to be escaped: resume at the end, so a
        # long line arriving in many chunks is scanned once, not once per chunk.
        self._scan = len(self._buf)
        # Checked on the partial line too, so a client cannot make us buffer without bound by
        # never sending a line feed.
        if len(self._buf) > self.max_bytes + 1:
            raise LineTooLong(_too_long(self.max_bytes), lines)
        return lines


def _too_long(max_bytes: int) -> str:
    return f"line too long: the limit is {max_bytes} bytes"


def decode_line(raw: bytes, max_bytes: int = MAX_LINE_BYTES) -> str:
    """Raw line bytes (terminator optional) -> text, still escaped. Checks limit and UTF-8."""
    if raw.endswith(b"\n") and not _escaped_at(raw, len(raw) - 1):
        raw = raw[:-1]
    if raw.endswith(b"\r") and not _escaped_at(raw, len(raw) - 1):
        raw = raw[:-1]
    if len(raw) > max_bytes:
        raise LineTooLong(_too_long(max_bytes))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"line is not valid UTF-8 (byte {exc.start})") from None


def split_args(line: str) -> list[str]:
    """Split one line (no terminator; a trailing unescaped CR is tolerated) into arguments.

    An empty line has no arguments. Raises ProtocolError on a bad or dangling escape and on an
    unescaped CR or LF inside the line.
    """
    if line.endswith("\r") and not _escaped_at(line, len(line) - 1):
        line = line[:-1]
    if not line:
        return []
    # Runs between backslashes are split with str methods (in C): a job ad or a JSON result
    # is thousands of characters, too many to look at one by one in Python.
    args: list[str] = []
    current: list[str] = []  # pieces of the argument being built
    pos = 0
    n = len(line)
    while True:
        bs = line.find("\\", pos)
        run = line[pos:] if bs < 0 else line[pos:bs]
        if "\r" in run or "\n" in run:
            at = min(i for i in (run.find("\r"), run.find("\n")) if i >= 0)
            raise ProtocolError(f"unescaped line break at position {pos + at}")
        words = run.split(" ")
        current.append(words[0])
        for word in words[1:]:
            args.append("".join(current))
            current = [word]
        if bs < 0:
            break
        if bs + 1 >= n:
            raise ProtocolError("line ends with a lone backslash (escape it as '\\\\')")
        nxt = line[bs + 1]
        if nxt not in _ESCAPABLE:
            raise ProtocolError(
                f"bad escape: backslash before {nxt!r} at position {bs}; a backslash may"
                " only precede a space, a backslash or a line break"
            )
        current.append(nxt)
        pos = bs + 2
    args.append("".join(current))
    return args


def escape_arg(arg: str) -> str:
    """Escape one argument so that `split_args` gives it back unchanged."""
    if not isinstance(arg, str):
        raise TypeError(f"GAHP arguments are strings, not {type(arg).__name__}")
    # str.replace runs in C; a per-character generator cost the helper a third of its time
    # per request on a JSON result. The backslash goes first so added ones are not doubled.
    if "\\" in arg:
        arg = arg.replace("\\", "\\\\")
    if " " in arg:
        arg = arg.replace(" ", "\\ ")
    if "\r" in arg:
        arg = arg.replace("\r", "\\\r")
    if "\n" in arg:
        arg = arg.replace("\n", "\\\n")
    return arg


def join_args(args: Iterable[str]) -> str:
    """Arguments -> one escaped line without terminator. Inverse of `split_args`.

    A single empty argument is refused: its line would be the empty line, which means none.
    """
    items = list(args)
    if items == [""]:
        raise ProtocolError("a line cannot consist of one empty argument")
    return " ".join(escape_arg(a) for a in items)


def encode_line(args: Iterable[str]) -> bytes:
    """Arguments -> the bytes to write, with the line feed."""
    try:
        return (join_args(args) + "\n").encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"argument is not encodable as UTF-8: {exc.reason}") from None


def check_key(key: str) -> str:
    """A key is letters, digits, `_`, `.` and `-`: keeps `key=value` unambiguous and greppable."""
    if not isinstance(key, str) or not key or not set(key) <= _KEY_CHARS:
        raise ProtocolError(f"bad key {key!r}: use letters, digits, '_', '.' and '-'")
    return key


def parse_kv(args: Sequence[str]) -> dict[str, str]:
    """`["a=1", "b=x=y"]` -> `{"a": "1", "b": "x=y"}`. Split at the first `=`.

    Raises ProtocolError on an argument without `=`, a bad key or a key given twice (a second
    value silently winning would let one spelling override another unnoticed).
    """
    result: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ProtocolError(f"argument {arg!r} is not key=value")
        check_key(key)
        if key in result:
            raise ProtocolError(f"key {key!r} given twice")
        result[key] = value
    return result


def format_kv(values: Mapping[str, str]) -> list[str]:
    """`{"a": "1"}` -> `["a=1"]`, in the mapping's order. Values must be strings."""
    out: list[str] = []
    for key, value in values.items():
        check_key(key)
        if not isinstance(value, str):
            raise TypeError(f"value of {key!r} is {type(value).__name__}, not str")
        out.append(f"{key}={value}")
    return out
