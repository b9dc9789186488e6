"""Garbage collection: after a restart, settle the cloud calls that were in flight and adopt
what only the instances' tags remember; terminate instances no live record owns; and take a
retiring annex's resources away until nothing of it is left."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING

from annex_gahp import faults, lifecycle, pilotdata, spec
from annex_gahp.controllers import Context
from annex_gahp.controllers.actions import Actions
from annex_gahp.controllers.status import Status
from annex_gahp.lifecycle import Event, InstanceEvent
from annex_gahp.store import Annex, Op

if TYPE_CHECKING:
    from annex_gahp.cloud import Observed

log = logging.getLogger(__name__)


class GarbageCollector:
    def __init__(self, ctx: Context, actions: Actions, status: Status) -> None:
        self.ctx = ctx
        self.actions = actions
        self.status = status
        # instance id -> when it was first seen with no live record owning it.
        self._orphans_seen: dict[str, int] = {}

    # --- start-up ------------------------------------------------------------------------

    def settle(self, op: Op, observed: list[Observed]) -> None:
        """A cloud call left open by a helper that died: a launch adopts what carries its
        request tag; anything else is idempotent and is simply redone by the next cycle."""
        found = [o for o in observed if o.request == op.request]
        store = self.ctx.store
        if op.kind == "launch":
            store.record_instances(
                op.annex_id,
                op.request,
                [(o.id, o.state, o.instance_type) for o in found],
                self.ctx.now(),
            )
            log.warning(
                "launch %s was interrupted; adopted %d instance(s) tagged with it",
                op.request,
                len(found),
            )
            adopted = {"instances": [o.id for o in found], "adopted": True}
            store.finish_op(op.id, result=adopted)
        else:
            store.finish_op(op.id, error="interrupted; redone by the next cycle")

    def adopt_untracked(self, observed: list[Observed]) -> None:
        """A lost state file must not mean lost instances: rebuild annexes from their tags."""
        groups: dict[tuple[str, str], list[Observed]] = defaultdict(list)
        for o in observed:
            if o.state in lifecycle.INSTANCE_LIVE and all(o.key):
                groups[o.key].append(o)
        now = self.ctx.now()
        store = self.ctx.store
        for (owner, name), members in groups.items():
            if store.live(owner, name):
                continue
            expires = max(o.expires for o in members) or now + self.ctx.settings.default_lease
            annex = lifecycle.create(
                store,
                Event.ADOPT,
                owner=owner,
                name=name,
                spec=spec.AnnexSpec(name=name, owner=owner, instances=len(members)),
                region=members[0].region,
                requested=len(members),
                lease_expiration=expires,
                now=now,
                adopted=True,
            )
            self.record(annex.id, members, now)
            log.warning(
                "adopted annex %s from tags: %d instance(s), lease until %d",
                annex.key,
                len(members),
                expires,
            )

    def record(self, annex_id: int, seen: list[Observed], now: int) -> None:
        """Remember what the cloud reported for this annex, grouped by launch request."""
        for request in {o.request for o in seen}:
            self.ctx.store.record_instances(
                annex_id,
                request,
                [(o.id, o.state, o.instance_type) for o in seen if o.request == request],
                now,
                {o.id: (o.lifecycle, o.zone) for o in seen if o.request == request},
            )

    # --- retiring --------------------------------------------------------------------------

    def retire(self, annex: Annex, live: list[Observed], now: int) -> Annex:
        """One step of a retiring annex: terminate what is live; once nothing is, release the
        rest (token, template, stack) and record it retired."""
        if live:
            self.actions.terminate(annex.region, [o.id for o in live])
            log.info("annex %s: terminating %d instance(s)", annex.key, len(live))
            faults.checkpoint("retire.terminated")
            return annex
        self.ctx.cloud.release(annex)
        # Its instances are gone (none is live): their records say so, for the last report.
        store = self.ctx.store
        # One that vanished unseen is billed until it was last seen running (cost.py).
        for i in store.instances(annex.id):
            if i.state in lifecycle.INSTANCE_LIVE:
                gone = lifecycle.instance_next(i.state, InstanceEvent.GONE)
                store.record_instances(annex.id, "", [(i.id, gone, "")], min(now, i.last_seen))
        faults.checkpoint("retire.released")
        return self.retired(annex, now, tell_jobs=True)

    def retired(self, annex: Annex, now: int, *, tell_jobs: bool = False) -> Annex:
        """Nothing of the annex is left in the cloud: record it retired, drop its ad."""
        pilotdata.remove(self.ctx.settings.state_dir, annex.id)
        annex = lifecycle.record(self.ctx.store, annex, Event.GONE, retired_at=now)
        self.status.forget(annex)
        if tell_jobs:
            self.status.tell_waiting_provision_jobs(annex)
        log.info("annex %s retired (%s)", annex.key, annex.retire_reason)
        return annex

    # --- orphans ---------------------------------------------------------------------------

    def reap(self, observed: list[Observed]) -> None:
        """Terminate pool instances no live record owns, once they outlive the grace period."""
        now = self.ctx.now()
        orphans: dict[str, list[str]] = defaultdict(list)
        for o in observed:
            if o.state not in lifecycle.INSTANCE_LIVE:
                continue
            try:
                if self._is_orphan(o, now):
                    orphans[o.region].append(o.id)
            except Exception as err:
                log.warning("could not decide whether %s is an orphan: %s", o.id, err)
        for region, ids in orphans.items():
            try:
                self.actions.terminate(region, ids)
            except Exception as err:  # one region's failure leaves the others reaped
                log.warning("could not reap %s in %s: %s", " ".join(ids), region, err)
                continue
            for instance_id in ids:
                self._orphans_seen.pop(instance_id, None)

    def _is_orphan(self, o: Observed, now: int) -> bool:
        """A live instance of this pool no live record owns, past the grace period."""
        store = self.ctx.store
        owner_id = store.instance_owner(o.id)
        owner = store.get(owner_id) if owner_id is not None else None
        if owner is not None and owner.state in lifecycle.LIVE:
            self._orphans_seen.pop(o.id, None)
            return False
        live = store.live(*o.key)
        if live is not None:
            return False  # recorded on the next cycle of that annex
        first = self._orphans_seen.setdefault(o.id, now)
        retired = owner is not None  # its annex is gone: no reason to wait
        if retired or now - first >= self.ctx.settings.reaper_grace:
            log.warning("reaping %s (%s/%s): no live annex owns it", o.id, *o.key)
            return True
        return False
