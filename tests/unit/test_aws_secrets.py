"""aws/secrets.py against a real moto server."""

from __future__ import annotations

import logging

import pytest
from aws_fixtures import moto_server_url, moto_url, raw_client, settings  # noqa: F401

from annex_gahp.cloud.aws import secrets, session

TOKEN = "eyJhbGciOiJIUzI1NiJ9.test-token-value.sig"  # noqa: S105 - a fake token


@pytest.fixture
def ssm(settings):  # noqa: F811
    return session.client("ssm", settings)


def test_parameter_name_is_safe() -> None:
    name = secrets.parameter_name("/htcondor-annex/tokens/", "cm.example.org:9618", "alice", "a1")
    assert name.startswith("/htcondor-annex/tokens/cm.example.org_9618-")
    assert name.endswith("/alice/a1")
    other = secrets.parameter_name("/htcondor-annex/tokens", "cm.example.org_9618", "alice", "a1")
    assert other == "/htcondor-annex/tokens/cm.example.org_9618/alice/a1"
    assert name != other


def test_put_overwrite_delete(ssm, moto_url, caplog) -> None:  # noqa: F811
    caplog.set_level(logging.DEBUG)
    name = secrets.parameter_name("/htcondor-annex/tokens", "cm:9618", "alice", "a1")
    tags = {"htcondor-annex:name": "a1", "htcondor-annex:owner": "alice"}
    secrets.put_token(ssm, name, TOKEN, tags)
    raw = raw_client("ssm", moto_url)
    got = raw.get_parameter(Name=name, WithDecryption=True)["Parameter"]
    assert got["Type"] == "SecureString"
    assert got["Value"] == TOKEN
    secrets.put_token(ssm, name, TOKEN + "2", tags)  # an extension replaces it
    assert raw.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"] == TOKEN + "2"
    listed = raw.list_tags_for_resource(ResourceType="Parameter", ResourceId=name)["TagList"]
    assert {t["Key"]: t["Value"] for t in listed} == tags
    assert secrets.delete_token(ssm, name) is True
    assert secrets.delete_token(ssm, name) is False
    assert "test-token-value" not in caplog.text
