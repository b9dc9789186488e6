"""`htcondor-annex install-config`: put the shipped HTCondor configuration where the pool reads it.

The files come with the package (setup.cfg's data_files: `<prefix>/share/htcondor-annex-gahp/`,
copied from the tree's condor_config.d/ and docs/submit-help.txt when the wheel is built), or
from the source tree when run from a checkout. What this writes:

- each `condor_config.d/*.conf` into the config directory, as shipped;
- `11-annex-bin-dir.conf` there: `ANNEX_BIN_DIR` = where pip put the programs (a venv's bin);
- the submit help text where 20-annex-submit.conf's EXTENDED_SUBMIT_HELPFILE looks.

A file the admin changed since this command last wrote it is left alone unless `force`: the
hashes of what it wrote are kept in `.htcondor-annex-installed` in the config directory (a dot
file, which HTCondor's LOCAL_CONFIG_DIR_EXCLUDE_REGEXP skips, and comment lines only in case a
site's does not). Stdlib only; HTCondor's bindings are asked for defaults when present.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import sysconfig
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from annex_gahp.errors import SetupError

DISTRIBUTION = "htcondor-annex-gahp"
SHARE = "share/htcondor-annex-gahp"
HELP_NAME = "submit-help.txt"
BIN_DIR_FILE = "11-annex-bin-dir.conf"
MANIFEST = ".htcondor-annex-installed"
DEFAULT_CONFIG_DIR = Path("/etc/condor/config.d")
DEFAULT_ETC = Path("/etc/condor")
HELP_FILE_NAME = "annex-submit-help.txt"  # $(ETC)/... as ANNEX_SUBMIT_HELPFILE says
# What the shipped config runs from $(ANNEX_BIN_DIR), and what users type.
PROGRAMS = ("annex_gahp", "annex_hook_translate", "annex_provision_job", "htcondor-annex")
USER_PROGRAM = "htcondor-annex"
# Where a user's login shell looks without help (Debian's and EL's default PATH, roughly).
USUAL_PATH = ("/usr/local/bin", "/usr/bin", "/bin")


@dataclasses.dataclass(frozen=True)
class Shipped:
    config: dict[str, Path]  # file name -> path of the shipped copy
    help_text: Path


@dataclasses.dataclass(frozen=True)
class Step:
    target: Path
    content: bytes
    state: str  # new | unchanged | ours (an older copy this command wrote) | changed (the admin's)


def _from_checkout() -> Shipped | None:
    top = Path(__file__).resolve().parents[1]
    config = top / "condor_config.d"
    help_text = top / "docs" / HELP_NAME
    if not (config.is_dir() and help_text.is_file()):
        return None
    return Shipped({p.name: p for p in sorted(config.glob("*.conf"))}, help_text)


def _from_install() -> Shipped | None:
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    config: dict[str, Path] = {}
    help_text = None
    for entry in dist.files or ():
        text = entry.as_posix()
        if f"{SHARE}/condor_config.d/" in text and text.endswith(".conf"):
            path = Path(str(dist.locate_file(entry)))
            config[path.name] = path
        elif text.endswith(f"{SHARE}/{HELP_NAME}"):
            help_text = Path(str(dist.locate_file(entry)))
    if not config or help_text is None:
        return None
    return Shipped(dict(sorted(config.items())), help_text)


def shipped() -> Shipped:
    """The configuration this install ships (a source checkout's own files first)."""
    found = _from_checkout() or _from_install()
    if found is None:
        raise SetupError(
            f"the shipped configuration is missing (no {SHARE}/ in the {DISTRIBUTION} install): "
            "reinstall the package with pip from its wheel or source"
        )
    missing = [p for p in (*found.config.values(), found.help_text) if not p.is_file()]
    if missing:
        raise SetupError(f"the shipped file {missing[0]} is missing: reinstall the package")
    return found


def _param(name: str) -> str:
    try:
        import htcondor2  # noqa: PLC0415 - optional: defaults from the pool's own config
    except ImportError:
        return ""
    return str(htcondor2.param.get(name) or "")


def default_config_dir() -> Path:
    # LOCAL_CONFIG_DIR may be a list (Debian: /usr/share/condor/config.d,/etc/condor/config.d);
    # the last one is read last and is the admin's.
    dirs = [d for d in _param("LOCAL_CONFIG_DIR").replace(",", " ").split() if d]
    return Path(dirs[-1]) if dirs else DEFAULT_CONFIG_DIR


def default_help_file() -> Path:
    return Path(_param("ETC") or DEFAULT_ETC) / HELP_FILE_NAME


def default_bin_dir() -> Path:
    return Path(sysconfig.get_path("scripts"))


def _unsafe(path: Path) -> str:
    """Why someone other than root (or us) could replace what is at `path`, or ''."""
    info = path.stat()
    if info.st_uid not in (0, os.geteuid()):
        return f"{path} is owned by uid {info.st_uid}"
    sticky_dir = path.is_dir() and info.st_mode & stat.S_ISVTX
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_dir:
        return f"{path} is writable by group or others"
    return ""


def check_bin_dir(bin_dir: Path) -> None:
    """The programs the config names are there, and only root can replace them: the hooks run
    as every user whose job is routed, and the master starts the helper as root."""
    for name in PROGRAMS:
        program = bin_dir / name
        if not (program.is_file() and os.access(program, os.X_OK)):
            raise SetupError(
                f"--bin-dir {bin_dir}: no program {name} there; give the directory where pip "
                "put this project's programs (a venv's bin)"
            )
    programs = [bin_dir / name for name in PROGRAMS]
    for path in (*programs, bin_dir, *bin_dir.parents):
        reason = _unsafe(path)
        if reason:
            raise SetupError(
                f"--bin-dir {bin_dir}: {reason}, and the hooks run as every user and the helper "
                "starts as root from there; install as root into a directory only root can write"
            )


def bin_dir_config(bin_dir: Path) -> bytes:
    return (
        "# Written by htcondor-annex install-config: where pip put this project's programs.\n"
        f"ANNEX_BIN_DIR = {bin_dir}\n"
    ).encode()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(config_dir: Path) -> dict[str, str]:
    """Target path -> sha256 of what this command last wrote there."""
    path = config_dir / MANIFEST
    if not path.is_file():
        return {}
    found = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "#" and len(parts[1]) == 64:
            found[parts[2]] = parts[1]
    return found


def plan(shipped_files: Shipped, config_dir: Path, help_file: Path, bin_dir: Path) -> list[Step]:
    wanted = [(config_dir / name, src.read_bytes()) for name, src in shipped_files.config.items()]
    wanted.append((config_dir / BIN_DIR_FILE, bin_dir_config(bin_dir)))
    wanted.append((help_file, shipped_files.help_text.read_bytes()))
    written = read_manifest(config_dir)
    steps = []
    for target, content in wanted:
        if not target.exists():
            state = "new"
        elif not target.is_file():
            raise SetupError(f"{target} is not a regular file: move it away first")
        else:
            current = target.read_bytes()
            if current == content:
                state = "unchanged"
            elif written.get(str(target)) == _digest(current):
                state = "ours"
            else:
                state = "changed"
        steps.append(Step(target, content, state))
    return steps


def _write(target: Path, content: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_bytes(content)
    tmp.chmod(0o644)
    os.replace(tmp, target)


def apply(steps: Iterable[Step], config_dir: Path, force: bool) -> None:
    steps = list(steps)
    changed = [s for s in steps if s.state == "changed"]
    if changed and not force:
        names = ", ".join(str(s.target) for s in changed)
        raise SetupError(
            f"not overwriting {names}: changed since htcondor-annex install-config wrote it "
            "(or not written by it); keep your changes in a file of your own that sorts later, "
            "e.g. 90-annex-local.conf, then rerun with --force"
        )
    manifest = read_manifest(config_dir)
    for step in steps:
        if step.state != "unchanged":
            _write(step.target, step.content)
        manifest[str(step.target)] = _digest(step.content)
    lines = [
        "# htcondor-annex install-config: sha256 of what it wrote last, to tell an admin's",
        "# edits from its own older copies (comments only: harmless if HTCondor reads it).",
        *(f"# {digest} {target}" for target, digest in sorted(manifest.items())),
    ]
    _write(config_dir / MANIFEST, ("\n".join(lines) + "\n").encode())


def on_usual_path(bin_dir: Path) -> bool:
    return any((Path(d) / USER_PROGRAM).resolve() == (bin_dir / USER_PROGRAM).resolve()
               for d in USUAL_PATH if (Path(d) / USER_PROGRAM).exists())  # fmt: skip


def link(bin_dir: Path, link_dir: Path, force: bool) -> Path:
    """A symlink link_dir/htcondor-annex -> bin_dir/htcondor-annex."""
    source = bin_dir / USER_PROGRAM
    target = link_dir / USER_PROGRAM
    if target.is_symlink() and target.resolve() == source.resolve():
        return target
    if (target.exists() or target.is_symlink()) and not force:
        raise SetupError(f"--link-dir: {target} exists and is not a link to {source}; --force")
    if target.exists() or target.is_symlink():
        target.unlink()
    link_dir.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source)
    return target
