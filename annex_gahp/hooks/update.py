"""ANNEX_HOOK_UPDATE_JOB_INFO: ask the helper for the job's Annex* status attributes.

Used only in routed-copy mode (docs/router.md; the shipped route edits jobs in place, where the
router never runs this hook). Input: the routed job ad. Output: `Name = value` lines the router
applies to the routed job (and, for attributes in ANNEX_ATTRS_TO_COPY, to the source job).

A helper that is down or refuses is reported on stderr with exit 0 and no output: on HTCondor
23.9 a non-zero exit stops the router from propagating the routed job's status to the source
job at all, so the job would look stuck. Input that is not an annex job ad: exit 1.
"""

from __future__ import annotations

import sys

from annex_gahp.hooks import _ad

PROG = "annex_hook_update"


def main() -> int:
    try:
        job = _ad.parse(_ad.read_stdin(), what="routed job ad")
        if _ad.other_route(job):
            return 0  # another route's job (the hook keyword is global): not ours
        _ad.check_job(job, "routed job ad")
    except _ad.AdError as exc:
        return _ad.fail(PROG, f"refused: {exc}")
    return _ad.print_updates(PROG, "JOB_UPDATE", job, "no status update this time")


if __name__ == "__main__":
    sys.exit(main())
