"""`AwsCloud`, the loop's `Cloud` on AWS: each annex's calls go to the backend of its strategy
(backends.py); observation and removal, which are per region, are shared, and every backend
sees them (a backend may own instances the loop only knows by tags)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from annex_gahp.cloud import Backend, LaunchOutcome, Observed, Resources
from annex_gahp.cloud.aws import backends, instances
from annex_gahp.cloud.aws.context import AwsContext, ClientFactory, pilot_variables
from annex_gahp.errors import InputError
from annex_gahp.offerings import Mark
from annex_gahp.settings import Settings
from annex_gahp.store import Annex

__all__ = ["AwsCloud", "pilot_variables"]

log = logging.getLogger(__name__)


class AwsCloud:
    def __init__(
        self,
        settings: Settings,
        *,
        mint: Callable[[str, int], str] | None = None,
        make_client: ClientFactory | None = None,
        home_region: str = "",
        registry: dict[str, Callable[[AwsContext], Backend]] | None = None,
    ) -> None:
        self.ctx = AwsContext(settings, mint=mint, make_client=make_client, home_region=home_region)
        self.backends: dict[str, Backend] = {
            name: make(self.ctx) for name, make in (registry or backends.BACKENDS).items()
        }

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        # One Settings for every backend (tests swap in another state directory).
        self.ctx.settings = value

    # Tests count and fault calls on the clients the backends use.
    @property
    def _clients(self) -> dict[tuple[str, str], Any]:
        return self.ctx.clients

    def _client(self, service: str, region: str) -> Any:
        return self.ctx.client(service, region)

    def spot_prices(self, region: str, types: list[str]) -> dict[tuple[str, str], float]:
        """(zone, type) -> the latest spot price per hour there (annex_gahp/prices.py)."""
        from annex_gahp.cloud.aws import prices  # noqa: PLC0415 - only with a spot annex

        return prices.spot_prices(self.ctx.client("ec2", region), types)

    def backend(self, annex: Annex) -> Backend:
        name = annex.spec.strategy or backends.DEFAULT
        try:
            return self.backends[name]
        except KeyError:
            raise InputError(
                f"annex {annex.name}: annex_strategy {name!r} is not one of "
                f"{', '.join(sorted(self.backends))}"
            ) from None

    def observe(self, regions: Iterable[str]) -> list[Observed]:
        """This pool's live instances in `regions`, one describe per region."""
        seen: list[Observed] = []
        for region in regions:
            here = [
                Observed(
                    id=view.id,
                    state=view.state,
                    instance_type=view.instance_type,
                    region=region,
                    tags=view.tags,
                    zone=view.zone,
                    lifecycle=view.lifecycle,
                )
                for view in instances.describe_pool(
                    self.ctx.client("ec2", region), self.settings.pool_id
                )
            ]
            for each in self.backends.values():
                each.observed(region, here)
            seen += here
        return seen

    def prepare(self, annex: Annex) -> Resources:
        return self.backend(annex).prepare(annex)

    def ensure(
        self, annex: Annex, target: int, have: int, request: str, avoid: Sequence[Mark] = ()
    ) -> LaunchOutcome:
        return self.backend(annex).ensure(annex, target, have, request, avoid)

    def remove(self, region: str, ids: list[str]) -> None:
        rest = list(ids)
        for each in self.backends.values():
            if not rest:
                return
            rest = each.remove(region, rest)
        if rest:
            instances.terminate(self.ctx.client("ec2", region), rest)

    def extend(self, annex: Annex, ids: list[str]) -> None:
        self.backend(annex).extend(annex, ids)

    def console(self, region: str, instance_id: str) -> str:
        return instances.console_output(self.ctx.client("ec2", region), instance_id)

    def release(self, annex: Annex) -> None:
        own = self.backend(annex)
        for each in self.backends.values():
            if each is not own:
                each.release_leftovers(annex)
        own.release(annex)

    def purge(self, *, dry_run: bool = False) -> dict[str, list[str]]:
        removed: dict[str, list[str]] = {}
        for each in self.backends.values():
            removed |= each.purge(dry_run=dry_run)
        return removed
