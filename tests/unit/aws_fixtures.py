"""Fixtures for the AWS backend tests: a real moto server (never a stub of our own).

Import in a test module with `from aws_fixtures import aws, moto_url, settings  # noqa: F401`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from annex_gahp.settings import Settings

REGION = "us-east-1"


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def small_ami_catalogue(path: Path) -> Path:
    """moto's own 44 default AMIs plus the ones its public Amazon Linux SSM parameters name in
    REGION, instead of its full catalogue (~1,200 per region): every reset rebuilds each region's
    images, and serializing an unfiltered DescribeImages took a third of the fast tier's time."""
    from moto.utilities.utils import load_resource  # noqa: PLC0415 - moto's own reader (gzip)

    default = load_resource("moto.ec2.models", "../resources/amis.json")
    latest = load_resource("moto.ec2.models", f"../resources/latest_amis/{REGION}.json")
    linux = f"resources/ami-amazon-linux-latest/{REGION}.json"
    named = {p["Value"] for p in load_resource("moto.ssm.models", linux)}
    path.write_text(json.dumps(default + [a for a in latest if a["ami_id"] in named]))
    return path


@pytest.fixture(scope="session")
def moto_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    # Read when moto first builds an EC2 backend, which is after this (checked: importing
    # moto.server does not load the AMIs).
    catalogue = small_ami_catalogue(tmp_path_factory.mktemp("moto") / "amis.json")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOTO_AMIS_PATH", str(catalogue))
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        yield f"http://127.0.0.1:{port}"
        server.stop()


def reset(url: str) -> None:
    request = urllib.request.Request(url + "/moto-api/reset", method="POST", data=b"")  # noqa: S310
    urllib.request.urlopen(request).read()  # noqa: S310 - local emulator


@pytest.fixture
def moto_url(moto_server_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> str:
    """A clean emulator and fake credentials; no shared credentials file of the host."""
    reset(moto_server_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    return moto_server_url


def make_settings(endpoint_url: str = "", **changes: Any) -> Settings:
    base = Settings(
        endpoint_url=endpoint_url,
        region=REGION,
        default_instance_types=("m5.large",),
        default_image_id="",
        default_lease=3600,
        max_lease=86400,
        max_instances=50,
        max_instances_per_user=100,
        idle_timeout=900,
        state_dir="/tmp/annex-test",
        log_file="/tmp/annex-test/log",
        socket_path="/tmp/annex-test/sock",
        update_interval=300,
        reconcile_interval=10,
        pool_id="cm.test:9618",
        central_manager="cm.test:9618",
        uid_domain="test",
        launch_template="",
        instance_profile="",
        security_group="",
        token_parameter_prefix="/htcondor-annex/tokens",  # noqa: S106 - a path, not a secret
        allowed_instance_types=(),
        allowed_image_ids=(),
        allowed_regions=(),
        reaper_grace=600,
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture
def settings(moto_url: str) -> Settings:
    return make_settings(moto_url)


def raw_client(service: str, url: str) -> Any:
    """A plain boto3 client on the emulator, for arranging and checking (not the code under
    test)."""
    return boto3.client(service, endpoint_url=url, region_name=REGION)


def count_calls(client: Any, operation: str) -> list[dict[str, Any]]:
    """Record every `operation` call made through `client` (botocore event hook)."""
    seen: list[dict[str, Any]] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        seen.append(params)

    client.meta.events.register(f"provide-client-params.*.{operation}", hook)
    return seen


@functools.cache
def images(url: str, region: str = REGION) -> tuple[str, ...]:
    """moto's built-in AMIs (the same after every reset); listing them takes a second or more
    (over a thousand images), so once per region and worker."""
    ec2 = boto3.client("ec2", endpoint_url=url, region_name=region)
    found = ec2.describe_images(Owners=["amazon"])["Images"]
    return tuple(i["ImageId"] for i in found[:4])


def default_image(url: str, region: str = REGION) -> str:
    return images(url, region)[0]


# --- the templates as deployed to AWS (no emulator: the policies' real, scoped form) ----------

AWS_IMAGE = "ami-0123456789abcdef0"


def aws_setup_template() -> dict[str, Any]:
    """The admin's setup stack, rendered for AWS (no endpoint_url: not the emulator's form)."""
    from annex_gahp.cloud.aws import setup  # noqa: PLC0415 - only the lint tests need it

    stack_name = setup.default_stack_name("cm.example.org:9618")
    settings = make_settings(
        "",
        pool_id="cm.example.org:9618",
        central_manager="cm.example.org",
        default_image_id=AWS_IMAGE,
    )
    return json.loads(setup.render_template(settings, stack_name, vpc_id="vpc-0123456789abcdef0"))


def aws_annex_template() -> dict[str, Any]:
    """An annex's stack (stack strategy), two instance types, as the loop renders it."""
    import time  # noqa: PLC0415

    from annex_gahp.cloud.aws import fleet, stack  # noqa: PLC0415

    plan = fleet.LaunchPlan(
        annex="a1",
        owner="alice",
        request_id="r-0001",
        pool_id="cm.example.org:9618",
        expires=int(time.time()) + 3600,
        count=0,
        instance_types=("m5.large", "c5.large"),
        image_ids=(AWS_IMAGE,),
        user_data="#!/bin/sh\necho booted\n",
    )
    return json.loads(stack.render_template(plan, "annex-a1", {}, [2, 0], max_size=50))
