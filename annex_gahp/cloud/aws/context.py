"""What every AWS backend shares: the settings, one client per (service, region), the token
minter, and the pieces of a launch that do not depend on the strategy (tags, boot script,
launch plan). Backends get one `AwsContext`; they never make clients of their own."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from annex_gahp import names, pilotdata, tokens, userdata
from annex_gahp.cloud.aws import fleet, images, session, stack
from annex_gahp.errors import InputError
from annex_gahp.settings import Settings
from annex_gahp.store import Annex

log = logging.getLogger(__name__)

# The token outlives the lease a little, so an instance powering off on time never sees its
# startd refused first.
TOKEN_MARGIN = 900

ClientFactory = Callable[[str, str], Any]


class AwsContext:
    def __init__(
        self,
        settings: Settings,
        *,
        mint: Callable[[str, int], str] | None = None,
        make_client: ClientFactory | None = None,
        home_region: str = "",
    ) -> None:
        self.settings = settings
        # Where pool-wide resources are looked for (setup teardown): the admin's region.
        self.home_region = home_region or session.resolve_region(None, settings)
        self.mint = mint or self._mint_with_project_key
        self._make_client = make_client or (
            lambda service, region: session.client(service, settings, region)
        )
        self.clients: dict[tuple[str, str], Any] = {}
        self.catalog = images.Catalog(lambda region: self.client("ec2", region))

    def _mint_with_project_key(self, identity: str, lifetime: int) -> str:
        return tokens.mint(identity, lifetime, self.settings.token_key, self.settings.token_key_dir)

    def client(self, service: str, region: str) -> Any:
        key = (service, region)
        if key not in self.clients:
            self.clients[key] = self._make_client(service, region)
        return self.clients[key]

    def account(self, region: str) -> str:
        return stack.account_id(self.client("sts", region))

    def instance_arn(self, region: str, instance_id: str) -> str:
        partition = self.client("sts", region).meta.partition
        return f"arn:{partition}:ec2:{region}:{self.account(region)}:instance/{instance_id}"

    def identity(self, owner: str, annex: str) -> str:
        """The annex's own token identity: the collector takes from it only ads of this annex."""
        return tokens.identity(annex, owner, self.settings.token_domain)

    def tags(self, annex: Annex) -> dict[str, str]:
        return {
            names.TAG_NAME: annex.name,
            names.TAG_OWNER: annex.owner,
            names.TAG_POOL: self.settings.pool_id,
            names.TAG_EXPIRES: str(annex.lease_expiration),
        }

    def retag(self, annex: Annex, ids: list[str]) -> None:
        """An extended lease: the new end on the instances (the lease enforcer and the
        instances read it)."""
        ec2 = self.client("ec2", annex.region)
        with session.aws_errors(f"retag {len(ids)} instance(s) of annex {annex.name}"):
            ec2.create_tags(
                Resources=ids,
                Tags=[{"Key": names.TAG_EXPIRES, "Value": str(annex.lease_expiration)}],
            )
        log.info(
            "annex %s: lease now ends at %d on %d instance(s)",
            annex.key,
            annex.lease_expiration,
            len(ids),
        )

    def instance_types(self, annex: Annex) -> tuple[str, ...]:
        return tuple(annex.spec.instance_types) or tuple(
            self.settings.default_instance_types
        )

    def launch_images(self, annex: Annex) -> tuple[str, ...]:
        """The annex's images, one per instance type, as ami ids: what `prepare` resolved and
        recorded (`Resources["images"]`) if it did, so every launch of the annex uses the image
        its first one did; else resolved now (`resolve:ssm:` references) and paired with the
        types by architecture. Refused (InputError) when a type fits none of them."""
        recorded = annex.cloud_resources.get("images", "")
        if recorded:
            return tuple(recorded.split(","))
        given = tuple(annex.spec.image_ids)
        knob = "annex_image_ids" if given else "ANNEX_DEFAULT_IMAGE_ID"
        raw = given or ((self.settings.default_image_id,) if self.settings.default_image_id else ())
        if not raw:
            return ()  # the base launch template's image
        region = annex.region
        ssm = self.client("ssm", region)
        prefixes = self.settings.image_parameter_prefixes
        resolved = tuple(images.resolve(ssm, i, region, prefixes, knob) for i in raw)
        types = self.instance_types(annex)
        return images.pair(
            types,
            resolved,
            self.catalog.types(region, types),
            self.catalog.architectures(region, resolved),
            knob,
        )

    def user_data(self, annex: Annex, boot: dict[str, str]) -> bytes:
        """The boot script; `boot` says where the token is (TokenStore.boot_fields)."""
        wanted = annex.spec
        if wanted.mode == "provision":
            return self._pilot_user_data(annex, wanted.user_data_template)
        return userdata.render_user_data(
            userdata.BootContext(
                annex=annex.name,
                owner=annex.owner,
                request_id=f"annex-{annex.id}",
                pool_id=self.settings.pool_id,
                central_manager=wanted.central_manager or self.settings.central_manager,
                token_parameter=boot.get("token_parameter", ""),
                token_bucket=boot.get("token_bucket", ""),
                token_key=boot.get("token_key", ""),
                region=annex.region,
                aws_endpoint_url=self.settings.endpoint_url,
                expires=annex.lease_expiration,
                owner_domain=self.settings.uid_domain,
                # One boot script for every type of the annex; discovery finds nothing on a
                # type without GPUs, so any GPU type turns it on.
                gpus=self.catalog.has_gpus(annex.region, self.instance_types(annex)),
                condor_install_command=self.settings.condor_install_command,
            )
        )

    def _pilot_user_data(self, annex: Annex, template: bool) -> bytes:
        """Provision mode: the user's own user data, as the translate hook read it with the
        owner's rights (pilotdata.py), rendered with the annex's variables if asked."""
        data = pilotdata.load(self.settings.state_dir, annex.id)
        if data is None:
            raise InputError(
                f"annex {annex.name} has no user data: the job's translate hook did not send "
                "any (resubmit the job)"
            )
        if not template:
            return data
        try:
            return pilotdata.render(data, pilot_variables(annex))
        except pilotdata.UserDataError as exc:
            raise InputError(str(exc)) from None

    def plan(
        self,
        annex: Annex,
        count: int,
        request: str,
        user_data: bytes | str,
        image_ids: tuple[str, ...] | None = None,
    ) -> fleet.LaunchPlan:
        """`image_ids`: what launch_images gave; None: what `prepare` recorded, else the
        spec's (or the default) as written."""
        wanted = annex.spec
        recorded = annex.cloud_resources.get("images", "")
        if image_ids is None:
            image_ids = (
                tuple(recorded.split(","))
                if recorded
                else tuple(wanted.image_ids)
                or ((self.settings.default_image_id,) if self.settings.default_image_id else ())
            )
        return fleet.LaunchPlan(
            annex=annex.name,
            owner=annex.owner,
            request_id=request,
            pool_id=self.settings.pool_id,
            expires=annex.lease_expiration,
            count=count,
            instance_types=self.instance_types(annex),
            image_ids=image_ids,
            subnets=tuple(wanted.subnets),
            vpc=wanted.vpc,
            spot_prices=tuple(wanted.spot_prices),
            keypair=wanted.keypair,
            security_groups=tuple(wanted.security_groups),
            extra_tags=dict(wanted.tags),
            user_data=user_data,
            client_token=request,
            # Provision mode runs the user's own code: no role of this pool's, unless the admin
            # names one (ANNEX_PROVISION_INSTANCE_PROFILE).
            instance_profile=(
                self.settings.provision_instance_profile if wanted.mode == "provision" else None
            ),
        )


def pilot_variables(annex: Annex) -> dict[str, object]:
    """What a provision-mode user data template may use (annex_user_data_template = true).
    One rendering serves every instance of the annex: an instance's own index is EC2's
    ami-launch-index, which the script reads from the instance metadata service. Plain str
    and int only (pilotdata.variables): no object of ours is within a template's reach."""
    return pilotdata.variables(
        annex.name,
        annex.owner,
        f"annex-{annex.id}",
        annex.region,
        annex.requested,
        annex.lease_expiration,
    )
