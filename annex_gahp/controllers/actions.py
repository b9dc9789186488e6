"""What the controllers do to the world, each in the one way that is safe to repeat or to be
killed in the middle of: a launch writes its intent (with the request id its instances are
tagged with) before the call; a termination drops the instances' startd ads too; a retirement
goes through the lifecycle and wakes the loop."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from annex_gahp import faults, lifecycle, offerings
from annex_gahp.controllers import Context
from annex_gahp.errors import AnnexError
from annex_gahp.lifecycle import Event, InstanceEvent, RetireReason
from annex_gahp.store import Annex

if TYPE_CHECKING:
    from annex_gahp.cloud import LaunchOutcome

log = logging.getLogger(__name__)


class Actions:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._rescheduled_at = 0.0
        # Told how many instances each launch made (interruptions counts replacements).
        self.launched: Callable[[Annex, int], None] = lambda annex, count: None

    def terminate(self, region: str, ids: list[str]) -> None:
        """Terminate, then drop the instances' startd ads from the collector: a startd that
        dies with its instance leaves ads behind for CLASSAD_LIFETIME, and the negotiator would
        keep matching jobs of the same annex name to slots that are gone."""
        self.ctx.cloud.remove(region, ids)
        if self.ctx.slots is not None and ids:
            try:
                self.ctx.slots.invalidate(ids)
            except Exception as err:
                log.warning("could not drop the slots of %s from the collector: %s", ids, err)

    def record_terminating(self, annex: Annex, ids: list[str], now: int) -> None:
        """Recorded at once: still within the launch grace, they would count as live and
        the next cycle would shrink again."""
        state = lifecycle.instance_next(lifecycle.I_RUNNING, InstanceEvent.TERMINATE)
        self.ctx.store.record_instances(annex.id, "", [(i, state, "") for i in ids], now)

    def retire(self, annex: Annex, reason: RetireReason, now: int) -> Annex:
        annex, retired = lifecycle.retire(self.ctx.store, annex, reason, now=now)
        if retired:
            self.ctx.wake()
        return annex

    def start_local_jobs(self) -> None:
        """Provision-mode jobs are local universe jobs that wait until the route has handed
        them to us (their Requirements); the schedd starts such a job at its next queue scan
        (SCHEDD_INTERVAL, 300 s by default) unless asked to look now: ask, once per cycle."""
        now = self.ctx.clock()
        if now - self._rescheduled_at < 1.0:
            return
        self._rescheduled_at = now
        try:
            self.ctx.demand.reschedule()
        except Exception as err:
            log.warning("could not ask the schedd to start provision-mode jobs: %s", err)

    # --- launching -------------------------------------------------------------------------

    def launch(self, annex: Annex, have: int, now: int) -> Annex:
        """Ask the cloud for the annex's capacity (`have` of its `requested` are seen), with
        the intent written first."""
        store, cloud = self.ctx.store, self.ctx.cloud
        count = annex.requested - have
        types = annex.spec.instance_types or self.ctx.settings.default_instance_types
        avoid = offerings.avoided(store, annex, types, now)
        if offerings.every_type_blocked(annex, types, avoid):
            # No call could launch anything: none is made, and no failure counted; the first
            # mark to expire lets the next cycle try again.
            message = offerings.all_unavailable_message(annex, avoid)
            if message != annex.last_error:
                log.warning("annex %s: %s", annex.key, message)
                annex = store.update_annex(annex.id, last_error=message)
            return annex
        try:
            prepared = cloud.prepare(annex)
        except AnnexError as err:
            # The token, the launch template or (provision mode) the user's data could not be
            # made: this attempt failed like a launch call would, and is retried after the
            # back-off - not every cycle, minting and storing a token each time.
            return self.launch_failed(annex, str(err), now)
        except Exception as err:
            # A bug, or an SDK that breaks: nothing was launched yet (no intent written), so
            # the same holds, and the other annexes' cycle goes on.
            log.exception("annex %s: preparing the launch failed", annex.key)
            what = f"internal error ({type(err).__name__}: {err}); see ANNEX_GAHP_LOG"
            return self.launch_failed(annex, what, now)
        if prepared != annex.cloud_resources:
            # Recorded before anything that creates instances: a crash after this point
            # leaves a record that names what to clean up.
            annex = store.update_annex(annex.id, cloud_resources=prepared)
        faults.checkpoint("create.prepared")
        op = store.begin_op(annex.id, "launch", {"count": count, "region": annex.region})
        faults.checkpoint("create.intent")
        try:
            outcome: LaunchOutcome = cloud.ensure(
                annex, annex.requested, have, op.request, avoid
            )
        except AnnexError as err:
            store.finish_op(op.id, error=str(err))
            return self.launch_failed(annex, str(err), now)
        except Exception as err:
            # Not an AWS answer (a bug, an SDK that breaks): the attempt counts as failed and
            # waits out the back-off like one. Anything it did launch carries the request tag
            # and the annex's tags, so the next cycle's observation records it.
            log.exception("annex %s: the launch call failed", annex.key)
            what = f"internal error ({type(err).__name__}: {err}); see ANNEX_GAHP_LOG"
            store.finish_op(op.id, error=what)
            return self.launch_failed(annex, what, now)
        faults.checkpoint("create.launched")
        store.finish_op(
            op.id,
            result={"instances": outcome.instance_ids, "errors": outcome.errors},
        )
        pending = lifecycle.instance_next(lifecycle.I_NEW, InstanceEvent.LAUNCHED)
        store.record_instances(
            annex.id, op.request, [(i, pending, "") for i in outcome.instance_ids], now
        )
        faults.checkpoint("create.finished")
        self._mark_unavailable(outcome, now)
        self.launched(annex, len(outcome.instance_ids))
        log.info(
            "annex %s: launched %d of %d (request %s)%s",
            annex.key,
            len(outcome.instance_ids),
            count,
            op.request,
            f"; {'; '.join(outcome.errors)}" if outcome.errors else "",
        )
        if outcome.failed:
            return self.launch_failed(annex, "; ".join(outcome.errors), now)
        error = "; ".join(outcome.errors)
        if not error and annex.join_failures:
            error = annex.last_error  # why this is a replacement stays until one joins (liveness)
        return lifecycle.record(store, annex, Event.LAUNCH, last_error=error, **lifecycle.LAUNCHED)

    def _mark_unavailable(self, outcome: LaunchOutcome, now: int) -> None:
        """The capacity pools the cloud said are out of capacity: skipped by every launch
        for ANNEX_UNAVAILABLE_OFFERING_TTL."""
        by_code: dict[str, list[offerings.Offering]] = {}
        for offering, code in outcome.unavailable:
            by_code.setdefault(code, []).append(offering)
        ttl = self.ctx.settings.unavailable_offering_ttl
        for code, pools in by_code.items():
            offerings.mark(self.ctx.store, pools, code, ttl, now)
            log.info(
                "unavailable for %d s (%s): %s", ttl, code, ", ".join(p.label() for p in pools)
            )

    def launch_failed(self, annex: Annex, error: str, now: int) -> Annex:
        """Count the failed attempt and set when the next may be made; LastError says both,
        unless nothing will be tried again (a provision-mode annex that got no instance ends:
        provisioning's ends)."""
        fields = lifecycle.launch_failed(annex, now, self.ctx.settings.reconcile_interval)
        failures, retry_at = fields["launch_failures"], fields["retry_at"]
        ends = annex.spec.mode == "provision" and not self.ctx.store.instances(annex.id)
        if not ends:
            when = time.strftime("%H:%M:%S UTC", time.gmtime(retry_at))
            error = f"{error} (attempt {failures} failed; next attempt at {when})"
        log.warning("annex %s: launch failed: %s", annex.key, error)
        return lifecycle.record(
            self.ctx.store, annex, Event.LAUNCH_FAILED, last_error=error, **fields
        )
