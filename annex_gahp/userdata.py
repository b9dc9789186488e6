"""Render the pool-mode user data: one POSIX sh script with no secret inside.

The script writes a small stdlib-only python agent (templates/annex-agent.py) and its settings,
starts the lease watcher, and runs the agent's boot (IMDSv2 identity, token from SSM, HTCondor
config, start HTCondor). See docs/design.md, "Boot of a pool-mode instance".
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import re
import shlex
from importlib import resources

import jinja2
import jinja2.sandbox

from annex_gahp import names
from annex_gahp.errors import InputError

USER_DATA_LIMIT = 16384  # EC2's limit on raw user data, before base64
GZIP_MAGIC = b"\x1f\x8b"

# What may go into a ClassAd string literal and a condor config value unquoted: no quotes,
# backslashes, `$` (macro expansion), or line breaks.
_OWNER = re.compile(r"^[A-Za-z0-9._@+-]{1,128}$")
_PLAIN = re.compile(r"^[A-Za-z0-9._:@/+=\[\]-]*$")
# A collector address may be a sinful string: cm:9618?sock=collector, <1.2.3.4:9618?...>.
_ADDRESS = re.compile(r"^[A-Za-z0-9._:@/+=\[\]?&<>,-]*$")


@dataclasses.dataclass(frozen=True)
class BootContext:
    annex: str
    owner: str
    request_id: str
    pool_id: str
    central_manager: str  # host[:port] of the collector the instance reports to
    token_parameter: str  # SSM parameter name holding the annex's IDTOKEN ("" with a bucket)
    region: str
    aws_endpoint_url: str  # "" = the real regional endpoint
    expires: int  # epoch seconds; the fallback when the instance's expiry tag is unreadable
    ccb: bool = True  # reach the startd through the collector (no inbound ports on the VM)
    extra_config: str = ""  # admin-supplied config lines appended verbatim
    # The stack strategy keeps the token in S3 instead (as in 2016): bucket and object key.
    token_bucket: str = ""
    token_key: str = ""
    # The access point's UID_DOMAIN: the annex starts only jobs whose User is owner@this.
    owner_domain: str = ""
    # Some instance type of the annex has GPUs (EC2's GpuInfo): the startd discovers them, so
    # request_gpus jobs match.
    gpus: bool = False
    # ANNEX_CONDOR_INSTALL_COMMAND: how an image without HTCondor gets it at first boot ("":
    # the distribution's package through apt-get). Shell text, quoted as one argument.
    condor_install_command: str = ""

    def validate(self) -> None:
        if not re.match(names.NAME_PATTERN, self.annex):
            raise InputError(f"annex name {self.annex!r} is not allowed ({names.NAME_PATTERN})")
        if not _OWNER.match(self.owner):
            raise InputError(f"owner {self.owner!r} has characters a boot script cannot carry")
        fields = ("request_id", "pool_id", "central_manager", "token_parameter", "region")
        if not self.owner_domain or not _PLAIN.match(self.owner_domain):
            raise InputError(f"owner_domain {self.owner_domain!r} is not a UID_DOMAIN")
        for field in (*fields, "token_bucket", "token_key"):
            value = getattr(self, field)
            pattern = _ADDRESS if field in ("central_manager", "pool_id") else _PLAIN
            if not pattern.match(value):
                raise InputError(f"{field} {value!r} has characters a boot script cannot carry")
        if not self.central_manager:
            raise InputError("no central manager for the instances (annex_central_manager)")
        if not self.token_parameter and not (self.token_bucket and self.token_key):
            raise InputError("no token parameter name (ANNEX_TOKEN_PARAMETER_PREFIX)")
        if "\0" in self.condor_install_command or len(self.condor_install_command) > 4096:
            raise InputError("ANNEX_CONDOR_INSTALL_COMMAND has a NUL byte or is over 4096 bytes")
        if any(c in self.aws_endpoint_url for c in "'\"\n\\ "):
            raise InputError(f"endpoint {self.aws_endpoint_url!r} cannot go into a boot script")

    @property
    def condor_host(self) -> str:
        """The central manager's host alone (no port, no `?sock=`, no `<...>`): CONDOR_HOST
        feeds host-based ALLOW lists."""
        address = self.central_manager.strip().lstrip("<").rstrip(">").split("?", 1)[0]
        if address.startswith("["):  # [IPv6]:port
            return address[1:].split("]", 1)[0]
        host, sep, port = address.rpartition(":")
        if sep and port.isdigit() and host and ":" not in host:
            return host
        return address


def template_environment() -> jinja2.Environment:
    # Shell and condor config, not HTML: escaping would corrupt them; inputs are validated,
    # and the sandbox keeps a value from reaching Python objects through the template.
    env = jinja2.sandbox.SandboxedEnvironment(
        loader=jinja2.PackageLoader("annex_gahp", "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    # An admin's value in a shell script: one single-quoted word, whatever it holds.
    env.filters["shell_quote"] = shlex.quote
    return env


def agent_source() -> str:
    return resources.files("annex_gahp").joinpath("templates/annex-agent.py").read_text()


def render_condor_config(ctx: BootContext) -> str:
    ctx.validate()
    values = dataclasses.asdict(ctx) | {"condor_host": ctx.condor_host}
    return template_environment().get_template("annex-condor.conf.j2").render(**values)


def boot_settings(ctx: BootContext) -> dict[str, object]:
    """What the agent reads from boot.json (no secret)."""
    return {
        "annex": ctx.annex,
        "owner": ctx.owner,
        "request_id": ctx.request_id,
        "pool_id": ctx.pool_id,
        "central_manager": ctx.central_manager,
        "token_parameter": ctx.token_parameter,
        "token_bucket": ctx.token_bucket,
        "token_key": ctx.token_key,
        "region": ctx.region,
        "aws_endpoint_url": ctx.aws_endpoint_url,
        "expires": int(ctx.expires),
        "condor_config": render_condor_config(ctx),
    }


def render_bootstrap(ctx: BootContext) -> str:
    """The boot script as text."""
    ctx.validate()
    source = agent_source()
    if "\nANNEX_AGENT_EOF\n" in source:
        raise AssertionError("the agent source contains the here-document delimiter")
    return (
        template_environment()
        .get_template("bootstrap.sh.j2")
        .render(
            **dataclasses.asdict(ctx),
            agent_source=source.rstrip("\n"),
            # One line of JSON: it cannot contain the here-document's delimiter line.
            boot_json=json.dumps(boot_settings(ctx), sort_keys=True),
        )
    )


def render_user_data(ctx: BootContext) -> bytes:
    """The user data bytes: the script, gzipped when over EC2's 16 KB limit (cloud-init
    runs gzipped user data)."""
    return fit_user_data(render_bootstrap(ctx).encode())


def fit_user_data(script: bytes) -> bytes:
    """A script as user data: as it is within EC2's limit, else gzipped."""
    if len(script) <= USER_DATA_LIMIT:
        return script
    packed = gzip.compress(script, mtime=0)
    if len(packed) > USER_DATA_LIMIT:
        raise InputError(f"boot script is {len(packed)} bytes even gzipped (EC2 allows 16 KB)")
    return packed


def decode_user_data(data: bytes | str) -> str:
    """User data as EC2 returns it (base64 text) or raw bytes, gzipped or not -> script text.
    For emulated-instance booters that have no cloud-init."""
    raw = data.encode() if isinstance(data, str) else data
    if not raw.startswith(GZIP_MAGIC) and not raw.startswith(b"#!"):
        raw = base64.b64decode(raw)
    if raw.startswith(GZIP_MAGIC):
        raw = gzip.decompress(raw)
    return raw.decode()
