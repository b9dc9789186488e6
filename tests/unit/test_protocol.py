"""The GAHP line codec: escaping, framing, limits, key=value arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from annex_gahp.protocol import (
    MAX_LINE_BYTES,
    LineSplitter,
    LineTooLong,
    ProtocolError,
    decode_line,
    encode_line,
    escape_arg,
    format_kv,
    join_args,
    parse_kv,
    split_args,
)


@pytest.mark.parametrize(
    ("line", "args"),
    [
        ("COMMANDS", ["COMMANDS"]),
        ("RESULTS\r", ["RESULTS"]),  # CRLF terminator, LF already stripped
        ("", []),
        ("a b c", ["a", "b", "c"]),
        ("a\\ b c", ["a b", "c"]),
        ("a\\\\ b", ["a\\", "b"]),
        ("a\\\\\\ b", ["a\\ b"]),
        ("a  b", ["a", "", "b"]),  # two spaces: an empty argument, as upstream reads it
        ("a ", ["a", ""]),
        (" a", ["", "a"]),
        ("ad=A\\\n=\\ 1", ["ad=A\n= 1"]),  # escaped LF inside an argument
        ("x\\\ry", ["x\ry"]),
        ("x\\\r", ["x\r"]),  # an escaped CR at the end is content, not a terminator
        ("name=é\tü", ["name=é\tü"]),
    ],
)
def test_split(line: str, args: list[str]) -> None:
    assert split_args(line) == args


def test_upstream_version_example() -> None:
    # Upstream's spec example: spaces inside the description are escaped.
    line = "S $GahpVersion: 1.0.0 Nov 26 2001 NCSA\\ CoG\\ Gahpd $"
    assert split_args(line)[-2:] == ["NCSA CoG Gahpd", "$"]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("a\\x", "bad escape"),
        ("a\\n", "bad escape"),  # `\n` the two characters is not a line break here
        ("a\\", "lone backslash"),
        ("a\rb", "unescaped line break"),
        ("a\nb", "unescaped line break"),
    ],
)
def test_split_errors(line: str, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        split_args(line)


def test_escape_matches_upstream_set() -> None:
    # upstream escapeGahpString: space, backslash, CR and LF get a backslash; nothing else.
    assert escape_arg("a b\\c\rd\ne=f\t") == "a\\ b\\\\c\\\rd\\\ne=f\t"


def test_join_round_trip_and_single_empty() -> None:
    args = ["CMD", "7", 'ad=A = 1\nB = "x y"', "", "k=\\"]
    assert split_args(join_args(args)) == args
    assert join_args([]) == ""
    with pytest.raises(ProtocolError):
        join_args([""])
    with pytest.raises(TypeError):
        join_args(["a", 3])  # type: ignore[list-item]


def test_encode_line() -> None:
    assert encode_line(["S", "a b"]) == b"S a\\ b\n"
    with pytest.raises(ProtocolError):
        encode_line(["\udc80"])  # a lone surrogate has no UTF-8 form


def test_decode_line() -> None:
    assert decode_line(b"COMMANDS\r\n") == "COMMANDS"
    assert decode_line(b"COMMANDS\n") == "COMMANDS"
    assert decode_line("é".encode()) == "é"
    with pytest.raises(ProtocolError, match="UTF-8"):
        decode_line(b"\xff\xfe")
    with pytest.raises(LineTooLong):
        decode_line(b"x" * 11, max_bytes=10)
    assert decode_line(b"x" * 10 + b"\r\n", max_bytes=10) == "x" * 10


def test_splitter_frames_on_unescaped_lf_only() -> None:
    s = LineSplitter()
    assert s.feed(b"A\\\nB") == []  # escaped LF: same line
    assert s.pending == 4
    assert s.feed(b"\r\nC\nD") == [b"A\\\nB\r", b"C"]
    assert s.pending == 1
    assert s.feed(b"\\\\\n") == [b"D\\\\"]  # even run of backslashes: LF is a terminator


def test_splitter_escape_split_across_chunks() -> None:
    s = LineSplitter()
    assert s.feed(b"x\\") == []
    assert s.feed(b"\n") == []  # the backslash from the previous chunk escapes this LF
    assert s.feed(b"y\n") == [b"x\\\ny"]


def test_splitter_byte_at_a_time() -> None:
    data = encode_line(["CMD", "1", "ad=a\nb c\\"]) + encode_line(["RESULTS"])
    s = LineSplitter()
    lines: list[bytes] = []
    for b in data:
        lines += s.feed(bytes([b]))
    assert [split_args(decode_line(x)) for x in lines] == [["CMD", "1", "ad=a\nb c\\"], ["RESULTS"]]


def test_splitter_limit() -> None:
    s = LineSplitter(max_bytes=10)
    assert s.feed(b"x" * 10 + b"\r\n") == [b"x" * 10 + b"\r"]
    with pytest.raises(LineTooLong, match="10 bytes"):
        s.feed(b"y" * 12)  # no line feed yet: still refused, nothing buffered without bound
    s = LineSplitter(max_bytes=10)
    with pytest.raises(LineTooLong) as info:
        s.feed(b"ok\n" + b"z" * 20 + b"\n")
    assert info.value.lines == [b"ok"]  # what came before can still be answered


def test_default_limit_fits_a_job_ad() -> None:
    ad = "\n".join(f'Attr{i} = "{"v" * 80}"' for i in range(120))  # ~11 KB
    line = encode_line(["JOB_ROUTED", "1", f"ad={ad}"])
    assert len(line) < MAX_LINE_BYTES
    (raw,) = LineSplitter().feed(line)
    assert parse_kv(split_args(decode_line(raw))[2:]) == {"ad": ad}


def test_parse_kv() -> None:
    assert parse_kv(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    assert parse_kv([]) == {}
    with pytest.raises(ProtocolError, match="not key=value"):
        parse_kv(["novalue"])
    with pytest.raises(ProtocolError, match="twice"):
        parse_kv(["a=1", "a=2"])
    with pytest.raises(ProtocolError, match="bad key"):
        parse_kv(["=1"])
    with pytest.raises(ProtocolError, match="bad key"):
        parse_kv(["a b=1"])


def test_format_kv() -> None:
    assert format_kv({"name": "a", "lease": "3600"}) == ["name=a", "lease=3600"]
    assert parse_kv(format_kv({"json": '{"a": "b=c"}'})) == {"json": '{"a": "b=c"}'}
    with pytest.raises(TypeError):
        format_kv({"n": 1})  # type: ignore[dict-item]
    with pytest.raises(ProtocolError):
        format_kv({"a=b": "1"})


def test_protocol_doc_examples_are_well_formed() -> None:
    """Every example line in docs/protocol.md follows the escaping rules it states."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
    examples = [
        line.strip()[3:].replace("⏎", "\n")  # the doc's mark for a real line feed
        for line in doc.read_text().splitlines()
        # `<...>` are placeholders; `\t` is the doc's deliberately bad example.
        if line.strip().startswith(("C: ", "H: ")) and "<" not in line and "\\t" not in line
    ]
    assert len(examples) > 40
    for example in examples:
        split_args(example)
    # Every command of the design's table is specified there.
    for command in (
        "ANNEX_CREATE",
        "ANNEX_EXTEND",
        "ANNEX_DELETE",
        "ANNEX_STATUS",
        "ANNEX_LIST",
        "JOB_ROUTED",
        "JOB_UPDATE",
        "JOB_FINALIZE",
        "JOB_CLEANUP",
    ):
        assert f"#### {command}" in doc.read_text()
