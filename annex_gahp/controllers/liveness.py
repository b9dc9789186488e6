"""Liveness: a pool-mode instance that runs (and bills) but whose startd is not in the pool.

An instance whose startd has not appeared in the collector within ANNEX_JOIN_TIMEOUT of its
launch, or whose startd has been gone that long while EC2 still runs it, is terminated and
counted as a failed launch (lifecycle.join_failed: the back-off applies, and provisioning
launches its replacement once it has passed). The annex's LastError (and so its jobs'
AnnexLastError) names the instance and, where the cloud keeps one, the tail of its console.
After ANNEX_MAX_JOIN_FAILURES in a row the annex gives up (lifecycle.gave_up).

Presence comes from the cycle's one collector query (reconcile.py); when that query got no
answer nothing is decided. Provision-mode instances run the user's own pilot and have no startd
here: they are never looked at.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from annex_gahp import durations, lifecycle
from annex_gahp.controllers import Context, one_line
from annex_gahp.controllers.actions import Actions
from annex_gahp.store import Annex

if TYPE_CHECKING:
    from annex_gahp.cloud import Observed

log = logging.getLogger(__name__)

# How much of an instance's console goes into LastError (the end of it: where boot fails).
CONSOLE_TAIL = 400

# instance id -> (owner, annex name) its startd ad claims.
Presence = dict[str, tuple[str, str]]


def present(ads: Iterable[dict[str, Any]] | None) -> Presence | None:
    """The instances whose startds are in the collector, from the cycle's slot ads (None: the
    collector did not answer, so nobody is known to be missing)."""
    if ads is None:
        return None
    found: Presence = {}
    for ad in ads:
        instance = ad.get("AnnexInstanceId")
        if isinstance(instance, str) and instance.startswith("i-"):
            found[instance] = (str(ad.get("AnnexOwner", "")), str(ad.get("AnnexName", "")))
    return found


def printable_tail(text: str, limit: int = CONSOLE_TAIL) -> str:
    """The end of hostile text as one line of printable ASCII, at most `limit` characters:
    escape sequences, control characters and non-ASCII become spaces, runs of space one. What
    is left is still the instance's word: it is quoted (compat.quote) wherever it goes."""
    cleaned = "".join(ch if " " <= ch <= "~" else " " for ch in text[-8 * limit :])
    words = " ".join(cleaned.split())
    return words if len(words) <= limit else "..." + words[-(limit - 3) :]


class Liveness:
    def __init__(self, ctx: Context, actions: Actions) -> None:
        self.ctx = ctx
        self.actions = actions
        # instance id -> when its startd was last in the collector. Not stored: after a
        # restart a joined instance's clock starts again from the start (a collector that
        # restarted with the helper has not heard from the startds yet).
        self._seen: dict[str, int] = {}
        self._started = ctx.now()

    def check(
        self, annex: Annex, live: list[Observed], presence: Presence | None, now: int
    ) -> tuple[Annex, list[Observed]]:
        """Terminate the annex's instances that did not join (or left) for the join timeout;
        the rest of `live` back."""
        settings = self.ctx.settings
        if presence is None or annex.spec.mode != "pool" or settings.join_timeout <= 0:
            return annex, live
        store = self.ctx.store
        records = {r.id: r for r in store.instances(annex.id)}
        for gone in set(self._seen) & (set(records) - {o.id for o in live}):
            del self._seen[gone]
        here = [o.id for o in live if presence.get(o.id) == (annex.owner, annex.name)]
        for instance in here:
            self._seen[instance] = now
        first = [i for i in here if i in records and records[i].joined is None]
        if first:
            store.mark_joined(annex.id, first, now)
            log.info("annex %s: joined the pool: %s", annex.key, " ".join(first))
            if annex.join_failures:
                # The run ends, and its message with it (it named an instance long gone).
                annex = store.update_annex(annex.id, last_error="", **lifecycle.JOINED)
        late: list[tuple[str, bool]] = []  # (instance, whether it had joined before)
        for o in live:
            record = records.get(o.id)
            if o.id in here or record is None:
                continue  # a record is written the cycle it is first seen
            if record.joined is None:
                since = record.launched
            else:
                since = max(record.joined, self._seen.get(o.id, self._started))
            if now - since >= settings.join_timeout:
                late.append((o.id, record.joined is not None))
        if not late:
            return annex, live
        ids = [i for i, _ in late]
        # Read before terminating: EC2 keeps a running instance's console for sure.
        tail = self._console(annex.region, ids[0])
        self.actions.terminate(annex.region, ids)
        self.actions.record_terminating(annex, ids, now)
        for instance in ids:
            self._seen.pop(instance, None)
        annex = self._failed(annex, late, tail, now)
        return annex, [o for o in live if o.id not in ids]

    def _failed(self, annex: Annex, late: list[tuple[str, bool]], tail: str, now: int) -> Annex:
        settings = self.ctx.settings
        event, fields = lifecycle.join_failed(
            annex,
            len(late),
            now,
            settings.reconcile_interval,
            settings.max_join_failures,
        )
        timeout = durations.format_duration(settings.join_timeout)
        instance, joined = late[0]
        what = (
            f"instance {instance} left the pool (its startd was gone for {timeout} while EC2 "
            "still ran it)"
            if joined
            else f"instance {instance} did not join the pool within {timeout} of its launch"
        )
        if len(late) > 1:
            more = " ".join(i for i, _ in late[1:6]) + (" ..." if len(late) > 6 else "")
            what += f" (and {len(late) - 1} more: {more})"
        what += "; terminated"
        if tail:
            what += f"; its console ends: {tail}"
        count = f"{fields['join_failures']} in a row"
        if event == lifecycle.Event.GIVE_UP:
            error = (
                f"stopped launching: {count} did not join or left (ANNEX_MAX_JOIN_FAILURES = "
                f"{settings.max_join_failures}); last: {what}. Check the image "
                "(docs/troubleshooting.md, Instances run but never join), then htcondor-annex "
                f"delete --name {annex.name} and submit again"
            )
        else:
            when = time.strftime("%H:%M:%S UTC", time.gmtime(fields["retry_at"]))
            error = f"{what} ({count}; a replacement is launched at {when})"
        log.warning("annex %s: %s", annex.key, error)
        return lifecycle.record(self.ctx.store, annex, event, last_error=error, **fields)

    def _console(self, region: str, instance: str) -> str:
        try:
            return printable_tail(self.ctx.cloud.console(region, instance))
        except Exception as err:  # the reason without the tail is still the reason
            log.warning("could not read the console of %s: %s", instance, one_line(err))
            return ""
