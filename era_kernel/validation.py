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


CALLBACK_URL_MAX = 2048


def callback_url_problem(value: Any) -> str | None:
    """What is wrong with a run's ``callback_url`` as written, or None: an absolute http(s)
    URL with a host. Only its shape: where it may go (resolved, against
    ``ERA_CALLBACK_ALLOW``) is the engine's check (engine/callback_targets.py)."""
    from urllib.parse import urlsplit

    if not isinstance(value, str):
        return "must be a string"
    if len(value) > CALLBACK_URL_MAX:
        return f"is longer than {CALLBACK_URL_MAX} characters"
    if any(ch <= " " or ch == "\x7f" for ch in value):  # urlsplit strips some of these silently
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError for a port out of range or not a number)
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "has no host"
    return None
