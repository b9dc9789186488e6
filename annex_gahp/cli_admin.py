"""Admin verbs of `htcondor-annex`: setup, check-setup, teardown.

`annex_gahp/cli.py` calls `add_parsers(subparsers)`; each verb's parser carries
`func(args) -> int` (the exit status) via `set_defaults`. Runnable alone too:
`python3 -m annex_gahp.cli_admin setup --write-config`.

These need admin AWS credentials (IAM, CloudFormation, Lambda, EventBridge); the helper's
everyday identity gets only the runtime policy the setup creates (docs/iam.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

from annex_gahp import settings as settings_module
from annex_gahp.errors import AnnexError, SetupError
from annex_gahp.settings import Settings

# Same as annex_gahp.cloud.aws.setup.DEFAULT_CONFIG_PATH; repeated so that registering the verbs
# does not import boto3 for every other `htcondor-annex` verb.
DEFAULT_CONFIG_PATH = "/etc/condor/config.d/15-annex-setup.conf"

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
    """Register `setup`, `check-setup` and `teardown` on the CLI's subparsers."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="htcondor-annex")
    add_parsers(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
