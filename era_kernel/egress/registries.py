"""The package registries a setup build may reach: the operator's own configuration, read
once, when the first setup needs them (``derive``, called by the engine with its
settings), never names written in our code.

A package build (``setup.pip``/``npm``/``go``) has no network but a listener of the
egress proxy in its sandbox (as a policy session's setup commands have), under the
policy made here from:

- pip: its ``index-url``, ``extra-index-url`` and network ``find-links`` as pip itself
  reads them (``pip config list``: its configuration files and ``PIP_*`` variables),
  else pip's own default index and the host it serves files from;
- npm: its ``registry`` and scoped ``@scope:registry`` (``npm config list``);
- Go: ``GOPROXY``'s entries (``direct`` and ``off`` are skipped: a direct module fetch
  from a VCS host is refused unless ``ERA_SETUP_EGRESS_ALLOW`` names it) and the
  checksum database of ``GOSUMDB``;
- ``ERA_SETUP_EGRESS_ALLOW``: host patterns and CIDRs the operator adds.

``file://`` URLs are not network, and are skipped. A registry named by one of these is
allowed by name and trusted: it may resolve to a private address (a mirror on the
operator's network; only for that name, never loopback, link-local or the host's own
addresses). A URL naming a loopback or private address, or ``localhost``, is allowed at
exactly that address and port. The tools' own settings (``PIP_INDEX_URL``,
``PIP_EXTRA_INDEX_URL``, ``PIP_TRUSTED_HOST``, ``npm_config_registry``, ``GOPROXY``,
``GOSUMDB``) go into each
build's environment, so a build uses the registries allowed whatever its sandbox's
``HOME`` or its image's own configuration says.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

from .policy import ALWAYS_DENIED, PRIVATE_RANGES, EgressPolicy, Network, host_pattern

log = logging.getLogger("era.egress")

TOOL_TIMEOUT = 30.0  # seconds each tool may take to tell its configuration


@dataclass(frozen=True)
class Registries:
    """What setup builds may reach, and the tools' settings that make them use it."""

    policy: EgressPolicy
    sources: tuple[str, ...] = ()  # "pip index-url https://host:443", for the log (no credentials)
    env: dict[str, str] = field(default_factory=dict)

    def env_for(self, provisioner: str) -> dict[str, str]:
        """The tools' settings for a build on ``provisioner``: a container cannot see the
        host's ``file://`` indexes, so they are left out there."""
        if provisioner != "docker" or "PIP_EXTRA_INDEX_URL" not in self.env:
            return dict(self.env)
        env = dict(self.env)
        extra = " ".join(u for u in env.pop("PIP_EXTRA_INDEX_URL").split() if not u.startswith("file:"))
        if extra:
            env["PIP_EXTRA_INDEX_URL"] = extra
        return env


def setup_allow(text: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[Network, ...]]:
    """``ERA_SETUP_EGRESS_ALLOW``: comma-separated entries as (exact names, which are
    trusted as registries are; wildcard patterns; CIDRs). ValueError naming a bad entry."""
    names: list[str] = []
    patterns: list[str] = []
    nets: list[Network] = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        pattern = host_pattern(entry)
        if pattern is not None:
            (patterns if "*" in pattern else names).append(pattern)
            continue
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"{entry!r} is neither a host pattern nor a CIDR") from None
        for denied, why in ALWAYS_DENIED:
            if net.version == denied.version and net.overlaps(denied):
                raise ValueError(f"{entry!r} overlaps {denied} ({why}), which is always denied; name the "
                                 "registry host instead (a name may resolve to a private address)")
        nets.append(net)
    return tuple(names), tuple(patterns), tuple(nets)


def _tool(argv: list[str], environ: Mapping[str, str]) -> str | None:
    """Blocking: a tool's output, or None when it is not installed or fails (then its
    registries are simply not allowed: its builds fail saying what they could not reach)."""
    try:
        # cwd: `python -m pip` puts the working directory first on sys.path, and the
        # server's may be writable by anybody: a `pip` there would run as the server.
        done = subprocess.run(argv, env=dict(environ), capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                              stdin=subprocess.DEVNULL, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("setup registries: %s: %s", argv[0], exc)
        return None
    if done.returncode != 0:
        log.info("setup registries: %s failed: %s", " ".join(argv[:4]), done.stderr.strip()[:300])
        return None
    return done.stdout


def pip_config(environ: Mapping[str, str]) -> dict[str, str]:
    """pip's effective ``index-url``, ``extra-index-url``, ``find-links`` and
    ``trusted-host`` for ``pip install`` (its variables, then its ``[install]``, then its
    ``[global]`` section)."""
    out = _tool([sys.executable, "-m", "pip", "config", "list"], environ) or ""
    sections: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        key, sep, raw = line.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            continue
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            continue
        sections.setdefault(section, {})[name] = str(value)
    found = {}
    for name in ("index-url", "extra-index-url", "find-links", "trusted-host"):
        for section in (":env:", "install", "global"):
            if name in sections.get(section, {}):
                found[name] = sections[section][name]
                break
    return found


def _pip(environ: Mapping[str, str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    config = pip_config(environ)
    from pip._internal.models.index import PyPI  # pip's own default index (the builds' pip is this one)

    index = config.get("index-url", "").split()
    index = index[0] if index else PyPI.simple_url
    extras = config.get("extra-index-url", "").split()
    urls = [("pip index-url", index), *(("pip extra-index-url", u) for u in extras),
            *(("pip find-links", u) for u in config.get("find-links", "").split())]
    pypi_host = urlsplit(PyPI.url).hostname
    if any(urlsplit(u).hostname == pypi_host for _, u in urls):  # its pages link to files on another host
        urls.append(("pip (PyPI's file host)", f"https://{PyPI.file_storage_domain}/"))
    env = {"PIP_INDEX_URL": index}
    if extras:
        env["PIP_EXTRA_INDEX_URL"] = " ".join(extras)
    if config.get("trusted-host", "").split():  # an index the operator reaches over plain http
        env["PIP_TRUSTED_HOST"] = " ".join(config["trusted-host"].split())
    return urls, env


def _npm(environ: Mapping[str, str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    out = _tool(["npm", "config", "list", "--json"], environ)
    try:
        config = json.loads(out) if out else {}
    except ValueError:
        config = {}
    if not isinstance(config, dict) or not isinstance(config.get("registry"), str):
        return [], {}
    urls = [("npm registry", config["registry"])]
    urls += [(f"npm {key}", value) for key, value in sorted(config.items())
             if key.startswith("@") and key.endswith(":registry") and isinstance(value, str)]
    return urls, {"npm_config_registry": config["registry"]}


def _go(environ: Mapping[str, str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    out = _tool(["go", "env", "-json", "GOPROXY", "GOSUMDB"], environ)
    try:
        config = json.loads(out) if out else {}
    except ValueError:
        config = {}
    proxy, sumdb = str(config.get("GOPROXY") or ""), str(config.get("GOSUMDB") or "")
    urls = [("go GOPROXY", entry) for entry in re.split(r"[,|]", proxy) if entry and entry not in ("direct", "off")]
    if sumdb and sumdb != "off":
        parts = sumdb.split()  # "name[+key] [url]"
        url = parts[1] if len(parts) > 1 else parts[0].split("+", 1)[0]
        urls.append(("go GOSUMDB", url if "://" in url else f"https://{url}"))
    env = {name: value for name, value in (("GOPROXY", proxy), ("GOSUMDB", sumdb)) if value}
    return urls, env


def _entry(url: str) -> tuple[str, int, str] | None:
    """(host, port, scheme) of a network URL; None for ``file://`` and the like."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.hostname.lower().rstrip("."), port or (443 if parts.scheme == "https" else 80), parts.scheme


def derive(settings: Any, environ: Mapping[str, str] | None = None) -> Registries:
    """Blocking (runs pip, npm and go to read their configuration, about a second): the
    registries setup builds may reach, from the operator's configuration in ``environ``
    (the server's) and ``ERA_SETUP_EGRESS_ALLOW``."""
    environ = os.environ if environ is None else environ
    urls: list[tuple[str, str]] = []
    env: dict[str, str] = {}
    for tool in (_pip, _npm, _go):
        try:
            found, tool_env = tool(environ)
        except Exception as exc:  # pip missing from this interpreter, a tool's odd output
            log.warning("setup registries: cannot read %s's configuration: %s", tool.__name__.strip("_"), exc)
            continue
        urls += found
        env.update(tool_env)
    names, patterns, nets = setup_allow(str(settings["ERA_SETUP_EGRESS_ALLOW"] or ""))
    registry_names: list[str] = list(names)
    endpoints: list[tuple[str, int]] = []
    allow_nets: list[Network] = list(nets)
    sources = [f"ERA_SETUP_EGRESS_ALLOW {entry}" for entry in (*names, *patterns, *map(str, nets))]
    for source, url in urls:
        entry = _entry(url)
        if entry is None:
            continue
        host, port, scheme = entry
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None and address.is_link_local:
            log.warning("setup registries: %s %s is link-local, which is never reachable", source, host)
            continue
        if address is None and host_pattern(host) is None:
            continue
        if host == "localhost" or (address is not None and (address.is_loopback or any(
                address.version == net.version and address in net for net in PRIVATE_RANGES))):
            endpoints.append((str(address) if address is not None else host, port))
        elif address is not None:
            allow_nets.append(ipaddress.ip_network(address))
        else:
            registry_names.append(host)
        sources.append(f"{source} {scheme}://{host}:{port}")
    registry_names = list(dict.fromkeys(registry_names))
    endpoint_names = [name for name, _ in endpoints if host_pattern(name) is not None]
    policy = EgressPolicy(allow_names=tuple(dict.fromkeys([*registry_names, *patterns, *endpoint_names])),
                          allow_nets=tuple(dict.fromkeys(allow_nets)), registry_names=tuple(registry_names),
                          registry_endpoints=tuple(dict.fromkeys(endpoints)),
                          source={"allow": list(dict.fromkeys(sources))})
    return Registries(policy, tuple(dict.fromkeys(sources)), env)
