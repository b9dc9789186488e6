"""Instance tokens as SSM SecureString parameters.

The boot script holds no secret: it names a parameter, and the instance fetches it with its
role's credentials (the setup's instance role may read only the token prefix). The token's
value never reaches a log line; only parameter names do.
"""

from __future__ import annotations

import hashlib
import logging
import re
import urllib.parse
from typing import Any

from botocore.exceptions import ClientError

from annex_gahp.cloud.aws.session import aws_errors, cloud_error, error_code

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,32}$")

# On each instance's copy of its annex's token: the instance's ARN. The instance role may read a
# token parameter only when this tag equals its own ec2:SourceInstanceARN (policy.py).
INSTANCE_TAG = "htcondor-annex:instance-arn"


def _safe(part: str) -> str:
    """A path element SSM accepts; a short hash keeps e.g. `cm:9618` and `cm_9618` apart."""
    cleaned = _UNSAFE.sub("_", part)
    if cleaned == part:
        return part
    return f"{cleaned}-{hashlib.sha256(part.encode()).hexdigest()[:8]}"


def pool_path(prefix: str, pool_id: str) -> str:
    """`<prefix>/<pool-safe>`: every token of this pool lives under it."""
    base = "/" + prefix.strip("/") if prefix.strip("/") else ""
    return f"{base}/{_safe(pool_id)}"


def parameter_name(prefix: str, pool_id: str, owner: str, annex: str) -> str:
    """`<prefix>/<pool-safe>/<owner>/<annex>`,
    e.g. /htcondor-annex/tokens/cm.example.org_9618-1a2b3c4d/alice/a1."""
    return f"{pool_path(prefix, pool_id)}/{_safe(owner)}/{_safe(annex)}"


def instance_parameter(annex_parameter: str, instance_id: str) -> str:
    """`<annex parameter>/<instance id>`: the copy of the annex's token one instance may read;
    the instance's agent asks for its own id's (templates/annex-agent.py)."""
    if not _INSTANCE_ID.match(instance_id):
        raise ValueError(f"not an instance id: {instance_id!r}")
    return f"{annex_parameter}/{instance_id}"


def put_object_copy(
    s3: Any, bucket: str, key: str, token: str, tags: dict[str, str], *, account: str
) -> None:
    """The stack strategy's per-instance copy: an object in the annex's token bucket, tagged
    (the instance role's read is conditioned on INSTANCE_TAG). `account` is the bucket's
    expected owner: a bucket someone else holds by the same name gets no token."""
    with aws_errors(f"store an instance token in s3://{bucket}/{key}"):
        s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=token.encode(),
            ServerSideEncryption="AES256",
            Tagging=urllib.parse.urlencode(tags),
            **({"ExpectedBucketOwner": account} if account else {}),
        )
    log.info("stored instance token in s3://%s/%s", bucket, key)


def delete_tree(ssm: Any, name: str) -> int:
    """Remove the annex's token and every instance's copy under it; returns how many."""
    found: list[str] = []
    with aws_errors(f"list the instance tokens under {name}"):
        for page in ssm.get_paginator("get_parameters_by_path").paginate(Path=name):
            found += [p["Name"] for p in page.get("Parameters", [])]
    removed = sum(1 for item in found if delete_token(ssm, item))
    return removed + int(delete_token(ssm, name))


def put_token(ssm: Any, name: str, token: str, tags: dict[str, str], *, key_id: str = "") -> None:
    """Store (or replace) the annex's token. One call when new; AWS refuses Tags together with
    Overwrite, so a replacement is an overwrite plus a re-tag."""
    common: dict[str, Any] = {"Name": name, "Value": token, "Type": "SecureString"}
    if key_id:
        common["KeyId"] = key_id
    tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
    action = f"store the instance token in SSM parameter {name}"
    try:
        ssm.put_parameter(**common, Tags=tag_list)
        log.info("stored instance token in %s", name)
        return
    except ClientError as err:
        if error_code(err) != "ParameterAlreadyExists":
            raise cloud_error(err, action) from None
    with aws_errors(action):
        ssm.put_parameter(**common, Overwrite=True)
        if tag_list:
            ssm.add_tags_to_resource(ResourceType="Parameter", ResourceId=name, Tags=tag_list)
    log.info("replaced instance token in %s", name)


def delete_token(ssm: Any, name: str) -> bool:
    """Remove the token; False if it was already gone."""
    try:
        ssm.delete_parameter(Name=name)
    except ClientError as err:
        if error_code(err) == "ParameterNotFound":
            return False
        raise cloud_error(err, f"delete SSM parameter {name}") from None
    log.info("deleted instance token %s", name)
    return True
