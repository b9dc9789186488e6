"""Stock images and images baked from them (issue 15 items 1, 2, 5), with the real pool,
helper and booter. The sandbox registers a stock image (tag annex-sandbox:root=stock): Debian
trixie without HTCondor, booted from a root that has none, whose boot script installs the
distribution's package. `htcondor-annex image create` bakes an image of it (the booter keeps
the builder's root under the new id), whose instances join without installing. Each test prints
its instance's boot-to-joined time (docs/benchmarks.md quotes one run of this file).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sandbox as sb

from annex_gahp import names
from annex_gahp.cloud.aws import bake

pytestmark = pytest.mark.sandbox

AGENT_LOG = "var/log/htcondor-annex-agent.log"
IMAGES_DIR = Path("/srv/instances/.images")


def stock_image() -> str:
    found = sb.ec2_client().describe_images(
        Filters=[{"Name": "tag:annex-sandbox:root", "Values": ["stock"]}]
    )["Images"]
    assert found, "the sandbox registered no stock image (scripts/sandbox up)"
    return found[0]["ImageId"]


def image_create(*extra: str, env: dict[str, str] | None = None) -> Any:
    return sb.run_as(
        "root",
        "htcondor-annex", "image", "create", "--source-image", stock_image(),
        "--poll", "1", "--timeout", "4m", *extra,
        check=False, timeout=300, env_extra=env,
    )


def annex_instance(name: str) -> dict[str, Any]:
    found = sb.instances([{"Name": f"tag:{names.TAG_NAME}", "Values": [name]}])
    return found[0] if found else {}


def run_job_on(image: str, kind: str) -> str:
    """A job whose annex boots `image`; returns the agent's log of its instance. Prints the
    instance's boot-to-joined time (its LaunchTime to its startd in the collector)."""
    name = f"{kind}-{uuid.uuid4().hex[:8]}"
    workdir = sb.user_tmpdir("alice", "annex-stock-")
    cluster = sb.condor_submit_as(
        "alice",
        "\n".join([
            "executable = /bin/true",
            f"annex_name = {name}",
            f"annex_image_ids = {image}",
            "annex_lease = 30m",
            "queue",
            "",
        ]),
        cwd=str(workdir),
    )
    try:
        instance = sb.wait_for(lambda: annex_instance(name), timeout=90,
                               what=f"the instance of annex {name}", on_timeout=sb.line_logs)
        iid = instance["InstanceId"]
        launched = instance["LaunchTime"].timestamp()
        sb.wait_for(lambda: sb.query_ads("Startd", f'AnnexName == "{name}"', ["Name"]),
                    timeout=150, interval=0.25, what=f"the startd of {iid} ({kind} image)",
                    on_timeout=lambda: sb.console_log(iid)[-3000:])
        joined = time.time() - launched
        print(f"\nboot-to-joined, {kind} image {image}: {joined:.1f} s")
        sb.wait_for_job(cluster, timeout=120)
        return (sb.instance_root(iid) / AGENT_LOG).read_text()
    finally:
        sb.run_as("alice", "condor_rm", str(cluster), check=False)
        sb.run_as("alice", "htcondor-annex", "delete", "--name", name, check=False)


def test_a_job_runs_on_an_instance_of_the_stock_image() -> None:
    sb.check_running()
    log = run_job_on(stock_image(), "stock")
    assert "HTCondor not found: installing the distribution's condor package (apt-get)" in log
    assert " installed in " in log
    # Installed first, then the agent's boot (the token, the config, HTCondor started).
    assert log.index(" installed in ") < log.index("starting HTCondor")


def test_image_create_bakes_an_image_whose_instances_join_without_installing(
    tmp_path: Path,
) -> None:
    """One test, not a module fixture and two: xdist spreads a module's tests over workers, and
    each would bake its own image."""
    sb.check_running()
    config = tmp_path / "16-annex-image.conf"
    done = image_create("--write-config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    image = done.stdout.strip().splitlines()[-1]
    try:
        assert image.startswith("ami-")
        found = sb.ec2_client().describe_images(ImageIds=[image])["Images"][0]
        tags = {t["Key"]: t["Value"] for t in found["Tags"]}
        pool_id = sb.run_as("root", "condor_config_val", "ANNEX_POOL_ID").stdout.strip()
        assert tags[names.TAG_POOL] == pool_id
        assert tags[bake.TAG_CONDOR_VERSION] == "23.9.6"
        assert tags[bake.TAG_SOURCE_IMAGE] == stock_image()
        builder = tags[bake.TAG_BUILDER]
        assert sb.instance_state(builder) in ("shutting-down", "terminated")
        assert f"builder {builder} terminated" in done.stderr
        assert config.read_text().splitlines()[-1] == f"ANNEX_DEFAULT_IMAGE_ID = {image}"
        listed = sb.run_as("root", "htcondor-annex", "image", "list").stdout
        assert any(line.startswith(image) and "23.9.6" in line for line in listed.splitlines())

        log = run_job_on(image, "baked")
        assert "HTCondor 23.9.6 is installed: no install step" in log
        assert "installing" not in log
    finally:
        sb.ec2_client().deregister_image(ImageId=image)
        # The booter drops the image's root once no instance boots from it any more.
        sb.wait_for(lambda: not (IMAGES_DIR / image).exists(), timeout=90,
                    what=f"the booter to remove the root of {image}")


def test_a_failed_install_stops_image_create_and_terminates_the_builder() -> None:
    sb.check_running()
    # The admin's install command (a knob; here for this one process only, as HTCondor reads
    # _CONDOR_ variables) fails: the builder says so on its console and stops at once.
    env = {"_CONDOR_ANNEX_CONDOR_INSTALL_COMMAND": "echo no such repository >&2; exit 3"}
    started = time.monotonic()
    done = image_create(env=env)
    assert done.returncode == 1
    assert time.monotonic() - started < 60
    err = done.stderr.strip().splitlines()[-1]
    assert err.startswith("htcondor-annex image create: ERROR: waiting for builder i-"), err
    assert "the install failed" in err and "no such repository" in err
    assert "installing HTCondor failed (status 3" in err
    builder = err.split("waiting for builder ")[1].split()[0]
    assert err.endswith(f"builder {builder} terminated (nothing left running)")
    sb.wait_for(lambda: sb.instance_state(builder) in ("shutting-down", "terminated"),
                timeout=10, what=f"builder {builder} to be terminated")
    assert not sb.ec2_client().describe_images(
        Filters=[{"Name": f"tag:{bake.TAG_BUILDER}", "Values": [builder]}])["Images"]
