"""`htcondor-annex image create|list`: an AMI with HTCondor, baked from a stock image.

One builder instance boots the stock image with templates/image-builder.sh.j2 (the boot
script's own install step), prints `MARKER READY condor_version=V` (or `FAILED`) on its console
and powers itself off with InstanceInitiatedShutdownBehavior=stop. Why those channels: the
builder has no AWS identity to report with (no tag it could set, no parameter it could write),
while its state (stopped) and its console output (GetConsoleOutput) are what EC2 itself shows
about any instance, on real EC2 and in the sandbox alike (the sandbox's moto answers console
output from the booted instance). Stopped is also the state EC2 images most consistently.
Then CreateImage, tagged with the pool and the HTCondor version, and the builder is
terminated, whatever happened before: a failure leaves nothing running, and says at which
stage it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from annex_gahp import names, userdata
from annex_gahp.cloud.aws import images as image_info
from annex_gahp.cloud.aws.session import cloud_error
from annex_gahp.errors import AnnexError, CloudError, InputError

log = logging.getLogger(__name__)

MARKER = "htcondor-annex-image:"
TAG_BUILDER = "htcondor-annex:builder"  # on the image: the instance it was made of
TAG_IMAGE_BUILDER = "htcondor-annex:image-builder"  # on the builder instance
TAG_CONDOR_VERSION = "htcondor-annex:condor-version"
TAG_SOURCE_IMAGE = "htcondor-annex:source-image"
_READY = re.compile(re.escape(MARKER) + r" READY condor_version=([0-9][0-9A-Za-z.+~-]*)")
_FAILED = re.compile(re.escape(MARKER) + r" FAILED")


class ImageError(AnnexError):
    """`image create` stopped; the message says at which stage and what is left (nothing)."""

    code = "IMAGE"


@dataclasses.dataclass(frozen=True)
class Baked:
    image_id: str
    condor_version: str
    builder_id: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class Plan:
    source_image: str  # an ami id (resolved)
    instance_type: str
    pool_id: str
    name: str
    launch_template: str = ""  # the pool's (network, profile), when setup made one
    install_command: str = ""  # ANNEX_CONDOR_INSTALL_COMMAND
    timeout: float = 1200.0  # seconds for the install, and again for the AMI
    poll: float = 5.0


def builder_script(plan: Plan) -> bytes:
    """The builder's user data (gzipped past EC2's limit, as the boot script)."""
    if "\0" in plan.install_command or not plan.pool_id.isprintable():
        raise InputError("ANNEX_CONDOR_INSTALL_COMMAND or ANNEX_POOL_ID cannot go into a script")
    ctx = {"pool_id": plan.pool_id, "marker": MARKER}
    ctx["condor_install_command"] = plan.install_command
    text = userdata.template_environment().get_template("image-builder.sh.j2").render(**ctx)
    return userdata.fit_user_data(text.encode())


def check_fit(catalog: image_info.Catalog, region: str, source: str, instance_type: str) -> None:
    """Refuse a builder type whose architecture the source image does not fit, naming both."""
    image_info.pair(
        (instance_type,),
        (source,),
        catalog.types(region, [instance_type]),
        catalog.architectures(region, [source]),
        "--instance-type",
    )


def _tags(plan: Plan, kind: str, extra: dict[str, str]) -> list[dict[str, Any]]:
    tags = {names.TAG_POOL: plan.pool_id, "Name": plan.name} | extra
    return [{"ResourceType": kind, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]


def create(ec2: Any, plan: Plan, say: Callable[[str], None] = log.info) -> Baked:
    """Launch, wait, image, terminate. Raises ImageError naming the stage."""
    started = time.monotonic()
    stage = "launching the builder"
    builder = ""
    image_id = ""
    done = False
    try:
        builder = _launch(ec2, plan)
        say(f"builder {builder} launched from {plan.source_image} ({plan.instance_type})")
        stage = f"waiting for builder {builder} to install HTCondor"
        version = _wait_for_install(ec2, builder, plan, say)
        say(f"builder {builder} installed HTCondor {version} and stopped")
        stage = f"creating the image from builder {builder}"
        image_id = _create_image(ec2, builder, plan, version)
        say(f"image {image_id} requested; waiting until it is available")
        stage = f"waiting for image {image_id} to become available"
        _wait_for_image(ec2, image_id, plan)
        done = True
        return Baked(image_id, version, builder, time.monotonic() - started)
    except (ClientError, BotoCoreError) as err:
        left = _left(builder, image_id)
        raise ImageError(f"{stage}: {cloud_error(err, 'AWS')}; {left}") from None
    except (CloudError, InputError, ImageError) as err:
        raise ImageError(f"{stage}: {err}; {_left(builder, image_id)}") from None
    finally:
        if not done and image_id:
            _discard_image(ec2, image_id)
        if builder:
            _terminate(ec2, builder, say)


def _left(builder: str, image_id: str) -> str:
    gone = [f"builder {builder} terminated"] if builder else []
    if image_id:
        gone.append(f"image {image_id} deregistered")
    return ", ".join(gone) + " (nothing left running)" if gone else "nothing was created"


def _launch(ec2: Any, plan: Plan) -> str:
    request = uuid.uuid4().hex[:12]
    kwargs: dict[str, Any] = {
        "ImageId": plan.source_image,
        "InstanceType": plan.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "UserData": builder_script(plan),
        "InstanceInitiatedShutdownBehavior": "stop",
        # The pool tag: if this command dies, the helper's reaper terminates the builder after
        # ANNEX_REAPER_GRACE (it belongs to no annex).
        "TagSpecifications": _tags(
            plan,
            "instance",
            {TAG_IMAGE_BUILDER: plan.name, names.TAG_REQUEST: f"image-{request}"},
        ),
    }
    if plan.launch_template:
        key = "LaunchTemplateId" if plan.launch_template.startswith("lt-") else "LaunchTemplateName"
        kwargs["LaunchTemplate"] = {key: plan.launch_template}
    found = ec2.run_instances(**kwargs)["Instances"]
    return str(found[0]["InstanceId"])


def _wait_for_install(ec2: Any, builder: str, plan: Plan, say: Callable[[str], None]) -> str:
    deadline = time.monotonic() + plan.timeout
    state = "pending"
    while time.monotonic() < deadline:
        reservations = ec2.describe_instances(InstanceIds=[builder])["Reservations"]
        state = reservations[0]["Instances"][0]["State"]["Name"] if reservations else "gone"
        if state in ("shutting-down", "terminated", "gone"):
            raise ImageError(f"the builder was {state} before it finished")
        if state == "stopped":
            break
        time.sleep(plan.poll)
    else:
        tail = console_tail(ec2, builder)
        raise ImageError(
            f"no result after {plan.timeout:.0f} s (builder {state}); its console ends: {tail}"
        )
    # EC2 may publish a stopped instance's console a little after the stop.
    while True:
        text = console(ec2, builder)
        ready = _READY.findall(text)
        if ready:
            return str(ready[-1])
        if _FAILED.search(text):
            raise ImageError(f"the install failed; the builder's console ends: {_tail(text)}")
        if time.monotonic() >= deadline:
            raise ImageError(f"the builder stopped without a result on its console: {_tail(text)}")
        time.sleep(plan.poll)


def console(ec2: Any, instance_id: str) -> str:
    # botocore decodes the base64 of Output itself (decode_console_output); decoding again
    # would turn the text into noise without an error.
    return str(ec2.get_console_output(InstanceId=instance_id).get("Output") or "")


def console_tail(ec2: Any, instance_id: str) -> str:
    try:
        return _tail(console(ec2, instance_id))
    except (ClientError, BotoCoreError):
        return "(no console output)"


def _tail(text: str, lines: int = 6) -> str:
    kept = [line.strip() for line in text.strip().splitlines()[-lines:]]
    return " | ".join(line for line in kept if line)[-1000:] or "(empty)"


def _create_image(ec2: Any, builder: str, plan: Plan, version: str) -> str:
    made = ec2.create_image(
        InstanceId=builder,
        Name=plan.name,
        Description=f"HTCondor {version} on {plan.source_image} (htcondor-annex image create)",
        NoReboot=True,  # stopped already
        TagSpecifications=_tags(
            plan,
            "image",
            {
                TAG_CONDOR_VERSION: version,
                TAG_SOURCE_IMAGE: plan.source_image,
                TAG_BUILDER: builder,
            },
        ),
    )
    return str(made["ImageId"])


def _wait_for_image(ec2: Any, image_id: str, plan: Plan) -> None:
    deadline = time.monotonic() + plan.timeout
    while True:
        found = ec2.describe_images(ImageIds=[image_id])["Images"]
        state = found[0].get("State", "pending") if found else "missing"
        if state == "available":
            return
        if state in ("failed", "invalid", "deregistered", "error", "missing"):
            raise ImageError(f"EC2 says the image is {state}")
        if time.monotonic() >= deadline:
            raise ImageError(f"still {state} after {plan.timeout:.0f} s")
        time.sleep(plan.poll)


def _discard_image(ec2: Any, image_id: str) -> None:
    try:
        found = ec2.describe_images(ImageIds=[image_id])["Images"]
        snapshots = [
            m["Ebs"]["SnapshotId"]
            for i in found
            for m in i.get("BlockDeviceMappings", [])
            if m.get("Ebs", {}).get("SnapshotId")
        ]
        ec2.deregister_image(ImageId=image_id)
        for snapshot in snapshots:
            ec2.delete_snapshot(SnapshotId=snapshot)
    except (ClientError, BotoCoreError) as err:
        log.warning("could not discard image %s: %s", image_id, err)


def _terminate(ec2: Any, builder: str, say: Callable[[str], None]) -> None:
    try:
        ec2.terminate_instances(InstanceIds=[builder])
        say(f"builder {builder} terminated")
    except (ClientError, BotoCoreError) as err:
        say(f"WARNING: could not terminate builder {builder}: {cloud_error(err, 'terminate')}")


def pool_images(ec2: Any, pool_id: str) -> list[dict[str, str]]:
    """The images `image create` made for this pool, newest first."""
    found = ec2.describe_images(
        Owners=["self"], Filters=[{"Name": f"tag:{names.TAG_POOL}", "Values": [pool_id]}]
    )["Images"]
    rows = []
    for image in found:
        tags = {t["Key"]: t["Value"] for t in image.get("Tags", [])}
        rows.append(
            {
                "image": image["ImageId"],
                "created": str(image.get("CreationDate", "")),
                "state": str(image.get("State", "")),
                "arch": str(image.get("Architecture", "")),
                "condor": tags.get(TAG_CONDOR_VERSION, "?"),
                "source": tags.get(TAG_SOURCE_IMAGE, "?"),
                "name": str(image.get("Name", "")),
            }
        )
    return sorted(rows, key=lambda r: r["created"], reverse=True)
