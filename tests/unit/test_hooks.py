"""The job router hooks: ad text parsing/printing, and each hook run as a real subprocess
against a real Unix socket server (annex_gahp.transports.SocketServer with a Dispatcher whose
handlers record what they got). Those handlers are a protocol peer for the hooks, not a
stand-in for the product's service: they answer the way docs/design.md says JOB_* answer.

Inputs below are in the form condor_job_router 23.9 gave the probe hooks (docs/router.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from annex_gahp import names, service
from annex_gahp.errors import InputError
from annex_gahp.gahp import Caller, Dispatcher
from annex_gahp.hooks import _ad
from annex_gahp.transports import SocketServer

REPO = Path(__file__).resolve().parents[2]

# A source job ad as the router printed it to the translate hook (trimmed, same form).
JOB_AD = """AnnexInstances = 2
Args = "30"
ClusterId = 21
Cmd = "/bin/sleep"
DiskUsage = 45
Environment = ""
Err = "j.err"
GlobalJobId = "vm#21.0#1795544089"
In = "/dev/null"
Iwd = "/home/alice"
JobStatus = 1
JobUniverse = 5
MyType = "Job"
Out = "j.out"
Owner = "alice"
ProcId = 0
QDate = 1795544089
RequestCpus = 1
RequestDisk = DiskUsage
RequestMemory = ifthenelse(MemoryUsage =!= undefined,MemoryUsage,(ImageSize + 1023) / 1024)
Requirements = (TARGET.AnnexName =?= MY.TargetAnnexName) && (TARGET.Arch == "X86_64")
TargetAnnexName = "a1"
User = "alice@vm"
WeirdStr = "a\\\\b\\"c\\td"

"""
ROUTE_AD = '[ Name = "Annex"; TargetUniverse = 5 ]'
TRANSLATE_IN = f"{ROUTE_AD}\n------\n{JOB_AD}"

UPDATES = {
    "AnnexState": '"requested"',
    "AnnexRequestedInstances": "2",
    "AnnexLastError": '"said \\"no\\""',
}


# -- _ad -------------------------------------------------------------------------------------


def test_parse_reads_strings_ints_and_keeps_expressions() -> None:
    ad = _ad.parse(JOB_AD)
    assert ad.string("targetannexname") == "a1"
    assert ad.string("Owner") == "alice"
    assert ad.integer("ClusterId") == 21
    assert ad.integer("procid") == 0
    assert ad.raw("RequestDisk") == "DiskUsage"
    assert ad.string("RequestDisk") is None
    assert ad.integer("Owner") is None
    assert ad.string("Missing") is None
    # Old ClassAd strings: only \" is an escape (checked against condor_q -json on 23.9).
    assert ad.string("WeirdStr") == 'a\\\\b"c\\td'
    assert "requirements" in ad
    assert len(ad) == JOB_AD.count(" = ")


def test_text_round_trips_every_line() -> None:
    ad = _ad.parse(JOB_AD)
    assert ad.text() == JOB_AD.rstrip("\n") + "\n"


def test_set_overrides_in_place_and_appends_new() -> None:
    ad = _ad.parse('A = 1\nb = "x"\n')
    ad.set("B", '"y"')
    ad.set("C", "3")
    assert ad.text() == 'A = 1\nb = "y"\nC = 3\n'


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        ('"plain"', "plain"),
        ('"say \\"hi\\""', 'say "hi"'),
        ('"back\\slash"', "back\\slash"),
        ('"tab\\t literal"', "tab\\t literal"),
        ('""', ""),
    ],
)
def test_unquote_reads_old_classad_strings(literal: str, value: str) -> None:
    assert _ad.unquote(literal) == value


def test_unquote_backslash_before_closing_quote_is_a_backslash() -> None:
    assert _ad.unquote('"ends\\"') == "ends\\"


@pytest.mark.parametrize("bad", ["plain", '"open', 'x"', '"in"side"', "'single'"])
def test_unquote_refuses_non_literals(bad: str) -> None:
    with pytest.raises(_ad.AdError):
        _ad.unquote(bad)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("this is = = not [[[", "not 'Name = value'"),
        ("NoValue =\n", "not 'Name = value'"),
        ("1abc = 3\n", "not 'Name = value'"),
        ("A = 1\na = 2\n", "repeats"),
        ("A = 1\0\n", "NUL"),
        ("A = 1\n" * 5000, "lines"),
        ("A = " + "x" * (600 * 1024), "bytes"),
        ("A = " + "x" * (70 * 1024), "longer than"),
    ],
    ids=["garbage", "no-value", "bad-name", "repeat", "nul", "lines", "huge", "long-line"],
)
def test_parse_refuses_garbage(text: str, why: str) -> None:
    with pytest.raises(_ad.AdError, match=why):
        _ad.parse(text)


def test_split_ads_at_separator_lines_only() -> None:
    assert _ad.split_ads("a\n------\nb = 1\n") == ["a", "b = 1\n"]
    assert _ad.split_ads('X = "------"\n') == ['X = "------"\n']
    assert len(_ad.split_ads("A = 1\n\n------\nB = 2\n------\nC = 3")) == 3


def test_helper_text_is_identity_and_annex_attributes_only() -> None:
    text = _ad.helper_text(_ad.parse(JOB_AD + 'AnnexLease = 3600\nAnnexGahpSocket = "/s"\n'))
    sent = _ad.parse(text)
    for name in ("TargetAnnexName", "AnnexInstances", "AnnexLease", "Owner", "ClusterId",
                 "ProcId", "Requirements", "JobStatus", "AnnexGahpSocket"):  # fmt: skip
        assert name in sent, name
    for name in ("Cmd", "Args", "Environment", "Iwd", "WeirdStr", "MyType"):
        assert name not in sent, name


def test_check_job() -> None:
    assert _ad.check_job(_ad.parse(JOB_AD)) == "a1"
    with pytest.raises(_ad.AdError, match="no TargetAnnexName"):
        _ad.check_job(_ad.parse('ClusterId = 1\nProcId = 0\nOwner = "a"\n'))
    with pytest.raises(_ad.AdError, match="not a valid annex name"):
        _ad.check_job(_ad.parse('ClusterId = 1\nProcId = 0\nOwner = "a"\nTargetAnnexName = "-x"'))
    with pytest.raises(_ad.AdError, match="no TargetAnnexName string"):
        _ad.check_job(_ad.parse('ClusterId = 1\nProcId = 0\nOwner = "a"\nTargetAnnexName = 5'))
    with pytest.raises(_ad.AdError, match="ClusterId"):
        _ad.check_job(_ad.parse('ProcId = 0\nOwner = "a"\nTargetAnnexName = "x"'))
    with pytest.raises(_ad.AdError, match="Owner"):
        _ad.check_job(_ad.parse('ClusterId = 1\nProcId = 0\nTargetAnnexName = "x"'))


def test_updates_from_checks_what_the_helper_sent() -> None:
    assert _ad.updates_from(service.ad_answer(UPDATES)) == UPDATES
    assert _ad.updates_from({}) == {}
    bad = [
        "not an ad",
        "AnnexState",
        "Bad Name = 1",
        "AnnexState =",
        'AnnexState = "a"\nAnnexState = "b"',
        "JobStatus = 5",
        'owner = "mallory"',
        "A = 1\0",
        "X" * 101 + " = 1",
    ]
    for raw in bad:
        with pytest.raises(_ad.AdError):
            _ad.updates_from({"ad": raw})


_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=30)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(names.JOB_STATUS_ATTRS), _TEXT | st.integers(), max_size=5))
def test_the_hook_reads_what_the_helper_writes(attrs: dict[str, object]) -> None:
    pytest.importorskip("classad2")
    sent = {name: service.classad_literal(value) for name, value in attrs.items()}
    got = _ad.updates_from(service.ad_answer(sent))
    assert got == sent
    for name, value in attrs.items():
        if isinstance(value, str):
            assert _ad.parse(f"{name} = {got[name]}").raw(name) == service.classad_literal(value)


# -- the hooks as subprocesses against a real socket server ----------------------------------


class Peer:
    """Records each JOB_* call; answers with `updates` or raises `error`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Caller, dict[str, str]]] = []
        self.updates: dict[str, str] = dict(UPDATES)
        self.error: Exception | None = None
        self.lock = threading.Lock()

    def handler(self, command: str) -> Callable[[Caller, dict[str, str]], dict[str, str]]:
        def handle(caller: Caller, args: dict[str, str]) -> dict[str, str]:
            with self.lock:
                self.calls.append((command, caller, args))
            if self.error is not None:
                raise self.error
            if command == "JOB_CLEANUP":
                return {}
            return service.ad_answer(self.updates)

        return handle


@pytest.fixture
def peer() -> Iterator[tuple[Peer, str]]:
    sockdir = Path(tempfile.mkdtemp(prefix="hk-", dir="/tmp"))
    p = Peer()
    table = {c: p.handler(c) for c in ("JOB_ROUTED", "JOB_UPDATE", "JOB_FINALIZE", "JOB_CLEANUP")}
    # A short poll: shutdown waits up to one poll for the accept loop (1 s by default).
    server = SocketServer(str(sockdir / "annex.sock"), Dispatcher(table), poll_interval=0.05)
    server.start()
    try:
        yield p, server.path
    finally:
        server.shutdown()
        shutil.rmtree(sockdir, ignore_errors=True)


def run_hook(
    hook: str, stdin: str | bytes, socket_path: str | None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != names.SOCKET_ENV}
    env["PYTHONPATH"] = str(REPO)
    if socket_path is not None:
        env[names.SOCKET_ENV] = socket_path
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run(
        [sys.executable, "-m", f"annex_gahp.hooks.{hook}"],
        input=data,
        capture_output=True,
        env=env,
        cwd="/",
        timeout=timeout,
        check=False,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


def one_line_error(proc: subprocess.CompletedProcess[str], prog: str) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: "), lines[0]
    return lines[0]


def test_translate_prints_the_whole_ad_with_the_helpers_attributes(peer) -> None:
    p, path = peer
    proc = run_hook("translate", TRANSLATE_IN, path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = _ad.parse(proc.stdout)
    src = _ad.parse(JOB_AD)
    for name, expr in src.items():
        if name not in UPDATES:
            assert out.raw(name) == expr, name
    for name, expr in UPDATES.items():
        assert out.raw(name) == expr
    assert len(out) == len(src) + len(UPDATES)
    assert out.string("AnnexLastError") == 'said "no"'
    [(command, caller, args)] = p.calls
    assert command == "JOB_ROUTED"
    assert caller.uid == os.getuid()
    sent = _ad.parse(args["ad"])
    assert sent.string("TargetAnnexName") == "a1"
    assert sent.integer("ClusterId") == 21
    assert "Cmd" not in sent


def test_translate_overrides_existing_attributes_once(peer) -> None:
    p, path = peer
    p.updates = {"AnnexInstances": "5"}
    proc = run_hook("translate", TRANSLATE_IN, path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("AnnexInstances = ") == 1
    assert "AnnexInstances = 5\n" in proc.stdout


@pytest.mark.parametrize(
    ("stdin", "why"),
    [
        (JOB_AD, "'------'"),
        (f"{ROUTE_AD}\n------\n" + JOB_AD.replace('TargetAnnexName = "a1"\n', ""), "no Target"),
        (f"{ROUTE_AD}\n------\n" + JOB_AD.replace('"a1"', '"a1; rm -rf /"'), "valid annex"),
        (f"{ROUTE_AD}\n------\nthis is = = not [[[\n", "not 'Name = value'"),
        (f"not a route\n------\n{JOB_AD}", "route ad"),
        (f"{ROUTE_AD}\n------\n{JOB_AD}------\n{JOB_AD}", "'------'"),
        (f"{ROUTE_AD}\n------\n{JOB_AD}" + "Pad = 1\n" * 5000, "refused"),
        (f"{ROUTE_AD}\n------\n{JOB_AD}" + "X = " + "y" * (1024 * 1024) + "\n", "larger"),
        (b"\xff\xfe" + JOB_AD.encode(), "UTF-8"),
        ("", "'------'"),
    ],
    ids="no-route no-target bad-name garbage bad-route three-ads lines huge not-utf8 empty".split(),
)
def test_translate_refuses_hostile_input_and_sends_nothing(peer, stdin, why) -> None:
    p, path = peer
    proc = run_hook("translate", stdin, path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert why in one_line_error(proc, "annex_hook_translate")
    assert p.calls == []


def test_translate_fails_when_the_helper_is_down(tmp_path) -> None:
    proc = run_hook("translate", TRANSLATE_IN, str(tmp_path / "nobody-listens.sock"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "annex_gahp is not running" in one_line_error(proc, "annex_hook_translate")


def test_translate_fails_with_the_helpers_message(peer) -> None:
    p, path = peer
    p.error = InputError("annex_instances: 500 is more than ANNEX_MAX_INSTANCES (50)")
    proc = run_hook("translate", TRANSLATE_IN, path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "ANNEX_MAX_INSTANCES (50)" in one_line_error(proc, "annex_hook_translate")


def test_translate_refuses_a_helper_that_touches_job_identity(peer) -> None:
    p, path = peer
    p.updates = {"Owner": '"mallory"'}
    proc = run_hook("translate", TRANSLATE_IN, path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Owner" in one_line_error(proc, "annex_hook_translate")


def routed_ad(socket_path: str | None = None) -> str:
    text = JOB_AD.replace("ClusterId = 21", "ClusterId = 22")
    text += 'RoutedFromJobId = "21.0"\nRouteName = "Annex"\nRoutedBy = "jobrouter"\n'
    if socket_path:
        text += f'AnnexGahpSocket = "{socket_path}"\n'
    return text


def test_update_prints_updates_and_finds_the_socket_in_the_ad(peer) -> None:
    p, path = peer
    proc = run_hook("update", routed_ad(path), None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert dict(_ad.parse(proc.stdout).items()) == UPDATES
    [(command, _caller, args)] = p.calls
    assert command == "JOB_UPDATE"
    assert _ad.parse(args["ad"]).string("RoutedFromJobId") == "21.0"


def test_update_with_the_helper_down_exits_0_and_prints_nothing(tmp_path) -> None:
    proc = run_hook("update", routed_ad(), str(tmp_path / "gone.sock"))
    assert proc.returncode == 0
    assert proc.stdout == ""
    assert "not running" in one_line_error(proc, "annex_hook_update")


def test_update_refuses_garbage(peer) -> None:
    p, path = peer
    proc = run_hook("update", "garbage garbage\n", path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    one_line_error(proc, "annex_hook_update")
    assert p.calls == []


def test_finalize_sends_the_routed_ad_and_prints_source_updates(peer) -> None:
    p, path = peer
    stdin = f"{JOB_AD}\n------\n{routed_ad()}"
    proc = run_hook("finalize", stdin, path)
    assert proc.returncode == 0, proc.stderr
    assert dict(_ad.parse(proc.stdout).items()) == UPDATES
    [(command, _caller, args)] = p.calls
    assert command == "JOB_FINALIZE"
    assert _ad.parse(args["ad"]).integer("ClusterId") == 22


def test_finalize_helper_down_exits_0_and_garbage_exits_1(peer, tmp_path) -> None:
    p, path = peer
    stdin = f"{JOB_AD}\n------\n{routed_ad()}"
    down = run_hook("finalize", stdin, str(tmp_path / "gone.sock"))
    assert (down.returncode, down.stdout) == (0, "")
    one_line_error(down, "annex_hook_finalize")
    bad = run_hook("finalize", JOB_AD, path)
    assert (bad.returncode, bad.stdout) == (1, "")
    assert "'------'" in one_line_error(bad, "annex_hook_finalize")
    assert p.calls == []


def test_cleanup_tells_the_helper_and_prints_nothing(peer, tmp_path) -> None:
    p, path = peer
    proc = run_hook("cleanup", routed_ad(), path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert [c[0] for c in p.calls] == ["JOB_CLEANUP"]
    down = run_hook("cleanup", routed_ad(), str(tmp_path / "gone.sock"))
    assert (down.returncode, down.stdout) == (0, "")
    one_line_error(down, "annex_hook_cleanup")
    bad = run_hook("cleanup", "TargetAnnexName = 1\n", path)
    assert bad.returncode == 1
    assert len(p.calls) == 1


# -- thin and fast ---------------------------------------------------------------------------

FORBIDDEN = ("htcondor", "htcondor2", "classad", "classad2", "boto3", "botocore", "jinja2",
             "annex_gahp.gahp", "annex_gahp.service", "annex_gahp.settings", "sqlite3")  # fmt: skip


@pytest.mark.parametrize("hook", ["translate", "update", "finalize", "cleanup"])
def test_hooks_import_nothing_heavy(hook: str) -> None:
    code = f"import sys, annex_gahp.hooks.{hook}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    ).stdout.split()
    loaded = [m for m in out if m in FORBIDDEN or m.split(".")[0] in FORBIDDEN[:7]]
    assert loaded == []


# What made the hook twice as slow as `python3 -c pass` (docs/benchmarks.md, benchmark 1):
# `re` from pip's console-script wrapper, `enum` and `selectors` from `socket`, `collections`
# from `collections.abc`.
START_UP_HEAVY = ("re", "json", "socket", "enum", "selectors", "collections")


def run_launcher(hook: str, stdin: str, socket_path: str) -> tuple[int, str, set[str]]:
    """The installed-style launcher run as the router would run it: (exit status, stdout, the
    modules it had loaded when it exited, as atexit reports them on stderr)."""
    launcher = REPO / "annex_gahp" / "hooks" / "bin" / f"annex_hook_{hook}"
    assert launcher.read_text().startswith("#!python\n")  # pip points it at its interpreter
    code = (
        f"import sys, atexit; sys.path.insert(0, {str(REPO)!r}); sys.argv = [{str(launcher)!r}]; "
        f"atexit.register(lambda: sys.stderr.write('LOADED ' + ' '.join(sys.modules) + '\\n')); "
        f"exec(compile(open({str(launcher)!r}).read(), {str(launcher)!r}, 'exec'))"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code],
        input=stdin,
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, names.SOCKET_ENV: socket_path},
    )
    loaded_line = [line for line in proc.stderr.splitlines() if line.startswith("LOADED ")]
    assert len(loaded_line) == 1, proc.stderr
    return proc.returncode, proc.stdout, set(loaded_line[0].split()[1:])


@pytest.mark.parametrize("hook", ["translate", "update", "finalize", "cleanup"])
def test_hook_launchers_load_nothing_slow_to_start(hook: str) -> None:
    # With an empty ad the launcher fails fast (refused): only the modules matter here.
    _, _, loaded = run_launcher(hook, "", "/nonexistent/annex.sock")
    assert f"annex_gahp.hooks.{hook}" in loaded
    assert sorted(loaded & set(START_UP_HEAVY)) == []


def test_a_whole_translate_run_loads_nothing_slow_to_start(peer) -> None:
    """The launcher run as the router runs it, with a real job ad against a peer that answers:
    reading the helper's answer must not load json or re, ~10 ms of start-up."""
    _, path = peer
    status, stdout, loaded = run_launcher("translate", TRANSLATE_IN, path)
    assert status == 0
    assert _ad.parse(stdout).string("AnnexLastError") == 'said "no"'
    assert sorted(loaded & set(START_UP_HEAVY)) == []


@pytest.mark.parametrize(
    "text", ["a", "A1-x", "-a", "1a", "a" * 63, "a" * 64, "a b", "a_b", "", "é", "ab-", "a.b"]
)
def test_annex_name_check_matches_the_contract_pattern(text: str) -> None:
    import re  # noqa: PLC0415

    assert _ad.is_annex_name(text) == bool(re.match(names.NAME_PATTERN, text))
    assert not _ad.is_annex_name(text + "\n")


# -- other routes: JOB_ROUTER_HOOK_KEYWORD is global -----------------------------------------


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ('[ Name = "Annex"; TargetUniverse = 5 ]', "Annex"),
        ('[ TargetUniverse = 9; GridResource = "batch slurm"; name = "CE-1" ]', "CE-1"),
        ("[ TargetUniverse = 5 ]", None),
        ("Name = Annex", None),
        ("[ Name = Annex ]", None),
    ],
)
def test_route_name(line: str, name: str | None) -> None:
    assert _ad.route_name(line) == name


def test_translate_hands_other_routes_jobs_back_untouched(peer) -> None:
    p, path = peer
    other = JOB_AD.replace('TargetAnnexName = "a1"\n', "")
    proc = run_hook("translate", f'[ Name = "Slurm"; TargetUniverse = 9 ]\n------\n{other}', path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == other
    assert p.calls == []


def test_other_routes_jobs_pass_the_other_hooks_silently(peer) -> None:
    p, path = peer
    other = routed_ad().replace('RouteName = "Annex"', 'RouteName = "Slurm"')
    for hook, stdin in (
        ("update", other),
        ("finalize", f"{JOB_AD}\n------\n{other}"),
        ("cleanup", other),
    ):
        proc = run_hook(hook, stdin, path)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), hook
    assert p.calls == []
