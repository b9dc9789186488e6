"""What EC2 holds for this pool: one paginated, tag-filtered describe; batched terminate.

The reconciler calls `describe_pool` once per cycle for every annex at once (never once per
job or per annex): Describe* calls count against the account's request rate.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable
from typing import Any

from botocore.exceptions import ClientError

from annex_gahp import names
from annex_gahp.aws.session import aws_errors, error_code

log = logging.getLogger(__name__)

LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
TERMINATE_BATCH = 1000  # TerminateInstances' documented maximum per call


@dataclasses.dataclass(frozen=True)
class InstanceView:
    id: str
    state: str
    instance_type: str
    launch_time: float  # epoch seconds
    tags: dict[str, str]
    annex: str
    owner: str
    request: str
    expires: int | None  # epoch seconds from htcondor-annex:expires, None if absent/garbled
    lifecycle: str = "on-demand"  # or "spot"
    private_ip: str = ""

    @classmethod
    def from_api(cls, raw: dict[str, Any]) -> InstanceView:
        tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
        try:
            expires: int | None = int(tags.get(names.TAG_EXPIRES, ""))
        except ValueError:
            expires = None
        launched = raw.get("LaunchTime")
        return cls(
            id=raw["InstanceId"],
            state=raw.get("State", {}).get("Name", "unknown"),
            instance_type=raw.get("InstanceType", ""),
            launch_time=launched.timestamp() if launched is not None else 0.0,
            tags=tags,
            annex=tags.get(names.TAG_NAME, ""),
            owner=tags.get(names.TAG_OWNER, ""),
            request=tags.get(names.TAG_REQUEST, ""),
            expires=expires,
            lifecycle=raw.get("InstanceLifecycle", "on-demand"),
            private_ip=raw.get("PrivateIpAddress", ""),
        )


def describe_pool(
    ec2: Any, pool_id: str, *, include_terminated: bool = False
) -> list[InstanceView]:
    """Every instance tagged with this pool, in one paginated DescribeInstances."""
    filters = [{"Name": f"tag:{names.TAG_POOL}", "Values": [pool_id]}]
    if not include_terminated:
        filters.append({"Name": "instance-state-name", "Values": list(LIVE_STATES)})
    found: list[InstanceView] = []
    with aws_errors("describe the pool's instances"):
        # Pages are 100 reservations at most (moto and AWS alike): always paginate.
        for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page.get("Reservations", []):
                found.extend(InstanceView.from_api(i) for i in reservation.get("Instances", []))
    return found


_INSTANCE_ID = re.compile(r"\bi-[0-9a-f]+\b")


def terminate(ec2: Any, ids: Iterable[str]) -> list[str]:
    """Terminate `ids` in batches of 1000; ids EC2 no longer knows count as done.

    Returns the ids EC2 accepted (or already forgot)."""
    pending = list(dict.fromkeys(ids))
    done: list[str] = []
    for start in range(0, len(pending), TERMINATE_BATCH):
        batch = pending[start : start + TERMINATE_BATCH]
        done.extend(_terminate_batch(ec2, batch))
    return done


def _terminate_batch(ec2: Any, batch: list[str]) -> list[str]:
    # A single unknown id fails the whole call; drop the ids EC2 names and retry the rest.
    gone: list[str] = []
    with aws_errors(f"terminate {len(batch)} instance(s)"):
        while batch:
            try:
                ec2.terminate_instances(InstanceIds=batch)
            except ClientError as err:
                known_gone = ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed")
                unknown = set(_INSTANCE_ID.findall(str(err))) & set(batch)
                if error_code(err) not in known_gone or not unknown:
                    raise
                log.info("instances already gone: %s", ", ".join(sorted(unknown)))
                gone.extend(sorted(unknown))
                batch = [i for i in batch if i not in unknown]
                continue
            log.info("terminated %d instance(s): %s", len(batch), ", ".join(batch[:20]))
            return gone + batch
    return gone
