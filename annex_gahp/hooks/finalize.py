"""ANNEX_HOOK_JOB_FINALIZE: tell the helper a routed job finished; print source-job updates.

Used only in routed-copy mode (docs/router.md). Input: the source job ad, a line `------`,
then the routed job ad (the one that ran). Output: `Name = value` lines applied to the source
job. The helper is sent the routed ad (it carries the final state and RoutedFromJobId).

A helper that is down or refuses is reported on stderr with exit 0 and no output: on HTCondor
23.9 a non-zero exit makes the router give the job up half-finalized, and the source job then
stays in the queue as completed forever. Input that is not what the router sends: exit 1.
"""

from __future__ import annotations

import sys

from annex_gahp.hooks import _ad

PROG = "annex_hook_finalize"


def main() -> int:
    try:
        parts = _ad.split_ads(_ad.read_stdin())
        if len(parts) != 2:
            raise _ad.AdError("expected the source ad, a '------' line, then the routed ad")
        source = _ad.parse(parts[0], what="source job ad")
        routed = _ad.parse(parts[1], what="routed job ad")
        if _ad.other_route(routed):
            return 0  # another route's job (the hook keyword is global): not ours
        _ad.check_job(source, "source job ad")
        _ad.check_job(routed, "routed job ad")
    except _ad.AdError as exc:
        return _ad.fail(PROG, f"refused: {exc}")
    return _ad.print_updates(PROG, "JOB_FINALIZE", routed, "source job not updated")


if __name__ == "__main__":
    sys.exit(main())
