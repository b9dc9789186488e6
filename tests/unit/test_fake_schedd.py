"""The unit tests' schedd fakes (tests/unit/fake_schedd.py) have the real surfaces: a method
added to ScheddDemand, or a signature changed, fails here until the fake follows, so no loop
or service test runs against a schedd the helper does not really have."""

from __future__ import annotations

import inspect

import htcondor2
import pytest
from fake_schedd import BindingSchedd, FakeSchedd, demand_over

from annex_gahp.schedd import Demand, QueuedJob, ScheddDemand


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(value)
        for name, value in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_fake_schedd_has_every_public_method_of_schedd_demand_with_its_signature():
    real, fake = public_methods(ScheddDemand), public_methods(FakeSchedd)
    assert len(real) >= 10  # counts, job, annotate, hold... (the inspection found them)
    assert sorted(real) == sorted(fake), "the fake and ScheddDemand differ in their methods"
    for name, signature in real.items():
        assert fake[name] == signature, f"{name}: real {signature}, fake {fake[name]}"


def test_binding_schedd_calls_take_the_bindings_parameter_names():
    """Each call the fake binding takes is one htcondor2.Schedd has, its parameters the real
    ones in the real order (the fake may leave out some the helper never passes): a keyword
    ScheddDemand passes by name exists on the real one."""
    fake = public_methods(BindingSchedd)
    for name in ("query", "edit", "act", "reschedule"):
        real = list(inspect.signature(getattr(htcondor2.Schedd, name)).parameters)
        mine = list(fake[name].parameters)
        assert mine[:2] == real[:2] and [p for p in real if p in mine] == mine, (
            f"{name}: real {real}, fake {mine}"
        )


def test_fake_schedd_answers_from_its_data_and_records_every_request():
    fake = FakeSchedd(jobs={("alice", "burst"): Demand(idle=2)})
    fake.queue[(7, 0)] = QueuedJob("alice", 1)
    fake.left.add((8, 0))
    assert fake.counts() == {("alice", "burst"): Demand(idle=2)} and fake.counted == 1
    assert fake.job(7, 0) == QueuedJob("alice", 1) and fake.job(9, 0) is None
    assert fake.left_since_last_look(8, 0, 0) and not fake.left_since_last_look(7, 0, 0)
    fake.annotate("alice", "burst", {"AnnexState": '"running"'}, running=True)
    fake.tell_job("alice", 7, 0, {"AnnexLastError": '"x"'})
    fake.hold_job("alice", 7, 0, "bad user data")
    fake.hold("alice", "burst", "deleted")
    fake.hold_left_behind("alice", "burst", "deleted", 5)
    fake.reroute("alice", "burst", 5)
    fake.reschedule()
    assert fake.annotated == {("alice", "burst"): {"AnnexState": '"running"'}}
    assert fake.annotations[0].running is True
    assert fake.told == [("alice", 7, 0, {"AnnexLastError": '"x"'})]
    assert fake.held_jobs == [("alice", 7, 0, "bad user data")]
    assert fake.held == [("alice", "burst", "deleted")]
    assert fake.left_behind == [("alice", "burst", "deleted", 5)]
    assert fake.rerouted == [("alice", "burst", 5)] and fake.reschedules == 1
    fake.down = True
    with pytest.raises(OSError):
        fake.counts()


def test_demand_over_a_binding_schedd_is_the_real_class():
    binding = BindingSchedd()
    binding.add(7, 0)
    demand = demand_over(binding)
    assert type(demand) is ScheddDemand
    assert demand.counts() == {("alice", "burst"): Demand(idle=1)}
    demand.reschedule()
    assert binding.calls[-1] == "reschedule"
