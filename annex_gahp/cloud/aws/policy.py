"""IAM policy documents: the one source for the setup stack's template and docs/iam.md.

ARNs are passed in, so the same functions serve CloudFormation (intrinsics such as
`{"Fn::GetAtt": [...]}`) and documentation (placeholders).

`emulator=True` widens ARN-scoped statements to `Resource: "*"`: moto checks every non-S3 call
against resource `*`, so a statement scoped to ARNs is denied there. S3 statements keep their
ARNs (moto checks S3 calls against the bucket and object ARNs, as AWS does). Tag conditions are
kept either way (moto ignores them; AWS enforces them). The one statement the emulator form
leaves out is the conditional Deny on setup-kind stacks: moto ignores conditions, so there it
would deny every stack, the `stack` strategy's included. `htcondor-annex setup` uses emulator
mode only when ANNEX_AWS_ENDPOINT_URL is set.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from annex_gahp import names

VERSION = "2012-10-17"

# What the launch calls touch without creating it: allowed unconditionally (AWS evaluates
# RunInstances/CreateFleet per resource; request tags exist only for created resources).
LAUNCH_INPUT_RESOURCES = (
    "image",
    "subnet",
    "security-group",
    "network-interface",
    "key-pair",
    "launch-template",
    "placement-group",
    "spot-instances-request",
)

# Resource types a stack-strategy stack may hold; setup-kind stacks (IAM, Lambda, Events) are
# refused by this list on AWS, and by the missing iam/lambda/events rights besides.
STACK_RESOURCE_TYPES = ("AWS::AutoScaling::*", "AWS::EC2::LaunchTemplate")
SETUP_KIND_RESOURCE_TYPES = ("AWS::IAM::*", "AWS::Lambda::*", "AWS::Events::*")


def _ec2_arns(kinds: tuple[str, ...], *, literal: bool = False) -> list[Any]:
    out: list[Any] = []
    for kind in kinds:
        if literal:
            out.append(f"arn:aws:ec2:*:{'' if kind == 'image' else '<ACCOUNT>'}:{kind}/*")
            continue
        account = "" if kind == "image" else "${AWS::AccountId}"
        out.append({"Fn::Sub": f"arn:${{AWS::Partition}}:ec2:*:{account}:{kind}/*"})
    return out


def token_parameter_arn(path: str) -> dict[str, str]:
    """CloudFormation value for the ARN of every parameter under `path` (e.g. /a/b)."""
    clean = "/" + path.strip("/")
    return {"Fn::Sub": f"arn:${{AWS::Partition}}:ssm:*:${{AWS::AccountId}}:parameter{clean}/*"}


def token_bucket_arns(central_manager: str, *, literal: bool = False) -> dict[str, Any]:
    """The stack strategy's token buckets (aws/stack.bucket_name): {"buckets": ..., "objects":
    ...} as CloudFormation values, or as plain ARNs (`literal`, for the docs)."""
    from annex_gahp.cloud.aws.stack import bucket_prefix  # noqa: PLC0415 - keep this module light

    prefix = bucket_prefix(central_manager)
    if literal:
        return {"buckets": f"arn:aws:s3:::{prefix}*", "objects": f"arn:aws:s3:::{prefix}*/*"}
    return {
        "buckets": {"Fn::Sub": f"arn:${{AWS::Partition}}:s3:::{prefix}*"},
        "objects": {"Fn::Sub": f"arn:${{AWS::Partition}}:s3:::{prefix}*/*"},
    }


def _pool_condition(kind: str, pool_id: str) -> dict[str, Any]:
    return {"StringEquals": {f"aws:{kind}/{names.TAG_POOL}": pool_id}}


def runtime_policy_document(
    *,
    pool_id: str,
    token_parameters: Any,
    instance_role_arn: Any,
    token_buckets: dict[str, Any] | None = None,
    stack_arn_prefix: Any = None,
    launch_inputs: Any = None,
    emulator: bool = False,
) -> dict[str, Any]:
    """Least privilege for the everyday principal (the helper's AWS identity).

    Everything it creates must carry htcondor-annex:pool = pool_id; everything it changes or
    destroys must already carry it. Reads are unconditional (AWS has no tag conditions there).
    """

    def scoped(resource: Any) -> Any:
        return "*" if emulator else resource

    statements: list[dict[str, Any]] = [
        {
            "Sid": "Describe",
            "Effect": "Allow",
            "Action": ["ec2:Describe*", "ec2:GetLaunchTemplateData"],
            "Resource": "*",
        },
        {
            "Sid": "CreateTaggedForThisPool",
            "Effect": "Allow",
            "Action": ["ec2:CreateFleet", "ec2:RunInstances", "ec2:CreateLaunchTemplate"],
            "Resource": "*",
            "Condition": _pool_condition("RequestTag", pool_id),
        },
        {
            "Sid": "LaunchFromExistingInputs",
            "Effect": "Allow",
            "Action": ["ec2:CreateFleet", "ec2:RunInstances"],
            "Resource": scoped(launch_inputs or _ec2_arns(LAUNCH_INPUT_RESOURCES)),
        },
        {
            "Sid": "TagOnlyWhileCreating",
            "Effect": "Allow",
            "Action": "ec2:CreateTags",
            "Resource": "*",
            "Condition": {
                "StringEquals": {
                    "ec2:CreateAction": ["CreateFleet", "RunInstances", "CreateLaunchTemplate"]
                }
            },
        },
        {
            "Sid": "ManageThisPoolsResources",
            "Effect": "Allow",
            "Action": [
                "ec2:CreateTags",
                "ec2:TerminateInstances",
                "ec2:CreateLaunchTemplateVersion",
                "ec2:ModifyLaunchTemplate",
                "ec2:DeleteLaunchTemplate",
                "ec2:DeleteFleets",
            ],
            "Resource": "*",
            "Condition": _pool_condition("ResourceTag", pool_id),
        },
        {
            # Liveness: the tail of an instance that never joined goes into its annex's
            # LastError (controllers/liveness.py).
            "Sid": "ConsoleOfThisPool",
            "Effect": "Allow",
            "Action": "ec2:GetConsoleOutput",
            "Resource": "*",
            "Condition": _pool_condition("ResourceTag", pool_id),
        },
        {
            "Sid": "InstanceTokens",
            "Effect": "Allow",
            "Action": [
                "ssm:PutParameter",
                "ssm:GetParameter",
                "ssm:GetParametersByPath",
                "ssm:DeleteParameter",
                "ssm:AddTagsToResource",
            ],
            "Resource": scoped(token_parameters),
        },
        {
            # `resolve:ssm:` image references (ANNEX_IMAGE_PARAMETER_PREFIXES): AWS's public
            # parameters only, which live in no account.
            "Sid": "PublicImageParameters",
            "Effect": "Allow",
            "Action": "ssm:GetParameter",
            "Resource": scoped("arn:aws:ssm:*:*:parameter/aws/service/*"),
        },
        {
            # The account and partition of the instance ARNs the instance tokens are tagged with
            # (AWS needs no permission for it; the emulator's action-level check does).
            "Sid": "WhoAmI",
            "Effect": "Allow",
            "Action": "sts:GetCallerIdentity",
            "Resource": "*",
        },
        {
            "Sid": "PassTheInstanceRole",
            "Effect": "Allow",
            "Action": "iam:PassRole",
            "Resource": scoped(instance_role_arn),
            "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
        },
        {
            "Sid": "FleetServiceLinkedRoles",
            "Effect": "Allow",
            "Action": "iam:CreateServiceLinkedRole",
            "Resource": "*",
            "Condition": {
                "StringEquals": {
                    "iam:AWSServiceName": [
                        "spot.amazonaws.com",
                        "ec2fleet.amazonaws.com",
                        "autoscaling.amazonaws.com",
                    ]
                }
            },
        },
        {
            "Sid": "StackStrategyCreate",
            "Effect": "Allow",
            "Action": ["cloudformation:CreateStack"],
            "Resource": scoped(stack_arn_prefix or "*"),
            "Condition": {
                **_pool_condition("RequestTag", pool_id),
                "ForAllValues:StringLike": {
                    "cloudformation:ResourceTypes": list(STACK_RESOURCE_TYPES)
                },
                "Null": {"cloudformation:ResourceTypes": "false"},
            },
        },
        {
            # Belt and braces: refused even if broader rights are attached to the principal.
            # Left out of the emulator form: moto ignores the condition, so there it would
            # refuse every stack, the stack strategy's own included.
            "Sid": "NoSetupKindStacks",
            "Effect": "Deny",
            "Action": [
                "cloudformation:CreateStack",
                "cloudformation:UpdateStack",
                "cloudformation:CreateChangeSet",
            ],
            "Resource": "*",
            "Condition": {
                "ForAnyValue:StringLike": {
                    "cloudformation:ResourceTypes": list(SETUP_KIND_RESOURCE_TYPES)
                }
            },
        },
        {
            "Sid": "StackStrategyOwnStacks",
            "Effect": "Allow",
            "Action": ["cloudformation:UpdateStack", "cloudformation:DeleteStack"],
            "Resource": scoped(stack_arn_prefix or "*"),
            "Condition": _pool_condition("ResourceTag", pool_id),
        },
        {
            "Sid": "StackStrategyRead",
            "Effect": "Allow",
            "Action": [
                "cloudformation:DescribeStacks",
                "cloudformation:DescribeStackEvents",
                "cloudformation:DescribeStackResources",
                "cloudformation:ListStackResources",
                "autoscaling:Describe*",
            ],
            "Resource": "*",
        },
        {
            "Sid": "StackStrategyGroupsCreate",
            "Effect": "Allow",
            "Action": ["autoscaling:CreateAutoScalingGroup", "autoscaling:CreateOrUpdateTags"],
            "Resource": "*",
            "Condition": _pool_condition("RequestTag", pool_id),
        },
        {
            "Sid": "StackStrategyGroupsManage",
            "Effect": "Allow",
            "Action": [
                "autoscaling:UpdateAutoScalingGroup",
                "autoscaling:SetDesiredCapacity",
                "autoscaling:TerminateInstanceInAutoScalingGroup",
                "autoscaling:DeleteAutoScalingGroup",
            ],
            "Resource": "*",
            "Condition": _pool_condition("ResourceTag", pool_id),
        },
    ]
    if token_buckets is not None:
        statements.append(
            {
                # The stack strategy's per-annex token buckets, by name (S3 has no request-tag
                # condition on CreateBucket); the bucket is tagged right after creation.
                "Sid": "StackStrategyTokenBuckets",
                "Effect": "Allow",
                "Action": [
                    "s3:CreateBucket",
                    "s3:PutBucketTagging",
                    "s3:ListBucket",
                    "s3:DeleteBucket",
                    "s3:PutObject",
                    "s3:PutObjectTagging",
                    "s3:DeleteObject",
                ],
                "Resource": [token_buckets["buckets"], token_buckets["objects"]],
            }
        )
    if emulator:
        statements = [s for s in statements if s["Sid"] != "NoSetupKindStacks"]
    return {"Version": VERSION, "Statement": statements}


def instance_role_policy_document(
    token_parameters: Any, token_objects: Any = None
) -> dict[str, Any]:
    """What an annex instance may do: read its own copy of its annex's token, nothing else.

    SSM (fleet strategy): a token parameter only when its INSTANCE_TAG is the calling
    instance's own ARN, `ec2:SourceInstanceARN`, which AWS puts in the request context of
    credentials delivered to an instance through its instance profile. So a job or pilot that
    gets the instance's credentials reads that one instance's token, never another annex's.
    S3 (stack strategy): likewise, an object of the pool's token buckets only when its
    INSTANCE_TAG object tag is the calling instance's ARN."""
    from annex_gahp.cloud.aws.secrets import INSTANCE_TAG  # noqa: PLC0415 - keep this module light

    statements: list[dict[str, Any]] = [
        {
            "Sid": "ReadOwnInstanceToken",
            "Effect": "Allow",
            "Action": "ssm:GetParameter",
            "Resource": token_parameters,
            "Condition": {
                "StringEquals": {f"ssm:resourceTag/{INSTANCE_TAG}": "${ec2:SourceInstanceARN}"}
            },
        }
    ]
    if token_objects is not None:
        statements.append(
            {
                "Sid": "ReadOwnInstanceTokenObject",
                "Effect": "Allow",
                "Action": "s3:GetObject",
                "Resource": token_objects,
                "Condition": {
                    "StringEquals": {
                        f"s3:ExistingObjectTag/{INSTANCE_TAG}": "${ec2:SourceInstanceARN}"
                    }
                },
            }
        )
    return {"Version": VERSION, "Statement": statements}


def enforcer_policy_document(pool_id: str) -> dict[str, Any]:
    """The lease enforcer (Lambda): find and terminate this pool's expired instances."""
    return {
        "Version": VERSION,
        "Statement": [
            {"Sid": "Find", "Effect": "Allow", "Action": "ec2:DescribeInstances", "Resource": "*"},
            {
                "Sid": "TerminateThisPool",
                "Effect": "Allow",
                "Action": "ec2:TerminateInstances",
                "Resource": "*",
                "Condition": _pool_condition("ResourceTag", pool_id),
            },
            {
                # Stack strategy: an expired group is set to 0 rather than its instances
                # terminated (the group would replace them).
                "Sid": "EmptyThisPoolsGroups",
                "Effect": "Allow",
                "Action": "autoscaling:UpdateAutoScalingGroup",
                "Resource": "*",
                "Condition": _pool_condition("ResourceTag", pool_id),
            },
            {
                "Sid": "Logs",
                "Effect": "Allow",
                "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
                "Resource": "*",
            },
        ],
    }


def trust_policy(service: str) -> dict[str, Any]:
    return {
        "Version": VERSION,
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": service},
                "Action": "sts:AssumeRole",
            }
        ],
    }


def docs_policy(
    pool_id: str,
    token_prefix: str = "/htcondor-annex/tokens",  # noqa: S107 - a path, not a secret
    central_manager: str = "",
) -> dict[str, Any]:
    """The runtime policy as docs/iam.md shows it: placeholders where the stack has ARNs.
    The central manager (which names the token buckets) is the pool id unless given."""
    from annex_gahp.cloud.aws.secrets import pool_path  # noqa: PLC0415 - keep this module light

    return runtime_policy_document(
        pool_id=pool_id,
        token_buckets=token_bucket_arns(central_manager or pool_id, literal=True),
        token_parameters=f"arn:aws:ssm:*:<ACCOUNT>:parameter{pool_path(token_prefix, pool_id)}/*",
        instance_role_arn="arn:aws:iam::<ACCOUNT>:role/<SETUP-STACK>-InstanceRole-<SUFFIX>",
        launch_inputs=_ec2_arns(LAUNCH_INPUT_RESOURCES, literal=True),
    )


def docs_policy_json(pool_id: str) -> str:
    return json.dumps(docs_policy(pool_id), indent=2)


if __name__ == "__main__":
    # `python3 -m annex_gahp.cloud.aws.policy [POOL_ID]` prints what docs/iam.md shows.
    print(docs_policy_json(sys.argv[1] if len(sys.argv) > 1 else "cm.example.org:9618"))
