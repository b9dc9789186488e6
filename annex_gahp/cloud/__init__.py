"""What the reconcile loop needs from a cloud, and the values it gets back.

The loop deals in annexes and instance ids through `Cloud`; annex_gahp.cloud.aws implements it
(one backend per strategy, chosen in cloud/aws/backends.py). Nothing here imports boto3, the
loop, the request handlers or the transports: the dependency points from the loop to the cloud.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from annex_gahp import names
from annex_gahp.offerings import Mark, Offering

if TYPE_CHECKING:
    from annex_gahp.store import Annex


@dataclass(frozen=True)
class Observed:
    """One instance as the cloud reports it, reduced to what decisions need."""

    id: str
    state: str
    instance_type: str
    region: str
    tags: dict[str, str]
    # Where describe gives them: the availability zone, and "spot" or "on-demand" (EC2's
    # InstanceLifecycle); offerings and billing (cost.py) both read them.
    zone: str = ""
    lifecycle: str = "on-demand"

    @property
    def key(self) -> tuple[str, str]:
        return (self.tags.get(names.TAG_OWNER, ""), self.tags.get(names.TAG_NAME, ""))

    @property
    def request(self) -> str:
        return self.tags.get(names.TAG_REQUEST, "")

    @property
    def expires(self) -> int:
        try:
            return int(self.tags.get(names.TAG_EXPIRES, "0"))
        except ValueError:
            return 0


@dataclass(frozen=True)
class LaunchOutcome:
    """What one `ensure` call did. `instance_ids` are the instances known to be new now; a
    backend whose capacity arrives later (an Auto Scaling group) returns none and no error.
    The attempt failed when nothing was launched and the cloud said why (`errors`)."""

    instance_ids: list[str]
    errors: list[str] = field(default_factory=list)
    # Capacity pools the cloud said have no capacity now, each with its error code: the loop
    # marks them unavailable (annex_gahp/offerings.py).
    unavailable: list[tuple[Offering, str]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return not self.instance_ids and bool(self.errors)


# The submit checks (spec.py) that depend on the strategy read these two tables, so no module
# outside this package names a strategy to decide something. Spec fields only one strategy
# takes (field -> that strategy) ...
ONLY_FOR: dict[str, str] = {"stack_name": "stack"}
# ... and fields a strategy refuses (strategy -> field -> what to do instead).
REFUSED: dict[str, dict[str, str]] = {
    "stack": {"vpc": "give annex_subnets in that VPC instead, or use annex_strategy = fleet"},
}


# What `prepare` made for an annex: the backend's own names (a launch template, a stack, where
# the token is). The loop stores it as given before launching and hands it back in
# `Annex.cloud_resources`; only the backend reads it.
Resources = dict[str, str]


class Cloud(Protocol):
    """The loop's whole view of a cloud. Every method may raise AnnexError (CloudError etc.)."""

    def observe(self, regions: Iterable[str]) -> list[Observed]:
        """This pool's live and recently ended instances in `regions`."""
        ...

    def prepare(self, annex: Annex) -> Resources:
        """Make what a launch needs that creates no instance (token, template); idempotent.
        The loop records the answer before `ensure`, so a crash after it can clean up."""
        ...

    def ensure(
        self, annex: Annex, target: int, have: int, request: str, avoid: Sequence[Mark] = ()
    ) -> LaunchOutcome:
        """Capacity for the annex at `target` instances, `have` of which the loop sees;
        `request` tags what this call launches (the loop's recorded intent); no capacity pool
        that `avoid` covers is asked for."""
        ...

    def remove(self, region: str, ids: list[str]) -> None:
        """End these instances, for good (no replacement)."""
        ...

    def extend(self, annex: Annex, ids: list[str]) -> None:
        """The annex's lease now ends at `annex.lease_expiration`: tell its instances `ids`."""
        ...

    def release(self, annex: Annex) -> None:
        """Delete what the annex holds besides instances; raises CloudError while waiting."""
        ...

    def console(self, region: str, instance_id: str) -> str:
        """The instance's console output as the cloud keeps it ("" if none yet). Hostile text
        (the instance wrote it): bounded here, made printable by whoever shows it."""
        ...

    def purge(self, *, dry_run: bool = False) -> dict[str, list[str]]:
        """Every annex resource of this pool besides loose instances (setup teardown), by
        kind; with `dry_run`, only what is found."""
        ...


class Backend(Protocol):
    """One strategy (`annex_strategy`): the annex-keyed part of `Cloud`, plus what it must see
    of every observation and removal (a backend may own instances of any annex)."""

    def prepare(self, annex: Annex) -> Resources: ...

    def ensure(
        self, annex: Annex, target: int, have: int, request: str, avoid: Sequence[Mark] = ()
    ) -> LaunchOutcome: ...

    def extend(self, annex: Annex, ids: list[str]) -> None: ...

    def release(self, annex: Annex) -> None: ...

    def release_leftovers(self, annex: Annex) -> None:
        """The annex is another backend's, but this one may have made something for it (a
        record rebuilt from tags after a lost state file): delete that."""
        ...

    def observed(self, region: str, seen: list[Observed]) -> None:
        """Note what one region showed (called once per region per observation)."""
        ...

    def remove(self, region: str, ids: list[str]) -> list[str]:
        """End the instances among `ids` this backend must end its own way; the rest back."""
        ...

    def purge(self, *, dry_run: bool = False) -> dict[str, list[str]]: ...
