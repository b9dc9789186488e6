"""The `fleet` strategy: one EC2 CreateFleet (type instant) per launch, from a launch template
of the annex's own that carries the boot script (fleet.py has the API shapes)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from annex_gahp.cloud import LaunchOutcome, Observed, Resources
from annex_gahp.cloud.aws import fleet
from annex_gahp.cloud.aws.context import AwsContext
from annex_gahp.cloud.aws.tokenstores import AnnexTokens, TokenStore
from annex_gahp.errors import CloudError
from annex_gahp.offerings import Mark
from annex_gahp.store import Annex

log = logging.getLogger(__name__)


class FleetBackend:
    def __init__(self, ctx: AwsContext, tokens: TokenStore) -> None:
        self.ctx = ctx
        self.tokens = AnnexTokens(ctx, tokens)

    def prepare(self, annex: Annex) -> Resources:
        """Token and the annex's launch template; idempotent, so redone after a crash."""
        # Provision mode: nothing of this pool goes to the instances, so no token either.
        provision = annex.spec.mode == "provision"
        # Resolved and checked before anything else is made: a refusal leaves nothing behind.
        images = self.ctx.launch_images(annex)
        location = "" if provision else self.tokens.store_token(annex)
        boot = self.tokens.store.boot_fields(location) if location else {}
        plan = self.ctx.plan(annex, 0, "", self.ctx.user_data(annex, boot), images)
        template = fleet.ensure_annex_template(
            self.ctx.client("ec2", annex.region), plan, self.ctx.settings.launch_template
        )
        return {"launch_template": template, "token": location, "images": ",".join(images)}

    def ensure(
        self, annex: Annex, target: int, have: int, request: str, avoid: Sequence[Mark] = ()
    ) -> LaunchOutcome:
        # The annex's own template (made by prepare) carries the user data; naming it saves the
        # launch-template calls and never launches without the boot script.
        resources = annex.cloud_resources
        template = resources.get("launch_template", "") or resources.get("template_id", "")
        result = fleet.launch(
            self.ctx.client("ec2", annex.region),
            self.ctx.plan(annex, target - have, request, ""),
            self.ctx.settings.launch_template,
            annex_template_id=template,
            avoid=avoid,
        )
        errors = list(result.errors)
        if annex.spec.mode == "pool":
            try:
                self.tokens.copy_to_instances(annex, list(result.instance_ids))
            except CloudError as err:
                # The instances exist: report them. Their agents wait for a token, then give
                # up; the idle timeout ends them.
                log.error("annex %s: instance tokens not stored: %s", annex.key, err)
                errors.append(str(err))
        if not result.instance_ids and not errors:
            errors.append("no capacity")
        return LaunchOutcome(
            instance_ids=list(result.instance_ids),
            errors=errors,
            unavailable=list(result.unavailable),
        )

    def extend(self, annex: Annex, ids: list[str]) -> None:
        self.ctx.retag(annex, ids)
        if annex.spec.mode == "pool":
            self.tokens.store_token(annex)
            self.tokens.copy_to_instances(annex, ids)

    def release(self, annex: Annex) -> None:
        self.tokens.forget(annex)
        fleet.delete_annex_template(
            self.ctx.client("ec2", annex.region),
            self.ctx.settings.pool_id,
            annex.owner,
            annex.name,
        )
        self.tokens.store.delete(annex)

    def release_leftovers(self, annex: Annex) -> None:
        """Nothing of a fleet outlives its instances but the template and token, which only
        an annex of this strategy has."""

    def observed(self, region: str, seen: list[Observed]) -> None:
        """Fleet instances need nothing beyond what the loop records."""

    def remove(self, region: str, ids: list[str]) -> list[str]:
        return ids  # plain instances: TerminateInstances, by the caller

    def purge(self, *, dry_run: bool = False) -> dict[str, list[str]]:
        # The pool's launch templates and SSM tokens go with the setup (setup.teardown), which
        # also keeps the base template.
        return {}
