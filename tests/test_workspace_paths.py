"""safe_relpath: the single check every user-supplied workspace path goes through
(docs/security.md cases 12 and 16)."""

from urllib.parse import unquote

import pytest

from era_kernel.errors import BadRequest
from era_kernel.workspaces.paths import is_safe_relpath, iso_utc, safe_relpath


@pytest.mark.parametrize(
    "given, expected",
    [
        ("a.txt", "a.txt"),
        ("dir/sub/file.bin", "dir/sub/file.bin"),
        ("./a", "a"),
        ("a//b/", "a/b"),
        ("a/./b", "a/b"),
        (".hidden", ".hidden"),
        ("...", "..."),            # a name made of dots is still a name
        ("..a/b..", "..a/b.."),
        ("données/été.csv", "données/été.csv"),
        ("emoji-\U0001F600.txt", "emoji-\U0001F600.txt"),
        ("C:foo", "C:foo"),        # a plain name on POSIX
        ("x" * 255, "x" * 255),
    ],
)
def test_accepts_and_normalizes(given, expected):
    assert safe_relpath(given) == expected
    assert is_safe_relpath(expected)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".",
        "/",
        "./",
        "..",
        "../x",
        "a/../b",
        "a/..",
        unquote("%2e%2e/etc/passwd"),     # what the server hands over after decoding
        unquote("%2e%2e%2fetc%2fpasswd"),
        "../ws1evil/x",                    # sibling prefix of the workspace directory
        "/etc/passwd",
        "//etc/passwd",
        "..\\x",
        "a\\b",
        "a\x00b",
        "\x00",
        "a\nb",
        "tab\there",
        "esc\x1b[31m",
        "del\x7f",
        "c1\x85",
        "rtl\u202egnp.exe",               # right-to-left override
        "isolate\u2067x",
        "zero\u200bwidth",
        "bom\ufeff",
        "line\u2028sep",
        "bad\udcffutf8",                   # lone surrogate: undecodable input
        "x" * 256,                         # one name over NAME_MAX
        "a/" * 600 + "b",                  # over 1024 bytes in total
        "é" * 513,                         # 1026 bytes, 513 characters
    ],
)
def test_refuses(bad):
    with pytest.raises(BadRequest) as info:
        safe_relpath(bad)
    assert isinstance(info.value, BadRequest)  # 400
    assert info.value.field == "path"
    assert "Traceback" not in info.value.message


def test_refuses_non_text():
    with pytest.raises(BadRequest):
        safe_relpath(b"a.txt")  # type: ignore[arg-type]


def test_error_message_does_not_echo_the_path():
    # The message must be safe to log and return: no raw control characters from input.
    with pytest.raises(BadRequest) as info:
        safe_relpath("evil\x1b]0;title\x07")
    assert "\x1b" not in info.value.message and "\x07" not in info.value.message


def test_iso_utc():
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123Z"


@pytest.mark.parametrize(
    "path",
    ["a", "a/b", "a b/c-d_e.f", "...", ".a/..b", "x" * 255, "a/" * 511 + "b",
     "", ".", "..", "a/.", "./a", "a/../b", "a//b", "/a", "a/", "x" * 256, "a\\b", "a\x7fb",
     "a/" * 512 + "b", "é", "a\x00"],
)
def test_is_safe_relpath_fast_path_agrees_with_the_full_check(path):
    try:
        full = safe_relpath(path) == path
    except BadRequest:
        full = False
    assert is_safe_relpath(path) is full
