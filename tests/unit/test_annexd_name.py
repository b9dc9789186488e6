"""The helper's name under condor_master (ANNEXD) stays clear of upstream condor_annex's knobs.

A site may run upstream condor_annex next to this project. condor_annex reads ANNEX_GAHP as the
path of its own EC2 GAHP, so a DAEMON_LIST entry of that name, or one whose derived knobs
(<name>_LOG, <name>_ARGS, MASTER_<name>_BACKOFF_*, ...) are condor_annex's, makes the two fight.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import htcondor2
import pytest

from annex_gahp.daemon import OLD_TIMEOUT_KNOB, MasterLink, _take_lock
from annex_gahp.errors import AnnexError

CONFIG = Path(__file__).resolve().parents[2] / "condor_config.d" / "10-annex-gahp.conf"

# Upstream's knobs, from htcondor/htcondor v23.9.6 (param_info.in's are the same at the 2026-08
# main): every `[ANNEX*]` entry of src/condor_utils/param_info.in (region-prefixed ones such as
# `[us_east_1.ANNEX_DEFAULT_ODI_IMAGE_ID]` listed without the prefix; HPC_ANNEX_ENABLED is a
# different feature's), plus the `"ANNEX_*"` names that condor_annex (src/annex/*.cpp) and
# `htcondor annex` (src/condor_tools/htcondor_cli/annex*.py) param() without a table entry, plus
# ANNEX_GAHP_RATE_LIMIT, which ec2_gahp/amazonCommands.cpp derives from the subsystem name
# ANNEX_GAHP that condor_annex gives its GAHP (`-s ANNEX_GAHP`).
UPSTREAM_ANNEX_KNOBS = frozenset(
    {
        "ANNEX_AUDIT_LOG",
        "ANNEX_COLLECTOR",
        "ANNEX_COMMAND_STATE",
        "ANNEX_DEFAULT_AWS_REGION",
        "ANNEX_DEFAULT_CF_URL",
        "ANNEX_DEFAULT_CONNECTIVITY_FUNCTION_ARN",
        "ANNEX_DEFAULT_CWE_URL",
        "ANNEX_DEFAULT_EC2_URL",
        "ANNEX_DEFAULT_LAMBDA_URL",
        "ANNEX_DEFAULT_LEASE_DURATION",
        "ANNEX_DEFAULT_ODI_IMAGE_ID",
        "ANNEX_DEFAULT_ODI_IMAGE_ID_V8_7_8",
        "ANNEX_DEFAULT_ODI_IMAGE_ID_V8_8_4",
        "ANNEX_DEFAULT_ODI_IMAGE_ID_V8_8_5",
        "ANNEX_DEFAULT_ODI_IMAGE_ID_V8_9_3",
        "ANNEX_DEFAULT_ODI_IMAGE_ID_V8_9_4",
        "ANNEX_DEFAULT_ODI_INSTANCE_TYPE",
        "ANNEX_DEFAULT_ODI_INSTANCE_TYPE_V8_7_0",
        "ANNEX_DEFAULT_S3_URL",
        "ANNEX_DEFAULT_UNCLAIMED_TIMEOUT",
        "ANNEX_GAHP",
        "ANNEX_GAHP_LOG",
        "ANNEX_LOG",
        "ANNEX_TOKEN_DOMAIN",
        # read in code, no param table entry
        "ANNEX_DEFAULT_ACCESS_KEY_FILE",
        "ANNEX_DEFAULT_ODI_INSTANCE_PROFILE_ARN",
        "ANNEX_DEFAULT_ODI_KEY_NAME",
        "ANNEX_DEFAULT_ODI_LEASE_FUNCTION_ARN",
        "ANNEX_DEFAULT_ODI_SECURITY_GROUP_IDS",
        "ANNEX_DEFAULT_S3_BUCKET",
        "ANNEX_DEFAULT_SECRET_KEY_FILE",
        "ANNEX_DEFAULT_SFR_CONFIG_FILE",
        "ANNEX_DEFAULT_SFR_LEASE_FUNCTION_ARN",
        "ANNEX_GAHP_CALL_TIMEOUT",
        "ANNEX_GAHP_DEBUG",
        "ANNEX_GAHP_WORKER_MAX_NUM",
        "ANNEX_GAHP_WORKER_MIN_NUM",
        "ANNEX_INITIAL_CONNECTION_TIMEOUT",
        "ANNEX_PASSWORD_FILE",
        "ANNEX_PROVISIONING_DELAY",
        "ANNEX_REMOTE_CLEANUP_TIMEOUT",
        "ANNEX_REMOTE_MKDIR_TIMEOUT",
        "ANNEX_REMOTE_POPULATE_TIMEOUT",
        "ANNEX_TMP_DIR",
        "ANNEX_TOKEN_FETCH_TIMEOUT",
        "ANNEX_TOKEN_KEY_NAME",
        "ANNEX_TOKEN_LIFETIME",
        # derived from the GAHP's subsystem name
        "ANNEX_GAHP_RATE_LIMIT",
    }
)

# What condor_master v23.9.6 param()s for a DAEMON_LIST entry NAME
# (src/condor_master.V6/masterDaemon.cpp), and the alive timeout the helper reads by the same
# rule as DaemonCore (daemon_keep_alive.cpp).
DERIVED = (
    "{}",
    "{}_ARGS",
    "{}_ENVIRONMENT",
    "{}_FLAG",
    "{}_LOG",
    "{}_USERID",
    "{}_ADMIN_EMAIL",
    "{}_WATCH_FILE",
    "{}_NOT_RESPONDING_TIMEOUT",
    "MASTER_{}_CONTROLLER",
    "MASTER_{}_BACKOFF_CONSTANT",
    "MASTER_{}_BACKOFF_CEILING",
    "MASTER_{}_BACKOFF_FACTOR",
    "MASTER_{}_RECOVER_FACTOR",
    "HA_{}_LOCK_URL",
)


def _assignments() -> list[tuple[str, str]]:
    """(knob, value) of every assignment in the shipped file (no continuation lines in it)."""
    pairs = []
    for line in CONFIG.read_text().splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.]+)\s*=\s*(.*)$", line)
        if match:
            pairs.append((match[1].upper(), match[2].strip()))
    return pairs


def _daemon_list_entries() -> list[str]:
    """What the shipped file appends to DAEMON_LIST (the `$(DAEMON_LIST)` it starts from aside)."""
    entries = []
    for knob, value in _assignments():
        if knob == "DAEMON_LIST":
            rest = value.replace("$(DAEMON_LIST)", " ")
            entries += [e.upper() for e in re.split(r"[\s,]+", rest) if e]
    return entries


def test_the_shipped_daemon_list_entry_is_annexd():
    assert _daemon_list_entries() == ["ANNEXD"]
    assert ("ANNEXD", "$(ANNEX_BIN_DIR)/annex_gahp") in _assignments()


def test_no_daemon_list_entry_or_program_knob_is_an_upstream_annex_knob():
    entries = _daemon_list_entries()
    assert not set(entries) & UPSTREAM_ANNEX_KNOBS
    # The knob naming a program is the daemon's name; none may be upstream's either.
    programs = {k for k, v in _assignments() if v.rstrip().endswith("/annex_gahp")}
    assert programs == {"ANNEXD"}
    assert not programs & UPSTREAM_ANNEX_KNOBS


def test_no_knob_the_master_derives_from_the_entry_is_upstreams():
    entries = _daemon_list_entries()
    assert "ANNEXD" in entries
    for entry in entries:
        derived = {pattern.format(entry) for pattern in DERIVED}
        assert not derived & UPSTREAM_ANNEX_KNOBS, sorted(derived & UPSTREAM_ANNEX_KNOBS)
    # The old name would not pass: ANNEX_GAHP itself and its _LOG are upstream's.
    old = {pattern.format("ANNEX_GAHP") for pattern in DERIVED}
    assert old & UPSTREAM_ANNEX_KNOBS == {"ANNEX_GAHP", "ANNEX_GAHP_LOG"}


def test_the_only_upstream_knobs_the_shipped_file_sets_are_the_known_shared_two():
    # Both are contract names, kept; docs/admin.md ("Daemon name") says what each means for a
    # site that also runs upstream's tools. A new one must be decided on, not slip in.
    shared = {knob for knob, _ in _assignments()} & UPSTREAM_ANNEX_KNOBS
    assert shared == {"ANNEX_GAHP_LOG", "ANNEX_TOKEN_DOMAIN"}


def test_the_master_tails_the_helpers_own_log():
    # The master reads <entry>_LOG for its crash mail and condor_fetchlog.
    assert ("ANNEXD_LOG", "$(ANNEX_GAHP_LOG)") in _assignments()


@pytest.fixture
def knobs():
    """Set knobs in this process's HTCondor config and take them out again afterwards."""
    names: list[str] = []

    def put(name: str, value: str) -> None:
        names.append(name)
        htcondor2.param[name] = value

    yield put
    for name in names:
        del htcondor2.param[name]


def test_master_link_reads_the_alive_timeout_by_the_new_name(knobs):
    knobs("ANNEXD_NOT_RESPONDING_TIMEOUT", "120")
    link = MasterLink()
    link.configure()
    assert link.timeout == 120


def test_the_old_alive_timeout_knob_is_named_in_a_warning(knobs, caplog):
    knobs(OLD_TIMEOUT_KNOB, "77")
    link = MasterLink()
    with caplog.at_level(logging.WARNING, logger="annex_gahp"):
        link.configure()
    assert link.timeout != 77
    assert "ANNEX_GAHP_NOT_RESPONDING_TIMEOUT is no longer read" in caplog.text


def test_a_second_helper_on_the_same_state_dir_is_refused(tmp_path):
    # A site upgrading with ANNEX_GAHP still in its DAEMON_LIST starts the program twice.
    first = _take_lock(str(tmp_path))
    try:
        with pytest.raises(AnnexError, match="another annex_gahp already owns"):
            _take_lock(str(tmp_path))
    finally:
        first.close()
    _take_lock(str(tmp_path)).close()  # free again once the first one is gone
