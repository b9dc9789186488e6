"""`htcondor-annex`: the command line.

    htcondor-annex create --name N [--instances K] [--lease D | --expiry T] [--instance-types ...]
    htcondor-annex extend --name N (--lease D | --expiry T) [--instances K]
    htcondor-annex delete --name N
    htcondor-annex status [--name N] [--owner U] [--json]
    htcondor-annex submit --annex-name N [--instances K ...] job.sub [condor_submit args...]
    htcondor-annex install-config | setup | check-setup | teardown | render-submit-config
        (admin; annex_gahp.cli_admin)

Everything but the admin verbs talks to the helper over its socket (annex_gahp.client), so this
module imports only the standard library and stdlib-only modules of this package; boto3 is
loaded only when an admin verb runs. Errors print `htcondor-annex: <message>` and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from annex_gahp import client, durations, names

PROG = "htcondor-annex"
ADMIN_VERBS = (
    "install-config",
    "setup",
    "check-setup",
    "teardown",
    "render-submit-config",
    "image",
    "prices",  # (cli_prices.py; report is everyone's)
)
HELPER_TIMEOUT = 60.0

# Spec keywords offered as --options by create and submit (name and lease/expiry separately).
SPEC_HELP = {
    "instances": "instances wanted (default 1)",
    "instance_types": "comma list, e.g. m5.large,m5a.large",
    "image_ids": "comma list: one AMI for all types, or one per type",
    "spot_prices": "comma list of max prices; absent = on-demand",
    "idle_timeout": "retire after this long with no job to run (3600, 90m, 2h)",
    "region": "AWS region",
    "vpc": "VPC id",
    "subnets": "comma list of subnet ids (they pick the zones)",
    "keypair": "EC2 key pair for ssh",
    "security_groups": "comma list of security group ids",
    "mode": "pool (instances join this pool, default) or provision (bring your own pilot)",
    "central_manager": "pool mode: collector the instances report to",
    "user_data_file": "provision mode: the pilot's user data",
    "user_data_template": "provision mode: true renders the user data with jinja2 first",
    "tags": "key=value,key=value extra EC2 tags",
    "strategy": "fleet (EC2 Fleet, default) or stack (CloudFormation)",
    "stack_name": "stack strategy: the stack's name",
    "max_cost": "the most this annex may spend (e.g. 25): it retires when it gets there",
}
LEASE_HELP = "how long the annex lives: 3600, 90m, 2h"
EXPIRY_HELP = "absolute end: '2030-04-06 17:00' (UTC) or ISO 8601"


class UsageError(Exception):
    """A command line we refuse before asking anyone."""


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def _add_spec_options(parser: argparse.ArgumentParser, *, lease: bool = True) -> None:
    for key, text in SPEC_HELP.items():
        parser.add_argument(_option(key), dest=key, metavar=key.split("_")[-1].upper(), help=text)
    if lease:
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--lease", metavar="DURATION", help=LEASE_HELP)
        group.add_argument("--expiry", metavar="TIME", help=EXPIRY_HELP)


def _spec_args(args: argparse.Namespace) -> dict[str, str]:
    """The spec keywords the user gave, as the helper's key=value arguments."""
    out: dict[str, str] = {}
    for key in (*SPEC_HELP, "lease", "expiry"):
        value = getattr(args, key, None)
        if value is None:
            continue
        text = str(value).strip()
        if not text:
            raise UsageError(f"{_option(key)} needs a value")
        if "\n" in text or "\r" in text:
            raise UsageError(f"{_option(key)} must be one line")
        out[key] = text
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Cloud capacity for HTCondor jobs: annexes of EC2 instances.",
    )
    parser.add_argument(
        "--socket",
        default=None,
        metavar="PATH",
        help=f"the helper's socket (default ${names.SOCKET_ENV}, else {names.DEFAULT_SOCKET})",
    )
    # --socket is accepted after the verb too (argparse.SUPPRESS: the top level's stays).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", default=argparse.SUPPRESS, metavar="PATH", help="as above")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, **kw: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    p = verb("create", help="create an annex (or grow one you already have)")
    p.add_argument("--name", required=True, help="the annex's name")
    _add_spec_options(p)
    p.add_argument("--owner", help="act for this user (admins only)")
    p.set_defaults(func=cmd_create)

    p = verb("extend", help="lengthen an annex's lease or change its size")
    p.add_argument("--name", required=True)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--lease", metavar="DURATION", help="new lease, counted from now")
    group.add_argument("--expiry", metavar="TIME", help=EXPIRY_HELP)
    p.add_argument("--instances", metavar="K", help="new number of instances")
    p.add_argument("--owner", help="the annex's owner (admins only)")
    p.set_defaults(func=cmd_extend)

    p = verb("delete", help="retire an annex: its instances are terminated")
    p.add_argument("--name", required=True)
    p.add_argument("--owner", help="the annex's owner (admins only)")
    p.set_defaults(func=cmd_delete)

    p = verb("status", help="show your annexes (or one, with --name)")
    p.add_argument("--name", help="only this annex, with its instances")
    p.add_argument("--owner", help="another user's annexes (admins only)")
    p.add_argument("--json", action="store_true", help="print the helper's JSON")
    p.set_defaults(func=cmd_status)

    p = verb(
        "submit",
        help="condor_submit a job for an annex (the condor_submit -annex of this project)",
        description="Runs condor_submit FILE ARGS with -append 'annex_name = N' and one more "
        "-append per annex option given.",
    )
    p.add_argument("--annex-name", required=True, dest="name", help="the annex the jobs need")
    _add_spec_options(p)
    p.add_argument(
        "--dry-run", action="store_true", help="print the condor_submit command, run nothing"
    )
    p.add_argument("submit_file", metavar="FILE", help="the submit file")
    p.add_argument(
        "submit_args", nargs=argparse.REMAINDER, metavar="ARGS", help="more condor_submit args"
    )
    p.set_defaults(func=cmd_submit)

    p = verb("report", help="what annexes cost: yours (everyone's for admins)")
    p.add_argument("--since", default="30d", metavar="DURATION", help="how far back (30d)")
    p.add_argument("--by", default="annex", choices=("owner", "annex", "type", "lifecycle"))
    p.add_argument("--owner", help="only this user's annexes (admins)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the helper's JSON")
    fmt.add_argument("--csv", action="store_true", help="comma-separated, with a header line")
    p.set_defaults(func=cmd_report)
    return parser


def _add_admin_parsers(sub: argparse._SubParsersAction, load: bool) -> None:  # type: ignore[type-arg]
    """The admin verbs: the real parsers when one of them runs, light placeholders else."""
    if load:
        try:
            from annex_gahp import cli_admin  # noqa: PLC0415 - boto3: only for admin verbs
        except ImportError as exc:
            missing = getattr(exc, "name", None) or str(exc)
            for verb in ADMIN_VERBS:
                p = sub.add_parser(verb)
                p.set_defaults(func=_admin_missing(missing), lenient=True)
            return
        cli_admin.add_parsers(sub)
        return
    for verb, text in (
        ("install-config", "admin: install the shipped HTCondor config files (no AWS)"),
        ("setup", "admin: create or update the AWS setup for this pool"),
        ("check-setup", "admin: report what of the AWS setup is missing or drifted"),
        ("teardown", "admin: delete the AWS setup"),
        ("render-submit-config", "admin: print condor_config.d/20-annex-submit.conf"),
        ("image", "admin: images with HTCondor: image create (from a stock image), image list"),
        ("prices", "admin: the price file the helper bills with (update, set, show)"),
    ):
        sub.add_parser(verb, help=text, add_help=False)


def _admin_missing(missing: str):
    def run(_args: argparse.Namespace) -> int:
        return _error(
            f"the admin verbs are not available here ({missing} could not be imported); "
            "install htcondor-annex-gahp with its dependencies (boto3, jinja2)"
        )

    return run


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("no subparsers")


def _verb_of(argv: Sequence[str]) -> str | None:
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--socket":
            skip = True
            continue
        if not arg.startswith("-"):
            return arg
    return None


def _error(message: object) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 1


def _call(args: argparse.Namespace, command: str, **kwargs: str) -> dict[str, str]:
    path = args.socket or client.socket_path()
    return client.call(command, timeout=HELPER_TIMEOUT, path=path, **kwargs)


def _owner(args: argparse.Namespace) -> dict[str, str]:
    return {"owner": args.owner} if getattr(args, "owner", None) else {}


# -- verbs -----------------------------------------------------------------------------------


def _user_data(spec_args: dict[str, str]) -> dict[str, str]:
    """Provision mode: the user data file, read here with the caller's own rights (as the
    translate hook does for a job), sent as `user_data=`."""
    path = spec_args.get("user_data_file", "")
    if not path or spec_args.get("mode", "").strip().lower() != "provision":
        return {}
    from annex_gahp import pilotdata  # noqa: PLC0415

    path = os.path.abspath(path)
    spec_args["user_data_file"] = path
    try:
        return {"user_data": pilotdata.encode(pilotdata.read_file(path))}
    except pilotdata.UserDataError as exc:
        raise UsageError(str(exc)) from None


def cmd_create(args: argparse.Namespace) -> int:
    spec_args = _spec_args(args)
    extra = _user_data(spec_args)
    result = _call(args, "ANNEX_CREATE", name=args.name, **spec_args, **extra, **_owner(args))
    requested = result.get("requested") or result.get("request") or "?"
    print(
        f"annex {result.get('name', args.name)} (owner {result.get('owner', '?')}): "
        f"{result.get('state', '?')}, {requested} instance(s) requested"
    )
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    kwargs = {k: v for k, v in _spec_args(args).items() if k in ("lease", "expiry", "instances")}
    if not kwargs:
        raise UsageError("extend needs --lease, --expiry or --instances")
    result = _call(args, "ANNEX_EXTEND", name=args.name, **kwargs, **_owner(args))
    end = result.get("lease_expiration", "")
    when = _lease_left(int(end)) if end.isdigit() else "?"
    print(
        f"annex {result.get('name', args.name)}: {result.get('state', '?')}, "
        f"{result.get('requested', '?')} instance(s) requested, lease left {when}"
    )
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    result = _call(args, "ANNEX_DELETE", name=args.name, **_owner(args))
    print(f"annex {result.get('name', args.name)}: {result.get('state', '?')}")
    return 0


def _json_reply(args: argparse.Namespace, result: dict[str, str]) -> tuple[Any, int | None]:
    """The `json` field of the helper's answer, and the exit code when the command is done
    with it already: unreadable, or printed as it is for --json."""
    try:
        data = json.loads(result.get("json", "null"))
    except ValueError:
        return None, _error("the helper sent unreadable JSON")
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return data, 0
    return data, None


def cmd_status(args: argparse.Namespace) -> int:
    if args.name:
        result = _call(args, "ANNEX_STATUS", name=args.name, **_owner(args))
    else:
        result = _call(args, "ANNEX_LIST", **_owner(args))
    data, done = _json_reply(args, result)
    if done is not None:
        return done
    annexes = [data] if isinstance(data, dict) else list(data or [])
    if not annexes:
        print("no annexes")
        return 0
    print(format_table(annexes))
    if isinstance(data, dict):
        print(format_liveness(data))
        health = capacity_health_line(data)
        if health:
            print(health)
        for inst in data.get("instances") or []:
            print(
                f"  {inst.get('id', '?')}  {inst.get('state', '?')}  {inst.get('type', '') or ''}"
            )
    return 0


def format_liveness(annex: dict) -> str:
    """One annex's capacity health line: instances in a row that never joined the pool."""
    return f"join failures: {annex.get('JoinFailures', 0)} in a row"


def capacity_health_line(annex: dict) -> str:
    """Issue 14's spot numbers for one annex: interruption notices, replacements launched for
    them, and the capacity pools launches avoid now."""
    avoided = annex.get("AvoidedOfferings") or []
    if not (annex.get("Interruptions") or annex.get("Replacements") or avoided):
        return ""
    return (
        f"  interruptions {annex.get('Interruptions', 0)}, "
        f"replacements {annex.get('Replacements', 0)}, "
        f"avoiding {', '.join(str(a) for a in avoided) or 'nothing'}"
    )


def cmd_report(args: argparse.Namespace) -> int:
    """The cost history, from the helper's records (ANNEX_REPORT): through the helper like
    every other verb, so a user sees only their own annexes and nobody reads the state file."""
    kwargs = {"since": args.since, "by": args.by, **_owner(args)}
    result = _call(args, "ANNEX_REPORT", **kwargs)
    data, done = _json_reply(args, result)
    if done is not None:
        return done
    print(format_report(data, csv_out=args.csv))
    return 0


def format_report(data: dict, *, csv_out: bool = False) -> str:
    rows = [*data.get("rows", []), data.get("total", {})]
    by = str(data.get("by", "annex")).upper()
    header = (by, "INSTANCE-HOURS", "COST", "CURRENCY", "UNPRICED")
    table = [
        (
            str(r.get("key", "")),
            f"{float(r.get('instance_hours', 0)):.4f}",
            f"{float(r.get('cost', 0)):.6f}" if csv_out else _money(float(r.get("cost", 0))),
            str(r.get("currency", "")),
            "; ".join(r.get("unpriced") or []) or ("" if csv_out else "-"),
        )
        for r in rows
    ]
    if csv_out:
        import csv  # noqa: PLC0415
        import io  # noqa: PLC0415

        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([h.lower() for h in header])
        writer.writerows(table)
        return out.getvalue().rstrip("\n")
    since = time.strftime("%Y-%m-%d %H:%M", time.gmtime(int(data.get("since", 0))))
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(int(data.get("until", 0))))
    widths = [max(len(r[i]) for r in (header, *table)) for i in range(len(header))]
    lines = [f"cost from {since} to {until}, by {data.get('by')}"]
    for r in (header, *table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _money(amount: float) -> str:
    if amount and abs(amount) < 0.01:
        return f"{amount:.6f}".rstrip("0")
    return f"{amount:.2f}"


def _cost_cell(annex: dict) -> str:
    """COST column: so far (and per hour while instances run); "?" where a price is missing."""
    so_far, rate = annex.get("CostSoFar"), annex.get("CostPerHour")
    if so_far is None:
        return "?" if annex.get("CostUnpriced") else "-"
    text = f"{_money(float(so_far))} {annex.get('Currency') or ''}".strip()
    if rate:
        text += f" (+{_money(float(rate))}/h)"
    return text


COLUMNS = ("NAME", "OWNER", "STATE", "RUNNING/REQ", "LEASE LEFT", "COST", "LAST ERROR")


def _lease_left(expiration: object, now: float | None = None) -> str:
    if not isinstance(expiration, int) or isinstance(expiration, bool) or expiration <= 0:
        return "-"
    left = expiration - int(time.time() if now is None else now)
    return "expired" if left <= 0 else durations.format_duration(left)


def format_table(annexes: list[dict], now: float | None = None) -> str:
    rows = [COLUMNS]
    for a in annexes:
        rows.append(
            (
                str(a.get("AnnexName", "?")),
                str(a.get("Owner", "?")),
                str(a.get("AnnexState", "?")),
                f"{a.get('RunningInstances', 0)}/{a.get('RequestedInstances', 0)}",
                _lease_left(a.get("LeaseExpiration"), now),
                _cost_cell(a),
                " ".join(str(a.get("LastError") or "").split()) or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for r in rows:
        cells = [r[i].ljust(widths[i]) for i in range(len(widths))]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
    return "\n".join(lines)


def submit_command(args: argparse.Namespace, condor_submit: str = "condor_submit") -> list[str]:
    """The condor_submit command line for `htcondor-annex submit`."""
    keywords = {"name": args.name, **_spec_args(args)}
    for key, value in keywords.items():
        if "\n" in value or "\r" in value:
            raise UsageError(f"{_option(key)} must be one line")
    cmd = [condor_submit]
    for key, value in keywords.items():
        cmd += ["-append", f"annex_{key} = {value}"]
    rest = list(args.submit_args or [])
    if rest and rest[0] == "--":
        rest = rest[1:]
    return [*cmd, args.submit_file, *rest]


def cmd_submit(args: argparse.Namespace) -> int:
    cmd = submit_command(args)
    if args.dry_run:
        print(" ".join(_shell_quote(a) for a in cmd))
        return 0
    exe = shutil.which(cmd[0])
    if exe is None:
        return _error("condor_submit is not on PATH: is HTCondor installed here?")
    return subprocess.run([exe, *cmd[1:]], check=False).returncode


def _shell_quote(arg: str) -> str:
    import shlex  # noqa: PLC0415

    return shlex.quote(arg)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    _add_admin_parsers(_subparsers(parser), load=_verb_of(argv) in ADMIN_VERBS)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "lenient", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        return _error(exc)
    except client.ClientError as exc:
        return _error(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
