"""ANNEX_HOOK_JOB_CLEANUP: tell the helper the router is done with a job. Prints nothing.

Used only in routed-copy mode (docs/router.md): with EditJobInPlace the router runs this hook
right after the edit, while the job is still waiting, which would misinform the helper, so the
shipped config leaves it unset. Input: the routed job ad.

A helper that is down or refuses is reported on stderr with exit 0: a non-zero exit makes the
router retry every polling period and keep both jobs in the queue meanwhile, and the helper
learns what is left from its own schedd query anyway. Input that is not a job ad: exit 1.
"""

from __future__ import annotations

import sys

from annex_gahp import client
from annex_gahp.hooks import _ad

PROG = "annex_hook_cleanup"


def main() -> int:
    try:
        job = _ad.parse(_ad.read_stdin(), what="job ad")
        if _ad.other_route(job):
            return 0  # another route's job (the hook keyword is global): not ours
        _ad.check_job(job)
    except _ad.AdError as exc:
        return _ad.fail(PROG, f"refused: {exc}")
    try:
        _ad.ask("JOB_CLEANUP", job)
    except client.ClientError as exc:
        _ad.fail(PROG, f"helper not told: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
