"""Images and instance types as EC2 describes them: `resolve:ssm:` image references resolved,
each instance type paired with an image of its architecture, and which types carry GPUs.

What EC2 says about an instance type or an image does not change during an annex's life, so
`Catalog` keeps the answers per region for the helper's life: a reconcile cycle adds no call.
An id EC2 does not know (or an emulator lacks) is kept as unknown and not checked here: the
launch itself then says what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

from botocore.exceptions import ClientError

from annex_gahp import spec
from annex_gahp.cloud.aws.session import cloud_error, error_code
from annex_gahp.errors import InputError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TypeInfo:
    architectures: tuple[str, ...]
    gpus: int


class Catalog:
    """DescribeInstanceTypes / DescribeImages answers, per region (None: EC2 does not know it)."""

    def __init__(self, ec2: Callable[[str], Any]) -> None:
        self._ec2 = ec2
        self._types: dict[tuple[str, str], TypeInfo | None] = {}
        self._images: dict[tuple[str, str], str | None] = {}

    def types(self, region: str, wanted: Iterable[str]) -> dict[str, TypeInfo | None]:
        missing = sorted({t for t in wanted if (region, t) not in self._types})
        if missing:
            for name, info in _describe(
                missing, lambda some: self._describe_types(region, some)
            ).items():
                self._types[(region, name)] = info
        return {t: self._types[(region, t)] for t in wanted}

    def architectures(self, region: str, images: Iterable[str]) -> dict[str, str | None]:
        missing = sorted({i for i in images if (region, i) not in self._images})
        if missing:
            for name, arch in _describe(
                missing, lambda some: self._describe_images(region, some)
            ).items():
                self._images[(region, name)] = arch
        return {i: self._images[(region, i)] for i in images}

    def has_gpus(self, region: str, instance_types: Iterable[str]) -> bool:
        return any(info and info.gpus for info in self.types(region, instance_types).values())

    def _describe_types(self, region: str, names: list[str]) -> dict[str, TypeInfo]:
        found = self._ec2(region).describe_instance_types(InstanceTypes=names)["InstanceTypes"]
        return {
            t["InstanceType"]: TypeInfo(
                tuple(t.get("ProcessorInfo", {}).get("SupportedArchitectures", [])),
                sum(g.get("Count", 0) for g in t.get("GpuInfo", {}).get("Gpus", [])),
            )
            for t in found
        }

    def _describe_images(self, region: str, ids: list[str]) -> dict[str, str]:
        found = self._ec2(region).describe_images(ImageIds=ids)["Images"]
        return {i["ImageId"]: i.get("Architecture", "") for i in found}


def _describe(names: list[str], call: Callable[[list[str]], dict[str, Any]]) -> dict[str, Any]:
    """One call for all; when EC2 refuses the batch for one unknown name, one call each, so
    the known ones are still learnt (and the unknown remembered as None)."""
    try:
        found = call(names)
    except ClientError as err:
        if not _unknown(err):
            raise cloud_error(err, f"describe {', '.join(names)}") from None
        if len(names) == 1:
            return {names[0]: None}
        found = {}
        for name in names:
            found |= _describe([name], call)
    return {n: found.get(n) for n in names}


def _unknown(err: ClientError) -> bool:
    code = error_code(err)
    return code in ("InvalidInstanceType", "InvalidParameterValue") or code.startswith(
        "InvalidAMIID"
    )


def resolve(ssm: Any, image: str, region: str, prefixes: tuple[str, ...], knob: str) -> str:
    """An `resolve:ssm:<name>` reference -> the ami id the parameter holds; an id as given."""
    if not image.startswith(spec.SSM_REFERENCE):
        return image
    name = spec.check_image_reference(image, prefixes, knob)
    try:
        value = ssm.get_parameter(Name=name)["Parameter"]["Value"]
    except ClientError as err:
        if error_code(err) in ("ParameterNotFound", "ParameterVersionNotFound"):
            raise InputError(
                f"{knob}: SSM parameter {name} does not exist in region {region}"
            ) from None
        raise cloud_error(err, f"read SSM parameter {name} ({knob}) in region {region}") from None
    if not value.startswith("ami-"):
        raise InputError(
            f"{knob}: SSM parameter {name} in region {region} holds {value[:64]!r}, not an ami id"
        )
    log.info("image %s in region %s is %s", image, region, value)
    return value


def pair(
    instance_types: tuple[str, ...],
    images: tuple[str, ...],
    type_info: dict[str, TypeInfo | None],
    image_arch: dict[str, str | None],
    knob: str,
) -> tuple[str, ...]:
    """One image per instance type: the one at the type's place (or the only one) when its
    architecture fits, else the first of the list that fits. A type that no image fits is
    refused, naming the images, their architectures, the type and its architectures."""
    if not images:
        return ()
    chosen = []
    for place, itype in enumerate(instance_types):
        preferred = images[place] if len(images) == len(instance_types) else images[0]
        info = type_info.get(itype)
        if info is None or not info.architectures:
            chosen.append(preferred)
            continue
        candidates = [preferred, *(i for i in images if i != preferred)]
        fits = [i for i in candidates if image_arch.get(i) in (None, *info.architectures)]
        if not fits:
            shown = ", ".join(f"{i} ({image_arch.get(i)})" for i in dict.fromkeys(images))
            raise InputError(
                f"{knob}: image {shown} does not fit instance type {itype}"
                f" ({', '.join(info.architectures)}): give an image of that architecture"
            )
        chosen.append(fits[0])
    return tuple(chosen)
