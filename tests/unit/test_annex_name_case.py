"""Annex names are case-sensitive everywhere (issue #12): alice's `Burst` and `burst` are two
annexes, as they are in the store. ClassAd `==` ignores case for strings, so every constraint
that compares an annex name or an owner must use `=?=`; these evaluate the real constraint
strings with the real ClassAd library against ads of both annexes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fake_schedd import BindingSchedd, demand_over

from annex_gahp import collector, names

classad2 = pytest.importorskip("classad2")
REPO = Path(__file__).resolve().parents[2]


def job(annex: str, owner: str = "alice", status: int = 1) -> classad2.ClassAd:
    ad = classad2.ClassAd()
    ad["Owner"] = owner
    ad[names.JOB_TARGET] = annex
    ad["JobStatus"] = status
    ad["ClusterId"] = 7
    ad["ProcId"] = 0
    return ad


def matches(constraint: str, ad: classad2.ClassAd) -> bool:
    return classad2.ExprTree(constraint).eval(ad) is True


def test_schedd_constraints_tell_burst_from_burst() -> None:
    binding = BindingSchedd()
    demand = demand_over(binding)
    demand.annotate("alice", "Burst", {"AnnexState": '"running"'})
    demand.tell_job("alice", 7, 0, {"AnnexLastError": '"x"'})
    constraints = [*(c for c, _, _ in binding.edits), demand._waiting("alice", "Burst")]
    assert len(constraints) == 3  # annotate's edit, tell_job's edit, the waiting jobs'
    for constraint in constraints[:1] + constraints[2:]:
        assert matches(constraint, job("Burst"))
        assert not matches(constraint, job("burst")), constraint
        assert not matches(constraint, job("Burst", owner="Alice")), constraint
    assert matches(constraints[1], job("x"))
    assert not matches(constraints[1], job("x", owner="ALICE"))


def test_collector_invalidation_names_one_annex() -> None:
    name = collector.ad_name("alice", "Burst", "ap.example")
    other = collector.ad_name("alice", "burst", "ap.example")
    source = (REPO / "annex_gahp" / "collector.py").read_text()
    assert 'Name == "' not in source and "Name =?= {_quote(name)}" in source
    ad, ad2 = classad2.ClassAd(), classad2.ClassAd()
    ad["Name"], ad2["Name"] = name, other
    constraint = f"Name =?= {collector._quote(name)}"
    assert matches(constraint, ad) and not matches(constraint, ad2)


def test_no_case_blind_name_comparison_in_config_or_code() -> None:
    """Every comparison of AnnexName/TargetAnnexName/Owner/AnnexOwner uses =?= or =!=."""
    pattern = re.compile(
        r"\b(Target)?Annex(Name|Owner|RoutedName)\s*(==|!=)|\bOwner\s*(==|!=)\s*[{\"]"
    )
    files = [
        *sorted((REPO / "condor_config.d").glob("*.conf")),
        REPO / "annex_gahp" / "schedd.py",
        REPO / "annex_gahp" / "collector.py",
        REPO / "annex_gahp" / "provision_job.py",
        REPO / "annex_gahp" / "templates" / "annex-condor.conf.j2",
    ]
    bad = [
        f"{path.name}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("#")
    ]
    assert not bad, bad
