"""Annex tokens without root (issue 12, items 3 and 4): minting with the project's own key and
the annex's own identity, the admin's key step, the helper's privilege drop, the collector's
check, and the shape of what instances get (profile, policy, firewall rule).

Runs in the sandbox (real condor_token_create, root, a condor user); tests/e2e/
test_hostile_tokens.py proves the same on the running pool.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import subprocess
from pathlib import Path
from typing import Any

import classad2
import pytest

from annex_gahp import daemon, tokenkey, tokens, userdata
from annex_gahp.cloud.aws import fleet, policy, secrets, setup
from annex_gahp.errors import SetupError

SRC = Path(__file__).resolve().parents[2]
KEY = "annex"


def _claims(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    def part(text: str) -> dict[str, Any]:
        return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))

    header, payload, _sig = token.split(".")
    return part(header), part(payload)


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "key"
    directory.mkdir(mode=0o700)
    (directory / KEY).write_bytes(b"a-test-signing-key-of-our-own-0123456789")
    (directory / KEY).chmod(0o600)
    return directory


# --- minting -------------------------------------------------------------------------------


def test_identity_names_the_annex_and_owner_and_nothing_else() -> None:
    assert tokens.identity("a1", "alice", "annex.ap.test") == "annex.a1.alice@annex.ap.test"
    for annex, owner in (("a.b", "alice"), ("a1", "al@ice"), ("a1", "al ice"), ("1a", "x")):
        with pytest.raises(SetupError):
            tokens.identity(annex, owner, "annex.ap.test")
    # No (annex, owner) pair shares an identity with another: annex names have no '.'.
    assert tokens.identity("b-c", "alice", "d") != tokens.identity("c", "alice.b", "d")


@pytest.mark.condor_host
def test_mint_signs_with_the_project_key_as_this_user_never_setresuid(
    key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_root(*_args: object) -> None:
        raise AssertionError("tokens.mint tried to change uids")

    monkeypatch.setattr(os, "setresuid", no_root)
    monkeypatch.setattr(os, "setuid", no_root)
    who = tokens.identity("a1", "alice", "annex.ap.test")
    token = tokens.mint(who, 600, KEY, str(key_dir))
    header, payload = _claims(token)
    assert header["kid"] == KEY  # the project's key, not POOL
    assert payload["sub"] == who
    assert set(payload["scope"].split()) == {f"condor:/{a}" for a in tokens.AUTHZ}
    assert 0 < payload["exp"] - payload["iat"] <= 600
    cmd = tokens.command(who, 600, KEY)
    assert cmd[cmd.index("-key") + 1] == KEY and cmd[cmd.index("-identity") + 1] == who


def test_mint_refuses_a_key_others_can_read(key_dir: Path) -> None:
    (key_dir / KEY).chmod(0o640)
    with pytest.raises(SetupError, match="chmod 600"):
        tokens.mint("annex.a1.alice@d", 60, KEY, str(key_dir))
    with pytest.raises(SetupError, match="setup --token-key"):
        tokens.mint("annex.a1.alice@d", 60, "other", str(key_dir))


def test_tokens_module_has_no_way_back_to_root() -> None:
    text = (SRC / "annex_gahp" / "tokens.py").read_text()
    assert "setresuid" not in text and "preexec_fn" not in text


# --- the admin's key step ------------------------------------------------------------------


@pytest.mark.condor_host
def test_token_key_setup_makes_two_private_copies(tmp_path: Path) -> None:
    condor = pwd.getpwnam("condor")
    pool_dir, own_dir = tmp_path / "passwords.d", tmp_path / "annex-token-key"
    done = tokenkey.ensure(str(pool_dir), str(own_dir), KEY)
    assert "written" in done
    pool_key, own_key = pool_dir / KEY, own_dir / KEY
    assert pool_key.read_bytes() == own_key.read_bytes() and len(pool_key.read_bytes()) >= 32
    assert (pool_key.stat().st_uid, pool_key.stat().st_mode & 0o777) == (0, 0o600)
    assert (own_key.stat().st_uid, own_key.stat().st_mode & 0o777) == (condor.pw_uid, 0o600)
    assert own_dir.stat().st_mode & 0o777 == 0o700
    assert "already" in tokenkey.ensure(str(pool_dir), str(own_dir), KEY)
    # A copy readable by others is refused, not silently fixed.
    own_key.chmod(0o644)
    with pytest.raises(SetupError, match="chmod 600"):
        tokenkey.ensure(str(pool_dir), str(own_dir), KEY)


@pytest.mark.condor_host
def test_token_key_missing_copy_is_restored_from_the_other(tmp_path: Path) -> None:
    pool_dir, own_dir = tmp_path / "p", tmp_path / "o"
    tokenkey.ensure(str(pool_dir), str(own_dir), KEY)
    secret = (pool_dir / KEY).read_bytes()
    (own_dir / KEY).unlink()
    tokenkey.ensure(str(pool_dir), str(own_dir), KEY)
    assert (own_dir / KEY).read_bytes() == secret


# --- the helper's privilege drop -----------------------------------------------------------


@pytest.mark.condor_host
def test_drop_privileges_leaves_no_root_anywhere() -> None:
    condor = pwd.getpwnam("condor")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child drops, then tries to get root back
        os.close(read)
        try:
            daemon._drop_privileges()
            back = "no"
            try:
                os.setresuid(0, 0, 0)
                back = "yes"
            except PermissionError:
                pass
            report = {"uid": os.getresuid(), "gid": os.getresgid(), "back": back}
            os.write(write, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write)
    report = json.loads(os.read(read, 4096))
    os.waitpid(pid, 0)
    assert report == {
        "uid": [condor.pw_uid] * 3,
        "gid": [condor.pw_gid] * 3,
        "back": "no",
    }


# --- the collector's check -----------------------------------------------------------------


def _shipped_requirement(domain: str) -> str:
    conf = (SRC / "condor_config.d" / "10-annex-gahp.conf").read_text()
    (line,) = re.findall(r"^ANNEX_COLLECTOR_REQUIREMENTS = (.*)$", conf, re.MULTILINE)
    return line.replace("$(ANNEX_TOKEN_DOMAIN)", domain)


@pytest.mark.parametrize(
    ("identity", "annex", "owner", "accepted"),
    [
        ("annex.a1.alice@annex.ap", "a1", "alice", True),
        ("annex.a1.alice@annex.ap", "b1", "alice", False),  # another annex
        ("annex.a1.alice@annex.ap", "a1", "bob", False),  # another owner
        ("annex.a1.alice@annex.ap", None, None, False),  # no annex at all
        ("annex.a1.alice@annex.ap", "a1.alice@annex.ap", "", False),  # look-alike
        ("annex.a.b.c@annex.ap", "a", "b.c", True),  # owner "b.c" (legal) of annex "a"
        ("annex.a.b.c@annex.ap", "a.b", "c", False),  # ... may not claim "a.b" of "c"
        ("condor@ap", None, None, True),  # the pool's own daemons: not this check's business
        (None, None, None, True),  # unauthenticated: ALLOW lists decide
        ("x@evil.annex.ap", "x", "y", True),  # not our domain (suffix is exact, with '@')
    ],
)
def test_collector_requirement(identity, annex, owner, accepted) -> None:
    shipped = _shipped_requirement("annex.ap")
    assert shipped == "(" + tokens.requirement("annex.ap") + ")"
    ad = classad2.ClassAd({"MyType": "Machine"})
    for attr, value in (("AuthenticatedIdentity", identity), ("AnnexName", annex)):
        if value is not None:
            ad[attr] = value
    if owner is not None:
        ad["AnnexOwner"] = owner
    holder = classad2.ClassAd()
    holder["R"] = classad2.ExprTree(shipped)
    assert holder.lookup("R").eval(scope=holder, target=ad) is accepted


# --- what instances get --------------------------------------------------------------------


def _plan(**changes: Any) -> fleet.LaunchPlan:
    base = dict(
        annex="a1",
        owner="alice",
        request_id="r",
        pool_id="p",
        expires=1,
        count=1,
        instance_types=("m5.large",),
        image_ids=("ami-1",),
    )
    return fleet.LaunchPlan(**(base | changes))  # type: ignore[arg-type]


def test_provision_template_has_no_instance_profile_unless_the_admin_names_one() -> None:
    base = {"ImageId": "ami-1", "IamInstanceProfile": {"Arn": "arn:aws:iam::1:instance-profile/p"}}
    assert "IamInstanceProfile" not in fleet.annex_template_data(base, _plan(instance_profile=""))
    kept = fleet.annex_template_data(base, _plan())  # pool mode: the base's, to read its token
    assert kept["IamInstanceProfile"] == base["IamInstanceProfile"]
    named = fleet.annex_template_data(base, _plan(instance_profile="pilots"))
    assert named["IamInstanceProfile"] == {"Name": "pilots"}


def test_cloud_plans_provision_annexes_without_a_profile() -> None:
    text = (SRC / "annex_gahp" / "cloud" / "aws" / "context.py").read_text()
    assert 'self.settings.provision_instance_profile if wanted.mode == "provision"' in text


def test_instance_role_reads_only_its_own_instance_token() -> None:
    doc = policy.instance_role_policy_document("arn:aws:ssm:*:1:parameter/t/p/*")
    (statement,) = doc["Statement"]
    assert statement["Action"] == "ssm:GetParameter"
    assert statement["Condition"] == {
        "StringEquals": {f"ssm:resourceTag/{secrets.INSTANCE_TAG}": "${ec2:SourceInstanceARN}"}
    }


def test_setup_stack_grants_no_token_read_without_the_instance_condition() -> None:
    from aws_fixtures import make_settings  # noqa: PLC0415

    body = json.loads(setup.render_template(make_settings(), "s"))
    role = body["Resources"]["InstanceRole"]["Properties"]
    (doc,) = [p["PolicyDocument"] for p in role["Policies"]]
    actions = set()
    for statement in doc["Statement"]:  # every read of a token: only the caller's own copy
        actions.add(statement["Action"])
        assert statement["Effect"] == "Allow" and statement.get("Condition"), statement
        assert "${ec2:SourceInstanceARN}" in json.dumps(statement["Condition"])
    assert actions == {"ssm:GetParameter", "s3:GetObject"}
    (s3,) = [s for s in doc["Statement"] if s["Action"] == "s3:GetObject"]
    assert s3["Condition"] == {
        "StringEquals": {f"s3:ExistingObjectTag/{secrets.INSTANCE_TAG}": "${ec2:SourceInstanceARN}"}
    }


def test_instance_parameter_names_one_instance() -> None:
    assert secrets.instance_parameter("/t/p/alice/a1", "i-0123456789abcdef0") == (
        "/t/p/alice/a1/i-0123456789abcdef0"
    )
    for bad in ("../x", "i-1/..", "", "i-XYZ12345"):
        with pytest.raises(ValueError):
            secrets.instance_parameter("/t/p/alice/a1", bad)


def test_boot_script_firewalls_the_imds_it_uses(tmp_path: Path) -> None:
    ctx = userdata.BootContext(
        annex="a1",
        owner="alice",
        request_id="r",
        pool_id="p",
        central_manager="cm:9618",
        token_parameter="/t/p/alice/a1",  # noqa: S106 - a name
        region="us-east-1",
        aws_endpoint_url="",
        expires=2_000_000_000,
        owner_domain="ap.test",
    )
    script = userdata.render_bootstrap(ctx)
    assert 'iptables -A OUTPUT -d "$h" -m owner ! --uid-owner 0 -j REJECT' in script
    assert 'ip daddr "$h" meta skuid != 0 reject' in script
    # The host the rule targets is the IMDS in use: ANNEX_IMDS_URL's, else EC2's.
    part = script[script.index("h=$(") : script.index("\n", script.index("h=$("))]
    for url, host in (("", "169.254.169.254"), ("http://127.0.0.1:4711/", "127.0.0.1")):
        env = {"PATH": os.environ["PATH"]} | ({"ANNEX_IMDS_URL": url} if url else {})
        out = subprocess.run(
            ["sh", "-c", part + '\necho "$h"'], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == host
    # Where neither tool exists the log says so; the emulation switch skips the rule.
    assert "WARNING: no iptables/nft rule" in script
    assert '"${ANNEX_IMDS_FIREWALL:-}" = skip' in script


@pytest.mark.condor_host
def test_setup_token_key_verb_needs_no_aws(tmp_path: Path) -> None:
    """`htcondor-annex setup --token-key`: the key step alone, where the pool's config says."""
    env = dict(
        os.environ,
        _CONDOR_SEC_PASSWORD_DIRECTORY=str(tmp_path / "p"),
        _CONDOR_ANNEX_TOKEN_KEY_DIR=str(tmp_path / "o"),
        _CONDOR_ANNEX_AWS_ENDPOINT_URL="http://127.0.0.1:9",  # nothing listens: no AWS call
    )
    done = subprocess.run(
        ["htcondor-annex", "setup", "--token-key"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p" / KEY).read_bytes() == (tmp_path / "o" / KEY).read_bytes()
    assert "written" in done.stderr
