"""`htcondor-annex`: argument parsing, what each verb asks the helper (over a real Unix socket:
annex_gahp.transports.SocketServer with recording handlers, a protocol peer for the CLI rather
than the product's service), what it prints, and the condor_submit command `submit` runs."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import annex_gahp
from annex_gahp import cli
from annex_gahp.errors import NotFound, PermissionDenied
from annex_gahp.gahp import Caller, Dispatcher
from annex_gahp.transports import SocketServer

REPO = Path(__file__).resolve().parents[2]


def annex_view(now: int) -> dict:
    # Times are taken when the peer is made, not at import: a loaded machine may take minutes
    # between collecting this module and running a test, and "lease left" must not drift.
    return {
        "AnnexName": "gpu-burst",
        "Owner": "alice",
        "AnnexState": "running",
        "RequestedInstances": 4,
        "RunningInstances": 3,
        "PendingInstances": 1,
        "LeaseExpiration": now + 5400 + 30,  # shows 1h30m for the next 30 s
        "LastError": "",
    }


class Peer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        now = int(time.time())
        view = annex_view(now)
        self.answers: dict[str, dict[str, str] | Exception] = {
            "ANNEX_CREATE": {
                "name": "gpu-burst",
                "owner": "alice",
                "state": "requested",
                "requested": "4",
            },
            "ANNEX_EXTEND": {
                "name": "gpu-burst",
                "state": "running",
                "lease_expiration": str(now + 7200 + 30),
                "requested": "6",
            },
            "ANNEX_DELETE": {"name": "gpu-burst", "state": "retiring"},
            "ANNEX_STATUS": {
                "json": json.dumps(
                    {
                        **view,
                        "instances": [{"id": "i-0abc", "state": "running", "type": "m5.large"}],
                    }
                )
            },
            "ANNEX_LIST": {
                "json": json.dumps(
                    [
                        {**view, "CostSoFar": 1.5, "CostPerHour": 0.384, "Currency": "USD"},
                        {
                            **view,
                            "AnnexName": "old",
                            "AnnexState": "failed",
                            "LeaseExpiration": now - 10,
                            "LastError": "InsufficientInstanceCapacity:\nno m5.large",
                        },
                    ]
                )
            },
            "ANNEX_REPORT": {
                "json": json.dumps(
                    {
                        "since": now - 86400,
                        "until": now,
                        "by": "owner",
                        "rows": [
                            {"key": "alice", "cost": 1.5, "instance_hours": 15.625,
                             "currency": "USD", "unpriced": []},
                            {"key": "bob", "cost": 0.0, "instance_hours": 2.0,
                             "currency": "USD", "unpriced": ["c5.large on-demand in us-east-1"]},
                        ],
                        "total": {"key": "total", "cost": 1.5, "instance_hours": 17.625,
                                  "currency": "USD",
                                  "unpriced": ["c5.large on-demand in us-east-1"]},
                        "instances": 3,
                    }
                )
            },
        }  # fmt: skip

    def table(self) -> dict:
        def make(command: str):
            def handle(caller: Caller, args: dict[str, str]) -> dict[str, str]:
                with self.lock:
                    self.calls.append((command, args))
                answer = self.answers[command]
                if isinstance(answer, Exception):
                    raise answer
                return answer

            return handle

        return {c: make(c) for c in self.answers}


@pytest.fixture
def peer() -> Iterator[tuple[Peer, str]]:
    sockdir = Path(tempfile.mkdtemp(prefix="cl-", dir="/tmp"))
    p = Peer()
    # A short poll: shutdown waits up to one poll for the accept loop (1 s by default).
    server = SocketServer(str(sockdir / "annex.sock"), Dispatcher(p.table()), poll_interval=0.05)
    server.start()
    try:
        yield p, server.path
    finally:
        server.shutdown()
        shutil.rmtree(sockdir, ignore_errors=True)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_create_sends_the_spec_keywords(peer, capsys) -> None:
    p, path = peer
    code, out, err = run(
        [
            "--socket",
            path,
            "create",
            "--name",
            "gpu-burst",
            "--instances",
            "4",
            "--lease",
            "2h",
            "--instance-types",
            "m5.large,m5a.large",
            "--spot-prices",
            "0.1",
            "--region",
            "us-east-1",
            "--tags",
            "team=x",
        ],
        capsys,
    )
    assert (code, err) == (0, "")
    assert p.calls == [
        (
            "ANNEX_CREATE",
            {
                "name": "gpu-burst",
                "instances": "4",
                "lease": "2h",
                "instance_types": "m5.large,m5a.large",
                "spot_prices": "0.1",
                "region": "us-east-1",
                "tags": "team=x",
            },
        )
    ]
    assert out == "annex gpu-burst (owner alice): requested, 4 instance(s) requested\n"


def test_every_spec_keyword_has_an_option() -> None:
    from annex_gahp import names  # noqa: PLC0415

    offered = set(cli.SPEC_HELP) | {"lease", "expiry"}
    assert offered == set(names.JOB_ATTRS)


def test_socket_after_the_verb_and_owner(peer, capsys) -> None:
    p, path = peer
    code, _, _ = run(["delete", "--name", "gpu-burst", "--owner", "bob", "--socket", path], capsys)
    assert code == 0
    assert p.calls == [("ANNEX_DELETE", {"name": "gpu-burst", "owner": "bob"})]


def test_lease_and_expiry_exclude_each_other(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["create", "--name", "x", "--lease", "1h", "--expiry", "2030-01-01 00:00"])
    assert exc.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_name_is_required(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["create"])
    assert "--name" in capsys.readouterr().err


def test_extend(peer, capsys) -> None:
    p, path = peer
    code, out, _ = run(
        ["--socket", path, "extend", "--name", "gpu-burst", "--instances", "6", "--lease", "2h"],
        capsys,
    )
    assert code == 0
    assert p.calls == [("ANNEX_EXTEND", {"name": "gpu-burst", "lease": "2h", "instances": "6"})]
    assert out.startswith("annex gpu-burst: running, 6 instance(s) requested, lease left 2h00m")


def test_extend_needs_something(peer, capsys) -> None:
    p, path = peer
    code, out, err = run(["--socket", path, "extend", "--name", "gpu-burst"], capsys)
    assert (code, out) == (1, "")
    assert err == "htcondor-annex: extend needs --lease, --expiry or --instances\n"
    assert p.calls == []


def test_status_lists_a_table(peer, capsys) -> None:
    p, path = peer
    code, out, _ = run(["--socket", path, "status"], capsys)
    assert code == 0
    assert p.calls == [("ANNEX_LIST", {})]
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "OWNER",
        "STATE",
        "RUNNING/REQ",
        "LEASE",
        "LEFT",
        "COST",
        "LAST",
        "ERROR",
    ]
    assert "1.50 USD (+0.38/h)" in lines[1]
    assert lines[1].split()[:5] == ["gpu-burst", "alice", "running", "3/4", "1h30m"]
    assert lines[1].endswith("-")
    assert lines[2].split()[:5] == ["old", "alice", "failed", "3/4", "expired"]
    assert lines[2].endswith("InsufficientInstanceCapacity: no m5.large")


def test_status_one_annex_and_json(peer, capsys) -> None:
    p, path = peer
    code, out, _ = run(["--socket", path, "status", "--name", "gpu-burst"], capsys)
    assert code == 0
    assert "i-0abc  running  m5.large" in out
    code, out, _ = run(["--socket", path, "status", "--owner", "bob", "--json"], capsys)
    assert code == 0
    assert json.loads(out)[0]["AnnexName"] == "gpu-burst"
    assert p.calls == [
        ("ANNEX_STATUS", {"name": "gpu-burst"}),
        ("ANNEX_LIST", {"owner": "bob"}),
    ]


def test_status_one_annex_shows_its_join_failures(peer, capsys) -> None:
    p, path = peer
    answer = json.loads(p.answers["ANNEX_STATUS"]["json"]) | {"JoinFailures": 2}
    p.answers["ANNEX_STATUS"] = {"json": json.dumps(answer)}
    code, out, _ = run(["--socket", path, "status", "--name", "gpu-burst"], capsys)
    assert code == 0
    assert "join failures: 2 in a row" in out.splitlines()


def test_status_with_no_annexes(peer, capsys) -> None:
    p, path = peer
    p.answers["ANNEX_LIST"] = {"json": "[]"}
    assert run(["--socket", path, "status"], capsys)[:2] == (0, "no annexes\n")


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (NotFound("you have no annex named gpu-burst"), "you have no annex named gpu-burst"),
        (PermissionDenied("annex gpu-burst belongs to bob"), "annex gpu-burst belongs to bob"),
    ],
)
def test_helper_errors_are_one_line_and_exit_1(peer, capsys, error, message) -> None:
    p, path = peer
    p.answers["ANNEX_DELETE"] = error
    code, out, err = run(["--socket", path, "delete", "--name", "gpu-burst"], capsys)
    assert (code, out, err) == (1, "", f"htcondor-annex: {message}\n")


def test_helper_down(tmp_path, capsys) -> None:
    code, out, err = run(["--socket", str(tmp_path / "none.sock"), "status"], capsys)
    assert (code, out) == (1, "")
    assert err.startswith("htcondor-annex: annex_gahp is not running")


# -- submit ----------------------------------------------------------------------------------


def parse(argv: list[str]):
    parser = cli.build_parser()
    return parser.parse_args(argv)


def test_submit_command_line() -> None:
    args = parse(
        [
            "submit",
            "--annex-name",
            "gpu-burst",
            "--instances",
            "4",
            "--expiry",
            "2030-04-06 17:00",
            "--instance-types",
            "m5.large,m5a.large",
            "job.sub",
            "-batch-name",
            "my batch",
            "-a",
            "x = 1",
        ]
    )
    assert cli.submit_command(args) == [
        "condor_submit",
        "-append",
        "annex_name = gpu-burst",
        "-append",
        "annex_instances = 4",
        "-append",
        "annex_instance_types = m5.large,m5a.large",
        "-append",
        "annex_expiry = 2030-04-06 17:00",
        "job.sub",
        "-batch-name",
        "my batch",
        "-a",
        "x = 1",
    ]


def test_submit_minimal_and_double_dash() -> None:
    args = parse(["submit", "--annex-name", "a1", "job.sub", "--", "-spool"])
    assert cli.submit_command(args) == [
        "condor_submit",
        "-append",
        "annex_name = a1",
        "job.sub",
        "-spool",
    ]


def test_submit_refuses_multiline_values(capsys) -> None:
    code, _, err = run(["submit", "--annex-name", "a1\nqueue 100", "--dry-run", "j.sub"], capsys)
    assert code == 1
    assert "one line" in err


def test_submit_dry_run_prints_a_shell_line(capsys) -> None:
    code, out, _ = run(
        ["submit", "--annex-name", "a1", "--lease", "90m", "--dry-run", "j.sub"], capsys
    )
    assert code == 0
    assert out == "condor_submit -append 'annex_name = a1' -append 'annex_lease = 90m' j.sub\n"


def test_submit_runs_condor_submit_from_path(tmp_path, monkeypatch, capsys) -> None:
    # A recording condor_submit: this test is about the command line we hand to it.
    record = tmp_path / "argv.json"
    prog = tmp_path / "condor_submit"
    prog.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\nsys.exit(7)\n"
    )
    prog.chmod(prog.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    code, _, _ = run(
        ["submit", "--annex-name", "a1", "--instances", "2", "job.sub", "-terse"], capsys
    )
    assert code == 7
    assert json.loads(record.read_text()) == [
        "-append",
        "annex_name = a1",
        "-append",
        "annex_instances = 2",
        "job.sub",
        "-terse",
    ]


def test_submit_without_condor_submit(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = run(["submit", "--annex-name", "a1", "job.sub"], capsys)
    assert code == 1
    assert "condor_submit is not on PATH" in err


# -- admin verbs and import weight -----------------------------------------------------------


def test_admin_verbs_without_cli_admin(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "annex_gahp.cli_admin", None)
    # `from annex_gahp import cli_admin` takes the package's attribute first, set by any
    # earlier test in this process that imported it.
    monkeypatch.delattr(annex_gahp, "cli_admin", raising=False)
    code, _, err = run(["setup", "--region", "us-east-1"], capsys)
    assert code == 1
    assert err.startswith("htcondor-annex: the admin verbs are not available here")


def test_admin_verbs_come_from_cli_admin(capsys) -> None:
    pytest.importorskip("boto3")
    with pytest.raises(SystemExit) as exc:
        cli.main(["check-setup", "-h"])
    assert exc.value.code == 0
    assert "--stack-name" in capsys.readouterr().out


def test_help_lists_every_verb(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["-h"])
    out = capsys.readouterr().out
    for verb in ("create", "extend", "delete", "status", "submit", *cli.ADMIN_VERBS):
        assert verb in out


def test_cli_imports_no_cloud_or_condor_bindings() -> None:
    code = (
        "import sys\nfrom annex_gahp import cli\n"
        "try:\n    cli.main(['-h'])\nexcept SystemExit:\n    pass\n"
        "print('\\n'.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    ).stdout.split()
    heavy = [
        m
        for m in out
        if m.split(".")[0] in ("boto3", "botocore", "htcondor2", "classad2", "htcondor", "jinja2")
    ]
    assert heavy == []


def test_format_table_lease_column() -> None:
    rows = [
        {**annex_view(0), "LeaseExpiration": 1000 + 59},
        {**annex_view(0), "LeaseExpiration": 0},
        {**annex_view(0), "LeaseExpiration": 999},
    ]
    lines = cli.format_table(rows, now=1000).splitlines()
    assert [line.split()[4] for line in lines[1:]] == ["59s", "-", "expired"]


def test_status_shows_interruptions_replacements_and_avoided_pools() -> None:
    quiet = {"AnnexName": "a", "Interruptions": 0, "Replacements": 0, "AvoidedOfferings": []}
    assert cli.capacity_health_line(quiet) == ""
    busy = quiet | {
        "Interruptions": 2,
        "Replacements": 1,
        "AvoidedOfferings": ["m5.large/us-east-1a/spot", "c5.large/us-east-1/on-demand"],
    }
    assert cli.capacity_health_line(busy) == (
        "  interruptions 2, replacements 1, avoiding m5.large/us-east-1a/spot, "
        "c5.large/us-east-1/on-demand"
    )


def test_report_asks_the_helper_and_prints_csv(peer, capsys) -> None:
    p, path = peer
    code, out, _ = run(["--socket", path, "report", "--since", "1d", "--by", "owner", "--csv"],
                       capsys)  # fmt: skip
    assert code == 0
    assert p.calls == [("ANNEX_REPORT", {"since": "1d", "by": "owner"})]
    lines = out.splitlines()
    assert lines[0] == "owner,instance-hours,cost,currency,unpriced"
    assert lines[1] == "alice,15.6250,1.500000,USD,"
    assert lines[2] == "bob,2.0000,0.000000,USD,c5.large on-demand in us-east-1"
    assert lines[3].startswith("total,17.6250,1.500000,USD,")
    code, out, _ = run(["--socket", path, "report", "--by", "owner"], capsys)
    assert code == 0 and "alice" in out and "1.50" in out and out.startswith("cost from ")
