"""Provisioning: bring an active annex's instances to what it asks for (launch, grow, shrink),
not before its launch back-off has passed, and end a provision-mode annex whose instances
have all ended or could not be launched."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from annex_gahp import lifecycle, names
from annex_gahp.controllers import Context, recent
from annex_gahp.controllers.actions import Actions
from annex_gahp.lifecycle import Event, RetireReason
from annex_gahp.store import Annex

if TYPE_CHECKING:
    from annex_gahp.cloud import Observed

log = logging.getLogger(__name__)


class Provisioning:
    def __init__(self, ctx: Context, actions: Actions) -> None:
        self.ctx = ctx
        self.actions = actions

    def converge(
        self, annex: Annex, live: list[Observed], now: int, draining: Iterable[str] = ()
    ) -> Annex:
        """`draining`: live instances not counted (interrupted, their jobs leaving)."""
        store = self.ctx.store
        have = len(live) + len(recent(store, annex, live, now, draining))
        if annex.spec.mode == "provision":
            ended = self._provision_ended(annex, have)
            if ended is not None:
                return ended
            # The job stands for the instances it got: one that ended (its pilot finished) is
            # not replaced, as a grid-universe ec2 job's VM is not.
            have = max(have, len(store.instances(annex.id)))
        running = sum(1 for o in live if o.state == lifecycle.I_RUNNING)
        stop = self.ctx.settings.max_join_failures
        if have < annex.requested and lifecycle.may_launch(annex, now, stop):
            annex = self.actions.launch(annex, have, now)
        elif have > annex.requested:
            surplus = sorted(live, key=lambda o: (o.state == lifecycle.I_RUNNING, o.id))
            ids = [o.id for o in surplus[: have - annex.requested]]
            self.actions.terminate(annex.region, ids)
            self.actions.record_terminating(annex, ids, now)
            log.info("annex %s shrinks by %d: %s", annex.key, len(ids), " ".join(ids))
        if (
            live
            and annex.state in (names.REQUESTED, names.FAILED)
            and not lifecycle.gave_up(annex, stop)
        ):
            # Its instances exist but the launch's state change was never written: the helper
            # died between CreateFleet and recording it, and the restart adopted them.
            annex = lifecycle.record(store, annex, Event.LAUNCH)
        if running and annex.state == names.PROVISIONING:
            annex = lifecycle.record(store, annex, Event.UP)
        stale = [o.id for o in live if o.expires != annex.lease_expiration]
        if stale:
            self.ctx.cloud.extend(annex, stale)
        return annex

    def _provision_ended(self, annex: Annex, have: int) -> Annex | None:
        """Provision mode: the annex ends when every instance it got has ended (its pilots are
        done: `ended`), or when none could be launched (`failed`, with the error kept)."""
        if have:
            return None
        launched = len(self.ctx.store.instances(annex.id))
        if launched and launched >= annex.requested:
            log.info("annex %s: all %d instance(s) ended by themselves", annex.key, launched)
            return self.actions.retire(annex, RetireReason.ENDED, self.ctx.now())
        if not launched and annex.state == names.FAILED:
            return self.actions.retire(annex, RetireReason.FAILED, self.ctx.now())
        return None
