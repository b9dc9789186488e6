"""The annex lifecycle as one table.

    requested --launch--> provisioning --up--> running
        |                     |   ^               |  \\
        |                     |   +----grow-------+   \\
        +------retire---------+-------retire----------+--> retiring --gone--> retired
    requested/provisioning --launch_failed--> failed --retire--> retiring

Events come from the reconcile loop (launch, up, grow, launch_failed, gone) and from users or
policy (retire: delete, idle timeout, lease end). Anything not in the table is a bug in the
caller, so it raises rather than guessing.
"""

from __future__ import annotations

from annex_gahp.names import FAILED, PROVISIONING, REQUESTED, RETIRED, RETIRING, RUNNING

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
    (FAILED, "launch"): PROVISIONING,  # a later demand or extend tries again
    (FAILED, "retire"): RETIRING,
    (RETIRING, "retire"): RETIRING,
    (RETIRING, "gone"): RETIRED,
}

ACTIVE = frozenset({REQUESTED, PROVISIONING, RUNNING, FAILED})
LIVE = ACTIVE | {RETIRING}  # states in which cloud resources may exist


class TransitionError(RuntimeError):
    pass


def next_state(state: str, event: str) -> str:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(f"no transition from {state!r} on {event!r}") from None
