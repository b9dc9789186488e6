"""docs/design.md's state tables are lifecycle.py's, row for row, and the modules its path of a
job names exist: the map cannot drift from the code without this failing."""

from __future__ import annotations

import re
from pathlib import Path

from annex_gahp import lifecycle

ROOT = Path(__file__).resolve().parents[2]
DESIGN = (ROOT / "docs" / "design.md").read_text()


def _rows(marker: str) -> list[tuple[str, str, str]]:
    block = DESIGN.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]
    rows = []
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("from", "---"):
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def test_the_annex_table_is_lifecycles():
    code = [(s, e.value, t) for (s, e), t in lifecycle.TRANSITIONS.items()]
    assert _rows("annex-transitions") == code


def test_the_instance_table_is_lifecycles():
    code = [(s, e.value, t) for (s, e), t in lifecycle.INSTANCE_EVENTS.items()]
    assert _rows("instance-events") == code


def test_the_path_of_a_job_names_modules_that_exist_in_at_most_8_stops():
    section = DESIGN.split("## The path of a job", 1)[1].split("\n## ", 1)[0]
    stops = re.findall(r"^\| (\d+) \| `([^`]+)`", section, re.M)
    assert [int(n) for n, _ in stops] == list(range(1, len(stops) + 1))
    assert 1 <= len(stops) <= 8
    named = set(re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py)`", section))
    assert {m for _, m in stops} <= named
    missing = [m for m in named if not (ROOT / "annex_gahp" / m).exists()]
    assert missing == [], missing
