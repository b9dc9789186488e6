"""The helper's start-up as root (daemon._prepare_dirs) in directories the condor user can
write to: a symlink, hard link or FIFO planted there never makes root create, open or chown
what it points to. Needs root (run in the sandbox); the e2e case is in
tests/e2e/test_hostile_templates.py."""

from __future__ import annotations

import os
import pwd
import stat
import types
from pathlib import Path

import pytest

from annex_gahp import daemon
from annex_gahp.errors import AnnexError

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="start-up as root needs root"),
    pytest.mark.condor_host,
]


@pytest.fixture
def tree(tmp_path):
    condor = pwd.getpwnam("condor")
    os.chmod(tmp_path, 0o755)  # noqa: S103 - the condor user must reach its dirs
    logs = tmp_path / "log"
    spool = tmp_path / "spool"
    run = tmp_path / "run"
    for folder in (logs, spool, run):
        folder.mkdir()
        os.chown(folder, condor.pw_uid, condor.pw_gid)  # as /var/log/condor, spool, /run/condor
    victim = tmp_path / "shadow"
    victim.write_text("root:secret\n")
    os.chmod(victim, 0o600)
    victim_dir = tmp_path / "etc"
    victim_dir.mkdir(mode=0o755)
    cfg = types.SimpleNamespace(
        state_dir=str(spool / "annex"),
        socket_path=str(run / "annex_gahp.sock"),
        log_file=str(logs / "AnnexGahpLog"),
    )
    return types.SimpleNamespace(
        cfg=cfg, condor=condor, logs=logs, spool=spool, run=run, victim=victim,
        victim_dir=victim_dir,
    )


def plant_symlink(link: Path, target: Path, owner: pwd.struct_passwd) -> None:
    """As the condor user would: a symlink owned by condor."""
    link.symlink_to(target)
    os.lchown(link, owner.pw_uid, owner.pw_gid)


def untouched(path: Path, mode: int) -> None:
    info = path.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, mode)


def test_plain_start_up_makes_everything_owned_by_condor(tree):
    daemon._prepare_dirs(tree.cfg, tree.condor)
    for path in (tree.cfg.state_dir, os.path.dirname(tree.cfg.socket_path), tree.cfg.log_file):
        assert os.lstat(path).st_uid == tree.condor.pw_uid
    assert stat.S_IMODE(os.stat(tree.cfg.state_dir).st_mode) == 0o700
    assert stat.S_ISREG(os.lstat(tree.cfg.log_file).st_mode)
    daemon._prepare_dirs(tree.cfg, tree.condor)  # again: nothing refused, nothing moved
    assert sorted(os.listdir(tree.logs)) == ["AnnexGahpLog"]


def test_root_owned_symlink_on_the_way_is_followed(tree, tmp_path):
    real = tmp_path / "real-run"
    real.mkdir()
    (tmp_path / "varrun").symlink_to(real)  # root's own, as /var/run -> /run
    tree.cfg.socket_path = str(tmp_path / "varrun" / "condor" / "annex_gahp.sock")
    daemon._prepare_dirs(tree.cfg, tree.condor)
    assert (real / "condor").stat().st_uid == tree.condor.pw_uid


def test_log_symlink_is_not_followed_and_the_new_log_says_why(tree):
    log = Path(tree.cfg.log_file)
    plant_symlink(log, tree.victim, tree.condor)
    daemon._prepare_dirs(tree.cfg, tree.condor)
    untouched(tree.victim, 0o600)
    assert tree.victim.read_text() == "root:secret\n"
    info = log.lstat()
    assert stat.S_ISREG(info.st_mode) and info.st_uid == tree.condor.pw_uid
    (aside,) = [p for p in tree.logs.iterdir() if p.name.startswith("AnnexGahpLog.refused-")]
    assert aside.is_symlink() and os.readlink(aside) == str(tree.victim)
    text = log.read_text()
    assert f"ANNEX_GAHP_LOG {log} was a symlink to {tree.victim}: not followed" in text
    assert str(aside) in text and text.count("\n") == 1


def test_dangling_log_symlink_creates_nothing_where_it_points(tree, tmp_path):
    target = tmp_path / "etc" / "cron.d-annex"
    plant_symlink(Path(tree.cfg.log_file), target, tree.condor)
    daemon._prepare_dirs(tree.cfg, tree.condor)
    assert not target.exists()


def test_log_hard_link_and_fifo_are_moved_aside(tree):
    log = Path(tree.cfg.log_file)
    os.link(tree.victim, log)
    daemon._prepare_dirs(tree.cfg, tree.condor)
    untouched(tree.victim, 0o600)
    assert "was a file with 2 links" in log.read_text()
    for old in tree.logs.glob("AnnexGahpLog.refused-*"):
        old.unlink()
    log.unlink()
    os.mkfifo(log)
    daemon._prepare_dirs(tree.cfg, tree.condor)  # does not hang on the FIFO
    assert "was not a regular file (mode prw" in log.read_text()


def test_state_dir_symlink_is_refused_naming_it(tree):
    plant_symlink(Path(tree.cfg.state_dir), tree.victim_dir, tree.condor)
    with pytest.raises(AnnexError) as caught:
        daemon._prepare_dirs(tree.cfg, tree.condor)
    message = str(caught.value)
    assert message.startswith(f"ANNEX_STATE_DIR {tree.cfg.state_dir}: ")
    assert f"is a symlink (to {tree.victim_dir}) owned by uid {tree.condor.pw_uid}" in message
    untouched(tree.victim_dir, 0o755)


def test_symlink_in_the_middle_is_refused_and_nothing_made_behind_it(tree):
    plant_symlink(tree.spool / "a", tree.victim_dir, tree.condor)
    tree.cfg.state_dir = str(tree.spool / "a" / "annex")
    with pytest.raises(AnnexError, match=r"^ANNEX_STATE_DIR .*/spool/a is a symlink"):
        daemon._prepare_dirs(tree.cfg, tree.condor)
    assert os.listdir(tree.victim_dir) == []
    untouched(tree.victim_dir, 0o755)


def test_socket_dir_that_is_a_file_is_refused(tree):
    (tree.run / "condor").write_text("")
    tree.cfg.socket_path = str(tree.run / "condor" / "annex_gahp.sock")
    with pytest.raises(AnnexError, match=r"^ANNEX_GAHP_SOCKET .*/run/condor is not a directory"):
        daemon._prepare_dirs(tree.cfg, tree.condor)
