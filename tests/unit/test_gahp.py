"""The transport-free dispatcher and session: built-ins, S/E/F, results, async R."""

from __future__ import annotations

import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from annex_gahp.errors import NotFound, PermissionDenied
from annex_gahp.gahp import BUILTINS, Caller, Dispatcher, Session, banner
from annex_gahp.protocol import encode_line, split_args

ALICE = Caller(uid=1001, user="alice", is_admin=False)


def echo(caller: Caller, args: dict[str, str]) -> dict[str, str]:
    seen = {f"arg.{key}": value for key, value in args.items()}
    return {"user": caller.user, "admin": str(caller.is_admin), **seen}


def missing(caller: Caller, args: dict[str, str]) -> dict[str, str]:
    raise NotFound(f"no annex named {args.get('name', '')!r}; ANNEX_LIST shows yours")


def denied(caller: Caller, args: dict[str, str]) -> dict[str, str]:
    raise PermissionDenied("annex x belongs to bob")


def crash(caller: Caller, args: dict[str, str]) -> dict[str, str]:
    raise KeyError("secret-ish internals")


def not_strings(caller: Caller, args: dict[str, str]) -> dict[str, str]:
    return {"count": 3}  # type: ignore[dict-item]


TABLE = {
    "ANNEX_ECHO": echo,
    "ANNEX_MISSING": missing,
    "annex_denied": denied,  # registered lower-case: names are case-insensitive
    "ANNEX_CRASH": crash,
    "ANNEX_BAD": not_strings,
}


@pytest.fixture
def session() -> Session:
    return Dispatcher(TABLE).session(ALICE)


def results(session: Session) -> list[list[str]]:
    reply = session.handle_line("RESULTS")
    head, *lines = reply
    assert head == f"S {len(lines)}"
    return [split_args(line) for line in lines]


def kind(reply: list[str]) -> str:
    return reply[0].split(" ")[0]


def test_banner_and_version(session: Session) -> None:
    assert re.fullmatch(
        r"\$GahpVersion: \d+\.\d+\.\d+ [A-Z][a-z]{2} \d{1,2} \d{4} htcondor-annex-gahp \$",
        session.banner,
    )
    assert session.banner == banner()
    assert session.handle_line("VERSION") == ["S " + session.banner]


def test_commands_lists_builtins_and_ours(session: Session) -> None:
    (reply,) = session.handle_line("COMMANDS")
    names = split_args(reply)
    assert names[0] == "S"
    assert set(names[1:]) == set(BUILTINS) | {
        "ANNEX_ECHO",
        "ANNEX_MISSING",
        "ANNEX_DENIED",
        "ANNEX_CRASH",
        "ANNEX_BAD",
    }


def test_command_codes_are_case_insensitive(session: Session) -> None:
    assert session.handle_line("commands")[0].startswith("S ")
    assert session.handle_line("Annex_Echo 1 a=b") == ["S"]
    assert results(session) == [["1", "0", "user=alice", "admin=False", "arg.a=b"]]


@pytest.mark.parametrize(
    "line",
    [
        "",
        "NO_SUCH_COMMAND 1",
        "COMMANDS extra",
        "RESULTS 1",
        "QUIT now",
        "ANNEX_ECHO",  # no request id
        "ANNEX_ECHO 1 novalue",
        "ANNEX_ECHO 1 a=1 a=2",
        "ANNEX_ECHO 1 =x",
        "ANNEX_ECHO bad/id",
        "ANNEX_ECHO " + "9" * 65,
        "ANNEX_ECHO 1 a=\\x",
        "ANNEX_ECHO 1 a=\\",
        b"ANNEX_ECHO 1 a=\xff",
        "ANNEX_ECHO 1 a=\udc80",
    ],
)
def test_bad_requests_get_e(session: Session, line: str | bytes) -> None:
    reply = session.handle_line(line)
    assert len(reply) == 1
    assert reply[0].startswith("E")
    assert results(session) == []  # nothing ran


def test_success_and_failure_results(session: Session) -> None:
    assert session.handle_line(encode_line(["ANNEX_ECHO", "10", "name=a b"])) == ["S"]
    assert session.handle_line("ANNEX_MISSING 11 name=zz") == ["S"]
    assert session.handle_line("annex_denied 12") == ["S"]
    assert results(session) == [
        ["10", "0", "user=alice", "admin=False", "arg.name=a b"],
        ["11", "1", "NOT_FOUND", "no annex named 'zz'; ANNEX_LIST shows yours"],
        ["12", "1", "PERMISSION_DENIED", "annex x belongs to bob"],
    ]
    assert results(session) == []  # handed out once


def test_unexpected_exception_is_internal_and_logged(
    session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="annex_gahp.gahp"):
        assert session.handle_line("ANNEX_CRASH 5") == ["S"]
        assert session.handle_line("ANNEX_BAD 6") == ["S"]
    (crashed, bad) = results(session)
    assert crashed[:3] == ["5", "1", "INTERNAL"]
    assert "secret-ish" not in crashed[3]  # the details stay in the log
    assert bad[:3] == ["6", "1", "INTERNAL"]
    assert "secret-ish internals" in caplog.text
    # The session (and helper) carry on.
    assert session.handle_line("ANNEX_ECHO 7") == ["S"]
    assert results(session)[0][:2] == ["7", "0"]


def test_unencodable_error_message_still_replies() -> None:
    def odd(caller: Caller, args: dict[str, str]) -> dict[str, str]:
        raise NotFound("no file /tmp/\udcff")

    session = Dispatcher({"ODD": odd}).session(ALICE)
    assert session.handle_line("ODD 1") == ["S"]
    (result,) = results(session)
    assert result == ["1", "1", "NOT_FOUND", "no file /tmp/\\udcff"]
    encode_line(result)


def test_duplicate_pending_reqid(session: Session) -> None:
    assert session.handle_line("ANNEX_ECHO 1") == ["S"]
    assert kind(session.handle_line("ANNEX_ECHO 1")) == "E"
    assert kind(session.handle_line("ANNEX_MISSING 1")) == "E"
    assert len(results(session)) == 1
    assert session.handle_line("ANNEX_ECHO 1") == ["S"]  # free again once collected


def test_args_cannot_change_the_caller(session: Session) -> None:
    session.handle_line("ANNEX_ECHO 1 user=root uid=0 admin=True")
    (result,) = results(session)
    # The handler sees the args, but its Caller is still alice's.
    assert result[2:] == [
        "user=alice",
        "admin=False",
        "arg.user=root",
        "arg.uid=0",
        "arg.admin=True",
    ]


def test_async_r_once_until_results(session: Session) -> None:
    assert session.handle_line("ASYNC_MODE_ON") == ["S"]
    assert session.handle_line("ANNEX_ECHO 1") == ["S", "R"]
    assert session.handle_line("ANNEX_ECHO 2") == ["S"]  # R already given
    assert len(results(session)) == 2
    assert session.handle_line("ANNEX_ECHO 3") == ["S", "R"]  # re-armed by RESULTS
    assert session.handle_line("ASYNC_MODE_OFF") == ["S"]
    results(session)
    assert session.handle_line("ANNEX_ECHO 4") == ["S"]


def test_async_on_does_not_signal_old_results(session: Session) -> None:
    session.handle_line("ANNEX_ECHO 1")
    assert session.handle_line("ASYNC_MODE_ON") == ["S"]
    assert len(results(session)) == 1


def test_quit_closes(session: Session) -> None:
    assert session.handle_line("QUIT") == ["S"]
    assert session.closed
    assert kind(session.handle_line("COMMANDS")) == "E"


def test_dispatcher_validates_table() -> None:
    with pytest.raises(ValueError, match="built-in"):
        Dispatcher({"RESULTS": echo})
    with pytest.raises(ValueError, match="bad command name"):
        Dispatcher({"ANNEX ECHO": echo})
    with pytest.raises(ValueError):
        Dispatcher({"a": echo, "A": echo})


def test_too_many_pending_is_f() -> None:
    session = Dispatcher(TABLE, max_pending=2).session(ALICE)
    assert session.handle_line("ANNEX_ECHO 1") == ["S"]
    assert session.handle_line("ANNEX_ECHO 2") == ["S"]
    assert kind(session.handle_line("ANNEX_ECHO 3")) == "F"
    results(session)
    assert session.handle_line("ANNEX_ECHO 3") == ["S"]


def test_concurrent_sessions_and_threads() -> None:
    """Many threads on one session and on several: every result exactly once, in order.
    The threads only record what they were answered (or what they raised): an assert in a
    thread is a warning pytest prints, never a failure; the asserts are here."""
    answers: dict[int, list[list[str]]] = {}
    raised: list[BaseException] = []
    with ThreadPoolExecutor(8) as pool:
        dispatcher = Dispatcher(TABLE)
        sessions = [dispatcher.session(ALICE) for _ in range(3)]

        def client(session: Session, base: int) -> None:
            try:
                answers[base] = [
                    session.handle_line(f"ANNEX_ECHO {base + i} i={i}") for i in range(50)
                ]
            except BaseException as e:
                raised.append(e)

        threads = [
            threading.Thread(target=client, args=(s, 1000 * k)) for k, s in enumerate(sessions * 2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        pool.shutdown(wait=True)
    assert raised == []
    assert sorted(answers) == [0, 1000, 2000, 3000, 4000, 5000]
    assert all(replies == [["S"]] * 50 for replies in answers.values()), answers
    for s in sessions:
        ids = [r[0] for r in results(s)]
        assert len(ids) == 100
        assert len(set(ids)) == 100
