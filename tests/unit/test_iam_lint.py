"""parliament (the IAM policy linter) on the policies the setup stack deploys: the helper's
runtime policy, the instance role's and the lease enforcer's, taken from the rendered template
with its CloudFormation intrinsics resolved as AWS would (one account, partition aws). A finding
fails the test unless ACCEPTED lists it with its reason."""

from __future__ import annotations

import fnmatch
import json
import re
from typing import Any

import pytest
from aws_fixtures import aws_setup_template
from parliament import analyze_policy_string

ACCOUNT = "123456789012"

# RESOURCE_STAR (an action that could name resources is granted on "*"), accepted per statement:
# (policy, Sid) -> why "*" is right there. A new statement on "*" fails until it is listed.
ACCEPTED_RESOURCE_STAR: dict[tuple[str, str], str] = {
    ("runtime", "Describe"): "reads: the helper finds its own instances by tag filters",
    ("runtime", "CreateTaggedForThisPool"): "a new resource has no ARN yet; aws:RequestTag pins "
    "the pool tag",
    ("runtime", "ManageThisPoolsResources"): "any resource of this pool: aws:ResourceTag pins it",
    ("runtime", "ConsoleOfThisPool"): "the console of any instance of this pool (liveness): "
    "aws:ResourceTag pins it",
    ("runtime", "FleetServiceLinkedRoles"): "iam:AWSServiceName limits it to spot, ec2fleet and "
    "autoscaling",
    ("runtime", "StackStrategyCreate"): "a new stack has no ARN yet; aws:RequestTag pins the "
    "pool tag",
    ("runtime", "StackStrategyOwnStacks"): "any stack of this pool: aws:ResourceTag pins it",
    ("runtime", "StackStrategyRead"): "reads of stacks and groups, which the helper names itself",
    ("runtime", "StackStrategyGroupsCreate"): "a new group has no ARN yet; aws:RequestTag pins "
    "the pool tag",
    ("runtime", "StackStrategyGroupsManage"): "any group of this pool: aws:ResourceTag pins it",
    ("enforcer", "TerminateThisPool"): "any instance of this pool: aws:ResourceTag pins it",
    ("enforcer", "EmptyThisPoolsGroups"): "any group of this pool: aws:ResourceTag pins it",
    ("enforcer", "Logs"): "the function's own log group, which CloudFormation names at create",
}
# Other findings, accepted by (policy, issue, text in each of the finding's actions, types or
# details) -> why. parliament does not weigh Condition blocks, which is where most of these end.
ACCEPTED_OTHER: dict[tuple[str, str, str], str] = {
    ("runtime", "PERMISSIONS_MANAGEMENT_ACTIONS", "iam:passrole"): "only the pool's instance "
    "role (one ARN), only to EC2 (iam:PassedToService)",
    ("runtime", "PERMISSIONS_MANAGEMENT_ACTIONS", "iam:createservicelinkedrole"): "only the "
    "spot, ec2fleet and autoscaling roles (iam:AWSServiceName)",
    ("runtime", "PRIVILEGE_ESCALATION", "CreateEC2WithExistingIP"): "the design: instances get "
    "the instance role, which reads only that instance's own token",
    ("runtime", "PRIVILEGE_ESCALATION", "PassExistingRoleToCloudFormation"): "PassRole is "
    "limited to ec2.amazonaws.com, so no stack can be handed a role",
    ("runtime", "RESOURCE_MISMATCH", "ec2:CreateFleet"): "LaunchFromExistingInputs grants the "
    "launch inputs; the new fleet/instances are CreateTaggedForThisPool's",
    ("runtime", "RESOURCE_MISMATCH", "ec2:RunInstances"): "as for CreateFleet: inputs here, the "
    "new instances in CreateTaggedForThisPool",
    ("instance", "UNKNOWN_CONDITION_FOR_ACTION", "ssm:resourceTag/"): "AWS documents "
    "ssm:resourceTag/<key> for parameters; parliament's action table lacks it",
}


def _keys(finding: Any) -> list[str]:
    """What an ACCEPTED_OTHER entry must name: the finding's actions, its type, or its detail."""
    location = finding.location if isinstance(finding.location, dict) else {}
    if location.get("type"):
        return [str(location["type"])]
    if location.get("actions"):
        return [str(a) for a in location["actions"]]
    detail = finding.detail if isinstance(finding.detail, list) else [finding.detail]
    return [str(d["action"]) if isinstance(d, dict) and "action" in d else str(d) for d in detail]


def _resolve(value: Any) -> Any:
    """CloudFormation intrinsics as AWS resolves them in one account (policy variables such
    as ${ec2:SourceInstanceARN} stay: they are IAM's, not CloudFormation's)."""
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"Fn::Sub"}:
        pseudo = {"AWS::AccountId": ACCOUNT, "AWS::Partition": "aws", "AWS::Region": "us-east-1"}
        return re.sub(r"\$\{(AWS::\w+)\}", lambda m: pseudo[m.group(1)], value["Fn::Sub"])
    if set(value) == {"Fn::GetAtt"}:
        logical, attribute = value["Fn::GetAtt"]
        assert attribute == "Arn", value
        return f"arn:aws:iam::{ACCOUNT}:role/annex-setup-{logical}-0ABCDEF"
    if set(value) == {"Ref"}:
        return f"annex-setup-{value['Ref']}-0ABCDEF"
    return {k: _resolve(v) for k, v in value.items()}


def deployed_policies() -> dict[str, dict[str, Any]]:
    resources = aws_setup_template()["Resources"]
    return {
        "runtime": resources["RuntimePolicy"]["Properties"]["PolicyDocument"],
        "instance": resources["InstanceRole"]["Properties"]["Policies"][0]["PolicyDocument"],
        "enforcer": resources["LeaseEnforcerRole"]["Properties"]["Policies"][0]["PolicyDocument"],
    }


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def unaccepted(name: str, document: dict[str, Any]) -> list[str]:
    resolved = _resolve(document)
    text = json.dumps(resolved)
    # Nothing of CloudFormation's left for parliament to trip on.
    assert "Fn::" not in text and "${AWS::" not in text and '"Ref"' not in text, text
    star = [s for s in resolved["Statement"] if s["Resource"] == "*" and s["Effect"] == "Allow"]
    out = []
    for finding in analyze_policy_string(text, include_community_auditors=True).findings:
        if finding.issue == "RESOURCE_STAR":
            # Every action named must come only from accepted statements on "*".
            bad = [
                action
                for action in finding.detail
                if not any(fnmatch.fnmatch(action, a) for s in star for a in _listed(s["Action"]))
                or any(
                    (name, s.get("Sid", "")) not in ACCEPTED_RESOURCE_STAR
                    for s in star
                    if any(fnmatch.fnmatch(action, a) for a in _listed(s["Action"]))
                )
            ]
            if not bad:
                continue
            out.append(f"RESOURCE_STAR {bad}")
            continue
        if all(
            any(
                (name, finding.issue) == (p, issue) and needle in key
                for p, issue, needle in ACCEPTED_OTHER
            )
            for key in _keys(finding)
        ):
            continue
        out.append(f"{finding.issue}: {finding.detail} at {finding.location}")
    return out


@pytest.mark.parametrize("name", ["runtime", "instance", "enforcer"])
def test_deployed_policy_has_no_unaccepted_finding(name: str) -> None:
    assert unaccepted(name, deployed_policies()[name]) == []


def test_every_accepted_finding_still_exists() -> None:
    """An entry whose statement is gone (renamed or scoped) is stale: drop it with the change."""
    policies = deployed_policies()
    sids = {(n, s.get("Sid", "")) for n, d in policies.items() for s in d["Statement"]}
    assert set(ACCEPTED_RESOURCE_STAR) <= sids
    for n, d in policies.items():
        for s in d["Statement"]:
            if (n, s.get("Sid", "")) in ACCEPTED_RESOURCE_STAR:
                assert s["Resource"] == "*", (n, s["Sid"])


def test_the_linter_sees_a_real_finding() -> None:
    """The wiring: an unconditioned statement on "*" and an unknown action are reported."""
    policy = deployed_policies()["runtime"]
    policy["Statement"].append(
        {"Sid": "Oops", "Effect": "Allow", "Action": ["ec2:TerminateInstances"], "Resource": "*"}
    )
    policy["Statement"].append(
        {"Sid": "Typo", "Effect": "Allow", "Action": "ec2:TerminateInstance", "Resource": "*"}
    )
    found = " ".join(unaccepted("runtime", policy))
    assert "RESOURCE_STAR ['ec2:TerminateInstances']" in found
    assert "UNKNOWN_ACTION" in found
