"""aws/setup.py and aws/lease_enforcer.py against a real moto server."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aws_fixtures import (  # noqa: F401
    default_image,
    make_settings,
    moto_server_url,
    moto_url,
    raw_client,
)

from annex_gahp import names
from annex_gahp.cloud.aws import fleet, instances, lease_enforcer, secrets, session, setup
from annex_gahp.errors import SetupError


@pytest.fixture
def knobs_settings(moto_url: str):  # noqa: F811
    return make_settings(moto_url, default_image_id=default_image(moto_url))


def _with_knobs(settings, knobs: dict[str, str]):
    return dataclasses.replace(
        settings,
        launch_template=knobs["ANNEX_LAUNCH_TEMPLATE"],
        instance_profile=knobs["ANNEX_INSTANCE_PROFILE"],
        security_group=knobs["ANNEX_SECURITY_GROUP"],
        token_parameter_prefix=knobs["ANNEX_TOKEN_PARAMETER_PREFIX"],
    )


def test_template_renders_valid_json(knobs_settings) -> None:
    body = json.loads(setup.render_template(knobs_settings, "s1"))
    kinds = {r["Type"] for r in body["Resources"].values()}
    assert kinds == {
        "AWS::IAM::Role",
        "AWS::IAM::InstanceProfile",
        "AWS::EC2::SecurityGroup",
        "AWS::EC2::LaunchTemplate",
        "AWS::IAM::ManagedPolicy",
        "AWS::Lambda::Function",
        "AWS::Events::Rule",
        "AWS::Lambda::Permission",
    }
    code = body["Resources"]["LeaseEnforcer"]["Properties"]["Code"]["ZipFile"]
    assert "def handler(event, context)" in code
    data = body["Resources"]["BaseLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["ImageId"] == knobs_settings.default_image_id


def test_setup_check_teardown(knobs_settings, tmp_path) -> None:
    clients = setup.admin_clients(knobs_settings)
    assert setup.check(knobs_settings, clients=clients)[0].endswith("run `htcondor-annex setup`")
    knobs = setup.deploy(knobs_settings, clients=clients)
    stack = setup.default_stack_name(knobs_settings.pool_id)
    assert knobs["ANNEX_SETUP_STACK"] == stack == "htcondor-annex-cm-test-9618"
    assert knobs["ANNEX_LAUNCH_TEMPLATE"] == f"{stack}-base"
    assert knobs["ANNEX_SECURITY_GROUP"].startswith("sg-")
    assert knobs["ANNEX_RUNTIME_POLICY_ARN"].startswith("arn:aws:iam::")
    assert knobs["ANNEX_INSTANCE_PROFILE"]
    assert knobs["ANNEX_LEASE_ENFORCER"]
    # The helper's knobs are not written yet: check says so, precisely.
    problems = setup.check(knobs_settings, clients=clients)
    assert any(p.startswith("ANNEX_LAUNCH_TEMPLATE = ''") for p in problems), problems
    configured = _with_knobs(knobs_settings, knobs)
    assert setup.check(configured, clients=clients) == []
    # Idempotent: a second deploy changes nothing and returns the same knobs.
    assert setup.deploy(configured, clients=clients) == knobs

    # The config file the helper reads.
    path = tmp_path / "15-annex-setup.conf"
    setup.write_config(knobs, str(path))
    text = path.read_text()
    assert f"ANNEX_LAUNCH_TEMPLATE = {knobs['ANNEX_LAUNCH_TEMPLATE']}\n" in text

    # Drift: someone deletes the security group's template default and the lease schedule.
    clients.events.disable_rule(Name=clients.events.list_rules()["Rules"][0]["Name"])
    clients.ec2.create_launch_template_version(
        LaunchTemplateName=knobs["ANNEX_LAUNCH_TEMPLATE"],
        LaunchTemplateData={"ImageId": knobs_settings.default_image_id},
    )
    clients.ec2.modify_launch_template(
        LaunchTemplateName=knobs["ANNEX_LAUNCH_TEMPLATE"], DefaultVersion="2"
    )
    problems = setup.check(configured, clients=clients)
    assert any("schedule" in p and "DISABLED" in p for p in problems), problems
    assert any("HttpTokens is None, should be 'required'" in p for p in problems), problems

    # Teardown refuses while an annex runs, then is forced.
    ec2 = session.client("ec2", configured)
    plan = fleet.LaunchPlan(
        annex="a1",
        owner="alice",
        request_id="r1",
        pool_id=configured.pool_id,
        expires=int(time.time()) + 600,
        count=1,
        instance_types=("m5.large",),
        user_data="#!/bin/sh\n",
    )
    clients.ec2.modify_launch_template(
        LaunchTemplateName=knobs["ANNEX_LAUNCH_TEMPLATE"], DefaultVersion="1"
    )
    launched = fleet.launch(ec2, plan, configured.launch_template)
    assert launched.instance_ids
    token = secrets.parameter_name(
        configured.token_parameter_prefix, configured.pool_id, "alice", "a1"
    )
    secrets.put_token(clients.ssm, token, "fake-token", {names.TAG_POOL: configured.pool_id})
    with pytest.raises(SetupError, match=r"alice/a1.*--force"):
        setup.teardown(configured, clients=clients)
    clients.iam.create_user(UserName="annex-helper")
    clients.iam.attach_user_policy(
        UserName="annex-helper", PolicyArn=knobs["ANNEX_RUNTIME_POLICY_ARN"]
    )
    removed = setup.teardown(configured, clients=clients, force=True)
    assert removed["detached"] == ["user/annex-helper"]
    assert removed["instances"] == launched.instance_ids
    assert removed["parameters"] == [token]
    assert removed["launch_templates"] == [fleet.template_name(configured.pool_id, "alice", "a1")]
    assert removed["stack"] == [stack]
    # Nothing of the setup is left (moto leaves the managed policy; teardown removes it).
    assert clients.lambda_.list_functions()["Functions"] == []
    assert clients.events.list_rules()["Rules"] == []
    assert [
        p for p in clients.iam.list_policies(Scope="Local")["Policies"] if "Runtime" in p["Arn"]
    ] == []
    assert clients.ec2.describe_launch_templates()["LaunchTemplates"] == []
    assert setup.check(configured, clients=clients)[0].startswith("setup stack")


def _tagged_instance(url: str, pool: str, expires: Any) -> str:
    tags = [{"Key": names.TAG_POOL, "Value": pool}]
    if expires is not None:
        tags.append({"Key": names.TAG_EXPIRES, "Value": str(expires)})
    done = raw_client("ec2", url).run_instances(
        ImageId=default_image(url),
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )
    return done["Instances"][0]["InstanceId"]


def test_lease_enforcer_handler(moto_url: str) -> None:  # noqa: F811
    now = int(time.time())
    past = _tagged_instance(moto_url, "p1", now - 100)
    within_grace = _tagged_instance(moto_url, "p1", now - 10)
    future = _tagged_instance(moto_url, "p1", now + 3600)
    untagged = _tagged_instance(moto_url, "p1", None)
    other_pool = _tagged_instance(moto_url, "p2", now - 100)
    result = lease_enforcer.handler(
        {"pool_id": "p1", "grace": 60, "endpoint_url": moto_url, "region": "us-east-1"}, None
    )
    assert result == {"pool_id": "p1", "terminated": [past]}
    ec2 = raw_client("ec2", moto_url)
    states = {
        i["InstanceId"]: i["State"]["Name"]
        for r in ec2.describe_instances()["Reservations"]
        for i in r["Instances"]
    }
    assert states[past] == "terminated"
    for alive in (within_grace, future, untagged, other_pool):
        assert states[alive] in ("pending", "running")
    later = lease_enforcer.handler(
        {"pool_id": "p1", "now": now + 7200, "endpoint_url": moto_url, "region": "us-east-1"},
        None,
    )
    assert sorted(later["terminated"]) == sorted([within_grace, future])
    assert instances.describe_pool(ec2, "p2")[0].id == other_pool


@pytest.fixture
def cli_admin() -> Iterator[Any]:
    """annex_gahp.cli_admin, unloaded again afterwards if it was not loaded before: other
    tests check how the CLI behaves when that module cannot be imported."""
    import annex_gahp  # noqa: PLC0415

    loaded = "annex_gahp.cli_admin" in sys.modules
    module = importlib.import_module("annex_gahp.cli_admin")
    yield module
    if not loaded:
        sys.modules.pop("annex_gahp.cli_admin", None)
        if hasattr(annex_gahp, "cli_admin"):
            delattr(annex_gahp, "cli_admin")


@pytest.mark.condor_host
def test_cli_verbs(cli_admin, knobs_settings, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli_admin, "load_settings", lambda: knobs_settings)
    path = tmp_path / "config.d" / "15-annex-setup.conf"
    assert cli_admin.main(["setup", "--write-config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "ANNEX_LAUNCH_TEMPLATE = htcondor-annex-cm-test-9618-base" in printed
    assert path.read_text() == printed
    # The helper has not read the file yet: check-setup fails and says why.
    assert cli_admin.main(["check-setup"]) == 1
    assert "PROBLEM: ANNEX_LAUNCH_TEMPLATE = ''" in capsys.readouterr().out
    knobs = dict(line.split(" = ", 1) for line in path.read_text().splitlines() if " = " in line)
    monkeypatch.setattr(cli_admin, "load_settings", lambda: _with_knobs(knobs_settings, knobs))
    assert cli_admin.main(["check-setup"]) == 0
    assert "setup OK" in capsys.readouterr().out
    assert cli_admin.main(["teardown"]) == 0
    assert "removed stack: htcondor-annex-cm-test-9618" in capsys.readouterr().out
    assert cli_admin.main(["check-setup"]) == 1


def test_cli_without_condor_bindings(cli_admin, monkeypatch, capsys) -> None:
    def no_bindings() -> None:
        raise ModuleNotFoundError("No module named 'htcondor2'")

    monkeypatch.setattr(cli_admin, "load_settings", no_bindings)
    assert cli_admin.main(["check-setup"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("htcondor-annex check-setup: ERROR: cannot read the HTCondor config")
    assert "htcondor2" in err


def test_cli_write_config_default_path(cli_admin) -> None:
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    cli_admin.add_parsers(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["setup", "--write-config"])
    assert args.write_config == "/etc/condor/config.d/15-annex-setup.conf"
    assert cli_admin.DEFAULT_CONFIG_PATH == setup.DEFAULT_CONFIG_PATH
    assert parser.parse_args(["setup"]).write_config is None
    assert parser.parse_args(["teardown", "--force"]).force is True
