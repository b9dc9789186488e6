"""cfn-lint on the CloudFormation templates the project renders: the admin's setup stack and an
annex's stack (stack strategy), as they go to AWS. Any finding fails, informational ones too;
none is accepted today (add one to ACCEPTED with a one-line reason if it must be)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_fixtures import aws_annex_template, aws_setup_template
from cfnlint.api import ManualArgs, lint

# (rule id, resource path prefix) -> why it is accepted. Empty: the templates lint clean.
ACCEPTED: dict[tuple[str, str], str] = {}
REGIONS = ["us-east-1", "eu-west-1", "ap-southeast-2"]


def findings(template: dict[str, Any]) -> list[str]:
    matches = lint(json.dumps(template), config=ManualArgs(regions=REGIONS, include_checks=["I"]))
    out = []
    for m in matches:
        path = "/".join(str(p) for p in m.path) if hasattr(m, "path") else ""
        if any(m.rule.id == rule and path.startswith(where) for rule, where in ACCEPTED):
            continue
        out.append(f"{m.rule.id} {path}: {m.message}")
    return out


@pytest.mark.parametrize("render", [aws_setup_template, aws_annex_template])
def test_template_lints_clean(render) -> None:
    assert findings(render()) == []


def test_the_linter_sees_a_broken_template() -> None:
    """The wiring: a clean result above means cfn-lint ran on the template, not on nothing."""
    template = aws_setup_template()
    template["Resources"]["InstanceRole"]["Properties"]["NoSuchProperty"] = 1
    del template["Resources"]["BaseLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    found = " ".join(findings(template))
    assert "E3002" in found and "NoSuchProperty" in found  # unknown property
    assert "E3003" in found and "LaunchTemplateData" in found  # required property missing
