"""Where an annex's token waits for its instances: an SSM parameter or an S3 object. A backend
is given one (cloud/aws/backends.py) and stores through `AnnexTokens`, which mints, caches and
makes the per-instance copies the same way for both."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from annex_gahp import names
from annex_gahp.cloud.aws import secrets, stack
from annex_gahp.cloud.aws.context import TOKEN_MARGIN, AwsContext
from annex_gahp.store import Annex

log = logging.getLogger(__name__)


class TokenStore(Protocol):
    def location(self, annex: Annex) -> str:
        """Where the annex's token is (or will be): a parameter name or `s3://bucket/key`."""
        ...

    def put(self, annex: Annex, location: str, token: str) -> None: ...

    def put_copy(
        self, region: str, location: str, instance_id: str, token: str, tags: dict[str, str]
    ) -> None: ...

    def delete(self, annex: Annex) -> None: ...

    def boot_fields(self, location: str) -> dict[str, str]:
        """What the boot script needs to find the token (userdata.BootContext's fields)."""
        ...


class SsmTokens:
    """One SecureString parameter per annex, under the pool's prefix (secrets.py)."""

    def __init__(self, ctx: AwsContext) -> None:
        self.ctx = ctx

    def location(self, annex: Annex) -> str:
        cfg = self.ctx.settings
        return secrets.parameter_name(
            cfg.token_parameter_prefix, cfg.pool_id, annex.owner, annex.name
        )

    def put(self, annex: Annex, location: str, token: str) -> None:
        secrets.put_token(
            self.ctx.client("ssm", annex.region), location, token, self.ctx.tags(annex)
        )

    def put_copy(
        self, region: str, location: str, instance_id: str, token: str, tags: dict[str, str]
    ) -> None:
        secrets.put_token(
            self.ctx.client("ssm", region),
            secrets.instance_parameter(location, instance_id),
            token,
            tags,
        )

    def delete(self, annex: Annex) -> None:
        # The annex's token and every instance's copy: a retired annex leaves none to read.
        secrets.delete_tree(self.ctx.client("ssm", annex.region), self.location(annex))

    def boot_fields(self, location: str) -> dict[str, str]:
        return {"token_parameter": location}


class S3Tokens:
    """One bucket per annex with a random name (issue 12), so no other account can take it
    ahead of us; the name is kept in the annex's resources from prepare on."""

    def __init__(self, ctx: AwsContext) -> None:
        self.ctx = ctx
        # (owner, annex) -> the bucket chosen for, or seen tagged on, an annex whose record
        # names none yet (observe fills it from the instances' BUCKET_TAG).
        self.buckets: dict[tuple[str, str], str] = {}

    def bucket(self, annex: Annex) -> str:
        recorded = recorded_token(annex)
        if recorded.startswith("s3://"):
            return stack.parse_location(recorded)[0]
        key = (annex.owner, annex.name)
        if key not in self.buckets:
            self.buckets[key] = stack.new_bucket_name(self.ctx.settings.central_manager, annex.name)
        return self.buckets[key]

    def location(self, annex: Annex) -> str:
        return stack.token_location(self.bucket(annex))

    def put(self, annex: Annex, location: str, token: str) -> None:
        stack.put_token(
            self.ctx.client("s3", annex.region),
            stack.parse_location(location)[0],
            token,
            self.ctx.tags(annex),
            annex.region,
            account=self.ctx.account(annex.region),
        )

    def put_copy(
        self, region: str, location: str, instance_id: str, token: str, tags: dict[str, str]
    ) -> None:
        bucket, key = stack.parse_location(location)
        secrets.put_object_copy(
            self.ctx.client("s3", region),
            bucket,
            secrets.instance_parameter(key, instance_id),
            token,
            tags,
            account=self.ctx.account(region),
        )

    def knows(self, annex: Annex) -> bool:
        """A bucket was made or seen for this annex (else there is none to delete)."""
        return recorded_token(annex).startswith("s3://") or (
            (annex.owner, annex.name) in self.buckets
        )

    def delete(self, annex: Annex) -> None:
        stack.delete_bucket(
            self.ctx.client("s3", annex.region),
            self.bucket(annex),
            self.ctx.account(annex.region),
        )
        self.buckets.pop((annex.owner, annex.name), None)

    def boot_fields(self, location: str) -> dict[str, str]:
        bucket, key = stack.parse_location(location)
        return {"token_bucket": bucket, "token_key": key}


def recorded_token(annex: Annex) -> str:
    """Where prepare stored the annex's token, by the annex's resources (a state file of
    schema 2 or older named it `token_parameter`)."""
    res = annex.cloud_resources
    return res.get("token", "") or res.get("token_parameter", "")


class AnnexTokens:
    """Mint and store annex tokens in one TokenStore, and each instance's copy of them."""

    def __init__(self, ctx: AwsContext, store: TokenStore) -> None:
        self.ctx = ctx
        self.store = store
        # (region, token location) -> when the token this helper last stored there expires:
        # a launch attempt retried after a failure, or a re-tag with the same lease, does not
        # mint and store another while that one still outlives the lease. Kept in memory only:
        # after a restart the first attempt stores a fresh token, once.
        self._expires: dict[tuple[str, str], int] = {}
        # ... and that token, for the per-instance copies.
        self._tokens: dict[tuple[str, str], str] = {}
        # Instances given their own copy of their annex's token.
        self.copied: set[str] = set()

    def store_token(self, annex: Annex) -> str:
        """Mint the annex's token and store it, unless the one stored there last still
        outlives the lease (with TOKEN_MARGIN). Returns where."""
        location = self.store.location(annex)
        key = (annex.region, location)
        if self._expires.get(key, 0) >= annex.lease_expiration + TOKEN_MARGIN:
            return location
        now = int(time.time())
        lifetime = max(60, annex.lease_expiration - now) + TOKEN_MARGIN
        token = self.ctx.mint(self.ctx.identity(annex.owner, annex.name), lifetime)
        self.store.put(annex, location, token)
        self._expires[key] = now + lifetime
        self._tokens[key] = token
        return location

    def token_for(self, region: str, location: str, owner: str, annex: str, expires: int) -> str:
        """The token last stored at `location`, else (e.g. after a restart) a fresh one to
        `expires`, for copies to instances launched by someone else (an Auto Scaling group)."""
        key = (region, location)
        if key not in self._tokens:
            lifetime = max(60, expires - int(time.time())) + TOKEN_MARGIN
            self._tokens[key] = self.ctx.mint(self.ctx.identity(owner, annex), lifetime)
        return self._tokens[key]

    def copy_to_instances(self, annex: Annex, ids: list[str]) -> None:
        """One copy of the annex's token per instance, tagged with the instance's ARN: the
        instance role reads a token only when that tag is its own instance (docs/iam.md), so
        one instance's credentials never reach another annex's token."""
        if not ids:
            return
        location = self.store_token(annex)
        token = self._tokens[(annex.region, location)]
        self.put_copies(annex.region, location, token, ids, self.ctx.tags(annex))

    def put_copies(
        self, region: str, location: str, token: str, ids: list[str], tags: dict[str, str]
    ) -> None:
        """Each copy is `<location>/<instance id>` (the agent asks for its own)."""
        mine = {k: v for k, v in tags.items() if k.startswith(names.TAG_PREFIX)}
        for instance_id in ids:
            tagged = mine | {secrets.INSTANCE_TAG: self.ctx.instance_arn(region, instance_id)}
            self.store.put_copy(region, location, instance_id, token, tagged)
            self.copied.add(instance_id)

    def forget(self, annex: Annex) -> None:
        """The annex's token is about to be deleted with its store: a new annex of the same
        name stores its own."""
        key = (annex.region, self.store.location(annex))
        self._expires.pop(key, None)
        self._tokens.pop(key, None)
