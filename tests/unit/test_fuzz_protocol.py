"""Property tests: the codec round-trips, the session never raises, the server never wedges."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from annex_gahp import client
from annex_gahp.errors import InputError
from annex_gahp.gahp import Caller, Dispatcher
from annex_gahp.protocol import (
    LineSplitter,
    ProtocolError,
    decode_line,
    encode_line,
    join_args,
    parse_kv,
    split_args,
)
from annex_gahp.transports import SocketServer

ALICE = Caller(uid=1001, user="alice", is_admin=False)
utf8_text = st.text(alphabet=st.characters(codec="utf-8"))
arg_lists = st.lists(st.text(), max_size=12).filter(lambda a: a != [""])
utf8_arg_lists = st.lists(utf8_text, max_size=12).filter(lambda a: a != [""])


def echo(caller: Caller, args: dict[str, str]) -> dict[str, str]:
    if "fail" in args:
        raise InputError(args["fail"])
    if "crash" in args:
        raise RuntimeError(args["crash"])
    return dict(args)


TABLE = {"ECHO": echo}


# -- codec -----------------------------------------------------------------------------------


@given(arg_lists)
@pytest.mark.slow
def test_join_split_round_trip(args: list[str]) -> None:
    assert split_args(join_args(args)) == args


@given(utf8_arg_lists)
def test_bytes_round_trip_through_the_framer(args: list[str]) -> None:
    (raw,) = LineSplitter().feed(encode_line(args))
    assert split_args(decode_line(raw)) == args


@given(st.lists(utf8_arg_lists, min_size=1, max_size=5), st.data())
def test_framing_is_independent_of_chunking(lines: list[list[str]], data: st.DataObject) -> None:
    stream = b"".join(encode_line(a) for a in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    splitter = LineSplitter()
    got: list[bytes] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got += splitter.feed(stream[prev:cut])
        prev = cut
    assert [split_args(decode_line(x)) for x in got] == lines
    assert splitter.pending == 0


@given(st.dictionaries(st.from_regex(r"[A-Za-z0-9_.-]+", fullmatch=True), utf8_text))
def test_kv_round_trip(values: dict[str, str]) -> None:
    line = encode_line(["ANNEX_CREATE", "1", *[f"{k}={v}" for k, v in values.items()]])
    (raw,) = LineSplitter().feed(line)
    assert parse_kv(split_args(decode_line(raw))[2:]) == values


@given(st.text())
def test_split_either_parses_or_says_why(line: str) -> None:
    try:
        args = split_args(line)
    except ProtocolError as exc:
        assert str(exc)
    else:
        assert all(isinstance(a, str) for a in args)


# -- session ---------------------------------------------------------------------------------

# Tokens that reach the interesting branches more often than uniform noise does.
tokens = st.sampled_from(
    [
        "COMMANDS",
        "RESULTS",
        "VERSION",
        "ASYNC_MODE_ON",
        "ASYNC_MODE_OFF",
        "QUIT",
        "echo",
        "ECHO",
        "1",
        "2",
        "x",
        "a=b",
        "fail=no",
        "crash=boom",
        "=",
        "a=",
        "\\",
        "\\ ",
        "\\\\",
        "\\\n",
        "\r",
        "\n",
        "",
        "é",
        "\x00",
    ]
)
request_lines = st.one_of(
    st.text(),
    st.binary(),
    st.lists(tokens, max_size=8).map(" ".join),
    st.lists(tokens, max_size=8).map(lambda t: " ".join(t).encode("utf-8", "surrogatepass")),
)


def _well_formed(reply: list[str]) -> None:
    assert reply, "every request gets a Return Line"
    assert reply[0][:1] in ("S", "E", "F")
    for line in reply:
        assert isinstance(line, str)
        split_args(line)  # every line we write parses back (VERSION's banner included)


@settings(max_examples=300)
@given(st.lists(request_lines, max_size=15))
def test_session_never_raises(lines: list[str | bytes]) -> None:
    session = Dispatcher(TABLE).session(ALICE)
    for line in lines:
        reply = session.handle_line(line)
        _well_formed(reply)
        if reply[0].startswith("S ") and line in ("RESULTS", b"RESULTS"):
            assert int(reply[0][2:]) == len(reply) - 1
    if not session.closed:
        assert session.handle_line("COMMANDS")[0].startswith("S ")


# -- socket server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[SocketServer]:
    tmp = Path(tempfile.mkdtemp(prefix="agf-", dir="/tmp"))
    srv = SocketServer(str(tmp / "s"), Dispatcher(TABLE), line_timeout=2.0, poll_interval=0.05)
    srv.start()
    yield srv
    srv.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def _commands_answered(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(b"COMMANDS\n")
        splitter = LineSplitter()
        lines: list[bytes] = []
        while len(lines) < 2:
            data = sock.recv(65536)
            if not data:
                return False
            lines += splitter.feed(data)
        return lines[0].startswith(b"$GahpVersion") and lines[1].startswith(b"S ASYNC_MODE_OFF")


streams = st.lists(
    st.one_of(
        st.binary(max_size=2000),
        request_lines.map(
            lambda x: (x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass")) + b"\n"
        ),
    ),
    max_size=8,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(chunks=streams, ending=st.sampled_from(["close", "shutdown_wr", "reset", "stay"]))
def test_server_survives_random_streams(
    server: SocketServer, chunks: list[bytes], ending: str
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(server.path)
    try:
        for chunk in chunks:
            sock.sendall(chunk)
    except OSError:
        pass  # the server may hang up on us (QUIT, overlong line): that is its right
    if ending == "shutdown_wr":
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    elif ending == "reset":
        # SO_LINGER 0: close with unread data and no goodbye.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    if ending != "stay":
        sock.close()
    try:
        # Whatever that connection did, a fresh one is served at once.
        assert _commands_answered(server.path)
        assert client.call("ECHO", path=server.path, timeout=5, k="v") == {"k": "v"}
    finally:
        sock.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(junk=st.lists(request_lines, max_size=6))
def test_same_connection_recovers_after_junk(server: SocketServer, junk: list[str | bytes]) -> None:
    """After junk lines (each answered), the same connection still answers COMMANDS."""
    payload = b"".join(
        (j if isinstance(j, bytes) else j.encode("utf-8", "surrogatepass")) + b"\n" for j in junk
    )
    # Two bare line feeds end any line the junk left open (one may be escaped by a trailing
    # backslash); then a well-formed request.
    payload += b"\n\nCOMMANDS\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(server.path)
        try:
            sock.sendall(payload)
        except OSError:
            pass
        splitter = LineSplitter(1 << 24)
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                # Only a QUIT among the junk may end the conversation early.
                assert b"quit" in payload.lower()
                return
            for line in splitter.feed(data):
                if line.startswith(b"S ASYNC_MODE_OFF"):
                    return


# -- the request limits (issue #12): any value is refused naming its field, or is bounded ------

from annex_gahp import names as _names  # noqa: E402
from annex_gahp import settings as _settings  # noqa: E402
from annex_gahp import spec as _spec  # noqa: E402
from annex_gahp.errors import LimitExceeded  # noqa: E402

_S = _settings.load(lookup={}.get)
_hostile = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=3000),
    st.from_regex(r"[0-9]{1,6000}", fullmatch=True),
    st.from_regex(r"([0-9]{1,12}[smhdSMHD]){1,20}", fullmatch=True),
    st.lists(st.from_regex(r"[ -~\x00\t]{0,140}=[ -~\x00\t]{0,270}", fullmatch=True),
             max_size=60).map(",".join),
    st.integers(min_value=-(10**40), max_value=10**40),
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_spec.KEYWORDS[1:]), _hostile, max_size=4))
@example({"instances": ":\n"})  # found by this test: the refusal quoted the raw newline
@pytest.mark.slow
def test_any_request_is_refused_by_field_or_bounded(values: dict[str, object]) -> None:
    try:
        got = _spec.from_keywords({"name": "burst", **values}, "alice", _S, now=1_800_000_000)
    except (InputError, LimitExceeded) as exc:
        message = str(exc)
        assert message.startswith(("annex_", "+Annex")), message  # names the field
        assert "\n" not in message and "\x00" not in message.split("'", 1)[0]
        return
    for key in _spec.KEYWORDS[1:]:
        value = getattr(got, key, None)
        texts = value if isinstance(value, tuple) else (value,)
        for text in texts:
            flat = "=".join(text) if isinstance(text, tuple) else text
            if isinstance(flat, str):
                assert not any(ord(c) < 32 or ord(c) == 127 for c in flat), (key, flat)
    assert len(got.tags) <= _names.USER_TAGS_MAX
    for key, value in got.tags:
        assert len(key) <= _names.TAG_KEY_MAX and len(value) <= _names.TAG_VALUE_MAX
        assert not key.lower().startswith(("aws:", "htcondor-annex:"))
    for number in (got.instances, got.lease_seconds, got.expiry, got.idle_timeout):
        assert number is None or 0 < number < 10**18
