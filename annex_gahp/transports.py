"""Where GAHP lines come from: stdin/stdout, or a Unix socket with the peer's uid from the kernel.

Identity is SO_PEERCRED's uid and nothing else: no argument a client sends can change who it
is. The socket is world-connectable (0666) on purpose; authorisation happens per request in the
handlers, by `Caller`.
"""

from __future__ import annotations

import logging
import os
import pwd
import queue
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Collection
from typing import BinaryIO

from annex_gahp.gahp import Caller, Dispatcher, Session
from annex_gahp.protocol import MAX_LINE_BYTES, LineSplitter, LineTooLong, escape_arg

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_RECV_BYTES = 65536

MAX_CONNECTIONS = 64
# One local user's connections: well below MAX_CONNECTIONS, so that however many connections
# one user opens (and leaves idle), other users' hooks and commands still get in.
MAX_CONNECTIONS_PER_UID = 8
# Slots only root and the admin uids (condor) may take: the helper's own tools and the
# daemons' calls get in even when every user is at their cap.
RESERVED_CONNECTIONS = 8
# Our clients (hooks, the CLI) send their requests at once and then only wait for results;
# a connection with no request outstanding and nothing sent for this long is idle: closed.
IDLE_TIMEOUT = 5.0
# ... and one waiting for results it asked for gets this long between reads (our slowest
# request takes seconds; the clients give up after DEFAULT_TIMEOUT anyway).
PENDING_TIMEOUT = 120.0
# Once a line has started it must finish: a client trickling bytes (one a second, say) must
# not hold a slot. A whole line crosses a Unix socket in microseconds.
LINE_TIMEOUT = 5.0
# A client that stops reading must not hold a thread forever.
WRITE_TIMEOUT = 30.0
# How often blocked reads/accepts wake to check deadlines and shutdown.
POLL_INTERVAL = 1.0
# A connection thread with nothing to serve for this long ends; under load they are reused.
WORKER_IDLE = 60.0
# How long a uid's account name is reused. The uid is read from SO_PEERCRED on every
# connection; only the passwd lookup (NSS: files opened and read) is saved, and an account
# renamed meanwhile is seen by its new name after at most this long.
USER_NAME_TTL = 5.0


class ServerError(RuntimeError):
    """The socket cannot be set up; the message says what to fix."""


def user_name(uid: int) -> str:
    """The account name for `uid`, or the number itself for a uid without a passwd entry."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def caller_for_uid(uid: int, admin_uids: Collection[int] = ()) -> Caller:
    return Caller(uid=uid, user=user_name(uid), is_admin=uid == 0 or uid in admin_uids)


class _UserNames:
    """`user_name`, remembered for `ttl` seconds per uid (see USER_NAME_TTL)."""

    MAX_ENTRIES = 4096  # local uids only, but bounded all the same

    def __init__(self, ttl: float = USER_NAME_TTL) -> None:
        self.ttl = ttl
        self._names: dict[int, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def __call__(self, uid: int) -> str:
        now = time.monotonic()
        with self._lock:
            known = self._names.get(uid)
        if known is not None and known[1] > now:
            return known[0]
        name = user_name(uid)
        with self._lock:
            if len(self._names) >= self.MAX_ENTRIES:
                self._names.clear()
            self._names[uid] = (name, now + self.ttl)
        return name


def process_caller(admin_uids: Collection[int] = ()) -> Caller:
    """The caller on stdio: whoever runs this process (it could do anything we do anyway)."""
    return caller_for_uid(os.getuid(), admin_uids)


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket."""
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(data)
    return pid, uid, gid


def _encode_lines(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


def _error_line(message: str) -> str:
    return "E " + escape_arg(message)


# -- stdin/stdout ----------------------------------------------------------------------------


def serve_stdio(
    dispatcher: Dispatcher,
    caller: Caller | None = None,
    *,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
) -> None:
    """The plain GAHP: banner, then request lines until QUIT or end of input.

    As the spec asks, a closed stdin means shut down. A line over the limit is answered with
    `E` and ends the conversation: the stream cannot be resynchronised after it.
    """
    caller = caller or process_caller()
    src = stdin if stdin is not None else sys.stdin.buffer
    dst = stdout if stdout is not None else sys.stdout.buffer
    write_lock = threading.Lock()
    broken = threading.Event()

    def write(lines: list[str]) -> None:
        with write_lock:
            if broken.is_set():
                return
            try:
                dst.write(_encode_lines(lines))
                dst.flush()
            except (BrokenPipeError, ValueError, OSError):
                broken.set()

    session = dispatcher.session(caller)
    write([session.banner])
    splitter = LineSplitter()
    read = getattr(src, "read1", None) or src.read
    try:
        while not session.closed and not broken.is_set():
            data = read(_RECV_BYTES)
            if not data:
                break
            too_long: LineTooLong | None = None
            try:
                lines = splitter.feed(data)
            except LineTooLong as exc:
                lines, too_long = exc.lines, exc
            for line in lines:
                write(session.handle_line(line))
                if session.closed:
                    break
            if too_long is not None and not session.closed:
                write([_error_line(str(too_long))])
                break
    finally:
        session.close()


# -- Unix socket -----------------------------------------------------------------------------


class _Connection:
    """One accepted client: its socket, a write lock shared by replies and the async R."""

    def __init__(self, conn: socket.socket, write_timeout: float, uid: int = -1, pid: int = 0):
        self.sock = conn
        self.uid = uid
        self.pid = pid
        self.write_timeout = write_timeout
        self._lock = threading.Lock()
        self.dead = False

    def write(self, lines: list[str]) -> None:
        data = memoryview(_encode_lines(lines))
        with self._lock:
            if self.dead:
                raise ConnectionError("connection closed")
            deadline = time.monotonic() + self.write_timeout
            try:
                while data:
                    try:
                        sent = self.sock.send(data)
                    except socket.timeout:  # (TimeoutError from 3.10 on; 3.9: OSError)
                        if time.monotonic() >= deadline:
                            raise
                        continue
                    data = data[sent:]
            except OSError:
                self.dead = True
                raise

    def kill(self) -> None:
        """Wake the reader (recv returns b"") so the connection ends promptly."""
        self.dead = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class SocketServer:
    """GAHP over a Unix stream socket, one thread per connection, at most `max_connections`.

    Connection threads are reused: starting a thread per connection (and waiting in the accept
    loop until it runs) was a fifth of the helper's time for a one-request connection. A
    thread that finishes a connection waits `worker_idle` seconds for the next, then ends.

    The socket is created (and listening) when the object is built, so errors show at once and
    the daemon may drop privileges afterwards. `serve_forever()` blocks; `start()` runs it in a
    thread; `shutdown()` stops accepting, ends every connection and removes the socket.
    """

    def __init__(
        self,
        path: str,
        dispatcher: Dispatcher,
        admin_uids: Collection[int] = (),
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_per_uid: int = MAX_CONNECTIONS_PER_UID,
        reserved: int = RESERVED_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
        line_timeout: float = LINE_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        poll_interval: float = POLL_INTERVAL,
        max_line_bytes: int = MAX_LINE_BYTES,
        worker_idle: float = WORKER_IDLE,
        user_name_ttl: float = USER_NAME_TTL,
    ) -> None:
        self.path = os.path.abspath(path)
        self.dispatcher = dispatcher
        self.admin_uids = frozenset(admin_uids)
        self.max_connections = max_connections
        self.max_per_uid = max_per_uid
        # What the unprivileged may fill; never nothing, even with a tiny max_connections.
        self.unprivileged_max = max(1, max_connections - reserved)
        self.idle_timeout = idle_timeout
        self.line_timeout = line_timeout
        self.write_timeout = write_timeout
        self.poll_interval = poll_interval
        self.max_line_bytes = max_line_bytes
        self.worker_idle = worker_idle
        self._user_names = _UserNames(user_name_ttl)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()  # not serving yet
        self._lock = threading.Lock()
        self._active: set[_Connection] = set()
        self._per_uid: dict[int, int] = {}  # open connections by peer uid
        self._cap_logged: dict[int, float] = {}  # uid -> when its hitting the cap was logged
        # Admitted connections for the waiting threads; None tells a thread to end.
        self._queue: queue.SimpleQueue[_Connection | None] = queue.SimpleQueue()
        self._workers: set[threading.Thread] = set()
        # Threads waiting for a connection, less the connections queued for them. Changed
        # only under _lock, together with the queue, so a queued connection always has a
        # thread that will take it.
        self._idle = 0
        self._serving: threading.Thread | None = None  # the thread inside serve_forever
        self._refused = 0  # connections refused since the last log line about it
        self._refused_logged = -60.0
        self._sock, self._ident = self._bind()

    # -- setup -------------------------------------------------------------------------------

    def _bind(self) -> tuple[socket.socket, tuple[int, int]]:
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise ServerError(f"cannot create {self.path}: directory {parent} does not exist")
        self._check_existing()
        # Bind under a temporary name, set the mode, then rename into place: clients never see
        # a half-made socket, and a stale one is replaced in one step.
        tmp = f"{self.path}.{os.getpid()}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            sock.bind(tmp)
            # Everyone may connect: who they are comes from SO_PEERCRED, not the file mode.
            os.chmod(tmp, 0o666)  # noqa: S103
            os.rename(tmp, self.path)
            sock.listen(min(self.max_connections, socket.SOMAXCONN))
            sock.settimeout(self.poll_interval)
            st = os.stat(self.path)
        except OSError as exc:
            sock.close()
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise ServerError(f"cannot create socket {self.path}: {exc}") from exc
        log.info("listening on %s", self.path)
        return sock, (st.st_dev, st.st_ino)

    def _check_existing(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ServerError(f"{self.path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(self.path)
        except OSError:
            log.info("replacing stale socket %s", self.path)  # nobody listens: left by a crash
            return
        finally:
            probe.close()
        raise ServerError(f"another process is already serving on {self.path}")

    # -- running -----------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._active)

    def start(self) -> threading.Thread:
        """Run `serve_forever` in a daemon thread; returns it."""
        self._stopped.clear()
        thread = threading.Thread(target=self.serve_forever, name="annex-gahp-accept", daemon=True)
        thread.start()
        return thread

    def serve_forever(self) -> None:
        self._stopped.clear()
        self._serving = threading.current_thread()
        try:
            while not self._stopping.is_set():
                try:
                    conn, _ = self._sock.accept()
                except socket.timeout:  # (TimeoutError from 3.10 on; 3.9: OSError)
                    continue
                except OSError as exc:
                    if self._stopping.is_set():
                        break
                    # EMFILE and friends: keep serving the connections we have.
                    log.warning("accept failed: %s", exc)
                    time.sleep(self.poll_interval)
                    continue
                self._admit(conn)
        finally:
            self._stopped.set()

    def _privileged(self, uid: int) -> bool:
        return uid == 0 or uid in self.admin_uids

    def _admit(self, conn: socket.socket) -> None:
        conn.settimeout(self.poll_interval)
        try:
            # The uid is the kernel's, read on every connection (only its name is cached).
            pid, uid, _gid = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        client = _Connection(conn, self.write_timeout, uid, pid)
        why = ""
        with self._lock:
            mine = self._per_uid.get(uid, 0)
            if len(self._active) >= self.max_connections:
                why = "all"
            elif not self._privileged(uid):
                if mine >= self.max_per_uid:
                    why = "uid"
                elif len(self._active) >= self.unprivileged_max:
                    why = "all"
            if not why:
                self._active.add(client)
                self._per_uid[uid] = mine + 1
                if self._idle > 0:
                    self._idle -= 1
                    self._queue.put(client)
                    return
        if why:
            self._refuse(client, why)
            return
        thread = threading.Thread(
            target=self._work, args=(client,), name="annex-gahp-conn", daemon=True
        )
        with self._lock:
            self._workers.add(thread)
        try:
            thread.start()
        except RuntimeError:  # no more threads in this process: refuse, keep serving the rest
            log.warning("cannot start a thread for a new connection; refusing it")
            with self._lock:
                self._workers.discard(thread)
                self._forget(client)
            conn.close()

    def _forget(self, client: _Connection) -> None:
        """Drop `client` from the counts; call with _lock held."""
        if client in self._active:
            self._active.discard(client)
            left = self._per_uid.get(client.uid, 1) - 1
            if left > 0:
                self._per_uid[client.uid] = left
            else:
                self._per_uid.pop(client.uid, None)

    def _refuse(self, client: _Connection, why: str) -> None:
        now = time.monotonic()
        user = self._user_names(client.uid)
        if why == "uid":
            message = (
                f"too many connections from {user} (uid {client.uid}) to annex_gahp:"
                f" at most {self.max_per_uid} per user; close idle ones and try again"
            )
            # Once a minute per uid at most: a user connecting in a loop must not fill the log.
            if now - self._cap_logged.get(client.uid, -60.0) >= 60.0:
                if len(self._cap_logged) >= _UserNames.MAX_ENTRIES:
                    self._cap_logged.clear()
                self._cap_logged[client.uid] = now
                log.warning(
                    "refused a connection from uid %d (%s, pid %d): it has %d open, the per-user"
                    " limit", client.uid, user, client.pid, self.max_per_uid,
                )
        else:
            message = "too many connections to annex_gahp; try again later"
            self._refused += 1
            if now - self._refused_logged >= 60.0:
                log.warning(
                    "refused %d connection(s) (the last from uid %d, %s): %d already open",
                    self._refused, client.uid, user, self.connections,
                )
                self._refused, self._refused_logged = 0, now
        try:
            client.write([_error_line(message)])
        except OSError:
            pass
        client.sock.close()

    def _work(self, first: _Connection) -> None:
        """A connection thread: serve `first`, then whatever is queued, until idle too long."""
        client: _Connection | None = first
        try:
            while client is not None:
                self._serve_connection(client)
                client = self._next_connection()
        finally:
            with self._lock:
                self._workers.discard(threading.current_thread())

    def _next_connection(self) -> _Connection | None:
        """Wait for a queued connection; None when stopping or idle for `worker_idle`."""
        with self._lock:
            if self._stopping.is_set():
                return None
            self._idle += 1
        try:
            return self._queue.get(timeout=self.worker_idle)
        except queue.Empty:
            pass
        with self._lock:
            # Under the lock, so _admit cannot count on this thread after it has gone.
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                self._idle -= 1
                return None

    def _serve_connection(self, client: _Connection) -> None:
        conn = client.sock
        session: Session | None = None
        try:
            pid, uid = client.pid, client.uid
            caller = Caller(
                uid=uid, user=self._user_names(uid), is_admin=uid == 0 or uid in self.admin_uids
            )
            log.debug("connection from pid %d uid %d (%s)", pid, uid, caller.user)
            session = self.dispatcher.session(caller)
            client.write([session.banner])
            self._read_loop(client, session)
        except OSError as exc:
            # Disconnects, resets, write timeouts: the client's problem, not the server's.
            log.debug("connection ended: %s", exc)
        except Exception:
            log.exception("connection handler failed")
        finally:
            if session is not None:
                session.close()
            client.dead = True
            try:
                conn.close()
            except OSError:
                pass
            with self._lock:
                self._forget(client)

    def _read_loop(self, client: _Connection, session: Session) -> None:
        conn = client.sock
        splitter = LineSplitter(self.max_line_bytes)
        last_data = time.monotonic()
        line_started: float | None = None
        while not self._stopping.is_set() and not session.closed and not client.dead:
            try:
                data = conn.recv(_RECV_BYTES)
            except socket.timeout:  # (TimeoutError from 3.10 on; 3.9: OSError)
                now = time.monotonic()
                if line_started is not None and now - line_started > self.line_timeout:
                    log.info(
                        "closing connection of uid %d: line not finished in time",
                        session.caller.uid,
                    )
                    return
                # Waiting for its own results is not idleness; waiting for nothing is.
                limit = PENDING_TIMEOUT if session.pending else self.idle_timeout
                if line_started is None and now - last_data > max(limit, self.idle_timeout):
                    log.debug("closing idle connection of uid %d", session.caller.uid)
                    return
                continue
            if not data:
                return
            now = last_data = time.monotonic()
            too_long: LineTooLong | None = None
            try:
                lines = splitter.feed(data)
            except LineTooLong as exc:
                # Answer what came before it; after it the stream cannot be trusted.
                lines, too_long = exc.lines, exc
            # The replies to every line of this read go out in one write: a client that
            # pipelines (the hooks send two requests at once) gets them in one wake-up.
            replies: list[str] = []
            for line in lines:
                replies += session.handle_line(line)
                if session.closed:
                    break
            if too_long is not None and not session.closed:
                replies.append(_error_line(str(too_long)))
            if replies:
                client.write(replies)
            if session.closed or too_long is not None:
                return
            if not splitter.pending:
                line_started = None
            elif lines or line_started is None:
                line_started = now

    # -- stopping ----------------------------------------------------------------------------

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting, end all connections, remove the socket. Idempotent."""
        self._stopping.set()
        # From a signal handler in the serving thread itself, waiting would only stall.
        if self._serving is not threading.current_thread():
            self._stopped.wait(timeout)
        with self._lock:
            active = list(self._active)
            workers = list(self._workers)
        for client in active:
            client.kill()
        for _ in workers:
            self._queue.put(None)  # wakes a waiting thread, which then ends
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        # A connection queued behind an end marker was never taken: close it here.
        while True:
            try:
                left = self._queue.get_nowait()
            except queue.Empty:
                break
            if left is not None:
                left.kill()
                left.sock.close()
        self.close()

    def close(self) -> None:
        """Close the listening socket and remove its file if it is still ours."""
        self._stopping.set()
        try:
            self._sock.close()
        except OSError:
            pass
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass

    def __enter__(self) -> SocketServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
