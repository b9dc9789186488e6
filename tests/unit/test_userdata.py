"""userdata.py and the instance agent: rendering, and a real run against moto + a fake IMDS."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import http.server
import importlib.util
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aws_fixtures import REGION, moto_server_url, moto_url, raw_client  # noqa: F401

from annex_gahp import userdata
from annex_gahp.errors import InputError

TOKEN = "eyJhbGciOiJIUzI1NiJ9.annex-token-for-test.sig"  # noqa: S105 - a fake token
PARAM = "/htcondor-annex/tokens/cm.test_9618-abcd/alice/a1"
# The instance's own copy (issue 12): the agent asks for PARAM/<its instance id>.
MINE = PARAM + "/i-0123456789abcdef0"
AGENT = Path(userdata.__file__).parent / "templates" / "annex-agent.py"


def context(**changes: Any) -> userdata.BootContext:
    base = userdata.BootContext(
        annex="a1",
        owner="alice",
        request_id="req-1",
        pool_id="cm.test:9618",
        central_manager="cm.test:9618",
        token_parameter=PARAM,
        region=REGION,
        aws_endpoint_url="http://127.0.0.1:5000",
        expires=2_000_000_000,
        owner_domain="ap.test",
    )
    return dataclasses.replace(base, **changes)


# --- rendering ---------------------------------------------------------------------------------


def test_script_is_valid_sh_small_and_secret_free(tmp_path: Path) -> None:
    script = userdata.render_bootstrap(context())
    path = tmp_path / "boot.sh"
    path.write_text(script)
    subprocess.run(["sh", "-n", str(path)], check=True)
    assert script.startswith("#!/bin/sh\n")
    # With the stock-image install step the script passed 16 KB: the user data is gzipped
    # (cloud-init and the sandbox's booter unpack it), and must fit EC2's limit so.
    data = userdata.render_user_data(context())
    assert len(data) <= userdata.USER_DATA_LIMIT
    assert userdata.decode_user_data(data) == script
    assert PARAM in script
    assert "eyJ" not in script  # no IDTOKEN (JWTs start with eyJ)
    assert "SecretAccessKey" not in script.split("ANNEX_AGENT_EOF")[0]
    assert "{{" not in script.split("ANNEX_AGENT_EOF")[-1]


def test_condor_config_contents() -> None:
    text = userdata.render_condor_config(context())
    lines = {
        line.split("=", 1)[0].strip(): line.split("=", 1)[1].strip()
        for line in text.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert lines["CONDOR_HOST"] == "cm.test"
    assert lines["COLLECTOR_HOST"] == "cm.test:9618"
    assert lines["DAEMON_LIST"] == "MASTER STARTD"
    assert lines["USE_SHARED_PORT"] == "False"
    assert lines["SEC_USE_FAMILY_SESSION"] == "False"
    assert lines["MOUNT_UNDER_SCRATCH"] == ""
    assert lines["AnnexName"] == '"a1"'
    assert lines["IsAnnex"] == "True"
    assert lines["AnnexOwner"] == '"alice"'
    assert "AnnexName IsAnnex AnnexOwner AnnexRequest" in lines["STARTD_ATTRS"]
    # By User (owner@the access point's UID_DOMAIN), not Owner: a same-named owner of another
    # schedd or a flocked pool does not match.
    assert lines["START"] == (
        '(TARGET.TargetAnnexName =?= "a1") && (TARGET.User =?= "alice@ap.test")'
    )
    assert "Owner" not in lines["START"]
    assert "AnnexName AnnexOwner" in lines["MASTER_ATTRS"]
    assert lines["SEC_TOKEN_DIRECTORY"] == "/etc/condor/tokens.d"  # noqa: S105 - a path
    assert lines["CCB_ADDRESS"] == "$(COLLECTOR_HOST)"
    assert "CCB_ADDRESS" not in userdata.render_condor_config(context(ccb=False))


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("cm.test:9618", "cm.test"),
        ("cm.test", "cm.test"),
        ("cm.test:9618?sock=collector", "cm.test"),
        ("<10.0.0.5:9618?sock=collector>", "10.0.0.5"),
        ("[fe80::1]:9618", "fe80::1"),
        ("127.0.0.1:40123", "127.0.0.1"),
    ],
)
def test_condor_host_from_collector_address(address: str, host: str) -> None:
    ctx = context(central_manager=address, pool_id=address)
    assert ctx.condor_host == host
    assert f"COLLECTOR_HOST = {address}\n" in userdata.render_condor_config(ctx)


@pytest.mark.parametrize(
    "change",
    [
        {"annex": "bad name"},
        {"owner": 'al"ice'},
        {"central_manager": "cm$(X)"},
        {"token_parameter": "/x\n/y"},
        {"aws_endpoint_url": "http://x' ; rm -rf /"},
    ],
)
def test_refuses_what_a_script_cannot_carry(change: dict[str, str]) -> None:
    with pytest.raises(InputError):
        userdata.render_bootstrap(context(**change))


def test_big_script_is_gzipped_and_decodes() -> None:
    extra = "\n".join(f"# padding line {n} " + "x" * 60 for n in range(120))
    ctx = context(extra_config=extra)
    data = userdata.render_user_data(ctx)
    assert data[:2] == userdata.GZIP_MAGIC
    assert len(data) <= userdata.USER_DATA_LIMIT
    script = userdata.render_bootstrap(ctx)
    assert gzip.decompress(data).decode() == script
    assert userdata.decode_user_data(data) == script
    assert userdata.decode_user_data(base64.b64encode(data).decode()) == script


# --- a fake IMDSv2 ----------------------------------------------------------------------------


@dataclasses.dataclass
class FakeImds:
    url: str
    tags: dict[str, str]
    calls: list[str]
    # More paths under latest/ and their answers (a spot notice, ...).
    more: dict[str, str] = dataclasses.field(default_factory=dict)


@pytest.fixture
def imds() -> Iterator[FakeImds]:
    state = FakeImds("", {}, [])
    session_token = "imds-session-token"  # noqa: S105

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def _reply(self, code: int, body: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            state.calls.append("PUT " + self.path)
            if self.path == "/latest/api/token" and self.headers.get(
                "X-aws-ec2-metadata-token-ttl-seconds"
            ):
                self._reply(200, session_token)
            else:
                self._reply(400, "bad")

        def do_GET(self) -> None:
            state.calls.append("GET " + self.path)
            if self.headers.get("X-aws-ec2-metadata-token") != session_token:
                self._reply(401, "IMDSv2 only")
                return
            path = self.path[len("/latest/") :]
            answers = {
                "meta-data/instance-id": "i-0123456789abcdef0",
                "meta-data/placement/region": REGION,
                "meta-data/iam/security-credentials/": "annex-instance-role",
                "meta-data/iam/security-credentials/annex-instance-role": json.dumps(
                    {
                        "Code": "Success",
                        "AccessKeyId": "ASIAFAKEINSTANCEKEY0",
                        "SecretAccessKey": "fake-instance-secret",
                        "Token": "fake-session-token",
                    }
                ),
            }
            for key, value in state.tags.items():
                answers[f"meta-data/tags/instance/{key}"] = value
            answers.update(state.more)
            if path in answers:
                self._reply(200, answers[path])
            else:
                self._reply(404, "Not Found")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # An agent still polling holds a connection open; its handler thread need not be waited for.
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def load_agent() -> Any:
    spec = importlib.util.spec_from_file_location("annex_agent_under_test", AGENT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agent_sigv4_matches_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hand-written signature equals botocore's for the same request and time."""
    import datetime as dt  # noqa: PLC0415

    from botocore.auth import SigV4Auth  # noqa: PLC0415
    from botocore.awsrequest import AWSRequest  # noqa: PLC0415
    from botocore.credentials import Credentials  # noqa: PLC0415

    agent = load_agent()
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    url = "https://ssm.us-east-1.amazonaws.com/"
    body = b'{"Name": "/x", "WithDecryption": true}'
    creds = {"AccessKeyId": "AKID", "SecretAccessKey": "SECRET", "Token": "TOK"}
    ours = agent.sigv4_headers(
        url,
        body,
        region="us-east-1",
        service="ssm",
        target="AmazonSSM.GetParameter",
        creds=creds,
        now=when,
    )
    request = AWSRequest(
        method="POST",
        url=url,
        data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "AmazonSSM.GetParameter",
            "X-Amz-Date": when.strftime("%Y%m%dT%H%M%SZ"),
        },
    )

    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda: when)
    SigV4Auth(Credentials("AKID", "SECRET", "TOK"), "ssm", "us-east-1").add_auth(request)
    theirs = request.headers["Authorization"]
    assert ours["authorization"] == theirs


def _agent_env(tmp_path: Path, imds: FakeImds, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ["PATH"],
        "ANNEX_AGENT_ROOT": str(tmp_path / "root"),
        "ANNEX_IMDS_URL": imds.url,
        "ANNEX_AGENT_FETCH_TIMEOUT": "5",
    }
    env.update(extra)
    return env


def _write_boot_json(root: Path, ctx: userdata.BootContext) -> None:
    state = root / "etc" / "htcondor-annex"
    state.mkdir(parents=True, exist_ok=True)
    (state / "boot.json").write_text(json.dumps(userdata.boot_settings(ctx)))


def test_agent_fetches_token_from_moto(tmp_path: Path, imds: FakeImds, moto_url: str) -> None:  # noqa: F811
    ssm = raw_client("ssm", moto_url)
    ssm.put_parameter(Name=MINE, Value=TOKEN, Type="SecureString")
    for other in (PARAM, PARAM + "/i-0fedcba9876543210"):  # not this instance's
        ssm.put_parameter(Name=other, Value="not-mine", Type="SecureString")
    _write_boot_json(tmp_path / "root", context(aws_endpoint_url=moto_url))
    done = subprocess.run(
        [sys.executable, str(AGENT), "fetch-token"],
        env=_agent_env(tmp_path, imds),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    token_file = tmp_path / "root" / "etc" / "condor" / "tokens.d" / "annex"
    assert token_file.read_text().strip() == TOKEN
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert TOKEN not in done.stderr and TOKEN not in done.stdout
    assert imds.calls[0] == "PUT /latest/api/token"


def test_agent_reports_missing_parameter(tmp_path: Path, imds: FakeImds, moto_url: str) -> None:  # noqa: F811
    _write_boot_json(tmp_path / "root", context(aws_endpoint_url=moto_url))
    done = subprocess.run(
        [sys.executable, str(AGENT), "fetch-token"],
        env=_agent_env(tmp_path, imds, ANNEX_AGENT_FETCH_TIMEOUT="1"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "ParameterNotFound" in done.stderr


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_whole_script_boots_extends_and_powers_off(
    tmp_path: Path,
    imds: FakeImds,
    moto_url: str,  # noqa: F811
) -> None:
    """Run the rendered script as user data would be run: token, config, start, lease."""
    ssm = raw_client("ssm", moto_url)
    ssm.put_parameter(Name=MINE, Value=TOKEN, Type="SecureString")
    now = int(time.time())
    imds.tags["htcondor-annex:expires"] = str(now + 3)
    ctx = context(aws_endpoint_url=moto_url, expires=now + 3)
    script = tmp_path / "user-data"
    script.write_text(userdata.decode_user_data(userdata.render_user_data(ctx)))
    root = tmp_path / "root"
    env = _agent_env(
        tmp_path,
        imds,
        ANNEX_CONDOR_START_CMD=f"touch {root}/condor-started",
        ANNEX_POWEROFF_CMD=f"touch {root}/powered-off",
        ANNEX_AGENT_INTERVAL="0.2",
    )
    # An image with HTCondor: the install step is skipped.
    env["PATH"] = f"{_fake_condor(tmp_path / 'condor-bin')}:{env['PATH']}"
    done = subprocess.run(
        ["sh", str(script)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    log = (root / "var/log/htcondor-annex-agent.log").read_text()
    assert done.returncode == 0, done.stderr + log
    assert (root / "condor-started").exists()
    assert (root / "etc/condor/tokens.d/annex").read_text().strip() == TOKEN
    config = (root / "etc/condor/config.d/50-annex.conf").read_text()
    assert 'AnnexName = "a1"' in config
    assert 'AnnexInstanceId = "i-0123456789abcdef0"' in config
    assert os.access(root / "usr/local/libexec/htcondor-annex-agent", os.X_OK)

    # The helper extends the lease: new token in SSM, later expiry tag; the agent re-fetches.
    ssm.put_parameter(Name=MINE, Value=TOKEN + "-extended", Type="SecureString", Overwrite=True)
    imds.tags["htcondor-annex:expires"] = str(now + 6)
    token_file = root / "etc/condor/tokens.d/annex"
    _wait_for(lambda: "extended" in token_file.read_text(), 10, "the token refresh")
    assert not (root / "powered-off").exists()
    _wait_for((root / "powered-off").exists, 15, "power-off at the lease end")
    log = (root / "var/log/htcondor-annex-agent.log").read_text()
    assert "lease extended" in log
    assert "HTCondor 23.9.6 is installed: no install step" in log
    assert TOKEN not in log


# --- stock images: HTCondor installed at first boot (issue 15) --------------------------------

FAKE_VERSION = "$CondorVersion: 23.9.6 2024-07-01 BuildID: Debian-23.9.6 PackageID: 23.9.6 $"


def _fake_condor(bin_dir: Path) -> Path:
    """A folder with condor_master and condor_version as an installed HTCondor has them."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "condor_master").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "condor_version").write_text(f"#!/bin/sh\necho '{FAKE_VERSION}'\n")
    for name in ("condor_master", "condor_version"):
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_install_step_rendered_for_apt_or_the_admins_command(tmp_path: Path) -> None:
    default = userdata.render_bootstrap(context())
    assert "install --no-install-recommends \"$pkg\"" in default
    assert "ANNEX_CONDOR_INSTALL_COMMAND" in default  # named in the failure message
    # A hostile-looking admin value stays one single-quoted word for `sh -c`.
    command = "dnf -y install condor; echo 'it''s' \"$HOME\" `id` $(id)\nexit 0"
    script = userdata.render_bootstrap(context(condor_install_command=command))
    assert "/bin/sh -c " + shlex.quote(command) + " </dev/null" in script
    assert "apt-get -q -y" not in script
    path = tmp_path / "boot.sh"
    path.write_text(script)
    subprocess.run(["sh", "-n", str(path)], check=True)
    with pytest.raises(InputError, match="ANNEX_CONDOR_INSTALL_COMMAND"):
        userdata.render_bootstrap(context(condor_install_command="a\0b"))


def _without_condor(path: str, shims: Path) -> list[str]:
    """PATH's folders, each one that holds condor_master replaced by links to its other
    programs (everything but condor_*), so a boot script finds no HTCondor but the rest."""
    out = []
    for folder in filter(None, path.split(os.pathsep)):
        if not (Path(folder) / "condor_master").exists():
            out.append(folder)
            continue
        shim = shims / str(len(out))
        shim.mkdir(parents=True, exist_ok=True)
        for program in Path(folder).iterdir():
            if not program.name.startswith("condor_"):
                (shim / program.name).symlink_to(program)
        out.append(str(shim))
    return out


def _run_stock_boot(
    tmp_path: Path, imds: FakeImds, ctx: userdata.BootContext
) -> tuple[subprocess.CompletedProcess[str], str]:
    root = tmp_path / "root"
    script = tmp_path / "user-data"
    script.write_text(userdata.decode_user_data(userdata.render_user_data(ctx)))
    env = _agent_env(
        tmp_path,
        imds,
        ANNEX_CONDOR_START_CMD=f"touch {root}/condor-started",
        ANNEX_POWEROFF_CMD="true",
        ANNEX_AGENT_INTERVAL="0.2",
    )
    # Only the folder the install command fills, then the system's without HTCondor: where the
    # tests run beside a pool (the sandbox's no-pool run), condor_master is in /usr/sbin.
    env["PATH"] = os.pathsep.join(
        [str(tmp_path / "condor-bin"), *_without_condor(env["PATH"], tmp_path / "no-condor")]
    )
    done = subprocess.run(
        ["sh", str(script)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    log_file = root / "var/log/htcondor-annex-agent.log"
    return done, log_file.read_text() if log_file.exists() else ""


def test_stock_image_installs_condor_first_and_logs_its_time(
    tmp_path: Path,
    imds: FakeImds,
    moto_url: str,  # noqa: F811
) -> None:
    raw_client("ssm", moto_url).put_parameter(Name=MINE, Value=TOKEN, Type="SecureString")
    staged = _fake_condor(tmp_path / "package")  # what the "package" brings
    marker = tmp_path / "install-ran"
    bin_dir = tmp_path / "condor-bin"
    install = f"sleep 1 && mkdir -p '{bin_dir}' && cp -a '{staged}'/. '{bin_dir}'/"
    install += f" && touch {marker}"
    ctx = context(
        aws_endpoint_url=moto_url, expires=int(time.time()) + 2, condor_install_command=install
    )
    done, log = _run_stock_boot(tmp_path, imds, ctx)
    assert done.returncode == 0, done.stderr + log
    assert marker.exists()
    assert "HTCondor not found: installing it with ANNEX_CONDOR_INSTALL_COMMAND" in log
    assert re.search(r"HTCondor 23\.9\.6 installed in [1-9][0-9]* s", log), log
    # Installed before HTCondor starts: the install line comes before the agent's boot lines.
    assert log.index("installed in") < log.index("booting")
    assert (tmp_path / "root/condor-started").exists()


def test_failed_install_fails_fast_on_the_console(tmp_path: Path, imds: FakeImds) -> None:
    ctx = context(expires=int(time.time()) + 1, condor_install_command="echo no repo; exit 3")
    started = time.time()
    done, log = _run_stock_boot(tmp_path, imds, ctx)
    assert done.returncode == 1
    assert time.time() - started < 20
    assert "ERROR: installing HTCondor failed (status 3, condor_master missing)" in done.stderr
    assert "no repo" in done.stderr  # the install's own last lines reach the console too
    assert "installing HTCondor failed" in log
    assert not (tmp_path / "root/condor-started").exists()
    assert not (tmp_path / "root/usr/sbin/policy-rc.d").exists()


def test_agent_publishes_a_spot_notice_for_the_startd(tmp_path: Path, imds: FakeImds) -> None:
    """`watch` polls IMDS's instance-action every ANNEX_AGENT_SPOT_INTERVAL: nothing while
    there is no notice; then the startd's cron file carries AnnexInterruption (the time it saw
    the notice) and the action, and the config written at boot makes the startd act on it."""
    root = tmp_path / "root"
    ctx = context(expires=int(time.time()) + 3600)
    _write_boot_json(root, ctx)
    env = _agent_env(tmp_path, imds, ANNEX_AGENT_SPOT_INTERVAL="0.2", ANNEX_AGENT_INTERVAL="60")
    notice = root / "etc/htcondor-annex/interruption.ad"
    agent = subprocess.Popen(
        [sys.executable, str(AGENT), "watch"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(
            lambda: imds.calls.count("GET /latest/meta-data/spot/instance-action") >= 2,
            10,
            "two looks at the notice",
        )
        assert not notice.exists() or notice.read_text() == ""
        before = int(time.time())
        imds.more["meta-data/spot/instance-action"] = json.dumps(
            {"action": "terminate", "time": "2026-12-05T08:00:00Z"}
        )
        imds.more["meta-data/events/recommendations/rebalance"] = json.dumps(
            {"noticeTime": "2026-12-05T07:58:00Z"}
        )
        _wait_for(lambda: notice.exists() and notice.read_text() != "", 10, "the notice file")
        lines = dict(
            line.split(" = ", 1) for line in notice.read_text().splitlines() if line.strip()
        )
        assert before <= int(lines["AnnexInterruption"]) <= int(time.time())
        assert lines["AnnexInterruptionAction"] == '"terminate"'
    finally:
        agent.terminate()
        _, err = agent.communicate(timeout=10)
    assert "spot interruption notice" in err and "rebalance recommendation" in err
    config = load_agent().interruption_config()
    assert "STARTD_CRON_ANNEXSPOT_ARGS = /etc/htcondor-annex/interruption.ad" in config
    assert "START = ($(START)) && (MY.AnnexInterruption =?= undefined)" in config


def test_agent_notice_lines_take_only_known_actions() -> None:
    agent = load_agent()
    assert agent.notice_lines('{"action": "stop"}', 7.9) == (
        'AnnexInterruption = 7\nAnnexInterruptionAction = "stop"\n'
    )
    # IMDS text is not copied into the startd's ClassAd beyond the known words.
    hostile = json.dumps({"action": 'terminate"\nSTART = True'})
    assert agent.notice_lines(hostile, 1) == "AnnexInterruption = 1\n"
    assert agent.notice_lines("not json", 1) == "AnnexInterruption = 1\n"
