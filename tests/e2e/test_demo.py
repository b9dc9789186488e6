"""The README's demo, asserted: submit -> annex -> jobs run on it -> annex retired."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import burst_demo

pytestmark = pytest.mark.sandbox


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
    # Every one of the four jobs ran on a slot of annex "burst", by its own MachineAttr.
    assert timeline.ran_on == {0: "burst", 1: "burst", 2: "burst", 3: "burst"}, lines
