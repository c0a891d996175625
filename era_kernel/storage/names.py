"""The names a storage call carries (namespace, database, bucket, key), checked before
anything else: a strict pattern each, and a 400 naming the field otherwise.

Names never enter SQL text (KV and the object index are parameters; a D1 database name
becomes a file name, never an identifier), and an object key never becomes a path (the
object is stored under a digest of it), so no name can climb out of its place."""

from __future__ import annotations

import re

from ..errors import BadRequest

# A namespace, database or bucket: also a file or directory name, so no dot first.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
NAME_RULE = "1-63 of A-Z a-z 0-9 _ -, starting with a letter or digit"
MAX_KEY = 512
# A KV or object key is only ever a parameter (objects are stored under a digest of it):
# any text without control characters.
KEY = re.compile(r"[^\x00-\x1f\x7f]{1,%d}" % MAX_KEY)


def check_name(value: object, field: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise BadRequest(f"invalid {field}: use {NAME_RULE}", field=field)
    return value


def check_key(value: object, field: str = "key") -> str:
    if not isinstance(value, str) or not KEY.fullmatch(value):
        raise BadRequest(f"invalid {field}: 1-{MAX_KEY} characters, no control characters", field=field)
    return value


def check_prefix(value: str | None, field: str = "prefix") -> str:
    """A listing prefix: only ever compared, never a path; bounded and printable."""
    if value is None:
        return ""
    if len(value) > MAX_KEY or re.search(r"[\x00-\x1f\x7f]", value):
        raise BadRequest(f"invalid {field}: at most {MAX_KEY} characters, no control characters", field=field)
    return value
