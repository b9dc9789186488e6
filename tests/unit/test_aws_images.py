"""Image references and instance-type awareness (issue 15 items 3 and 4), against moto: the
loop creates an annex through the helper's own service and cloud, and what EC2 launched (or
the annex's LastError) is checked. moto serves the public /aws/service/ami-amazon-linux-latest
parameters, DescribeInstanceTypes (ProcessorInfo, GpuInfo) and DescribeImages (Architecture).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from aws_fixtures import (  # noqa: F401
    REGION,
    count_calls,
    make_settings,
    moto_server_url,
    moto_url,
    raw_client,
)
from fake_schedd import FakeSchedd
from test_aws_stack import Clock, Publisher

from annex_gahp import spec, userdata
from annex_gahp.cloud.aws import setup
from annex_gahp.cloud.aws.cloud import AwsCloud
from annex_gahp.cloud.aws.images import Catalog, TypeInfo
from annex_gahp.errors import InputError, LimitExceeded
from annex_gahp.reconcile import Reconciler
from annex_gahp.schedd import Demand
from annex_gahp.service import AnnexService
from annex_gahp.settings import Settings
from annex_gahp.store import Annex, Store

POOL = "cm.test:9618"
AL2023 = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"


class Helper:
    def __init__(self, settings: Settings, tmp_path: Any) -> None:
        self.settings = settings
        self.clock = Clock()
        self.store = Store(str(tmp_path / "state.sqlite"))
        self.service = AnnexService(
            self.store, settings, clock=self.clock, resolve_region=lambda r, s: REGION
        )
        self.cloud = AwsCloud(settings, mint=lambda identity, lifetime: f"token-{identity}")
        self.jobs = FakeSchedd()
        self.loop = Reconciler(
            self.store,
            settings,
            self.cloud,
            self.jobs,
            Publisher(),
            clock=self.clock,
            resolve_region=lambda r, s: REGION,
        )

    def annex(self, name: str, **keywords: Any) -> Annex:
        """Ask for the annex as a job would, run one cycle, return its record."""
        keywords.setdefault("instances", 1)
        wanted = spec.from_keywords({"name": name, **keywords}, "alice", self.settings)
        self.jobs.jobs[("alice", name)] = Demand(idle=keywords["instances"])
        annex = self.service.ensure(wanted)
        self.loop.run_once()
        return self.store.get(annex.id)


def _launched(url: str) -> dict[str, tuple[str, str]]:
    """instance id -> (type, image) of every live instance."""
    ec2 = raw_client("ec2", url)
    return {
        i["InstanceId"]: (i["InstanceType"], i["ImageId"])
        for r in ec2.describe_instances()["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] in ("pending", "running")
    }


def _image(url: str, arch: str) -> str:
    ec2 = raw_client("ec2", url)
    found = ec2.describe_images(
        Owners=["amazon"], Filters=[{"Name": "architecture", "Values": [arch]}]
    )["Images"]
    return sorted(i["ImageId"] for i in found)[0]


@pytest.fixture
def helper(moto_url: str, tmp_path: Any) -> Helper:  # noqa: F811
    return Helper(make_settings(moto_url, pool_id=POOL), tmp_path)


# --- item 3: resolve:ssm: references -------------------------------------------------------


def test_reference_resolved_once_and_recorded(helper: Helper, moto_url: str) -> None:  # noqa: F811
    ssm = raw_client("ssm", moto_url)
    expected = ssm.get_parameter(Name=AL2023)["Parameter"]["Value"]
    gets = count_calls(helper.cloud._client("ssm", REGION), "GetParameter")
    annex = helper.annex("ref", image_ids=f"resolve:ssm:{AL2023}", instance_types="m5.large")
    assert annex.last_error == ""
    assert annex.cloud_resources["images"] == expected
    assert [image for _, image in _launched(moto_url).values()] == [expected]
    # Later launches of the annex use the recorded image, without asking SSM again.
    helper.jobs.jobs[("alice", "ref")] = Demand(idle=2)
    helper.service.ensure(
        spec.from_keywords(
            {"name": "ref", "instances": 2, "image_ids": f"resolve:ssm:{AL2023}",
             "instance_types": "m5.large"},
            "alice",
            helper.settings,
        )
    )  # fmt: skip
    helper.loop.run_once()
    assert [image for _, image in _launched(moto_url).values()] == [expected, expected]
    assert len(gets) == 1


def test_default_image_knob_takes_a_reference(moto_url: str, tmp_path: Any) -> None:  # noqa: F811
    expected = raw_client("ssm", moto_url).get_parameter(Name=AL2023)["Parameter"]["Value"]
    settings = make_settings(moto_url, pool_id=POOL, default_image_id=f"resolve:ssm:{AL2023}")
    annex = Helper(settings, tmp_path).annex("dflt")
    assert annex.last_error == ""
    assert [image for _, image in _launched(moto_url).values()] == [expected]


def test_missing_parameter_names_it_and_the_region(helper: Helper, moto_url: str) -> None:  # noqa: F811
    missing = "/aws/service/debian/release/99/latest/amd64"
    annex = helper.annex("gone", image_ids=f"resolve:ssm:{missing}")
    assert f"SSM parameter {missing} does not exist in region {REGION}" in annex.last_error
    assert "annex_image_ids" in annex.last_error
    assert _launched(moto_url) == {}


def test_parameter_outside_aws_service_refused_before_any_call(
    helper: Helper,
    moto_url: str,  # noqa: F811
) -> None:
    # The pool's own token parameters are in Parameter Store too: a user must not read them.
    ssm = raw_client("ssm", moto_url)
    ssm.put_parameter(Name="/htcondor-annex/tokens/x", Value="ami-12345678", Type="String")
    with pytest.raises(LimitExceeded, match="ANNEX_IMAGE_PARAMETER_PREFIXES"):
        spec.from_keywords(
            {"name": "x", "image_ids": "resolve:ssm:/htcondor-annex/tokens/x"},
            "alice",
            helper.settings,
        )
    for hostile in (
        "resolve:ssm:/aws/service/../../htcondor-annex/tokens/x",
        "resolve:ssm:aws/service/x",
        "resolve:ssm:/aws/service/x$y",
        "resolve:s3:/aws/service/x",
    ):
        with pytest.raises(InputError, match="malformed resolve: reference"):
            spec.from_keywords({"name": "x", "image_ids": hostile}, "alice", helper.settings)
    # The helper checks again where it reads (a record from before, a default knob).
    settings = make_settings(moto_url, default_image_id="resolve:ssm:/htcondor-annex/tokens/x")
    with pytest.raises(LimitExceeded, match="ANNEX_DEFAULT_IMAGE_ID"):
        spec.check_image_ids((settings.default_image_id,), settings.image_parameter_prefixes,
                             "ANNEX_DEFAULT_IMAGE_ID")  # fmt: skip


def test_admin_knob_widens_the_prefixes(moto_url: str, tmp_path: Any) -> None:  # noqa: F811
    image = _image(moto_url, "x86_64")
    raw_client("ssm", moto_url).put_parameter(Name="/site/ami", Value=image, Type="String")
    settings = make_settings(
        moto_url, pool_id=POOL, image_parameter_prefixes=("/aws/service/", "/site/")
    )
    annex = Helper(settings, tmp_path).annex("site", image_ids="resolve:ssm:/site/ami")
    assert annex.last_error == ""
    assert [image for _, image in _launched(moto_url).values()] == [image]


# --- item 4: architectures and GPUs --------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "itype", "type_arch"),
    [("x86_64", "m6g.large", "arm64"), ("arm64", "m5.large", "x86_64")],
)
def test_architecture_mismatch_refused_before_launch(
    helper: Helper,
    moto_url: str,  # noqa: F811
    arch: str,
    itype: str,
    type_arch: str,
) -> None:
    image = _image(moto_url, arch)
    annex = helper.annex("mis", image_ids=image, instance_types=itype)
    assert (
        f"annex_image_ids: image {image} ({arch}) does not fit instance type {itype} ({type_arch})"
        in annex.last_error
    ), annex.last_error
    assert _launched(moto_url) == {}
    # Nothing was made for it either: no launch template.
    assert raw_client("ec2", moto_url).describe_launch_templates()["LaunchTemplates"] == []


def test_mixed_lists_pair_each_type_with_an_image_of_its_architecture(
    helper: Helper,
    moto_url: str,  # noqa: F811
) -> None:
    x86, arm = _image(moto_url, "x86_64"), _image(moto_url, "arm64")
    fleets = count_calls(helper.cloud._client("ec2", REGION), "CreateFleet")
    # Listed in the "wrong" order for the types: pairing goes by architecture.
    annex = helper.annex("mix", image_ids=f"{x86},{arm}", instance_types="m6g.large,m5.large")
    assert annex.last_error == ""
    assert annex.cloud_resources["images"] == f"{arm},{x86}"
    overrides = fleets[0]["LaunchTemplateConfigs"][0]["Overrides"]
    assert [(o["InstanceType"], o["ImageId"]) for o in overrides] == [
        ("m6g.large", arm),
        ("m5.large", x86),
    ]
    # moto launches on the first override.
    assert list(_launched(moto_url).values()) == [("m6g.large", arm)]


def test_describe_answers_are_cached_per_region(helper: Helper, moto_url: str) -> None:  # noqa: F811
    image = _image(moto_url, "x86_64")
    ec2 = helper.cloud._client("ec2", REGION)
    types = count_calls(ec2, "DescribeInstanceTypes")
    images = count_calls(ec2, "DescribeImages")
    helper.annex("c1", image_ids=image, instance_types="m5.large")
    helper.annex("c2", image_ids=image, instance_types="m5.large")
    helper.loop.run_once()
    assert (len(types), len(images)) == (1, 1)


def _boot_config(url: str, annex: Annex) -> str:
    template = annex.cloud_resources["launch_template"]
    data = raw_client("ec2", url).describe_launch_template_versions(
        LaunchTemplateId=template, Versions=["$Default"]
    )["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    return userdata.decode_user_data(data["UserData"])


def test_gpu_discovery_for_a_gpu_type_only(helper: Helper, moto_url: str) -> None:  # noqa: F811
    image = _image(moto_url, "x86_64")
    gpu = helper.annex("gpu", image_ids=image, instance_types="g4dn.xlarge")
    plain = helper.annex("plain", image_ids=image, instance_types="m5.large")
    assert gpu.last_error == "" and plain.last_error == ""
    assert "use feature : GPUs" in _boot_config(moto_url, gpu)
    assert "use feature : GPUs" not in _boot_config(moto_url, plain)


def test_a_type_or_image_ec2_does_not_know_is_left_unchecked(moto_url: str) -> None:  # noqa: F811
    ec2 = raw_client("ec2", moto_url)
    calls = count_calls(ec2, "DescribeInstanceTypes")
    catalog = Catalog(lambda region: ec2)
    found = catalog.types(REGION, ["m5.large", "nope.large"])
    assert found == {"m5.large": TypeInfo(("x86_64",), 0), "nope.large": None}
    assert catalog.architectures(REGION, ["ami-0badc0de"]) == {"ami-0badc0de": None}
    # The batch, then one call each; asked again, nothing.
    assert len(calls) == 3
    catalog.types(REGION, ["nope.large", "m5.large"])
    assert len(calls) == 3


def test_setup_keeps_a_reference_as_the_base_templates_image(moto_url: str) -> None:  # noqa: F811
    """EC2 keeps `resolve:ssm:` in a launch template and resolves it at launch; the helper's
    launches name the resolved id in their overrides, so the setup stores the reference as
    given and check-setup finds nothing wrong."""
    settings = make_settings(moto_url, default_image_id=f"resolve:ssm:{AL2023}")
    clients = setup.admin_clients(settings)
    knobs = setup.deploy(settings, clients=clients)
    configured = dataclasses.replace(
        settings,
        launch_template=knobs["ANNEX_LAUNCH_TEMPLATE"],
        instance_profile=knobs["ANNEX_INSTANCE_PROFILE"],
        security_group=knobs["ANNEX_SECURITY_GROUP"],
        token_parameter_prefix=knobs["ANNEX_TOKEN_PARAMETER_PREFIX"],
    )
    assert setup.check(configured, clients=clients) == []


def test_the_stack_strategy_pairs_its_groups_too(helper: Helper, moto_url: str) -> None:  # noqa: F811
    x86, arm = _image(moto_url, "x86_64"), _image(moto_url, "arm64")
    annex = helper.annex(
        "mixst",
        instances=2,
        strategy="stack",
        image_ids=f"{x86},{arm}",
        instance_types="m6g.large,m5.large",
    )
    assert annex.last_error == ""
    assert annex.cloud_resources["images"] == f"{arm},{x86}"
    launched = set(_launched(moto_url).values())
    assert launched and launched <= {("m6g.large", arm), ("m5.large", x86)}, launched
