"""Admin verbs of `htcondor-annex`: install-config, setup, check-setup, teardown,
render-submit-config, image create|list.

`annex_gahp/cli.py` calls `add_parsers(subparsers)`; each verb's parser carries
`func(args) -> int` (the exit status) via `set_defaults`. Runnable alone too:
`python3 -m annex_gahp.cli_admin setup --write-config`.

setup, check-setup and teardown need admin AWS credentials (IAM, CloudFormation, Lambda,
EventBridge); the helper's everyday identity gets only the runtime policy the setup creates
(docs/iam.md). install-config needs no AWS at all: it writes the pool's config files (root).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from annex_gahp import settings as settings_module
from annex_gahp.errors import AnnexError, SetupError
from annex_gahp.settings import Settings

# Same as annex_gahp.cloud.aws.setup.DEFAULT_CONFIG_PATH; repeated so that registering the verbs
# does not import boto3 for every other `htcondor-annex` verb.
DEFAULT_CONFIG_PATH = "/etc/condor/config.d/15-annex-setup.conf"
DEFAULT_CONFIG_DIR = "/etc/condor/config.d"
# `image create --write-config`: after setup's file, so its ANNEX_DEFAULT_IMAGE_ID wins.
DEFAULT_IMAGE_CONFIG_PATH = "/etc/condor/config.d/16-annex-image.conf"

# Replaceable in tests; reads HTCondor's own configuration otherwise.
load_settings: Callable[[], Settings] = settings_module.load


def _settings(args: argparse.Namespace) -> Settings:
    try:
        loaded = load_settings()
    except ImportError as err:
        # settings.load reads HTCondor's config through its Python bindings.
        raise SetupError(
            f"cannot read the HTCondor configuration ({err}): run this where HTCondor's "
            "Python bindings (htcondor2) are installed, e.g. the access point"
        ) from None
    if getattr(args, "region", None):
        loaded = dataclasses.replace(loaded, region=args.region)
    return loaded


def _fail(verb: str, err: AnnexError) -> int:
    print(f"htcondor-annex {verb}: ERROR: {err}", file=sys.stderr)
    return 1


def _token_key(cfg: Settings) -> str:
    import htcondor2  # noqa: PLC0415 - the pool's own password directory

    from annex_gahp import tokenkey  # noqa: PLC0415

    password_dir = htcondor2.param.get("SEC_PASSWORD_DIRECTORY") or ""
    return tokenkey.ensure(str(password_dir), cfg.token_key_dir, cfg.token_key)


def cmd_setup(args: argparse.Namespace) -> int:
    # The signing key is local (no AWS): alone with --token-key, and with --write-config, which
    # runs on the access point as root anyway.
    if args.token_key or args.write_config:
        try:
            print(f"# {_token_key(_settings(args))}", file=sys.stderr)
        except (AnnexError, OSError, KeyError) as err:
            return _fail("setup", SetupError(f"token signing key: {err}"))
        if args.token_key and not args.write_config:
            return 0

    from annex_gahp.cloud.aws import setup  # noqa: PLC0415 - boto3 only when needed

    try:
        knobs = setup.deploy(_settings(args), args.stack_name, vpc_id=args.vpc_id or "")
        if args.write_config:
            setup.write_config(knobs, args.write_config)
    except AnnexError as err:
        return _fail("setup", err)
    except OSError as err:
        print(
            f"htcondor-annex setup: ERROR: cannot write {args.write_config}: {err}", file=sys.stderr
        )
        return 1
    sys.stdout.write(setup.config_text(knobs))
    if args.write_config:
        print(
            f"# wrote {args.write_config}; run condor_reconfig so the helper sees it",
            file=sys.stderr,
        )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from annex_gahp.cloud.aws import setup  # noqa: PLC0415 - boto3 only when needed

    try:
        problems = setup.check(_settings(args), args.stack_name)
    except AnnexError as err:
        return _fail("check-setup", err)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if not problems:
        print("setup OK")
    return 1 if problems else 0


def cmd_teardown(args: argparse.Namespace) -> int:
    from annex_gahp.cloud.aws import setup  # noqa: PLC0415 - boto3 only when needed

    try:
        removed = setup.teardown(_settings(args), args.stack_name, force=args.force)
    except AnnexError as err:
        return _fail("teardown", err)
    for kind, items in removed.items():
        for item in items:
            print(f"removed {kind[:-1] if kind.endswith('s') else kind}: {item}")
    print("teardown done")
    return 0


def cmd_install_config(args: argparse.Namespace) -> int:
    from annex_gahp import install  # noqa: PLC0415 - only for this verb

    config_dir = Path(args.config_dir) if args.config_dir else install.default_config_dir()
    help_file = Path(args.help_file) if args.help_file else install.default_help_file()
    bin_dir = Path(args.bin_dir).absolute() if args.bin_dir else install.default_bin_dir()
    try:
        install.check_bin_dir(bin_dir)
        steps = install.plan(install.shipped(), config_dir, help_file, bin_dir)
        install.apply(steps, config_dir, force=args.force)
        linked = install.link(bin_dir, Path(args.link_dir), args.force) if args.link_dir else None
    except AnnexError as err:
        return _fail("install-config", err)
    except OSError as err:
        return _fail("install-config", SetupError(f"{err}: run it as root (or give --config-dir)"))
    said = {"new": "wrote", "ours": "updated", "changed": "overwrote", "unchanged": "unchanged"}
    for step in steps:
        print(f"{said[step.state]}: {step.target}")
    print(f"ANNEX_BIN_DIR = {bin_dir} (in {config_dir / install.BIN_DIR_FILE})")
    if linked:
        print(f"linked: {linked} -> {bin_dir / install.USER_PROGRAM}")
    elif not install.on_usual_path(bin_dir):
        print(
            f"# {install.USER_PROGRAM} is not on users' PATH yet. Link it (or rerun with "
            f"--link-dir /usr/local/bin):\n"
            f"#   ln -s {bin_dir / install.USER_PROGRAM} /usr/local/bin/{install.USER_PROGRAM}\n"
            f"# or add its directory for login shells (this also puts the venv's python there):\n"
            f"#   echo 'PATH=\"$PATH:{bin_dir}\"' > /etc/profile.d/htcondor-annex.sh"
        )
    print(
        "# next: condor_restart (DAEMON_LIST changed), then htcondor-annex setup --write-config",
        file=sys.stderr,
    )
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stack-name",
        default=None,
        help="the setup stack (default: htcondor-annex-<ANNEX_POOL_ID, sanitised>)",
    )
    parser.add_argument(
        "--region",
        default=None,
        help="AWS region (default: ANNEX_AWS_REGION, AWS config, us-west-1)",
    )


def add_parsers(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the admin verbs on the CLI's subparsers."""
    from annex_gahp import cli_prices  # noqa: PLC0415

    cli_prices.add_parsers(subparsers)
    p = subparsers.add_parser(
        "install-config",
        help="install the shipped HTCondor config files and help text (root, no AWS)",
        description="Copy the config files this package ships into the pool's config directory, "
        "set ANNEX_BIN_DIR to where the programs are, and install the submit help text. A file "
        "changed since this command wrote it is not overwritten without --force.",
    )
    p.add_argument(
        "--config-dir",
        metavar="DIR",
        help="the pool's config directory (default: the last of LOCAL_CONFIG_DIR, "
        f"else {DEFAULT_CONFIG_DIR})",
    )
    p.add_argument(
        "--bin-dir",
        metavar="DIR",
        help="where pip put the programs (default: this Python's scripts directory)",
    )
    p.add_argument(
        "--help-file",
        metavar="PATH",
        help="where the submit help text goes (default: $(ETC)/annex-submit-help.txt)",
    )
    p.add_argument(
        "--link-dir",
        metavar="DIR",
        help="also link htcondor-annex into DIR (e.g. /usr/local/bin) so users find it",
    )
    p.add_argument("--force", action="store_true", help="overwrite files the admin changed")
    p.set_defaults(func=cmd_install_config)

    p = subparsers.add_parser(
        "setup",
        help="create or update the AWS setup for this pool (admin credentials)",
        description="Deploy the one CloudFormation stack this pool needs and print the knobs "
        "the helper needs, as HTCondor config.",
    )
    _common(p)
    p.add_argument(
        "--write-config",
        nargs="?",
        const=DEFAULT_CONFIG_PATH,
        default=None,
        metavar="PATH",
        help=f"also write the knobs to PATH (default {DEFAULT_CONFIG_PATH})",
    )
    p.add_argument("--vpc-id", default=None, help="VPC for the security group (default VPC)")
    p.add_argument(
        "--token-key",
        action="store_true",
        help="only create the annex token signing key (ANNEX_TOKEN_KEY, root), no AWS calls",
    )
    p.set_defaults(func=cmd_setup)

    p = subparsers.add_parser(
        "check-setup",
        help="report what of the AWS setup is missing or drifted",
    )
    _common(p)
    p.set_defaults(func=cmd_check)

    p = subparsers.add_parser(
        "teardown",
        help="delete the AWS setup (refuses while annex instances exist)",
    )
    _common(p)
    p.add_argument(
        "--force", action="store_true", help="terminate the pool's annex instances first"
    )
    p.set_defaults(func=cmd_teardown)

    p = subparsers.add_parser(
        "render-submit-config",
        help="print condor_config.d/20-annex-submit.conf as annex_gahp/spec.py's rules make it",
    )
    p.add_argument("--output", help="write to this file instead of standard output")
    p.set_defaults(func=cmd_render_submit_config)

    _image_parsers(subparsers)


def _image_parsers(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    image = subparsers.add_parser(
        "image",
        help="images with HTCondor for pool mode: create one from a stock image, list them",
    )
    verbs = image.add_subparsers(dest="image_verb", required=True)
    p = verbs.add_parser(
        "create",
        help="bake an AMI with HTCondor from a stock image (admin credentials)",
        description="Launch one builder instance of SOURCE that installs HTCondor (the boot "
        "script's install step: the distribution's package, or ANNEX_CONDOR_INSTALL_COMMAND) "
        "and powers off; make an AMI of it tagged with this pool and the HTCondor version; "
        "terminate the builder; print the new image id. A failure terminates the builder too "
        "and says at which stage it stopped.",
    )
    p.add_argument(
        "--source-image",
        required=True,
        metavar="SOURCE",
        help="the stock image: an ami id or resolve:ssm:/aws/service/... (e.g. "
        "resolve:ssm:/aws/service/debian/release/13/latest/amd64)",
    )
    p.add_argument(
        "--instance-type",
        default=None,
        help="the builder's type (default: the first of ANNEX_DEFAULT_INSTANCE_TYPES); its "
        "architecture must fit the image",
    )
    p.add_argument("--name", default=None, help="the AMI's name (default: pool and time)")
    p.add_argument(
        "--timeout",
        default="20m",
        help="how long the install may take, and again the AMI (default 20m)",
    )
    p.add_argument(
        "--poll", type=float, default=5.0, help=argparse.SUPPRESS
    )  # seconds between looks; tests use less
    p.add_argument(
        "--write-config",
        nargs="?",
        const=DEFAULT_IMAGE_CONFIG_PATH,
        default=None,
        metavar="PATH",
        help=f"also write ANNEX_DEFAULT_IMAGE_ID to PATH (default {DEFAULT_IMAGE_CONFIG_PATH})",
    )
    p.add_argument("--region", default=None, help="AWS region (default: ANNEX_AWS_REGION, ...)")
    p.set_defaults(func=cmd_image_create)

    p = verbs.add_parser("list", help="the images `image create` made for this pool")
    p.add_argument("--region", default=None, help="AWS region (default: ANNEX_AWS_REGION, ...)")
    p.set_defaults(func=cmd_image_list)


def _image_name(pool_id: str) -> str:
    import re  # noqa: PLC0415
    import time  # noqa: PLC0415

    pool = re.sub(r"[^A-Za-z0-9.-]+", "-", pool_id).strip("-")[:60] or "pool"
    return f"htcondor-annex-{pool}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def cmd_image_create(args: argparse.Namespace) -> int:
    from annex_gahp import durations  # noqa: PLC0415
    from annex_gahp.cloud.aws import bake, images, session, setup  # noqa: PLC0415 - boto3

    try:
        cfg = _settings(args)
        timeout = durations.parse_duration(args.timeout, "--timeout")
        region = session.resolve_region(None, cfg)
        ec2 = session.client("ec2", cfg, region)
        source = images.resolve(
            session.client("ssm", cfg, region),
            args.source_image,
            region,
            cfg.image_parameter_prefixes,
            "--source-image",
        )
        instance_type = args.instance_type or cfg.default_instance_types[0]
        bake.check_fit(images.Catalog(lambda _region: ec2), region, source, instance_type)
        plan = bake.Plan(
            source_image=source,
            instance_type=instance_type,
            pool_id=cfg.pool_id,
            name=args.name or _image_name(cfg.pool_id),
            launch_template=cfg.launch_template,
            install_command=cfg.condor_install_command,
            timeout=float(timeout),
            poll=max(0.2, args.poll),
        )
        baked = bake.create(ec2, plan, say=lambda line: print(f"# {line}", file=sys.stderr))
    except ValueError as err:
        return _fail("image create", SetupError(str(err)))
    except AnnexError as err:
        return _fail("image create", err)
    print(baked.image_id)
    print(
        f"# HTCondor {baked.condor_version} in {baked.image_id}, made in {baked.seconds:.0f} s",
        file=sys.stderr,
    )
    if cfg.allowed_image_ids and baked.image_id not in cfg.allowed_image_ids:
        print(f"# add {baked.image_id} to ANNEX_ALLOWED_IMAGE_IDS to allow it", file=sys.stderr)
    if args.write_config:
        header = (
            f"# Written by `htcondor-annex image create` from {source}: HTCondor "
            f"{baked.condor_version}."
        )
        try:
            setup.write_config(
                {"ANNEX_DEFAULT_IMAGE_ID": baked.image_id}, args.write_config, header
            )
        except OSError as err:
            return _fail("image create", SetupError(f"cannot write {args.write_config}: {err}"))
        print(f"# wrote {args.write_config}; run condor_reconfig", file=sys.stderr)
    return 0


def cmd_image_list(args: argparse.Namespace) -> int:
    from annex_gahp.cloud.aws import bake, session  # noqa: PLC0415 - boto3 only when needed

    try:
        cfg = _settings(args)
        region = session.resolve_region(None, cfg)
        with session.aws_errors(f"list this pool's images in {region}"):
            rows = bake.pool_images(session.client("ec2", cfg, region), cfg.pool_id)
    except AnnexError as err:
        return _fail("image list", err)
    columns = ("image", "created", "state", "arch", "condor", "source", "name")
    table = [[r[c] for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in table:
        mark = "  (ANNEX_DEFAULT_IMAGE_ID)" if row[0] == cfg.default_image_id else ""
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() + mark)
    if not rows:
        print(f"# no images of pool {cfg.pool_id} in {region}: htcondor-annex image create",
              file=sys.stderr)
    return 0


def cmd_render_submit_config(args: argparse.Namespace) -> int:
    from annex_gahp import submitconfig  # noqa: PLC0415

    return submitconfig.write(args.output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="htcondor-annex")
    add_parsers(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
