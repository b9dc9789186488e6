"""The pytest plugin (annex_gahp.testing) is cheap and harmless where it is not used: it loads in
every pytest run of an environment that has the package (issue 19), so importing it must start
nothing and pull in neither boto3 nor the HTCondor bindings."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from annex_gahp.testing import pool

ROOT = Path(__file__).resolve().parents[2]


def _env(*extra_path: Path) -> dict[str, str]:
    path = os.pathsep.join([*map(str, extra_path), str(ROOT)])
    return dict(os.environ, PYTHONPATH=path, PYTHONDONTWRITEBYTECODE="1")


def _installed_entry_point(where: Path) -> Path:
    """A dist-info that makes the checkout look pip-installed: the package's own pytest11 entry
    point, read from setup.cfg (pytest autoloads it as it would in the sandbox's venv)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    info = where / "htcondor_annex_gahp-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: htcondor-annex-gahp\n"
                                   "Version: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[pytest11]\n" + cfg["options.entry_points"]["pytest11"].strip() + "\n")
    return where


def _pytest_help(cwd: Path, env: dict[str, str], *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "pytest", *args, "--help"], capture_output=True,
                         text=True, env=env, cwd=cwd, timeout=120, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res.stdout


def test_importing_the_plugin_imports_no_cloud_or_condor_library():
    res = subprocess.run(
        [sys.executable, "-c", "import sys, annex_gahp.testing; print(sorted(m for m in "
         "('boto3', 'botocore', 'htcondor2', 'classad2', 'htcondor') if m in sys.modules))"],
        capture_output=True, text=True, env=_env(), check=True)
    assert res.stdout.strip() == "[]"


def test_the_package_declares_the_entry_point_the_extra_and_the_sandbox_data():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    entry_points = cfg["options.entry_points"]["pytest11"]
    assert "htcondor_annex = annex_gahp.testing.entrypoint" in entry_points
    assert "pytest" in cfg["options.extras_require"]["testing"]
    assert "testing/data/*" in cfg["options.package_data"]["annex_gahp"]
    for name in ("sandbox", "sandbox-booter"):
        assert (ROOT / "annex_gahp/testing/data" / name).is_file()
    # The checkout's scripts/sandbox is that same file, not a copy that could drift.
    assert (ROOT / "scripts/sandbox").resolve() == (ROOT / "annex_gahp/testing/data/sandbox")


def test_a_run_that_uses_no_fixture_starts_no_sandbox(tmp_path):
    pool_dir = tmp_path / "pool"
    (tmp_path / "test_plain.py").write_text(textwrap.dedent("""\
        def test_plain(request):
            assert request.config.getoption("--annex-pool-dir")
        """))
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "annex_gahp.testing", "-p", "no:cacheprovider",
         "-q", f"--annex-pool-dir={pool_dir}", str(tmp_path / "test_plain.py")],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout
    assert not pool_dir.exists()


def test_the_options_are_in_pytests_help(tmp_path):
    out = _pytest_help(tmp_path, _env(), "-p", "annex_gahp.testing")
    for option in ("--annex-pool-dir", "--annex-keep", "--annex-source"):
        assert option in out


def test_the_entry_point_loads_it_and_minus_p_as_well_loads_it_once(tmp_path):
    env = _env(_installed_entry_point(tmp_path / "site"))
    assert "--annex-pool-dir" in _pytest_help(tmp_path, env)  # by the entry point alone
    assert "--annex-pool-dir" in _pytest_help(tmp_path, env, "-p", "annex_gahp.testing")
    assert "--annex-pool-dir" in _pytest_help(tmp_path, env, "-p", "htcondor_annex")
    assert "--annex-pool-dir" not in _pytest_help(tmp_path, env, "-p", "no:htcondor_annex")


@pytest.mark.parametrize("knob, value", [
    ("BAD KNOB", "x"),
    ("ANNEX_X", "two\nlines"),
    ("ANNEX_X = 1\nSTART", "x"),
])
def test_a_knob_that_is_not_one_line_is_refused_before_the_pool_is_touched(knob, value):
    sandbox = pool.Sandbox(pool_dir=Path("/nonexistent/annex-pool"))
    with pytest.raises(ValueError, match="one knob name, one line"):
        sandbox.set_config("99-test.conf", {knob: value})


def test_the_sandbox_facts_file_is_key_value_lines():
    assert pool.parse_env("# comment\nA=1\n\nB=x=y\nnoise\n") == {"A": "1", "B": "x=y"}
