"""Every difference between the HTCondor Python bindings the helper runs with, in one place.

Supported: HTCondor 23.9 or later (`htcondor2`/`classad2`). Checked against Debian's 23.9.6 and
PyPI's 24.0 LTS and 25.x wheels (scripts/test compat; docs/admin.md "Requirements"):

- A `Schedd.edit` whose constraint matches no job raises `OSError` in 23.9 and
  `htcondor2.HTCondorException` (a plain Exception) from 23.10 on: `EditFailed` is both.
- A knob set to empty (`KNOB =`): `param.get` says `""` in 23.9 and `None` from 24.0.9 on, and
  24/25 offer no other way to tell the two apart (`in param`, `param[...]`, iterating: all say
  "not set"). `param()` makes it `None` on every version, which is also what
  `condor_config_val` says of an empty knob on 23.9 ("Not defined"): an empty knob takes its
  default, the same everywhere.
- `ClassAd.eval()` of `undefined` or `error` returns `classad2.Value.Undefined`/`.Error`, an
  IntEnum (so `isinstance(v, int)` is True) on every version: `plain()` drops them.
- `set_ready_state` exists from 24.1.1 only.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any


@functools.cache
def _htcondor() -> Any:
    import htcondor2  # noqa: PLC0415 - heavy import kept out of module load (the hooks)

    return htcondor2


def edit_failed() -> tuple[type[BaseException], ...]:
    """What `Schedd.edit` raises when its constraint matches no job (or the edit is refused):
    OSError in 23.9, htcondor2.HTCondorException from 23.10 on. Looked up on every call, so a
    test can put in the newer class."""
    newer = getattr(_htcondor(), "HTCondorException", None)
    if isinstance(newer, type) and issubclass(newer, BaseException):
        return (OSError, newer)
    return (OSError,)


def param(name: str) -> str | None:
    """A knob's value, or None when it is not set or set to empty (the same on every version:
    23.9's "" for `KNOB =` is None here, as it is in 24.0.9 on)."""
    value = _htcondor().param.get(name)
    if value is None:
        return None
    text = str(value)
    return text if text.strip() else None


def plain(value: Any) -> str | int | float | bool | None:
    """A value from `ClassAd.eval()` as Python: None for ClassAd undefined and error (an
    IntEnum, not a number) and for anything that is not a literal (lists, ads)."""
    import classad2  # noqa: PLC0415

    if isinstance(value, classad2.Value):
        return None
    if isinstance(value, (str, bool, int, float)):
        return value
    return None


def quote(value: str) -> str:
    """`value` as a ClassAd string literal: the bindings' own quoting (classad2.quote, the same
    on 23.9 and 25.x): the one quoting of the project (the hooks print what it wrote)."""
    import classad2  # noqa: PLC0415

    return classad2.quote(value)


def is_error(value: Any) -> bool:
    """True for ClassAd `error` from `ClassAd.eval()` (classad2.Value.Error)."""
    import classad2  # noqa: PLC0415

    return isinstance(value, classad2.Value) and value == classad2.Value.Error


def set_ready_state() -> Callable[[str], Any] | None:
    """htcondor2.set_ready_state (24.1.1 on), else None."""
    return getattr(_htcondor(), "set_ready_state", None)


_VERSION = re.compile(r"\$CondorVersion:\s*(\d+\.\d+\.\d+)")


def version() -> str:
    """The bindings' HTCondor version, "23.9.6"; the whole banner when it cannot be read."""
    banner = str(_htcondor().version())
    match = _VERSION.search(banner)
    return match.group(1) if match else banner.strip()
