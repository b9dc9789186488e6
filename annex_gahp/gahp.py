"""Transport-free GAHP dispatcher: built-ins, request ids, S/E/F, the result queue.

A `Dispatcher` holds the command table and is shared by every connection; each connection
gets its own `Session` (its own result queue and async flag, as upstream's GAHP servers have
one per client). Transports feed a session lines and write what it returns.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from annex_gahp import __version__
from annex_gahp.errors import AnnexError
from annex_gahp.protocol import (
    ProtocolError,
    decode_line,
    escape_arg,
    format_kv,
    join_args,
    parse_kv,
    split_args,
)

log = logging.getLogger(__name__)

# Release date in the banner: upstream's format is "<Mon> <day> <year>".
RELEASE_DATE = "Nov 24 2026"
GAHP_NAME = "htcondor-annex-gahp"

BUILTINS = ("ASYNC_MODE_OFF", "ASYNC_MODE_ON", "COMMANDS", "QUIT", "RESULTS", "VERSION")

# Request ids: what upstream's gridmanager sends (integers) and a little more, bounded so a
# result line stays readable in the log.
_REQID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")
REQID_MAX = 64
# Results nobody collects must not pile up without bound; beyond this a command gets F.
MAX_PENDING = 1000
INTERNAL = "INTERNAL"


@dataclass(frozen=True)
class Caller:
    """Who is asking. Set by the transport from the OS (SO_PEERCRED or our own uid), never from
    anything the client sends."""

    uid: int
    user: str
    is_admin: bool


Handler = Callable[[Caller, dict[str, str]], dict[str, str]]


def banner(version: str = __version__) -> str:
    return f"$GahpVersion: {version} {RELEASE_DATE} {GAHP_NAME} $"


def _check_reqid(reqid: str) -> bool:
    return 0 < len(reqid) <= REQID_MAX and set(reqid) <= _REQID_CHARS


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Dispatcher:
    """The command table; handlers run inline, on the transport's thread for the connection."""

    def __init__(
        self,
        commands: Mapping[str, Handler],
        *,
        version: str = __version__,
        max_pending: int = MAX_PENDING,
    ) -> None:
        table: dict[str, Handler] = {}
        for name, handler in commands.items():
            key = name.upper()
            if not key or not all(c.isalnum() or c == "_" for c in key) or not key.isascii():
                raise ValueError(f"bad command name {name!r}: use letters, digits and '_'")
            if key in BUILTINS or key in table:
                raise ValueError(f"command {key} defined twice or shadows a built-in")
            if not callable(handler):
                raise TypeError(f"handler for {key} is not callable")
            table[key] = handler
        self.commands: dict[str, Handler] = table
        self.version = version
        self.max_pending = max_pending

    @property
    def banner(self) -> str:
        return banner(self.version)

    def command_names(self) -> list[str]:
        return sorted((*BUILTINS, *self.commands))

    def session(self, caller: Caller) -> Session:
        return Session(self, caller)

    def run(self, command: str, caller: Caller, args: dict[str, str]) -> list[str]:
        """Run one handler; return its result arguments after the request id (`0 k=v...` or
        `1 CODE message`). Never raises: a handler's bug must not take the helper down."""
        handler = self.commands[command]
        try:
            result = handler(caller, dict(args))
            if not isinstance(result, Mapping):
                raise TypeError(f"handler returned {type(result).__name__}, not a dict")
            out = ["0", *format_kv(result)]
            # Fail here, as this request's error, rather than later while writing the reply.
            join_args(out).encode("utf-8")
            return out
        except AnnexError as exc:
            code = getattr(exc, "code", None) or "ERROR"
            log.info("%s for uid %d (%s): %s %s", command, caller.uid, caller.user, code, exc)
            # A message that cannot be UTF-8 (a lone surrogate from a decoded file name, say)
            # must not break the reply: show such characters as escapes instead.
            message = (str(exc) or code).encode("utf-8", "backslashreplace").decode("utf-8")
            return ["1", str(code), message]
        except Exception as exc:
            # Full traceback to the log; the client gets something short with no internals.
            log.exception("%s for uid %d (%s) failed", command, caller.uid, caller.user)
            return ["1", INTERNAL, f"internal error ({type(exc).__name__}); see ANNEX_GAHP_LOG"]


class Session:
    """One client's view: its result queue, pending request ids and async-mode flag.

    `handle_line` is the whole interface for transports: feed one request line (bytes or str,
    terminator optional), write the returned lines in order. A command runs before its `S` is
    returned, so in async mode its `R` goes out with that `S`.
    """

    def __init__(self, dispatcher: Dispatcher, caller: Caller) -> None:
        self.dispatcher = dispatcher
        self.caller = caller
        self._lock = threading.Lock()
        self._results: list[tuple[str, str]] = []  # (request id, result line), queue order
        self._pending: set[str] = set()  # accepted, result not yet handed out by RESULTS
        self._async = False
        self._signalled = False  # an R was sent since the last RESULTS
        self.closed = False

    @property
    def banner(self) -> str:
        return self.dispatcher.banner

    @property
    def pending(self) -> int:
        """Requests accepted whose results RESULTS has not handed out yet."""
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        """Stop: later requests are refused."""
        with self._lock:
            self.closed = True

    def handle_line(self, line: bytes | str) -> list[str]:
        """One request line -> the lines to write back (escaped, without terminators)."""
        if self.closed:
            return [_error("E", "session is closed")]
        try:
            raw = bytes(line) if isinstance(line, (bytes, bytearray)) else _encode(line)
            args = split_args(decode_line(raw))
        except ProtocolError as exc:
            return [_error("E", str(exc))]
        if not args:
            return [_error("E", "empty request")]
        command = args[0].upper()
        rest = args[1:]
        if command in BUILTINS:
            if rest:
                return [_error("E", f"{command} takes no arguments")]
            return self._builtin(command)
        if command not in self.dispatcher.commands:
            return [_error("E", f"unknown command {args[0]!r}; COMMANDS lists them")]
        return self._command(command, rest)

    def _builtin(self, command: str) -> list[str]:
        if command == "COMMANDS":
            return [join_args(["S", *self.dispatcher.command_names()])]
        if command == "VERSION":
            # Not escaped as one argument: the banner's fields are separate words by spec.
            return ["S " + self.dispatcher.banner]
        if command == "QUIT":
            self.close()
            return ["S"]
        if command == "ASYNC_MODE_ON":
            with self._lock:
                # Only results queued from now on are signalled (as the spec allows); the
                # client is told to issue RESULTS right after this.
                self._async = True
                self._signalled = False
            return ["S"]
        if command == "ASYNC_MODE_OFF":
            with self._lock:
                self._async = False
            return ["S"]
        # RESULTS: hand out everything queued, in queue order, and re-arm the R.
        with self._lock:
            results, self._results = self._results, []
            for reqid, _ in results:
                self._pending.discard(reqid)
            self._signalled = False
        return [f"S {len(results)}", *(line for _, line in results)]

    def _command(self, command: str, rest: list[str]) -> list[str]:
        if not rest:
            return [_error("E", f"{command} needs a request id")]
        reqid = rest[0]
        if not _check_reqid(reqid):
            return [_error("E", f"bad request id {reqid!r}")]
        try:
            kv = parse_kv(rest[1:])
        except ProtocolError as exc:
            return [_error("E", f"{command}: {exc}")]
        with self._lock:
            if reqid in self._pending:
                return [_error("E", f"request id {reqid} is already pending")]
            if len(self._pending) >= self.dispatcher.max_pending:
                return [_error("F", "too many pending requests; collect them with RESULTS")]
            self._pending.add(reqid)
        log.debug(
            "%s %s from uid %d (%s) keys=%s",
            command,
            reqid,
            self.caller.uid,
            self.caller.user,
            sorted(kv),
        )
        signal = self._complete(reqid, self.dispatcher.run(command, self.caller, kv))
        return ["S", "R"] if signal else ["S"]

    def _complete(self, reqid: str, result: list[str]) -> bool:
        """Queue a result; return whether an R must be sent now."""
        line = join_args([reqid, *result])
        with self._lock:
            if self.closed:
                return False
            self._results.append((reqid, line))
            if self._async and not self._signalled:
                self._signalled = True
                return True
            return False


def _encode(line: str) -> bytes:
    # Through bytes so str and bytes input meet the same terminator and length rules.
    try:
        return line.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("line is not valid Unicode text") from None


def _error(kind: str, message: str) -> str:
    """An `E`/`F` return line. Upstream clients look at the first character only; the message
    is for people and our own client."""
    return f"{kind} {escape_arg(_short(message))}"
