"""A session's record, typed: what the store keeps for it, and the rules derived from it.

The store keeps plain JSON documents (``MetadataStore``); the engine works on
``SessionRecord`` and converts at that boundary only (``from_row`` / ``to_row``), so a
field is named once and a typo fails loudly. The row keeps the API's own field names
(``allowInternetAccess``), so stored sessions need no migration.

Also here: what a kernel is asked for (``KernelRequest``: a session's or a one-shot
run's), the sandbox uid policy, and which fields a duplicate copies.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadRequest, Unprocessable
from .results import utc_now

UID_BASE = 100_000  # sessions' sandbox uids when running as root: UID_BASE + the record's seq
EPHEMERAL_UID_BASE = 900_000_000  # one-shot runs' uids, cycling through a million
POOL_UID_BASE = 400_000_000  # pooled kernels' uids: reserved in blocks, never reused

# Row key -> attribute, where they differ (the API's camelCase field).
_ROW_NAMES = {"allowInternetAccess": "allow_internet", "allowPublicAccess": "allow_public"}
_ATTR_NAMES = {attr: key for key, attr in _ROW_NAMES.items()}


def new_session_id() -> str:
    """``sess_<ms>_<8 hex>``, ERA's shape for ids the client did not choose."""
    return f"sess_{int(time.time() * 1000)}_{secrets.token_hex(4)}"


@dataclass(frozen=True)
class KernelRequest:
    """What a kernel is started for: a session's fields, or a one-shot run's or a pooled
    kernel's (``session_id`` None). The launcher needs nothing else."""

    language: str
    provisioner: str
    allow_internet: bool | dict[str, Any] = False  # a dict: an egress policy (egress/policy.py)
    env: dict[str, str] = field(default_factory=dict)
    startup: str | None = None
    setup: dict[str, Any] | None = None
    session_id: str | None = None
    typecheck: bool = False  # TypeScript: type-check each cell (ERA_TYPECHECK=1 in the kernel's environment)
    limits: dict[str, Any] | None = None  # {memory_mib, cpu_count}: the session's own, below the server's
    isolation: str | None = None  # Docker: "gvisor" runs it under runsc; None: the engine's runc


def check_isolation(isolation: str | None, provisioner: str) -> str | None:
    """A request's ``isolation`` for its provisioner: gVisor is a Docker runtime, so a
    local session cannot have it (nor ``runc``, which would claim a wall it has not)."""
    if isolation is not None and provisioner != "docker":
        raise BadRequest(f"isolation {isolation!r} needs the docker provisioner (this session's is {provisioner!r})",
                         field="isolation")
    return None if isolation == "runc" else isolation


def session_limits(settings: Any, limits: Any, provisioner: str) -> dict[str, Any] | None:
    """A session's own limits (``models.Limits``), checked against the server's (422
    above them); None when it asks for none."""
    if limits is None or (limits.memory_mib is None and limits.cpu_count is None):
        return None
    docker = provisioner == "docker"
    setting = "ERA_DOCKER_MEMORY" if docker else "ERA_KERNEL_MEMORY"
    if limits.memory_mib is not None and limits.memory_mib * 1024**2 > settings[setting]:
        raise Unprocessable(f"memory_mib {limits.memory_mib} is above this server's limit of "
                            f"{settings[setting] // 1024**2} MiB ({setting})", field="limits.memory_mib")
    if docker and limits.cpu_count is not None and limits.cpu_count > settings["ERA_DOCKER_CPUS"]:
        raise Unprocessable(f"cpu_count {limits.cpu_count:g} is above this server's limit of "
                            f"{settings['ERA_DOCKER_CPUS']:g} (ERA_DOCKER_CPUS)", field="limits.cpu_count")
    return limits.model_dump(exclude_none=True)


@dataclass
class SessionRecord:
    id: str
    language: str
    provisioner: str
    created_at: str
    persistent: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    setup: dict[str, Any] | None = None
    setup_status: str | None = None  # pending | running | completed | failed
    setup_result: dict[str, Any] | None = None
    default_timeout: float = 30.0
    allow_internet: bool | dict[str, Any] = False  # a dict: an egress policy (egress/policy.py)
    allow_public: bool = False  # /proxy/{id}/... needs no API key (ERA's allowPublicAccess)
    typecheck: bool = False
    limits: dict[str, Any] | None = None
    env: dict[str, str] = field(default_factory=dict)
    startup: str | None = None
    code: str | None = None  # before ERA's data.code: the stored program of sessions made by older versions
    max_age: float | None = None
    last_run_at: str | None = None
    workdir: str | None = None  # pool/<hex> when the session claimed a pooled kernel's directory
    uid: int | None = None  # the pooled kernel's uid, when it claimed one
    seq: int | None = None  # the store's, once inserted
    last_exit: dict[str, Any] | None = None  # how its last kernel ended: a session event (session_log.py)
    isolation: str | None = None  # "gvisor" (Docker's runsc); None: the engine's default runtime
    owner: str | None = None  # the tenant that made it (tenants.py); None: made before tenants, the admin's

    # ---- the store's rows ----------------------------------------------------------------
    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "SessionRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {_ROW_NAMES.get(key, key): value for key, value in row.items()}
        return cls(**{name: value for name, value in values.items() if name in known})

    def to_row(self) -> dict[str, Any]:
        return {_ATTR_NAMES.get(name, name): value for name, value in dataclasses.asdict(self).items()
                if not (name == "seq" and value is None)}

    @staticmethod
    def row_changes(changes: dict[str, Any]) -> dict[str, Any]:
        """Attribute names -> row keys, for ``MetadataStore.update_session``."""
        return {_ATTR_NAMES.get(name, name): value for name, value in changes.items()}

    # ---- derived ---------------------------------------------------------------------------
    @property
    def stored_code(self) -> str | None:
        """The stored program (PUT .../code), which a run without code runs. As in ERA it
        lives in ``data.code`` (so the code can read it, and a duplicate has it); sessions
        stored by older versions kept it in ``code``."""
        code = self.data.get("code")
        return code if isinstance(code, str) and code else self.code

    def kernel_request(self) -> KernelRequest:
        return KernelRequest(self.language, self.provisioner, self.allow_internet, dict(self.env), self.startup,
                             self.setup, self.id, self.typecheck, self.limits, self.isolation)

    def duplicate(self, new_id: str | None, owner: str | None = None) -> "SessionRecord":
        """A new session with this one's settings, data, metadata and stored program (not
        its history, directory, uid or setup outcome: its setup runs again, from cache)."""
        return SessionRecord(
            id=new_id or new_session_id(), language=self.language, provisioner=self.provisioner,
            created_at=utc_now(), persistent=self.persistent, metadata=dict(self.metadata), data=dict(self.data),
            setup=self.setup, setup_status="pending" if self.setup else None, default_timeout=self.default_timeout,
            allow_internet=self.allow_internet, allow_public=self.allow_public, typecheck=self.typecheck,
            limits=self.limits, env=dict(self.env), startup=self.startup, code=self.code, max_age=self.max_age,
            isolation=self.isolation, owner=owner if owner is not None else self.owner)


def session_uid(record: SessionRecord) -> int:
    """The uid a session's kernel, setup and files run as: its own when the server is
    root (the pooled kernel's it claimed, else ``UID_BASE + seq``); the server's own
    otherwise."""
    if os.getuid() != 0:
        return os.getuid()
    if record.uid:
        return record.uid
    assert record.seq is not None, "a stored record has a seq"
    return UID_BASE + record.seq


class EphemeralUids:
    """Uids of one-shot runs: each a uid no live session has, cycling through a million."""

    def __init__(self) -> None:
        self._count = 0

    def next(self) -> int:
        if os.getuid() != 0:
            return os.getuid()
        self._count += 1
        return EPHEMERAL_UID_BASE + self._count % 1_000_000
