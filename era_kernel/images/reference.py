"""Strict validation of image references and language names that come from requests.

An image name ends up as an argument of a Docker API call, never of a command line, but
it is still refused unless it matches Docker's reference grammar exactly, so that
`--privileged`, `-v /:/host`, whitespace, NUL or shell syntax can never reach the
engine as an image name (docs/security.md case 17).
"""

from __future__ import annotations

import re

from ..errors import BadRequest

# Docker's distribution/reference grammar, anchored, ASCII only.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?)"
_PATH_COMPONENT = r"(?:[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_REF_RE = re.compile(rf"(?P<name>{_NAME})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?", re.ASCII)
LANGUAGE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}", re.ASCII)
MAX_REF_LENGTH = 255


def validate_image_ref(ref: object, *, field: str = "image") -> str:
    """Return ``ref`` unchanged if it is a plain Docker image reference, else raise BadRequest."""
    if not isinstance(ref, str) or not ref:
        raise BadRequest("image must be a non-empty string", field=field)
    match = IMAGE_REF_RE.fullmatch(ref) if not ref.startswith("-") and len(ref) <= MAX_REF_LENGTH else None
    if match is None or not _first_component_ok(match.group("name")):
        raise BadRequest(f"invalid image reference {ref[:80]!r}", field=field)
    return ref


def _first_component_ok(name: str) -> bool:
    # Docker reads the first component as a registry only if it has a dot or a port or
    # is "localhost"; otherwise it is a repository path component, lowercase only.
    first, sep, _ = name.partition("/")
    if not sep or "." in first or ":" in first or first == "localhost":
        return True
    return first == first.lower()


def validate_language(language: object, *, field: str = "language") -> str:
    """Language names become image repository names and recipe directory names."""
    if not isinstance(language, str) or not LANGUAGE_RE.fullmatch(language):
        raise BadRequest(f"invalid language name {str(language)[:80]!r}", field=field)
    return language


def split_ref(ref: str) -> tuple[str, str]:
    """``era/python:abc`` -> (``era/python``, ``abc``); no tag means ``latest``."""
    match = IMAGE_REF_RE.fullmatch(validate_image_ref(ref))
    assert match is not None
    return match.group("name"), match.group("tag") or "latest"
