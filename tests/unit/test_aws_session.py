"""aws/session.py: region order, credential-file refusal, error mapping."""

from __future__ import annotations

import dataclasses
import os

import pytest
from aws_fixtures import make_settings, moto_server_url, moto_url  # noqa: F401
from botocore.exceptions import ClientError

from annex_gahp.cloud.aws import session
from annex_gahp.errors import CloudError, CredentialsError


def test_region_order(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    config = tmp_path / "config"
    config.write_text("[default]\nregion = eu-central-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    knob = make_settings(region="ap-south-1")
    assert session.resolve_region("us-east-2", knob) == "us-east-2"
    assert session.resolve_region("", knob) == "ap-south-1"
    unset = dataclasses.replace(knob, region="")
    assert session.resolve_region(None, unset) == "eu-central-1"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent"))
    assert session.resolve_region(None, unset) == "us-west-1"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_refuses_readable_credentials_file(monkeypatch, tmp_path, mode: int) -> None:
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = x\naws_secret_access_key = y\n")
    os.chmod(creds, mode)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    with pytest.raises(CredentialsError) as caught:
        session.client("ec2", make_settings("http://127.0.0.1:1"))
    assert str(creds) in str(caught.value)
    assert "chmod 600" in str(caught.value)


def test_accepts_private_credentials_file(monkeypatch, tmp_path) -> None:
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = x\naws_secret_access_key = y\n")
    os.chmod(creds, 0o600)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    made = session.client("ec2", make_settings("http://127.0.0.1:1"))
    assert made.meta.endpoint_url == "http://127.0.0.1:1"
    assert made.meta.region_name == "us-east-1"


def test_home_credentials_file_checked(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("AWS_SHARED_CREDENTIALS_FILE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".aws").mkdir()
    creds = tmp_path / ".aws" / "credentials"
    creds.write_text("[default]\n")
    os.chmod(creds, 0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        session.check_credentials_file()


def test_client_error_becomes_cloud_error(moto_url: str) -> None:  # noqa: F811
    ec2 = session.client("ec2", make_settings(moto_url))
    with pytest.raises(CloudError) as caught, session.aws_errors("terminate"):
        ec2.terminate_instances(InstanceIds=["i-0123456789abcdef0"])
    assert "InvalidInstanceID" in str(caught.value)
    assert caught.value.aws_code.startswith("InvalidInstanceID")


def test_secrets_scrubbed() -> None:
    err = ClientError(
        {
            "Error": {
                "Code": "AuthFailure",
                "Message": "key " + "AKIA" + "ABCDEFGHIJKLMNOP" + " secret "
                "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            }
        },
        "DescribeInstances",
    )
    text = str(session.cloud_error(err, "describe"))
    assert "AuthFailure" in text
    assert "AKIA" not in text and "wJalr" not in text


# --- one loader per process, slim models ------------------------------------------------------


def test_clients_share_one_copy_of_each_model(moto_url: str) -> None:  # noqa: F811
    knobs = make_settings(moto_url)
    east = session.client("ec2", knobs, "us-east-1")
    west = session.client("ec2", knobs, "us-west-2")
    ssm = session.client("ssm", knobs, "us-east-1")
    assert (east.meta.region_name, west.meta.region_name) == ("us-east-1", "us-west-2")
    # botocore keeps the parsed model in ServiceModel._service_description.
    assert east.meta.service_model._service_description is (
        west.meta.service_model._service_description
    )
    assert east.meta.service_model._service_description is not (
        ssm.meta.service_model._service_description
    )
