"""Stdlib-only client for the annex_gahp socket, used by the job router hooks and the CLI.

The hooks start once per job event, so this module imports only the standard library and this
package's stdlib-only modules (protocol, names): no dataclasses, no logging, not annex_gahp.gahp.

    from annex_gahp import client
    client.call("ANNEX_STATUS", name="gpu-burst")  # -> {"json": "..."}
"""

from __future__ import annotations

# The low-level module, not `socket`: `socket` imports enum and selectors, which at hook
# start-up cost more than everything else the hook does (docs/benchmarks.md, benchmark 1).
import _socket
import os
import time

from annex_gahp import names
from annex_gahp.protocol import (
    MAX_REPLY_BYTES,
    LineSplitter,
    ProtocolError,
    decode_line,
    encode_line,
    format_kv,
    parse_kv,
    split_args,
)

DEFAULT_TIMEOUT = 30.0


class ClientError(Exception):
    """The helper answered with an error, or could not be asked. `code` is machine-readable
    (an errors.AnnexError code, or one of the client's own below); the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotRunning(ClientError):
    """Nothing listens on the socket."""


# Codes the client itself produces (the helper's own are those of annex_gahp.errors).
NOT_RUNNING = "NOT_RUNNING"
NO_ACCESS = "NO_ACCESS"
TIMEOUT = "TIMEOUT"
PROTOCOL = "PROTOCOL"
BUSY = "BUSY"
REFUSED = "REFUSED"


def socket_path(ad_value: str | None = None) -> str:
    """Where the helper listens: $ANNEX_GAHP_SOCKET, else `ad_value` (a job ad's
    AnnexGahpSocket; ClassAd quotes are tolerated), else names.DEFAULT_SOCKET."""
    env = os.environ.get(names.SOCKET_ENV, "").strip()
    if env:
        return env
    if ad_value:
        value = ad_value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if value:
            return value
    return names.DEFAULT_SOCKET


def _not_running(path: str, why: str) -> NotRunning:
    return NotRunning(
        NOT_RUNNING,
        f"annex_gahp is not running: cannot connect to {path} ({why}); "
        "ask your HTCondor admin to check ANNEXD in DAEMON_LIST",
    )


class _Conversation:
    """One connection: line reading with a single deadline for the whole call."""

    def __init__(self, sock: _socket.socket, path: str, deadline: float, timeout: float) -> None:
        self.sock = sock
        self.path = path
        self.deadline = deadline
        self.timeout = timeout
        self.splitter = LineSplitter(MAX_REPLY_BYTES)
        self.lines: list[bytes] = []
        self.r_seen = False  # an async "R" arrived since we last cleared it

    def send(self, args: list[str]) -> None:
        self.send_all([args])

    def send_all(self, requests: list[list[str]]) -> None:
        self._settimeout()
        self.sock.sendall(b"".join(encode_line(args) for args in requests))

    def _settimeout(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ClientError(TIMEOUT, f"annex_gahp did not answer within {self.timeout:g}s")
        self.sock.settimeout(remaining)

    def read_raw(self) -> str:
        """The next line as text, including a bare `R`."""
        while not self.lines:
            self._settimeout()
            try:
                data = self.sock.recv(65536)
            except _socket.timeout:  # not TimeoutError: on 3.9 it is only an OSError
                raise ClientError(
                    TIMEOUT, f"annex_gahp did not answer within {self.timeout:g}s"
                ) from None
            if not data:
                raise ClientError(PROTOCOL, f"annex_gahp at {self.path} closed the connection")
            self.lines.extend(self.splitter.feed(data))
        return decode_line(self.lines.pop(0), MAX_REPLY_BYTES)

    def read(self) -> str:
        """The next line that is not an async `R` (noted in r_seen)."""
        while True:
            line = self.read_raw()
            if line == "R":
                self.r_seen = True
                continue
            return line

    def command(self, args: list[str]) -> str:
        """Send one request and return its Return Line; E/F become ClientError."""
        self.send(args)
        return self.reply_to(args)

    def reply_to(self, args: list[str]) -> str:
        """Read the Return Line of a request already sent; E/F become ClientError."""
        reply = self.read()
        if reply == "S" or reply.startswith("S "):
            return reply
        parts = split_args(reply)
        detail = " ".join(parts[1:]) or "no reason given"
        if parts and parts[0] == "F":
            raise ClientError(BUSY, f"annex_gahp could not take {args[0]}: {detail}")
        raise ClientError(REFUSED, f"annex_gahp refused {args[0]}: {detail}")


def _connect(path: str, timeout: float) -> _socket.socket:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise _not_running(path, exc.strerror or type(exc).__name__) from None
    except PermissionError:
        sock.close()
        raise ClientError(
            NO_ACCESS,
            f"cannot connect to annex_gahp at {path}: permission denied; "
            "ask your HTCondor admin to check the socket's directory permissions",
        ) from None
    except OSError as exc:
        sock.close()
        raise _not_running(path, str(exc)) from None
    return sock


def _stringify(kwargs: dict[str, object]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise TypeError(f"argument {key!r} must be str or int, not {type(value).__name__}")
        out[key] = str(value)
    return out


class _TurnedAway(ClientError):
    """The helper closed the connection at once with a reason: too many connections."""


# How long a call waits for a connection the helper turned away: each user has a few at most
# (transports.MAX_CONNECTIONS_PER_UID), and the job router may run many of one user's hooks at
# once, each holding one for milliseconds.
TURNED_AWAY_PATIENCE = 3.0


def call(
    command: str,
    timeout: float = DEFAULT_TIMEOUT,
    path: str | None = None,
    **kwargs: str | int,
) -> dict[str, str]:
    """Run one helper command, e.g. `call("ANNEX_DELETE", name="x")`, and return its result
    keys. Raises ClientError (NotRunning when the helper is not there) with the helper's code
    and message on failure, and TypeError for arguments that are not str or int."""
    path = path or socket_path()
    args = format_kv(_stringify(kwargs))
    cmd = command.upper()
    deadline = time.monotonic() + timeout
    give_up = min(deadline, time.monotonic() + TURNED_AWAY_PATIENCE)
    delay = 0.02
    while True:
        try:
            return _call_once(cmd, args, path, deadline, timeout)
        except _TurnedAway:
            if time.monotonic() + delay >= give_up:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _call_once(
    cmd: str, args: list[str], path: str, deadline: float, timeout: float
) -> dict[str, str]:
    # One call per connection, so a fixed id would do; the pid helps reading the helper's log.
    reqid = str(os.getpid())
    sock = _connect(path, timeout)
    try:
        conv = _Conversation(sock, path, deadline, timeout)
        try:
            # Both requests go out before the banner is read: the helper reads them once its
            # banner is written, and a call costs two round trips instead of four.
            requests = [["ASYNC_MODE_ON"], [cmd, reqid, *args]]
            send_error: OSError | None = None
            try:
                conv.send_all(requests)
            except OSError as exc:  # a helper refusing us closes at once: its banner says why
                send_error = exc
            banner = conv.read()
            if not banner.startswith("$GahpVersion"):
                parts = split_args(banner)
                detail = " ".join(parts[1:]) if parts and parts[0] == "E" else banner
                raise _TurnedAway(BUSY, f"annex_gahp at {path} did not accept us: {detail}")
            if send_error is not None:
                raise send_error
            for request in requests:
                conv.reply_to(request)
            return _await_result(conv, reqid)
        except ProtocolError as exc:
            raise ClientError(PROTOCOL, f"unreadable answer from annex_gahp: {exc}") from None
        except OSError as exc:
            raise ClientError(PROTOCOL, f"lost the connection to annex_gahp: {exc}") from None
    finally:
        sock.close()


def _await_result(conv: _Conversation, reqid: str) -> dict[str, str]:
    """Collect results until ours is there, waiting for an `R` between empty rounds."""
    while True:
        conv.r_seen = False
        header = conv.command(["RESULTS"])
        parts = header.split(" ")
        if len(parts) != 2 or not parts[1].isdigit():
            raise ClientError(PROTOCOL, f"bad RESULTS answer {header!r}")
        for _ in range(int(parts[1])):
            result = split_args(conv.read())
            if result and result[0] == reqid:
                return _parse_result(result)
        if not conv.r_seen:
            while conv.read_raw() != "R":
                pass  # nothing else is sent unasked; tolerate it anyway


def _parse_result(result: list[str]) -> dict[str, str]:
    if len(result) >= 2 and result[1] == "0":
        return parse_kv(result[2:])
    if len(result) >= 3 and result[1] == "1":
        code = result[2]
        message = " ".join(result[3:]) or code
        raise ClientError(code, message)
    raise ClientError(PROTOCOL, f"bad result line {result!r}")
