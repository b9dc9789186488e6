"""`htcondor-annex setup / check-setup / teardown`: one CloudFormation stack per pool.

The stack (templates/setup-stack.json.j2) holds what needs admin rights once, so the helper can
run every day with the least privilege of the runtime policy it creates:
instance role + profile (read the pool's tokens), security group (no ingress: CCB), base launch
template (IMDSv2 required, instance tags in IMDS, terminate on shutdown), the runtime managed
policy, and the lease enforcer (Lambda + EventBridge schedule + invoke permission).

moto creates and deletes all of these through CloudFormation, except that its stack deletion
leaves an AWS::IAM::ManagedPolicy behind: `teardown` deletes a leftover runtime policy itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from importlib import resources
from typing import Any

import jinja2
from botocore.exceptions import ClientError, WaiterError

from annex_gahp import names
from annex_gahp.cloud.aws import instances, policy, secrets, session
from annex_gahp.cloud.aws.session import aws_errors, cloud_error, error_code
from annex_gahp.errors import SetupError
from annex_gahp.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = "/etc/condor/config.d/15-annex-setup.conf"
LEASE_SCHEDULE = "rate(5 minutes)"
SETUP_TAG = "htcondor-annex:setup"
_GOOD = ("CREATE_COMPLETE", "UPDATE_COMPLETE")


@dataclasses.dataclass
class AdminClients:
    cloudformation: Any
    ec2: Any
    iam: Any
    lambda_: Any
    events: Any
    ssm: Any
    region: str
    s3: Any = None  # the stack strategy's token buckets (made from the settings if not given)


def admin_clients(settings: Settings, region: str | None = None) -> AdminClients:
    region = region or session.resolve_region(None, settings)
    made = {
        name: session.client(service, settings, region)
        for name, service in (
            ("cloudformation", "cloudformation"),
            ("ec2", "ec2"),
            ("iam", "iam"),
            ("lambda_", "lambda"),
            ("events", "events"),
            ("ssm", "ssm"),
        )
    }
    return AdminClients(region=region, **made)


def default_stack_name(pool_id: str) -> str:
    """Derived from the pool, so check-setup and teardown find it without any config."""
    cleaned = re.sub(r"[^A-Za-z0-9-]+", "-", pool_id).strip("-") or "pool"
    return f"htcondor-annex-{cleaned}"[:128]


def launch_template_name(stack_name: str) -> str:
    return f"{stack_name}-base"[:128]


def _tags(settings: Settings, stack_name: str) -> list[dict[str, str]]:
    return [
        {"Key": names.TAG_POOL, "Value": settings.pool_id},
        {"Key": SETUP_TAG, "Value": stack_name},
    ]


def runtime_policy(settings: Settings, *, emulator: bool | None = None) -> dict[str, Any]:
    """The runtime policy as the stack holds it (CloudFormation intrinsics for ARNs)."""
    return policy.runtime_policy_document(
        pool_id=settings.pool_id,
        token_parameters=policy.token_parameter_arn(
            secrets.pool_path(settings.token_parameter_prefix, settings.pool_id)
        ),
        instance_role_arn={"Fn::GetAtt": ["InstanceRole", "Arn"]},
        token_buckets=policy.token_bucket_arns(settings.central_manager),
        emulator=bool(settings.endpoint_url) if emulator is None else emulator,
    )


def render_template(settings: Settings, stack_name: str, *, vpc_id: str = "") -> str:
    env = jinja2.Environment(  # noqa: S701 - JSON, every value goes through tojson
        loader=jinja2.PackageLoader("annex_gahp", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    token_path = secrets.pool_path(settings.token_parameter_prefix, settings.pool_id)
    enforcer = resources.files("annex_gahp").joinpath("cloud/aws/lease_enforcer.py").read_text()
    if len(enforcer) > 4096:
        raise AssertionError("lease_enforcer.py outgrew CloudFormation's inline ZipFile limit")
    text = env.get_template("setup-stack.json.j2").render(
        pool_id=settings.pool_id,
        tags=[{"Key": names.TAG_POOL, "Value": settings.pool_id}],
        ec2_trust=policy.trust_policy("ec2.amazonaws.com"),
        lambda_trust=policy.trust_policy("lambda.amazonaws.com"),
        instance_policy=policy.instance_role_policy_document(
            policy.token_parameter_arn(token_path),
            policy.token_bucket_arns(settings.central_manager)["objects"],
        ),
        enforcer_policy=policy.enforcer_policy_document(settings.pool_id),
        runtime_policy=runtime_policy(settings),
        vpc_id=vpc_id,
        image_id=settings.default_image_id,
        launch_template_name=launch_template_name(stack_name),
        enforcer_source=enforcer,
        reaper_grace=settings.reaper_grace,
        schedule=LEASE_SCHEDULE,
        enforcer_input=json.dumps({"pool_id": settings.pool_id}),
        token_prefix=settings.token_parameter_prefix,
    )
    json.loads(text)  # a rendering mistake shows here, not as a CloudFormation error
    return text


def _describe_stack(cfn: Any, stack_name: str) -> dict[str, Any] | None:
    try:
        return cfn.describe_stacks(StackName=stack_name)["Stacks"][0]
    except ClientError as err:
        if error_code(err) == "ValidationError" and "does not exist" in str(err):
            return None
        raise cloud_error(err, f"describe stack {stack_name}") from None


_wait = session.wait_for_stack


def _outputs(stack: dict[str, Any]) -> dict[str, str]:
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}


def knobs_from_outputs(
    settings: Settings, stack_name: str, region: str, outputs: dict[str, str]
) -> dict[str, str]:
    return {
        "ANNEX_AWS_REGION": region,
        "ANNEX_POOL_ID": settings.pool_id,
        "ANNEX_SETUP_STACK": stack_name,
        "ANNEX_LAUNCH_TEMPLATE": outputs.get("LaunchTemplateName", ""),
        "ANNEX_INSTANCE_PROFILE": outputs.get("InstanceProfile", ""),
        "ANNEX_INSTANCE_ROLE_ARN": outputs.get("InstanceRoleArn", ""),
        "ANNEX_SECURITY_GROUP": outputs.get("SecurityGroup", ""),
        "ANNEX_TOKEN_PARAMETER_PREFIX": outputs.get(
            "TokenParameterPrefix", settings.token_parameter_prefix
        ),
        "ANNEX_RUNTIME_POLICY_ARN": outputs.get("RuntimePolicyArn", ""),
        "ANNEX_LEASE_ENFORCER": outputs.get("LeaseEnforcer", ""),
    }


def deploy(
    settings: Settings,
    stack_name: str | None = None,
    clients: AdminClients | None = None,
    *,
    vpc_id: str = "",
) -> dict[str, str]:
    """Create or update the setup stack; returns the knobs the helper needs."""
    if not settings.pool_id:
        raise SetupError("ANNEX_POOL_ID is empty: the setup is made per pool")
    clients = clients or admin_clients(settings)
    stack_name = stack_name or default_stack_name(settings.pool_id)
    cfn = clients.cloudformation
    body = render_template(settings, stack_name, vpc_id=vpc_id)
    common = {
        "StackName": stack_name,
        "TemplateBody": body,
        "Capabilities": ["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"],
        "Tags": _tags(settings, stack_name),
    }
    existing = _describe_stack(cfn, stack_name)
    if existing is None:
        with aws_errors(f"create setup stack {stack_name}"):
            cfn.create_stack(**common, OnFailure="DELETE")
        log.info("creating setup stack %s in %s", stack_name, clients.region)
        _wait(cfn, "stack_create_complete", stack_name)
    elif existing["StackStatus"] in ("ROLLBACK_COMPLETE", "DELETE_FAILED"):
        raise SetupError(
            f"setup stack {stack_name} is {existing['StackStatus']}: run "
            "`htcondor-annex teardown` then `htcondor-annex setup` again"
        )
    else:
        try:
            cfn.update_stack(**common)
        except ClientError as err:
            if "No updates are to be performed" not in str(err):
                raise cloud_error(err, f"update setup stack {stack_name}") from None
            log.info("setup stack %s is up to date", stack_name)
        else:
            log.info("updating setup stack %s", stack_name)
            _wait(cfn, "stack_update_complete", stack_name)
    stack = _describe_stack(cfn, stack_name)
    if stack is None or stack["StackStatus"] not in _GOOD:
        status = stack["StackStatus"] if stack else "gone"
        raise SetupError(f"setup stack {stack_name} ended {status}")
    return knobs_from_outputs(settings, stack_name, clients.region, _outputs(stack))


SETUP_HEADER = (
    "# Written by `htcondor-annex setup`: what the setup stack made for this pool.\n"
    "# Re-run `htcondor-annex setup --write-config` rather than editing by hand."
)


def config_text(knobs: dict[str, str], header: str = SETUP_HEADER) -> str:
    lines = header.splitlines()
    lines += [f"{key} = {value}" for key, value in knobs.items()]
    return "\n".join(lines) + "\n"


def write_config(
    knobs: dict[str, str], path: str = DEFAULT_CONFIG_PATH, header: str = SETUP_HEADER
) -> None:
    """Write the knobs as an HTCondor config file (atomically, mode 0644)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=folder, prefix=".annex-setup-")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(config_text(knobs, header))
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


# --- check ------------------------------------------------------------------------------------


def _exists(call: Any, *args: Any, **kwargs: Any) -> str:
    """'' if the call finds the resource, else the AWS error code."""
    try:
        call(*args, **kwargs)
    except ClientError as err:
        return error_code(err)
    return ""


def _statement_actions(document: dict[str, Any]) -> dict[str, set[str]]:
    out = {}
    for statement in document.get("Statement", []):
        actions = statement.get("Action", [])
        out[statement.get("Sid", "?")] = {actions} if isinstance(actions, str) else set(actions)
    return out


def check(
    settings: Settings, stack_name: str | None = None, clients: AdminClients | None = None
) -> list[str]:
    """Problems with the setup, one precise line each; [] when all is well."""
    clients = clients or admin_clients(settings)
    stack_name = stack_name or default_stack_name(settings.pool_id)
    cfn = clients.cloudformation
    stack = _describe_stack(cfn, stack_name)
    if stack is None:
        return [
            f"setup stack {stack_name} does not exist in {clients.region}: "
            "run `htcondor-annex setup`"
        ]
    problems: list[str] = []
    if stack["StackStatus"] not in _GOOD:
        problems.append(f"setup stack {stack_name} is {stack['StackStatus']}")
    outputs = _outputs(stack)
    knobs = knobs_from_outputs(settings, stack_name, clients.region, outputs)

    try:
        listed = cfn.describe_stack_resources(StackName=stack_name)["StackResources"]
        deployed = cfn.get_template(StackName=stack_name)["TemplateBody"]
    except ClientError as err:
        problems.append(f"cannot read setup stack {stack_name} ({error_code(err)})")
        listed, deployed = [], None
    for res in listed:
        if res.get("ResourceStatus") not in _GOOD:
            problems.append(
                f"{res['LogicalResourceId']} ({res['ResourceType']}) is {res.get('ResourceStatus')}"
            )
    if isinstance(deployed, str):
        deployed = json.loads(deployed)
    if deployed is not None and deployed != json.loads(render_template(settings, stack_name)):
        problems.append(
            f"setup stack {stack_name} differs from what this version and these knobs make "
            "(e.g. ANNEX_DEFAULT_IMAGE_ID or ANNEX_POOL_ID changed): re-run `htcondor-annex setup`"
        )

    problems += _check_launch_template(clients, settings, outputs)
    problems += _check_identity(clients, settings, outputs)
    problems += _check_enforcer(clients, outputs)

    current = {
        "ANNEX_LAUNCH_TEMPLATE": settings.launch_template,
        "ANNEX_INSTANCE_PROFILE": settings.instance_profile,
        "ANNEX_SECURITY_GROUP": settings.security_group,
        "ANNEX_TOKEN_PARAMETER_PREFIX": settings.token_parameter_prefix,
    }
    for knob, have in current.items():
        if have != knobs[knob]:
            problems.append(
                f"{knob} = {have!r} but the setup made {knobs[knob]!r}: run "
                f"`htcondor-annex setup --write-config` (writes {DEFAULT_CONFIG_PATH})"
            )
    return problems


def _check_launch_template(
    clients: AdminClients, settings: Settings, outputs: dict[str, str]
) -> list[str]:
    name = outputs.get("LaunchTemplateName", "")
    try:
        version = clients.ec2.describe_launch_template_versions(
            LaunchTemplateName=name, Versions=["$Default"]
        )["LaunchTemplateVersions"][0]
    except (ClientError, IndexError) as err:
        code = error_code(err) if isinstance(err, ClientError) else "no default version"
        return [f"base launch template {name} is missing ({code})"]
    data = version.get("LaunchTemplateData", {})
    meta = data.get("MetadataOptions", {})
    wanted = {
        "MetadataOptions.HttpTokens": (meta.get("HttpTokens"), "required"),
        "MetadataOptions.InstanceMetadataTags": (meta.get("InstanceMetadataTags"), "enabled"),
        "InstanceInitiatedShutdownBehavior": (
            data.get("InstanceInitiatedShutdownBehavior"),
            "terminate",
        ),
        "IamInstanceProfile.Arn": (
            data.get("IamInstanceProfile", {}).get("Arn"),
            outputs.get("InstanceProfileArn"),
        ),
        "SecurityGroupIds": (data.get("SecurityGroupIds"), [outputs.get("SecurityGroup")]),
    }
    if settings.default_image_id:
        wanted["ImageId"] = (data.get("ImageId"), settings.default_image_id)
    return [
        f"base launch template {name}: {field} is {have!r}, should be {should!r}"
        for field, (have, should) in wanted.items()
        if have != should
    ]


def _check_identity(
    clients: AdminClients, settings: Settings, outputs: dict[str, str]
) -> list[str]:
    problems = []
    sg = outputs.get("SecurityGroup", "")
    code = _exists(clients.ec2.describe_security_groups, GroupIds=[sg])
    if code:
        problems.append(f"security group {sg} is missing ({code})")
    profile = outputs.get("InstanceProfile", "")
    try:
        roles = clients.iam.get_instance_profile(InstanceProfileName=profile)["InstanceProfile"][
            "Roles"
        ]
        role_arn = outputs.get("InstanceRoleArn")
        if role_arn not in [r["Arn"] for r in roles]:
            problems.append(f"instance profile {profile} does not hold the role {role_arn}")
    except ClientError as err:
        problems.append(f"instance profile {profile} is missing ({error_code(err)})")
    arn = outputs.get("RuntimePolicyArn", "")
    try:
        pol = clients.iam.get_policy(PolicyArn=arn)["Policy"]
        doc = clients.iam.get_policy_version(PolicyArn=arn, VersionId=pol["DefaultVersionId"])[
            "PolicyVersion"
        ]["Document"]
        if isinstance(doc, str):
            doc = json.loads(doc)
        have = _statement_actions(doc)
        for sid, actions in _statement_actions(runtime_policy(settings)).items():
            if have.get(sid) != actions:
                problems.append(f"runtime policy {arn}: statement {sid} drifted")
    except ClientError as err:
        problems.append(f"runtime policy {arn} is missing ({error_code(err)})")
    return problems


def _check_enforcer(clients: AdminClients, outputs: dict[str, str]) -> list[str]:
    problems = []
    function = outputs.get("LeaseEnforcer", "")
    try:
        function_arn = clients.lambda_.get_function(FunctionName=function)["Configuration"][
            "FunctionArn"
        ]
    except ClientError as err:
        return [f"lease enforcer function {function} is missing ({error_code(err)})"]
    rule = outputs.get("LeaseSchedule", "")
    try:
        described = clients.events.describe_rule(Name=rule)
        if described.get("State") != "ENABLED":
            problems.append(f"lease enforcer schedule {rule} is {described.get('State')}")
        targets = clients.events.list_targets_by_rule(Rule=rule)["Targets"]
        if function_arn not in [t["Arn"] for t in targets]:
            problems.append(f"lease enforcer schedule {rule} does not target {function}")
    except ClientError as err:
        problems.append(f"lease enforcer schedule {rule} is missing ({error_code(err)})")
    return problems


# --- teardown ---------------------------------------------------------------------------------


def teardown(
    settings: Settings,
    stack_name: str | None = None,
    clients: AdminClients | None = None,
    *,
    force: bool = False,
) -> dict[str, list[str]]:
    """Delete the setup. Refuses while instances of the pool exist, unless forced (then they
    are terminated first). The runtime policy is detached from whoever holds it. Returns what
    was removed, by kind."""
    clients = clients or admin_clients(settings)
    stack_name = stack_name or default_stack_name(settings.pool_id)
    removed: dict[str, list[str]] = {"instances": [], "launch_templates": [], "parameters": []}
    # What the strategies made besides instances (e.g. annex stacks) goes through them.
    from annex_gahp.cloud.aws.cloud import AwsCloud  # noqa: PLC0415 - only teardown needs it

    cloud = AwsCloud(
        settings,
        make_client=lambda service, region: (
            getattr(clients, service, None) or session.client(service, settings, region)
        ),
        home_region=clients.region,
    )
    live = instances.describe_pool(clients.ec2, settings.pool_id)
    held = cloud.purge(dry_run=True)
    if (live or any(held.values())) and not force:
        annexes = sorted({f"{v.owner}/{v.annex}" for v in live}.union(*held.values()))
        kinds = "".join(
            f" and {len(v)} {k.replace('_', ' ').removesuffix('s')}(s)"
            for k, v in sorted(held.items())
        )
        raise SetupError(
            f"{len(live)} instance(s){kinds} of pool {settings.pool_id} still exist (annexes "
            f"{', '.join(annexes[:10])}): delete those annexes first, or use "
            "`htcondor-annex teardown --force` to terminate them"
        )
    removed |= cloud.purge()
    if any(held.values()):
        live = instances.describe_pool(clients.ec2, settings.pool_id)
    if live:
        removed["instances"] = instances.terminate(clients.ec2, [v.id for v in live])
        with aws_errors("wait for the pool's instances to terminate"):
            try:
                clients.ec2.get_waiter("instance_terminated").wait(
                    InstanceIds=removed["instances"], WaiterConfig={"Delay": 5, "MaxAttempts": 60}
                )
            except WaiterError:
                log.warning("instances still terminating; the stack deletion may retry")
    stack = _describe_stack(clients.cloudformation, stack_name)
    base_id = ""
    if stack is not None:
        base_id = _outputs(stack).get("LaunchTemplate", "")
    removed["launch_templates"] = _delete_annex_templates(clients.ec2, settings.pool_id, base_id)
    removed["parameters"] = _delete_tokens(clients.ssm, settings)
    if stack is None:
        log.info("setup stack %s does not exist", stack_name)
        return removed
    policy_arn = _outputs(stack).get("RuntimePolicyArn", "")
    if policy_arn:
        # A managed policy still attached to the helper's user makes its deletion fail.
        removed["detached"] = _detach_everywhere(clients.iam, policy_arn)
    with aws_errors(f"delete setup stack {stack_name}"):
        clients.cloudformation.delete_stack(StackName=stack_name)
    _wait(clients.cloudformation, "stack_delete_complete", stack_name)
    removed["stack"] = [stack_name]
    if policy_arn and _delete_leftover_policy(clients.iam, policy_arn):
        removed["leftovers"] = [policy_arn]
    return removed


def _delete_annex_templates(ec2: Any, pool_id: str, keep: str) -> list[str]:
    gone = []
    with aws_errors("list the pool's launch templates"):
        pages = ec2.get_paginator("describe_launch_templates").paginate(
            Filters=[{"Name": f"tag:{names.TAG_POOL}", "Values": [pool_id]}]
        )
        found = [t for page in pages for t in page["LaunchTemplates"]]
    for template in found:
        if template["LaunchTemplateId"] == keep:
            continue
        with aws_errors(f"delete launch template {template['LaunchTemplateName']}"):
            ec2.delete_launch_template(LaunchTemplateId=template["LaunchTemplateId"])
        gone.append(template["LaunchTemplateName"])
    return gone


def _delete_tokens(ssm: Any, settings: Settings) -> list[str]:
    path = secrets.pool_path(settings.token_parameter_prefix, settings.pool_id)
    with aws_errors(f"list tokens under {path}"):
        pages = ssm.get_paginator("get_parameters_by_path").paginate(Path=path, Recursive=True)
        found = [p["Name"] for page in pages for p in page["Parameters"]]
    for start in range(0, len(found), 10):  # DeleteParameters takes 10 at most
        with aws_errors(f"delete tokens under {path}"):
            ssm.delete_parameters(Names=found[start : start + 10])
    return found


def _detach_everywhere(iam: Any, arn: str) -> list[str]:
    detached = []
    try:
        entities = iam.list_entities_for_policy(PolicyArn=arn)
    except ClientError as err:
        if error_code(err) == "NoSuchEntity":
            return []
        raise cloud_error(err, f"list who holds {arn}") from None
    with aws_errors(f"detach {arn}"):
        for user in entities.get("PolicyUsers", []):
            iam.detach_user_policy(UserName=user["UserName"], PolicyArn=arn)
            detached.append(f"user/{user['UserName']}")
        for role in entities.get("PolicyRoles", []):
            iam.detach_role_policy(RoleName=role["RoleName"], PolicyArn=arn)
            detached.append(f"role/{role['RoleName']}")
        for group in entities.get("PolicyGroups", []):
            iam.detach_group_policy(GroupName=group["GroupName"], PolicyArn=arn)
            detached.append(f"group/{group['GroupName']}")
    for who in detached:
        log.info("detached %s from %s", arn, who)
    return detached


def _delete_leftover_policy(iam: Any, arn: str) -> bool:
    """moto leaves a stack's AWS::IAM::ManagedPolicy behind; AWS does not. Remove it."""
    try:
        iam.get_policy(PolicyArn=arn)
    except ClientError:
        return False
    _detach_everywhere(iam, arn)
    with aws_errors(f"delete leftover runtime policy {arn}"):
        for version in iam.list_policy_versions(PolicyArn=arn)["Versions"]:
            if not version["IsDefaultVersion"]:
                iam.delete_policy_version(PolicyArn=arn, VersionId=version["VersionId"])
        iam.delete_policy(PolicyArn=arn)
    log.info("deleted leftover runtime policy %s", arn)
    return True
