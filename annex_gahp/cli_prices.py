"""`htcondor-annex prices update|show|set` (admin): the price file the helper bills with.

`update` asks the AWS Price List query API for the on-demand price of each instance type in
each region (ANNEX_DEFAULT_INSTANCE_TYPES and ANNEX_ALLOWED_INSTANCE_TYPES, in ANNEX_AWS_REGION
and ANNEX_ALLOWED_REGIONS, unless --types/--regions say otherwise) and writes them into
ANNEX_PRICE_FILE, keeping the prices it did not get. Where that API is not reachable (a
private network, the emulator) `set` writes a price by hand. `show` prints the file and its
age. The helper reads the file again when it changes (annex_gahp/prices.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from annex_gahp import budgets, durations, prices
from annex_gahp.errors import AnnexError, InputError


def add_parsers(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "prices",
        help="admin: the price file the helper bills with (update from AWS, set, show)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    verbs = p.add_subparsers(dest="prices_verb", metavar="update|set|show", required=True)
    u = verbs.add_parser("update", help="write on-demand prices from the AWS Price List API")
    u.add_argument(
        "--regions", help="comma list (default: ANNEX_AWS_REGION, ANNEX_ALLOWED_REGIONS)"
    )
    u.add_argument("--types", help="comma list (default: the default and allowed instance types)")
    u.add_argument("--file", help="the price file (default ANNEX_PRICE_FILE)")
    u.set_defaults(func=cmd_update)
    s = verbs.add_parser("set", help="write prices by hand: REGION:TYPE=PRICE ...")
    s.add_argument("entries", nargs="+", metavar="REGION:TYPE=PRICE")
    s.add_argument("--spot", action="store_true", help="spot prices (default on-demand)")
    s.add_argument("--currency", default="USD")
    s.add_argument("--file", help="the price file (default ANNEX_PRICE_FILE)")
    s.set_defaults(func=cmd_set)
    w = verbs.add_parser("show", help="print the price file and how old it is")
    w.add_argument("--file", help="the price file (default ANNEX_PRICE_FILE)")
    w.set_defaults(func=cmd_show)


def _path(args: argparse.Namespace) -> tuple[str, Any]:
    from annex_gahp.cli_admin import _settings  # noqa: PLC0415

    cfg = _settings(args)
    return args.file or cfg.price_file, cfg


def _load(path: str) -> dict[str, Any]:
    data = prices.read_file(path)
    data.setdefault("currency", "USD")
    data.setdefault("on_demand", {})
    return data


def _fail(err: AnnexError) -> int:
    print(f"htcondor-annex prices: ERROR: {err}", file=sys.stderr)
    return 1


def cmd_set(args: argparse.Namespace) -> int:
    try:
        path, _cfg = _path(args)
        data = _load(path)
        section = data.setdefault("spot" if args.spot else "on_demand", {})
        for entry in args.entries:
            where, _, price = entry.partition("=")
            region, _, itype = where.partition(":")
            try:
                value = float(price)
            except ValueError:
                value = -1.0
            if not region or not itype or not 0 <= value < float("inf"):
                raise InputError(
                    f"{entry!r}: give REGION:TYPE=PRICE, e.g. us-east-1:m5.large=0.096"
                )
            section.setdefault(region, {})[itype] = value
        data.update(currency=args.currency.upper(), updated=int(time.time()), source="admin")
        prices.write_file(path, data)
    except AnnexError as err:
        return _fail(err)
    print(f"wrote {len(args.entries)} price(s) to {path}")
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    try:
        path, cfg = _path(args)
        from annex_gahp.cloud.aws import prices as aws_prices  # noqa: PLC0415 - boto3
        from annex_gahp.cloud.aws import session  # noqa: PLC0415

        regions = _list(args.regions) or sorted(
            {session.resolve_region(None, cfg), *cfg.allowed_regions}
        )
        types = _list(args.types) or sorted(
            {*cfg.default_instance_types, *cfg.allowed_instance_types}
        )
        pricing = session.client("pricing", cfg, aws_prices.PRICING_REGION)
        found = aws_prices.on_demand_prices(pricing, regions, types)
        data = _load(path)
        for region, table in found.items():
            data["on_demand"].setdefault(region, {}).update(table)
        data.update(currency="USD", updated=int(time.time()), source="aws-price-list")
        prices.write_file(path, data)
    except AnnexError as err:
        return _fail(
            AnnexError(
                f"{err}; where the Price List API cannot be reached, write prices with "
                "htcondor-annex prices set REGION:TYPE=PRICE"
            )
        )
    got = sum(len(t) for t in found.values())
    missing = [f"{t} in {r}" for r in regions for t in types if t not in found.get(r, {})]
    print(f"wrote {got} on-demand price(s) to {path}")
    if missing:
        print("no price found for: " + ", ".join(missing), file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    try:
        path, _cfg = _path(args)
        data = _load(path)
    except AnnexError as err:
        return _fail(err)
    updated = data.get("updated")
    if isinstance(updated, int):
        age = durations.format_duration(int(time.time()) - updated)
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(updated))
        print(f"{path}: {data.get('source', '?')} prices of {when} ({age} old)")
    else:
        print(f"{path}: no prices yet (htcondor-annex prices update)")
    currency = data.get("currency", "USD")
    for section in ("on_demand", "spot"):
        for region, table in sorted((data.get(section) or {}).items()):
            for itype, price in sorted(table.items()):
                print(
                    f"  {section:9}  {region:15}  {itype:15}  {budgets.money(price)} {currency}/h"
                )
    return 0


def _list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").replace(" ", ",").split(",") if t.strip()]
