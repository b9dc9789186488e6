"""No example may end a config or submit line with `# comment`.

HTCondor only treats `#` as a comment at the start of a line, in config files and in submit
files alike: `ANNEX_DEFAULT_LEASE = 2h  # two hours` sets the lease to the text
`2h  # two hours`, which is then refused or, worse, silently misread. People copy examples
verbatim, so the examples in docs/*.md and README.md, and the shipped condor_config.d/*.conf and
submit-examples/**/*.sub files, must put comments on lines of their own.

Which Markdown code blocks are config or submit text: a fenced block whose info string is
`condor`, `submit` or `ini`, or any other block without an info string (fenced or indented) in
which at least half of the non-blank, non-comment lines are `name = value` assignments. Shell
blocks (commands, where `# comment` is fine), Python and JSON do not qualify.
"""

from __future__ import annotations

import re
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]

CONFIG_INFO = {"condor", "submit", "ini"}
# `KNOB = value`, `+Attr = value`, `SLOT_TYPE_1 = ...`; not `==`, not `name=value cmd` in shell
# (those have no space before `=`; HTCondor allows that too, but no doc example writes it so).
ASSIGNMENT = re.compile(r"^\s*\+?[A-Za-z_][A-Za-z0-9_.]*\s+=(?!=)|^\s*\+?[A-Za-z_]\w*\s*=\s")
# Anything that is not a comment line, then whitespace and `#`: the `#` is part of the value.
TRAP = re.compile(r"^\s*[^#\s].*?\s#")


def code_blocks(text: str) -> list[tuple[str, list[tuple[int, str]]]]:
    """(info string, [(line number, line)]) for every fenced or indented code block."""
    blocks: list[tuple[str, list[tuple[int, str]]]] = []
    fence: tuple[str, str] | None = None
    current: list[tuple[int, str]] = []
    previous_blank = True
    for number, line in enumerate(text.splitlines(), 1):
        if fence is not None:
            if line.strip().startswith(fence[0]):
                blocks.append((fence[1], current))
                fence, current = None, []
            else:
                current.append((number, line))
            continue
        opening = re.match(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)", line)
        if opening:
            fence, current = (opening.group(1), opening.group(2).lower()), []
            continue
        if (line.startswith("    ") or line.startswith("\t")) and (current or previous_blank):
            current.append((number, line))
            continue
        if current and not line.strip():
            current.append((number, line))
            continue
        if current:
            blocks.append(("", current))
            current = []
        previous_blank = not line.strip()
    if current:
        blocks.append(("", current))
    return blocks


def is_config_or_submit(info: str, lines: list[tuple[int, str]]) -> bool:
    if info:
        return info in CONFIG_INFO
    body = [line for _, line in lines if line.strip() and not line.strip().startswith("#")]
    if not body or any(line.lstrip().startswith("$ ") for line in body):
        return False
    assignments = sum(1 for line in body if ASSIGNMENT.match(line))
    return assignments * 2 >= len(body)


def markdown_traps(path: Path) -> list[str]:
    found = []
    for info, lines in code_blocks(path.read_text()):
        if not is_config_or_submit(info, lines):
            continue
        for number, line in lines:
            if TRAP.match(line):
                found.append(f"{path.relative_to(TOP)}:{number}: {line.strip()}")
    return found


def file_traps(path: Path) -> list[str]:
    return [
        f"{path.relative_to(TOP)}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if TRAP.match(line)
    ]


def test_the_scanner_flags_a_trailing_comment_and_not_a_shell_comment() -> None:
    sample = (
        "Config:\n\n"
        "    ANNEX_DEFAULT_LEASE = 2h\n"
        "    ANNEX_MAX_LEASE = 12h   # the longest\n\n"
        "Submit:\n\n"
        "```submit\n"
        "executable = /bin/true\n"
        "queue 4  # four jobs\n"
        "```\n\n"
        "Shell:\n\n"
        "    condor_q -af AnnexState   # what the job waits for\n"
        "    htcondor-annex status --name burst   # the annex\n\n"
        "```sh\n"
        "X = 1  # not config: the fence says sh\n"
        "```\n"
    )
    blocks = code_blocks(sample)
    flagged = [
        number
        for info, lines in blocks
        if is_config_or_submit(info, lines)
        for number, line in lines
        if TRAP.match(line)
    ]
    assert flagged == [4, 10]


def test_no_doc_example_ends_a_config_or_submit_line_with_a_comment() -> None:
    paths = [*sorted((TOP / "docs").glob("*.md")), TOP / "README.md"]
    found = [trap for path in paths for trap in markdown_traps(path)]
    assert not found, "HTCondor reads these comments as part of the value:\n" + "\n".join(found)


def test_no_shipped_config_or_submit_file_ends_a_line_with_a_comment() -> None:
    paths = sorted((TOP / "condor_config.d").glob("*.conf"))
    paths += sorted((TOP / "submit-examples").rglob("*.sub"))
    assert len(paths) > 5
    found = [trap for path in paths for trap in file_traps(path)]
    assert not found, "HTCondor reads these comments as part of the value:\n" + "\n".join(found)
