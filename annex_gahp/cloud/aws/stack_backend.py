"""The `stack` strategy: one CloudFormation stack of Auto Scaling groups per annex, sized to the
annex's target (stack.py has the API shapes). Its tokens live in a bucket of the annex's own."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from botocore.exceptions import ClientError

from annex_gahp import names
from annex_gahp.cloud import LaunchOutcome, Observed, Resources
from annex_gahp.cloud.aws import fleet, session, stack
from annex_gahp.cloud.aws.context import AwsContext
from annex_gahp.cloud.aws.session import aws_errors
from annex_gahp.cloud.aws.tokenstores import AnnexTokens, S3Tokens, recorded_token
from annex_gahp.errors import CloudError, SetupError
from annex_gahp.offerings import Mark
from annex_gahp.store import Annex

log = logging.getLogger(__name__)


class StackBackend:
    def __init__(self, ctx: AwsContext, tokens: S3Tokens) -> None:
        self.ctx = ctx
        self.buckets = tokens
        self.tokens = AnnexTokens(ctx, tokens)
        # instance id -> its Auto Scaling group, from the last observation: a group member
        # must leave with its group's capacity lowered, or the group replaces it. Kept per
        # region: observing one region does not forget another's members.
        self._region_groups: dict[str, dict[str, str]] = {}
        self._groups: dict[str, str] = {}
        # (owner, annex) -> stack name, from the instances' htcondor-annex:stack tag: an annex
        # rebuilt from tags (lost state file) still gets its stack deleted when it retires.
        self._stacks: dict[tuple[str, str], str] = {}

    def _stack_name(self, annex: Annex) -> str:
        wanted = annex.spec.stack_name
        return stack.stack_name(self.ctx.settings.pool_id, annex.owner, annex.name, wanted)

    # --- observation -------------------------------------------------------------------------

    def observed(self, region: str, seen: list[Observed]) -> None:
        groups: dict[str, str] = {}
        prefix = stack.bucket_prefix(self.ctx.settings.central_manager)
        for item in seen:
            owner, name = item.key
            if item.tags.get(stack.GROUP_TAG):
                groups[item.id] = item.tags[stack.GROUP_TAG]
            if item.tags.get(stack.STACK_TAG):
                self._stacks[(owner, name)] = item.tags[stack.STACK_TAG]
            bucket = item.tags.get(stack.BUCKET_TAG, "")
            if bucket.startswith(prefix):
                self.buckets.buckets.setdefault((owner, name), bucket)
        self._region_groups[region] = groups
        self._groups = {i: g for each in self._region_groups.values() for i, g in each.items()}
        self._copy_to_new_group_members(region, seen)

    def _copy_to_new_group_members(self, region: str, seen: list[Observed]) -> None:
        """Auto Scaling launches the instances after the helper's call, so each gets its own
        copy of its annex's token when first seen. A failure is logged and retried next
        cycle; the instance's agent waits for it."""
        fresh: dict[tuple[str, str], list[Observed]] = {}
        for item in seen:
            if (
                item.state in ("pending", "running")
                and item.tags.get(stack.GROUP_TAG)
                and item.id not in self.tokens.copied
            ):
                fresh.setdefault(item.key, []).append(item)
        cfg = self.ctx.settings
        for (owner, name), members in fresh.items():
            try:
                # The group's tag names the bucket (random since issue 12; checked in
                # observed); an annex of an older version has the name derived from the pool.
                bucket = self.buckets.buckets.get((owner, name)) or stack.bucket_name(
                    cfg.central_manager, cfg.pool_id, owner, name
                )
                location = stack.token_location(bucket)
                token = self.tokens.token_for(region, location, owner, name, members[0].expires)
                self.tokens.put_copies(
                    region, location, token, [m.id for m in members], members[0].tags
                )
            except (CloudError, SetupError, ValueError) as err:
                log.error("annex %s/%s: instance tokens not stored yet: %s", owner, name, err)

    # --- launching ---------------------------------------------------------------------------

    def prepare(self, annex: Annex) -> Resources:
        """The token in the annex's bucket; the stack itself is made by `ensure`, under the
        launch's recorded intent. Idempotent, so redone after a crash."""
        name = self._stack_name(annex)
        made = annex.cloud_resources
        # Resolved (or read back) and checked first: a refusal leaves nothing behind.
        images = ",".join(self.ctx.launch_images(annex))
        if (made.get("stack") or made.get("template_id")) == name and recorded_token(
            annex
        ) == self.buckets.location(annex):
            # Stored when the stack was first asked for, and again by every lease extension:
            # a grow, or a cycle waiting for a group's instances, does not mint and upload it
            # again.
            return {"stack": name, "token": recorded_token(annex), "images": images}
        # Provision mode: nothing of this pool goes to the instances, so no token either.
        provision = annex.spec.mode == "provision"
        location = "" if provision else self.tokens.store_token(annex)
        return {"stack": name, "token": location, "images": images}

    def ensure(
        self, annex: Annex, target: int, have: int, request: str, avoid: Sequence[Mark] = ()
    ) -> LaunchOutcome:
        """Create the annex's stack, or set its groups' capacity: the stack is asked for the
        whole `target`, so asking again is no change. Instances the groups have not launched
        yet come later: no id and no error is not a failure. `avoid` is not applied: Auto
        Scaling groups choose and fall over between their own types and zones."""
        region = annex.region
        location = self.buckets.location(annex)
        plan = dataclasses.replace(
            self.ctx.plan(
                annex,
                target - have,
                request,
                self.ctx.user_data(annex, self.buckets.boot_fields(location)),
            ),
            token_bucket=self.buckets.bucket(annex),
        )
        name = self._stack_name(annex)
        result = stack.ensure(
            self.ctx.client("cloudformation", region),
            self.ctx.client("autoscaling", region),
            plan,
            name=name,
            base=fleet.base_template_data(
                self.ctx.client("ec2", region), self.ctx.settings.launch_template
            ),
            target=target,
            max_size=self.ctx.settings.max_instances,
        )
        log.info(
            "annex %s: stack %s %s for %d instance(s) (%d short); %d new instance id(s)",
            annex.key,
            name,
            "created" if result.created else ("grown" if result.changed else "unchanged"),
            target,
            target - have,
            len(result.instance_ids),
        )
        return LaunchOutcome(instance_ids=list(result.instance_ids), errors=list(result.errors))

    # --- changing and ending -----------------------------------------------------------------

    def remove(self, region: str, ids: list[str]) -> list[str]:
        """Group members leave with their group's desired capacity lowered (whoever asks:
        shrink, retire, reaper), never one by one behind the group's back, which would only
        make it launch replacements. The rest are given back."""
        members = [i for i in ids if i in self._groups]
        rest = [i for i in ids if i not in self._groups]
        if members:
            rest += stack.retire_instances(self.ctx.client("autoscaling", region), members)
            for instance_id in members:
                self._groups.pop(instance_id, None)
                for groups in self._region_groups.values():
                    groups.pop(instance_id, None)
        return rest

    def extend(self, annex: Annex, ids: list[str]) -> None:
        self.ctx.retag(annex, ids)
        # Instances the groups launch later must carry the new lease too.
        view = stack.describe(
            self.ctx.client("cloudformation", annex.region),
            self.ctx.client("autoscaling", annex.region),
            self._stack_name(annex),
        )
        if view is not None and stack.owned_by(view, self.ctx.settings.pool_id, annex):
            stack.retag_groups(
                self.ctx.client("autoscaling", annex.region),
                [g.name for g in view.groups],
                {
                    names.TAG_EXPIRES: str(annex.lease_expiration),
                    names.TAG_POOL: self.ctx.settings.pool_id,
                },
            )
        if annex.spec.mode == "pool":
            self.tokens.store_token(annex)
            self.tokens.copy_to_instances(annex, ids)

    def release(self, annex: Annex) -> None:
        self.tokens.forget(annex)  # deleted below with its bucket
        self._delete(annex, self._stack_name(annex))

    def release_leftovers(self, annex: Annex) -> None:
        name = self._stacks.get((annex.owner, annex.name), "")
        if name:
            self._delete(annex, name)

    def _delete(self, annex: Annex, name: str) -> None:
        ours = {
            names.TAG_POOL: self.ctx.settings.pool_id,
            names.TAG_OWNER: annex.owner,
            names.TAG_NAME: annex.name,
        }
        status = stack.delete(self.ctx.client("cloudformation", annex.region), name, ours)
        if status:
            # Retried by the next cycle; the annex stays retiring until the stack is gone.
            raise CloudError(f"waiting for stack {name} to be deleted ({status})")
        if self.buckets.knows(annex):
            self.buckets.delete(annex)
        self._stacks.pop((annex.owner, annex.name), None)

    # --- teardown ----------------------------------------------------------------------------

    def purge(self, *, dry_run: bool = False) -> dict[str, list[str]]:
        """The pool's annex stacks (deleting one takes its groups' instances; terminating them
        one by one would only make the groups launch replacements), then its token buckets.
        With `dry_run`, the annexes (owner/name) whose stacks exist."""
        region = self.ctx.home_region
        cfn = self.ctx.client("cloudformation", region)
        found = annex_stacks(cfn, self.ctx.settings.pool_id)
        if dry_run:
            return {"annex_stacks": sorted(set(found.values()))} if found else {}
        removed: dict[str, list[str]] = {}
        if found:
            for name in found:
                with aws_errors(f"delete annex stack {name}"):
                    cfn.delete_stack(StackName=name)
            for name in found:
                session.wait_for_stack(cfn, "stack_delete_complete", name)
            removed["annex_stacks"] = sorted(found)
        removed["buckets"] = self._delete_token_buckets(self.ctx.client("s3", region))
        return removed

    def _delete_token_buckets(self, s3: Any) -> list[str]:
        """This pool's token buckets (by name, then by pool tag)."""
        cfg = self.ctx.settings
        prefix = stack.bucket_prefix(cfg.central_manager)
        gone = []
        with aws_errors("list the pool's token buckets"):
            candidates = [
                b["Name"]
                for b in s3.list_buckets().get("Buckets", [])
                if b["Name"].startswith(prefix)
            ]
        for bucket in candidates:
            try:
                tags = {
                    t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket=bucket)["TagSet"]
                }
            except ClientError:
                continue  # untagged or not ours to read: not provably this pool's
            if tags.get(names.TAG_POOL) == cfg.pool_id and stack.delete_bucket(s3, bucket):
                gone.append(bucket)
        return gone


def annex_stacks(cfn: Any, pool_id: str) -> dict[str, str]:
    """The stack strategy's stacks of this pool: name -> owner/annex. The setup stack carries
    the pool tag but no annex name."""
    found: dict[str, str] = {}
    with aws_errors("list the pool's annex stacks"):
        for page in cfn.get_paginator("describe_stacks").paginate():
            for item in page.get("Stacks", []):
                tags = {t["Key"]: t["Value"] for t in item.get("Tags", [])}
                if (
                    tags.get(names.TAG_POOL) == pool_id
                    and names.TAG_NAME in tags
                    and item["StackStatus"] != "DELETE_COMPLETE"
                ):
                    found[item["StackName"]] = (
                        f"{tags.get(names.TAG_OWNER, '?')}/{tags[names.TAG_NAME]}"
                    )
    return found
