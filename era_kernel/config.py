"""Settings: one declarative table, read from the environment when asked, never at import.

Every setting is an ``ERA_*`` environment variable with a default that works on a fresh
machine. ``Settings.from_env()`` is called by whoever starts the engine (CLI, server,
tests); nothing in the package reads ``os.environ`` for configuration at import time.
A test checks that every row here is documented in the README.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "era")


def runtime_dir_for(data_dir: str) -> str:
    """The default runtime directory: one per data directory, so two servers on one
    machine never share (and never reap) each other's kernel directories. Short on
    purpose: IPC socket paths must fit libzmq's 107-byte limit."""
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:8]
    return f"/tmp/era-{os.getuid()}/{digest}"


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _depth(value: str) -> int:
    """``ERA_WORKSPACE_MAX_DEPTH``: a walk holds a descriptor per level, and a path the
    files API can address (1024 bytes) has at most 512 levels, so more is never useful."""
    depth = int(value)
    if not 1 <= depth <= 512:
        raise ValueError("must be between 1 and 512")
    return depth


def _size(value: str) -> int:
    """Parse ``10485760``, ``10MiB``, ``512M``, ``1G`` into bytes."""
    text = value.strip().lower().replace("ib", "").replace("b", "")
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _resolver(value: str) -> str:
    """``ERA_EGRESS_RESOLVER``: empty, or a DNS server's address with an optional port."""
    import ipaddress

    text = value.strip()
    if not text:
        return ""
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    ipaddress.ip_address(host)  # ValueError: not an address (a name would need a resolver of its own)
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("the port must be 1 to 65535")
    return text


def _cidrs(value: str) -> str:
    """``ERA_EGRESS_DENY``: checked at start (ValueError naming the bad entry)."""
    from .egress.policy import operator_denied

    operator_denied(value)
    return value


def _setup_allow(value: str) -> str:
    """``ERA_SETUP_EGRESS_ALLOW``: checked at start (ValueError naming the bad entry)."""
    from .egress.registries import setup_allow

    setup_allow(value)
    return value


def _port(value: str) -> int:
    """A TCP port, or 0 for none."""
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("must be a port from 1 to 65535, or 0 for none")
    return number


def _count(value: str) -> int:
    """A cap that must let at least one through (0 would refuse every listing or socket)."""
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _pool_size(value: str) -> int | str:
    """``ERA_POOL_SIZE``: ``auto`` (the engine decides, ``pool.auto_pool_size``) or a count."""
    if value.strip().lower() == "auto":
        return "auto"
    number = int(value)
    if number < 0:
        raise ValueError("must be auto, or a number of kernels (0 turns pooling off)")
    return number


def _interval(value: str) -> float:
    """Seconds a loop sleeps between passes: 0 would make it spin."""
    seconds = float(value)
    if not seconds > 0:
        raise ValueError("must be a number of seconds greater than 0")
    return seconds


def _proxy_host(value: str) -> str:
    """A host name template for /proxy's host form: both placeholders, nothing else odd."""
    value = value.strip()
    if not value:
        return ""
    import re

    if value.count("{port}") != 1 or value.count("{id}") != 1 or not re.fullmatch(
            r"[A-Za-z0-9.{}_-]+(:\d{1,5})?", value) or re.sub(r"\{(port|id)\}", "", value).count("{"):
        raise ValueError("expected a host name with {port} and {id} once each, e.g. {port}-{id}.sandbox.example")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        value = value.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return value
    return parse


@dataclass(frozen=True)
class Setting:
    name: str
    default: Callable[[], Any] | Any
    help: str
    parse: Callable[[str], Any] = str

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default


SETTINGS: tuple[Setting, ...] = (
    Setting("ERA_DATA_DIR", _default_data_dir, "Where the store, workspaces and logs live."),
    Setting("ERA_RUNTIME_DIR", "", "Short directory for kernel IPC sockets and their owner records; default one "
            "per data directory, so servers on one machine never touch each other's kernels."),
    Setting("ERA_STORE_URL", "", "Metadata store URL: `sqlite:///path`, or `postgresql://user@host/db` (any libpq "
            "URL; needs the `postgres` extra); default `sqlite:///$ERA_DATA_DIR/era.db`."),
    Setting("ERA_REPLICA_ID", "", "This server's id in the store's replica registry; default `<hostname>-<random>`, "
            "new at each start."),
    Setting("ERA_REPLICA_ADDRESS", "", "URL other replicas reach this server at, kept in the replica registry; "
            "default `http://<ERA_HOST>:<bound port>`."),
    Setting("ERA_REPLICA_HEARTBEAT", 5.0, "Seconds between this server's heartbeats in the replica registry.",
            _interval),
    Setting("ERA_LEASES", "auto", "Session leases between replicas sharing a store (README: Replicas): `on`, `off`, "
            "or `auto` (on with a PostgreSQL store).", _choice("auto", "on", "off")),
    Setting("ERA_LEASE_TTL", 10.0, "Seconds a replica's lease on a session lasts unrenewed (renewed every third of "
            "it): how long a dead replica's sessions wait before another replica takes them over.", _interval),
    Setting("ERA_WORKSPACE_URL", "", "fsspec URL of the workspace store; default `file://$ERA_DATA_DIR/workspaces`."),
    Setting("ERA_WORKSPACE_OPTIONS", "", "JSON storage options passed to fsspec (e.g. S3 endpoint and keys)."),
    Setting("ERA_WORKSPACE_MAX_FILE", 64 * 1024**2, "Largest file written through the files API.", _size),
    Setting("ERA_WORKSPACE_MAX_BYTES", 1024**3, "Largest workspace: what the server writes to or persists, and, "
            "with `ERA_WORKSPACE_VOLUMES`, what code in the session can write (past it, ENOSPC).", _size),
    Setting("ERA_WORKSPACE_MAX_FILES", 10_000, "Most files in a workspace the server writes to or persists.", int),
    Setting("ERA_WORKSPACE_MAX_READ", 256 * 1024**2, "Largest file served in one download.", _size),
    Setting("ERA_WORKSPACE_MAX_DEPTH", 64, "Deepest directory level a walk of a workspace enters (file list, "
            "quota check, copy, push); a deeper tree answers 413, and a session's `file_count` counts what lies "
            "within. A walk holds one descriptor per level (1-512).", _depth),
    Setting("ERA_WORKSPACE_MAX_ENTRIES", 100_000, "Most entries (files, directories, links) one walk of a "
            "workspace visits; past it the same operations answer 413.", int),
    Setting("ERA_WORKSPACE_FSYNC", True, "fsync snapshots on file:// stores, and every commit of the storage "
            "proxy's databases (survives power loss, not only crashes).", _bool),
    Setting("ERA_WORKSPACE_VOLUMES", "auto", "Each workspace its own filesystem of `ERA_WORKSPACE_MAX_BYTES` (a "
            "sparse ext4 image under `$ERA_DATA_DIR/volumes`, loop-mounted), so a session cannot fill the host's disk: "
            "`auto` (when the server can: root, `mkfs.ext4`, loop devices; otherwise logged once), `on` (required: "
            "the engine does not start without them) or `off`.", _choice("auto", "on", "off")),
    Setting("ERA_WORKSPACE_VOLUME_STOCK", 32, "Empty workspace volumes made ahead of demand, while the server is "
            "quiet (each ~0.7 MiB on disk), so a new workspace's volume is a rename and a mount instead of a "
            "`mkfs` on the way of its create (README: Fast kernels); 0: each made when needed.", int),
    Setting("ERA_PROVISIONER", "local", "Default kernel provisioner for new sessions: `local` or `docker`."),
    Setting("ERA_SANDBOX", "auto", "Local sandbox: `auto` (bubblewrap when present), `bwrap` (required) or `none`."),
    Setting("ERA_LOCAL_LAUNCHER", "fork", "How sandboxed local Python kernels start: `fork` (forked from a zygote "
            "that has imported ipykernel, with the isolation bubblewrap gives built in process; where it cannot apply, "
            "bubblewrap: a server that is not root, other languages' kernels, Python kernels of a setup environment) or "
            "`bwrap` (each a new interpreter in bubblewrap). README: Fast kernels.", _choice("bwrap", "fork")),
    Setting("ERA_ALLOW_INTERNET_DEFAULT", False, "`allowInternetAccess` of a session created without it. ERA's "
            "default is true; ours is off, so that code reaches no network unless asked (README: ERA defaults).",
            _bool),
    Setting("ERA_ALLOW_PUBLIC_DEFAULT", False, "`allowPublicAccess` of a session created without it. ERA's default "
            "is true; ours is off, so a session's ports need the API key unless asked (README: ERA defaults).", _bool),
    Setting("ERA_PROXY_HOST", "", "Host form of `/proxy`: a host name template with `{port}` and `{id}` (e.g. "
            "`{port}-{id}.sandbox.example`, a wildcard DNS name pointing at this server) so each session port is an "
            "origin of its own; `GET .../host` then answers with it. Empty: the path form `/proxy/{id}/{port}/` only.",
            _proxy_host),
    Setting("ERA_PROXY_MAX_BODY", 1024**3, "Largest request body relayed through `/proxy` (streamed, never held).",
            _size),
    Setting("ERA_DEFAULT_TIMEOUT", 30.0, "Default run timeout in seconds for new sessions.", float),
    Setting("ERA_OUTPUT_LIMIT", 10 * 1024**2, "Per-run output cap in bytes; past it output is dropped and `truncated` set.", _size),
    Setting("ERA_KERNEL_MESSAGE_LIMIT", 256 * 1024**2,
            "Largest single message a kernel may send, in bytes (at least twice `ERA_OUTPUT_LIMIT`); a larger one "
            "(a huge display) is refused unread and its run fails with `MessageTooLarge`.", _size),
    Setting("ERA_INTERRUPT_GRACE", 2.0, "Seconds a timed-out run waits for the interrupt before the kernel is restarted.", float),
    Setting("ERA_KERNEL_MEMORY", 2 * 1024**3, "Memory of a local kernel's whole session (bytes, `512M`, `2G`): its "
            "cgroup's limit, swap and `/tmp` included; also each process's address-space limit (RLIMIT_AS).", _size),
    Setting("ERA_KERNEL_PIDS", 256, "Processes (threads included) of a local kernel's whole session: its pids "
            "cgroup's limit; also the session uid's RLIMIT_NPROC.", int),
    Setting("ERA_KERNEL_TMP_SIZE", 256 * 1024**2, "Size of the private `/tmp` (a tmpfs in memory, charged to its "
            "memory cgroup) of a local kernel launched without a session, by a plain Jupyter application; a "
            "session's `/tmp` is its own directory instead.", _size),
    Setting("ERA_KERNEL_CGROUPS", "auto", "Per-kernel memory and pids cgroups: `auto` (used when the server can make "
            "them: root, cgroup v1 or v2; otherwise logged once), `on` (required: a kernel start fails without "
            "them) or `off`.", _choice("auto", "on", "off")),
    Setting("ERA_KERNEL_START_TIMEOUT", 60.0, "Seconds a kernel may take to become ready.", float),
    Setting("ERA_MAX_KERNELS", 100, "Live kernels at once (pooled ones included); past it the least recently used "
            "idle kernel is shut down, and with none idle the request answers 429.", int),
    Setting("ERA_POOL_SIZE", "auto", "Pre-started kernels kept ready per pool at least (when idle): `auto` keeps "
            "12 where the pools' kernels are forked (`ERA_LOCAL_LAUNCHER=fork`, about 12 MiB, 17 on Python 3.11, "
            "and 0.1 CPU-seconds each), fewer where memory or half of `ERA_MAX_KERNELS` does not allow them, and 4 "
            "otherwise (2 when memory is short); a number keeps that many; 0 turns pooling off.", _pool_size),
    Setting("ERA_POOL_MAX", 32, "Most kernels a pool keeps ready or starting after a burst of new sessions "
            "(it grows to the largest recent burst, or take rate times start time; never past half of "
            "`ERA_MAX_KERNELS` or into the last 512 MiB of available memory). Set it to `ERA_POOL_SIZE` for a "
            "fixed pool.", int),
    Setting("ERA_POOL_STARTS", 0, "Kernel starts the pools run at once (0: one per core, two while a session "
            "waits and the pools' kernels are forked, at least 2, and more while the CPU has idle time); kernels started a few at a time "
            "are ready one after another instead of all at the end.", int),
    Setting("ERA_POOL_IDLE", 120.0, "Seconds without a new session after which a grown pool shrinks back to "
            "`ERA_POOL_SIZE`.", float),
    Setting("ERA_POOL_KERNELS", "python", "Comma-separated pools warmed at start, `language[:provisioner]` "
            "(provisioner defaults to `ERA_PROVISIONER`), e.g. `python,python:docker`."),
    Setting("ERA_KERNEL_IDLE_TIMEOUT", 1800.0, "Seconds since a session's last run (or creation) after which its "
            "kernel is shut down; the session stays and its next run starts a kernel. 0 = never.", float),
    Setting("ERA_SESSION_MAX_AGE", 0.0, "Seconds after creation a session is deleted with its files; 0 = never. "
            "A session's own `max_age` overrides it.", float),
    Setting("ERA_CULL_INTERVAL", 30.0, "Seconds between culling passes (idle kernels, expired sessions).", float),
    Setting("ERA_RUN_JOURNAL", True, "Keep every run event in its session's journal (background runs' events, "
            "reconnect and replay from any offset). Off only to measure what it costs: events are then live only.",
            _bool),
    Setting("ERA_RUN_QUEUE_MAX", 100, "Runs one session may have waiting (background runs past it answer 429 "
            "with `Retry-After`).", _count),
    Setting("ERA_CALLBACK_ALLOW", "public", "Where a background run's `callback_url` may point: comma-separated "
            "`public` (any globally routable address; never private, loopback, link-local, multicast or reserved "
            "ones), CIDR networks (`10.1.0.0/16`, `127.0.0.0/8`) and host names (trusted wherever they resolve), or "
            "`none`. Every address the host resolves to must be allowed, at submission (else 400) and at each "
            "delivery."),
    Setting("ERA_CALLBACK_SECRET", "", "HMAC-SHA256 key signing completion callbacks; when unset, `ERA_API_KEY`, "
            "and without one a random key made at first start in `$ERA_DATA_DIR/callback-secret` (mode 0600)."),
    Setting("ERA_CALLBACK_ATTEMPTS", 5, "Delivery attempts per completion callback, the first included "
            "(408, 429, 5xx and network errors are retried).", _count),
    Setting("ERA_CALLBACK_BACKOFF", 1.0, "Seconds between a callback's first and second attempts; doubled for "
            "each next one, with jitter (a receiver's `Retry-After`, up to 300 s, when longer).", float),
    Setting("ERA_CALLBACK_TIMEOUT", 10.0, "Seconds one callback delivery attempt may take, connecting included.",
            float),
    Setting("ERA_SCHEDULE_CATCH_UP", True, "At start, a schedule whose latest slot passed while no server was "
            "running fires once for that slot, never once per missed slot; off: that firing is skipped (noted on "
            "the schedule as `last_skipped`).", _bool),
    Setting("ERA_SCHEDULE_RESCAN", 30.0, "Seconds between the scheduler's reads of every schedule in the store, "
            "which is how it sees schedules another server on the same store made or deleted (its own it sees at "
            "once).", _interval),
    Setting("ERA_MAX_DATA_BYTES", 128 * 1024, "Largest session `data` document, in bytes of JSON.", _size),
    Setting("ERA_MAX_METADATA_BYTES", 16 * 1024, "Largest session `metadata` document, in bytes of JSON "
            "(labels for the client; every listing carries it).", _size),
    Setting("ERA_LIST_MAX", 1000, "Most sessions in one `GET /api/sessions` answer (and the largest `limit`); "
            "past it the answer has `truncated: true` and a `next_cursor`.", _count),
    Setting("ERA_LIST_MAX_BYTES", 8 * 1024**2, "JSON size after which a `GET /api/sessions` answer is cut the same "
            "way (it always holds at least one session).", _size),
    Setting("ERA_SETUP_TIMEOUT", 900.0, "Seconds a whole package setup may take.", float),
    Setting("ERA_SETUP_COMMAND_TIMEOUT", 300.0, "Seconds each setup `commands` item may take.", float),
    Setting("ERA_SETUP_MEMORY", 4 * 1024**3, "Memory of a setup step (locally its cgroup, as `ERA_KERNEL_CGROUPS` "
            "allows, its `/tmp` size and RLIMIT_AS; container limit on Docker).", _size),
    Setting("ERA_SETUP_PIDS", 512, "Process limit of a setup step (its pids cgroup and RLIMIT_NPROC locally).", int),
    Setting("ERA_SETUP_MAX_BYTES", 2 * 1024**3, "Largest environment a setup may produce; bigger fails.", _size),
    Setting("ERA_SETUP_CA_BUNDLE", "", "CA bundle setups use to reach registries; default OpenSSL's "
            "(honours `SSL_CERT_FILE`)."),
    Setting("ERA_SETUP_NETWORK", "proxy", "Network of package builds (`setup.pip`/`npm`/`go`): `proxy` (none of "
            "their own, only the egress proxy, reaching the package registries the server's pip, npm and Go "
            "configuration names, and ERA_SETUP_EGRESS_ALLOW; needs root, else host networking, logged) or `host` "
            "(the host's network: see Known limits). README: Packages.", _choice("proxy", "host")),
    Setting("ERA_SETUP_EGRESS_ALLOW", "", "Comma-separated host patterns and CIDRs package builds may reach beside "
            "the configured registries (e.g. a VCS host for Go's `direct`, a CDN a mirror redirects to); an exact name "
            "is trusted as a registry is (it may resolve to a private address).", _setup_allow),
    Setting("ERA_HOST", "127.0.0.1", "Address `era serve` binds."),
    Setting("ERA_PORT", 8787, "Port `era serve` binds.", int),
    Setting("ERA_API_KEY", "", "When set, every /api route and WebSocket needs `Authorization: Bearer <key>`. "
            "The admin key: sees every session; tenants' keys come from `era keys create` (see Tenants)."),
    Setting("ERA_ALLOWED_ORIGINS", "", "Comma-separated WebSocket Origins allowed (exact match)."),
    Setting("ERA_MAX_BODY", 64 * 1024**2, "Largest HTTP request body in bytes.", _size),
    Setting("ERA_MAX_SOCKETS_PER_SESSION", 16, "Open WebSockets on one session (`/ws` and Jupyter `channels` "
            "together); past it the upgrade answers 429.", _count),
    Setting("ERA_MAX_SOCKETS_PER_CLIENT", 64, "Open WebSockets of one client: one API key (each tenant's key "
            "apart; with `ERA_API_KEY` set, all its holders share this), else one remote address; past it the upgrade "
            "answers 429.", _count),
    Setting("ERA_GATEWAY_REPLAY_MAX_BYTES", 64 * 1024**2, "Jupyter kernel gateway: what a kernel sends while no "
            "client is connected to its `channels` is kept (up to this many bytes and 10,000 messages, the oldest "
            "dropped first) and replayed to the next connection with the same `session_id`; 0 keeps nothing.", _size),
    Setting("ERA_DOCKER_IMAGE_PREFIX", "era", "Repository prefix of the language images (`era/python`)."),
    Setting("ERA_DOCKER_MEMORY", 512 * 1024**2, "Memory limit (swap included) of a Docker kernel.", _size),
    Setting("ERA_DOCKER_CPUS", 1.0, "CPUs of a Docker kernel.", float),
    Setting("ERA_DOCKER_PIDS", 256, "Process (and thread) limit of a Docker kernel.", int),
    Setting("ERA_DOCKER_EGRESS_NETWORK", "era-egress", "Docker network for sessions with internet access; "
            "without it, the egress proxy (ERA_EGRESS_DOCKER_FALLBACK)."),
    Setting("ERA_EGRESS_PORT", 3128, "Egress proxy: the port of its listener (127.0.0.1; the kernel's "
            "`HTTP_PROXY`/`HTTPS_PROXY`) inside the sandbox network of each session it is the way out of: "
            "`allowInternetAccess` a policy, or `true` (ERA_EGRESS_LOCAL, ERA_EGRESS_DOCKER_FALLBACK). Needs root, as "
            "the ports proxy does (README: Egress policy).", _port),
    Setting("ERA_EGRESS_RESOLVER", "", "Egress proxy: the DNS server (`host:port`, `[v6]:port`) it resolves names "
            "with; empty: the host's resolver.", _resolver),
    Setting("ERA_EGRESS_DENY", "", "Egress proxy: comma-separated CIDRs it refuses whatever a policy says, beside "
            "the built-in ranges and the host's interface addresses (e.g. the public address the host is reached at "
            "through NAT, or a neighbouring service's range).", _cidrs),
    Setting("ERA_EGRESS_LOCAL", "proxy", "Local sessions with `allowInternetAccess: true`: `proxy` (their "
            "sandbox keeps its own network, whose only way out is the egress proxy, allowing every public address; "
            "needs bubblewrap and root, else as `host`) or `host` (the host's network, its loopback services and "
            "169.254.169.254 included: unsafe, see Known limits).", _choice("proxy", "host")),
    Setting("ERA_EGRESS_DOCKER_FALLBACK", "proxy", "Docker sessions with `allowInternetAccess: true` when "
            "ERA_DOCKER_EGRESS_NETWORK does not exist (an engine with no bridge): `proxy` (their container keeps "
            "network `none`, whose only way out is the egress proxy, allowing every public address) or `host` (host "
            "networking, its loopback services and 169.254.169.254 included: unsafe, see Known limits).",
            _choice("proxy", "host")),
    Setting("ERA_STORAGE_PORT", 80, "Storage proxy: the port of the listener the server opens inside each "
            "session's sandbox network (127.0.0.1; ERA's SDK default `http://localhost`), serving the storage routes "
            "for that session only; 0: none. Needs root, as the ports proxy does.", _port),
    Setting("ERA_STORAGE_URL", "", "Storage proxy: the URL `era_storage` in a session sends to (its "
            "`ERA_STORAGE_URL`); default `http://127.0.0.1:$ERA_STORAGE_PORT`, the in-sandbox listener. Set it for "
            "sandboxes that share the host's network (README: Storage proxy).", str),
    Setting("ERA_STORAGE_MAX_VALUE", 1024**2, "Storage proxy: largest KV value (with its metadata) in bytes.",
            _size),
    Setting("ERA_STORAGE_MAX_OBJECT", 32 * 1024**2, "Storage proxy: largest R2 object in bytes (it travels as "
            "base64 in JSON, so `ERA_MAX_BODY` must allow 4/3 of it).", _size),
    Setting("ERA_STORAGE_SQL_TIMEOUT", 5.0, "Storage proxy: seconds one D1 statement may run before it is "
            "cancelled (422).", _interval),
    Setting("ERA_STORAGE_SQL_MAX_BYTES", 256 * 1024**2, "Storage proxy: largest D1 database file; a write past it "
            "fails (413). Set through SQLite's `max_page_count`, which callers cannot change.", _size),
    Setting("ERA_STORAGE_SQL_MAX_ROWS", 10_000, "Storage proxy: most rows one D1 query returns (past it, 413: add "
            "a LIMIT).", _count),
    Setting("ERA_STORAGE_SQL_CONCURRENCY", 4, "Storage proxy: D1 statements running at once (each in a thread).",
            _count),
    Setting("ERA_DOCKER_GVISOR_RUNTIME", "runsc", "Docker runtime of `\"isolation\": \"gvisor\"` sessions with no "
            "network (gVisor's runsc with `--network=none`; `scripts/bootstrap-docker.sh` registers it)."),
    Setting("ERA_DOCKER_GVISOR_NET_RUNTIME", "runsc-net", "Docker runtime of gVisor sessions with internet access "
            "and of their setup steps (runsc with `--network=host`: gVisor passes sockets through to the "
            "container's own network namespace, the egress network's or the host's as for runc)."),
    Setting("ERA_LOG_LEVEL", "INFO", "Log level of the server and engine."),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Settings:
    """Resolved settings. Build with ``Settings.from_env()`` or ``Settings.from_env({...})``."""

    values: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = environ.get(setting.name)
            if raw is None or raw == "":
                values[setting.name] = setting.default_value()
            else:
                try:
                    values[setting.name] = setting.parse(raw)
                except ValueError as exc:
                    raise ValueError(f"{setting.name}={raw!r} is not valid: {exc}") from None
        for key, value in overrides.items():
            name = key if key.startswith("ERA_") else "ERA_" + key.upper()
            if name not in _BY_NAME:
                raise KeyError(f"unknown setting {name}")
            values[name] = value
        data_dir = Path(values["ERA_DATA_DIR"]).expanduser()
        values["ERA_DATA_DIR"] = str(data_dir)
        if not values["ERA_RUNTIME_DIR"]:
            values["ERA_RUNTIME_DIR"] = runtime_dir_for(str(data_dir.resolve()))
        if not values["ERA_STORE_URL"]:
            values["ERA_STORE_URL"] = f"sqlite:///{data_dir / 'era.db'}"
        if not values["ERA_WORKSPACE_URL"]:
            values["ERA_WORKSPACE_URL"] = f"file://{data_dir / 'workspaces'}"
        return cls(values)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    @property
    def data_dir(self) -> Path:
        return Path(self.values["ERA_DATA_DIR"])

    @property
    def runtime_dir(self) -> Path:
        return Path(self.values["ERA_RUNTIME_DIR"])

    def replace(self, **overrides: Any) -> "Settings":
        merged = dict(self.values)
        for key, value in overrides.items():
            merged[key if key.startswith("ERA_") else "ERA_" + key.upper()] = value
        return Settings(merged)


def markdown_table() -> str:
    """The README's configuration table (``python -m era_kernel.config``)."""
    rows = ["| variable | default | what it does |", "| --- | --- | --- |"]
    for s in SETTINGS:
        default = s.default_value()
        shown = {"ERA_DATA_DIR": "`~/.local/share/era`", "ERA_RUNTIME_DIR": "`/tmp/era-<uid>/<hash of data dir>`"}.get(
            s.name, f"`{default}`" if default != "" else "(unset)")
        rows.append(f"| `{s.name}` | {shown} | {s.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
