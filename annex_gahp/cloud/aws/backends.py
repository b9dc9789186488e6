"""The strategies (`annex_strategy`), by name: the one place a strategy is chosen. A new one is
a module with a `Backend` (annex_gahp.cloud) and one line here, given its token store."""

from __future__ import annotations

from collections.abc import Callable

from annex_gahp.cloud import Backend
from annex_gahp.cloud.aws.context import AwsContext
from annex_gahp.cloud.aws.fleet_backend import FleetBackend
from annex_gahp.cloud.aws.stack_backend import StackBackend
from annex_gahp.cloud.aws.tokenstores import S3Tokens, SsmTokens

BACKENDS: dict[str, Callable[[AwsContext], Backend]] = {
    "fleet": lambda ctx: FleetBackend(ctx, SsmTokens(ctx)),
    "stack": lambda ctx: StackBackend(ctx, S3Tokens(ctx)),
}
# An annex whose spec names no strategy (a record from before strategies, or rebuilt from tags).
DEFAULT = "fleet"
