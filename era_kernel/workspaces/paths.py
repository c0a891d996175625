"""User-supplied file paths, checked once at the edge and normalized.

A workspace path is a relative, ``/``-separated sequence of plain names. Everything that
could step out of the workspace (``..``, absolute paths), confuse a reader of logs or a
listing (control, bidi and other invisible characters), or mean different things on
different layers (backslashes, NUL, text that is not UTF-8) is refused with a 400 that
names no file outside the workspace. Percent-decoding is the server's job: by the time a
path gets here ``%2e%2e`` is already ``..``.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime, timezone

from ..errors import BadRequest

MAX_PATH_BYTES = 1024
MAX_NAME_BYTES = 255  # NAME_MAX on Linux: refuse here rather than fail with ENAMETOOLONG later

# Unicode categories refused anywhere in a path: controls (Cc: NUL, newline, ESC...),
# format characters (Cf: right-to-left overrides, zero-width spaces, BOM), lone
# surrogates (Cs: what undecodable bytes become), line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _bad(reason: str) -> BadRequest:
    return BadRequest(f"invalid file path: {reason}", field="path")


def safe_relpath(path: str) -> str:
    """Return ``path`` normalized (no empty or ``.`` segments), or raise ``BadRequest``.

    Normalization only drops what cannot change the meaning (``a//b``, ``./a``, ``a/``);
    anything ambiguous is refused instead of being "fixed".
    """
    if not isinstance(path, str):
        raise _bad("not text")
    if not path:
        raise _bad("empty")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("not valid UTF-8") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise _bad(f"longer than {MAX_PATH_BYTES} bytes")
    if "\\" in path:
        raise _bad("backslashes are not allowed")
    for char in path:
        if unicodedata.category(char) in _REFUSED_CATEGORIES:
            raise _bad(f"character U+{ord(char):04X} is not allowed")
    if path.startswith("/"):
        raise _bad("absolute paths are not allowed")
    names = []
    for name in path.split("/"):
        if name in ("", "."):
            continue
        if name == "..":
            raise _bad("'..' is not allowed")
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise _bad(f"a name is longer than {MAX_NAME_BYTES} bytes")
        names.append(name)
    if not names:
        raise _bad("names no file")
    return "/".join(names)


# Printable ASCII names without backslash, joined by single slashes: the common case,
# checked with one regex instead of a Unicode lookup per character.
_PLAIN_ASCII = re.compile(r"[\x20-\x2e\x30-\x5b\x5d-\x7e]{1,255}(?:/[\x20-\x2e\x30-\x5b\x5d-\x7e]{1,255})*")


def is_safe_relpath(path: str) -> bool:
    """True when ``path`` is already in the normal form ``safe_relpath`` returns."""
    if len(path) <= MAX_PATH_BYTES and _PLAIN_ASCII.fullmatch(path):
        wrapped = f"/{path}/"
        return "/./" not in wrapped and "/../" not in wrapped
    try:
        return safe_relpath(path) == path
    except BadRequest:
        return False


def iso_utc(timestamp_ns: int) -> str:
    """``2024-05-01T12:00:00.123Z`` from nanoseconds since the epoch."""
    moment = datetime.fromtimestamp(timestamp_ns / 1e9, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
