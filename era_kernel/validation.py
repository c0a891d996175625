"""The rules every identifier and environment variable a request or a launch carries must
follow, in one place: the API's models, the kernels' startup cells, the provisioners and
the workspace store all check with these. Patterns are used with ``fullmatch`` only:
``$`` would also match before a trailing newline."""

from __future__ import annotations

import re
from typing import Any

SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}", re.ASCII)
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}", re.ASCII)  # a name a shell accepts


def is_session_id(value: Any) -> bool:
    return isinstance(value, str) and SESSION_ID_RE.fullmatch(value) is not None


def env_problem(key: Any, value: Any) -> str | None:
    """What is wrong with one environment variable, or None. The one rule for every env a
    request or a launch carries: a name a shell accepts, a string value a process
    environment can hold (no NUL, valid Unicode)."""
    if not isinstance(key, str) or not ENV_NAME_RE.fullmatch(key):
        return f"invalid variable name {str(key)[:40]!r}"
    if not isinstance(value, str):
        return f"value of {key} must be a string"
    if "\x00" in value:
        return f"value of {key} contains a NUL byte"
    try:  # JSON allows a lone surrogate ("\ud83d"); a process environment cannot hold one
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"value of {key} is not valid Unicode text (a lone surrogate)"
    return None
