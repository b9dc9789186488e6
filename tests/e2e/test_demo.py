"""The README's demo, asserted: submit -> annex -> jobs run on it -> annex retired."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import burst_demo  # noqa: E402


def test_burst_demo_end_to_end():
    lines: list[str] = []
    timeline = burst_demo.run(out=lines.append, timeout=300)
    assert list(timeline.stages) == [
        "submitted",
        "annex ad in the collector",
        "instances launched",
        "annex startds joined the pool",
        "jobs completed",
        "annex retired",
    ], lines
    launched = next(line for line in lines if "instances launched" in line)
    for tag in ("name", "owner", "request", "expires", "pool"):
        assert f"htcondor-annex:{tag}" in launched
    completed = next(line for line in lines if "jobs completed" in line)
    assert completed.endswith("ran on annex slots: burst"), completed
