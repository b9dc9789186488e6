"""ANNEX_HOOK_TRANSLATE_JOB: tell the helper a job wants its annex; print the job ad back.

Input (HTCondor 23.9, docs/router.md): the route as one new-syntax ClassAd line
(`[ Name = "Annex"; TargetUniverse = 5 ]`), a line `------`, then the job ad as
`Name = value` lines. Output: the WHOLE job ad with the helper's attributes set, because the
router replaces the job with what we print (with EditJobInPlace, every attribute we leave out
is deleted from the job; with a routed copy, a partial ad makes the router daemon abort).

A job of another route (JOB_ROUTER_HOOK_KEYWORD is global) is printed back unchanged, without
asking anyone: the router then applies that route's own SET/EVALSET as usual.

For our route, exit 0 only after the helper answered. Anything else (bad input, helper down
or refusing) is one line on stderr and exit 1: the router leaves the job untouched and tries
again later.
"""

from __future__ import annotations

import sys

from annex_gahp import client
from annex_gahp.hooks import _ad

PROG = "annex_hook_translate"


def translate(text: str) -> str:
    """Route ad + `------` + job ad -> the job ad to print. Raises AdError, ClientError."""
    parts = _ad.split_ads(text)
    if len(parts) != 2:
        raise _ad.AdError("expected the route ad, a '------' line, then the job ad")
    route = parts[0].strip()
    name = _ad.route_name(route) if "\n" not in route else None
    if name is None:
        raise _ad.AdError("the first line is not the route ad '[ Name = ... ]'")
    if name.lower() != _ad.ROUTE_NAME.lower():
        # Another route's job (the hook keyword is global): hand it back exactly as given.
        return parts[1] if parts[1].endswith("\n") else parts[1] + "\n"
    job = _ad.parse(parts[1], what="job ad")
    _ad.check_job(job)
    updates = _ad.updates_from(_ad.ask("JOB_ROUTED", job, **_ad.user_data_args(job)))
    for name, expr in updates.items():
        job.set(name, expr)
    return job.text()


def main() -> int:
    try:
        out = translate(_ad.read_stdin())
    except _ad.AdError as exc:
        return _ad.fail(PROG, f"refused: {exc}")
    except client.ClientError as exc:
        return _ad.fail(PROG, exc)
    sys.stdout.write(out)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
