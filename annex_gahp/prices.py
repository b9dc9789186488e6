"""Prices: the admin's price file and spot prices from EC2, kept as price points in the store.

The price file (ANNEX_PRICE_FILE, default $(ANNEX_STATE_DIR)/prices.json) is JSON written by
`htcondor-annex prices update` from the AWS Price List query API, or by the admin:

    {"currency": "USD", "updated": 1764900000, "source": "aws-price-list",
     "on_demand": {"us-east-1": {"m5.large": 0.096}},
     "spot": {"us-east-1": {"m5.large": 0.035}}}

Prices are per instance-hour (Linux, shared tenancy). `spot` is optional: spot prices come
from EC2's DescribeSpotPriceHistory (per zone), refreshed every ANNEX_PRICE_REFRESH; a spot
price in the file stands for the region where EC2 gave none. The file is read again when it
changes. Every price the helper uses is written to the store as a point in time, so a price
change bills each part of an instance's time at the price then in force, and a restarted
helper computes the same cost. A price that is nowhere is said, never taken as zero.

Stdlib only: the EC2 call is given as `spot_fetch` (cloud/aws/prices.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from annex_gahp import cost
from annex_gahp.errors import SetupError

log = logging.getLogger(__name__)

FILE_NAME = "prices.json"
# (region, instance types) -> {(zone, instance type): price per hour}
SpotFetch = Callable[[str, list[str]], dict[tuple[str, str], float]]


def default_path(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def read_file(path: str) -> dict[str, Any]:
    """The price file, checked: a bad file is an error naming it, not an empty price list."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise SetupError(
            f"the price file {path} (ANNEX_PRICE_FILE) is unreadable ({err}): rewrite it with "
            "htcondor-annex prices update"
        ) from None
    if not isinstance(data, dict):
        raise SetupError(f"the price file {path} (ANNEX_PRICE_FILE) is not a JSON object")
    for section in ("on_demand", "spot"):
        for region, table in (data.get(section) or {}).items():
            if not isinstance(table, dict):
                raise SetupError(f"{path}: {section}.{region} is not an object of prices")
            for itype, price in table.items():
                if isinstance(price, bool) or not isinstance(price, (int, float)) or price < 0:
                    raise SetupError(f"{path}: {section}.{region}.{itype} is not a price")
    return data


def file_points(data: dict[str, Any]) -> list[tuple[cost.PriceKey, float, str]]:
    currency = str(data.get("currency") or "USD").upper()
    out = []
    for section, lifecycle in (("on_demand", cost.ON_DEMAND), ("spot", cost.SPOT)):
        for region, table in (data.get(section) or {}).items():
            for itype, price in table.items():
                out.append((cost.PriceKey(region, itype, lifecycle), float(price), currency))
    return out


def write_file(path: str, data: dict[str, Any]) -> None:
    """Write atomically, readable by the helper (0644: prices are no secret)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def as_series(rows: Iterable[Any]) -> dict[cost.PriceKey, list[cost.PricePoint]]:
    """Store rows (store.PriceRow) as cost.Prices."""
    series: dict[cost.PriceKey, list[cost.PricePoint]] = defaultdict(list)
    for row in rows:
        key = cost.PriceKey(row.region, row.instance_type, row.lifecycle, row.zone)
        series[key].append(cost.PricePoint(row.since, row.per_hour, row.currency))
    return {key: tuple(points) for key, points in series.items()}  # shared: read-only


class PriceSource:
    """Keeps the store's price points current: the file when it changes, spot prices every
    `refresh` seconds for the (region, type) pairs in use."""

    def __init__(self, path: str, refresh: int, spot_fetch: SpotFetch | None = None) -> None:
        self.path = path
        self.refresh_every = refresh
        self.spot_fetch = spot_fetch
        self._file_stamp: tuple[float, int] | None = None
        self._spot_at: dict[str, int] = {}  # region -> when its spot prices were fetched
        self.currency = "USD"
        self.file_updated: int | None = None

    def refresh(self, store: Any, spot_in_use: dict[str, set[str]], now: int) -> None:
        """Record what changed. `spot_in_use`: region -> instance types with spot instances."""
        self._read_file(store, now)
        if self.spot_fetch is None:
            return
        for region, types in sorted(spot_in_use.items()):
            if (
                not types
                or now - self._spot_at.get(region, -self.refresh_every) < self.refresh_every
            ):
                continue
            self._spot_at[region] = now
            try:
                found = self.spot_fetch(region, sorted(types))
            except Exception as err:  # the cost view waits; launching does not
                log.warning("could not read spot prices in %s: %s", region, err)
                continue
            for (zone, itype), price in found.items():
                store.record_price(
                    region=region,
                    zone=zone,
                    instance_type=itype,
                    lifecycle=cost.SPOT,
                    per_hour=price,
                    currency="USD",  # EC2's spot price history is in US dollars
                    source="ec2",
                    now=now,
                )

    def _read_file(self, store: Any, now: int) -> None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            if self._file_stamp is not None:
                log.warning("the price file %s is gone; its prices stay as recorded", self.path)
            self._file_stamp = None
            return
        stamp = (info.st_mtime, info.st_size)
        if stamp == self._file_stamp:
            return
        data = read_file(self.path)
        self._file_stamp = stamp
        self.file_updated = int(data.get("updated") or info.st_mtime)
        changed = 0
        for key, price, currency in file_points(data):
            self.currency = currency
            changed += store.record_price(
                region=key.region,
                zone="",
                instance_type=key.instance_type,
                lifecycle=key.lifecycle,
                per_hour=price,
                currency=currency,
                source="file",
                now=now,
            )
        log.info("price file %s read: %d price(s) changed", self.path, changed)
