"""What EC2 holds for this pool: one paginated, tag-filtered describe; batched terminate.

The reconciler calls `describe_pool` once per cycle for every annex at once (never once per
job or per annex): Describe* calls count against the account's request rate.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from typing import Any
from xml.etree import ElementTree

from botocore.exceptions import ClientError
from botocore.utils import parse_timestamp

from annex_gahp import names
from annex_gahp.cloud.aws.session import aws_errors, error_code

log = logging.getLogger(__name__)

# What describe asks for: every EC2 state short of terminated (the loop needs to see instances
# shutting down too); what counts as capacity is lifecycle.INSTANCE_LIVE.
NOT_TERMINATED = ("pending", "running", "stopping", "stopped", "shutting-down")
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
    zone: str = ""

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
            zone=raw.get("Placement", {}).get("AvailabilityZone", ""),
        )


def describe_pool(
    ec2: Any, pool_id: str, *, include_terminated: bool = False
) -> list[InstanceView]:
    """Every instance tagged with this pool, in one paginated DescribeInstances."""
    filters = [{"Name": f"tag:{names.TAG_POOL}", "Values": [pool_id]}]
    if not include_terminated:
        filters.append({"Name": "instance-state-name", "Values": list(NOT_TERMINATED)})
    found: list[InstanceView] = []
    ec2.meta.events.register(
        "before-parse.ec2.DescribeInstances", _lean_parse, unique_id=_LEAN_PARSE_ID
    )
    _LEAN.on = True
    try:
        with aws_errors("describe the pool's instances"):
            # Pages are 100 reservations at most (moto and AWS alike): always paginate.
            for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
                for reservation in page.get("Reservations", []):
                    found.extend(InstanceView.from_api(i) for i in reservation.get("Instances", []))
    finally:
        _LEAN.on = False
    return found


# --- the lean parse of describe_pool's pages -----------------------------------------------
#
# A DescribeInstances answer has ~100 XML elements per instance (devices, interfaces, groups,
# placement...), of which `InstanceView` reads a handful. botocore builds an element tree of the
# whole answer and then a dict of it: for 1,000 instances (a 3.3 MB answer) ~20 MB of small,
# short-lived objects per cycle, and the long-lived helper kept most of that memory afterwards
# (freed objects scattered over the allocator's arenas). So describe_pool's pages are read here
# as a stream, keeping only these fields, into the same dicts botocore would have made of them;
# botocore still signs, retries and reads errors as for any call.
#
# Kept in issue 13, which removed the other reaches into botocore, because the benchmark shows
# the need: scripts/bench socket, one run each, 2026-12-05, botocore's whole models: helper
# VmRSS with 1,000 annexes 93.8 MB with this parse, 112.6 MB without it (target <= 100 MB;
# cycles 17-19 s vs 24-30 s start to start).

_LEAN = threading.local()  # `.on` while this thread is in describe_pool
_LEAN_PARSE_ID = "htcondor-annex-lean-describe-instances"

# Where an instance item is, below the root element.
_INSTANCE_PATH = ["reservationSet", "item", "instancesSet", "item"]
# An instance item's child element -> (botocore's key, parse). State and tags are nested.
_LEAN_FIELDS: dict[str, tuple[str, Any]] = {
    "instanceId": ("InstanceId", str),
    "instanceType": ("InstanceType", str),
    "launchTime": ("LaunchTime", parse_timestamp),
    "instanceLifecycle": ("InstanceLifecycle", str),
    "privateIpAddress": ("PrivateIpAddress", str),
}


def _lean_parse(response_dict: dict[str, Any], customized_response_dict: dict, **_: Any) -> None:
    """botocore's before-parse hook: parse a successful describe_pool page here, and leave
    botocore an answer holding only its request id. Any other call, an error, or an answer
    not shaped as expected goes to botocore's own parser untouched."""
    if not getattr(_LEAN, "on", False) or response_dict.get("status_code") != 200:
        return
    body = response_dict.get("body")
    if not isinstance(body, bytes):
        return
    try:
        parsed, request_id = parse_instances_page(body)
    except (ElementTree.ParseError, ValueError) as err:
        log.debug("DescribeInstances answer left to botocore's parser: %s", err)
        return
    customized_response_dict.update(parsed)
    response_dict["body"] = _request_id_only(request_id)


def _request_id_only(request_id: str) -> bytes:
    root = ElementTree.Element("DescribeInstancesResponse")
    ElementTree.SubElement(root, "requestId").text = request_id
    return ElementTree.tostring(root)


_FEED_SIZE = 64 * 1024


def _xml_events(body: bytes) -> Iterator[tuple[str, Any]]:
    """`body`'s ("start"/"end", element) events, parsed as fed in pieces. Not through
    ElementTree.iterparse: its iterator is an instance of a class made for each call, whose
    methods keep the source, and a class is only freed by a full pass of the garbage collector,
    so every answer read would stay in memory until then (seen: 4 answers of 3.3 MB at once)."""
    # The parser botocore itself reads every EC2 answer with (expat: no external entities).
    parser = ElementTree.XMLPullParser(events=("start", "end"))
    for start in range(0, len(body), _FEED_SIZE):
        parser.feed(body[start : start + _FEED_SIZE])
        yield from parser.read_events()
    parser.close()
    yield from parser.read_events()


def parse_instances_page(body: bytes) -> tuple[dict[str, Any], str]:
    """One DescribeInstances page -> ({"Reservations": [{"Instances": [...]}], "NextToken"?},
    request id), each instance with only the fields `InstanceView.from_api` reads. Elements
    are dropped as soon as they are read, so memory stays near the size of the answer."""
    reservations: list[dict[str, Any]] = []
    parsed: dict[str, Any] = {"Reservations": reservations}
    request_id = ""
    path: list[str] = []  # local names from the root down to the current element
    instance: dict[str, Any] = {}
    tags: list[dict[str, str]] = []
    tag: dict[str, str] = {}
    for event, element in _xml_events(body):
        name = element.tag.rpartition("}")[2]
        if event == "start":
            path.append(name)
            if len(path) == 1 and name != "DescribeInstancesResponse":
                raise ValueError(f"unexpected answer <{name}>")
            if path[1:] == _INSTANCE_PATH[:2]:
                reservations.append({"Instances": []})
            elif path[1:] == _INSTANCE_PATH:
                instance, tags = {}, []
                reservations[-1]["Instances"].append(instance)
            elif len(path) == 7 and path[1:5] == _INSTANCE_PATH and path[5:] == ["tagSet", "item"]:
                tag = {}
                tags.append(tag)
            continue
        text = element.text or ""
        depth = len(path)
        in_instance = depth >= 6 and path[1:5] == _INSTANCE_PATH
        if depth == 2 and name == "requestId":
            request_id = text
        elif depth == 2 and name == "nextToken" and text:
            parsed["NextToken"] = text
        elif in_instance and depth == 6:
            if name in _LEAN_FIELDS:
                key, convert = _LEAN_FIELDS[name]
                instance[key] = convert(text)
            elif name == "tagSet":
                instance["Tags"] = tags
        elif in_instance and depth == 7 and path[5] == "instanceState" and name == "name":
            instance["State"] = {"Name": text}
        elif in_instance and depth == 7 and path[5] == "placement" and name == "availabilityZone":
            instance["Placement"] = {"AvailabilityZone": text}
        elif in_instance and depth == 8 and path[5:7] == ["tagSet", "item"]:
            if name in ("key", "value"):
                tag["Key" if name == "key" else "Value"] = text
        path.pop()
        if depth <= 6:
            element.clear()  # an instance's children, the instance, its reservation: done
    return parsed, request_id


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
