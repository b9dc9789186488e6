"""The helper's knobs, read from HTCondor's own configuration (never a parallel config file).

Every knob starts with ANNEX_. Defaults here are the documented ones (docs/admin.md); the
shipped condor_config.d/10-annex-gahp.conf repeats them so `condor_config_val -v` shows them.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable

from annex_gahp import compat, durations
from annex_gahp.errors import SetupError

ParamLookup = Callable[[str], "str | None"]


@dataclasses.dataclass(frozen=True)
class Settings:
    endpoint_url: str  # "" means real AWS
    region: str  # "" means: AWS shared config, then us-west-1
    default_instance_types: tuple[str, ...]
    default_image_id: str
    default_lease: int  # seconds
    max_lease: int
    max_instances: int  # per annex
    max_instances_per_user: int
    idle_timeout: int
    state_dir: str
    log_file: str
    socket_path: str
    update_interval: int
    reconcile_interval: int
    pool_id: str  # the value of the htcondor-annex:pool tag
    central_manager: str  # what pool-mode instances report to by default
    uid_domain: str
    launch_template: str  # name or id, from `htcondor-annex setup`
    instance_profile: str
    security_group: str
    token_parameter_prefix: str  # SSM path prefix where instance tokens live
    allowed_instance_types: tuple[str, ...]
    allowed_image_ids: tuple[str, ...]
    allowed_regions: tuple[str, ...]
    reaper_grace: int
    token_key: str = "annex"  # noqa: S105 - the signing key's file name (ANNEX_TOKEN_KEY)
    token_key_dir: str = "/etc/condor/annex-token-key"  # noqa: S105 - condor's copy, a dir
    token_domain: str = "annex.invalid"  # noqa: S105 - the domain of annex identities
    provision_instance_profile: str = ""  # "": provision-mode instances get no profile
    # Where `resolve:ssm:` image references may point: AWS's public parameters only, so no
    # user makes the helper read the pool's own (its tokens live in Parameter Store too).
    image_parameter_prefixes: tuple[str, ...] = ("/aws/service/",)
    # ANNEX_CONDOR_INSTALL_COMMAND: run as root at first boot on an image without HTCondor
    # ("": the distribution's condor/htcondor package via apt-get).
    condor_install_command: str = ""
    # ANNEX_SCHEDDS: the schedds whose jobs the helper serves, by name; (): the local one.
    schedds: tuple[str, ...] = ()
    # Liveness (controllers/liveness.py): a pool-mode instance whose startd is not in the
    # collector this long after its launch (or after it was last seen) is terminated as a failed
    # launch; after this many such failures in a row the annex stops launching.
    join_timeout: int = 600
    max_join_failures: int = 3
    # Capacity health (issue 14): how long a capacity pool (type, zone, spot/on-demand) that
    # gave a capacity error or an interruption is skipped by launches.
    unavailable_offering_ttl: int = 180
    # Cost (issue 16; budgets.py, prices.py): budgets as written (`500 USD/30d`, "" = none),
    # the price file ("" = $(ANNEX_STATE_DIR)/prices.json) and how often spot prices are read.
    budget_per_user: str = ""
    budget_per_pool: str = ""
    price_file: str = ""
    price_refresh: int = 3600


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.replace(" ", ",").split(",") if item.strip())


def _duration(name: str, value: str) -> int:
    try:
        return durations.parse_duration(value, name)
    except ValueError as err:
        raise SetupError(str(err)) from None


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SetupError(f"{name} = {value!r} is not a whole number") from None


def load(lookup: ParamLookup | None = None) -> Settings:
    """Read the knobs. `lookup` defaults to compat.param (injectable for tests).

    A knob set to empty (`KNOB =`) is a knob not set: it takes its default, on every HTCondor
    version (the 24.0.9+ bindings cannot tell the two apart; compat.py). No knob with a
    non-empty default has a use for the empty value; the ones that may be empty default to it.
    """
    if lookup is None:
        lookup = compat.param

    def get(name: str, default: str = "") -> str:
        value = lookup(name)
        text = "" if value is None else str(value).strip()
        return text or default

    host = socket.getfqdn()
    state_dir = get("ANNEX_STATE_DIR", "/var/lib/condor/annex")
    collector = get("COLLECTOR_HOST", get("CONDOR_HOST", host))
    return Settings(
        endpoint_url=get("ANNEX_AWS_ENDPOINT_URL"),
        region=get("ANNEX_AWS_REGION"),
        default_instance_types=_list(get("ANNEX_DEFAULT_INSTANCE_TYPES", "m5.large")),
        default_image_id=get("ANNEX_DEFAULT_IMAGE_ID"),
        default_lease=_duration("ANNEX_DEFAULT_LEASE", get("ANNEX_DEFAULT_LEASE", "1h")),
        max_lease=_duration("ANNEX_MAX_LEASE", get("ANNEX_MAX_LEASE", "24h")),
        max_instances=_int("ANNEX_MAX_INSTANCES", get("ANNEX_MAX_INSTANCES", "50")),
        max_instances_per_user=_int(
            "ANNEX_MAX_INSTANCES_PER_USER", get("ANNEX_MAX_INSTANCES_PER_USER", "100")
        ),
        idle_timeout=_duration("ANNEX_IDLE_TIMEOUT", get("ANNEX_IDLE_TIMEOUT", "15m")),
        state_dir=state_dir,
        log_file=get("ANNEX_GAHP_LOG", "/var/log/condor/AnnexGahpLog"),
        socket_path=get("ANNEX_GAHP_SOCKET", "/var/run/condor/annex_gahp.sock"),
        update_interval=_duration("UPDATE_INTERVAL", get("UPDATE_INTERVAL", "300")),
        reconcile_interval=_duration(
            "ANNEX_RECONCILE_INTERVAL", get("ANNEX_RECONCILE_INTERVAL", "10")
        ),
        pool_id=get("ANNEX_POOL_ID", f"{collector}"),
        central_manager=get("ANNEX_CENTRAL_MANAGER", collector),
        uid_domain=get("UID_DOMAIN", host),
        launch_template=get("ANNEX_LAUNCH_TEMPLATE"),
        instance_profile=get("ANNEX_INSTANCE_PROFILE"),
        security_group=get("ANNEX_SECURITY_GROUP"),
        token_parameter_prefix=get("ANNEX_TOKEN_PARAMETER_PREFIX", "/htcondor-annex/tokens"),
        token_key=get("ANNEX_TOKEN_KEY", "annex"),
        token_key_dir=get("ANNEX_TOKEN_KEY_DIR", "/etc/condor/annex-token-key"),
        token_domain=get("ANNEX_TOKEN_DOMAIN", f"annex.{get('UID_DOMAIN', host)}"),
        provision_instance_profile=get("ANNEX_PROVISION_INSTANCE_PROFILE"),
        image_parameter_prefixes=_list(get("ANNEX_IMAGE_PARAMETER_PREFIXES", "/aws/service/")),
        allowed_instance_types=_list(get("ANNEX_ALLOWED_INSTANCE_TYPES")),
        allowed_image_ids=_list(get("ANNEX_ALLOWED_IMAGE_IDS")),
        allowed_regions=_list(get("ANNEX_ALLOWED_REGIONS")),
        condor_install_command=get("ANNEX_CONDOR_INSTALL_COMMAND"),
        reaper_grace=_duration("ANNEX_REAPER_GRACE", get("ANNEX_REAPER_GRACE", "10m")),
        schedds=_list(get("ANNEX_SCHEDDS")),
        **_liveness(get),
        unavailable_offering_ttl=_duration(
            "ANNEX_UNAVAILABLE_OFFERING_TTL", get("ANNEX_UNAVAILABLE_OFFERING_TTL", "3m")
        ),
        **_cost_knobs(get, state_dir),
    )


def _liveness(get: Callable[[str, str], str]) -> dict[str, int]:
    """ANNEX_JOIN_TIMEOUT and ANNEX_MAX_JOIN_FAILURES (0: never stop replacing)."""
    failures = _int("ANNEX_MAX_JOIN_FAILURES", get("ANNEX_MAX_JOIN_FAILURES", "3"))
    if failures < 0:
        raise SetupError(f"ANNEX_MAX_JOIN_FAILURES = {failures} is negative: give 0 or more")
    return {
        "join_timeout": _duration("ANNEX_JOIN_TIMEOUT", get("ANNEX_JOIN_TIMEOUT", "10m")),
        "max_join_failures": failures,
    }


def _cost_knobs(get: Callable[..., str], state_dir: str) -> dict[str, object]:
    """The cost knobs (issue 16), each checked here so a bad budget stops the start-up."""
    from annex_gahp import budgets, prices  # noqa: PLC0415 - stdlib-only modules of ours

    knobs = {
        "budget_per_user": get("ANNEX_BUDGET_PER_USER"),
        "budget_per_pool": get("ANNEX_BUDGET_PER_POOL"),
    }
    for knob, text in (
        ("ANNEX_BUDGET_PER_USER", knobs["budget_per_user"]),
        ("ANNEX_BUDGET_PER_POOL", knobs["budget_per_pool"]),
    ):
        try:
            budgets.parse(knob, text)
        except Exception as err:
            raise SetupError(str(err)) from None
    return {
        **knobs,
        "price_file": get("ANNEX_PRICE_FILE", prices.default_path(state_dir)),
        "price_refresh": _duration("ANNEX_PRICE_REFRESH", get("ANNEX_PRICE_REFRESH", "1h")),
    }


def resolve_region(job_region: str, settings: Settings) -> str:
    """The region an annex runs in: the job's, else ANNEX_AWS_REGION, else the helper's AWS
    config, else us-west-1 (the cloud's session knows the AWS config)."""
    from annex_gahp.cloud.aws.session import resolve_region as from_aws  # noqa: PLC0415 - boto3

    return from_aws(job_region, settings)
