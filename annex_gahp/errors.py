"""Errors with messages a user can act on. Stdlib only."""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` with every character that is not printable written as its escape (`\\n`,
    `\\x00`): a message often quotes a user's value, and it goes into logs, job ads and
    protocol lines, where a raw newline or NUL would forge or cut a line."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


class AnnexError(Exception):
    """Base: the message is shown to the user as it is, so it must say what to do. It is
    always one printable line (see printable), whatever value it quotes."""

    code = "ERROR"

    def __init__(self, *args: object) -> None:
        super().__init__(*(printable(a) if isinstance(a, str) else a for a in args))


class InputError(AnnexError):
    """A value the user gave is wrong; the message names the keyword and what is allowed."""

    code = "BAD_INPUT"


class PermissionDenied(AnnexError):
    """The caller may not act on this annex (it belongs to someone else)."""

    code = "PERMISSION_DENIED"


class NotFound(AnnexError):
    code = "NOT_FOUND"


class JobGone(AnnexError):
    """The job a translate hook speaks for is no longer waiting (removed, completed, or gone
    from the queue): nothing is created for it, and the hook exits non-zero so the job router
    drops it without editing a job that is not there (docs/router.md)."""

    code = "JOB_GONE"


class LimitExceeded(AnnexError):
    """An admin limit (ANNEX_MAX_*) binds; the message names the knob."""

    code = "LIMIT"


class CloudError(AnnexError):
    """The cloud refused or failed; the message carries AWS's error code, never a secret."""

    code = "CLOUD"


class SetupError(AnnexError):
    """What `htcondor-annex setup` should have created is missing or drifted."""

    code = "SETUP"


class CredentialsError(AnnexError):
    code = "CREDENTIALS"
