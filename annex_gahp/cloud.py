"""The reconcile loop's view of AWS: the `Cloud` operations, built from annex_gahp.aws.

This is the only module that turns an annex record into cloud calls, so the loop deals in
annexes and instance ids, and the aws package deals in API shapes. It is also where the two
strategies part (aws/fleet.py: EC2 Fleet; aws/stack.py: a CloudFormation stack of Auto Scaling
groups), so the loop's decisions stay the same for both.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from annex_gahp import names, pilotdata, tokens, userdata
from annex_gahp.aws import fleet, instances, secrets, session, stack
from annex_gahp.errors import CloudError, InputError, SetupError
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
        self, settings: Settings, *, mint: Callable[[str, int], str] | None = None
    ) -> None:
        self.settings = settings
        self._mint = mint or self._mint_with_project_key
        self._clients: dict[tuple[str, str], Any] = {}
        # instance id -> its Auto Scaling group, from the last observation: a group member
        # must leave with its group's capacity lowered, or the group replaces it.
        self._groups: dict[str, str] = {}
        self._region_groups: dict[str, dict[str, str]] = {}
        # (owner, annex) -> stack name, from the instances' htcondor-annex:stack tag: an annex
        # rebuilt from tags (lost state file) still gets its stack deleted when it retires.
        self._stacks: dict[tuple[str, str], str] = {}
        # (owner, annex) -> the token bucket name chosen for an annex whose record has none
        # yet (its random suffix; the record keeps it from prepare on, in token_parameter).
        self._new_buckets: dict[tuple[str, str], str] = {}
        # (region, token location) -> when the token this helper last stored there expires:
        # a launch attempt retried after a failure, or a re-tag with the same lease, does not
        # mint and store another while that one still outlives the lease. Kept in memory only:
        # after a restart the first attempt stores a fresh token, once.
        self._token_expires: dict[tuple[str, str], int] = {}
        # ... and that token, for the per-instance copies (_store_instance_tokens).
        self._tokens: dict[tuple[str, str], str] = {}
        # Instances given their own copy of their annex's token (by launch, set_expiry or, for
        # Auto Scaling members, observe).
        self._copied: set[str] = set()

    def _mint_with_project_key(self, identity: str, lifetime: int) -> str:
        return tokens.mint(
            identity, lifetime, self.settings.token_key, self.settings.token_key_dir
        )

    def _client(self, service: str, region: str) -> Any:
        key = (service, region)
        if key not in self._clients:
            self._clients[key] = session.client(service, self.settings, region)
        return self._clients[key]

    # --- observation ---------------------------------------------------------------------

    def observe(self, regions: Iterable[str]) -> list[Observed]:
        """This pool's live instances in `regions`. The reconcile loop asks one region at a
        time (a region that fails must not hide the others), so what each region showed is
        kept apart: observing one does not forget another's Auto Scaling group members."""
        seen: list[Observed] = []
        for region in regions:
            groups: dict[str, str] = {}
            for view in instances.describe_pool(self._client("ec2", region), self.settings.pool_id):
                if view.tags.get(stack.GROUP_TAG):
                    groups[view.id] = view.tags[stack.GROUP_TAG]
                if view.tags.get(stack.STACK_TAG):
                    self._stacks[(view.owner, view.annex)] = view.tags[stack.STACK_TAG]
                bucket = view.tags.get(stack.BUCKET_TAG, "")
                if bucket.startswith(stack.bucket_prefix(self.settings.central_manager)):
                    self._new_buckets.setdefault((view.owner, view.annex), bucket)
                seen.append(
                    Observed(
                        id=view.id,
                        state=view.state,
                        instance_type=view.instance_type,
                        region=region,
                        tags=view.tags,
                    )
                )
            self._region_groups[region] = groups
            self._copy_to_new_group_members(region, seen)
        self._groups = {i: g for each in self._region_groups.values() for i, g in each.items()}
        return seen

    def _copy_to_new_group_members(self, region: str, seen: list[Observed]) -> None:
        """Stack strategy: Auto Scaling launches the instances after the helper's call, so each
        gets its own copy of its annex's token when first seen (see _store_instance_tokens).
        A failure is logged and retried next cycle; the instance's agent waits for it."""
        fresh: dict[tuple[str, str], list[Observed]] = {}
        for item in seen:
            if (
                item.region == region
                and item.state in ("pending", "running")
                and item.tags.get(stack.GROUP_TAG)
                and item.id not in self._copied
            ):
                key = (item.tags.get(names.TAG_OWNER, ""), item.tags.get(names.TAG_NAME, ""))
                fresh.setdefault(key, []).append(item)
        for (owner, name), members in fresh.items():
            try:
                # The group's tag names the bucket (random since issue 12; checked in observe);
                # an annex of an older version has the name derived from the pool.
                bucket = self._new_buckets.get((owner, name)) or stack.bucket_name(
                    self.settings.central_manager, self.settings.pool_id, owner, name
                )
                location = stack.token_location(bucket)
                token = self._tokens.get((region, location))
                if token is None:  # e.g. after a restart: a fresh one, to the lease's end
                    expires = int(members[0].tags.get(names.TAG_EXPIRES, "0") or 0)
                    lifetime = max(60, expires - int(time.time())) + TOKEN_MARGIN
                    token = self._mint(
                        tokens.identity(name, owner, self.settings.token_domain), lifetime
                    )
                    self._tokens[(region, location)] = token
                self._put_copies(region, location, token, [m.id for m in members], members[0].tags)
            except (CloudError, SetupError, ValueError) as err:
                log.error("annex %s/%s: instance tokens not stored yet: %s", owner, name, err)

    # --- launching -----------------------------------------------------------------------

    def _tags(self, annex: Annex) -> dict[str, str]:
        return {
            names.TAG_NAME: annex.name,
            names.TAG_OWNER: annex.owner,
            names.TAG_POOL: self.settings.pool_id,
            names.TAG_EXPIRES: str(annex.lease_expiration),
        }

    @staticmethod
    def _is_stack(annex: Annex) -> bool:
        return spec_from_record(annex.spec).strategy == "stack"

    def _stack_name(self, annex: Annex) -> str:
        wanted = spec_from_record(annex.spec).stack_name
        return stack.stack_name(self.settings.pool_id, annex.owner, annex.name, wanted)

    def _bucket(self, annex: Annex) -> str:
        """The annex's token bucket: the one its record names, else a new random name."""
        if annex.token_parameter.startswith("s3://"):
            return stack.parse_location(annex.token_parameter)[0]
        key = (annex.owner, annex.name)
        if key not in self._new_buckets:
            self._new_buckets[key] = stack.new_bucket_name(
                self.settings.central_manager, annex.name
            )
        return self._new_buckets[key]

    def _account(self, region: str) -> str:
        return stack.account_id(self._client("sts", region))

    def _token_parameter(self, annex: Annex) -> str:
        return secrets.parameter_name(
            self.settings.token_parameter_prefix, self.settings.pool_id, annex.owner, annex.name
        )

    def _token_key(self, annex: Annex) -> tuple[str, str]:
        if self._is_stack(annex):
            return (annex.region, stack.token_location(self._bucket(annex)))
        return (annex.region, self._token_parameter(annex))

    def _store_token(self, annex: Annex) -> str:
        """Mint the annex's token and store it: SSM (fleet) or the annex's S3 bucket (stack),
        unless the one stored there last still outlives the lease (with TOKEN_MARGIN).
        Returns where: the parameter name, or `s3://bucket/key`."""
        key = self._token_key(annex)
        if self._token_expires.get(key, 0) >= annex.lease_expiration + TOKEN_MARGIN:
            return key[1]
        now = int(time.time())
        lifetime = max(60, annex.lease_expiration - now) + TOKEN_MARGIN
        # The annex's own identity: the collector takes from it only ads of this annex.
        who = tokens.identity(annex.name, annex.owner, self.settings.token_domain)
        token = self._mint(who, lifetime)
        if self._is_stack(annex):
            location = stack.put_token(
                self._client("s3", annex.region),
                self._bucket(annex),
                token,
                self._tags(annex),
                annex.region,
                account=self._account(annex.region),
            )
        else:
            location = self._token_parameter(annex)
            secrets.put_token(
                self._client("ssm", annex.region), location, token, self._tags(annex)
            )
        self._token_expires[key] = now + lifetime
        self._tokens[key] = token
        return location

    def _instance_arn(self, region: str, instance_id: str) -> str:
        partition = self._client("sts", region).meta.partition
        return f"arn:{partition}:ec2:{region}:{self._account(region)}:instance/{instance_id}"

    def _store_instance_tokens(self, annex: Annex, ids: list[str]) -> None:
        """One copy of the annex's token per instance, tagged with the instance's ARN: the
        instance role reads a token only when that tag is its own instance (docs/iam.md), so
        one instance's credentials never reach another annex's token."""
        if not ids or spec_from_record(annex.spec).mode != "pool":
            return
        location = self._store_token(annex)
        self._put_copies(
            annex.region, location, self._tokens[self._token_key(annex)], ids, self._tags(annex)
        )

    def _put_copies(
        self, region: str, location: str, token: str, ids: list[str], tags: dict[str, str]
    ) -> None:
        """`location` is the annex's parameter or `s3://bucket/token`; each copy is
        `<location>/<instance id>` (the agent asks for its own)."""
        mine = {k: v for k, v in tags.items() if k.startswith(names.TAG_PREFIX)}
        for instance_id in ids:
            tagged = mine | {secrets.INSTANCE_TAG: self._instance_arn(region, instance_id)}
            if location.startswith("s3://"):
                bucket, key = stack.parse_location(location)
                secrets.put_object_copy(
                    self._client("s3", region),
                    bucket,
                    secrets.instance_parameter(key, instance_id),
                    token,
                    tagged,
                    account=self._account(region),
                )
            else:
                secrets.put_token(
                    self._client("ssm", region),
                    secrets.instance_parameter(location, instance_id),
                    token,
                    tagged,
                )
            self._copied.add(instance_id)

    def _user_data(self, annex: Annex, location: str) -> bytes:
        """The boot script; `location` is the token's SSM parameter or `s3://bucket/key`."""
        bucket, key = stack.parse_location(location) if location.startswith("s3://") else ("", "")
        wanted = spec_from_record(annex.spec)
        if wanted.mode == "provision":
            return self._pilot_user_data(annex, wanted.user_data_template)
        return userdata.render_user_data(
            userdata.BootContext(
                annex=annex.name,
                owner=annex.owner,
                request_id=f"annex-{annex.id}",
                pool_id=self.settings.pool_id,
                central_manager=wanted.central_manager or self.settings.central_manager,
                token_parameter="" if bucket else location,
                token_bucket=bucket,
                token_key=key,
                region=annex.region,
                aws_endpoint_url=self.settings.endpoint_url,
                expires=annex.lease_expiration,
                owner_domain=self.settings.uid_domain,
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

    def prepare(self, annex: Annex) -> dict[str, str]:
        """Token and per-annex launch template (stack: token bucket; the stack itself is made
        by `launch`, under the launch's recorded intent); idempotent, so redone after a crash."""
        if (
            self._is_stack(annex)
            and annex.template_id == self._stack_name(annex)
            and annex.token_parameter == stack.token_location(self._bucket(annex))
        ):
            # Stored when the stack was first asked for, and again by every lease extension
            # (set_expiry): a grow, or a cycle waiting for a group's instances, does not mint
            # and upload it again.
            return {"template_id": annex.template_id, "token_parameter": annex.token_parameter}
        # Provision mode: nothing of this pool goes to the instances, so no token either.
        provision = spec_from_record(annex.spec).mode == "provision"
        parameter = "" if provision else self._store_token(annex)
        if self._is_stack(annex):
            return {"template_id": self._stack_name(annex), "token_parameter": parameter}
        plan = self._plan(annex, 0, "", self._user_data(annex, parameter))
        template = fleet.ensure_annex_template(
            self._client("ec2", annex.region), plan, self.settings.launch_template
        )
        return {"template_id": template, "token_parameter": parameter}

    def launch(self, annex: Annex, count: int, request: str) -> LaunchOutcome:
        if self._is_stack(annex):
            return self._launch_stack(annex, count, request)
        # The annex's own template (made by prepare) carries the user data; naming it saves the
        # launch-template calls and never launches without the boot script.
        plan = self._plan(annex, count, request, "")
        result = fleet.launch(
            self._client("ec2", annex.region),
            plan,
            self.settings.launch_template,
            annex_template_id=annex.template_id,
        )
        errors = list(result.errors)
        try:
            self._store_instance_tokens(annex, list(result.instance_ids))
        except CloudError as err:
            # The instances exist: report them. Their agents wait for a token, then give up;
            # the idle timeout ends them.
            log.error("annex %s: instance tokens not stored: %s", annex.key, err)
            errors.append(str(err))
        return LaunchOutcome(instance_ids=list(result.instance_ids), errors=errors)

    def _launch_stack(self, annex: Annex, count: int, request: str) -> LaunchOutcome:
        """Create the annex's stack, or raise its groups' capacity: the stack is asked for the
        annex's whole size (`annex.requested`), so asking again is no change, and `count` (what
        the loop does not see yet) only shows in the log. Instances the groups have not
        launched yet come later: the outcome is `accepted` even with no id."""
        bucket = self._bucket(annex)
        plan = dataclasses.replace(
            self._plan(annex, count, request, self._user_data(annex, stack.token_location(bucket))),
            token_bucket=bucket,
        )
        name = self._stack_name(annex)
        result = stack.ensure(
            self._client("cloudformation", annex.region),
            self._client("autoscaling", annex.region),
            plan,
            name=name,
            base=fleet.base_template_data(
                self._client("ec2", annex.region), self.settings.launch_template
            ),
            target=annex.requested,
            max_size=self.settings.max_instances,
        )
        log.info(
            "annex %s: stack %s %s for %d instance(s) (%d short); %d new instance id(s)",
            annex.key,
            name,
            "created" if result.created else ("grown" if result.changed else "unchanged"),
            annex.requested,
            count,
            len(result.instance_ids),
        )
        return LaunchOutcome(
            instance_ids=list(result.instance_ids), errors=list(result.errors), accepted=True
        )

    # --- changing and ending -------------------------------------------------------------

    def terminate(self, region: str, ids: list[str]) -> None:
        """Terminate instances; members of an Auto Scaling group leave with their group's
        desired capacity lowered (whoever asks: shrink, retire, reaper), never one by one
        behind the group's back, which would only make it launch replacements."""
        if not ids:
            return
        members = [i for i in ids if i in self._groups]
        rest = [i for i in ids if i not in self._groups]
        if members:
            rest += stack.retire_instances(self._client("autoscaling", region), members)
            for instance_id in members:
                self._groups.pop(instance_id, None)
        if rest:
            instances.terminate(self._client("ec2", region), rest)

    def set_expiry(self, annex: Annex, ids: list[str]) -> None:
        """An extended lease: new tag (the lease enforcer and the instances read it) and token."""
        ec2 = self._client("ec2", annex.region)
        with session.aws_errors(f"retag {len(ids)} instance(s) of annex {annex.name}"):
            ec2.create_tags(
                Resources=ids,
                Tags=[{"Key": names.TAG_EXPIRES, "Value": str(annex.lease_expiration)}],
            )
        if self._is_stack(annex):
            # Instances the groups launch later must carry the new lease too.
            view = stack.describe(
                self._client("cloudformation", annex.region),
                self._client("autoscaling", annex.region),
                self._stack_name(annex),
            )
            if view is not None and stack.owned_by(view, self.settings.pool_id, annex):
                stack.retag_groups(
                    self._client("autoscaling", annex.region),
                    [g.name for g in view.groups],
                    {
                        names.TAG_EXPIRES: str(annex.lease_expiration),
                        names.TAG_POOL: self.settings.pool_id,
                    },
                )
        if spec_from_record(annex.spec).mode == "pool":
            self._store_token(annex)
            self._store_instance_tokens(annex, ids)
        log.info(
            "annex %s: lease now ends at %d on %d instance(s)",
            annex.key,
            annex.lease_expiration,
            len(ids),
        )

    def release(self, annex: Annex) -> None:
        self._token_expires.pop(self._token_key(annex), None)  # deleted below with its bucket
        self._tokens.pop(self._token_key(annex), None)
        name = (
            self._stack_name(annex)
            if self._is_stack(annex)
            else self._stacks.get((annex.owner, annex.name), "")
        )
        if name:
            ours = {
                names.TAG_POOL: self.settings.pool_id,
                names.TAG_OWNER: annex.owner,
                names.TAG_NAME: annex.name,
            }
            status = stack.delete(self._client("cloudformation", annex.region), name, ours)
            if status:
                # Retried by the next cycle; the annex stays retiring until the stack is gone.
                raise CloudError(f"waiting for stack {name} to be deleted ({status})")
            if annex.token_parameter.startswith("s3://") or (
                (annex.owner, annex.name) in self._new_buckets
            ):
                stack.delete_bucket(
                    self._client("s3", annex.region),
                    self._bucket(annex),
                    self._account(annex.region),
                )
            self._new_buckets.pop((annex.owner, annex.name), None)
            self._stacks.pop((annex.owner, annex.name), None)
            if self._is_stack(annex):
                return
        ec2 = self._client("ec2", annex.region)
        fleet.delete_annex_template(ec2, self.settings.pool_id, annex.owner, annex.name)
        # The annex's token and every instance's copy: a retired annex leaves none to read.
        secrets.delete_tree(self._client("ssm", annex.region), self._token_parameter(annex))


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
