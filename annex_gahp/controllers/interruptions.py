"""Interruptions: spot instances that got EC2's interruption notice (issue 14, item 1).

The instance agent sees the notice in IMDS, stops its startd taking jobs, vacates the running
ones and puts `AnnexInterruption` (the notice time) into the startd ad; this loop reads it in
its one collector query per cycle. For each such instance of an annex: once, count it
(`Interruptions`), mark its capacity pool unavailable (offerings.py) and owe the annex a
replacement, which the same cycle's provisioning launches elsewhere (counted in `Replacements`
when it launches); every cycle, leave it out of the annex's capacity, and end it once none of
its slots is claimed any more (its jobs are back in their schedd: ending it earlier would
leave them "running" in the schedd until their shadows give up) or DRAIN_LIMIT after the
helper first saw the notice (EC2 reclaims the instance two minutes after it).
"""

from __future__ import annotations

import dataclasses
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
# Seconds after the helper first saw a notice when the instance is ended even if a slot still
# says Claimed (EC2 ends it at 120 s).
DRAIN_LIMIT = 90
# Slot states whose job has not left yet.
_BUSY = frozenset({"Claimed", "Preempting"})


@dataclasses.dataclass(frozen=True)
class Notice:
    when: int  # AnnexInterruption as the instance said it (shown, never trusted for timing)
    busy: bool  # some slot of it still Claimed or Preempting


def notices(ads: list[dict[str, object]]) -> dict[tuple[str, str], dict[str, Notice]]:
    """(owner, annex) -> {instance id: Notice} from the annex startds' ads. An ad is the
    instance's own word about itself: only the instance id is trusted, and only as a key into
    what EC2 says this annex has (`handle` ignores ids it does not see live); the collector
    admits the owner and annex only from that annex's own token (ANNEX_COLLECTOR_REQUIREMENTS),
    so an instance can at worst end a sibling of its own annex."""
    when_of: dict[tuple[tuple[str, str], str], int] = {}
    busy: set[str] = set()
    for ad in ads:
        instance, when = ad.get("AnnexInstanceId"), ad.get("AnnexInterruption")
        if not isinstance(instance, str) or not instance.startswith("i-"):
            continue
        if ad.get("State") in _BUSY:
            busy.add(instance)
        if not isinstance(when, int) or isinstance(when, bool):
            continue
        key = (str(ad.get("AnnexOwner", "")), str(ad.get("AnnexName", "")))
        when_of[(key, instance)] = when
    found: dict[tuple[str, str], dict[str, Notice]] = {}
    for (key, instance), when in when_of.items():
        found.setdefault(key, {})[instance] = Notice(when, instance in busy)
    return found


class Interruptions:
    def __init__(self, ctx: Context, actions: Actions) -> None:
        self.ctx = ctx
        self.actions = actions

    def handle(
        self, annex: Annex, live: list[Observed], noticed: dict[str, Notice], now: int
    ) -> tuple[Annex, list[Observed], list[str]]:
        """The annex's live instances without those that got a notice (returned third, as
        draining: not capacity, not to be counted as launched-but-unseen either)."""
        # Only EC2's spot instances get notices: one claimed by an on-demand instance is a
        # lie (its startd stops itself; nothing else follows), and must not make the whole
        # pool avoid an on-demand pool.
        hit = [o for o in live if o.id in noticed and o.lifecycle == offerings.SPOT]
        if not hit:
            return annex, live, []
        store, settings = self.ctx.store, self.ctx.settings
        new, ending = [], []
        for o in hit:
            first_seen = store.note_interrupted(annex.id, o.id, now)
            if first_seen is None:
                new.append(o)
                first_seen = now
            if not noticed[o.id].busy or now - first_seen >= DRAIN_LIMIT:
                ending.append(o.id)
        if new:
            pools = [
                offerings.Offering(o.region, o.instance_type, o.zone, o.lifecycle) for o in new
            ]
            offerings.mark(store, pools, "interruption", settings.unavailable_offering_ttl, now)
            store.bump(annex.id, INTERRUPTIONS, len(new))
            store.bump(annex.id, REPLACE_DUE, len(new))
            log.info(
                "annex %s: interruption notice on %s (%s): replacement asked for",
                annex.key,
                " ".join(o.id for o in new),
                ", ".join(p.label() for p in pools),
            )
        if ending:
            self.actions.terminate(annex.region, ending)
            self.actions.record_terminating(annex, ending, now)
            log.info("annex %s: interrupted, jobs gone: ended %s", annex.key, " ".join(ending))
        draining = [o.id for o in hit if o.id not in ending]
        return annex, [o for o in live if o not in hit], draining

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
