"""Least privilege, checked two ways.

1. Under moto's IAM enforcement (a moto server process of its own, started with
   INITIAL_NO_AUTH_ACTION_COUNT): a user holding only the runtime policy can launch, describe,
   tag, terminate and store tokens with either strategy (EC2 Fleet; a CloudFormation stack of
   Auto Scaling groups with its S3 token bucket), and is refused the setup's kind of actions.
   moto checks actions only (every non-S3 resource is `*`, conditions are ignored; S3 calls
   are checked against their bucket/object ARNs), so the policy is deployed in its emulator
   form there.
2. The real (AWS) form's shape: tag conditions on every create/change statement, ARN scoping
   where tags cannot be used.
The same server verifies SigV4 signatures, so the instance agent's hand-made signature is
checked there by a real verifier.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from aws_fixtures import REGION, free_port, make_settings, small_ami_catalogue
from botocore.exceptions import ClientError

from annex_gahp import names, userdata
from annex_gahp.cloud.aws import fleet, instances, policy, secrets, session, setup, stack
from annex_gahp.errors import CloudError

POOL = "cm.test:9618"
AGENT = Path(userdata.__file__).parent / "templates" / "annex-agent.py"


@pytest.fixture(scope="module")
def enforcing_moto(tmp_path_factory) -> Iterator[str]:
    """A moto server that authenticates and authorises every request after the first 3."""
    port = free_port()
    amis = small_ami_catalogue(tmp_path_factory.mktemp("moto") / "amis.json")
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3", MOTO_AMIS_PATH=str(amis))
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 20
    while time.time() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            break
        time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def _session(key: dict[str, str]) -> boto3.session.Session:
    return boto3.session.Session(
        aws_access_key_id=key["AccessKeyId"],
        aws_secret_access_key=key["SecretAccessKey"],
        region_name=REGION,
    )


def _user_with(iam: Any, name: str) -> dict[str, str]:
    iam.create_user(UserName=name)
    return iam.create_access_key(UserName=name)["AccessKey"]


@pytest.fixture(scope="module")
def world(enforcing_moto: str, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Admin (bootstrapped in the 3 unauthenticated calls), the setup stack, a runtime user."""
    with pytest.MonkeyPatch.context() as env:
        # The host's own AWS files must not leak in.
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path_factory.mktemp("c") / "none"))
        env.setenv("AWS_CONFIG_FILE", str(tmp_path_factory.mktemp("c") / "none"))
        yield _world(enforcing_moto)


def _world(enforcing_moto: str) -> dict[str, Any]:
    anon = boto3.client(
        "iam",
        endpoint_url=enforcing_moto,
        region_name=REGION,
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",  # noqa: S106 - moto, before auth is on
    )
    anon.create_user(UserName="admin")
    anon.put_user_policy(
        UserName="admin",
        PolicyName="admin",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            }
        ),
    )
    admin_key = anon.create_access_key(UserName="admin")["AccessKey"]
    admin = _session(admin_key)
    ec2_admin = admin.client("ec2", endpoint_url=enforcing_moto)
    image = images_of(ec2_admin)
    settings = make_settings(enforcing_moto, pool_id=POOL, default_image_id=image)

    def client(service: str) -> Any:
        return session.client(service, settings, boto_session=admin)

    clients = setup.AdminClients(
        cloudformation=client("cloudformation"),
        ec2=client("ec2"),
        iam=client("iam"),
        lambda_=client("lambda"),
        events=client("events"),
        ssm=client("ssm"),
        region=REGION,
    )
    knobs = setup.deploy(settings, clients=clients)
    iam = clients.iam
    runtime_key = _user_with(iam, "annex-helper")
    iam.attach_user_policy(UserName="annex-helper", PolicyArn=knobs["ANNEX_RUNTIME_POLICY_ARN"])
    return {
        "url": enforcing_moto,
        "admin": admin,
        "clients": clients,
        "knobs": knobs,
        "settings": settings,
        "runtime": _session(runtime_key),
    }


def images_of(ec2: Any) -> str:
    return ec2.describe_images(Owners=["amazon"], MaxResults=5)["Images"][0]["ImageId"]


def runtime_client(world: dict[str, Any], service: str) -> Any:
    return session.client(
        service, world["settings"], boto_session=world["runtime"]
    )


@pytest.mark.slow
def test_runtime_user_does_its_job(world: dict[str, Any]) -> None:
    ec2 = runtime_client(world, "ec2")
    ssm = runtime_client(world, "ssm")
    plan = fleet.LaunchPlan(
        annex="a1",
        owner="alice",
        request_id="r1",
        pool_id=POOL,
        expires=int(time.time()) + 600,
        count=2,
        instance_types=("m5.large",),
        user_data="#!/bin/sh\n",
    )
    name = secrets.parameter_name(
        world["knobs"]["ANNEX_TOKEN_PARAMETER_PREFIX"], POOL, "alice", "a1"
    )
    secrets.put_token(ssm, name, "fake-token", plan.tags())
    secrets.put_token(ssm, name, "fake-token-2", plan.tags())
    result = fleet.launch(ec2, plan, world["knobs"]["ANNEX_LAUNCH_TEMPLATE"])
    assert len(result.instance_ids) == 2, result.errors
    views = instances.describe_pool(ec2, POOL)
    assert {v.id for v in views} == set(result.instance_ids)
    ec2.create_tags(Resources=result.instance_ids, Tags=[{"Key": names.TAG_EXPIRES, "Value": "1"}])
    assert sorted(instances.terminate(ec2, result.instance_ids)) == sorted(result.instance_ids)
    assert fleet.delete_annex_template(ec2, POOL, "alice", "a1") is True
    assert secrets.delete_token(ssm, name) is True


def test_runtime_user_runs_the_stack_strategy(world: dict[str, Any]) -> None:
    """Token bucket, CreateStack, grow, retag, shrink, DeleteStack, bucket gone: all with only
    the runtime policy (the S3 calls checked against the bucket ARNs, as on AWS)."""
    cfn = runtime_client(world, "cloudformation")
    asg = runtime_client(world, "autoscaling")
    s3 = runtime_client(world, "s3")
    ec2 = runtime_client(world, "ec2")
    settings = world["settings"]
    plan = fleet.LaunchPlan(
        annex="s1",
        owner="alice",
        request_id="r-stack",
        pool_id=POOL,
        expires=int(time.time()) + 600,
        count=0,
        instance_types=("m5.large", "c5.large"),
        user_data="#!/bin/sh\n",
    )
    bucket = stack.bucket_name(settings.central_manager, POOL, "alice", "s1")
    assert stack.put_token(s3, bucket, "fake-token", plan.tags(), REGION).endswith("/token")
    base = fleet.base_template_data(ec2, world["knobs"]["ANNEX_LAUNCH_TEMPLATE"])
    made = stack.ensure(cfn, asg, plan, name="annex-s1", base=base, target=2, max_size=10)
    assert made.created and len(made.instance_ids) == 2
    grown = stack.ensure(cfn, asg, plan, name="annex-s1", base=base, target=3, max_size=10)
    assert len(grown.instance_ids) == 1
    view = stack.describe(cfn, asg, "annex-s1")
    assert view is not None
    stack.retag_groups(asg, [g.name for g in view.groups], {names.TAG_EXPIRES: "1"})
    assert stack.retire_instances(asg, grown.instance_ids) == []
    assert {v.id for v in instances.describe_pool(ec2, POOL)} >= set(made.instance_ids)
    assert stack.delete(cfn, "annex-s1") == ""
    assert stack.delete_bucket(s3, bucket) is True
    # Someone else's bucket name is not the helper's to create.
    with pytest.raises(CloudError, match="AccessDenied"):
        stack.put_token(s3, "not-an-annex-bucket", "x", plan.tags(), REGION)


def _denied(call: Any, **kwargs: Any) -> None:
    with pytest.raises(ClientError) as caught:
        call(**kwargs)
    code = caught.value.response["Error"]["Code"]
    # moto answers Lambda in the query-API XML form, which botocore reports as code "403".
    assert code in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "403"), code
    assert "not authorized" in str(caught.value) or code != "403"


def test_runtime_user_cannot_do_the_setups_work(world: dict[str, Any]) -> None:
    iam = runtime_client(world, "iam")
    trust = json.dumps(policy.trust_policy("ec2.amazonaws.com"))
    _denied(iam.create_role, RoleName="escalate", AssumeRolePolicyDocument=trust)
    _denied(iam.create_instance_profile, InstanceProfileName="escalate")
    _denied(iam.create_policy, PolicyName="escalate", PolicyDocument=trust)
    _denied(
        iam.attach_user_policy,
        UserName="annex-helper",
        PolicyArn="arn:aws:iam::aws:policy/AdministratorAccess",
    )
    _denied(
        runtime_client(world, "lambda").create_function,
        FunctionName="escalate",
        Runtime="python3.12",
        Role="arn:aws:iam::123456789012:role/x",
        Handler="index.handler",
        Code={"ZipFile": b"x"},
    )
    _denied(
        runtime_client(world, "events").put_rule,
        Name="escalate",
        ScheduleExpression="rate(1 minute)",
    )
    ec2 = runtime_client(world, "ec2")
    _denied(ec2.create_security_group, GroupName="escalate", Description="x")
    _denied(
        ec2.authorize_security_group_ingress,
        GroupId=world["knobs"]["ANNEX_SECURITY_GROUP"],
        IpProtocol="tcp",
        FromPort=22,
        ToPort=22,
        CidrIp="0.0.0.0/0",
    )


def test_setup_kind_stack_refused(world: dict[str, Any]) -> None:
    """The setup's direct reads are refused to the runtime user; a setup-kind stack is refused
    on AWS by the policy's resource-type conditions, checked against the real templates in
    test_stack_conditions_match_the_templates (moto ignores conditions, so it can only allow
    or refuse every CreateStack: it must allow the stack strategy's)."""

    def client(service: str) -> Any:
        return runtime_client(world, service)

    clients = setup.AdminClients(
        cloudformation=client("cloudformation"),
        ec2=client("ec2"),
        iam=client("iam"),
        lambda_=client("lambda"),
        events=client("events"),
        ssm=client("ssm"),
        region=REGION,
    )
    problems = setup.check(world["settings"], clients=clients)
    assert any("cannot read setup stack" in p and "AccessDenied" in p for p in problems), problems
    assert any("missing (AccessDenied" in p for p in problems), problems


def test_agent_signature_accepted_by_a_verifier(world: dict[str, Any]) -> None:
    """moto checks SigV4 signatures under enforcement: the agent's own signing passes."""
    iam = world["clients"].iam
    key = _user_with(iam, "instance-like")
    iam.put_user_policy(
        UserName="instance-like",
        PolicyName="tokens",
        PolicyDocument=json.dumps(
            policy.instance_role_policy_document("*")  # moto: resources are always `*`
        ),
    )
    world["clients"].ssm.put_parameter(Name="/t/p/x", Value="the-token", Type="SecureString")
    spec = importlib.util.spec_from_file_location("agent_for_iam_test", AGENT)
    assert spec and spec.loader
    agent = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent)
    creds = {"AccessKeyId": key["AccessKeyId"], "SecretAccessKey": key["SecretAccessKey"]}
    assert agent.get_parameter(world["url"], REGION, "/t/p/x", creds) == "the-token"
    wrong = dict(creds, SecretAccessKey="not-the-secret")
    with pytest.raises(agent.AgentError, match=r"403|Signature"):
        agent.get_parameter(world["url"], REGION, "/t/p/x", wrong)
    # The stack strategy's token: S3 GetObject, signed by the agent, verified by moto, and
    # allowed only inside the pool's token buckets.
    objects = policy.token_bucket_arns(POOL, literal=True)["objects"]
    iam.put_user_policy(
        UserName="instance-like",
        PolicyName="token-objects",
        PolicyDocument=json.dumps(policy.instance_role_policy_document("*", objects)),
    )
    admin_s3 = world["admin"].client("s3", endpoint_url=world["url"])
    bucket = stack.bucket_name(POOL, POOL, "alice", "agent")
    admin_s3.create_bucket(Bucket=bucket)
    admin_s3.put_object(Bucket=bucket, Key="token", Body=b"the-s3-token")
    admin_s3.create_bucket(Bucket="elsewhere")
    admin_s3.put_object(Bucket="elsewhere", Key="token", Body=b"not-yours")
    deadline = time.time() + 10  # IAM changes may take a moment
    while True:
        try:
            assert agent.get_s3_object(world["url"], REGION, bucket, "token", creds) == (
                "the-s3-token"
            )
            break
        except agent.AgentError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    with pytest.raises(agent.AgentError, match="403"):
        agent.get_s3_object(world["url"], REGION, "elsewhere", "token", creds)
    with pytest.raises(agent.AgentError, match="403"):
        agent.get_s3_object(world["url"], REGION, bucket, "token", wrong)
    # Only GetParameter: the instance's role cannot write tokens.
    session_ = _session(key)
    with pytest.raises(ClientError):
        session_.client("ssm", endpoint_url=world["url"]).put_parameter(
            Name="/t/p/y", Value="v", Type="SecureString"
        )


# --- the AWS form's shape -----------------------------------------------------------------------


def _real_policy() -> dict[str, Any]:
    return setup.runtime_policy(make_settings(pool_id=POOL), emulator=False)


def test_every_create_or_change_statement_is_tag_conditioned() -> None:
    doc = _real_policy()
    by_sid = {s["Sid"]: s for s in doc["Statement"]}
    checked = []
    for sid, statement in by_sid.items():
        if statement["Effect"] == "Deny":
            continue
        actions = (
            statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        )
        read_only = all(a.split(":")[1].startswith(("Describe", "Get", "List")) for a in actions)
        if read_only or statement["Resource"] != "*":
            continue
        checked.append(sid)
        assert "Condition" in statement, f"{sid} allows changes on * without a condition"
    assert {"CreateTaggedForThisPool", "ManageThisPoolsResources"} <= set(checked), checked
    create = by_sid["CreateTaggedForThisPool"]["Condition"]
    assert create == {"StringEquals": {f"aws:RequestTag/{names.TAG_POOL}": POOL}}
    manage = by_sid["ManageThisPoolsResources"]
    assert manage["Condition"] == {"StringEquals": {f"aws:ResourceTag/{names.TAG_POOL}": POOL}}
    assert "ec2:TerminateInstances" in manage["Action"]
    assert by_sid["TagOnlyWhileCreating"]["Condition"]["StringEquals"]["ec2:CreateAction"]
    deny = by_sid["NoSetupKindStacks"]
    assert deny["Effect"] == "Deny" and "cloudformation:CreateStack" in deny["Action"]
    assert (
        "AWS::IAM::*" in deny["Condition"]["ForAnyValue:StringLike"]["cloudformation:ResourceTypes"]
    )
    stacks = by_sid["StackStrategyCreate"]["Condition"]
    assert "AWS::IAM::*" not in json.dumps(stacks["ForAllValues:StringLike"])
    assert stacks["Null"] == {"cloudformation:ResourceTypes": "false"}


def test_arn_scoped_where_tags_cannot_be_used() -> None:
    by_sid = {s["Sid"]: s for s in _real_policy()["Statement"]}
    assert by_sid["PassTheInstanceRole"]["Resource"] == {"Fn::GetAtt": ["InstanceRole", "Arn"]}
    tokens = by_sid["InstanceTokens"]["Resource"]["Fn::Sub"]
    assert tokens.startswith(
        "arn:${AWS::Partition}:ssm:*:${AWS::AccountId}:parameter/htcondor-annex/tokens/cm.test_9618-"
    )
    assert tokens.endswith("/*")
    launch_inputs = json.dumps(by_sid["LaunchFromExistingInputs"]["Resource"])
    assert "instance/" not in launch_inputs and "subnet/*" in launch_inputs
    # No statement anywhere grants iam:Create*/Put*/Attach*, lambda or events.
    granted = json.dumps([s["Action"] for s in _real_policy()["Statement"]])
    for forbidden in ("iam:CreateRole", "iam:Put", "iam:Attach", "lambda:", "events:", '"*"'):
        assert forbidden not in granted


def test_emulator_form_differs_only_in_resources() -> None:
    """...and in the conditional Deny, which moto would apply unconditionally. S3 statements
    keep their ARNs: moto checks S3 calls against them."""
    real = [s for s in _real_policy()["Statement"] if s["Sid"] != "NoSetupKindStacks"]
    emulated = setup.runtime_policy(make_settings(pool_id=POOL), emulator=True)["Statement"]
    assert [s["Action"] for s in real] == [s["Action"] for s in emulated]
    assert [s.get("Condition") for s in real] == [s.get("Condition") for s in emulated]
    assert "StackStrategyTokenBuckets" in {s["Sid"] for s in emulated} and len(emulated) > 1
    for statement in emulated:
        if statement["Sid"] == "StackStrategyTokenBuckets":
            assert statement["Resource"] == [
                policy.token_bucket_arns(POOL)["buckets"],
                policy.token_bucket_arns(POOL)["objects"],
            ]
        else:
            assert statement["Resource"] == "*", statement["Sid"]


def _types(template_text: str) -> set[str]:
    return {r["Type"] for r in json.loads(template_text)["Resources"].values()}


def test_stack_conditions_match_the_templates() -> None:
    """On AWS: every resource type of an annex stack is within StackStrategyCreate's list and
    none is caught by the Deny; the setup stack has types the Deny catches and the Allow
    does not cover."""
    from fnmatch import fnmatchcase  # noqa: PLC0415

    by_sid = {s["Sid"]: s for s in _real_policy()["Statement"]}
    allowed = by_sid["StackStrategyCreate"]["Condition"]["ForAllValues:StringLike"][
        "cloudformation:ResourceTypes"
    ]
    denied = by_sid["NoSetupKindStacks"]["Condition"]["ForAnyValue:StringLike"][
        "cloudformation:ResourceTypes"
    ]
    plan = fleet.LaunchPlan(
        annex="a1",
        owner="alice",
        request_id="r",
        pool_id=POOL,
        expires=1,
        count=0,
        instance_types=("m5.large", "c5.large"),
        image_ids=("ami-12345678",),
    )
    annex_types = _types(stack.render_template(plan, "s", {}, [1, 1], max_size=5))
    assert annex_types == set(stack.RESOURCE_TYPES)
    for kind in annex_types:
        assert any(fnmatchcase(kind, p) for p in allowed), kind
        assert not any(fnmatchcase(kind, p) for p in denied), kind
    setup_types = _types(setup.render_template(make_settings(pool_id=POOL), "x"))
    assert any(any(fnmatchcase(k, p) for p in denied) for k in setup_types)
    assert not all(any(fnmatchcase(k, p) for p in allowed) for k in setup_types)


def test_docs_show_the_generated_policy() -> None:
    doc = Path(__file__).parents[2] / "docs" / "iam.md"
    text = doc.read_text()
    regenerate = "regenerate: python3 -m annex_gahp.cloud.aws.policy"
    assert policy.docs_policy_json(POOL_DOC) in text, regenerate


POOL_DOC = "cm.example.org:9618"
