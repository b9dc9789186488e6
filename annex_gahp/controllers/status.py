"""Status: what an annex looks like from outside (its collector ad, the CLI's view, the waiting
jobs' attributes), and keeping the ads and the jobs up to date once per cycle."""

from __future__ import annotations

import logging
import time
from typing import Any

from annex_gahp import accounting, compat, lifecycle, names, offerings
from annex_gahp.controllers import Context
from annex_gahp.controllers.actions import Actions
from annex_gahp.store import Annex, Store

log = logging.getLogger(__name__)

# What the job ads show; a change in any of these is written into the waiting jobs.
_JOB_VISIBLE = (
    "AnnexState",
    "RequestedInstances",
    "RunningInstances",
    "LeaseExpiration",
    "LastError",
    "BindingLimit",
    "PendingInstances",
    "FailedInstances",
    "RetireReason",
)


def classad_literal(value: Any) -> str:
    """A Python value as ClassAd expression text, for the hooks to print verbatim."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    # The bindings' quoting. The router reads hook output in the old ClassAd form (only \"
    # is an escape): printable ASCII reads the same there, anything else (a backslash, a
    # control character, non-ASCII) arrives as its escape, visible but never breaking the line.
    return compat.quote(str(value))


def describe(store: Store, annex: Annex, now: int | None = None) -> dict[str, Any]:
    """The annex as the collector ad, the CLI and the job ads see it (`now`: the loop's clock,
    for which unavailable offerings are still avoided)."""
    live = [i for i in store.instances(annex.id) if i.state in lifecycle.INSTANCE_LIVE]
    running = sum(1 for i in live if i.state == lifecycle.I_RUNNING)
    return {
        "AnnexName": annex.name,
        "Owner": annex.owner,
        "AnnexState": annex.state,
        "RequestedInstances": annex.requested,
        "RunningInstances": running,
        "PendingInstances": max(0, len(live) - running),
        "LeaseExpiration": annex.lease_expiration,
        "Region": annex.region,
        "Strategy": annex.spec.strategy,
        "Mode": annex.spec.mode,
        "LastError": annex.last_error,
        "BindingLimit": annex.binding_limit,
        "RetireReason": annex.retire_reason,
        "IdleJobs": annex.demand_idle,
        "RunningJobs": annex.demand_running,
        "FailedInstances": failed_instances(store, annex),
        # Failed launch attempts in a row, and when the next one is due (epoch seconds;
        # absent from the ad when none is waiting): lifecycle.retry_delay.
        "LaunchFailures": annex.launch_failures,
        "NextLaunchAttempt": annex.retry_at if lifecycle.backing_off(annex) else None,
    } | liveness_view(annex) | capacity_health(store, annex, now) | cost_view(store, annex)


def liveness_view(annex: Annex) -> dict[str, Any]:
    """Capacity health (controllers/liveness.py): instances in a row that never joined."""
    return {"JoinFailures": annex.join_failures}


def capacity_health(store: Store, annex: Annex, now: int | None = None) -> dict[str, Any]:
    """Issue 14's spot numbers: interruption notices seen, replacements launched for them,
    and the capacity pools launches avoid now (`type/zone-or-region/lifecycle` strings; only
    while the annex may still launch; None when there are none)."""
    counts = store.counters(annex.id)
    avoided: list[str] = []
    if annex.state in lifecycle.ACTIVE:
        marks = store.unavailable(annex.region, int(time.time()) if now is None else now)
        types = set(annex.spec.instance_types)
        lifecycle_ = offerings.lifecycle_of(annex)
        avoided = offerings.labels(
            m
            for m in marks
            if m.offering.lifecycle == lifecycle_
            and (not types or m.offering.instance_type in types)
        )
    return {
        "Interruptions": counts.get("Interruptions", 0),
        "Replacements": counts.get("Replacements", 0),
        # Absent from the ad while nothing is avoided (a list per ad costs the collector
        # and the helper memory at 1,000 annexes).
        "AvoidedOfferings": avoided or None,
    }


def cost_view(store: Store, annex: Annex) -> dict[str, Any]:
    """CostPerHour, CostSoFar and Currency (issue 16). A figure that needs a price the helper
    does not have is left out of the ad and CostUnpriced says which: never a zero."""
    figures = accounting.annex_cost(store, annex)
    so_far, per_hour = figures.so_far, figures.per_hour
    missing = ", ".join(dict.fromkeys(so_far.unpriced + per_hour.unpriced))
    return {
        "CostPerHour": round(per_hour.amount, 9) if per_hour.known else None,
        "CostSoFar": round(so_far.amount, 9) if so_far.known else None,
        "Currency": so_far.currency if so_far.amount else per_hour.currency,
        "InstanceHours": round(so_far.hours, 4),
        "CostUnpriced": f"no price for {missing}" if missing else None,
    }


def failed_instances(store: Store, annex: Annex) -> int:
    """Instances asked for that EC2 did not launch: launch calls that failed, and the part
    of a launch that came back short with the cloud's reasons. A launch that came back with
    fewer ids and no error is no failure: an Auto Scaling group launches in its own time."""
    failed = 0
    for op in store.ops(annex.id):
        if op.kind != "launch" or op.finished is None:
            continue
        count = int(op.intent.get("count", 0) or 0)
        if op.error:
            failed += count
        elif op.result and op.result.get("errors") and not op.result.get("adopted"):
            failed += max(0, count - len(op.result.get("instances") or []))
    return failed


def instance_attrs(store: Store, annex: Annex) -> dict[str, str]:
    """Provision mode: the job stands for the annex, so its ad lists the instances."""
    records = store.instances(annex.id)
    view = describe(store, annex)
    return {
        "AnnexId": classad_literal(annex.id),
        "AnnexInstanceIds": classad_literal(",".join(i.id for i in records)),
        "AnnexInstanceStates": classad_literal(",".join(i.state for i in records)),
        "AnnexPendingInstances": classad_literal(view["PendingInstances"]),
        "AnnexFailedInstances": classad_literal(view["FailedInstances"]),
        "AnnexRetireReason": classad_literal(annex.retire_reason),
    }


def job_status_attrs(store: Store, annex: Annex | None, owner: str, name: str) -> dict[str, str]:
    """The attributes a waiting job carries about its annex (the live one, else the last)."""
    if annex is None:
        last = store.last_retired(owner, name)
        if last is None:
            return {"AnnexState": classad_literal("unknown")}
        annex = last
    view = describe(store, annex)
    extra = instance_attrs(store, annex) if view["Mode"] == "provision" else {}
    if view["CostSoFar"] is not None:
        extra[names.JOB_COST_ATTR] = f"{float(view['CostSoFar']):.6f}"  # a ClassAd real
    return extra | {
        "AnnexState": classad_literal(view["AnnexState"]),
        "AnnexRequestedInstances": classad_literal(view["RequestedInstances"]),
        "AnnexRunningInstances": classad_literal(view["RunningInstances"]),
        "AnnexLeaseExpiration": classad_literal(view["LeaseExpiration"]),
        "AnnexLastError": classad_literal(
            view["LastError"]
            or (
                f"limited to {view['RequestedInstances']} instance(s) by {view['BindingLimit']}"
                if view["BindingLimit"]
                else ""
            )
        ),
    }


class Status:
    def __init__(self, ctx: Context, actions: Actions) -> None:
        self.ctx = ctx
        self.actions = actions
        self._last_publish = 0.0
        # annex id -> the view last published (a change is published at once).
        self._published: dict[int, dict[str, Any]] = {}

    def publish(self, annexes: list[Annex]) -> None:
        """The cycle's annexes as ads, and their waiting jobs told what changed: every
        UPDATE_INTERVAL, and at once for an annex whose view changed."""
        now = self.ctx.clock()
        due = now - self._last_publish >= self.ctx.settings.update_interval
        views = []
        for annex in annexes:
            if annex.state == names.RETIRED:
                self._published.pop(annex.id, None)
                continue
            try:
                view = describe(self.ctx.store, annex, self.ctx.now())
                if due or self._published.get(annex.id) != view:
                    self._annotate_jobs(annex, view, due=due)
                    views.append(view)
                    self._published[annex.id] = view
            except Exception as err:  # one annex's ad or jobs; the others are published
                log.warning("could not publish annex %s: %s", annex.key, err)
        if not views:
            return
        try:
            self.ctx.publisher.publish(views)
        except Exception as err:
            log.warning("could not publish Annex ads: %s", err)
            self._published.clear()
            return
        if due:
            self._last_publish = now

    def forget(self, annex: Annex) -> None:
        """A retired annex's ad leaves the collector."""
        try:
            self.ctx.publisher.invalidate(annex.owner, annex.name)
        except Exception as err:
            log.warning("could not invalidate the ad of %s: %s", annex.key, err)
        self._published.pop(annex.id, None)

    def tell_waiting_provision_jobs(self, annex: Annex) -> None:
        """A provision job that has not started yet starts on a state other than
        requested/provisioning: tell it its annex retired, or it would wait for good."""
        if annex.spec.mode == "provision" and annex.demand_idle:
            self._annotate_jobs(annex, describe(self.ctx.store, annex))

    def _annotate_jobs(self, annex: Annex, view: dict[str, Any], *, due: bool = False) -> None:
        # Provision mode: the running job stands for the annex and shows its instances too.
        provision = view.get("Mode") == "provision"
        if not annex.demand_idle and not (provision and annex.demand_running):
            return  # nobody waits; the schedd refuses an edit that matches no job
        previous = self._published.get(annex.id)
        # The cost grows every cycle: the jobs learn it every UPDATE_INTERVAL, not each time.
        visible = (*_JOB_VISIBLE, "CostSoFar") if due else _JOB_VISIBLE
        if previous is not None and all(previous.get(k) == view.get(k) for k in visible):
            return
        try:
            self.ctx.demand.annotate(
                annex.owner,
                annex.name,
                job_status_attrs(self.ctx.store, annex, annex.owner, annex.name),
                **({"running": True} if provision else {}),
            )
            if provision and annex.demand_idle:
                self.actions.start_local_jobs()  # their Requirements may have just become true
        except Exception as err:
            log.warning("could not update the jobs of %s: %s", annex.key, err)
