"""Provision-mode user data templates, rendered where a template can reach nothing.

A template (annex_user_data_template = true) is the user's own text, and the helper that
renders it is privileged. So it is never rendered in the helper: `render()` runs this file as
a short-lived child (`python -I pilotrender.py`, no arguments taken from the user, an empty
environment, cwd /), sends the template and the annex's variables as JSON on stdin and reads
the rendered text (or the template's own one-line error) as JSON on stdout.

The child, before it reads a byte of the template (`confine()`):
- sets its own wall-clock alarm (SIGALRM's default action ends it, whatever it is doing);
- holds no root: started by the helper, it is the condor user through and through (the
  helper keeps no root; and even a saved uid of 0 would not survive execve, which sets the
  saved uid to the effective one); started by root (any uid/gid 0), it becomes `nobody` for
  good (real, effective and saved uid and gid, no supplementary groups). Either way it checks
  root cannot be had back;
- sets no_new_privs (prctl), so no setuid program can give privilege back, and dies with
  the helper (PR_SET_PDEATHSIG);
- limits itself (`limit()`, once jinja2 is imported): CPU seconds, address space, no file
  writes (RLIMIT_FSIZE 0), no new processes (RLIMIT_NPROC 0), a few descriptors, no core.

There the template is rendered by jinja2's ImmutableSandboxedEnvironment: no extensions, no
autoescape (a shell script, not HTML), StrictUndefined (an unknown name is an error, as it
was before), only range/dict/namespace as globals, no loader (include/import/extends
refused), `*` and `**` bounded before they build a huge value, range() capped by jinja2's
MAX_RANGE, output stopped at OUTPUT_LIMIT.
The parent kills a child that outlives the timeout (when the child became `nobody` the kill
may not be allowed; then its own alarm and RLIMIT_CPU end it a moment later).

Only plain values cross: str/int/bool/float/None, lists and str-keyed dicts of them
(`plain()`), so no Python object of the helper is ever within a template's reach.

Stdlib only at import (the parent side); the child imports jinja2.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import subprocess
import sys

TIMEOUT = 5  # seconds of wall clock for one rendering, start-up included
CPU_SECONDS = 4
MEMORY_HEADROOM = 256 * 1024 * 1024  # address space beyond what the child has after imports
TEMPLATE_LIMIT = 1024 * 1024  # bytes of template text taken
OUTPUT_LIMIT = 1024 * 1024  # characters of rendered text the child produces at most
NOFILE = 16
RESULT_LIMIT = 4 * OUTPUT_LIMIT + 65536  # bytes of JSON the parent reads at most
REQUEST_LIMIT = 6 * TEMPLATE_LIMIT + 65536  # bytes of JSON the child reads (\u escapes)
ERROR_LIMIT = 300  # characters of an error message
NOBODY = "nobody"
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

log = logging.getLogger("annex_gahp.pilotrender")


class RenderError(ValueError):
    """The template does not render; the message is one line, the template's own reason."""


def one_line(text: str, limit: int = ERROR_LIMIT) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plain(value: object, depth: int = 0) -> object:
    """`value` if it is made of JSON's plain types only; else ValueError. What a template gets
    is what JSON carries, nothing with a method of the helper's behind it."""
    if depth > 8:
        raise ValueError("template variables nest too deeply")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: plain(v, depth + 1) for k, v in value.items()}
    raise ValueError(f"a template variable may not be a {type(value).__name__}")


# --- the parent (the helper) -----------------------------------------------------------------


def render(template: str, variables: dict[str, object], timeout: float = TIMEOUT) -> str:
    """`template` rendered with `variables` in a confined child; RenderError says why not."""
    if len(template.encode("utf-8")) > TEMPLATE_LIMIT:
        raise RenderError(f"the template is over {TEMPLATE_LIMIT} bytes")
    request = json.dumps(
        {"template": template, "variables": plain(variables), "timeout": timeout},
        ensure_ascii=False,
    ).encode("utf-8")
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
            cwd="/",
            close_fds=True,
            start_new_session=True,
        )
    except OSError as exc:
        why = exc.strerror or exc
        log.error("the template renderer could not start (%s)", why)
        raise RenderError(f"the template renderer could not start ({why})") from None
    try:
        out, err = child.communicate(request, timeout=timeout + 1)
    except subprocess.TimeoutExpired:
        _kill(child)
        raise RenderError(f"rendering took longer than {timeout:g} s, so it was stopped") from None
    return _answer(child.returncode, out, err, timeout)


def _kill(child: subprocess.Popen[bytes]) -> None:
    try:
        child.kill()
    except PermissionError:
        pass  # it became nobody; its own alarm and RLIMIT_CPU end it
    try:
        child.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        pass


def _answer(code: int, out: bytes, err: bytes, timeout: float) -> str:
    if code in (-signal.SIGALRM, -signal.SIGXCPU, -signal.SIGKILL):
        raise RenderError(f"rendering took longer than {timeout:g} s, so it was stopped")
    try:
        if len(out) > RESULT_LIMIT:
            raise ValueError("too long")
        answer = json.loads(out.decode("utf-8"))
    except ValueError:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        why = one_line(lines[-1] if lines else f"exit status {code}")
        log.error("the template renderer failed (%s)", why)
        raise RenderError(f"the template renderer failed ({why})") from None
    if "error" in answer:
        why = one_line(answer["error"])
        if why.startswith("the template renderer"):
            # Not the template's fault: the admin must hear of it (it holds every template job).
            log.error("%s", why)
        raise RenderError(why)
    output = answer.get("output")
    if not isinstance(output, str):
        raise RenderError("the template renderer gave no output")
    return output


# --- the child -------------------------------------------------------------------------------


def _libc_prctl(option: int, arg: int) -> int:
    import ctypes  # noqa: PLC0415

    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.prctl(option, arg, 0, 0, 0)
    if result < 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")
    return int(result)


def drop_root() -> None:
    """Become `nobody` for good if any uid/gid is root; then make sure root is out of reach."""
    if 0 not in os.getresuid() and 0 not in os.getresgid():
        return
    import pwd  # noqa: PLC0415

    try:
        entry = pwd.getpwnam(NOBODY)
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        uid = gid = 65534
    if os.geteuid() != 0:
        os.seteuid(0)  # only possible through the saved uid, and only to give it up below
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if 0 in os.getresuid() or 0 in os.getresgid() or os.getgroups():
        raise OSError("could not give up root")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise OSError("root could be regained")


def confine(timeout: float) -> None:
    """All that is done before the template is read, except the limits that need jinja2
    imported first (`limit()`)."""
    signal.alarm(max(1, math.ceil(timeout)))
    os.chdir("/")
    os.umask(0o077)
    drop_root()
    _libc_prctl(PR_SET_NO_NEW_PRIVS, 1)
    # After the uid change: a credential change clears the parent-death signal.
    _libc_prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        raise OSError("the helper is gone")


def _address_space() -> int:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[0])
    return pages * os.sysconf("SC_PAGE_SIZE")


def limit() -> None:
    cpu = CPU_SECONDS
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    memory = _address_space() + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def sandbox():
    """The environment a template renders in."""
    import jinja2  # noqa: PLC0415
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError  # noqa: PLC0415

    class NoFiles(jinja2.BaseLoader):
        def get_source(self, environment, template):
            raise jinja2.TemplateNotFound(
                template,
                f"{template!r}: a user data template is one file; include, import and "
                "extends are not available",
            )

    class Bounded(ImmutableSandboxedEnvironment):
        # Intercepted, these are also never folded at compile time.
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                        if len(seq) * times > OUTPUT_LIMIT:
                            raise SecurityError(
                                f"'*' would make {len(seq) * times} items, over the limit "
                                f"of {OUTPUT_LIMIT}"
                            )
            if operator == "**" and isinstance(left, int) and isinstance(right, int):
                if right > 0 and abs(left) > 1 and right * math.log2(abs(left)) > 4096:
                    raise SecurityError("'**' would make a number over 4096 bits")
            return super().call_binop(context, operator, left, right)

    env = Bounded(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        extensions=(),
        loader=NoFiles(),
        keep_trailing_newline=True,
        auto_reload=False,
    )
    # Objects of jinja2's own a boot script has no use for; fewer objects, less to probe.
    for name in ("lipsum", "cycler", "joiner"):
        env.globals.pop(name, None)
    return env


def _line(exc: BaseException) -> int | None:
    line = getattr(exc, "lineno", None)
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def explain(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        reason = f"the template needs more than {MEMORY_HEADROOM // 2**20} MB of memory"
    elif isinstance(exc, RecursionError):
        reason = "the template recurses too deeply"
    else:
        reason = str(exc) or type(exc).__name__
        if not isinstance(exc, RenderError) and type(exc).__module__ not in (
            "jinja2.exceptions",
            "jinja2.sandbox",
        ):
            reason = f"{type(exc).__name__}: {reason}"
    line = _line(exc)
    return one_line(f"line {line}: {reason}" if line else reason)


def produce(env, template: str, variables: dict) -> str:
    out: list[str] = []
    size = 0
    for piece in env.from_string(template).generate(**variables):
        size += len(piece)
        if size > OUTPUT_LIMIT:
            raise RenderError(f"the rendered text is over {OUTPUT_LIMIT} characters")
        out.append(piece)
    return "".join(out)


def main() -> int:
    try:
        confine(TIMEOUT)
        env = sandbox()
        limit()
        raw = sys.stdin.buffer.read(REQUEST_LIMIT + 1)
        request = json.loads(raw.decode("utf-8"))
        timeout = float(request.get("timeout", TIMEOUT))
        signal.alarm(max(1, math.ceil(timeout)))
        template = request["template"]
        if len(template) > TEMPLATE_LIMIT:
            raise RenderError(f"the template is over {TEMPLATE_LIMIT} bytes")
        variables = plain(request.get("variables") or {})
    except Exception as exc:  # a child that cannot confine itself renders nothing
        sys.stdout.write(json.dumps({"error": f"the template renderer could not start: {exc}"}))
        return 1
    try:
        answer = {"output": produce(env, template, variables)}
    except BaseException as exc:  # every failure is the template's, said in one line
        answer = {"error": explain(exc)}
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
