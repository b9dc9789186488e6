"""Interruptions: spot instances that got EC2's interruption notice (issue 14, item 1).

The instance agent sees the notice in IMDS, stops its startd taking jobs, vacates the running
ones and puts `AnnexInterruption` (the notice time) into the startd ad; this loop reads it in
its one collector query per cycle. For each such instance of an annex, once: count it
(`Interruptions`), mark its capacity pool unavailable (offerings.py), end it (the jobs have
left it; EC2 would end it within two minutes anyway) and owe the annex a replacement, which
the same cycle's provisioning launches elsewhere (counted in `Replacements` when it launches).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from annex_gahp import offerings
from annex_gahp.controllers import Context
from annex_gahp.controllers.actions import Actions
from annex_gahp.store import Annex

if TYPE_CHECKING:
    from annex_gahp.cloud import Observed

log = logging.getLogger(__name__)

# The annex's counters (store.bump): public ones are published as they are named.
INTERRUPTIONS = "Interruptions"
REPLACEMENTS = "Replacements"
REPLACE_DUE = "ReplacementsDue"  # interrupted instances not replaced yet (internal)


def notices(ads: list[dict[str, object]]) -> dict[tuple[str, str], dict[str, int]]:
    """(owner, annex) -> {instance id: notice time} from the annex startds' ads. An ad is the
    instance's own word about itself: only the instance id is trusted, and only as a key into
    what EC2 says this annex has (`handle` ignores ids it does not see live); the collector
    admits the owner and annex only from that annex's own token (ANNEX_COLLECTOR_REQUIREMENTS),
    so an instance can at worst end a sibling of its own annex."""
    found: dict[tuple[str, str], dict[str, int]] = {}
    for ad in ads:
        instance, when = ad.get("AnnexInstanceId"), ad.get("AnnexInterruption")
        if not isinstance(instance, str) or not instance.startswith("i-"):
            continue
        if not isinstance(when, int) or isinstance(when, bool):
            continue
        key = (str(ad.get("AnnexOwner", "")), str(ad.get("AnnexName", "")))
        found.setdefault(key, {})[instance] = when
    return found


class Interruptions:
    def __init__(self, ctx: Context, actions: Actions) -> None:
        self.ctx = ctx
        self.actions = actions

    def handle(
        self, annex: Annex, live: list[Observed], noticed: dict[str, int], now: int
    ) -> tuple[Annex, list[Observed]]:
        """End the annex's live instances that got a notice; returns the rest of `live`."""
        hit = [o for o in live if o.id in noticed]
        if not hit:
            return annex, live
        store, settings = self.ctx.store, self.ctx.settings
        ids = [o.id for o in hit]
        pools = [
            offerings.Offering(o.region, o.instance_type, o.zone, o.lifecycle or "spot")
            for o in hit
        ]
        offerings.mark(store, pools, "interruption", settings.unavailable_offering_ttl, now)
        self.actions.terminate(annex.region, ids)
        self.actions.record_terminating(annex, ids, now)
        store.bump(annex.id, INTERRUPTIONS, len(ids))
        store.bump(annex.id, REPLACE_DUE, len(ids))
        log.info(
            "annex %s: interruption notice on %s (%s): ended, replacement asked for",
            annex.key,
            " ".join(ids),
            ", ".join(p.label() for p in pools),
        )
        return annex, [o for o in live if o.id not in ids]

    def launched(self, annex: Annex, count: int) -> None:
        """`count` instances were just launched for the annex: those owed count as
        replacements."""
        if count <= 0:
            return
        due = self.ctx.store.counters(annex.id).get(REPLACE_DUE, 0)
        paid = min(due, count)
        if paid:
            self.ctx.store.bump(annex.id, REPLACEMENTS, paid)
            self.ctx.store.bump(annex.id, REPLACE_DUE, -paid)
            log.info("annex %s: %d replacement(s) launched", annex.key, paid)
