"""Provision mode's pieces: user data read as the owner and fitted to EC2's limit, kept by the
helper, rendered on request, launched once (ended instances are not replaced), the job's
watcher and its exit codes. The end-to-end run is tests/e2e/test_provision_mode.py."""

from __future__ import annotations

import base64
import gzip
import json
import os
import random

import pytest
from aws_fixtures import REGION, moto_server_url, moto_url  # noqa: F401
from test_reconcile import build, live_instances

from annex_gahp import names, pilotdata, provision_job, spec
from annex_gahp.controllers import status
from annex_gahp.errors import InputError
from annex_gahp.gahp import Caller
from annex_gahp.hooks import _ad
from annex_gahp.schedd import Demand

ALICE = Caller(uid=1000, user="alice", is_admin=False)


# --- reading the file (the translate hook, as the owner) --------------------------------------


def test_small_file_is_sent_as_is(tmp_path):
    path = tmp_path / "ud.sh"
    path.write_bytes(b"#!/bin/sh\necho hi\n")
    assert pilotdata.read_file(str(path)) == b"#!/bin/sh\necho hi\n"


def test_large_compressible_file_is_sent_gzipped_under_the_limit(tmp_path):
    text = b"#!/bin/sh\n" + b"echo 'a line that repeats itself'\n" * 2000  # ~70 KB
    path = tmp_path / "big.sh"
    path.write_bytes(text)
    sent = pilotdata.read_file(str(path))
    assert sent[:2] == pilotdata.GZIP_MAGIC and len(sent) <= names.USER_DATA_LIMIT
    assert gzip.decompress(sent) == text


def test_oversize_file_is_refused_naming_file_and_limit(tmp_path):
    noise = random.Random(7).randbytes(40_000)  # noqa: S311 - test data
    path = tmp_path / "huge.bin"
    path.write_bytes(b"#!/bin/sh\n" + base64.b64encode(noise))
    with pytest.raises(pilotdata.UserDataError) as caught:
        pilotdata.read_file(str(path))
    message = str(caught.value)
    assert str(path) in message and "16384 bytes" in message and "\n" not in message


def test_unreadable_missing_fifo_empty_are_refused(tmp_path, monkeypatch):
    with pytest.raises(pilotdata.UserDataError, match="does not exist"):
        pilotdata.read_file(str(tmp_path / "nope"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(pilotdata.UserDataError, match="not a regular file"):
        pilotdata.read_file(str(fifo))
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(pilotdata.UserDataError, match="is empty"):
        pilotdata.read_file(str(empty))
    secret = tmp_path / "secret"
    secret.write_text("x")

    def denied(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pilotdata.os, "open", denied)
    with pytest.raises(pilotdata.UserDataError, match="cannot be read by the job's owner"):
        pilotdata.read_file(str(secret))


def test_hook_sends_user_data_only_in_provision_mode(tmp_path):
    path = tmp_path / "ud.sh"
    path.write_text("echo pilot\n")
    ad = _ad.parse(f'AnnexMode = "provision"\nAnnexUserDataFile = "{path}"\n')
    sent = _ad.user_data_args(ad)
    assert base64.b64decode(sent["user_data"]) == b"echo pilot\n"
    bad = _ad.parse(f'AnnexMode = "provision"\nAnnexUserDataFile = "{tmp_path}/gone"\n')
    assert "does not exist" in _ad.user_data_args(bad)["user_data_error"]
    assert _ad.user_data_args(_ad.parse('AnnexMode = "pool"\n')) == {}


def test_render_uses_the_annex_variables_and_refuses_unknown_ones():
    out = pilotdata.render(b"name={{ annex_name }} until {{ annex_expires }}\n", {
        "annex_name": "p1", "annex_expires": 123,
    })  # fmt: skip
    assert out == b"name=p1 until 123\n"
    packed = gzip.compress(b"{{ annex_name }}")
    assert pilotdata.render(packed, {"annex_name": "x"}) == b"x"
    with pytest.raises(pilotdata.UserDataError, match="does not render"):
        pilotdata.render(b"{{ no_such_thing }}", {})


def test_spec_user_data_template_keyword():
    settings = _settings()
    got = spec.from_keywords(
        {"name": "p", "mode": "provision", "user_data_file": "/u", "user_data_template": "YES"},
        "alice",
        settings,
    )
    assert got.user_data_template is True
    attrs = {"TargetAnnexName": "p", "AnnexMode": "provision", "AnnexUserDataFile": "/u",
             "AnnexUserDataTemplate": True}  # fmt: skip
    assert spec.from_job_attrs(attrs, "alice", settings) == got
    with pytest.raises(InputError, match=r"^annex_user_data_template = 'maybe' is not allowed"):
        spec.from_keywords(
            {
                "name": "p",
                "mode": "provision",
                "user_data_file": "/u",
                "user_data_template": "maybe",
            },
            "alice",
            settings,
        )
    with pytest.raises(InputError, match=r"^annex_user_data_template only applies to annex_mode"):
        spec.from_keywords({"name": "p", "user_data_template": True}, "alice", settings)


def _settings():
    from aws_fixtures import make_settings  # noqa: PLC0415

    return make_settings()


# --- the helper: kept, held, launched once ---------------------------------------------------


def _job_ad(tmp_path, name="pilots", cluster=7):
    return (
        f'Owner = "alice"\nClusterId = {cluster}\nProcId = 0\nQDate = 1\n'
        f'TargetAnnexName = "{name}"\nAnnexMode = "provision"\nAnnexInstances = 2\n'
        f'AnnexUserDataFile = "{tmp_path}/ud.sh"\n'
    )


def provision_world(moto_url, tmp_path):  # noqa: F811
    world = build(moto_url, tmp_path)
    world.service.settings = world.service.settings.__class__(
        **{**world.service.settings.__dict__, "state_dir": str(tmp_path)}
    )
    world.cloud.settings = world.loop.settings = world.service.settings
    return world, world.demand.held_jobs


def test_job_routed_keeps_user_data_and_launch_uses_it(moto_url, tmp_path):  # noqa: F811
    world, held = provision_world(moto_url, tmp_path)
    data = b"#!/bin/sh\ntouch /tmp/pilot-was-here\n"
    out = world.service.job_routed(
        ALICE, {"ad": _job_ad(tmp_path), "user_data": base64.b64encode(data).decode()}
    )
    attrs = dict(_ad.parse(out["ad"]).items())
    annex = world.store.live("alice", "pilots")
    assert attrs["AnnexId"] == str(annex.id) and held == []
    assert pilotdata.load(str(tmp_path), annex.id) == data
    assert oct(os.stat(pilotdata.path_for(str(tmp_path), annex.id)).st_mode & 0o777) == "0o600"
    world.demand.jobs[("alice", "pilots")] = Demand(running=1)
    world.loop.run_once()
    (first, _second) = live_instances(world, "pilots")
    got = world.ec2.describe_instance_attribute(
        InstanceId=first["InstanceId"], Attribute="userData"
    )
    value = got.get("UserData", {}).get("Value") or _template_user_data(world, "pilots")
    assert base64.b64decode(value) == data
    # No token for provision mode: nothing of this pool goes to the instances.
    ssm = world.cloud._client("ssm", REGION)
    assert ssm.describe_parameters()["Parameters"] == []
    assert len(world.fleet_calls) == 1


def _template_user_data(world, name):
    for template in world.ec2.describe_launch_templates()["LaunchTemplates"]:
        if name in template["LaunchTemplateName"]:
            version = world.ec2.describe_launch_template_versions(
                LaunchTemplateId=template["LaunchTemplateId"], Versions=["$Latest"]
            )["LaunchTemplateVersions"][0]
            return version["LaunchTemplateData"]["UserData"]
    raise AssertionError("no launch template for the annex")


def test_unusable_user_data_holds_the_job_with_the_reason(moto_url, tmp_path):  # noqa: F811
    world, held = provision_world(moto_url, tmp_path)
    why = f"annex_user_data_file {tmp_path}/ud.sh cannot be read by the job's owner"
    with pytest.raises(InputError, match="cannot be read"):
        world.service.job_routed(ALICE, {"ad": _job_ad(tmp_path), "user_data_error": why})
    assert held == [("alice", 7, 0, why)]
    assert world.store.live("alice", "pilots") is None


def test_ended_instances_are_not_replaced_and_the_annex_ends(moto_url, tmp_path):  # noqa: F811
    world, _ = provision_world(moto_url, tmp_path)
    world.service.job_routed(ALICE, {"ad": _job_ad(tmp_path), "user_data": "ZWNobyBoaQo="})
    world.demand.jobs[("alice", "pilots")] = Demand(running=1)
    world.loop.run_once()
    ids = [i["InstanceId"] for i in live_instances(world, "pilots")]
    assert len(ids) == 2
    (*_, last) = world.demand.annotations
    assert (last.owner, last.annex) == ("alice", "pilots")
    assert last.running is True  # the job that stands for the annex runs
    annotated = last.attrs
    assert set(annotated["AnnexInstanceIds"].strip('"').split(",")) == set(ids)
    world.ec2.terminate_instances(InstanceIds=ids[:1])  # one pilot finished and powered off
    world.clock.now += 61
    world.loop.run_once()
    assert len(live_instances(world, "pilots")) == 1 and len(world.fleet_calls) == 1
    world.ec2.terminate_instances(InstanceIds=ids[1:])
    world.loop.run_once()
    world.loop.run_once()
    annex = world.store.annexes(include_retired=True)[-1]
    assert (annex.state, annex.retire_reason) == (names.RETIRED, "ended")
    assert pilotdata.load(str(tmp_path), annex.id) is None
    assert world.demand.held == []


@pytest.mark.slow
def test_lease_end_does_not_hold_the_provision_job(moto_url, tmp_path):  # noqa: F811
    world, _ = provision_world(moto_url, tmp_path)
    world.service.job_routed(ALICE, {"ad": _job_ad(tmp_path), "user_data": "ZWNobyBoaQo="})
    world.demand.jobs[("alice", "pilots")] = Demand(running=1)
    world.loop.run_once()
    annex = world.store.live("alice", "pilots")
    world.clock.now = annex.lease_expiration
    world.loop.run_once()
    world.loop.run_once()
    annex = world.store.get(annex.id)
    assert (annex.state, annex.retire_reason) == (names.RETIRED, "lease")
    assert live_instances(world, "pilots") == [] and world.demand.held == []


def test_missing_user_data_fails_the_launch_and_ends_the_annex(moto_url, tmp_path):  # noqa: F811
    world, _ = provision_world(moto_url, tmp_path)
    wanted = spec.from_keywords(
        {"name": "pilots", "mode": "provision", "user_data_file": "/u"},
        "alice",
        world.service.settings,
    )
    annex = world.service.ensure(wanted)  # (no user data kept)
    world.demand.jobs[("alice", "pilots")] = Demand(running=1)
    world.loop.run_once()  # launch fails: failed
    assert world.store.get(annex.id).state == names.FAILED
    world.loop.run_once()  # nothing was launched: the annex ends, the job will say why
    annex = world.store.get(annex.id)
    assert annex.retire_reason == "failed" and "no user data" in annex.last_error
    assert status.describe(world.store, annex)["FailedInstances"] == 0


# --- the job's program ------------------------------------------------------------------------


class FakeHelper:
    def __init__(self, views):
        self.views = list(views)
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, command, path=None, **kw):
        self.calls.append((command, kw))
        if command == "ANNEX_DELETE":
            return {"name": "p", "state": "retiring"}
        view = self.views.pop(0) if len(self.views) > 1 else self.views[0]
        return {"json": json.dumps(view)}


class Out:
    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass


@pytest.mark.parametrize(
    ("reason", "code"),
    [("ended", 0), ("lease", 2), ("failed", 3), ("deleted", 4), ("idle", 5)],
)
def test_watcher_exit_codes(monkeypatch, reason, code):
    monkeypatch.setattr(provision_job, "POLL", 0.0)
    running = {"AnnexName": "p", "AnnexState": "running", "RunningInstances": 1,
               "instances": [{"id": "i-1", "state": "running"}]}  # fmt: skip
    gone = {"AnnexName": "p", "AnnexState": "retired", "RetireReason": reason,
            "LastError": "InsufficientInstanceCapacity"}  # fmt: skip
    helper, out = FakeHelper([running, gone]), Out()
    watcher = provision_job.Watcher({"targetannexname": "p", "annexid": "3"}, call=helper, out=out)
    assert watcher.run() == code
    assert helper.calls[0] == ("ANNEX_STATUS", {"id": "3"})
    assert "i-1=running" in out.text and f"(exit {code})" in out.text
    if reason == "failed":
        assert "InsufficientInstanceCapacity" in out.text


def test_watcher_on_sigterm_deletes_the_annex_and_waits(monkeypatch):
    monkeypatch.setattr(provision_job, "POLL", 0.0)
    helper, out = FakeHelper([{"AnnexName": "p", "AnnexState": "retired"}]), Out()
    watcher = provision_job.Watcher({"targetannexname": "p", "annexid": "3"}, call=helper, out=out)
    watcher.stopping = True
    assert watcher.run() == 143
    assert helper.calls[0] == ("ANNEX_DELETE", {"id": "3"})
    assert "instances are terminated" in out.text


def test_read_job_ad(tmp_path):
    path = tmp_path / ".job.ad"
    path.write_text('TargetAnnexName = "p"\nAnnexId = 12\nAnnexGahpSocket = "/run/s"\n')
    ad = provision_job.read_job_ad(str(path))
    assert (ad["targetannexname"], ad["annexid"], ad["annexgahpsocket"]) == ("p", "12", "/run/s")
