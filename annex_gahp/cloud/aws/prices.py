"""Prices from AWS: spot prices (EC2 DescribeSpotPriceHistory, per zone) for the helper, and
on-demand prices (the AWS Price List query API, `pricing` in us-east-1) for `htcondor-annex
prices update`, which writes them into the price file (annex_gahp/prices.py).

The emulator (moto 5.2) serves DescribeSpotPriceHistory with one fixed price per zone and has
no Price List API: `prices update` then says so and the admin writes the file by hand.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from annex_gahp.cloud.aws.session import aws_errors

log = logging.getLogger(__name__)

# The Price List API answers from these two endpoints only.
PRICING_REGION = "us-east-1"
LINUX = "Linux/UNIX"


def spot_prices(ec2: Any, types: list[str]) -> dict[tuple[str, str], float]:
    """The latest spot price of each type in each zone of the client's region."""
    found: dict[tuple[str, str], tuple[float, float]] = {}
    with aws_errors("read spot prices"):
        pages = ec2.get_paginator("describe_spot_price_history").paginate(
            InstanceTypes=types, ProductDescriptions=[LINUX, f"{LINUX} (Amazon VPC)"],
            StartTime=_now_utc(),
        )  # fmt: skip
        for page in pages:
            for item in page.get("SpotPriceHistory", []):
                key = (item.get("AvailabilityZone", ""), item.get("InstanceType", ""))
                stamp = item["Timestamp"].timestamp() if "Timestamp" in item else 0.0
                try:
                    price = float(item["SpotPrice"])
                except (KeyError, ValueError):
                    continue
                if key not in found or stamp >= found[key][0]:
                    found[key] = (stamp, price)
    return {key: price for key, (_, price) in found.items()}


def _now_utc() -> Any:
    import datetime  # noqa: PLC0415

    return datetime.datetime.now(datetime.timezone.utc)


def on_demand_prices(
    pricing: Any, regions: Iterable[str], types: Iterable[str]
) -> dict[str, dict[str, float]]:
    """region -> instance type -> USD per hour (Linux, shared tenancy, no pre-installed
    software), from the Price List query API. A type without an answer is left out."""
    out: dict[str, dict[str, float]] = {}
    for region in regions:
        for itype in types:
            with aws_errors(f"read the on-demand price of {itype} in {region}"):
                answer = pricing.get_products(
                    ServiceCode="AmazonEC2",
                    Filters=[
                        _term("regionCode", region),
                        _term("instanceType", itype),
                        _term("operatingSystem", "Linux"),
                        _term("tenancy", "Shared"),
                        _term("preInstalledSw", "NA"),
                        _term("capacitystatus", "Used"),
                    ],
                    MaxResults=10,
                )
            price = _first_usd(answer.get("PriceList", []))
            if price is not None:
                out.setdefault(region, {})[itype] = price
    return out


def _term(field: str, value: str) -> dict[str, str]:
    return {"Type": "TERM_MATCH", "Field": field, "Value": value}


def _first_usd(items: list[Any]) -> float | None:
    for item in items:
        product = json.loads(item) if isinstance(item, str) else item
        for term in (product.get("terms", {}).get("OnDemand") or {}).values():
            for dimension in (term.get("priceDimensions") or {}).values():
                usd = (dimension.get("pricePerUnit") or {}).get("USD")
                if usd is not None and dimension.get("unit", "Hrs") == "Hrs":
                    return float(usd)
    return None
