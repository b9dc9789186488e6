"""No secret reaches logs, ClassAds, user data, the helper's records or its answers.

A live pool-mode annex has a real IDTOKEN in the emulator's SSM and on its instance; the
helper has AWS credentials. The test reads those secrets and greps everything an operator or
another user could see during that run for them.
"""

from __future__ import annotations

import base64
import configparser
import gzip
import subprocess
import uuid
from pathlib import Path

import pytest
import sandbox

pytestmark = pytest.mark.sandbox

USER = "alice"


def _secrets(name: str) -> dict[str, str]:
    ssm = sandbox.aws_client("ssm")
    found = {}
    pages = ssm.get_paginator("describe_parameters").paginate()
    names = [p["Name"] for page in pages for p in page["Parameters"]]
    parameter = next(n for n in names if n.endswith(f"/{USER}/{name}"))
    token = ssm.get_parameter(Name=parameter, WithDecryption=True)["Parameter"]["Value"]
    found["annex token"] = token
    # A JWT's header and payload are public; its signature is what makes it a credential.
    found["annex token signature"] = token.rsplit(".", 1)[-1]
    credentials = configparser.ConfigParser()
    credentials.read(Path("~condor/.aws/credentials").expanduser())
    for section in credentials.sections():
        secret = credentials[section].get("aws_secret_access_key")
        if secret:
            found[f"helper's AWS secret key [{section}]"] = secret
    return found


def _text_files(*roots: Path) -> dict[str, str]:
    texts = {}
    for root in roots:
        if not root.exists():
            continue
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000:
                texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    return texts


def _user_data(instance_ids: list[str]) -> dict[str, str]:
    ec2 = sandbox.ec2_client()
    texts = {}
    for instance_id in instance_ids:
        raw = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        data = base64.b64decode(raw.get("UserData", {}).get("Value", "") or b"")
        if data.startswith(b"\x1f\x8b"):
            data = gzip.decompress(data)
        texts[f"user data of {instance_id}"] = data.decode("utf-8", "replace")
    for template in ec2.describe_launch_templates()["LaunchTemplates"]:
        versions = ec2.describe_launch_template_versions(
            LaunchTemplateId=template["LaunchTemplateId"]
        )["LaunchTemplateVersions"]
        for version in versions:
            data = version["LaunchTemplateData"].get("UserData", "")
            raw = base64.b64decode(data) if data else b""
            if raw.startswith(b"\x1f\x8b"):
                raw = gzip.decompress(raw)
            texts[f"launch template {template['LaunchTemplateName']}"] = raw.decode(
                "utf-8", "replace"
            ) + str(version["LaunchTemplateData"])
    return texts


def _command(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout


def test_no_secret_in_logs_ads_user_data_or_records() -> None:
    name = f"sec-{uuid.uuid4().hex[:6]}"
    sandbox.run_as(
        USER, "htcondor-annex", "create", "--name", name, "--instances", "1", "--lease", "30m"
    )
    try:
        # The instance fetched its token and its startd joined with it: the secret is in use.
        sandbox.wait_for(
            lambda: sandbox.query_ads("Startd", f'AnnexName == "{name}"'),
            timeout=180,
            what=f"the startd of annex {name}",
        )
        secrets = _secrets(name)
        running = sandbox.instances([{"Name": "tag:htcondor-annex:name", "Values": [name]}])
        ids = [i["InstanceId"] for i in running]
        haystacks: dict[str, str] = {}
        haystacks.update(_text_files(Path("/var/log"), Path("/var/spool/condor/annex")))
        for instance_id in ids:
            root = sandbox.instance_root(instance_id)
            haystacks.update(_text_files(root / "var/log"))
            haystacks[f"console of {instance_id}"] = sandbox.console_log(instance_id)
        haystacks.update(_user_data(ids))
        haystacks["collector ads"] = _command("condor_status", "-any", "-long")
        haystacks["job ads"] = _command("condor_q", "-all", "-long")
        haystacks["annex status as the owner"] = sandbox.run_as(
            USER, "htcondor-annex", "status", "--name", name, "--json"
        ).stdout
        assert len(haystacks) > 10, sorted(haystacks)  # the search really covered something
        # Control: the secret we look for is the one the instance really holds and uses.
        held = (sandbox.instance_root(ids[0]) / "etc/condor/tokens.d/annex").read_text()
        assert secrets["annex token"] in held
        leaks = [
            f"{what} in {where}"
            for what, secret in secrets.items()
            for where, text in haystacks.items()
            if secret and secret in text
        ]
        assert leaks == []
    finally:
        sandbox.run_as(USER, "htcondor-annex", "delete", "--name", name, check=False)
