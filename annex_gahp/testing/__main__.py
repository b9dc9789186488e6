"""`python -m annex_gahp.testing up|down|status|shell|run ...`: the packaged sandbox script
(scripts/sandbox in a checkout) for an installed package, e.g. to start a pool that several
pytest runs or pytest-xdist workers then reuse with --annex-pool-dir (docs/testing.md)."""

import subprocess
import sys

from annex_gahp.testing.pool import SCRIPT

if __name__ == "__main__":
    sys.exit(subprocess.run(["bash", str(SCRIPT), *sys.argv[1:]], check=False).returncode)
