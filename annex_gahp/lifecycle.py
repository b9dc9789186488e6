"""The annex lifecycle as one table.

    requested --launch--> provisioning --up--> running
        |                     |   ^               |  \\
        |                     |   +----grow-------+   \\
        +------retire---------+-------retire----------+--> retiring --gone--> retired
    requested/provisioning --launch_failed--> failed --retire--> retiring
    failed --launch--> provisioning;  failed --launch_failed--> failed

Events come from the reconcile loop (launch, up, grow, launch_failed, gone) and from users or
policy (retire: delete, idle timeout, lease end). Anything not in the table is a bug in the
caller, so it raises rather than guessing.

A launch attempt is preparing the annex (its token and launch template) and the launch call.
`launch_failed` is one that failed or got no capacity, whatever the state; the record then
counts it (`launch_failures`) and says when the next attempt may be made (`retry_at`, see
retry_delay: one reconcile interval doubled per failure in a row, at most BACKOFF_MAX), and
its LastError says so too. A launch that gets capacity clears both. So a failure that will
not go away by itself (a missing permission, a bad image) costs one attempt every few minutes,
not one per cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from annex_gahp.names import FAILED, PROVISIONING, REQUESTED, RETIRED, RETIRING, RUNNING

if TYPE_CHECKING:
    from annex_gahp.store import Annex

TRANSITIONS: dict[tuple[str, str], str] = {
    (REQUESTED, "launch"): PROVISIONING,
    (REQUESTED, "launch_failed"): FAILED,
    (REQUESTED, "retire"): RETIRING,
    (PROVISIONING, "launch"): PROVISIONING,
    (PROVISIONING, "up"): RUNNING,
    (PROVISIONING, "launch_failed"): FAILED,
    (PROVISIONING, "retire"): RETIRING,
    (RUNNING, "grow"): RUNNING,
    (RUNNING, "launch"): RUNNING,
    (RUNNING, "up"): RUNNING,
    (RUNNING, "launch_failed"): RUNNING,  # some capacity is up; the shortfall shows in LastError
    (RUNNING, "retire"): RETIRING,
    (FAILED, "launch"): PROVISIONING,  # the next attempt, once its retry_at has passed
    (FAILED, "launch_failed"): FAILED,  # and that one failed too: a longer wait
    (FAILED, "retire"): RETIRING,
    (RETIRING, "retire"): RETIRING,
    (RETIRING, "gone"): RETIRED,
}

# The longest wait between two launch attempts of an annex (seconds).
BACKOFF_MAX = 300

ACTIVE = frozenset({REQUESTED, PROVISIONING, RUNNING, FAILED})
LIVE = ACTIVE | {RETIRING}  # states in which cloud resources may exist


class TransitionError(RuntimeError):
    pass


def next_state(state: str, event: str) -> str:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(f"no transition from {state!r} on {event!r}") from None


def retry_delay(failures: int, interval: int) -> int:
    """Seconds from the `failures`-th failed launch attempt in a row to the next attempt: the
    reconcile interval doubled per failure, capped at BACKOFF_MAX (0: nothing failed)."""
    if failures <= 0:
        return 0
    return min(BACKOFF_MAX, max(1, interval) * 2 ** min(failures, 16))


# Retirements the reconcile loop decides from the view it took at the start of its cycle.
POLICY_RETIREMENTS = ("lease", "idle")


def retire_still_due(reason: str, decided_on: Annex, current: Annex, now: int) -> bool:
    """Whether a retirement decided on `decided_on` still holds for the record as it is now.

    A user's request (delete) always holds. A policy decision (lease end, idle timeout) was
    made from an older view: it holds only if the record still says what it was decided on.
    So an extend acknowledged to the user between the loop's snapshot and its write wins:
    a new lease end, a new instance count, or a job that reset the idle clock.
    """
    if reason not in POLICY_RETIREMENTS or current.state == RETIRING:
        return True
    if reason == "lease":
        return now >= current.lease_expiration
    return (
        current.idle_since is not None
        and current.idle_since == decided_on.idle_since
        and current.lease_expiration == decided_on.lease_expiration
        and current.requested == decided_on.requested
    )
