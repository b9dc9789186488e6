"""One `Annex` ad per annex in the collector, so operators see annexes with condor_status."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from annex_gahp import compat, names

log = logging.getLogger(__name__)

_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{1,32}$")


_quote = compat.quote


def ad_name(owner: str, annex: str, schedd: str) -> str:
    # Owner first: alice's burst and bob's burst are different annexes.
    return f"{owner}/{annex}@{schedd}"


def schedd_name() -> str:
    # The schedd's own default Name is FULL_HOSTNAME; getfqdn() may say "localhost".
    return compat.param("SCHEDD_NAME") or compat.param("FULL_HOSTNAME") or socket.getfqdn()


class Publisher:
    """Advertises with UPDATE_AD_GENERIC; the helper must run as the condor user for this."""

    def __init__(self, schedd: str | None = None) -> None:
        self.schedd = schedd or schedd_name()

    def make_ad(self, view: Mapping[str, Any]) -> Any:
        import classad2  # noqa: PLC0415

        ad = classad2.ClassAd()
        ad["MyType"] = names.ANNEX_MYTYPE
        ad["Name"] = ad_name(view["Owner"], view["AnnexName"], self.schedd)
        ad["ScheddName"] = self.schedd
        for key, value in view.items():
            if value is None:
                continue
            ad[key] = value
        return ad

    def publish(self, views: Iterable[Mapping[str, Any]]) -> None:
        ads = [self.make_ad(v) for v in views]
        if not ads:
            return
        import htcondor2  # noqa: PLC0415

        htcondor2.Collector().advertise(ads, "UPDATE_AD_GENERIC")
        log.debug("published %d Annex ad(s)", len(ads))

    def invalidate(self, owner: str, annex: str) -> None:
        import classad2  # noqa: PLC0415
        import htcondor2  # noqa: PLC0415

        name = ad_name(owner, annex, self.schedd)
        ad = classad2.ClassAd()
        ad["MyType"] = "Query"
        ad["TargetType"] = names.ANNEX_MYTYPE
        ad["Name"] = name
        # =?=: ClassAd == ignores case, and alice's "Burst" and "burst" are two annexes.
        ad["Requirements"] = classad2.ExprTree(f"Name =?= {_quote(name)}")
        htcondor2.Collector().advertise([ad], "INVALIDATE_ADS_GENERIC")
        log.info("invalidated the Annex ad %s", name)


class BudgetPublisher:
    """One `AnnexBudget` ad per user (and one for the pool, Owner ""): spend and budget, for
    the admin (`condor_status -any -constraint 'MyType == "AnnexBudget"'`); issue 16."""

    MYTYPE = "AnnexBudget"

    def __init__(self, schedd: str | None = None) -> None:
        self.schedd = schedd or schedd_name()

    def publish(self, views: Iterable[Mapping[str, Any]]) -> None:
        import classad2  # noqa: PLC0415
        import htcondor2  # noqa: PLC0415

        ads = []
        for view in views:
            ad = classad2.ClassAd()
            ad["MyType"] = self.MYTYPE
            ad["Name"] = f"{view['Owner'] or '(pool)'}@{self.schedd}"
            ad["ScheddName"] = self.schedd
            for key, value in view.items():
                if value is not None:
                    ad[key] = value
            ads.append(ad)
        if ads:
            htcondor2.Collector().advertise(ads, "UPDATE_AD_GENERIC")

    def invalidate(self, owner: str, annex: str) -> None:  # Publisher's; budgets stay
        return None


class AnnexSlots:
    """The startds of this pool's annexes, for the idle-instance check: one query per cycle."""

    PROJECTION = (
        "AnnexOwner",
        "AnnexName",
        "AnnexInstanceId",
        "State",
        "Activity",
        "EnteredCurrentState",
        "AnnexInterruption",  # a spot interruption notice's time (controllers/interruptions.py)
    )

    def slots(self, pool_id: str) -> list[dict[str, Any]]:
        import htcondor2  # noqa: PLC0415

        pool = _quote(pool_id)
        ads = htcondor2.Collector().query(
            htcondor2.AdType.Startd,
            constraint=f"IsAnnex =?= true && AnnexPool =?= {pool}",
            projection=list(self.PROJECTION),
        )
        return [{key: ad.get(key) for key in self.PROJECTION} for ad in ads]

    def invalidate(self, instance_ids: list[str]) -> None:
        """Remove the startd and master ads of terminated instances from the collector."""
        import classad2  # noqa: PLC0415
        import htcondor2  # noqa: PLC0415

        wanted = ", ".join(f'"{i}"' for i in instance_ids if _INSTANCE_ID.match(i))
        if not wanted:
            return
        for command, target, attr in (
            ("INVALIDATE_STARTD_ADS", "Machine", "AnnexInstanceId"),
            ("INVALIDATE_MASTER_ADS", "DaemonMaster", "Machine"),
        ):
            ad = classad2.ClassAd()
            ad["MyType"] = "Query"
            ad["TargetType"] = target
            ad["Requirements"] = classad2.ExprTree(f"member({attr}, {{ {wanted} }})")
            htcondor2.Collector().advertise([ad], command)
        log.info("dropped the ads of %s from the collector", " ".join(instance_ids))
