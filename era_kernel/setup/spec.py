"""The ``setup`` body of a session: validation, the canonical form, and its content hash.

A setup spec, as ERA takes it::

    {"pip": [...] | {"requirements": "<requirements.txt>"},
     "npm": [...] | {"packageJson": "<package.json>"},
     "go": [...] | {"goMod": "<go.mod>"},
     "commands": [...], "envs": {"NAME": "value"}}

Package items become argv items of the package manager (after ``--``), never shell text
or options, so each is checked against the grammar of what that manager accepts from a
registry, and anything starting with ``-`` is refused. The text forms are parsed here,
line by line or as JSON, into the same items: a requirements line that is an option
(``-r``, ``--index-url``, ``-e``) or a URL, a package.json dependency that is a git, file
or URL spec, are refused with the line or the dependency named in ``field``. The text of
``requirements`` and ``packageJson`` is also kept: the session finds it as
``requirements.txt`` / ``package.json`` in its workspace, as ERA writes them into its VM.
``commands`` are shell text by design; they only ever run with ``bash -c`` inside the
session's sandbox, with ``envs`` (which nothing else sees: not the package installs,
not the session's runs).

The canonical form keeps each kind in the form it was given (lists deduplicated and
sorted, pip names normalized; texts verbatim), so ``normalize`` is idempotent and
records hold it. The shared environment is addressed by ``packages(spec)`` only: two
sessions asking for the same packages share one, whatever their commands or envs.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ..errors import BadRequest
from ..validation import env_problem

# Bump when the environment layout or the way steps run changes: old environments
# then stop matching instead of being reused with the wrong shape. 2: commands left the
# shared environment (they run per session).
FORMAT = 2
KINDS = ("pip", "npm", "go", "commands", "envs")
TEXT_FORMS = {"pip": "requirements", "npm": "packageJson", "go": "goMod"}
# What the session finds in its workspace for a text form (ERA writes them there too).
# go.mod is not written: in the workspace it would turn the Go kernel's directory into
# a module of the user's, which the kernel does not expect.
WORKSPACE_FILES = {"requirements": "requirements.txt", "packageJson": "package.json"}
MAX_PACKAGES = 200
MAX_COMMANDS = 50
MAX_ENVS = 100
MAX_PACKAGE_CHARS = 256
MAX_COMMAND_CHARS = 16 * 1024
MAX_TEXT_CHARS = 256 * 1024
KEY_CHARS = 32  # hex digits of sha256 kept as the environment key (128 bits)

# npm: an optional @scope/, a name, and optionally @ a version, range or dist-tag. No
# ':' or '/' after the name, so no git, file, http or alias specs: registry packages only.
_NPM = re.compile(r"(?:@[A-Za-z0-9][A-Za-z0-9._~-]*/)?[A-Za-z0-9][A-Za-z0-9._~-]*(?:@[A-Za-z0-9._^~<>=|*+ -]+)?",
                  re.ASCII)
_NPM_NAME = re.compile(r"(?:@[A-Za-z0-9][A-Za-z0-9._~-]*/)?[A-Za-z0-9][A-Za-z0-9._~-]*", re.ASCII)
_NPM_RANGE = re.compile(r"[A-Za-z0-9._^~<>=|*+ -]+", re.ASCII)
# Go: a module path, optionally @ a version or query (v1.2.3, latest, a commit).
_GO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~/-]*(?:@[A-Za-z0-9._+-]+)?", re.ASCII)
_GO_VERSION = re.compile(r"v[0-9A-Za-z._+-]+", re.ASCII)
# Commands may span lines; any other control character is a mistake or an attack.
_COMMAND_BAD = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# A requirements line's trailing comment (pip: '#' preceded by whitespace).
_REQ_COMMENT = re.compile(r"(^|\s+)#.*$")


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
        raise _bad(field, f"{text[:60]!r} is not a pip requirement: {str(exc).splitlines()[0]}") from None
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


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _bad(field, f"must be a string (got {type(value).__name__})")
    if len(value) > MAX_TEXT_CHARS:
        raise _bad(field, f"longer than {MAX_TEXT_CHARS} characters")
    if "\x00" in value:
        raise _bad(field, "contains a NUL byte")
    return value


def requirements_items(text: str, field: str) -> list[str]:
    """The packages of a requirements.txt: one requirement per line, comments and blank
    lines dropped, ``\\`` continuations joined. Options (``-r``, ``-e``, ``--index-url``,
    ``--hash``...) and URLs are refused, naming the line: they would reach pip as options."""
    items: list[str] = []
    lines = text.splitlines()
    number, pending, first = 0, "", 0
    for number, raw in enumerate(lines, 1):
        line = _REQ_COMMENT.sub("", raw).rstrip()
        if not pending:
            first = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if not line:
            continue
        where = f"{field} line {first}"
        if line.startswith("-"):
            raise _bad(where, f"{line[:40]!r} is a pip option; only package requirements are accepted")
        if "://" in line or line.startswith(("git+", "hg+", "svn+", "bzr+", ".", "/")):
            raise _bad(where, f"{line[:60]!r}: URLs and paths are not accepted; name a package from the index")
        items.append(normalize_pip(line, where))
        if len(items) > MAX_PACKAGES:
            raise _bad(field, f"at most {MAX_PACKAGES} requirements are allowed")
    if pending.strip():
        raise _bad(f"{field} line {first}", "ends with a line continuation")
    return items


def package_json_items(text: str, field: str) -> list[str]:
    """npm items of a package.json's ``dependencies`` (and ``devDependencies``, which a
    plain ``npm install`` installs too): each a registry name with a version range or
    dist-tag. git, file, link, URL, alias and workspace specs are refused by name."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise _bad(field, f"is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _bad(field, "must be a JSON object")
    items: list[str] = []
    for section in ("dependencies", "devDependencies"):
        deps = doc.get(section)
        if deps is None:
            continue
        if not isinstance(deps, dict):
            raise _bad(f"{field}.{section}", "must be an object of package names to versions")
        for name, version in deps.items():
            where = f"{field}.{section}.{str(name)[:60]}"
            if not isinstance(name, str) or not _NPM_NAME.fullmatch(name) or len(name) > MAX_PACKAGE_CHARS:
                raise _bad(where, "is not an npm package name")
            if not isinstance(version, str):
                raise _bad(where, "the version must be a string")
            spec = " ".join(version.split()) or "*"
            if not _NPM_RANGE.fullmatch(spec) or len(spec) > MAX_PACKAGE_CHARS:
                raise _bad(where, f"{version[:60]!r} is not a registry version range (git, file, link, URL and "
                                  "alias specs are not accepted)")
            items.append(normalize_npm(f"{name}@{spec}", where))
    if len(items) > MAX_PACKAGES:
        raise _bad(field, f"at most {MAX_PACKAGES} dependencies are allowed")
    return items


def go_mod_items(text: str, field: str) -> list[str]:
    """``module@version`` of each ``require`` of a go.mod, in single-line and block form
    (``// indirect`` and other comments dropped). ``replace`` directives are not followed:
    a module comes from the proxy as required, never from a path or another module."""
    items: list[str] = []
    in_block = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("//", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if in_block:
            if line == ")":
                in_block = False
                continue
            entry = words
        elif words[0] == "require":
            if words[1:] == ["("]:
                in_block = True
                continue
            entry = words[1:]
        else:
            continue  # module, go, toolchain, replace, exclude...: not packages to fetch
        where = f"{field} line {number}"
        if len(entry) != 2 or not _GO_VERSION.fullmatch(entry[1]):
            raise _bad(where, f"{line[:60]!r} is not 'require module/path v1.2.3'")
        items.append(normalize_go(f"{entry[0]}@{entry[1]}", where))
    if in_block:
        raise _bad(field, "a require block is not closed")
    if len(items) > MAX_PACKAGES:
        raise _bad(field, f"at most {MAX_PACKAGES} modules are allowed")
    return items


_TEXT_PARSERS = {"requirements": requirements_items, "packageJson": package_json_items, "goMod": go_mod_items}
_ITEM_NORMALIZERS = {"pip": normalize_pip, "npm": normalize_npm, "go": normalize_go}


def _kind(value: Any, kind: str) -> list[str] | dict[str, str]:
    """One package kind in canonical form: a sorted list, or its text form kept verbatim
    (after checking that it parses)."""
    field = f"setup.{kind}"
    if isinstance(value, dict):
        form = TEXT_FORMS[kind]
        if set(value) != {form}:
            raise _bad(field, f"must be a list of packages or {{\"{form}\": \"...\"}}")
        text = _text(value[form], f"{field}.{form}")
        _TEXT_PARSERS[form](text, f"{field}.{form}")
        return {form: text}
    items = _items(value, field, MAX_PACKAGES)
    norm = _ITEM_NORMALIZERS[kind]
    return sorted({norm(item, f"{field}[{i}]") for i, item in enumerate(items)})


def _envs(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("setup.envs", f"must be an object of strings (got {type(value).__name__})")
    if len(value) > MAX_ENVS:
        raise _bad("setup.envs", f"at most {MAX_ENVS} variables are allowed")
    for key, val in value.items():
        problem = env_problem(key, val)
        if problem:
            raise _bad(f"setup.envs.{str(key)[:40]}", problem)
    return dict(sorted(value.items()))


def normalize(setup: Any) -> dict[str, Any] | None:
    """Validate a setup body; return its canonical form, or None when it asks for nothing.

    Accepts a plain dict (as parsed from JSON) or the pydantic ``SetupSpec`` model.
    Raises ``BadRequest`` with ``field`` naming the offending item (``setup.pip[1]``,
    ``setup.pip.requirements line 3``).
    """
    if setup is None:
        return None
    if hasattr(setup, "model_dump"):
        setup = setup.model_dump(exclude_none=True)
    if not isinstance(setup, dict):
        raise _bad("setup", f"must be an object with pip, npm, go, commands and envs (got {type(setup).__name__})")
    unknown = sorted(str(k) for k in setup if k not in KINDS)
    if unknown:
        raise _bad(f"setup.{unknown[0][:40]}", f"unknown key; expected one of {', '.join(KINDS)}")
    out: dict[str, Any] = {kind: _kind(setup.get(kind), kind) for kind in TEXT_FORMS}
    commands = _items(setup.get("commands"), "setup.commands", MAX_COMMANDS)
    out["commands"] = [normalize_command(c, f"setup.commands[{i}]") for i, c in enumerate(commands)]
    envs = _envs(setup.get("envs"))
    if not any(out.values()):
        return None  # envs alone ask for nothing: they only reach commands
    if envs:
        out["envs"] = envs
    return out


def packages(spec: dict[str, Any] | None) -> dict[str, list[str]]:
    """The packages a canonical spec installs, per kind, as sorted argv items: what the
    shared environment is built from and addressed by."""
    out: dict[str, list[str]] = {}
    for kind, form in TEXT_FORMS.items():
        value = (spec or {}).get(kind) or []
        if isinstance(value, dict):
            value = sorted(set(_TEXT_PARSERS[form](value[form], f"setup.{kind}.{form}")))
        out[kind] = list(value)
    return out


def workspace_files(spec: dict[str, Any] | None) -> dict[str, str]:
    """Files the session's setup writes into its workspace: the text forms, by file name."""
    files = {}
    for kind, form in TEXT_FORMS.items():
        value = (spec or {}).get(kind)
        if isinstance(value, dict) and form in WORKSPACE_FILES:
            files[WORKSPACE_FILES[form]] = value[form]
    return files


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def env_key(language: str, runtime: str, spec: dict[str, Any]) -> str:
    """The content address of an environment: language, runtime identity (the image id
    or the local interpreter), and the packages of the spec (commands and envs are the
    session's own and do not enter it)."""
    payload = canonical_json({"format": FORMAT, "language": language, "runtime": runtime, "spec": packages(spec)})
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_CHARS]
