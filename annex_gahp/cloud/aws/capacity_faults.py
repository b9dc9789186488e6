"""Test-only capacity errors in front of the emulator (moto never runs out of capacity).

Armed only when the helper talks to an emulator (ANNEX_AWS_ENDPOINT_URL set), like faults.py:
a botocore before-send hook on CreateFleet reads `<ANNEX_STATE_DIR>/test-capacity-faults`,
lines of `<instance type> [<error code>]` (code InsufficientInstanceCapacity by default). A
CreateFleet naming such a type in an override gets, instead of reaching the emulator, the
answer an instant fleet gives when those pools have no capacity: HTTP 200, one error per such
override, no instance. The fleet code then falls through to the other types as it does on AWS.
The file is read at every CreateFleet, so a test adds and removes faults without a reconfig;
only root and the condor user can write the state directory.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from typing import Any
from xml.sax.saxutils import escape

from botocore.awsrequest import AWSResponse

log = logging.getLogger(__name__)

FILE_NAME = "test-capacity-faults"
DEFAULT_CODE = "InsufficientInstanceCapacity"


def read_faults(path: str) -> dict[str, str]:
    """instance type -> error code, from the fault file ({} when absent)."""
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return {}
    faults = {}
    for line in lines:
        words = line.split("#", 1)[0].split()
        if words:
            faults[words[0]] = words[1] if len(words) > 1 else DEFAULT_CODE
    return faults


def _overrides(body: bytes | str | None) -> tuple[list[dict[str, str]], str]:
    """The request's overrides (InstanceType, SubnetId) and its capacity type."""
    text = body.decode() if isinstance(body, bytes) else (body or "")
    fields = dict(urllib.parse.parse_qsl(text))
    found: dict[str, dict[str, str]] = {}
    for key, value in fields.items():
        parts = key.split(".")
        # LaunchTemplateConfigs.1.Overrides.2.InstanceType
        if len(parts) == 5 and parts[0] == "LaunchTemplateConfigs" and parts[2] == "Overrides":
            found.setdefault(f"{parts[1]}.{parts[3]}", {})[parts[4]] = value
    capacity = fields.get("TargetCapacitySpecification.DefaultTargetCapacityType", "on-demand")
    return list(found.values()), capacity


def _answer(failed: list[dict[str, str]], capacity: str, code: dict[str, str]) -> bytes:
    items = []
    for over in failed:
        itype = escape(over.get("InstanceType", ""))
        subnet = over.get("SubnetId")
        where = f"<subnetId>{escape(subnet)}</subnetId>" if subnet else ""
        items.append(
            f"<item><launchTemplateAndOverrides><overrides><instanceType>{itype}</instanceType>"
            f"{where}</overrides></launchTemplateAndOverrides>"
            f"<lifecycle>{escape(capacity)}</lifecycle>"
            f"<errorCode>{escape(code[over['InstanceType']])}</errorCode>"
            f"<errorMessage>test fault: no {itype} capacity</errorMessage></item>"
        )
    return (
        '<CreateFleetResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
        "<requestId>test-capacity-fault</requestId><fleetId>fleet-test-fault</fleetId>"
        f"<errorSet>{''.join(items)}</errorSet><fleetInstanceSet/></CreateFleetResponse>"
    ).encode()


class _Body:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Any:
        yield self.body


def arm(client: Any, state_dir: str) -> None:
    """Register the hook on an EC2 client of the emulator."""
    path = os.path.join(state_dir, FILE_NAME)

    def before_send(request: Any, **_: Any) -> AWSResponse | None:
        faults = read_faults(path)
        if not faults:
            return None
        overrides, capacity = _overrides(request.body)
        failed = [o for o in overrides if o.get("InstanceType") in faults]
        if not failed:
            return None
        log.warning(
            "test fault: CreateFleet answered with %s for %s",
            ",".join(sorted({faults[o["InstanceType"]] for o in failed})),
            ",".join(sorted({o["InstanceType"] for o in failed})),
        )
        return AWSResponse(request.url, 200, {}, _Body(_answer(failed, capacity, faults)))

    client.meta.events.register("before-send.ec2.CreateFleet", before_send)
