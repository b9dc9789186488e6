"""The `fleet` strategy: one EC2 Fleet (type `instant`) call per annex change.

Why a per-annex launch template: CreateFleet takes no UserData, neither at top level nor in
overrides, so the pool-mode boot script (which names the annex, its owner and its token's
parameter) lives in a launch template of its own, copied from the setup's base template data
plus UserData, key pair and security groups. It is created once per annex, reused when the
annex grows, and deleted when the annex retires.

What moto 5.2 (server mode) does with this, checked by hand and by tests/unit/test_aws_fleet.py:
- CreateFleet instant launches from the launch template: the instances get the template's
  ImageId, and `describe_instance_attribute(Attribute="userData")` returns the template's
  UserData (base64, as given). So an emulated-instance booter reads user data there (or from
  the template version named in the fleet response), exactly as EC2 hands it to cloud-init.
- Override ImageId, InstanceType, SubnetId and MaxPrice are honoured, but moto puts EVERY
  instance on the FIRST override (no spreading, no priorities, no capacity errors): fall-through
  is tested with injected responses.
- Instance tags = the template's instance TagSpecifications plus CreateFleet's instance
  TagSpecifications; the fleet's own tags are kept too.
- moto does NOT apply the template's MetadataOptions (instances report HttpTokens=optional,
  InstanceMetadataTags=disabled), IamInstanceProfile, or InstanceInitiatedShutdownBehavior
  (reported as "stop"): the emulated booter must not rely on moto for these.
- Spot capacity type gives InstanceLifecycle=spot; ClientToken is ignored (no idempotency).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

from botocore.exceptions import ClientError

from annex_gahp import names, offerings
from annex_gahp.cloud.aws.session import aws_errors, cloud_error, error_code
from annex_gahp.errors import CloudError, InputError

log = logging.getLogger(__name__)

# Per-override failures after which the next type/subnet may still work.
CAPACITY_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "InsufficientReservedInstanceCapacity",
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
        "Unsupported",
        "UnfulfillableCapacity",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
    }
)
MAX_FLEET_CALLS = 4  # one normally; more only when AWS leaves capacity on the table
# CreateFleet's documented cap on overrides across a request's launch templates (stated for
# `request` and `maintain` fleets; kept for `instant` too): types x subnets beyond it are cut,
# the user's first choices kept.
MAX_OVERRIDES = 300
# The allocation strategies (issue 14): spot from the pools with the lowest price and the
# least chance of interruption, on-demand the cheapest.
SPOT_STRATEGY = "price-capacity-optimized"
ON_DEMAND_STRATEGY = "lowest-price"


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    annex: str
    owner: str
    request_id: str
    pool_id: str
    expires: int  # epoch seconds
    count: int
    instance_types: tuple[str, ...]
    image_ids: tuple[str, ...] = ()  # one, one per type, or () = the base template's image
    subnets: tuple[str, ...] = ()
    spot_prices: tuple[str, ...] = ()  # () = on-demand; one, or one per type
    vpc: str = ""  # subnets must be in it; none given: its subnets, one per zone
    token_bucket: str = ""  # stack strategy: tagged on the groups, found again from the tags
    keypair: str = ""
    security_groups: tuple[str, ...] = ()
    extra_tags: dict[str, str] = dataclasses.field(default_factory=dict)
    user_data: str | bytes = ""
    client_token: str = ""  # the caller's intent id, for AWS idempotency (moto ignores it)
    # None: the base template's (pool mode: reads the annex's token); "": none at all
    # (provision mode: the user's own code runs there); else an instance profile name or ARN.
    instance_profile: str | None = None

    @property
    def spot(self) -> bool:
        return bool(self.spot_prices)

    def tags(self) -> dict[str, str]:
        """The contract's tags plus the user's extras (which cannot override ours)."""
        extra = {
            k: v for k, v in self.extra_tags.items() if not k.startswith((names.TAG_PREFIX, "aws:"))
        }
        return extra | {
            names.TAG_NAME: self.annex,
            names.TAG_OWNER: self.owner,
            names.TAG_REQUEST: self.request_id,
            names.TAG_EXPIRES: str(int(self.expires)),
            names.TAG_POOL: self.pool_id,
        }

    def per_type(self, values: tuple[str, ...], what: str) -> list[str | None]:
        if not values:
            return [None] * len(self.instance_types)
        if len(values) == 1:
            return [values[0]] * len(self.instance_types)
        if len(values) == len(self.instance_types):
            return list(values)
        raise InputError(
            f"{what}: give one value for all instance types or one per type "
            f"({len(self.instance_types)}), not {len(values)}"
        )


@dataclasses.dataclass
class LaunchResult:
    instance_ids: list[str]
    errors: list[str]  # one line per override or call that failed, for AnnexLastError
    fleet_ids: list[str] = dataclasses.field(default_factory=list)
    # Capacity pools AWS said have no capacity (with its error code), for offerings.py.
    unavailable: list[tuple[offerings.Offering, str]] = dataclasses.field(default_factory=list)


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


# --- per-annex launch template ------------------------------------------------------------------

_LT_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def template_name(pool_id: str, owner: str, annex: str) -> str:
    """A launch template name unique per (pool, owner, annex) within the 128 allowed chars of
    `[A-Za-z0-9().-/_]`: the hash keeps distinct pools/owners apart after sanitising."""
    digest = hashlib.sha256(f"{pool_id}\0{owner}\0{annex}".encode()).hexdigest()[:12]
    safe_owner = _LT_UNSAFE.sub("_", owner)[:32]
    safe_annex = _LT_UNSAFE.sub("_", annex)[:63]
    return f"htcondor-annex-{digest}-{safe_owner}-{safe_annex}"


def _input_members(ec2: Any, shape_name: str) -> Any:
    return ec2.meta.service_model.shape_for(shape_name)


def _fit_to_shape(value: Any, shape: Any) -> Any:
    """Keep only what an input shape accepts: DescribeLaunchTemplateVersions returns
    output-only fields (e.g. MetadataOptions.State) that CreateLaunchTemplate refuses."""
    if shape.type_name == "structure":
        if not isinstance(value, dict):
            return value
        return {
            k: _fit_to_shape(v, shape.members[k]) for k, v in value.items() if k in shape.members
        }
    if shape.type_name == "list" and isinstance(value, list):
        return [_fit_to_shape(v, shape.member) for v in value]
    return value


def base_template_data(ec2: Any, base_launch_template: str) -> dict[str, Any]:
    """The default version's data of the setup's base template (name or lt- id), as input."""
    if not base_launch_template:
        return {}
    key = "LaunchTemplateId" if base_launch_template.startswith("lt-") else "LaunchTemplateName"
    region = ec2.meta.region_name
    try:
        versions = ec2.describe_launch_template_versions(
            **{key: base_launch_template}, Versions=["$Default"]
        )["LaunchTemplateVersions"]
    except ClientError as err:
        failed = cloud_error(
            err, f"read base launch template {base_launch_template} (ANNEX_LAUNCH_TEMPLATE)"
        )
        if "NotFound" in error_code(err):
            failed = CloudError(
                f"{failed}; the setup's launch template exists per region: is this annex's "
                f"region {region} set up? (`htcondor-annex setup --region {region}`)"
            )
        raise failed from None
    if not versions:
        raise CloudError(
            f"base launch template {base_launch_template} has no default version: "
            "re-run `htcondor-annex setup`"
        )
    data = versions[0].get("LaunchTemplateData", {})
    return _fit_to_shape(data, _input_members(ec2, "RequestLaunchTemplateData"))


def _encode_user_data(user_data: str | bytes) -> str:
    raw = user_data.encode() if isinstance(user_data, str) else user_data
    return base64.b64encode(raw).decode("ascii")


def annex_template_data(base: dict[str, Any], plan: LaunchPlan) -> dict[str, Any]:
    data = dict(base)
    if plan.user_data:
        data["UserData"] = _encode_user_data(plan.user_data)
    if plan.keypair:
        data["KeyName"] = plan.keypair
    if plan.instance_profile is not None:
        data.pop("IamInstanceProfile", None)
        if plan.instance_profile.startswith("arn:"):
            data["IamInstanceProfile"] = {"Arn": plan.instance_profile}
        elif plan.instance_profile:
            data["IamInstanceProfile"] = {"Name": plan.instance_profile}
    if plan.security_groups:
        data["SecurityGroupIds"] = list(plan.security_groups)
        data.pop("SecurityGroups", None)
    # Overrides choose type and subnet; a network interface in the template would clash.
    data.pop("InstanceType", None)
    if data.get("NetworkInterfaces"):
        raise CloudError(
            "the base launch template defines NetworkInterfaces, which EC2 Fleet cannot combine "
            "with subnet overrides: re-run `htcondor-annex setup`"
        )
    stable = {k: v for k, v in plan.tags().items() if k != names.TAG_EXPIRES}
    data["TagSpecifications"] = [{"ResourceType": "volume", "Tags": _tag_list(stable)}]
    return data


def _data_digest(data: dict[str, Any]) -> str:
    canonical = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


DIGEST_TAG = "htcondor-annex:template-digest"


def ensure_annex_template(ec2: Any, plan: LaunchPlan, base_launch_template: str) -> str:
    """Create the annex's launch template, or reuse it; returns its id.

    A new version is made only when the wanted data changed (e.g. a new boot script)."""
    name = template_name(plan.pool_id, plan.owner, plan.annex)
    data = annex_template_data(base_template_data(ec2, base_launch_template), plan)
    if "ImageId" not in data and not plan.image_ids:
        raise InputError(
            "no image for the instances: set annex_image_ids or ANNEX_DEFAULT_IMAGE_ID "
            "(and re-run `htcondor-annex setup`)"
        )
    digest = _data_digest(data)
    tags = {k: v for k, v in plan.tags().items() if k != names.TAG_EXPIRES}
    tags[DIGEST_TAG] = digest
    action = f"create launch template {name} for annex {plan.annex}"
    try:
        created = ec2.create_launch_template(
            LaunchTemplateName=name,
            LaunchTemplateData=data,
            TagSpecifications=[{"ResourceType": "launch-template", "Tags": _tag_list(tags)}],
        )
        log.info("created launch template %s for annex %s", name, plan.annex)
        return created["LaunchTemplate"]["LaunchTemplateId"]
    except ClientError as err:
        if error_code(err) != "InvalidLaunchTemplateName.AlreadyExistsException":
            raise cloud_error(err, action) from None
    with aws_errors(action):
        found = ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"][0]
        template_id = found["LaunchTemplateId"]
        current = {t["Key"]: t["Value"] for t in found.get("Tags", [])}.get(DIGEST_TAG)
        if current != digest:
            version = ec2.create_launch_template_version(
                LaunchTemplateId=template_id, LaunchTemplateData=data
            )["LaunchTemplateVersion"]["VersionNumber"]
            ec2.modify_launch_template(LaunchTemplateId=template_id, DefaultVersion=str(version))
            ec2.create_tags(Resources=[template_id], Tags=[{"Key": DIGEST_TAG, "Value": digest}])
            log.info("launch template %s: new default version %s", name, version)
    return template_id


def delete_annex_template(ec2: Any, pool_id: str, owner: str, annex: str) -> bool:
    """Delete the annex's launch template; False if it was already gone."""
    name = template_name(pool_id, owner, annex)
    try:
        ec2.delete_launch_template(LaunchTemplateName=name)
    except ClientError as err:
        code = error_code(err)
        # moto answers MissingParameter for an unknown name; AWS a *.NotFoundException.
        if (
            code.startswith(
                ("InvalidLaunchTemplateName.NotFound", "InvalidLaunchTemplateId.NotFound")
            )
            or code == "MissingParameter"
        ):
            return False
        raise cloud_error(err, f"delete launch template {name}") from None
    log.info("deleted launch template %s", name)
    return True


# --- the fleet call ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Override:
    instance_type: str
    subnet: str | None
    image: str | None
    price: str | None
    priority: float

    def api(self) -> dict[str, Any]:
        out: dict[str, Any] = {"InstanceType": self.instance_type, "Priority": self.priority}
        if self.subnet:
            out["SubnetId"] = self.subnet
        if self.image:
            out["ImageId"] = self.image
        if self.price:
            out["MaxPrice"] = self.price
        return out


def overrides(plan: LaunchPlan) -> list[_Override]:
    """Every instance type x subnet, in the user's order of preference (types first)."""
    if not plan.instance_types:
        raise InputError(
            "no instance type: set annex_instance_types or ANNEX_DEFAULT_INSTANCE_TYPES"
        )
    images = plan.per_type(plan.image_ids, "annex_image_ids")
    prices = plan.per_type(plan.spot_prices, "annex_spot_prices")
    subnets: list[str | None] = list(plan.subnets) or [None]
    out = []
    for t, itype in enumerate(plan.instance_types):
        for s, subnet in enumerate(subnets):
            out.append(_Override(itype, subnet, images[t], prices[t], float(t * len(subnets) + s)))
    return out


def fleet_request(
    plan: LaunchPlan, template_id: str, candidates: list[_Override], count: int
) -> dict[str, Any]:
    capacity = "spot" if plan.spot else "on-demand"
    request: dict[str, Any] = {
        "Type": "instant",
        "TargetCapacitySpecification": {
            "TotalTargetCapacity": count,
            "DefaultTargetCapacityType": capacity,
            ("SpotTargetCapacity" if plan.spot else "OnDemandTargetCapacity"): count,
        },
        "LaunchTemplateConfigs": [
            {
                "LaunchTemplateSpecification": {
                    (
                        "LaunchTemplateId"
                        if template_id.startswith("lt-")
                        else "LaunchTemplateName"
                    ): (template_id),
                    "Version": "$Default",
                },
                "Overrides": [c.api() for c in candidates],
            }
        ],
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": _tag_list(plan.tags())},
            {"ResourceType": "fleet", "Tags": _tag_list(plan.tags())},
        ],
    }
    # AWS picks among the overrides (priorities are kept as the user's order, for the record):
    # spot where price and interruption risk are lowest together, on-demand the cheapest.
    if plan.spot:
        request["SpotOptions"] = {"AllocationStrategy": SPOT_STRATEGY}
    else:
        request["OnDemandOptions"] = {"AllocationStrategy": ON_DEMAND_STRATEGY}
    if plan.client_token:
        request["ClientToken"] = plan.client_token
    return request


def _matches(candidate: _Override, reported: dict[str, Any]) -> bool:
    over = reported.get("Overrides", {})
    return over.get("InstanceType") == candidate.instance_type and (
        candidate.subnet is None or over.get("SubnetId") in (None, candidate.subnet)
    )


def _vpc_exists(ec2: Any, vpc: str) -> bool:
    try:
        return bool(ec2.describe_vpcs(VpcIds=[vpc]).get("Vpcs"))
    except ClientError as err:
        if "NotFound" in error_code(err) or "Malformed" in error_code(err):
            return False
        raise cloud_error(err, f"look up annex_vpc = {vpc}") from None


def resolve_vpc(ec2: Any, plan: LaunchPlan) -> LaunchPlan:
    """Honour annex_vpc: the VPC must exist in the annex's region; subnets given must be in it
    (else refused naming both); none given, the VPC's subnets are used, one per zone."""
    if not plan.vpc:
        return plan
    region = ec2.meta.region_name
    if not _vpc_exists(ec2, plan.vpc):
        raise InputError(f"annex_vpc = {plan.vpc} does not exist in region {region}")
    if plan.subnets:
        try:
            found = ec2.describe_subnets(SubnetIds=list(plan.subnets))["Subnets"]
        except ClientError as err:
            if "NotFound" in error_code(err) or "Malformed" in error_code(err):
                raise InputError(
                    f"annex_subnets = {','.join(plan.subnets)}: not every subnet exists"
                    f" in region {region}"
                ) from None
            raise cloud_error(err, f"look up annex_subnets = {','.join(plan.subnets)}") from None
        vpc_of = {s["SubnetId"]: s.get("VpcId", "") for s in found}
        for subnet in plan.subnets:
            if subnet not in vpc_of:
                raise InputError(f"annex_subnets: {subnet} does not exist in region {region}")
            if vpc_of[subnet] != plan.vpc:
                raise InputError(
                    f"annex_subnets: {subnet} is in {vpc_of[subnet] or 'no VPC'},"
                    f" not in annex_vpc = {plan.vpc}"
                )
        return plan
    try:
        found = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [plan.vpc]}])
    except ClientError as err:
        raise cloud_error(err, f"list the subnets of annex_vpc = {plan.vpc}") from None
    by_zone: dict[str, str] = {}
    for subnet in sorted(found.get("Subnets", []), key=lambda s: s["SubnetId"]):
        if subnet.get("VpcId") == plan.vpc:
            by_zone.setdefault(subnet.get("AvailabilityZone", ""), subnet["SubnetId"])
    if not by_zone:
        raise InputError(f"annex_vpc = {plan.vpc} has no subnets: give annex_subnets")
    chosen = tuple(by_zone[zone] for zone in sorted(by_zone))
    log.info("annex %s: subnets %s of %s", plan.annex, ",".join(chosen), plan.vpc)
    return dataclasses.replace(plan, subnets=chosen)


def subnet_zones(ec2: Any, subnets: Sequence[str]) -> dict[str, str]:
    """subnet id -> its availability zone (one DescribeSubnets; {} when none is given or the
    call fails: a capacity pool is then taken as the whole region)."""
    if not subnets:
        return {}
    try:
        found = ec2.describe_subnets(SubnetIds=list(subnets))["Subnets"]
    except ClientError as err:
        log.warning("zones of subnets %s unknown: %s", ",".join(subnets), error_code(err))
        return {}
    return {s["SubnetId"]: s.get("AvailabilityZone", "") for s in found}


class _Pools:
    """The capacity pool (offerings.Offering) of each override; subnet zones looked up once,
    only when a decision needs them."""

    def __init__(self, ec2: Any, plan: LaunchPlan) -> None:
        self.ec2 = ec2
        self.plan = plan
        self.region = ec2.meta.region_name
        self.lifecycle = offerings.SPOT if plan.spot else offerings.ON_DEMAND
        self._zones: dict[str, str] | None = None

    def zone(self, subnet: str | None) -> str:
        if not subnet:
            return ""
        if self._zones is None:
            self._zones = subnet_zones(self.ec2, self.plan.subnets)
        return self._zones.get(subnet, "")

    def of(self, instance_type: str, subnet: str | None, zone: str = "") -> offerings.Offering:
        return offerings.Offering(
            self.region, instance_type, zone or self.zone(subnet), self.lifecycle
        )


def cap_overrides(candidates: list[_Override], annex: str) -> list[_Override]:
    """At most MAX_OVERRIDES, the user's first choices (types first, then subnets) kept."""
    if len(candidates) <= MAX_OVERRIDES:
        return candidates
    log.info(
        "annex %s: %d overrides, CreateFleet takes %d: the first kept",
        annex,
        len(candidates),
        MAX_OVERRIDES,
    )
    return candidates[:MAX_OVERRIDES]


def _skip_avoided(
    candidates: list[_Override], pools: _Pools, avoid: Sequence[offerings.Mark]
) -> tuple[list[_Override], list[offerings.Mark]]:
    """The candidates no mark covers, and the marks that removed some."""
    if not avoid:
        return candidates, []
    kept, used = [], []
    for c in candidates:
        mark = offerings.blocked(avoid, pools.of(c.instance_type, c.subnet))
        if mark is None:
            kept.append(c)
        elif mark not in used:
            used.append(mark)
    return kept, used


def launch(
    ec2: Any,
    plan: LaunchPlan,
    base_launch_template: str,
    *,
    annex_template_id: str = "",
    avoid: Sequence[offerings.Mark] = (),
) -> LaunchResult:
    """Launch `plan.count` instances with one CreateFleet call (more only to fall through
    capacity errors AWS reported but did not itself route around).

    `annex_template_id`: the id `ensure_annex_template` returned earlier for this annex; given,
    no launch-template call is made. Otherwise the annex's template is ensured first, unless
    the plan adds nothing to `base_launch_template` (no user data, key pair or groups), in
    which case that template is launched as it is.

    `avoid`: capacity pools marked unavailable (offerings.py); their overrides are left out.
    Capacity errors AWS gives are returned in `unavailable`."""
    if plan.count <= 0:
        return LaunchResult([], [])
    plan = resolve_vpc(ec2, plan)
    pools = _Pools(ec2, plan)
    candidates, used = _skip_avoided(overrides(plan), pools, avoid)
    if not candidates:
        return LaunchResult(
            [],
            [
                f"every instance type and subnet of annex {plan.annex} is unavailable for now: "
                f"{offerings.describe(used)}"
            ],
        )
    candidates = cap_overrides(candidates, plan.annex)
    if annex_template_id:
        template_id = annex_template_id
    elif not (plan.user_data or plan.keypair or plan.security_groups) and base_launch_template:
        template_id = base_launch_template
    else:
        template_id = ensure_annex_template(ec2, plan, base_launch_template)
    result = LaunchResult([], [])
    for _attempt in range(MAX_FLEET_CALLS):
        wanted = plan.count - len(result.instance_ids)
        if wanted <= 0 or not candidates:
            break
        request = fleet_request(plan, template_id, candidates, wanted)
        try:
            response = ec2.create_fleet(**request)
        except ClientError as err:
            code = error_code(err)
            failed = cloud_error(err, f"launch {wanted} instance(s) for annex {plan.annex}")
            result.errors.append(str(failed))
            if code not in CAPACITY_CODES:
                if result.instance_ids:
                    break
                raise failed from None
            # The whole call failed for capacity: give up the most preferred type.
            dropped = candidates[0].instance_type
            candidates = [c for c in candidates if c.instance_type != dropped]
            result.unavailable.append((pools.of(dropped, None), code))
            continue
        if response.get("FleetId"):
            result.fleet_ids.append(response["FleetId"])
        launched = [i for group in response.get("Instances", []) for i in group["InstanceIds"]]
        result.instance_ids.extend(launched)
        retry_worthy = []
        for error in response.get("Errors", []):
            spec = error.get("LaunchTemplateAndOverrides", {})
            over = spec.get("Overrides", {})
            where = "/".join(v for v in (over.get("InstanceType"), over.get("SubnetId")) if v)
            code = error.get("ErrorCode", "Unknown")
            result.errors.append(
                f"{where or 'fleet'}: AWS error {code}: {error.get('ErrorMessage', '')}".rstrip(
                    ": "
                )
            )
            if code in CAPACITY_CODES:
                retry_worthy.extend(c for c in candidates if _matches(c, spec))
                if over.get("InstanceType"):
                    pool = pools.of(
                        over["InstanceType"], over.get("SubnetId"), over.get("AvailabilityZone", "")
                    )
                    result.unavailable.append((pool, code))
        log.info(
            "annex %s: fleet %s launched %d of %d (%d override errors)",
            plan.annex,
            response.get("FleetId", "?"),
            len(launched),
            wanted,
            len(response.get("Errors", [])),
        )
        if not retry_worthy:
            break
        candidates = [c for c in candidates if c not in retry_worthy]
    return result
