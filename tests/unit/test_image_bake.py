"""`htcondor-annex image create|list` (cloud/aws/bake.py, cli_admin) against a real moto server:
the builder's script, and that every failure terminates the builder and names its stage. The
whole bake (a builder that really installs HTCondor) is tests/e2e/test_stock_images.py."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from aws_fixtures import default_image, make_settings, moto_server_url, moto_url, raw_client  # noqa: F401
from botocore.awsrequest import AWSResponse

from annex_gahp import cli_admin, names, userdata
from annex_gahp.cloud.aws import bake, images
from annex_gahp.errors import InputError


def plan(url: str, **changes: Any) -> bake.Plan:
    base = bake.Plan(
        source_image=default_image(url),
        instance_type="m5.large",
        pool_id="cm.test:9618",
        name="htcondor-annex-test",
        timeout=1.0,
        poll=0.2,
    )
    return dataclasses.replace(base, **changes)


def _live(ec2: Any) -> list[str]:
    found = ec2.describe_instances(
        Filters=[{"Name": "instance-state-name", "Values": ["pending", "running", "stopped"]}]
    )["Reservations"]
    return [i["InstanceId"] for r in found for i in r["Instances"]]


def test_builder_script_is_sh_with_the_install_step_and_marker(tmp_path: Path) -> None:
    command = "curl -fsSL https://repo.example/x.sh | sh; echo \"$(id)\" 'q'"
    text = userdata.decode_user_data(
        bake.builder_script(bake.Plan("ami-1", "m5.large", "cm.test:9618", "n",
                                      install_command=command))
    )
    path = tmp_path / "builder.sh"
    path.write_text(text)
    subprocess.run(["sh", "-n", str(path)], check=True)
    assert "annex_install_condor" in text
    assert "/bin/sh -c " + shlex.quote(command) in text
    assert f"{bake.MARKER} READY condor_version=" in text
    assert "${ANNEX_POWEROFF_CMD:-poweroff}" in text
    default = userdata.decode_user_data(
        bake.builder_script(bake.Plan("ami-1", "m5.large", "cm.test:9618", "n"))
    )
    assert "install --no-install-recommends \"$pkg\"" in default
    with pytest.raises(InputError):
        bake.builder_script(bake.Plan("ami-1", "m5.large", "cm\nrm -rf /", "n"))


def test_builder_runs_the_install_and_reports_on_stdout(tmp_path: Path) -> None:
    """The builder script as an instance runs it: an install command that provides HTCondor,
    then the READY line with the version and the power-off command."""
    staged = tmp_path / "pkg"
    staged.mkdir()
    (staged / "condor_master").write_text("#!/bin/sh\nexit 0\n")
    (staged / "condor_version").write_text(
        "#!/bin/sh\necho '$CondorVersion: 23.9.6 2024-07-01 BuildID: 1 $'\n"
    )
    for f in staged.iterdir():
        f.chmod(0o755)
    bin_dir = tmp_path / "bin"
    command = f"mkdir -p {bin_dir} && cp -a {staged}/. {bin_dir}/"
    script = tmp_path / "builder.sh"
    script.write_text(
        userdata.decode_user_data(
            bake.builder_script(bake.Plan("ami-1", "m5.large", "p", "n", install_command=command))
        )
    )
    root = tmp_path / "root"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "ANNEX_AGENT_ROOT": str(root),
        "ANNEX_POWEROFF_CMD": f"touch {root}/off",
    }
    done = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert f"{bake.MARKER} READY condor_version=23.9.6" in done.stdout, done.stderr
    assert (root / "off").exists()
    assert "installed in" in (root / "var/log/htcondor-annex-image.log").read_text()

    failing = script.read_text().replace(shlex.quote(command), shlex.quote("exit 7"))
    script.write_text(failing)
    (root / "off").unlink()
    env["PATH"] = "/usr/bin:/bin"
    done = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert f"{bake.MARKER} FAILED" in done.stdout
    assert "installing HTCondor failed (status 7" in done.stderr
    assert (root / "off").exists()  # a failed builder stops too: the command sees it at once


def test_a_builder_that_never_reports_is_terminated_naming_the_stage(moto_url: str) -> None:  # noqa: F811
    ec2 = raw_client("ec2", moto_url)
    lines: list[str] = []
    with pytest.raises(bake.ImageError) as caught:
        bake.create(ec2, plan(moto_url), say=lines.append)
    message = str(caught.value)
    assert message.startswith("waiting for builder i-")
    assert "no result after 1 s" in message
    assert "terminated (nothing left running)" in message
    assert _live(ec2) == []
    assert ec2.describe_images(Filters=[{"Name": "tag-key", "Values": [bake.TAG_BUILDER]}])[
        "Images"
    ] == []
    builder = message.split()[3]
    instance = ec2.describe_instances(InstanceIds=[builder])["Reservations"][0]["Instances"][0]
    assert instance["State"]["Name"] in ("shutting-down", "terminated")
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    assert tags[names.TAG_POOL] == "cm.test:9618"
    assert bake.TAG_IMAGE_BUILDER in tags
    assert names.TAG_NAME not in tags  # no annex can be made to count it as its own


def test_a_builder_that_stops_without_its_line_fails_and_is_terminated(moto_url: str) -> None:  # noqa: F811
    """moto's console output is a fixed sample: no READY line, as a builder that died."""
    ec2 = raw_client("ec2", moto_url)

    def stop_the_builder() -> None:
        for _ in range(50):
            ids = _live(ec2)
            if ids:
                ec2.stop_instances(InstanceIds=ids)
                return
            time.sleep(0.1)

    thread = threading.Thread(target=stop_the_builder)
    thread.start()
    with pytest.raises(bake.ImageError, match="stopped without a result on its console") as caught:
        bake.create(ec2, plan(moto_url, timeout=3.0), say=lambda _: None)
    thread.join()
    # The console's text as EC2 shows it (botocore decodes it once; not decoded twice).
    assert "Enabling fast FPU save and restore... done." in str(caught.value)
    assert _live(ec2) == []


def test_an_aws_refusal_at_launch_says_nothing_was_created(moto_url: str) -> None:  # noqa: F811
    ec2 = raw_client("ec2", moto_url)

    def refuse(**_: Any) -> AWSResponse:  # a fault, as AWS would send it
        body = (b"<Response><Errors><Error><Code>Unsupported</Code><Message>"
                b"not in this zone</Message></Error></Errors><RequestID>1</RequestID></Response>")
        return AWSResponse("http://x", 400, {}, _Raw(body))

    ec2.meta.events.register("before-send.ec2.RunInstances", refuse)
    with pytest.raises(bake.ImageError) as caught:
        bake.create(ec2, plan(moto_url), say=lambda _: None)
    assert str(caught.value).startswith("launching the builder: ")
    assert "Unsupported" in str(caught.value)
    assert "nothing was created" in str(caught.value)
    assert _live(ec2) == []


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Any:
        yield self.body


def test_the_builder_type_must_fit_the_image(moto_url: str) -> None:  # noqa: F811
    ec2 = raw_client("ec2", moto_url)
    arm = [i for i in ec2.describe_images(Owners=["amazon"])["Images"]
           if i.get("Architecture") == "arm64"]
    if not arm:
        pytest.fail("moto has no arm64 image to test with")
    catalog = images.Catalog(lambda _region: ec2)
    with pytest.raises(InputError, match=r"m5\.large"):
        bake.check_fit(catalog, "us-east-1", arm[0]["ImageId"], "m5.large")
    bake.check_fit(catalog, "us-east-1", arm[0]["ImageId"], "m6g.large")


def test_image_list_shows_the_pools_images_only(
    moto_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ec2 = raw_client("ec2", moto_url)
    iid = ec2.run_instances(ImageId=default_image(moto_url), MinCount=1, MaxCount=1)[
        "Instances"][0]["InstanceId"]
    ours = ec2.create_image(InstanceId=iid, Name="ours", TagSpecifications=[{
        "ResourceType": "image", "Tags": [
            {"Key": names.TAG_POOL, "Value": "cm.test:9618"},
            {"Key": bake.TAG_CONDOR_VERSION, "Value": "23.9.6"}]}])["ImageId"]
    ec2.create_image(InstanceId=iid, Name="theirs", TagSpecifications=[{
        "ResourceType": "image", "Tags": [{"Key": names.TAG_POOL, "Value": "other:9618"}]}])
    settings = make_settings(moto_url, default_image_id=ours)
    monkeypatch.setattr(cli_admin, "load_settings", lambda: settings)
    assert cli_admin.main(["image", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["IMAGE", "CREATED", "STATE", "ARCH", "CONDOR"]
    assert len(out) == 2
    assert out[1].startswith(ours) and "23.9.6" in out[1]
    assert out[1].endswith("(ANNEX_DEFAULT_IMAGE_ID)")
