"""The lifecycle tables: every entry reachable, nothing outside them accepted, and the one place
that decides a state (the store records whatever it is given; nothing else writes a state)."""

from __future__ import annotations

import ast
import pathlib

import pytest

from annex_gahp import lifecycle, names
from annex_gahp.lifecycle import Event, InstanceEvent, RetireReason

PACKAGE = pathlib.Path(lifecycle.__file__).parent


def _reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for after in edges.get(todo.pop(), ()):
            if after not in seen:
                seen.add(after)
                todo.append(after)
    return seen


def test_every_annex_state_is_reachable_from_new_and_reaches_retired():
    edges: dict[str, set[str]] = {}
    for (before, _), after in lifecycle.TRANSITIONS.items():
        edges.setdefault(before, set()).add(after)
    assert _reachable(lifecycle.NEW, edges) == {lifecycle.NEW, *names.STATES}
    for state in names.STATES:
        assert names.RETIRED in _reachable(state, edges), state
    # every event is used somewhere, and every public state is in the table
    assert {event for _, event in lifecycle.TRANSITIONS} == set(Event)


def test_every_state_event_pair_outside_the_table_raises():
    for state in (lifecycle.NEW, *names.STATES):
        for event in Event:
            if (state, event) in lifecycle.TRANSITIONS:
                assert lifecycle.next_state(state, event) == lifecycle.TRANSITIONS[(state, event)]
            else:
                with pytest.raises(lifecycle.TransitionError):
                    lifecycle.next_state(state, event)
    with pytest.raises(lifecycle.TransitionError):
        lifecycle.next_state(names.RUNNING, "explode")  # not an event at all
    with pytest.raises(lifecycle.TransitionError):
        lifecycle.next_state("sleeping", Event.RETIRE)  # not a state


def test_records_are_born_only_through_request_or_adopt():
    born = {event for (state, event) in lifecycle.TRANSITIONS if state == lifecycle.NEW}
    assert born == {Event.REQUEST, Event.ADOPT}
    assert lifecycle.next_state(lifecycle.NEW, Event.REQUEST) == names.REQUESTED
    assert lifecycle.next_state(lifecycle.NEW, Event.ADOPT) == names.RUNNING


def test_a_stale_view_loses_only_to_a_retirement():
    # the one justified exception to raising: the record retired after the view was taken
    for state in lifecycle.FINAL:
        assert lifecycle.settle(state, Event.LAUNCH) is None
        assert lifecycle.settle(state, Event.UP) is None
    assert lifecycle.settle(names.RETIRING, Event.GONE) == names.RETIRED
    assert lifecycle.settle(names.RETIRING, Event.RETIRE) == names.RETIRING
    with pytest.raises(lifecycle.TransitionError):
        lifecycle.settle(names.RETIRED, Event.RETIRE)  # retired is not retired again
    with pytest.raises(lifecycle.TransitionError):
        lifecycle.settle(names.REQUESTED, Event.GONE)  # a caller's bug still raises


def test_one_definition_of_live():
    assert lifecycle.ACTIVE < lifecycle.LIVE
    assert lifecycle.LIVE | {names.RETIRED} == set(names.STATES)
    assert lifecycle.FINAL == set(names.STATES) - lifecycle.ACTIVE
    assert lifecycle.INSTANCE_LIVE == {"pending", "running"}
    # no module of the helper's core keeps a set of its own (the cloud package has its own
    # describe filter: every EC2 state short of terminated)
    for path in PACKAGE.rglob("*.py"):
        # (nor does the pytest plugin, a test harness whose EC2 filters name EC2's states)
        if path.name == "cloud.py" or {"aws", "cloud", "testing"} & set(path.parts):
            continue
        text = path.read_text()
        for spelled in ('("pending", "running")', "_FINAL_STATES", "LIVE_STATES = "):
            assert spelled not in text, f"{path.relative_to(PACKAGE)} defines {spelled}"


def test_instance_table_follows_ec2_and_the_helpers_own_writes():
    edges = {k: set(v) for k, v in lifecycle.INSTANCE_TRANSITIONS.items()}
    states = set(lifecycle.INSTANCE_TRANSITIONS)
    assert _reachable(lifecycle.I_NEW, edges) == states
    for state in states:
        assert lifecycle.TERMINATED in _reachable(state, edges), state
    for (before, _), after in lifecycle.INSTANCE_EVENTS.items():
        # what the helper writes by itself is a move EC2 can make (polling may skip steps)
        assert after in _reachable(before, edges) - {before}, (before, after)
    for state in states:
        for event in InstanceEvent:
            if (state, event) not in lifecycle.INSTANCE_EVENTS:
                with pytest.raises(lifecycle.TransitionError):
                    lifecycle.instance_next(state, event)
    with pytest.raises(lifecycle.TransitionError):
        lifecycle.instance_next(lifecycle.TERMINATED, InstanceEvent.TERMINATE)


def test_retire_reasons_keep_their_public_values():
    assert {r.value for r in RetireReason} == {
        "deleted",
        "lease",
        "idle",
        "ended",
        "failed",
        "budget",
    }
    with pytest.raises(ValueError):
        RetireReason("bored")


def test_backoff_is_read_only_through_the_lifecycle():
    class View:
        launch_failures = 2
        retry_at = 1000

    assert not lifecycle.may_launch(View(), 999)  # type: ignore[arg-type]
    assert lifecycle.may_launch(View(), 1000)  # type: ignore[arg-type]
    assert lifecycle.backing_off(View())  # type: ignore[arg-type]
    fields = lifecycle.launch_failed(View(), 100, 10)  # type: ignore[arg-type]
    assert fields == {"launch_failures": 3, "retry_at": 100 + lifecycle.retry_delay(3, 10)}
    assert lifecycle.LAUNCHED == {"launch_failures": 0, "retry_at": None}


def _state_writes(tree: ast.AST) -> list[int]:
    """Lines that pass state= to the store (update_annex/insert_annex)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("update_annex", "insert_annex"):
                if any(k.arg == "state" for k in node.keywords):
                    lines.append(node.lineno)
    return lines


def test_only_the_lifecycle_writes_a_state():
    for path in PACKAGE.rglob("*.py"):
        if path.name == "lifecycle.py":
            continue
        lines = _state_writes(ast.parse(path.read_text()))
        assert not lines, f"{path.relative_to(PACKAGE)}:{lines} writes a state itself"
