"""Token buckets (issue #12): a random name kept in the record, and every S3 call on one
carries ExpectedBucketOwner (our account, from STS once per process), so a bucket of the
same name in another account is refused, never reused.

moto does not check ExpectedBucketOwner itself; S3's documented answer for a bucket of
another account (403 AccessDenied) is injected with a botocore before-send hook."""

from __future__ import annotations

import re
from typing import Any

import pytest
from aws_fixtures import REGION, moto_server_url, moto_url, raw_client  # noqa: F401
from botocore.awsrequest import AWSResponse

from annex_gahp import names
from annex_gahp.cloud.aws import secrets, stack
from annex_gahp.errors import CloudError

POOL = "cm.bucket:9618"
HEADER = "x-amz-expected-bucket-owner"
FOREIGN = "999999999999"


def _seen(client: Any) -> list[tuple[str, str | None]]:
    """(operation, the expected-owner header) of every request the client sends."""
    seen: list[tuple[str, str | None]] = []

    def record(request: Any, event_name: str, **_: Any) -> None:
        seen.append((event_name.rsplit(".", 1)[-1], request.headers.get(HEADER)))

    client.meta.events.register("before-send.s3", record)
    return seen


def _foreign(client: Any, bucket: str) -> None:
    """Answer as S3 does for `bucket` owned by another account: 403 unless the caller expects
    that account (it never does)."""

    def answer(request: Any, **_: Any) -> AWSResponse | None:
        if f"/{bucket}" not in request.url:
            return None
        owner = request.headers.get(HEADER)
        if owner is not None and (owner.decode() if isinstance(owner, bytes) else owner) == FOREIGN:
            return None
        body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
        return AWSResponse(request.url, 403, {}, _Raw(body))

    client.meta.events.register_first("before-send.s3", answer)


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Any:
        yield self.body


def test_account_id_is_asked_once_per_process(moto_url: str) -> None:  # noqa: F811
    sts = raw_client("sts", moto_url)
    calls: list[str] = []
    sts.meta.events.register("before-send.sts", lambda **kw: calls.append("x"))
    stack._ACCOUNTS.clear()
    first = stack.account_id(sts)
    assert re.fullmatch(r"[0-9]{12}", first)
    assert stack.account_id(sts) == first and len(calls) == 1


def test_every_bucket_call_names_our_account(moto_url: str) -> None:  # noqa: F811
    s3 = raw_client("s3", moto_url)
    account = stack.account_id(raw_client("sts", moto_url))
    bucket = stack.new_bucket_name(POOL, "a1")
    seen = _seen(s3)
    stack.put_token(s3, bucket, "tok", {names.TAG_POOL: POOL}, REGION, account=account)
    # The per-instance copy (issue 12: each instance reads only its own) goes there too.
    secrets.put_object_copy(s3, bucket, "token/i-0123456789abcdef0", "tok", {}, account=account)
    assert stack.delete_bucket(s3, bucket, account) is True
    ops = {op for op, _ in seen}
    assert {"ListObjectsV2", "PutBucketTagging", "PutObject", "DeleteObject", "DeleteBucket"} <= ops
    for op, raw in seen:
        if op != "CreateBucket":  # the one S3 call without the parameter
            owner = raw.decode() if isinstance(raw, bytes) else raw
            assert owner == account, (op, owner)


def test_a_bucket_of_another_account_is_refused_never_written(moto_url: str) -> None:  # noqa: F811
    s3 = raw_client("s3", moto_url)
    account = stack.account_id(raw_client("sts", moto_url))
    bucket = stack.new_bucket_name(POOL, "taken")
    seen = _seen(s3)
    _foreign(s3, bucket)
    with pytest.raises(CloudError, match="another AWS account"):
        stack.put_token(s3, bucket, "secret-token", {}, REGION, account=account)
    assert [op for op, _ in seen] == ["ListObjectsV2"]  # no CreateBucket, no PutObject


def test_new_bucket_names_are_random_and_follow_s3_rules() -> None:
    names_ = {stack.new_bucket_name("CM.Example.ORG:9618", "Burst") for _ in range(50)}
    assert len(names_) == 50
    for name in names_ | {stack.new_bucket_name("a" * 200, "A" + "x" * 62)}:
        assert 3 <= len(name) <= 63 and re.fullmatch(r"[a-z0-9][a-z0-9-]*[a-z0-9]", name)
        assert re.search(r"-[0-9a-f]{16}$", name)
    assert all(n.startswith(stack.bucket_prefix("CM.Example.ORG:9618")) for n in names_)
