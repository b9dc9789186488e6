"""stdio and Unix socket transports, and the stdlib client, over real sockets and real uids."""

from __future__ import annotations

import io
import json
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from annex_gahp import client, names, transports
from annex_gahp.errors import NotFound
from annex_gahp.gahp import Caller, Dispatcher
from annex_gahp.protocol import LineSplitter, decode_line, encode_line, split_args
from annex_gahp.transports import ServerError, SocketServer, caller_for_uid, serve_stdio

NOBODY = pwd.getpwnam("nobody").pw_uid
REPO = Path(__file__).resolve().parents[2]


def whoami(caller: Caller, args: dict[str, str]) -> dict[str, str]:
    return {
        "uid": str(caller.uid),
        "user": caller.user,
        "is_admin": str(caller.is_admin),
        "json": json.dumps(args, sort_keys=True),
    }


def missing(caller: Caller, args: dict[str, str]) -> dict[str, str]:
    raise NotFound(f"no annex named {args['name']}")


TABLE = {"WHOAMI": whoami, "MISSING": missing}


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short, and traversable by nobody: AF_UNIX paths are limited to 108 bytes and pytest's
    # tmp_path is long and private.
    path = Path(tempfile.mkdtemp(prefix="ag-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_server(sockdir: Path, **kw: object) -> SocketServer:
    dispatcher = kw.pop("dispatcher", None) or Dispatcher(TABLE)
    server = SocketServer(str(sockdir / "annex.sock"), dispatcher, **kw)  # type: ignore[arg-type]
    server.start()
    return server


@pytest.fixture
def server(sockdir: Path) -> Iterator[SocketServer]:
    srv = make_server(sockdir, line_timeout=1.0, poll_interval=0.1)
    yield srv
    srv.shutdown()


class Raw:
    """A hand-driven client: send bytes, read reply lines."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.splitter = LineSplitter(1 << 24)
        self.lines: list[bytes] = []

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def line(self) -> str:
        while not self.lines:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.lines += self.splitter.feed(data)
        return decode_line(self.lines.pop(0))

    def ask(self, data: bytes | str) -> str:
        self.send(data)
        return self.line()

    def closed_by_peer(self) -> bool:
        try:
            while True:
                self.line()
        except EOFError:
            return True
        except (TimeoutError, ConnectionResetError):
            return False

    def close(self) -> None:
        self.sock.close()


def wait_for(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


# -- socket setup ----------------------------------------------------------------------------


def test_socket_is_world_connectable_whatever_the_umask(sockdir: Path) -> None:
    old = os.umask(0o077)
    try:
        with SocketServer(str(sockdir / "s"), Dispatcher(TABLE)) as srv:
            assert (os.stat(srv.path).st_mode & 0o777) == 0o666
    finally:
        os.umask(old)
    assert not (sockdir / "s").exists()  # removed on shutdown


def test_missing_directory_is_a_clear_error(sockdir: Path) -> None:
    with pytest.raises(ServerError, match="does not exist"):
        SocketServer(str(sockdir / "nope" / "s"), Dispatcher(TABLE))


def test_stale_socket_is_replaced_live_one_is_not(sockdir: Path) -> None:
    path = sockdir / "s"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crash leaves
    with SocketServer(str(path), Dispatcher(TABLE), poll_interval=0.1) as srv:
        srv.start()
        with pytest.raises(ServerError, match="already serving"):
            SocketServer(str(path), Dispatcher(TABLE))
        assert client.call("WHOAMI", path=str(path))["uid"] == str(os.getuid())


def test_regular_file_is_not_replaced(sockdir: Path) -> None:
    path = sockdir / "s"
    path.write_text("precious")
    with pytest.raises(ServerError, match="not a socket"):
        SocketServer(str(path), Dispatcher(TABLE))
    assert path.read_text() == "precious"


# -- conversation ----------------------------------------------------------------------------


def test_plain_conversation(server: SocketServer) -> None:
    raw = Raw(server.path)
    assert raw.line().startswith("$GahpVersion: ")
    assert "WHOAMI" in split_args(raw.ask("COMMANDS\r\n"))
    assert raw.ask(encode_line(["WHOAMI", "7", "name=a b"])) == "S"
    assert raw.ask("RESULTS\n") == "S 1"
    result = split_args(raw.line())
    assert result[:2] == ["7", "0"]
    assert json.loads(result[5].removeprefix("json=")) == {"name": "a b"}
    assert raw.ask("MISSING 8 name=x\n") == "S"
    assert raw.ask("RESULTS\n") == "S 1"
    assert split_args(raw.line()) == ["8", "1", "NOT_FOUND", "no annex named x"]
    assert raw.ask("QUIT\n") == "S"
    assert raw.closed_by_peer()


def test_async_r_over_the_socket(sockdir: Path) -> None:
    srv = make_server(sockdir, dispatcher=Dispatcher(TABLE), poll_interval=0.1)
    try:
        raw = Raw(srv.path)
        raw.line()
        assert raw.ask("ASYNC_MODE_ON\n") == "S"
        raw.send("WHOAMI 1\n")
        got = {raw.line(), raw.line()}  # S and R, in either order (the spec allows both)
        assert got == {"S", "R"}
        assert raw.ask("RESULTS\n") == "S 1"
        assert raw.line().startswith("1 0 ")
    finally:
        srv.shutdown()


def test_lines_sent_before_the_banner_are_all_answered(server: SocketServer) -> None:
    # What the hooks' client does: its requests are in the socket before the banner is out,
    # and arrive in one read. Every one gets its reply, in order, after the banner.
    for end in ("\n", "\r\n"):
        raw = Raw(server.path)
        raw.send(end.join(["ASYNC_MODE_ON", "WHOAMI 1 a=b", "RESULTS", "QUIT", ""]))
        assert raw.line().startswith("$GahpVersion: ")
        assert [raw.line() for _ in range(4)] == ["S", "S", "R", "S 1"]
        result = split_args(raw.line())
        assert result[:2] == ["1", "0"]
        assert json.loads(result[5].removeprefix("json=")) == {"a": "b"}
        assert raw.line() == "S"
        assert raw.closed_by_peer()  # QUIT ended it; nothing after it was read


def test_lines_split_across_reads_before_the_banner(server: SocketServer) -> None:
    raw = Raw(server.path)
    raw.send("ASYNC_MODE_ON\nWHO")
    time.sleep(0.05)
    raw.send("AMI 2\nRESULTS\n")
    assert raw.line().startswith("$GahpVersion: ")
    assert [raw.line() for _ in range(4)] == ["S", "S", "R", "S 1"]
    assert raw.line().startswith("2 0 ")


def test_identity_is_root_for_root_and_admin_uids(sockdir: Path) -> None:
    srv = make_server(sockdir, admin_uids={NOBODY}, poll_interval=0.1)
    try:
        got = client.call("WHOAMI", path=srv.path)
        assert got["uid"] == str(os.getuid())
        assert got["user"] == pwd.getpwuid(os.getuid()).pw_name
        if os.getuid() == 0:
            assert got["is_admin"] == "True"
            assert _as_nobody(srv.path)["is_admin"] == "True"  # nobody is in admin_uids here
    finally:
        srv.shutdown()


def _as_nobody(path: str, **kwargs: str) -> dict[str, str]:
    """Fork, become nobody, call WHOAMI; return what the helper saw."""
    rfd, wfd = os.pipe()
    with warnings.catch_warnings():
        # The server's threads make Python warn about fork. The child only runs code already
        # imported (client, socket) and leaves by os._exit, so no lock it might inherit held
        # is ever taken; exec'ing a fresh interpreter instead would need one nobody can run.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(pwd.getpwnam("nobody").pw_gid)
            os.setuid(NOBODY)
            result = client.call("WHOAMI", path=path, timeout=5, **kwargs)
            os.write(wfd, json.dumps(result).encode())
            code = 0
        except BaseException as exc:
            os.write(wfd, json.dumps({"error": repr(exc)}).encode())
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    result = json.loads(data)
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another user")
def test_peercred_identity_of_another_user(server: SocketServer) -> None:
    seen = _as_nobody(server.path)
    assert seen["uid"] == str(NOBODY)
    assert seen["user"] == "nobody"
    assert seen["is_admin"] == "False"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another user")
def test_claiming_another_user_changes_nothing(server: SocketServer) -> None:
    seen = _as_nobody(server.path, user="root", uid="0", owner="root", is_admin="True")
    assert (seen["uid"], seen["user"], seen["is_admin"]) == (str(NOBODY), "nobody", "False")
    # The claims reach the handler only as ordinary arguments.
    assert json.loads(seen["json"]) == {
        "is_admin": "True",
        "owner": "root",
        "uid": "0",
        "user": "root",
    }


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another user")
def test_reused_connection_threads_take_each_identity_afresh(server: SocketServer) -> None:
    # Threads and the uid -> name cache are shared by connections; the uid never is.
    for _ in range(3):
        assert _as_nobody(server.path)["uid"] == str(NOBODY)
        mine = client.call("WHOAMI", path=server.path)
        assert (mine["uid"], mine["is_admin"]) == ("0", "True")


def test_user_names_are_reused_only_briefly(monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[int] = []

    def lookup(uid: int) -> str:
        looked_up.append(uid)
        return f"user{uid}.{len(looked_up)}"

    monkeypatch.setattr(transports, "user_name", lookup)
    names = transports._UserNames(ttl=0.2)
    assert names(1000) == names(1000) == "user1000.1"
    assert names(1001) == "user1001.2"
    time.sleep(0.25)
    assert names(1000) == "user1000.3"  # e.g. a renamed account: seen after the ttl
    assert looked_up == [1000, 1001, 1000]


def test_caller_for_uid() -> None:
    assert caller_for_uid(0) == Caller(0, pwd.getpwuid(0).pw_name, True)
    assert caller_for_uid(NOBODY, {NOBODY}).is_admin
    assert not caller_for_uid(NOBODY).is_admin
    unknown = caller_for_uid(4_000_000_000 % (1 << 31))
    assert unknown.user == str(unknown.uid)


# -- robustness ------------------------------------------------------------------------------


def test_bad_lines_get_e_and_the_connection_goes_on(server: SocketServer) -> None:
    raw = Raw(server.path)
    raw.line()
    for bad in [
        b"NOPE\n",
        b"WHOAMI 1 a=\\x\n",
        b"\xff\xfe\x00junk\n",
        b"\n",
        b"WHOAMI\n",
        b"WHOAMI 1 noeq\n",
        b"COMMANDS x\n",
        b"\x00\x01\x02\x1b[31m\n",
    ]:
        assert raw.ask(bad).startswith("E"), bad
    assert raw.ask("COMMANDS\n").startswith("S ")


def test_overlong_line_gets_e_and_close(sockdir: Path) -> None:
    srv = make_server(sockdir, poll_interval=0.1)  # the default 1 MiB limit
    try:
        raw = Raw(srv.path)
        raw.line()
        try:
            raw.send(b"WHOAMI 1 ad=" + b"x" * (1024 * 1024 + 10))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before we finish sending
        reply = split_args(raw.line())
        assert reply[0] == "E" and "too long" in reply[1]
        assert raw.closed_by_peer()
        # A big but legal line (a job ad) is fine.
        ok = Raw(srv.path)
        ok.line()
        assert ok.ask(encode_line(["WHOAMI", "1", "ad=" + "y" * 500_000])) == "S"
        assert client.call("WHOAMI", path=srv.path)["uid"] == str(os.getuid())
    finally:
        srv.shutdown()


def test_disconnect_mid_request_and_junk_do_not_hurt(server: SocketServer) -> None:
    for junk in [b"WHOAMI 1 a=", b"\xff" * 1000, b"RESU", b"WHOAMI 2 a=\\"]:
        raw = Raw(server.path)
        raw.send(junk)
        raw.close()
    raw = Raw(server.path)
    raw.sock.shutdown(socket.SHUT_WR)  # half-close before even reading the banner
    raw.close()
    assert client.call("WHOAMI", path=server.path)["uid"] == str(os.getuid())
    assert wait_for(lambda: server.connections == 0)


def test_slow_partial_line_is_cut_off(server: SocketServer) -> None:
    raw = Raw(server.path)
    raw.line()
    raw.send("WHOAMI 1 a=")  # ... and never the rest (line_timeout is 1 s here)
    other = Raw(server.path)  # meanwhile others are served
    other.line()
    assert other.ask("COMMANDS\n").startswith("S ")
    start = time.monotonic()
    assert raw.closed_by_peer()
    assert time.monotonic() - start < 4


def test_idle_connection_is_closed(sockdir: Path) -> None:
    srv = make_server(sockdir, idle_timeout=0.5, poll_interval=0.1)
    try:
        raw = Raw(srv.path)
        raw.line()
        assert raw.closed_by_peer()
    finally:
        srv.shutdown()


def test_client_that_never_reads_is_dropped(sockdir: Path) -> None:
    srv = make_server(sockdir, write_timeout=0.5, poll_interval=0.1)
    try:
        hog = Raw(srv.path)
        hog.line()
        assert srv.connections == 1
        hog.sock.setblocking(False)
        start = time.monotonic()
        # Ask for replies we never read until the server gives up on us.
        while time.monotonic() - start < 10 and srv.connections:
            try:
                hog.sock.send(b"COMMANDS\n" * 1000)
            except BlockingIOError:
                time.sleep(0.05)
            except OSError:
                break
            # Meanwhile another client is served: the hog holds only its own thread.
            assert client.call("WHOAMI", path=srv.path, timeout=5)["uid"] == str(os.getuid())
        assert wait_for(lambda: srv.connections == 0, 5)
        assert time.monotonic() - start >= 0.5  # it was the write timeout that ended it
        hog.close()
    finally:
        srv.shutdown()


@pytest.mark.slow
def test_connection_limit(sockdir: Path) -> None:
    srv = make_server(sockdir, max_connections=2, poll_interval=0.1)
    try:
        first, second = Raw(srv.path), Raw(srv.path)
        first.line()
        second.line()
        third = Raw(srv.path)
        assert "too many connections" in split_args(third.line())[1]
        assert third.closed_by_peer()
        with pytest.raises(client.ClientError) as info:
            client.call("WHOAMI", path=srv.path)
        assert info.value.code == client.BUSY
        first.close()
        assert wait_for(lambda: srv.connections == 1)
        assert client.call("WHOAMI", path=srv.path)["uid"] == str(os.getuid())
    finally:
        srv.shutdown()


def test_many_concurrent_clients(server: SocketServer) -> None:
    def one(i: int) -> str:
        return client.call("WHOAMI", path=server.path, i=i)["json"]

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(200)))
    assert got == [json.dumps({"i": str(i)}) for i in range(200)]


def _connection_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "annex-gahp-conn")


@pytest.mark.slow
def test_connection_threads_are_reused_and_end_when_idle(sockdir: Path) -> None:
    before = _connection_threads()
    srv = make_server(sockdir, poll_interval=0.1, worker_idle=0.5)
    try:
        for i in range(30):
            assert client.call("WHOAMI", path=srv.path, i=i)["json"] == json.dumps({"i": str(i)})
        assert wait_for(lambda: srv.connections == 0)
        assert _connection_threads() - before <= 2  # one at a time: one thread, reused
        assert wait_for(lambda: _connection_threads() <= before, 5)
        # Later connections get a thread again.
        assert client.call("WHOAMI", path=srv.path)["uid"] == str(os.getuid())
    finally:
        srv.shutdown()


def test_shutdown_ends_waiting_connection_threads(sockdir: Path) -> None:
    before = _connection_threads()
    srv = make_server(sockdir, poll_interval=0.1)  # threads would wait 60 s for work
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.call("WHOAMI", path=srv.path), range(40)))
    assert wait_for(lambda: srv.connections == 0)
    start = time.monotonic()
    srv.shutdown()
    assert time.monotonic() - start < 3
    assert wait_for(lambda: _connection_threads() <= before, 3)


def test_shutdown_with_open_connections_is_prompt(sockdir: Path) -> None:
    srv = make_server(sockdir, poll_interval=0.1)
    raws = [Raw(srv.path) for _ in range(5)]
    for raw in raws:
        raw.line()
    start = time.monotonic()
    srv.shutdown()
    assert time.monotonic() - start < 3
    assert all(raw.closed_by_peer() for raw in raws)
    assert not os.path.exists(srv.path)


# -- stdio -----------------------------------------------------------------------------------


def run_stdio(data: bytes, dispatcher: Dispatcher | None = None) -> list[str]:
    out = io.BytesIO()
    serve_stdio(dispatcher or Dispatcher(TABLE), stdin=io.BytesIO(data), stdout=out)
    return [decode_line(line) for line in LineSplitter().feed(out.getvalue())]


def test_stdio_conversation_until_quit() -> None:
    lines = run_stdio(b"COMMANDS\r\nWHOAMI 3 a=b\nRESULTS\nQUIT\nVERSION\n")
    assert lines[0].startswith("$GahpVersion: ")
    assert lines[1].startswith("S ") and "WHOAMI" in lines[1]
    assert lines[2:4] == ["S", "S 1"]
    assert split_args(lines[4])[:3] == ["3", "0", f"uid={os.getuid()}"]
    assert lines[5:] == ["S"]  # nothing after QUIT


def test_stdio_ends_at_eof_and_on_overlong_line() -> None:
    assert run_stdio(b"NOPE\nCOMMANDS")[1].startswith("E")  # half a line at EOF: ignored
    lines = run_stdio(b"VERSION\n" + b"x" * (1024 * 1024 + 5) + b"\nCOMMANDS\n")
    assert len(lines) == 3 and lines[1].startswith("S $GahpVersion")
    assert "too long" in split_args(lines[2])[1]


def test_stdio_through_a_real_process(sockdir: Path) -> None:
    script = (
        "from annex_gahp.gahp import Dispatcher\n"
        "from annex_gahp.transports import serve_stdio\n"
        "serve_stdio(Dispatcher({'PING': lambda c, a: {'user': c.user}}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        input=b"ASYNC_MODE_ON\nPING 1\nRESULTS\n",
        capture_output=True,
        cwd=REPO,
        timeout=20,
        check=True,
    )
    lines = proc.stdout.decode().splitlines()
    assert lines[1:5] == ["S", "S", "R", "S 1"]
    assert lines[5] == f"1 0 user={pwd.getpwuid(os.getuid()).pw_name}"


# -- client ----------------------------------------------------------------------------------


def test_socket_path_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(names.SOCKET_ENV, raising=False)
    assert client.socket_path() == names.DEFAULT_SOCKET
    assert client.socket_path("") == names.DEFAULT_SOCKET
    assert client.socket_path('"/run/x.sock"') == "/run/x.sock"  # ClassAd string quotes
    assert client.socket_path("/run/y.sock") == "/run/y.sock"
    monkeypatch.setenv(names.SOCKET_ENV, "/env.sock")
    assert client.socket_path("/run/y.sock") == "/env.sock"


def test_client_not_running(sockdir: Path) -> None:
    path = str(sockdir / "absent.sock")
    with pytest.raises(client.NotRunning) as info:
        client.call("WHOAMI", path=path)
    assert info.value.code == client.NOT_RUNNING
    assert str(info.value).startswith(f"annex_gahp is not running: cannot connect to {path}")
    assert "ANNEXD in DAEMON_LIST" in str(info.value)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    with pytest.raises(client.NotRunning):
        client.call("WHOAMI", path=path)


def test_client_errors(server: SocketServer) -> None:
    with pytest.raises(client.ClientError) as info:
        client.call("MISSING", path=server.path, name="zz")
    assert (info.value.code, str(info.value)) == ("NOT_FOUND", "no annex named zz")
    with pytest.raises(client.ClientError) as info:
        client.call("NO_SUCH", path=server.path)
    assert info.value.code == client.REFUSED
    with pytest.raises(TypeError):
        client.call("WHOAMI", path=server.path, flag=True)  # type: ignore[arg-type]


def test_client_uses_env_socket(server: SocketServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(names.SOCKET_ENV, server.path)
    assert client.call("whoami")["uid"] == str(os.getuid())


def test_client_timeout(sockdir: Path) -> None:
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(sockdir / "mute"))
    mute.listen(1)  # accepts (in the kernel) but never says anything
    try:
        start = time.monotonic()
        with pytest.raises(client.ClientError) as info:
            client.call("WHOAMI", path=str(sockdir / "mute"), timeout=0.5)
        assert info.value.code == client.TIMEOUT
        assert time.monotonic() - start < 3
    finally:
        mute.close()


def test_client_imports_only_stdlib_and_light_modules() -> None:
    code = (
        "import sys; before = set(sys.modules); import annex_gahp.client; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout.split()
    ours = {m for m in out if m.startswith("annex_gahp")}
    assert ours == {"annex_gahp", "annex_gahp.client", "annex_gahp.names", "annex_gahp.protocol"}
    for heavy in ("annex_gahp.gahp", "dataclasses", "logging", "json", "boto3", "htcondor2"):
        assert heavy not in out


# -- per-user limits (issue #12: one user's idle connections must not lock everyone out) ------


def _other_user() -> int:
    """A second unprivileged uid besides nobody."""
    for name in ("bob", "alice", "daemon", "bin"):
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
    pytest.skip("no second unprivileged account")


def _fork_as(uid: int, body: object) -> tuple[int, int, int]:
    """Fork a child that becomes `uid` and runs body(wfd, go_rfd); (pid, read end, go end).

    The child writes its report (JSON, one line) to wfd and then waits until the parent closes
    the `go` pipe, so whatever it holds (connections) stays open that long."""
    rfd, wfd = os.pipe()
    go_r, go_w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(rfd)
            os.close(go_w)
            os.setgroups([])
            os.setgid(pwd.getpwuid(uid).pw_gid if uid else 0)
            os.setuid(uid)
            body(wfd, go_r)  # type: ignore[operator]
            code = 0
        except BaseException as exc:
            os.write(wfd, (json.dumps({"error": repr(exc)}) + "\n").encode())
        finally:
            os._exit(code)
    os.close(wfd)
    os.close(go_r)
    return pid, rfd, go_w


def _read_report(rfd: int, timeout: float = 20.0) -> dict[str, object]:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([rfd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "child did not report in time"
        chunk = os.read(rfd, 65536)
        if not chunk:
            break
        data += chunk
    return json.loads(data)


def _hold_idle(path: str, count: int) -> object:
    """A child body: open `count` connections, read each first line, report, hold them."""

    def body(wfd: int, go_r: int) -> None:
        socks, firsts = [], []
        for _ in range(count):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(path)
                line = s.recv(4096).split(b"\n")[0]
                first = " ".join(split_args(decode_line(line)))
            except OSError as exc:
                first = f"error {exc}"
            firsts.append(first)
            socks.append(s)
        os.write(wfd, (json.dumps({"firsts": firsts}) + "\n").encode())
        os.read(go_r, 1)  # until the parent closes it

    return body


def _call_as(path: str, command: str = "WHOAMI") -> object:
    def body(wfd: int, go_r: int) -> None:
        start = time.monotonic()
        try:
            got: dict[str, object] = dict(client.call(command, path=path, timeout=5))
        except client.ClientError as exc:
            got = {"client_error": exc.code, "message": str(exc)}
        got["seconds"] = time.monotonic() - start
        os.write(wfd, (json.dumps(got) + "\n").encode())

    return body


def _run_as(uid: int, body: object) -> dict[str, object]:
    pid, rfd, go_w = _fork_as(uid, body)
    try:
        return _read_report(rfd)
    finally:
        os.close(go_w)
        os.close(rfd)
        os.waitpid(pid, 0)


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to become other users")


@needs_root
def test_one_users_idle_connections_do_not_lock_out_others(sockdir: Path, caplog) -> None:
    # Long idle timeout on purpose: the cap alone must keep the others in.
    srv = make_server(sockdir, max_connections=16, max_per_uid=4, reserved=4,
                      idle_timeout=60, poll_interval=0.1)
    pid, rfd, go_w = _fork_as(NOBODY, _hold_idle(srv.path, 40))
    try:
        firsts = _read_report(rfd)["firsts"]
        admitted = [f for f in firsts if f.startswith("$GahpVersion")]  # type: ignore[union-attr]
        refused = [f for f in firsts if f not in admitted]  # type: ignore[union-attr]
        assert len(admitted) == 4
        assert refused and all("too many connections from nobody" in f for f in refused)
        assert all(f"uid {NOBODY}" in f for f in refused)
        # nobody's own call is refused with a message the client shows ...
        mine = _run_as(NOBODY, _call_as(srv.path))
        assert mine["client_error"] == client.BUSY
        assert "at most 4 per user" in str(mine["message"])
        # ... while another user and root are served at once.
        other = _run_as(_other_user(), _call_as(srv.path))
        assert other["uid"] == str(_other_user()) and float(other["seconds"]) < 2  # type: ignore[arg-type]
        assert client.call("WHOAMI", path=srv.path, timeout=5)["uid"] == "0"
        assert any(f"uid {NOBODY}" in r.getMessage() and "per-user" in r.getMessage()
                   for r in caplog.records)
    finally:
        os.close(go_w)
        os.close(rfd)
        os.waitpid(pid, 0)
        srv.shutdown()


@needs_root
def test_a_users_call_waits_briefly_for_one_of_its_own_connections(sockdir: Path) -> None:
    """The job router runs many of one user's hooks at once: a call turned away by the
    per-user cap tries again for a few seconds (client.TURNED_AWAY_PATIENCE) instead of
    failing, and is served as soon as one of that user's connections is free."""
    srv = make_server(sockdir, max_connections=16, max_per_uid=2, reserved=4,
                      idle_timeout=60, poll_interval=0.1)
    pid, rfd, go_w = _fork_as(NOBODY, _hold_idle(srv.path, 2))
    try:
        assert all(f.startswith("$Gahp") for f in _read_report(rfd)["firsts"])  # type: ignore[union-attr]
        caller, crfd, cgo = _fork_as(NOBODY, _call_as(srv.path))
        time.sleep(0.8)
        # The holder lets its connections go. Killed, not told through its pipe: the caller,
        # forked after it, holds a copy of that pipe's end too.
        os.kill(pid, signal.SIGKILL)
        got = _read_report(crfd)
        os.close(cgo)
        os.close(crfd)
        os.waitpid(caller, 0)
        assert got.get("uid") == str(NOBODY), got
        assert 0.7 < float(got["seconds"]) < client.TURNED_AWAY_PATIENCE  # type: ignore[arg-type]
    finally:
        os.close(go_w)
        os.close(rfd)
        os.waitpid(pid, 0)
        srv.shutdown()


@needs_root
def test_reserve_keeps_root_in_when_users_fill_the_rest(sockdir: Path) -> None:
    srv = make_server(sockdir, max_connections=6, max_per_uid=2, reserved=2,
                      idle_timeout=60, poll_interval=0.1)
    holders = []
    try:
        for uid in (NOBODY, _other_user()):
            pid, rfd, go_w = _fork_as(uid, _hold_idle(srv.path, 2))
            holders.append((pid, rfd, go_w))
            assert all(f.startswith("$Gahp") for f in _read_report(rfd)["firsts"])  # type: ignore[union-attr]
        assert wait_for(lambda: srv.connections == 4)
        # 4 of 6 taken: the last 2 are root's and condor's. A third user gets none of them.
        third = pwd.getpwnam("daemon").pw_uid
        got = _run_as(third, _call_as(srv.path))
        assert got["client_error"] == client.BUSY
        assert "too many connections" in str(got["message"])
        assert client.call("WHOAMI", path=srv.path, timeout=5)["uid"] == "0"
    finally:
        # Every go pipe first: a later child holds copies of the earlier children's ends.
        for _, rfd, go_w in holders:
            os.close(go_w)
            os.close(rfd)
        for pid, _, _ in holders:
            os.waitpid(pid, 0)
        srv.shutdown()


def test_default_limits_leave_room_for_others() -> None:
    assert transports.MAX_CONNECTIONS_PER_UID * 4 <= transports.MAX_CONNECTIONS
    assert transports.RESERVED_CONNECTIONS >= 2
    assert transports.IDLE_TIMEOUT <= 10 and transports.LINE_TIMEOUT <= 10


@pytest.mark.slow
def test_slow_loris_is_cut_off(sockdir: Path) -> None:
    # The default line timeout: a client sending one byte a second never completes a line.
    srv = make_server(sockdir, poll_interval=0.1)
    try:
        raw = Raw(srv.path, timeout=20)
        raw.line()
        start = time.monotonic()
        closed = False
        for byte in b"WHOAMI 1 aaaaaaaaaaaaaaaaaaaaaaaa":
            try:
                raw.send(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(1.0)
        assert closed or raw.closed_by_peer()
        assert time.monotonic() - start < transports.LINE_TIMEOUT + 3
    finally:
        srv.shutdown()


@pytest.mark.slow
def test_idle_before_the_first_line_is_closed_fast(sockdir: Path) -> None:
    srv = make_server(sockdir, poll_interval=0.1)  # default idle timeout
    try:
        raw = Raw(srv.path, timeout=30)
        raw.line()
        start = time.monotonic()
        assert raw.closed_by_peer()
        assert time.monotonic() - start < transports.IDLE_TIMEOUT + 2
    finally:
        srv.shutdown()


def test_waiting_for_results_is_not_idle(sockdir: Path) -> None:
    def slow(caller: Caller, args: dict[str, str]) -> dict[str, str]:
        time.sleep(1.5)
        return {"done": "yes"}

    dispatcher = Dispatcher({"SLOW": slow})
    srv = make_server(sockdir, dispatcher=dispatcher, idle_timeout=0.5, poll_interval=0.1)
    try:
        assert client.call("SLOW", path=srv.path, timeout=10)["done"] == "yes"
    finally:
        srv.shutdown()
