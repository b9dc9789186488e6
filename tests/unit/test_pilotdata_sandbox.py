"""Provision-mode templates are the user's text rendered for a privileged helper: they render
in jinja2's sandbox, in a confined child (pilotrender.py), bounded in time and size; a bad one
fails only its own annex (or is refused when the job is handed over), with its own one-line
reason. Run as root (in the sandbox) these also prove the child gives root up."""

from __future__ import annotations

import base64
import gzip
import json
import os
import pwd
import subprocess
import sys
import time
import uuid

import pytest
from aws_fixtures import moto_server_url, moto_url  # noqa: F401
from test_provision import ALICE, _job_ad, live_instances, provision_world

from annex_gahp import names, pilotdata, pilotrender
from annex_gahp.cloud.aws.cloud import pilot_variables
from annex_gahp.errors import InputError
from annex_gahp.gahp import Caller
from annex_gahp.schedd import Demand

BOB = Caller(uid=1001, user="bob", is_admin=False)
VARS = pilotdata.variables("pilots", "alice", "annex-3", "us-west-1", 2, 1_900_000_000)


def marker() -> str:
    return f"/tmp/pwned-{uuid.uuid4().hex}"  # a path an exploit would create


# Each would run `touch MARK` (or reach what could) if a template could reach Python.
PAYLOADS = [
    "{{ cycler.__init__.__globals__.os.system('touch MARK') }}",
    "{{ joiner.__init__.__globals__.os.system('touch MARK') }}",
    "{{ namespace.__init__.__globals__.os.system('touch MARK') }}",
    "{{ lipsum.__globals__['os'].system('touch MARK') }}",
    "{{ range.__init__.__globals__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ annex_name.__class__.__base__.__subclasses__() }}",
    "{{ ''.__class__.mro() }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch MARK') }}",
    "{{ self.__init__.__globals__ }}",
    "{{ config.__class__.__init__.__globals__['os'].popen('touch MARK') }}",
    "{{ request.application.__globals__.__builtins__.__import__('os').system('touch MARK') }}",
    "{{ '{0.__class__.__init__.__globals__}'.format(namespace) }}",
    "{{ '{x.__class__}'.format_map({'x': annex_name}) }}",
    "{{ '{0.__class__}'|attr('format')(namespace) }}",
    "{{ namespace|attr('__init__')|attr('__globals__') }}",
    "{{ (annex_name|attr('__class__')).__mro__ }}",
    "{{ '%s'|format(annex_name.__class__) }}",
    "{{ dict.__init__.__globals__ }}",
    "{% set x = namespace() %}{{ x.__class__.__init__.__globals__ }}",
    "{{ loop.__class__ }}{% for i in [1] %}{{ loop.__class__.__init__.__globals__ }}{% endfor %}",
    "{% for i in range(10**10) %}x{% endfor %}",
    "{{ 'a' * 10**9 }}",
    "{{ [0] * 10**9 }}",
    "{{ 7 ** 10000000 }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% include '/etc/shadow' %}",
    "{% import '/etc/passwd' as p %}",
    "{% extends '/etc/hostname' %}",
    "{% from 'x' import y %}",
]


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.slow
def test_ssti_payload_is_refused_and_runs_nothing(payload):
    mark = marker()
    with pytest.raises(pilotdata.UserDataError) as caught:
        pilotdata.render(payload.replace("MARK", mark).encode(), VARS)
    message = str(caught.value)
    assert message.startswith("the user data template does not render: ")
    assert "\n" not in message and "Traceback" not in message and len(message) < 400
    assert any(
        why in message
        for why in (
            "unsafe",
            "is undefined",
            "MAX_RANGE",
            "over the limit",
            "4096 bits",
            "recurses too deeply",
            "include, import and extends are not available",
            "StrictUndefined object' has no attribute",
        )
    ), message
    assert not os.path.exists(mark)


def test_format_tricks_name_the_refusal():
    with pytest.raises(pilotdata.UserDataError, match=r"line 2: .*unsafe"):
        pilotdata.render(b"#!/bin/sh\n{{ '{0.__class__}'.format(annex_name) }}\n", VARS)
    with pytest.raises(pilotdata.UserDataError, match=r"attribute '__init__' of .* is unsafe"):
        pilotdata.render(b"{{ namespace.__init__.__globals__ }}", VARS)


def test_documented_variables_render():
    template = (
        b"#!/bin/sh\n# {{ annex_name }} of {{ annex_owner }} ({{ annex_request_id }})\n"
        b"REGION={{ annex_region }} N={{ annex_instances * 2 }}\n"
        b"UNTIL={{ annex_expires }} {{ annex_expires_utc }}\n"
        b"{% for i in range(annex_instances) %}slot{{ i }} {% endfor %}\n"
        b"{% set ns = namespace(n=0) %}{% for i in range(3) %}{% set ns.n = ns.n + i %}"
        b"{% endfor %}{{ ns.n }} {{ '%05d'|format(42) }} {{ 'a-b'.split('-')|join(',') }}\n"
    )
    assert pilotdata.render(template, VARS) == (
        b"#!/bin/sh\n# pilots of alice (annex-3)\nREGION=us-west-1 N=4\n"
        b"UNTIL=1900000000 2030-03-17T17:46:40Z\nslot0 slot1 \n3 00042 a,b\n"
    )
    packed = gzip.compress(b"{{ annex_name }}\n")
    assert pilotdata.render(packed, VARS) == b"pilots\n"


def test_undefined_name_says_which_and_where():
    with pytest.raises(pilotdata.UserDataError) as caught:
        pilotdata.render(b"#!/bin/sh\necho ok\necho {{ anex_name }}\n", VARS)
    assert str(caught.value) == (
        "the user data template does not render: line 3: 'anex_name' is undefined"
    )
    with pytest.raises(pilotdata.UserDataError, match=r"line 2: Expected an expression"):
        pilotdata.render(b"ok\n{{ }}\n", VARS)


def test_a_template_that_loops_forever_is_stopped_in_time():
    forever = b"{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    started = time.monotonic()
    with pytest.raises(pilotdata.UserDataError, match=r"rendering took longer than 1 s"):
        pilotdata.render(forever, VARS, timeout=1)
    assert time.monotonic() - started < 4


def test_output_is_bounded_in_the_child_and_by_ec2s_limit():
    huge = b"{% for i in range(100000) %}" + b"x" * 100 + b"{% endfor %}"
    with pytest.raises(pilotdata.UserDataError, match=r"over 1048576 characters"):
        pilotdata.render(huge, VARS)
    # Under the child's cap but over 16 KB even gzip-compressed: fit() refuses it.
    noisy = b"{% for i in range(30000) %}{{ i * 7919 % 104729 }}{% endfor %}"
    with pytest.raises(pilotdata.UserDataError, match=r"over EC2's user data limit of 16384"):
        pilotdata.render(noisy, VARS)


def test_gzip_bomb_is_not_unpacked_in_the_helper():
    bomb = gzip.compress(b"x" * (pilotdata.READ_LIMIT * 4))
    assert len(bomb) <= names.USER_DATA_LIMIT
    with pytest.raises(pilotdata.UserDataError, match="unpacks to over"):
        pilotdata.render(bomb, VARS)


def test_only_plain_values_cross_into_the_child():
    with pytest.raises(ValueError, match="may not be a"):
        pilotrender.plain({"x": object()})
    with pytest.raises(ValueError, match="may not be a"):
        pilotrender.render("{{ x }}", {"x": pilotdata})

    class FakeAnnex:
        name, owner, id, region, requested, lease_expiration = "p", "alice", 4, "r", 2, 10

    values = pilot_variables(FakeAnnex())  # type: ignore[arg-type]
    assert all(type(v) in (str, int) for v in values.values())
    assert values["annex_request_id"] == "annex-4"


# --- the child's confinement, checked on the child launcher itself --------------------------

PROBE = """
import json, os, resource, signal, sys
sys.path.insert(0, {where!r})
import pilotrender
pilotrender.confine(5)
pilotrender.sandbox()
pilotrender.limit()
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
try:
    os.setuid(0)
    regained = True
except PermissionError:
    regained = False
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
path = "/tmp/probe-write-{token}"
try:
    with open(path, "w") as handle:
        handle.write("x")
    wrote = True
except OSError:
    wrote = False
if os.path.exists(path):
    os.unlink(path)
try:
    os.fork()
    forked = True
except OSError:
    forked = False
print(json.dumps({{
    "nnp": status["NoNewPrivs"].strip(), "uids": os.getresuid(), "gids": os.getresgid(),
    "groups": os.getgroups(), "regained": regained, "wrote": wrote, "forked": forked,
    "cpu": resource.getrlimit(resource.RLIMIT_CPU), "as": resource.getrlimit(resource.RLIMIT_AS),
    "fsize": resource.getrlimit(resource.RLIMIT_FSIZE),
    "nproc": resource.getrlimit(resource.RLIMIT_NPROC),
    "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
}}))
"""


def _probe(preexec=None) -> dict:
    token = uuid.uuid4().hex
    code = PROBE.format(where=os.path.dirname(pilotrender.__file__), token=token)
    done = subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        timeout=30,
        check=True,
        preexec_fn=preexec,
        cwd="/",
    )
    assert not os.path.exists(f"/tmp/probe-write-{token}")
    return json.loads(done.stdout)


def _nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def test_child_sets_no_new_privs_and_its_limits():
    got = _probe()
    assert got["nnp"] == "1"
    assert got["cpu"] == [pilotrender.CPU_SECONDS, pilotrender.CPU_SECONDS + 1]
    assert 0 < got["as"][0] < 2**30
    assert got["fsize"] == [0, 0] and got["nproc"] == [0, 0]
    assert got["nofile"] == [pilotrender.NOFILE, pilotrender.NOFILE]
    assert not got["wrote"] and not got["forked"] and not got["regained"]
    if os.geteuid() == 0:
        uid, gid = _nobody()
        assert got["uids"] == [uid] * 3 and got["gids"] == [gid] * 3 and got["groups"] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to be a helper with a saved root uid")
@pytest.mark.condor_host
def test_child_of_a_helper_with_saved_root_holds_no_root():
    condor = pwd.getpwnam("condor")

    def like_the_helper():  # as daemon._drop_privileges leaves it today
        os.setgroups([])
        os.setresgid(condor.pw_gid, condor.pw_gid, condor.pw_gid)
        os.setresuid(condor.pw_uid, condor.pw_uid, 0)

    got = _probe(like_the_helper)
    # execve set the saved uid to the effective one: the helper's saved root does not reach
    # the child, which stays the condor user, with no way back to root.
    assert got["uids"] == [condor.pw_uid] * 3 and got["gids"] == [condor.pw_gid] * 3
    assert got["groups"] == [] and not got["regained"] and got["nnp"] == "1"


# --- in the helper: refused at hand-over, or failing only its own annex ----------------------


def _routed(world, tmp_path, template: bytes, caller=ALICE, name="pilots"):
    ad = _job_ad(tmp_path, name=name).replace("alice", caller.user)
    ad += "AnnexUserDataTemplate = true\n"
    return world.service.job_routed(
        caller, {"ad": ad, "user_data": base64.b64encode(template).decode()}
    )


@pytest.mark.slow
def test_unsafe_template_is_refused_at_hand_over_and_the_job_held(moto_url, tmp_path):  # noqa: F811
    world, held = provision_world(moto_url, tmp_path)
    mark = marker()
    payload = f"#!/bin/sh\n{{{{ namespace.__init__.__globals__.os.system('touch {mark}') }}}}\n"
    with pytest.raises(InputError) as caught:
        _routed(world, tmp_path, payload.encode())
    why = str(caught.value)
    assert why.startswith(f"annex_user_data_file {tmp_path}/ud.sh: the user data template")
    assert "line 2: access to attribute '__init__'" in why and "unsafe" in why
    assert held == [("alice", 7, 0, why)]
    assert world.store.live("alice", "pilots") is None and not os.path.exists(mark)
    with pytest.raises(InputError, match=r"annex_user_data_file .*line 1: Expected an expression"):
        _routed(world, tmp_path, b"{% if %}\n")
    assert world.store.annexes(include_retired=True) == []


def test_create_refuses_an_unsafe_template(moto_url, tmp_path):  # noqa: F811
    world, _ = provision_world(moto_url, tmp_path)
    args = {
        "name": "pilots",
        "mode": "provision",
        "user_data_file": "/home/alice/t.sh",
        "user_data_template": "true",
        "user_data": base64.b64encode(b"{{ ''.__class__ }}").decode(),
    }
    with pytest.raises(InputError, match=r"^annex_user_data_file /home/alice/t.sh: .*unsafe"):
        world.service.create(ALICE, args)
    assert world.store.annexes(include_retired=True) == []


def test_template_failing_at_launch_fails_only_its_own_annex(moto_url, tmp_path):  # noqa: F811
    world, held = provision_world(moto_url, tmp_path)
    # Passes the hand-over check (rendered as annex-0 there), fails for the real annex.
    sly = b"#!/bin/sh\n{% if annex_request_id != 'annex-0' %}{{ secret_knob }}{% endif %}\n"
    _routed(world, tmp_path, sly)
    _routed(world, tmp_path, b"#!/bin/sh\necho {{ annex_owner }}\n", caller=BOB, name="bobs")
    for key in (("alice", "pilots"), ("bob", "bobs")):
        world.demand.jobs[key] = Demand(running=1)
    world.loop.run_once()
    alice = world.store.live("alice", "pilots")
    assert alice.state == names.FAILED
    assert alice.last_error == (
        "the user data template does not render: line 2: 'secret_knob' is undefined"
    )
    assert live_instances(world, "pilots") == [] and held == []
    assert len(live_instances(world, "bobs")) == 2
    world.loop.run_once()
    alice = world.store.get(alice.id)
    assert alice.retire_reason == "failed" and "'secret_knob' is undefined" in alice.last_error


def test_a_renderer_that_cannot_start_renders_nothing_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    with pytest.raises(pilotdata.UserDataError, match="the template renderer could not start"):
        pilotdata.render(b"{{ annex_name }}", VARS)
    assert "the template renderer could not start" in caplog.text


def test_utf8_text_comes_back_as_it_was():
    text = "#!/bin/sh\necho 'ünïcødé ✓ {{ annex_name }}' \x01\n".encode()
    assert pilotdata.render(text, VARS) == "#!/bin/sh\necho 'ünïcødé ✓ pilots' \x01\n".encode()
