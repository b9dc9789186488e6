"""Images and instance types (issue 15 item 4), with the real pool and helper: a job whose annex
names a type of the other architecture than the sandbox's default image gets the refusal in
its AnnexLastError, naming both, and nothing is launched.
"""

from __future__ import annotations

import uuid

import pytest
import sandbox as sb

from annex_gahp import names

pytestmark = pytest.mark.sandbox

# A type of the other architecture than the image's (moto serves both kinds of images).
OTHER_TYPE = {"x86_64": ("m6g.large", "arm64"), "arm64": ("m5.large", "x86_64")}


def tagged(name: str) -> list[dict]:
    return sb.instances(
        [{"Name": f"tag:{names.TAG_NAME}", "Values": [name]}],
        states=("pending", "running", "shutting-down", "terminated", "stopped"),
    )


def test_an_image_of_the_wrong_architecture_is_refused_into_the_job() -> None:
    sb.check_running()
    image = sb.default_image_id()
    arch = sb.ec2_client().describe_images(ImageIds=[image])["Images"][0]["Architecture"]
    itype, type_arch = OTHER_TYPE[arch]
    name = f"arch-{uuid.uuid4().hex[:8]}"
    workdir = sb.user_tmpdir("alice", "annex-images-")
    cluster = sb.condor_submit_as(
        "alice",
        "\n".join(
            [
                "executable = /bin/true",
                f"annex_name = {name}",
                f"annex_instance_types = {itype}",
                "annex_lease = 30m",
                "queue",
                "",
            ]
        ),
        cwd=str(workdir),
    )
    try:
        last = sb.wait_for(
            lambda: (sb.job_ad(cluster) or {}).get("AnnexLastError"),
            timeout=90,
            what=f"AnnexLastError of job {cluster}",
            on_timeout=sb.line_logs,
        )
        want = (
            f"ANNEX_DEFAULT_IMAGE_ID: image {image} ({arch}) does not fit instance type"
            f" {itype} ({type_arch})"
        )
        assert want in str(last), last
        assert tagged(name) == []
    finally:
        sb.run_as("alice", "condor_rm", str(cluster), check=False)
