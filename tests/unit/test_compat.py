"""The bindings' version differences (annex_gahp/compat.py), with the newer behaviour injected.

These run on whatever bindings the interpreter has (Debian's 23.9 in the sandbox venv; the 24.0
and 25.x wheels under `scripts/test compat`): the newer exception and the `None` of an empty
knob are put in here, so each test fails on the code before compat.py even on 23.9. The real
ClassAd values come from the real classad2, never from a stand-in.
"""

from __future__ import annotations

import classad2
import htcondor2
import pytest
from fake_schedd import BindingSchedd, demand_over

from annex_gahp import compat, schedd, service, settings, spec
from annex_gahp.daemon import MasterLink
from annex_gahp.errors import InputError

NOW = 1_800_000_000


class HTCondorException(Exception):
    """What htcondor2 raises from 23.10 on: a plain Exception, not an OSError."""


@pytest.fixture
def newer_bindings(monkeypatch):
    """htcondor2 as 23.10+ has it: HTCondorException exists (23.9 has none)."""
    monkeypatch.setattr(htcondor2, "HTCondorException", HTCondorException, raising=False)


@pytest.mark.parametrize("exc", [OSError, HTCondorException])
def test_no_match_edits_do_not_abort_hold_or_reroute(newer_bindings, exc):
    # Answering as a 24.x/25.x schedd does when a constraint matches no job: edit raises, act
    # reports nothing done.
    fake = BindingSchedd(edit_error=exc, hold_success=0)
    demand = demand_over(fake)
    demand.hold("alice", "burst", "the annex failed")
    demand.hold_left_behind("alice", "burst", "the annex ended", NOW)
    demand.reroute("alice", "burst", NOW)
    demand.tell_job("alice", 1, 0, {"AnnexLastError": '"refused"'})
    # Both holds went on to the hold itself after their unroute edit matched nothing.
    unroutes = [attr for _, attr, _ in fake.edits if attr == schedd.ROUTED_MARK]
    assert len(fake.acts) == 2 and len(unroutes) == 3


def test_other_failures_still_raise(newer_bindings):
    """Only the bindings' edit failure is swallowed, not a bug of ours."""
    demand = demand_over(BindingSchedd(edit_error=TypeError, hold_success=0))
    with pytest.raises(TypeError):
        demand.hold("alice", "burst", "x")


def test_edit_failed_is_oserror_plus_the_newer_class(newer_bindings):
    assert compat.edit_failed() == (OSError, HTCondorException)


@pytest.mark.parametrize("empty", ["", "   ", None])
def test_an_empty_knob_is_a_knob_not_set(empty):
    """23.9 says "" for `KNOB =`, 24.0.9+ says None: both take the default."""
    knobs = ("ANNEX_DEFAULT_INSTANCE_TYPES", "ANNEX_DEFAULT_LEASE", "ANNEX_MAX_LEASE",
             "ANNEX_MAX_INSTANCES", "ANNEX_MAX_INSTANCES_PER_USER")  # fmt: skip
    got = settings.load(dict.fromkeys(knobs, empty).get)
    assert got.default_instance_types == ("m5.large",)
    assert got.default_lease == 3600
    # An emptied limit is its default limit, never "no limit" nor an error on one version only.
    assert (got.max_lease, got.max_instances, got.max_instances_per_user) == (86400, 50, 100)
    assert got == settings.load({}.get)


def test_compat_param_of_a_real_empty_knob():
    knob = "ANNEX_DEFAULT_INSTANCE_TYPES"
    before = htcondor2.param.get(knob)
    htcondor2.param[knob] = ""
    htcondor2.param["ANNEX_ZZ_COMPAT_SET"] = " c5.large "
    try:
        assert compat.param(knob) is None
        assert compat.param("ANNEX_ZZ_COMPAT_NEVER_SET") is None
        assert compat.param("ANNEX_ZZ_COMPAT_SET") == " c5.large "
        # settings.load through the real param: the empty knob takes the default.
        assert settings.load().default_instance_types == ("m5.large",)
    finally:
        htcondor2.param[knob] = before or ""
        del htcondor2.param["ANNEX_ZZ_COMPAT_SET"]


def test_compat_param_when_bindings_say_none_for_empty(monkeypatch):
    """24.0.9 on: param.get returns None for `KNOB =`."""

    class Param(dict):
        pass

    monkeypatch.setattr(htcondor2, "param", Param(ANNEX_DEFAULT_INSTANCE_TYPES=None))
    assert compat.param("ANNEX_DEFAULT_INSTANCE_TYPES") is None
    assert settings.load().default_instance_types == ("m5.large",)


def _job_ad(**extra: str) -> str:
    lines = {
        "Owner": '"alice"',
        "ClusterId": "7",
        "ProcId": "0",
        "QDate": str(NOW - 60),
        "TargetAnnexName": '"burst"',
        "AnnexInstances": "1",
        **extra,
    }
    return "\n".join(f"{k} = {v}" for k, v in lines.items())


def test_real_classad_undefined_is_absent():
    value = classad2.parseOne("[ A = undefined; B = error ]").eval("A")
    assert isinstance(value, int)  # the trap: classad2.Value is an IntEnum
    got = service.parse_job_ad(
        _job_ad(
            AnnexRegion="undefined",
            AnnexLease="undefined",
            AnnexExpiry=str(NOW + 7200),
            AnnexIdleTimeout="AnnexNoSuchAttr",
            AnnexLastError="error",  # not a request attribute: only dropped
        )
    )
    for attr in ("AnnexRegion", "AnnexLease", "AnnexIdleTimeout", "AnnexLastError"):
        assert attr not in got
    assert got["AnnexExpiry"] == NOW + 7200 and got["AnnexInstances"] == 1
    # What parse_job_ad kept validates: no "must be a quoted string", no "exclude each other".
    annex = spec.from_job_attrs(got, "alice", settings.load({}.get), now=NOW)
    assert annex.region == "" and annex.expiry == NOW + 7200


@pytest.mark.parametrize(
    ("attr", "expr"),
    [("AnnexInstances", "error"), ("AnnexInstanceTypes", '1 + "a"'), ("AnnexLease", "1/0 + error")],
)
def test_real_classad_error_in_a_request_attribute_is_refused(attr, expr):
    """classad2.Value.Error is the int 1: kept, `AnnexInstances = error` asked for one
    instance. It is a bad request, named, not a default."""
    with pytest.raises(InputError, match=f"^{attr} evaluates to error"):
        service.parse_job_ad(_job_ad(**{attr: expr}))


def test_plain_keeps_literals_and_drops_classad_values():
    assert [compat.plain(v) for v in ("x", 3, 2.5, True)] == ["x", 3, 2.5, True]
    assert compat.plain(classad2.Value.Undefined) is None
    assert compat.plain(classad2.Value.Error) is None
    assert compat.is_error(classad2.Value.Error) and not compat.is_error(classad2.Value.Undefined)
    assert not compat.is_error(1)


def test_ready_is_told_where_set_ready_state_exists(monkeypatch):
    told: list[str] = []
    monkeypatch.setattr(htcondor2, "set_ready_state", told.append, raising=False)
    link = MasterLink()
    link.enabled = True
    link.ready()
    assert told == ["Ready"]


def test_ready_without_set_ready_state_does_nothing(monkeypatch):
    monkeypatch.delattr(htcondor2, "set_ready_state", raising=False)
    link = MasterLink()
    link.enabled = True
    link.ready()  # 23.9: nothing to call, nothing raised
    assert compat.set_ready_state() is None


def test_version_is_the_bindings_version():
    got = compat.version()
    assert got.count(".") == 2 and got.split(".")[0].isdigit()
    assert got in htcondor2.version()
