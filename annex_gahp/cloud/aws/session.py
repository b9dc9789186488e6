"""boto3 clients built from `Settings`: endpoint, region, retries, error mapping.

Every AWS client the helper uses comes from `client()` so that:
- the emulator endpoint (ANNEX_AWS_ENDPOINT_URL) is used everywhere or nowhere;
- a credentials file other users can read is refused before any call is made;
- calls are retried and rate-limited by botocore's adaptive retry mode, which slows this
  process's calls down client-side once AWS throttles them (a second limiter of our own, paced
  to EC2's documented rates, was removed in issue 13: the loop makes one describe per region
  per cycle and one launch per annex change, far below those rates);
- AWS failures surface as `CloudError` carrying AWS's error code and no secret.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import stat
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    WaiterError,
)

from annex_gahp.cloud.aws import capacity_faults
from annex_gahp.errors import CloudError, CredentialsError, SetupError
from annex_gahp.settings import Settings

log = logging.getLogger(__name__)

# botocore logs whole request bodies at DEBUG (an SSM PutParameter body holds the instance
# token): however verbose the helper's own log is, these stay at INFO or above.
QUIET_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer")


def quiet_sdk_logging() -> None:
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO or logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


DEFAULT_REGION = "us-west-1"

# botocore retries throttling and transient faults itself; "adaptive" adds its own client-side
# rate limiter that backs off further after a throttle: the only limiter the helper has.
RETRY_CONFIG = {"mode": "adaptive", "max_attempts": 6}


def resolve_region(job_region: str | None, settings: Settings) -> str:
    """The job's region, else ANNEX_AWS_REGION, else the helper account's AWS config, else
    us-west-1 (the contract's order)."""
    if job_region:
        return job_region
    if settings.region:
        return settings.region
    configured = botocore.session.get_session().get_config_variable("region")
    return configured or DEFAULT_REGION


# --- credentials file check -------------------------------------------------------------------


def _credentials_paths() -> list[str]:
    """Where boto3 would read shared credentials for this process: the env override, else
    ~/.aws/credentials by $HOME, and by the passwd entry (the helper may run with HOME unset or
    inherited from root after switching to the condor user)."""
    explicit = os.environ.get("AWS_SHARED_CREDENTIALS_FILE")
    if explicit:
        return [os.path.expanduser(explicit)]
    paths = [os.path.expanduser("~/.aws/credentials")]
    try:
        home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        home = ""
    if home:
        by_passwd = os.path.join(home, ".aws", "credentials")
        if by_passwd not in paths:
            paths.append(by_passwd)
    return paths


def check_credentials_file() -> None:
    """Refuse a shared credentials file readable by group or others: those keys can create
    instances billed to the pool's account."""
    for path in _credentials_paths():
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            continue
        except OSError as err:
            raise CredentialsError(f"cannot check AWS credentials file {path}: {err}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CredentialsError(
                f"AWS credentials file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
            )


# --- one copy of the SDK's data per process ----------------------------------------------------
#
# Every boto3 Session has a botocore session with a loader of its own, which parses and keeps
# the JSON files it reads: the endpoints table (~7 MB as Python objects) and the model of each
# service it makes a client for (EC2's: ~14 MB). Clients still get a fresh session each
# (credentials and AWS config are read as before), but all the sessions read through one
# botocore loader (botocore.loaders.create_loader, as botocore makes its own), so each file
# is parsed once per process. The models are botocore's, whole: a loader that cut EC2's model
# to the operations used was removed in issue 13 (docs/benchmarks.md has the RSS figures).

_LOADER: botocore.loaders.Loader | None = None
_LOADER_LOCK = threading.Lock()


def _new_session() -> boto3.session.Session:
    """A boto3 Session as `boto3.session.Session()` makes it, reading the shared loader."""
    global _LOADER  # noqa: PLW0603 - one per process, made on first use
    core = botocore.session.get_session()
    with _LOADER_LOCK:
        if _LOADER is None:
            # AWS_DATA_PATH, as botocore reads it for its own loader.
            _LOADER = botocore.loaders.create_loader(core.get_config_variable("data_path"))
    core.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=core)


# --- clients ----------------------------------------------------------------------------------


def client(
    service: str,
    settings: Settings,
    region: str | None = None,
    *,
    boto_session: boto3.session.Session | None = None,
) -> Any:
    """A boto3 client for `service` as the helper should use it."""
    check_credentials_file()
    quiet_sdk_logging()
    region = region or resolve_region(None, settings)
    session = boto_session or _new_session()
    kwargs: dict[str, Any] = {
        "region_name": region,
        "config": Config(retries=dict(RETRY_CONFIG), user_agent_extra="htcondor-annex-gahp"),
    }
    if settings.endpoint_url:
        kwargs["endpoint_url"] = settings.endpoint_url
    try:
        made = session.client(service, **kwargs)
    except BotoCoreError as err:
        raise cloud_error(err, f"create {service} client") from None
    if settings.endpoint_url and service == "ec2":
        # Emulator only: capacity errors a test asks for (never armed against real AWS).
        capacity_faults.arm(made, settings.state_dir)
    return made


# --- errors -----------------------------------------------------------------------------------

# Anything that looks like key material is cut from messages before they reach users or logs.
_SECRETISH = re.compile(r"\b(A[SK]IA[0-9A-Z]{12,})\b|\b[A-Za-z0-9/+=]{40}\b")


def scrub(text: str) -> str:
    return _SECRETISH.sub("<redacted>", text)


def error_code(err: BaseException) -> str:
    if isinstance(err, ClientError):
        return str(err.response.get("Error", {}).get("Code", "Unknown"))
    return type(err).__name__


def cloud_error(err: BaseException, action: str) -> CloudError | CredentialsError:
    """Map a boto failure to our error type, with AWS's code and no secret."""
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return CredentialsError(
            f"{action}: no usable AWS credentials for the helper (environment, "
            "~/.aws/credentials of its user, or an instance role)"
        )
    if isinstance(err, ClientError):
        code = error_code(err)
        message = scrub(str(err.response.get("Error", {}).get("Message", "")))
        result = CloudError(f"{action}: AWS error {code}: {message}".rstrip(": "))
    elif isinstance(err, EndpointConnectionError):
        result = CloudError(f"{action}: cannot reach AWS endpoint: {scrub(str(err))}")
    else:
        result = CloudError(f"{action}: {type(err).__name__}: {scrub(str(err))}")
    result.aws_code = error_code(err)  # type: ignore[attr-defined]
    return result


@contextlib.contextmanager
def aws_errors(action: str) -> Iterator[None]:
    """`with aws_errors("launch annex a1"):` turns boto failures into CloudError."""
    try:
        yield
    except (ClientError, BotoCoreError) as err:
        raise cloud_error(err, action) from None


def wait_for_stack(cfn: Any, waiter: str, stack_name: str) -> None:
    """Wait for a CloudFormation waiter (e.g. `stack_delete_complete`); SetupError with the
    stack's failure reasons if it fails."""
    try:
        cfn.get_waiter(waiter).wait(
            StackName=stack_name, WaiterConfig={"Delay": 5, "MaxAttempts": 360}
        )
    except WaiterError as err:
        reasons = (
            stack_failure_reasons(cfn, stack_name) or "see the stack's events in CloudFormation"
        )
        raise SetupError(
            f"stack {stack_name}: {waiter.replace('_', ' ')} failed "
            f"({err.kwargs.get('reason', '')}): {reasons}"
        ) from None


def stack_failure_reasons(cfn: Any, stack_name: str, limit: int = 5) -> str:
    """The reasons CloudFormation gave for a stack's failed resources, for an error message;
    empty when it gave none (or the stack's events cannot be read)."""
    try:
        events = cfn.describe_stack_events(StackName=stack_name)["StackEvents"]
    except ClientError:
        return ""
    failed = [
        f"{e.get('LogicalResourceId')}: {e['ResourceStatusReason']}"
        for e in events
        if e.get("ResourceStatus", "").endswith("FAILED") and e.get("ResourceStatusReason")
    ]
    return "; ".join(failed[:limit])
