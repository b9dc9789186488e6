"""Every state change of an annex and of its instances, as tables.

An annex (its `AnnexState`, public in ads):

    new --request--> requested --launch--> provisioning --up--> running
    new --adopt----> running      (a lost state file: rebuilt from the instances' tags)
        requested/provisioning/running/failed --retire--> retiring --gone--> retired
        requested/provisioning --launch_failed--> failed --launch--> provisioning
        requested/provisioning/running/failed --give_up--> failed   (instances never join)

`new` is no record yet: a record is inserted only through `request` (a user's or a job's) or
`adopt` (the loop, from tags). Events come from the loop (launch, up, grow, launch_failed,
give_up, gone, adopt) and from users or policy (request, retire: delete, idle timeout, lease
end,...).
Anything not in the table is a bug in the caller, so it raises rather than guessing; the one
exception is a writer whose view is older than the record (`settle`).

Liveness: a pool-mode instance whose startd never joins (or leaves for good) is terminated and
counted as a failed launch (`join_failed`, with the back-off); `join_failures` counts them in a
row, an instance that joins ends the run, and at ANNEX_MAX_JOIN_FAILURES the annex gives up
(`give_up`: failed, `may_launch` says no until one joins or the knob is raised).

Launch back-off: `launch_failed` is one attempt that failed or got no capacity, whatever the
state. The record counts it (`launch_failures`) and says when the next attempt may be made
(`retry_at`, see retry_delay: one reconcile interval doubled per failure in a row, at most
BACKOFF_MAX), and its LastError says so too; `launch` clears both. Until `retry_at` the annex
is backing off (`may_launch` says no): that is the only reading of the two fields. So a failure
that will not go away by itself (a missing permission, a bad image) costs one attempt every few
minutes, not one per cycle.

An instance (EC2's own states, as describe reports them and as the helper records them):
INSTANCE_TRANSITIONS. The loop polls, so it may see any later state of the EC2 lifecycle
without the ones between; what the helper writes by itself goes through `instance_next`.
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING, Any

from annex_gahp import faults
from annex_gahp.names import FAILED, PROVISIONING, REQUESTED, RETIRED, RETIRING, RUNNING

if TYPE_CHECKING:
    from annex_gahp.store import Annex, Store

log = logging.getLogger(__name__)

# No record yet: the state before `request` and `adopt` (never stored, never published).
NEW = "new"


class Event(enum.Enum):
    REQUEST = "request"  # a user or a job asked for a new annex
    ADOPT = "adopt"  # the loop found instances with no record (lost state file)
    LAUNCH = "launch"  # a launch attempt got capacity (or its instances were adopted)
    LAUNCH_FAILED = "launch_failed"  # one attempt failed or got none: back off
    UP = "up"  # an instance runs
    GROW = "grow"  # more instances wanted
    RETIRE = "retire"  # delete, lease end, idle timeout, ended, failed
    GONE = "gone"  # nothing of it is left in the cloud
    GIVE_UP = "give_up"  # ANNEX_MAX_JOIN_FAILURES instances in a row never joined: no more launches


class RetireReason(enum.Enum):
    """Why an annex retires. The values are public: ads (RetireReason, AnnexRetireReason),
    hold reasons and annex_provision_job's exit codes use them."""

    DELETED = "deleted"  # htcondor-annex delete
    LEASE = "lease"  # its lease ended
    IDLE = "idle"  # no job for the idle timeout
    ENDED = "ended"  # provision mode: every instance ended by itself
    FAILED = "failed"  # provision mode: no instance could be launched
    BUDGET = "budget"  # its annex_max_cost, or its owner's or the pool's budget, was reached


E = Event
TRANSITIONS: dict[tuple[str, Event], str] = {
    (NEW, E.REQUEST): REQUESTED,
    (NEW, E.ADOPT): RUNNING,
    (REQUESTED, E.LAUNCH): PROVISIONING,
    (REQUESTED, E.LAUNCH_FAILED): FAILED,
    (REQUESTED, E.RETIRE): RETIRING,
    (REQUESTED, E.GIVE_UP): FAILED,
    (PROVISIONING, E.LAUNCH): PROVISIONING,
    (PROVISIONING, E.UP): RUNNING,
    (PROVISIONING, E.LAUNCH_FAILED): FAILED,
    (PROVISIONING, E.RETIRE): RETIRING,
    (PROVISIONING, E.GIVE_UP): FAILED,
    (RUNNING, E.GROW): RUNNING,
    (RUNNING, E.LAUNCH): RUNNING,
    (RUNNING, E.UP): RUNNING,
    (RUNNING, E.LAUNCH_FAILED): RUNNING,  # some capacity is up; the shortfall shows in LastError
    (RUNNING, E.RETIRE): RETIRING,
    (RUNNING, E.GIVE_UP): FAILED,  # what joined keeps running; nothing new is launched
    (FAILED, E.LAUNCH): PROVISIONING,  # the next attempt, once its retry_at has passed
    (FAILED, E.LAUNCH_FAILED): FAILED,  # and that one failed too: a longer wait
    (FAILED, E.RETIRE): RETIRING,
    (FAILED, E.GIVE_UP): FAILED,
    (RETIRING, E.RETIRE): RETIRING,
    (RETIRING, E.GONE): RETIRED,
}

# The one definition of each set of annex states. ACTIVE: the annex wants capacity (it may
# launch, grow, be extended, be retired by policy). LIVE: its cloud resources may exist (not
# retired yet): the per-user cap counts these, and one owner has at most one per name.
ACTIVE = frozenset({REQUESTED, PROVISIONING, RUNNING, FAILED})
LIVE = ACTIVE | {RETIRING}
# Once retiring, an annex never becomes active again: a writer holding a view from before the
# retirement (the loop mid-cycle while a delete lands) loses its state change (`settle`).
FINAL = frozenset({RETIRING, RETIRED})

# --- instances (EC2's states) --------------------------------------------------------------
I_NEW = "new"
PENDING = "pending"
I_RUNNING = "running"
SHUTTING_DOWN = "shutting-down"
TERMINATED = "terminated"
STOPPING = "stopping"
STOPPED = "stopped"

# EC2's instance lifecycle: where each state may go next (polling may skip some between).
INSTANCE_TRANSITIONS: dict[str, frozenset[str]] = {
    I_NEW: frozenset({PENDING}),
    PENDING: frozenset({I_RUNNING, SHUTTING_DOWN, TERMINATED}),
    I_RUNNING: frozenset({STOPPING, SHUTTING_DOWN, TERMINATED}),
    STOPPING: frozenset({STOPPED, SHUTTING_DOWN, TERMINATED}),
    STOPPED: frozenset({PENDING, SHUTTING_DOWN, TERMINATED}),
    SHUTTING_DOWN: frozenset({TERMINATED}),
    TERMINATED: frozenset(),
}


class InstanceEvent(enum.Enum):
    LAUNCHED = "launched"  # the launch call returned its id
    TERMINATE = "terminate"  # the helper asked EC2 to terminate it
    GONE = "gone"  # its annex retired and describe no longer shows it


INSTANCE_EVENTS: dict[tuple[str, InstanceEvent], str] = {
    (I_NEW, InstanceEvent.LAUNCHED): PENDING,
    **{
        (s, InstanceEvent.TERMINATE): SHUTTING_DOWN for s in (PENDING, I_RUNNING, STOPPING, STOPPED)
    },
    **{
        (s, InstanceEvent.GONE): TERMINATED
        for s in (PENDING, I_RUNNING, STOPPING, STOPPED, SHUTTING_DOWN)
    },
}

# Capacity: an instance counted as the annex's (it is, or will be, able to run a job).
INSTANCE_LIVE = frozenset({PENDING, I_RUNNING})


def instance_next(state: str, event: InstanceEvent) -> str:
    try:
        return INSTANCE_EVENTS[(state, event)]
    except KeyError:
        raise TransitionError(f"no instance transition from {state!r} on {event.value!r}") from None


# --- annexes -----------------------------------------------------------------------------

# The longest wait between two launch attempts of an annex (seconds).
BACKOFF_MAX = 300


class TransitionError(RuntimeError):
    pass


def next_state(state: str, event: Event | str) -> str:
    try:
        key = (state, Event(event))
        return TRANSITIONS[key]
    except (KeyError, ValueError):
        raise TransitionError(f"no transition from {state!r} on {_name(event)!r}") from None


def _name(event: Event | str) -> str:
    return event.value if isinstance(event, Event) else str(event)


def settle(current: str, event: Event) -> str | None:
    """The state a write decided on an older view may set on the record as it is now: the next
    state from `current`, or None when the record retired since (the change is dropped: an
    annex once retiring stays retiring). Any other missing transition raises."""
    if (current, event) not in TRANSITIONS and current in FINAL and event != Event.RETIRE:
        return None
    return next_state(current, event)


def retry_delay(failures: int, interval: int) -> int:
    """Seconds from the `failures`-th failed launch attempt in a row to the next attempt: the
    reconcile interval doubled per failure, capped at BACKOFF_MAX (0: nothing failed)."""
    if failures <= 0:
        return 0
    return min(BACKOFF_MAX, max(1, interval) * 2 ** min(failures, 16))


def launch_failed(annex: Annex, now: int, interval: int) -> dict[str, Any]:
    """The back-off's fields written with Event.LAUNCH_FAILED: one more failed attempt, and
    when the next may be made."""
    failures = annex.launch_failures + 1
    return {"launch_failures": failures, "retry_at": now + retry_delay(failures, interval)}


# The back-off's fields written with Event.LAUNCH: capacity came, the back-off ends.
LAUNCHED: dict[str, Any] = {"launch_failures": 0, "retry_at": None}


def may_launch(annex: Annex, now: int, max_join_failures: int = 0) -> bool:
    """Not while backing off after failed attempts (retry_at not reached), nor once the annex
    gave up on instances that never join (gave_up)."""
    if gave_up(annex, max_join_failures):
        return False
    return annex.retry_at is None or now >= annex.retry_at


# --- liveness: pool-mode instances that never join (controllers/liveness.py) ----------------


def gave_up(annex: Annex, max_join_failures: int) -> bool:
    """`max_join_failures` of its instances in a row never joined (0: never give up). Read
    from the knob each time: an admin who raises ANNEX_MAX_JOIN_FAILURES lets it launch again,
    and an instance of it that joins after all ends the run (join_failures back to 0)."""
    return max_join_failures > 0 and annex.join_failures >= max_join_failures


def join_failed(
    annex: Annex, failures: int, now: int, interval: int, max_join_failures: int
) -> tuple[Event, dict[str, Any]]:
    """`failures` more instances did not join: each counts as a failed launch (the back-off
    grows with the run, though a successful CreateFleet between them clears launch_failures),
    and at `max_join_failures` in a row the annex gives up (GIVE_UP: failed, no next attempt)."""
    joins = annex.join_failures + failures
    attempts = max(annex.launch_failures, annex.join_failures) + failures
    fields: dict[str, Any] = {"join_failures": joins, "launch_failures": attempts}
    if max_join_failures > 0 and joins >= max_join_failures:
        return Event.GIVE_UP, fields | {"retry_at": None}
    return Event.LAUNCH_FAILED, fields | {"retry_at": now + retry_delay(attempts, interval)}


# The field written when an instance of the annex joins: the run of failures ends.
JOINED: dict[str, Any] = {"join_failures": 0}


def backing_off(annex: Annex) -> bool:
    return annex.launch_failures > 0 and annex.retry_at is not None


# Retirements the reconcile loop decides from the view it took at the start of its cycle.
POLICY_RETIREMENTS = frozenset({RetireReason.LEASE, RetireReason.IDLE})


def retire_still_due(reason: RetireReason, decided_on: Annex, current: Annex, now: int) -> bool:
    """Whether a retirement decided on `decided_on` still holds for the record as it is now.

    A user's request (delete) always holds. A policy decision (lease end, idle timeout) was
    made from an older view: it holds only if the record still says what it was decided on.
    So an extend acknowledged to the user between the loop's snapshot and its write wins:
    a new lease end, a new instance count, or a job that reset the idle clock.
    """
    reason = RetireReason(reason)
    if reason not in POLICY_RETIREMENTS or current.state == RETIRING:
        return True
    if reason == RetireReason.LEASE:
        return now >= current.lease_expiration
    return (
        current.idle_since is not None
        and current.idle_since == decided_on.idle_since
        and current.lease_expiration == decided_on.lease_expiration
        and current.requested == decided_on.requested
    )


# --- writing: every state the store records is decided here ---------------------------------


def create(store: Store, event: Event, **fields: Any) -> Annex:
    """Insert a new annex record in the state `event` leads to from `new`."""
    return store.insert_annex(state=next_state(NEW, event), **fields)


def record(store: Store, annex: Annex, event: Event, **fields: Any) -> Annex:
    """Write `event`'s state with `fields`, decided on the record as it is at the write (read
    in the same transaction): a view older than a retirement keeps its other fields but not
    its state change (`settle`)."""
    with store.transaction():
        current = store.get(annex.id) or annex
        state = settle(current.state, event)
        if state is None:
            log.info("annex %s: %s dropped, it is %s now", annex.key, event.value, current.state)
        elif state != current.state:
            fields["state"] = state
        return store.update_annex(annex.id, **fields) if fields else current


def retire(store: Store, annex: Annex, reason: RetireReason, *, now: int) -> tuple[Annex, bool]:
    """Retire the annex: (the record, whether this call retired it). `annex` is the view the
    decision was made on: a policy decision (lease, idle) is checked again against the record
    inside the write, and does not hold if the record changed since (retire_still_due: an
    acknowledged extend wins)."""
    reason = RetireReason(reason)
    with store.transaction():
        current = store.get(annex.id) or annex
        if current.state == RETIRED:
            return current, False
        if not retire_still_due(reason, annex, current, now):
            log.info(
                "annex %s: %s retirement dropped, the record changed since it was decided",
                annex.key,
                reason.value,
            )
            return current, False
        state = next_state(current.state, Event.RETIRE)
        if current.state == state and current.retire_reason:
            return current, False
        annex = store.update_annex(annex.id, state=state, retire_reason=reason.value)
    log.info("annex %s retiring: %s", annex.key, reason.value)
    faults.checkpoint("retire.recorded")
    return annex, True
