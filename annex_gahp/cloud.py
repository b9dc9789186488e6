"""The reconcile loop's view of AWS: the `Cloud` operations, built from annex_gahp.aws.

This is the only module that turns an annex record into cloud calls, so the loop deals in
annexes and instance ids, and the aws package deals in API shapes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from annex_gahp import names, tokens, userdata
from annex_gahp.aws import fleet, instances, secrets, session
from annex_gahp.errors import InputError
from annex_gahp.reconcile import LaunchOutcome, Observed
from annex_gahp.service import spec_from_record
from annex_gahp.settings import Settings
from annex_gahp.store import Annex

log = logging.getLogger(__name__)

# The token outlives the lease a little, so an instance powering off on time never sees its
# startd refused first.
TOKEN_MARGIN = 900


class AwsCloud:
    def __init__(
        self, settings: Settings, *, mint: Callable[[str, int], str] = tokens.mint
    ) -> None:
        self.settings = settings
        self._mint = mint
        self._clients: dict[tuple[str, str], Any] = {}

    def _client(self, service: str, region: str) -> Any:
        key = (service, region)
        if key not in self._clients:
            self._clients[key] = session.client(service, self.settings, region)
        return self._clients[key]

    # --- observation ---------------------------------------------------------------------

    def observe(self, regions: Iterable[str]) -> list[Observed]:
        seen: list[Observed] = []
        for region in regions:
            for view in instances.describe_pool(self._client("ec2", region), self.settings.pool_id):
                seen.append(
                    Observed(
                        id=view.id,
                        state=view.state,
                        instance_type=view.instance_type,
                        region=region,
                        tags=view.tags,
                    )
                )
        return seen

    # --- launching -----------------------------------------------------------------------

    def _tags(self, annex: Annex) -> dict[str, str]:
        return {
            names.TAG_NAME: annex.name,
            names.TAG_OWNER: annex.owner,
            names.TAG_POOL: self.settings.pool_id,
            names.TAG_EXPIRES: str(annex.lease_expiration),
        }

    def _token_parameter(self, annex: Annex) -> str:
        return secrets.parameter_name(
            self.settings.token_parameter_prefix, self.settings.pool_id, annex.owner, annex.name
        )

    def _store_token(self, annex: Annex) -> str:
        parameter = self._token_parameter(annex)
        lifetime = max(60, annex.lease_expiration - int(time.time())) + TOKEN_MARGIN
        token = self._mint(f"condor@{self.settings.uid_domain}", lifetime)
        secrets.put_token(self._client("ssm", annex.region), parameter, token, self._tags(annex))
        return parameter

    def _user_data(self, annex: Annex, parameter: str) -> bytes:
        wanted = spec_from_record(annex.spec)
        if wanted.mode == "provision":
            if not wanted.user_data_file:
                raise InputError("provision mode needs annex_user_data_file")
            raise InputError("provision mode is not available yet in this version")
        return userdata.render_user_data(
            userdata.BootContext(
                annex=annex.name,
                owner=annex.owner,
                request_id=f"annex-{annex.id}",
                pool_id=self.settings.pool_id,
                central_manager=wanted.central_manager or self.settings.central_manager,
                token_parameter=parameter,
                region=annex.region,
                aws_endpoint_url=self.settings.endpoint_url,
                expires=annex.lease_expiration,
            )
        )

    def _plan(
        self, annex: Annex, count: int, request: str, user_data: bytes | str
    ) -> fleet.LaunchPlan:
        wanted = spec_from_record(annex.spec)
        image_ids = tuple(wanted.image_ids) or (
            (self.settings.default_image_id,) if self.settings.default_image_id else ()
        )
        return fleet.LaunchPlan(
            annex=annex.name,
            owner=annex.owner,
            request_id=request,
            pool_id=self.settings.pool_id,
            expires=annex.lease_expiration,
            count=count,
            instance_types=tuple(wanted.instance_types) or self.settings.default_instance_types,
            image_ids=image_ids,
            subnets=tuple(wanted.subnets),
            spot_prices=tuple(wanted.spot_prices),
            keypair=wanted.keypair,
            security_groups=tuple(wanted.security_groups),
            extra_tags=dict(wanted.tags),
            user_data=user_data,
            client_token=request,
        )

    def prepare(self, annex: Annex) -> dict[str, str]:
        """Token and per-annex launch template; both idempotent, so redone after a crash."""
        parameter = self._store_token(annex)
        plan = self._plan(annex, 0, "", self._user_data(annex, parameter))
        template = fleet.ensure_annex_template(
            self._client("ec2", annex.region), plan, self.settings.launch_template
        )
        return {"template_id": template, "token_parameter": parameter}

    def launch(self, annex: Annex, count: int, request: str) -> LaunchOutcome:
        # The annex's own template (made by prepare) carries the user data; naming it saves the
        # launch-template calls and never launches without the boot script.
        plan = self._plan(annex, count, request, "")
        result = fleet.launch(
            self._client("ec2", annex.region),
            plan,
            self.settings.launch_template,
            annex_template_id=annex.template_id,
        )
        return LaunchOutcome(instance_ids=list(result.instance_ids), errors=list(result.errors))

    # --- changing and ending -------------------------------------------------------------

    def terminate(self, region: str, ids: list[str]) -> None:
        if ids:
            instances.terminate(self._client("ec2", region), ids)

    def set_expiry(self, annex: Annex, ids: list[str]) -> None:
        """An extended lease: new tag (the lease enforcer and the instances read it) and token."""
        ec2 = self._client("ec2", annex.region)
        with session.aws_errors(f"retag {len(ids)} instance(s) of annex {annex.name}"):
            ec2.create_tags(
                Resources=ids,
                Tags=[{"Key": names.TAG_EXPIRES, "Value": str(annex.lease_expiration)}],
            )
        if spec_from_record(annex.spec).mode == "pool":
            self._store_token(annex)
        log.info(
            "annex %s: lease now ends at %d on %d instance(s)",
            annex.key,
            annex.lease_expiration,
            len(ids),
        )

    def release(self, annex: Annex) -> None:
        ec2 = self._client("ec2", annex.region)
        fleet.delete_annex_template(ec2, self.settings.pool_id, annex.owner, annex.name)
        secrets.delete_token(self._client("ssm", annex.region), self._token_parameter(annex))
