"""The helper's command handlers: who may do what, and what gets recorded.

No cloud call happens here: handlers change records and wake the reconcile loop, so the hooks
get their answer in milliseconds and every cloud call goes through the one place that writes
its intent first (controllers/actions.py). What an annex looks like (its ad, the job
attributes) is controllers/status.py's; state changes are lifecycle.py's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from annex_gahp import (
    accounting,
    compat,
    cost,
    durations,
    faults,
    lifecycle,
    names,
    pilotdata,
    spec,
)
from annex_gahp import settings as settings_mod
from annex_gahp.controllers import status as annex_status
from annex_gahp.errors import (
    AnnexError,
    InputError,
    JobGone,
    LimitExceeded,
    NotFound,
    PermissionDenied,
)
from annex_gahp.gahp import Caller
from annex_gahp.schedd import (
    COMPLETED,
    HELD,
    IDLE,
    REMOVED,
    RUNNING,
    SUBMISSION_ERR,
    QueuedJob,
)
from annex_gahp.settings import Settings
from annex_gahp.store import Annex, Store

log = logging.getLogger(__name__)

Handler = Callable[[Caller, dict[str, str]], dict[str, str]]


# The ClassAd quoting of hook answers (annex_status.classad_literal), for the handlers.
classad_literal = annex_status.classad_literal


def ad_answer(attrs: Mapping[str, str]) -> dict[str, str]:
    """A hook's answer: `Name = value` lines (values from classad_literal) in `ad=`, which
    the hooks apply or print as they are (docs/protocol.md)."""
    return {"ad": "".join(f"{name} = {expr}\n" for name, expr in sorted(attrs.items()))}


def parse_job_ad(text: str, *, strict: bool = True) -> dict[str, Any]:
    """The attributes we read from a job ad the hooks forwarded, evaluated. `strict=False`
    leaves out a request attribute that evaluates to error instead of refusing the ad: only
    to find the job a refusal is written into."""
    import classad2  # noqa: PLC0415 - only the daemon needs the bindings

    try:
        ad = classad2.parseOne(text)
    except Exception as err:
        raise InputError(f"the job ad could not be parsed: {err}") from None
    wanted = (
        "Owner",
        "ClusterId",
        "ProcId",
        "GlobalJobId",  # which schedd the job is in (schedd.ScheddDemand.schedd_of)
        "QDate",
        "EnteredCurrentStatus",
        names.JOB_TARGET,
        "RoutedFromJobId",
        "AnnexLastError",  # what the job already says, so a refusal is written only once
        "AnnexState",
    )
    annex_attrs = frozenset(names.JOB_ATTRS.values())
    values: dict[str, Any] = {}
    for attr in (*wanted, *annex_attrs):
        if attr not in ad:
            continue
        try:
            raw = ad.eval(attr)
        except Exception as err:  # an expression that does not evaluate is treated as absent
            log.debug("job attribute %s does not evaluate: %s", attr, err)
            continue
        # ClassAd `error` in a request attribute is a bad request, never the default: refused,
        # as the submit transform refuses it (a job edited after submit gets here).
        if attr in annex_attrs and compat.is_error(raw):
            if not strict:
                continue
            raise InputError(f"{attr} evaluates to error: give it a literal value")
        # `undefined` and `error` (classad2.Value, an IntEnum: not a number) count as absent.
        value = compat.plain(raw)
        if value is not None:
            values[attr] = value
    return values


class JobQueue(Protocol):
    """The schedd, as the translate hook's request is checked against it (schedd.ScheddDemand)."""

    def schedd_of(self, global_job_id: object, cluster: int, proc: int) -> str: ...

    def job(self, cluster: int, proc: int, *, schedd: str = "") -> QueuedJob | None: ...

    def left_since_last_look(
        self, cluster: int, proc: int, idle_since: int, *, schedd: str = ""
    ) -> bool: ...

    def tell_job(
        self, owner: str, cluster: int, proc: int, attrs: dict[str, str], *, schedd: str = ""
    ) -> None: ...


@dataclasses.dataclass(frozen=True)
class JobRef:
    """The job a translate hook speaks for, as its ad (the job router's copy) says."""

    cluster: int
    proc: int
    owner: str
    idle_since: int | None  # EnteredCurrentStatus (else QDate): waiting since when
    # The served schedd that owns it (schedd.ScheddDemand.schedd_of; "": the local one): a job
    # is its schedd plus cluster.proc, and every call about it goes there.
    schedd: str = ""

    @property
    def id(self) -> str:
        where = f" of schedd {self.schedd}" if self.schedd else ""
        return f"{self.cluster}.{self.proc}{where}"


# AnnexLastError of a refused job is at most this long (a conflict quotes the job's values).
_REFUSAL_CHARS = 1000

# Why a job that is not idle or running gets no annex, as the hook's stderr line says it.
_NOT_WAITING = {
    REMOVED: "was removed",
    COMPLETED: "has completed",
    HELD: "is held (once released, the job router routes it again)",
    SUBMISSION_ERR: "failed to submit",
}


class AnnexService:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        wake: Callable[[], None] = lambda: None,
        resolve_region: Callable[[str, Settings], str] | None = None,
        clock: Callable[[], float] = time.time,
        hold_job: Callable[..., None] | None = None,
        jobs: JobQueue | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.wake = wake
        # (owner, cluster, proc, reason, schedd=): holds one job (schedd.hold_job); provision mode
        # a job whose user data cannot be used, with the reason, instead of refusing forever.
        self.hold_job = hold_job
        # The job router runs the translate hook for jobs removed after it picked them up
        # (docs/router.md): `jobs` is how JOB_ROUTED tells (None: no schedd, nothing checked).
        self.jobs = jobs
        self._resolve_region = resolve_region or settings_mod.resolve_region
        self._clock = clock
        # Serialises ensure(): two hooks racing for the same new annex must not both insert.
        self._lock = threading.Lock()

    # --- the command table -----------------------------------------------------------------

    def commands(self) -> dict[str, Handler]:
        return {
            "ANNEX_CREATE": self.create,
            "ANNEX_EXTEND": self.extend,
            "ANNEX_DELETE": self.delete,
            "ANNEX_STATUS": self.status,
            "ANNEX_LIST": self.list,
            "ANNEX_REPORT": self.report,
            "JOB_ROUTED": self.job_routed,
            "JOB_UPDATE": self.job_update,
            "JOB_FINALIZE": self.job_finalize,
            "JOB_CLEANUP": self.job_cleanup,
        }

    # --- authorisation -------------------------------------------------------------------

    @staticmethod
    def _owner_for(caller: Caller, args: Mapping[str, str]) -> str:
        owner = args.get("owner") or caller.user
        if owner != caller.user and not caller.is_admin:
            raise PermissionDenied(
                f"{caller.user} may not act on annexes of {owner}: an annex belongs to the "
                "user who asked for it"
            )
        return owner

    def _find(self, caller: Caller, args: Mapping[str, str]) -> Annex:
        if args.get("id"):
            return self._find_id(caller, args)
        name = args.get("name", "")
        if not name:
            raise InputError("name= is required: which annex?")
        owner = self._owner_for(caller, args)
        annex = self.store.live(owner, name)
        if annex is None:
            raise NotFound(
                f"{owner} has no annex named {name!r} (htcondor-annex status lists them)"
            )
        return annex

    def _find_id(self, caller: Caller, args: Mapping[str, str]) -> Annex:
        """By record id (what a provision-mode job was given as AnnexId), retired ones too:
        the job asks how its annex ended."""
        text = str(args["id"]).strip()
        # Bounded before int(): past 18 digits SQLite (and int() past 4300) fail otherwise.
        if not (text.isascii() and text.isdigit() and len(text) <= names.NUMBER_DIGITS_MAX):
            raise InputError("id= must be a whole number")
        annex = self.store.get(int(text))
        owner = self._owner_for(caller, args)
        anyone = caller.is_admin and not args.get("owner")
        if annex is None or (annex.owner != owner and not anyone):
            raise NotFound(f"{owner} has no annex with id {args['id']}")
        return annex

    # --- creation and growth ---------------------------------------------------------------

    def ensure(
        self,
        wanted: spec.AnnexSpec,
        *,
        qdate: int | None = None,
        user_data: bytes | None = None,
        job: JobRef | None = None,
    ) -> Annex:
        """Create the annex, or fold this request into the live one of the same owner and name.
        `user_data` (provision mode) is kept with a new annex, or with a live one that has none
        yet, before the reconcile loop is woken; an annex that has some keeps it. `job` (a
        translate hook's request): a new annex is created only while the schedd still has that
        job waiting - one schedd query, on this path only, outside the lock when it can be."""
        now = int(self._clock())
        checked = False
        if job is not None and self.store.live(wanted.owner, wanted.name) is None:
            self._refuse_expired_recreation(wanted, qdate)  # no need to ask the schedd then
            self._require_waiting(job)
            checked = True
        # The per-user cap is read and the request written in one IMMEDIATE transaction: two
        # requests racing (two hooks, a hook and an extend) cannot both pass it.
        with self._lock:
            with self.store.transaction():
                live = self.store.live(wanted.owner, wanted.name)
                if live is not None:
                    return self._fold(live, wanted, user_data)
                self._refuse_expired_recreation(wanted, qdate)
                if job is not None and not checked:
                    self._require_waiting(job)  # the live annex ended between the two looks
                region = self._checked_region(wanted.region)
                requested, limit = self._capped(wanted.owner, wanted.instances, exclude=None)
                over = accounting.refusal(
                    self.store,
                    self.settings,
                    wanted,
                    region,
                    requested,
                    wanted.expires_at(now, self.settings),
                    now,
                )
                if over:
                    raise LimitExceeded(over)
                annex = lifecycle.create(
                    self.store,
                    lifecycle.Event.REQUEST,
                    owner=wanted.owner,
                    name=wanted.name,
                    spec=wanted,
                    region=region,
                    requested=requested,
                    lease_expiration=wanted.expires_at(now, self.settings),
                    now=now,
                )
                if limit:
                    annex = self.store.update_annex(annex.id, binding_limit=limit)
                if user_data is not None:
                    pilotdata.save(self.settings.state_dir, annex.id, user_data)
            faults.checkpoint("create.recorded")  # committed: the record exists
            log.info(
                "annex %s requested: %d instance(s) in %s, lease until %d%s",
                annex.key,
                requested,
                region,
                annex.lease_expiration,
                f" ({limit} binds)" if limit else "",
            )
            self.wake()
            return annex

    def _check_budget(
        self,
        annex: Annex,
        requested: int,
        lease_end: int,
        now: int,
        wanted: spec.AnnexSpec | None = None,
    ) -> None:
        """Growth of a live annex (more instances, a later end) is judged as a new request
        is: its worst case from now against what is left of the budgets."""
        if requested <= annex.requested and lease_end <= annex.lease_expiration:
            return
        over = accounting.refusal(
            self.store, self.settings, wanted or annex.spec, annex.region, requested, lease_end, now
        )
        if over:
            raise LimitExceeded(over)

    def _fold(self, live: Annex, wanted: spec.AnnexSpec, user_data: bytes | None) -> Annex:
        """A request for a live annex: folded into it (inside ensure's transaction)."""
        if live.state not in lifecycle.ACTIVE:
            # Retiring: the new request will find a fresh annex once this one is gone.
            raise InputError(
                f"annex {live.name} is retiring ({live.retire_reason}); submit again once "
                "it is gone, or use another annex_name"
            )
        merged = spec.merge(live.spec, wanted, self.settings)
        if user_data is not None and pilotdata.load(self.settings.state_dir, live.id) is None:
            pilotdata.save(self.settings.state_dir, live.id, user_data)
            self.wake()
        requested, limit = self._capped(live.owner, merged.instances, exclude=live.id)
        requested = max(requested, live.requested)
        lease = max(live.lease_expiration, merged.expires_at(live.created, self.settings))
        changes: dict[str, Any] = {}
        if merged != live.spec:
            changes["spec"] = merged
        if requested != live.requested:
            changes["requested"] = requested
        if lease != live.lease_expiration:
            changes["lease_expiration"] = lease
        if limit != live.binding_limit:
            changes["binding_limit"] = limit
        if not changes:
            return live
        self._check_budget(live, requested, lease, int(self._clock()), merged)
        annex = self.store.update_annex(live.id, **changes)
        log.info("annex %s now wants %d instance(s)", annex.key, annex.requested)
        self.wake()
        return annex

    def _require_waiting(self, job: JobRef) -> None:
        """Before a job's request creates an annex: the schedd still has the job, it is the
        caller's, and it is idle or running. Anything else would start instances (and their
        bill) for nobody: the request is refused, and the hook exits non-zero, which makes
        the router drop the job without editing it (docs/router.md)."""
        if self.jobs is None:
            return
        try:
            queued = self.jobs.job(job.cluster, job.proc, schedd=job.schedd)
        except Exception as err:
            raise AnnexError(
                f"could not ask the schedd whether job {job.id} still waits ({err}); nothing "
                "was created, and the job router asks again later"
            ) from None
        if queued is None:
            raise JobGone(f"job {job.id} is no longer in the queue: no annex is created for it")
        if queued.owner != job.owner:
            raise PermissionDenied(
                f"job {job.id} belongs to {queued.owner}, not {job.owner}: a hook speaks only "
                "for its owner's jobs"
            )
        if queued.status not in (IDLE, RUNNING):
            what = _NOT_WAITING.get(queued.status, f"is not waiting (JobStatus {queued.status})")
            raise JobGone(f"job {job.id} {what}: no annex is created for it")

    def _check_still_waiting(self, job: JobRef) -> None:
        """Any translate request, free of queries: the helper's last demand query (once per
        reconcile cycle) began after the job became idle and did not see it idle or running,
        so it has been removed, completed or held since. Refused like _require_waiting: an
        answer would make the router edit a job that is gone, which fails and, in HTCondor
        before 23.0.24/24.5.1, also fails the schedd's next commit - someone's condor_submit
        (docs/router.md)."""
        if self.jobs is None or job.idle_since is None:
            return
        if self.jobs.left_since_last_look(job.cluster, job.proc, job.idle_since, schedd=job.schedd):
            raise JobGone(
                f"job {job.id} was no longer idle or running at the helper's last look at the "
                "queue (removed, completed or held since it was routed): nothing is done for it; "
                "a held job is routed again once released"
            )

    def _refuse_expired_recreation(self, wanted: spec.AnnexSpec, qdate: int | None) -> None:
        """An annex that ended by its lease or by delete is not brought back by a job that has
        waited since before then (`qdate`: when the job last became idle). The helper holds
        such jobs; one its owner released since then does start a new annex."""
        if qdate is None:
            return
        last = self.store.last_retired(wanted.owner, wanted.name)
        if not last or not last.retired_at or qdate > last.retired_at:
            return
        if last.retire_reason == lifecycle.RetireReason.LEASE.value:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(last.lease_expiration))
            ended = f"reached the end of its lease at {when}"
        elif last.retire_reason == lifecycle.RetireReason.DELETED.value:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(last.retired_at))
            ended = f"was deleted at {when}"
        else:
            return
        raise InputError(
            f"annex {wanted.name} {ended}; jobs waiting since before then do not bring it "
            "back: they are held, and condor_release starts a new annex for them"
        )

    def _checked_region(self, job_region: str) -> str:
        """The region a new annex runs in, refused before anything is recorded unless AWS has
        it and ANNEX_ALLOWED_REGIONS (if set) lists it. A region not given by the request comes
        from ANNEX_AWS_REGION (or the helper's AWS config): the refusal names that knob."""
        region = self._resolve_region(job_region, self.settings)
        knob = "annex_region" if job_region else "ANNEX_AWS_REGION"
        return spec.check_region(region, self.settings.allowed_regions, knob)

    def _capped(self, owner: str, wanted: int, exclude: int | None) -> tuple[int, str]:
        """Instances we may ask for, and which knob binds (empty if none). Call it inside the
        store transaction that writes the count, or a racing request passes it too."""
        limit = ""
        count = wanted
        if count > self.settings.max_instances:
            count, limit = self.settings.max_instances, "ANNEX_MAX_INSTANCES"
        others = sum(
            a.requested
            for a in self.store.annexes(owner)
            if a.id != exclude and a.state in lifecycle.LIVE
        )
        room = self.settings.max_instances_per_user - others
        if count > room:
            if room <= 0:
                raise LimitExceeded(
                    f"{owner} already has {others} instance(s) in annexes, the most "
                    f"ANNEX_MAX_INSTANCES_PER_USER ({self.settings.max_instances_per_user}) "
                    "allows; retire one with htcondor-annex delete or wait"
                )
            count, limit = room, "ANNEX_MAX_INSTANCES_PER_USER"
        return count, limit

    # --- handlers ------------------------------------------------------------------------

    def create(self, caller: Caller, args: dict[str, str]) -> dict[str, str]:
        owner = self._owner_for(caller, args)
        keywords = {k: v for k, v in args.items() if k not in ("owner", "user_data")}
        wanted = spec.from_keywords(keywords, owner, self.settings)
        user_data = None
        if wanted.mode == "provision":
            # Read by `htcondor-annex create` with the caller's rights, as the hook does.
            try:
                user_data = pilotdata.decode(args.get("user_data", ""))
            except pilotdata.UserDataError as exc:
                raise InputError(f"provision mode needs the user data: {exc}") from None
            try:
                self._check_template(wanted, user_data)
            except pilotdata.UserDataError as exc:
                raise InputError(str(exc)) from None
        annex = self.ensure(wanted, user_data=user_data)
        return {
            "name": annex.name,
            "owner": annex.owner,
            "state": annex.state,
            "requested": str(annex.requested),
        }

    def extend(self, caller: Caller, args: dict[str, str]) -> dict[str, str]:
        annex = self._find(caller, args)
        if annex.state not in lifecycle.ACTIVE:
            raise InputError(
                f"annex {annex.name} is {annex.state}; only a live annex can be extended"
            )
        now = int(self._clock())
        changes: dict[str, Any] = {}
        if args.get("lease") and args.get("expiry"):
            raise InputError("give lease= or expiry=, not both")
        try:
            if args.get("lease"):
                changes["lease_expiration"] = now + durations.parse_duration(args["lease"])
            elif args.get("expiry"):
                changes["lease_expiration"] = durations.parse_expiry(args["expiry"])
        except ValueError as err:
            raise InputError(str(err)) from None
        if "lease_expiration" in changes:
            end = changes["lease_expiration"]
            if end <= now:
                raise InputError("the new lease end is in the past")
            if end - now > self.settings.max_lease:
                raise LimitExceeded(
                    f"a lease may run at most ANNEX_MAX_LEASE "
                    f"({durations.format_duration(self.settings.max_lease)}) from now"
                )
        if args.get("instances"):
            try:
                wanted = int(args["instances"])
            except ValueError:
                raise InputError("instances= must be a whole number") from None
            if wanted < 1:
                raise InputError("instances= must be at least 1 (delete retires an annex)")
        elif not changes:
            raise InputError("nothing to extend: give lease=, expiry= or instances=")
        with self.store.transaction():
            # Read again inside the write: the annex may have retired since it was found, and
            # the owner's other annexes may have grown (the cap is checked where it is written).
            current = self.store.get(annex.id)
            if current is None or current.state not in lifecycle.ACTIVE:
                state = current.state if current else names.RETIRED
                raise InputError(
                    f"annex {annex.name} is {state}; only a live annex can be extended"
                )
            if args.get("instances"):
                changes["requested"], changes["binding_limit"] = self._capped(
                    annex.owner, wanted, exclude=annex.id
                )
            self._check_budget(
                current,
                changes.get("requested", current.requested),
                changes.get("lease_expiration", current.lease_expiration),
                now,
            )
            annex = self.store.update_annex(annex.id, **changes)
        log.info("annex %s extended: %s", annex.key, changes)
        self.wake()
        return {
            "name": annex.name,
            "state": annex.state,
            "lease_expiration": str(annex.lease_expiration),
            "requested": str(annex.requested),
        }

    def delete(self, caller: Caller, args: dict[str, str]) -> dict[str, str]:
        annex = self._find(caller, args)
        if annex.state != names.RETIRED:  # (by id= a retired one is found too: nothing to do)
            annex = self.retire(annex, lifecycle.RetireReason.DELETED)
        return {"name": annex.name, "state": annex.state}

    def retire(
        self, annex: Annex, reason: lifecycle.RetireReason | str, *, now: int | None = None
    ) -> Annex:
        """Retire the annex (lifecycle.retire) and wake the loop to end its instances."""
        now = int(self._clock()) if now is None else now
        annex, retired = lifecycle.retire(
            self.store, annex, lifecycle.RetireReason(reason), now=now
        )
        if retired:
            self.wake()
        return annex

    def status(self, caller: Caller, args: dict[str, str]) -> dict[str, str]:
        annex = self._find(caller, args)
        view = annex_status.describe(self.store, annex)
        view["Id"] = annex.id
        view["instances"] = [
            {"id": i.id, "state": i.state, "type": i.instance_type, "launched": i.launched}
            for i in self.store.instances(annex.id)
        ]
        return {"json": json.dumps(view, sort_keys=True)}

    def list(self, caller: Caller, args: dict[str, str]) -> dict[str, str]:
        owner = args.get("owner") or None
        if not caller.is_admin:
            owner = self._owner_for(caller, {"owner": owner or caller.user})
        views = [annex_status.describe(self.store, a) for a in self.store.annexes(owner)]
        return {"json": json.dumps(views, sort_keys=True)}

    def report(self, caller: Caller, args: dict[str, str]) -> dict[str, str]:
        """ANNEX_REPORT since=<duration> by=owner|annex|type|lifecycle [owner=]: the cost
        history from the helper's records (issue 16). A user sees their own annexes only; an
        admin sees everyone's unless owner= narrows it."""
        owner = args.get("owner") or None
        if not caller.is_admin:
            owner = self._owner_for(caller, {"owner": owner or caller.user})
        try:
            window = durations.parse_duration(args.get("since") or "30d", "since")
        except ValueError as err:
            raise InputError(str(err)) from None
        by = args.get("by") or "annex"
        now = int(self._clock())
        since = now - window
        used = [
            u for u in accounting.usages(self.store, since) if owner is None or u.owner == owner
        ]
        table = accounting.price_table(self.store)
        try:
            groups = cost.group(used, table, by, since=since, until=now)
        except ValueError as err:
            raise InputError(str(err)) from None
        overall = cost.total(used, table, since=since, until=now)

        def row(key: str, figure: cost.Cost) -> dict[str, Any]:
            return {
                "key": key,
                "cost": round(figure.amount, 6),
                "instance_hours": round(figure.hours, 4),
                "currency": figure.currency,
                "unpriced": list(figure.unpriced),
            }

        return {
            "json": json.dumps(
                {
                    "since": since,
                    "until": now,
                    "by": by,
                    "rows": [row(k, v) for k, v in groups.items()],
                    "total": row("total", overall),
                    "instances": len(used),
                },
                sort_keys=True,
            )
        }

    # --- the job router hooks ------------------------------------------------------------

    def _job(self, caller: Caller, args: Mapping[str, str]) -> dict[str, Any]:
        text = args.get("ad", "")
        if not text.strip():
            raise InputError("ad= is required: the job ad, as the job router gave it")
        attrs = parse_job_ad(text)
        owner = attrs.get("Owner")
        if not isinstance(owner, str) or not owner:
            raise InputError("the job ad has no Owner")
        if owner != caller.user and not caller.is_admin:
            raise PermissionDenied(
                f"{caller.user} sent a job ad owned by {owner}: hooks run as the job's owner"
            )
        if not isinstance(attrs.get(names.JOB_TARGET), str):
            raise InputError(f"the job ad has no {names.JOB_TARGET}: it names no annex")
        return attrs

    def job_routed(self, caller: Caller, args: dict[str, str]) -> dict[str, str]:
        """Every refusal of a waiting job's request is written into the job (_tell_refused)
        except those that must not or cannot be: a job that is gone or no longer waiting
        (JobGone), an ad of another user (PermissionDenied: an edit on behalf of someone
        else), and a schedd that does not answer. docs/troubleshooting.md lists them."""
        try:
            attrs = self._job(caller, args)
        except InputError as err:  # e.g. a request attribute that evaluates to error
            found = self._refused_job(caller, args)
            if found is not None:
                try:
                    job = self._job_ref(found, None)
                except AnnexError:
                    job = None  # a schedd this helper does not serve: nothing to write there
                self._tell_refused(job, found, str(err))
            raise
        owner = attrs["Owner"]
        # Since when the job waits: a job released after its annex ended may start a new one.
        since = attrs.get("EnteredCurrentStatus", attrs.get("QDate"))
        since = since if isinstance(since, int) else None
        job = self._job_ref(attrs, since)
        try:
            wanted = spec.from_job_attrs(attrs, owner, self.settings)  # bad input says so first
        except (InputError, LimitExceeded) as err:
            self._tell_refused(job, attrs, str(err))
            raise
        if job is not None:
            self._check_still_waiting(job)
        user_data = self._pilot_data(attrs, args, wanted) if wanted.mode == "provision" else None
        try:
            annex = self.ensure(wanted, qdate=since, user_data=user_data, job=job)
        except (JobGone, PermissionDenied):
            raise  # nobody waits, or not this caller's job: nothing is written
        except AnnexError as err:  # a conflict, retiring, a region, a cap, an ended lease...
            self._tell_refused(job, attrs, str(err))
            raise
        out = annex_status.job_status_attrs(self.store, annex, owner, wanted.name)
        out[names.SOCKET_ATTR] = classad_literal(self.settings.socket_path)
        return ad_answer(out)

    def _tell_refused(self, job: JobRef | None, attrs: Mapping[str, Any], why: str) -> None:
        """A refused request (bad input, a conflict, a cap) leaves the job unrouted, and the
        router asks again each polling period; without this its owner would see an idle job
        and nothing else. The job gets AnnexState = "refused" (names.JOB_REFUSED) and the
        message in AnnexLastError, quoted by classad_literal (the message may hold the job's
        own values). Written only when it changes: the router's copy of the ad says what the
        job already carries. Once the cause is gone, the next routing answers the real state."""
        if job is None or self.jobs is None:
            return
        why = why[:_REFUSAL_CHARS]
        if attrs.get("AnnexLastError") == why and attrs.get("AnnexState") == names.JOB_REFUSED:
            return
        try:
            self.jobs.tell_job(
                job.owner,
                job.cluster,
                job.proc,
                {
                    "AnnexLastError": classad_literal(why),
                    "AnnexState": classad_literal(names.JOB_REFUSED),
                },
                schedd=job.schedd,
            )
        except Exception as err:
            log.warning("could not write the refusal into job %s: %s", job.id, err)

    def _refused_job(self, caller: Caller, args: Mapping[str, str]) -> dict[str, Any] | None:
        """The job of an ad _job refused, read leniently, when it is the caller's own waiting
        annex job (never another user's: the refusal is not written on their behalf)."""
        try:
            attrs = parse_job_ad(args.get("ad", ""), strict=False)
        except InputError:
            return None
        owner = attrs.get("Owner")
        if not isinstance(owner, str) or not owner:
            return None
        if owner != caller.user and not caller.is_admin:
            return None
        if not isinstance(attrs.get(names.JOB_TARGET), str):
            return None
        return attrs

    def _check_template(self, wanted: spec.AnnexSpec, data: bytes) -> None:
        """A template (annex_user_data_template) is rendered once now, confined as at launch,
        with the values known before the annex exists: one that cannot render (a syntax
        error, an unsafe construct, an unknown name, too slow, too large) is refused before
        anything is recorded. Raises pilotdata.UserDataError naming annex_user_data_file."""
        if not wanted.user_data_template:
            return
        now = int(time.time())
        values = pilotdata.variables(
            wanted.name,
            wanted.owner,
            "annex-0",
            wanted.region or self.settings.region,
            wanted.instances,
            wanted.expires_at(now, self.settings),
        )
        pilotdata.check(data, wanted.user_data_file, values)

    def _pilot_data(
        self, attrs: Mapping[str, Any], args: Mapping[str, str], wanted: spec.AnnexSpec
    ) -> bytes:
        """Provision mode: the user data the translate hook read as the job's owner. When it
        could not be used (nor, for a template, rendered: _check_template), the job is held
        with the reason (one line naming the file and what is wrong) and the request refused:
        the router leaves a held job alone until the owner fixes the file and releases it."""
        problem = args.get("user_data_error", "")
        data = None
        if not problem:
            try:
                data = pilotdata.decode(args.get("user_data", ""))
                self._check_template(wanted, data)
            except pilotdata.UserDataError as exc:
                data, problem = None, str(exc)
        if data is not None:
            return data
        problem = " ".join(problem.split())[:500] or "no user data was sent"
        # AnnexLastError says it too, where annex errors go (written while the job is idle).
        job = self._job_ref(attrs, None)
        self._tell_refused(job, attrs, problem)
        if self.hold_job is not None and job is not None:
            try:
                self.hold_job(job.owner, job.cluster, job.proc, problem, schedd=job.schedd)
            except Exception as err:
                log.warning("could not hold job %s: %s", job.id, err)
        raise InputError(problem)

    def _job_ref(self, attrs: Mapping[str, Any], idle_since: int | None) -> JobRef | None:
        """The job the ad speaks for, in the schedd that owns it. Raises when that is a schedd
        this helper does not serve (ANNEX_SCHEDDS): nothing is done for the job there."""
        cluster, proc = attrs.get("ClusterId"), attrs.get("ProcId")
        if not isinstance(cluster, int) or not isinstance(proc, int):
            return None  # (the hooks refuse such an ad before asking)
        schedd = ""
        if self.jobs is not None:
            schedd = self.jobs.schedd_of(attrs.get("GlobalJobId"), cluster, proc)
        return JobRef(cluster, proc, str(attrs["Owner"]), idle_since, schedd)

    def job_update(self, caller: Caller, args: dict[str, str]) -> dict[str, str]:
        attrs = self._job(caller, args)
        owner, name = attrs["Owner"], attrs[names.JOB_TARGET]
        out = annex_status.job_status_attrs(self.store, self.store.live(owner, name), owner, name)
        return ad_answer(out)

    def job_finalize(self, caller: Caller, args: dict[str, str]) -> dict[str, str]:
        result = self.job_update(caller, args)
        self.wake()  # demand changed: let the idle clock start now rather than next cycle
        return result

    def job_cleanup(self, caller: Caller, args: dict[str, str]) -> dict[str, str]:
        self._job(caller, args)
        self.wake()
        return {}
