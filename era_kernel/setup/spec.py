"""The ``setup`` body of a session: validation, the canonical form, and its content hash.

A setup spec is ``{pip: [...], npm: [...], go: [...], commands: [...]}``. Package items
become argv items of the package manager (after ``--``), never shell text, so each is
checked against the grammar of what that manager accepts from a registry, and anything
starting with ``-`` is refused. ``commands`` are shell text by design; they only ever
run with ``bash -c`` inside the sandbox.

The canonical form is what gets hashed: package lists are deduplicated and sorted (the
managers resolve them together, so order carries no meaning), pip names are normalized
(``Requests`` and ``requests`` are one package); commands keep their order. Two specs
with the same canonical form share one environment.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ..errors import BadRequest

# Bump when the environment layout or the way steps run changes: old environments
# then stop matching instead of being reused with the wrong shape.
FORMAT = 1
KINDS = ("pip", "npm", "go", "commands")
MAX_PACKAGES = 200
MAX_COMMANDS = 50
MAX_PACKAGE_CHARS = 256
MAX_COMMAND_CHARS = 16 * 1024
KEY_CHARS = 32  # hex digits of sha256 kept as the environment key (128 bits)

# npm: an optional @scope/, a name, and optionally @ a version, range or dist-tag. No
# ':' or '/' after the name, so no git, file, http or alias specs: registry packages only.
_NPM = re.compile(r"(?:@[A-Za-z0-9][A-Za-z0-9._~-]*/)?[A-Za-z0-9][A-Za-z0-9._~-]*(?:@[A-Za-z0-9._^~<>=|*+ -]+)?",
                  re.ASCII)
# Go: a module path, optionally @ a version or query (v1.2.3, latest, a commit).
_GO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~/-]*(?:@[A-Za-z0-9._+-]+)?", re.ASCII)
# Commands may span lines; any other control character is a mistake or an attack.
_COMMAND_BAD = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _bad(field: str, message: str) -> BadRequest:
    return BadRequest(f"invalid field '{field}': {message}", field=field)


def _items(value: Any, field: str, limit: int) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(field, f"must be a list of strings (got {type(value).__name__})")
    if len(value) > limit:
        raise _bad(field, f"at most {limit} items are allowed (got {len(value)})")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _bad(f"{field}[{i}]", f"must be a string (got {type(item).__name__})")
    return value


def _package(item: str, field: str) -> str:
    text = item.strip()
    if not text:
        raise _bad(field, "must not be empty")
    if len(text) > MAX_PACKAGE_CHARS:
        raise _bad(field, f"longer than {MAX_PACKAGE_CHARS} characters")
    if text.startswith("-"):
        raise _bad(field, f"{text[:40]!r} starts with '-': options are not accepted, only package names")
    if not text.isprintable():
        raise _bad(field, "contains control characters")
    return text


def normalize_pip(item: str, field: str) -> str:
    text = _package(item, field)
    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        raise _bad(field, f"{text[:60]!r} is not a pip requirement: {exc}") from None
    if req.url:
        raise _bad(field, "URL requirements are not accepted; name a package from the index")
    req.name = canonicalize_name(req.name)
    return str(req)  # packaging prints extras and specifiers in a stable order


def normalize_npm(item: str, field: str) -> str:
    text = _package(item, field)
    if not _NPM.fullmatch(text):
        raise _bad(field, f"{text[:60]!r} is not an npm registry package (name, name@version, @scope/name@range)")
    name, at, version = text.rpartition("@") if text.rfind("@") > 0 else (text, "", "")
    return f"{name}@{' '.join(version.split())}" if at else text


def normalize_go(item: str, field: str) -> str:
    text = _package(item, field)
    if not _GO.fullmatch(text) or "//" in text or ".." in text:
        raise _bad(field, f"{text[:60]!r} is not a Go module path (example.com/mod@v1.2.3)")
    return text


def normalize_command(item: str, field: str) -> str:
    if not item.strip():
        raise _bad(field, "must not be empty")
    if len(item) > MAX_COMMAND_CHARS:
        raise _bad(field, f"longer than {MAX_COMMAND_CHARS} characters")
    if _COMMAND_BAD.search(item):
        raise _bad(field, "contains control characters (only newlines and tabs are allowed)")
    return item.strip()


def normalize(setup: Any) -> dict[str, list[str]] | None:
    """Validate a setup body; return its canonical form, or None when it asks for nothing.

    Accepts a plain dict (as parsed from JSON) or the pydantic ``SetupSpec`` model.
    Raises ``BadRequest`` with ``field`` naming the offending item (``setup.pip[1]``).
    """
    if setup is None:
        return None
    if hasattr(setup, "model_dump"):
        setup = setup.model_dump()
    if not isinstance(setup, dict):
        raise _bad("setup", f"must be an object with pip, npm, go and commands lists (got {type(setup).__name__})")
    unknown = sorted(str(k) for k in setup if k not in KINDS)
    if unknown:
        raise _bad(f"setup.{unknown[0][:40]}", f"unknown key; expected one of {', '.join(KINDS)}")
    packages = {
        "pip": normalize_pip, "npm": normalize_npm, "go": normalize_go,
    }
    out: dict[str, list[str]] = {}
    for kind, norm in packages.items():
        items = _items(setup.get(kind), f"setup.{kind}", MAX_PACKAGES)
        out[kind] = sorted({norm(item, f"setup.{kind}[{i}]") for i, item in enumerate(items)})
    commands = _items(setup.get("commands"), "setup.commands", MAX_COMMANDS)
    out["commands"] = [normalize_command(c, f"setup.commands[{i}]") for i, c in enumerate(commands)]
    if not any(out.values()):
        return None
    return out


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def env_key(language: str, runtime: str, spec: dict[str, list[str]]) -> str:
    """The content address of an environment: language, runtime identity (the image id
    or the local interpreter), and the canonical spec."""
    payload = canonical_json({"format": FORMAT, "language": language, "runtime": runtime, "spec": spec})
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_CHARS]
