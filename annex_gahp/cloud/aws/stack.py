"""The `stack` strategy (the 2016 design): one CloudFormation stack per annex.

The stack holds one Auto Scaling group per instance type (each with its own launch template:
type, image, spot price, the annex's boot script as user data), because an ASG without a
MixedInstancesPolicy launches one type only (and moto has no MixedInstancesPolicy). The
annex's size is split across the groups; growing raises the groups' desired capacity (one
UpdateAutoScalingGroup per group that changes), shrinking terminates chosen instances *with*
a capacity decrement (TerminateInstanceInAutoScalingGroup, so the group does not replace
them), retiring deletes the stack, and its groups and instances with it.

The group tags (PropagateAtLaunch) carry the contract's tags, so every instance is tagged
with this pool and annex (describe_pool, the reaper and the lease enforcer see it) and with
`aws:autoscaling:groupName` (how they recognise a group member).

As in 2016 the annex's IDTOKEN goes to its own S3 bucket, `htcondor-annex-<central
manager>-<annex>-<hash>` (see `bucket_name`); a failed upload deletes the bucket again.

What moto 5.2 does, checked by tests/unit/test_aws_stack.py: CreateStack creates the launch
templates and groups at once and the groups launch their instances at once (type from the
template, template data readable through the `aws:ec2launchtemplate:*` instance tags);
UpdateAutoScalingGroup launches/terminates at once; DeleteStack removes groups, templates and
instances at once. UpdateStack would *replace* the groups (delete and recreate), so capacity
is never changed through UpdateStack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import secrets
import threading
from typing import Any

import jinja2
from botocore.exceptions import BotoCoreError, ClientError

from annex_gahp import names
from annex_gahp.cloud.aws import fleet
from annex_gahp.cloud.aws.session import aws_errors, cloud_error, error_code, stack_failure_reasons
from annex_gahp.errors import CloudError, InputError

log = logging.getLogger(__name__)

TEMPLATE = "annex-stack.json.j2"
# What CreateStack declares in ResourceTypes: the runtime policy allows stacks only of these.
RESOURCE_TYPES = ("AWS::AutoScaling::AutoScalingGroup", "AWS::EC2::LaunchTemplate")
GROUP_TAG = "aws:autoscaling:groupName"
# On the groups and (propagated) their instances: the stack they belong to.
STACK_TAG = "htcondor-annex:stack"
# The token bucket's name (random: new_bucket_name), on the groups and so on the instances:
# an annex rebuilt from its instances' tags (state file lost) still gets its bucket deleted.
BUCKET_TAG = "htcondor-annex:token-bucket"
TOKEN_KEY = "token"  # noqa: S105 - the object's key, not a secret
BUCKET_PREFIX = "htcondor-annex-"
MAX_BUCKET = 63

# --- names ----------------------------------------------------------------------------------

_STACK_UNSAFE = re.compile(r"[^A-Za-z0-9-]+")
_BUCKET_UNSAFE = re.compile(r"[^a-z0-9]+")


def _digest(*parts: str, size: int = 8) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:size]


def stack_name(pool_id: str, owner: str, annex: str, wanted: str = "") -> str:
    """The user's `annex_stack_name`, else `htcondor-annex-<owner>-<annex>-<hash>`: a letter
    first, letters, digits and `-` only, at most 128; the hash of (pool, owner, annex) keeps
    owners whose names sanitise alike, and other pools in the account, apart."""
    if wanted:
        return wanted
    safe_owner = _STACK_UNSAFE.sub("-", owner).strip("-")[:40] or "owner"
    return f"htcondor-annex-{safe_owner}-{annex}-{_digest(pool_id, owner, annex)}"[:128]


def _bucket_safe(text: str) -> str:
    return _BUCKET_UNSAFE.sub("-", text.lower()).strip("-")


def bucket_prefix(central_manager: str) -> str:
    """`htcondor-annex-<central manager, S3-safe, at most 20 characters>-`: every token bucket
    of the pool starts so (the IAM policies allow exactly these buckets)."""
    cm = _bucket_safe(central_manager)[:20].strip("-") or "pool"
    return f"{BUCKET_PREFIX}{cm}-"


def bucket_name(central_manager: str, pool_id: str, owner: str, annex: str) -> str:
    """`htcondor-annex-<cm>-<annex>-<hash8>`, S3's rules: lower case, digits and `-`, 3..63.

    The 2016 name was `htcondor-annex-<safe central manager>-<annex>`; the hash of (pool,
    owner, annex) makes it unique per owner too (two users may both have an annex `a1`), and
    keeps apart annex names that differ only in case. Bucket names are global across AWS
    accounts, which the hash also makes a collision with someone else's bucket unlikely."""
    prefix = bucket_prefix(central_manager)
    suffix = "-" + _digest(pool_id, owner, annex)
    room = MAX_BUCKET - len(prefix) - len(suffix)
    middle = _bucket_safe(annex)[:room].strip("-") or "annex"
    return f"{prefix}{middle}{suffix}"


def new_bucket_name(central_manager: str, annex: str) -> str:
    """`htcondor-annex-<cm>-<annex>-<16 random hex digits>`, S3's rules, for a new annex.

    Bucket names are global across AWS accounts: a predictable name (bucket_name) can be made
    first by someone else, with a policy that lets us write our token into it. A random suffix
    cannot; the name is kept in the annex's record (its token location)."""
    prefix = bucket_prefix(central_manager)
    suffix = "-" + secrets.token_hex(8)
    room = MAX_BUCKET - len(prefix) - len(suffix)
    middle = _bucket_safe(annex)[:room].strip("-") or "annex"
    return f"{prefix}{middle}{suffix}"


_ACCOUNTS: dict[str, str] = {}
_ACCOUNTS_LOCK = threading.Lock()


def account_id(sts: Any) -> str:
    """Our AWS account (STS GetCallerIdentity), asked once per process and endpoint: every S3
    call on a token bucket names it as ExpectedBucketOwner, so a bucket of another account
    is refused by S3 itself, never written to."""
    key = sts.meta.endpoint_url
    with _ACCOUNTS_LOCK:
        if key in _ACCOUNTS:
            return _ACCOUNTS[key]
    with aws_errors("find this helper's AWS account (sts:GetCallerIdentity)"):
        account = str(sts.get_caller_identity()["Account"])
    with _ACCOUNTS_LOCK:
        _ACCOUNTS[key] = account
    return account


def _owner(account: str) -> dict[str, str]:
    return {"ExpectedBucketOwner": account} if account else {}


def token_location(bucket: str) -> str:
    return f"s3://{bucket}/{TOKEN_KEY}"


def parse_location(location: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    if not location.startswith("s3://") or "/" not in location[5:]:
        raise InputError(f"not an S3 token location: {location!r}")
    bucket, key = location[5:].split("/", 1)
    return bucket, key


# --- the token bucket -----------------------------------------------------------------------


def put_token(
    s3: Any, bucket: str, token: str, tags: dict[str, str], region: str, *, account: str = ""
) -> str:
    """Create the annex's bucket (or reuse it when it is already ours) and store the token.

    `account`: ours (account_id); every call on the bucket then carries ExpectedBucketOwner,
    so a bucket of the same name in another account is refused (403), never reused.

    A bucket created by this call is deleted again when any later step fails, so a failed
    upload leaves nothing behind. Returns the `s3://bucket/key` location."""
    # Asked first: in us-east-1 CreateBucket answers 200 for a bucket we already own, so its
    # answer cannot tell what this call created (and may roll back). A listing, not HeadBucket:
    # both need s3:ListBucket on AWS, but moto checks HeadBucket as an action of its own.
    created = False
    try:
        s3.list_objects_v2(Bucket=bucket, MaxKeys=1, **_owner(account))
    except ClientError as err:
        if error_code(err) not in ("404", "NoSuchBucket", "NotFound"):
            failed = cloud_error(err, f"look for token bucket {bucket}")
            if error_code(err) in ("403", "AccessDenied"):
                failed = CloudError(f"{failed} (the name may be taken in another AWS account)")
            raise failed from None
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            s3.create_bucket(**kwargs)
        except ClientError as create_err:
            if error_code(create_err) != "BucketAlreadyOwnedByYou":
                raise cloud_error(create_err, f"create token bucket {bucket}") from None
        else:
            created = True
            log.info("created token bucket %s", bucket)
    try:
        with aws_errors(f"store the instance token in s3://{bucket}/{TOKEN_KEY}"):
            s3.put_bucket_tagging(
                Bucket=bucket,
                **_owner(account),
                Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]},
            )
            s3.put_object(
                Bucket=bucket,
                **_owner(account),
                Key=TOKEN_KEY,
                Body=token.encode(),
                ServerSideEncryption="AES256",
                ContentType="text/plain",
            )
    except CloudError:
        if created:
            delete_bucket(s3, bucket, account)
            log.warning("token upload to %s failed: bucket deleted again", bucket)
        raise
    log.info("stored instance token in s3://%s/%s", bucket, TOKEN_KEY)
    return token_location(bucket)


def delete_bucket(s3: Any, bucket: str, account: str = "") -> bool:
    """Empty and delete the bucket (ours only, with `account`); False if it was already gone."""
    owner = _owner(account)
    try:
        listed = s3.list_objects_v2(Bucket=bucket, **owner).get("Contents", [])
        for item in listed:
            s3.delete_object(Bucket=bucket, Key=item["Key"], **owner)
        s3.delete_bucket(Bucket=bucket, **owner)
    except ClientError as err:
        if error_code(err) in ("NoSuchBucket", "404"):
            return False
        raise cloud_error(err, f"delete token bucket {bucket}") from None
    log.info("deleted token bucket %s", bucket)
    return True


# --- the template ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Group:
    logical: str  # Group0, Group1, ...
    instance_type: str
    image: str | None
    price: str | None


def groups_for(plan: fleet.LaunchPlan) -> list[Group]:
    """One group per instance type, in the user's order (images and prices: one, or per type)."""
    if not plan.instance_types:
        raise InputError(
            "no instance type: set annex_instance_types or ANNEX_DEFAULT_INSTANCE_TYPES"
        )
    images = plan.per_type(plan.image_ids, "annex_image_ids")
    prices = plan.per_type(plan.spot_prices, "annex_spot_prices")
    return [
        Group(f"Group{i}", itype, images[i], prices[i])
        for i, itype in enumerate(plan.instance_types)
    ]


def split(current: list[int], target: int) -> list[int]:
    """Raise the groups' capacities to `target` in all, one at a time to the smallest group
    (ties: the earlier, i.e. preferred, type). Never lowers a group: shrinking picks
    instances, not groups."""
    out = list(current)
    if not out:
        return out
    while sum(out) < target:
        i = min(range(len(out)), key=lambda k: (out[k], k))
        out[i] += 1
    return out


def _environment() -> jinja2.Environment:
    return jinja2.Environment(  # noqa: S701 - JSON, every value goes through tojson
        loader=jinja2.PackageLoader("annex_gahp", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def group_template_data(base: dict[str, Any], plan: fleet.LaunchPlan, group: Group) -> dict:
    data = fleet.annex_template_data(base, plan)
    data["InstanceType"] = group.instance_type
    if group.image:
        data["ImageId"] = group.image
    if group.price:
        data["InstanceMarketOptions"] = {
            "MarketType": "spot",
            "SpotOptions": {"MaxPrice": group.price, "SpotInstanceType": "one-time"},
        }
    if "ImageId" not in data:
        raise InputError(
            "no image for the instances: set annex_image_ids or ANNEX_DEFAULT_IMAGE_ID "
            "(and re-run `htcondor-annex setup`)"
        )
    return data


def stack_tags(plan: fleet.LaunchPlan) -> dict[str, str]:
    """The stack's own tags: the contract's, except `expires`. CloudFormation copies stack
    tags onto what it creates, and the stack's would go stale on an extension (changing them
    takes an UpdateStack); the groups and instances carry a current `expires`."""
    return {k: v for k, v in plan.tags().items() if k != names.TAG_EXPIRES}


def render_template(
    plan: fleet.LaunchPlan,
    name: str,
    base: dict[str, Any],
    desired: list[int],
    *,
    max_size: int,
) -> str:
    groups = groups_for(plan)
    if len(desired) != len(groups):
        raise AssertionError("one desired capacity per group")
    rendered = [
        {
            "logical": g.logical,
            "template": g.logical.replace("Group", "LaunchTemplate"),
            "template_name": f"{name[:110]}-{g.logical.lower()}",
            "data": group_template_data(base, plan, g),
            "desired": str(d),
            "max": str(max(max_size, d)),
        }
        for g, d in zip(groups, desired)  # equal lengths: checked above (3.9 has no strict=)
    ]
    text = (
        _environment()
        .get_template(TEMPLATE)
        .render(
            annex=plan.annex,
            owner=plan.owner,
            pool_id=plan.pool_id,
            groups=rendered,
            subnets=list(plan.subnets),
            # Named on the template itself, so its CreateLaunchTemplate carries the pool tag
            # (the runtime policy's condition) and its deletion finds it.
            template_tags=[{"Key": k, "Value": v} for k, v in stack_tags(plan).items()],
            group_tags=[
                {"Key": k, "Value": v, "PropagateAtLaunch": True}
                for k, v in (
                    plan.tags()
                    | {STACK_TAG: name}
                    | ({BUCKET_TAG: plan.token_bucket} if plan.token_bucket else {})
                ).items()
            ],
        )
    )
    json.loads(text)  # a rendering mistake shows here, not as a CloudFormation error
    return text


# --- reading a stack ------------------------------------------------------------------------


@dataclasses.dataclass
class GroupView:
    logical: str
    name: str
    desired: int
    max_size: int
    instance_ids: list[str]


@dataclasses.dataclass
class StackView:
    name: str
    stack_id: str
    status: str
    tags: dict[str, str]
    groups: list[GroupView]

    @property
    def instance_ids(self) -> list[str]:
        return [i for g in self.groups for i in g.instance_ids]


def describe(cfn: Any, asg: Any, name: str) -> StackView | None:
    """The stack and its groups, or None when there is no such (undeleted) stack."""
    try:
        stacks = cfn.describe_stacks(StackName=name)["Stacks"]
    except ClientError as err:
        if error_code(err) == "ValidationError" and "does not exist" in str(err):
            return None
        raise cloud_error(err, f"describe stack {name}") from None
    if not stacks or stacks[0]["StackStatus"] == "DELETE_COMPLETE":
        return None
    stack = stacks[0]
    view = StackView(
        name=name,
        stack_id=stack["StackId"],
        status=stack["StackStatus"],
        tags={t["Key"]: t["Value"] for t in stack.get("Tags", [])},
        groups=[],
    )
    with aws_errors(f"describe the groups of stack {name}"):
        resources = cfn.describe_stack_resources(StackName=name)["StackResources"]
        physical = {
            r["LogicalResourceId"]: r["PhysicalResourceId"]
            for r in resources
            if r["ResourceType"] == "AWS::AutoScaling::AutoScalingGroup"
            and r.get("PhysicalResourceId")
        }
        found: dict[str, dict[str, Any]] = {}
        names_ = list(physical.values())
        for start in range(0, len(names_), 50):
            batch = names_[start : start + 50]
            for page in asg.get_paginator("describe_auto_scaling_groups").paginate(
                AutoScalingGroupNames=batch
            ):
                for group in page["AutoScalingGroups"]:
                    found[group["AutoScalingGroupName"]] = group
    for logical in sorted(physical, key=lambda k: (len(k), k)):
        group = found.get(physical[logical])
        if group is None:
            continue
        view.groups.append(
            GroupView(
                logical=logical,
                name=group["AutoScalingGroupName"],
                desired=int(group["DesiredCapacity"]),
                max_size=int(group["MaxSize"]),
                instance_ids=[
                    i["InstanceId"]
                    for i in group.get("Instances", [])
                    if not i.get("LifecycleState", "").startswith("Terminat")
                ],
            )
        )
    return view


def owned_by(view: StackView, pool_id: str, annex: Any) -> bool:
    """Whether the stack is this annex's (`annex`: anything with .owner and .name)."""
    return (
        view.tags.get(names.TAG_POOL) == pool_id
        and view.tags.get(names.TAG_OWNER) == annex.owner
        and view.tags.get(names.TAG_NAME) == annex.name
    )


def _check_ours(view: StackView, plan: fleet.LaunchPlan) -> None:
    mine = {names.TAG_POOL: plan.pool_id, names.TAG_OWNER: plan.owner, names.TAG_NAME: plan.annex}
    if any(view.tags.get(k) != v for k, v in mine.items()):
        raise CloudError(
            f"stack {view.name} exists and is not annex {plan.annex} of {plan.owner} in this "
            "pool: choose another annex_stack_name"
        )


# --- changing a stack -----------------------------------------------------------------------


@dataclasses.dataclass
class EnsureResult:
    stack_id: str
    instance_ids: list[str]
    created: bool
    changed: bool
    errors: list[str] = dataclasses.field(default_factory=list)


_SETTLING = ("CREATE_IN_PROGRESS", "UPDATE_IN_PROGRESS", "UPDATE_COMPLETE_CLEANUP_IN_PROGRESS")
_FAILED = ("CREATE_FAILED", "ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "ROLLBACK_IN_PROGRESS")


def ensure(
    cfn: Any,
    asg: Any,
    plan: fleet.LaunchPlan,
    *,
    name: str,
    base: dict[str, Any],
    target: int,
    max_size: int,
) -> EnsureResult:
    """Make the annex's stack hold `target` instances in all: CreateStack if there is none
    (split across the groups), else raise the groups' desired capacity to `target`. Idempotent:
    asked again for the same target (e.g. after a crash, or while AWS is still launching), it
    makes no change call."""
    view = describe(cfn, asg, name)
    if view is None:
        desired = split([0] * len(groups_for(plan)), target)
        body = render_template(plan, name, base, desired, max_size=max_size)
        action = f"create stack {name} for annex {plan.annex}"
        request: dict[str, Any] = {
            "StackName": name,
            "TemplateBody": body,
            "ResourceTypes": list(RESOURCE_TYPES),
            "Tags": [{"Key": k, "Value": v} for k, v in stack_tags(plan).items()],
            "OnFailure": "DELETE",
        }
        if plan.request_id:
            request["ClientRequestToken"] = plan.request_id[:128]
        try:
            created = cfn.create_stack(**request)
        except ClientError as err:
            if error_code(err) != "AlreadyExistsException":
                raise cloud_error(err, action) from None
            view = describe(cfn, asg, name)
            if view is None:
                raise cloud_error(err, action) from None
        else:
            log.info("annex %s: created stack %s (groups %s)", plan.annex, name, desired)
            view = describe(cfn, asg, name)
            if view is None:  # OnFailure=DELETE already removed it
                raise CloudError(f"{action}: the stack failed and was deleted")
            return EnsureResult(created["StackId"], view.instance_ids, True, True)
    _check_ours(view, plan)
    if view.status.startswith("DELETE"):
        raise CloudError(f"stack {name} is being deleted; the annex is created again after")
    if view.status in _FAILED:
        reason = stack_failure_reasons(cfn, name, limit=3)
        raise CloudError(f"stack {name} failed ({view.status}){': ' + reason if reason else ''}")
    if view.status in _SETTLING or not view.groups:
        return EnsureResult(view.stack_id, [], False, False)
    before = set(view.instance_ids)
    current = [g.desired for g in view.groups]
    wanted = split(current, target)
    changed = False
    # Equal lengths: `current` is one per group and split() keeps its length.
    for group, was, after in zip(view.groups, current, wanted):
        if after == was:
            continue
        with aws_errors(f"grow group {group.name} of annex {plan.annex} to {after}"):
            asg.update_auto_scaling_group(
                AutoScalingGroupName=group.name,
                MinSize=0,
                MaxSize=max(group.max_size, after),
                DesiredCapacity=after,
            )
        changed = True
        log.info("annex %s: group %s %d -> %d", plan.annex, group.name, was, after)
    if changed:
        view = describe(cfn, asg, name) or view
    fresh = [i for i in view.instance_ids if i not in before]
    return EnsureResult(view.stack_id, fresh, False, changed)


def retire_instances(asg: Any, ids: list[str]) -> list[str]:
    """Terminate group members *and* lower their group's capacity, so the group does not
    replace them (one call per instance: the API takes one). Ids no group knows are returned
    for a plain TerminateInstances."""
    strays = []
    for instance_id in ids:
        try:
            asg.terminate_instance_in_auto_scaling_group(
                InstanceId=instance_id, ShouldDecrementDesiredCapacity=True
            )
            log.info("terminated %s with its group's capacity lowered", instance_id)
        except ClientError as err:
            if error_code(err) == "ValidationError":
                strays.append(instance_id)  # not (any more) in a group
                continue
            raise cloud_error(err, f"terminate {instance_id} in its Auto Scaling group") from None
        except BotoCoreError as err:  # e.g. an unparsable answer (moto: an id no group has)
            raise cloud_error(err, f"terminate {instance_id} in its Auto Scaling group") from None
    return strays


def retag_groups(asg: Any, group_names: list[str], tags: dict[str, str]) -> None:
    """Set tags on the groups (PropagateAtLaunch, so instances launched later carry them).
    The pool tag goes along: the runtime policy allows tag writes that name it."""
    if not group_names:
        return
    payload = [
        {
            "ResourceId": g,
            "ResourceType": "auto-scaling-group",
            "Key": k,
            "Value": v,
            "PropagateAtLaunch": True,
        }
        for g in group_names
        for k, v in tags.items()
    ]
    with aws_errors(f"retag {len(group_names)} Auto Scaling group(s)"):
        for start in range(0, len(payload), 50):
            asg.create_or_update_tags(Tags=payload[start : start + 50])


def delete(cfn: Any, name: str, expect: dict[str, str] | None = None) -> str:
    """Ask for the stack's deletion (its groups, templates and instances go with it).

    `expect`: tags the stack must carry to be deleted (the annex's pool, owner and name): an
    annex whose stack name was taken by someone else's stack never deletes that stack.
    Returns the status after the call: "" = gone (or not ours); DELETE_IN_PROGRESS = AWS is
    at it."""
    with aws_errors(f"delete stack {name}"):
        try:
            stacks = cfn.describe_stacks(StackName=name)["Stacks"]
        except ClientError as err:
            if error_code(err) == "ValidationError" and "does not exist" in str(err):
                return ""
            raise
        if not stacks or stacks[0]["StackStatus"] == "DELETE_COMPLETE":
            return ""
        tags = {t["Key"]: t["Value"] for t in stacks[0].get("Tags", [])}
        if expect and any(tags.get(k) != v for k, v in expect.items()):
            log.warning("stack %s is not this annex's (tags %s): left alone", name, tags)
            return ""
        if stacks[0]["StackStatus"] != "DELETE_IN_PROGRESS":
            cfn.delete_stack(StackName=name)
            log.info("deleting stack %s", name)
        try:
            after = cfn.describe_stacks(StackName=stacks[0]["StackId"])["Stacks"]
        except ClientError:
            return ""
    status = after[0]["StackStatus"] if after else ""
    return "" if status == "DELETE_COMPLETE" else status
