"""`htcondor-annex install-config` and the config files a wheel ships (issue 18, install).

The top-level condor_config.d/*.conf and docs/submit-help.txt are the one source: setup.cfg's
data_files puts exactly those into the wheel, and install-config copies the installed (or,
from a checkout, the tree's) files into the pool's config directory.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from annex_gahp import cli_admin, install

TOP = Path(__file__).resolve().parents[2]
CONFIGS = sorted((TOP / "condor_config.d").glob("*.conf"))
HELP = TOP / "docs" / "submit-help.txt"


def test_a_built_wheel_ships_exactly_the_top_level_config_files(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("annex_gahp", "condor_config.d"):
        shutil.copytree(TOP / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(TOP / name, tree / name)
    (tree / "docs").mkdir()
    shutil.copy(HELP, tree / "docs" / HELP.name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(tree)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    [wheel] = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {
            n.split(f"/{install.SHARE}/", 1)[1]: archive.read(n)
            for n in archive.namelist()
            if f"/{install.SHARE}/" in n
        }
    expected = {f"condor_config.d/{p.name}": p.read_bytes() for p in CONFIGS}
    expected[install.HELP_NAME] = HELP.read_bytes()
    assert sorted(shipped) == sorted(expected)
    for name, content in expected.items():
        assert shipped[name] == content, name


def test_from_a_checkout_the_shipped_files_are_the_trees() -> None:
    found = install.shipped()
    assert found.config == {p.name: p for p in CONFIGS}
    assert found.help_text == HELP


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    path = tmp_path / "venv" / "bin"
    path.mkdir(parents=True)
    for name in install.PROGRAMS:
        (path / name).write_text("#!/bin/sh\n")
        (path / name).chmod(0o755)
    return path


def run(tmp_path: Path, bin_dir: Path, *extra: str) -> int:
    return cli_admin.main([
        "install-config", "--config-dir", str(tmp_path / "config.d"),
        "--help-file", str(tmp_path / "etc" / "annex-submit-help.txt"),
        "--bin-dir", str(bin_dir), *extra,
    ])  # fmt: skip


def test_install_config_writes_the_files_the_bin_dir_and_the_help_text(
    tmp_path: Path, bin_dir: Path, capsys
) -> None:
    assert run(tmp_path, bin_dir) == 0
    out = capsys.readouterr().out
    config_dir = tmp_path / "config.d"
    for src in CONFIGS:
        assert (config_dir / src.name).read_bytes() == src.read_bytes()
        assert f"wrote: {config_dir / src.name}" in out
    assert (tmp_path / "etc" / "annex-submit-help.txt").read_bytes() == HELP.read_bytes()
    bin_conf = (config_dir / install.BIN_DIR_FILE).read_text()
    assert f"ANNEX_BIN_DIR = {bin_dir}\n" in bin_conf
    # Not on the usual PATH: it says how to get there.
    assert f"ln -s {bin_dir}/htcondor-annex /usr/local/bin/htcondor-annex" in out
    # The manifest is comments only, so HTCondor may read it harmlessly.
    manifest = (config_dir / install.MANIFEST).read_text().splitlines()
    assert manifest and all(line.startswith("#") for line in manifest)

    assert run(tmp_path, bin_dir) == 0
    out = capsys.readouterr().out
    assert "wrote:" not in out and f"unchanged: {config_dir / CONFIGS[0].name}" in out


def test_a_file_the_admin_changed_is_kept_unless_force(
    tmp_path: Path, bin_dir: Path, capsys
) -> None:
    assert run(tmp_path, bin_dir) == 0
    edited = tmp_path / "config.d" / "10-annex-gahp.conf"
    edited.write_text(edited.read_text() + "ANNEX_MAX_INSTANCES = 3\n")
    before = edited.read_bytes()
    capsys.readouterr()
    assert run(tmp_path, bin_dir) == 1
    err = capsys.readouterr().err
    assert f"not overwriting {edited}" in err and "--force" in err
    assert edited.read_bytes() == before
    assert run(tmp_path, bin_dir, "--force") == 0
    assert f"overwrote: {edited}" in capsys.readouterr().out
    assert edited.read_bytes() == (TOP / "condor_config.d" / edited.name).read_bytes()


def test_an_older_copy_it_wrote_itself_is_updated_without_force(
    tmp_path: Path, bin_dir: Path
) -> None:
    config_dir = tmp_path / "config.d"
    old = install.Shipped({"10-annex-gahp.conf": tmp_path / "old.conf"}, HELP)
    (tmp_path / "old.conf").write_text("# an older release's file\n")
    help_file = tmp_path / "help.txt"
    install.apply(install.plan(old, config_dir, help_file, bin_dir), config_dir, force=False)
    steps = install.plan(install.shipped(), config_dir, help_file, bin_dir)
    assert {s.target.name: s.state for s in steps}["10-annex-gahp.conf"] == "ours"
    install.apply(steps, config_dir, force=False)
    assert (config_dir / "10-annex-gahp.conf").read_bytes() == CONFIGS[0].read_bytes()


def test_a_bin_dir_without_the_programs_is_refused(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(tmp_path, empty) == 1
    assert f"--bin-dir {empty}: no program annex_gahp there" in capsys.readouterr().err
    assert not (tmp_path / "config.d").exists()


@pytest.mark.parametrize("where", ["bin", "venv", "program"])
def test_a_bin_dir_others_could_change_is_refused(
    tmp_path: Path, bin_dir: Path, capsys, where: str
) -> None:
    # A hook there runs as every user, the helper as root: only root may write on its path.
    path = {"bin": bin_dir, "venv": bin_dir.parent, "program": bin_dir / "annex_gahp"}[where]
    path.chmod(path.stat().st_mode | 0o020)
    assert run(tmp_path, bin_dir) == 1
    assert f"{path} is writable by group or others" in capsys.readouterr().err
    assert not (tmp_path / "config.d").exists()


def test_link_dir_puts_htcondor_annex_on_path(tmp_path: Path, bin_dir: Path, capsys) -> None:
    links = tmp_path / "usr-local-bin"
    assert run(tmp_path, bin_dir, "--link-dir", str(links)) == 0
    link = links / "htcondor-annex"
    assert link.is_symlink() and link.resolve() == (bin_dir / "htcondor-annex").resolve()
    assert f"linked: {link}" in capsys.readouterr().out
    # Someone else's program of that name is not replaced without --force.
    link.unlink()
    link.write_text("#!/bin/sh\n")
    assert run(tmp_path, bin_dir, "--link-dir", str(links)) == 1
    assert not link.is_symlink()
