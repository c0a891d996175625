"""Response and extension models for the OpenAPI document.

Request models and the run result come from ``era_kernel.models`` (the one source the
engine validates with); this module only adds what the server answers with beyond
them. Imported by ``openapi`` only, never on the request path.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from era_kernel.models import EgressPolicyDoc, ErrorInfo, RunResult
from pydantic import BaseModel, ConfigDict, Field, RootModel

from .storage_schemas import (D1Body, D1Exec, D1Query, KvList, KvPut, KvValue, R2List, R2Object, R2Put,  # noqa: F401
                              R2Stored, ResourceList, StorageSuccess)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class PoolFill(BaseModel):
    ready: int
    target: int


class HealthMemory(BaseModel):
    server_rss_bytes: int
    kernels_bytes: Optional[int] = Field(description="all live kernels; null when not measured")


class Health(BaseModel):
    status: Literal["ok"]
    ready: bool
    state: Literal["starting", "ready", "failed", "stopping"]
    uptime_s: float
    version: str
    # Once the engine is ready (aggregates only: /health is open, so never session ids).
    sessions: Optional[int] = None
    kernels: Optional[dict[str, int]] = Field(None, description="live kernels by state")
    pool: Optional[dict[str, PoolFill]] = Field(None, description="per pool, e.g. `python:local`")
    memory: Optional[HealthMemory] = None


SESSION_EVENT_TYPES = Literal["kernel_started", "kernel_culled", "kernel_evicted", "kernel_died", "kernel_restarted",
                              "kernel_stopped", "setup_completed", "setup_failed"]


class SessionEventBody(_Open):
    """A session event: what happened to the session's kernel or setup, and why. Beside
    these, what the event knows: `exit_status`, `out_of_memory`, `cut` (kernel_died),
    `idle_s` and `idle_timeout_s` (kernel_culled), `max_kernels` (kernel_evicted),
    `timeout_s` (kernel_restarted by a timeout), `language`, `provisioner`, `pooled`,
    `start_ms` (kernel_started), `duration_ms`, `source`, `env`, `error` (setup_*)."""
    type: SESSION_EVENT_TYPES
    reason: str = Field(description="idle, kernel limit, out of memory, exit status N, message too large, "
                                    "timeout, request, settings changed, server shutdown, start, warm pool, a "
                                    "setup's error, ...")
    at: str = Field(description="ISO-8601 UTC with Z")
    message: str = Field(description="the same, in a sentence for people, naming the setting involved")


class SessionEvent(SessionEventBody):
    id: int = Field(description="grows with every event, never reused: pass the last one seen as `after`")


class KernelInfo(BaseModel):
    state: Literal["idle", "busy", "starting", "dead", "none", "restarting"]
    last_exit: Optional[SessionEventBody] = Field(None, description="how the session's last kernel ended (its "
                                                  "last kernel_culled/evicted/died/restarted/stopped event); null if "
                                                  "none did")


class SetupResult(_Open):
    """ERA's fields (success ... stderr) and ours (logs, duration, env, source)."""
    success: Optional[bool] = None
    duration_ms: Optional[float] = None
    pip_packages: Optional[list[str]] = None
    npm_packages: Optional[list[str]] = None
    go_modules: Optional[list[str]] = None
    commands_run: Optional[list[str]] = None
    error: Optional[str] = None
    stdout: Optional[str] = None
    stderr: Optional[str] = None
    logs: Optional[str] = None
    duration: Optional[str] = None


class SessionDocument(_Open):
    id: str
    created_at: str = Field(description="ISO-8601 UTC with Z")
    last_run_at: Optional[str]
    language: str
    persistent: bool
    file_count: int
    total_size_bytes: int
    metadata: dict[str, Any]
    data: dict[str, Any]
    default_timeout: float
    allowInternetAccess: Union[bool, EgressPolicyDoc] = Field(description="`true`, `false`, or the session's egress "
                                                              "policy")
    allowPublicAccess: bool = Field(description="`/proxy/{id}/...` answers without the API key")
    typecheck: bool = Field(description="typescript sessions: cells are type-checked")
    isolation: Optional[Literal["runc", "gvisor"]] = Field(None, description="Docker sessions: the kernel's runtime "
                                                           "(`gvisor`: gVisor's runsc); null for local sessions")
    setup: Optional[dict[str, Any]] = Field(description="the setup asked for, in canonical form")
    setup_status: Optional[Literal["pending", "running", "completed", "failed"]]
    setup_result: Optional[SetupResult]
    kernel: KernelInfo
    owner: Optional[str] = Field(None, description="the id of the replica serving the session (holding its lease; "
                                 "GET /api/replicas); null when none does now (the next request's replica takes it)")


class SessionList(BaseModel):
    sessions: list[SessionDocument]
    count: int = Field(description="sessions in this answer")
    next_cursor: Optional[str] = Field(None, description="pass as `cursor` for the next page; null on the last "
                                       "page; absent when neither `limit` nor `cursor` was sent and nothing was cut")
    truncated: Optional[bool] = Field(None, description="true when a request without `limit` or `cursor` was cut "
                                      "at `ERA_LIST_MAX` / `ERA_LIST_MAX_BYTES`; absent otherwise")


class Patched(BaseModel):
    success: Literal[True]
    id: str
    metadata: SessionDocument = Field(description="the whole session document after the change (ERA's name)")
    updated_at: str


class Deleted(BaseModel):
    success: Literal[True]
    id: str
    deleted_at: str
    deleted: str = Field(description="the same id (this server's answer before ERA's)")


class BulkDeleted(BaseModel):
    success: Literal[True]
    deleted_count: int
    deleted_sessions: list[str]
    deleted_at: str
    deleted: list[str] = Field(description="the same ids (this server's answer before ERA's)")
    count: int


class FileInfo(_Open):
    path: str
    size: int
    uploaded: Optional[str] = None


class FileList(BaseModel):
    files: list[FileInfo]
    count: int


class FileWritten(_Open):
    path: str
    size: int


class FileDeleted(BaseModel):
    deleted: str
    session_id: str


class StoredCode(BaseModel):
    session_id: str
    code: str
    description: Optional[str]
    updated_at: Optional[str]
    code_length: int


class CodeStored(BaseModel):
    success: Literal[True]
    session_id: str
    code_length: int
    updated_at: str


class HostAnswer(BaseModel):
    """GET /api/sessions/{id}/host?port=N (ERA's shape)."""
    url: str = Field(description="where the port is reached: /proxy/{id}/{port}/ on this server, or the "
                                 "ERA_PROXY_HOST form")
    session_id: str
    port: int


class RunRecord(_Open):
    """A finished run in the history. A run cut off before it ran (cancelled while
    queued, or interrupted by a restart) has no result fields, only its status and reason."""
    run_id: Optional[str] = None
    code: Optional[str] = None
    status: Optional[str] = None
    reason: Optional[str] = None
    started_at: Optional[str] = None
    exit_code: Optional[int] = None
    outputs: list[dict[str, Any]] = []
    stdout: str = ""
    stderr: str = ""
    duration_ms: Optional[float] = None
    execution_count: Optional[int] = None
    error: Optional[ErrorInfo] = None
    timed_out: bool = False
    truncated: bool = False


class RunAccepted(BaseModel):
    run_id: str
    status: Literal["queued", "running"]
    position: int = Field(description="0: running or about to; n: n runs go before it")


class RunState(_Open):
    """A run's record at any point: the result fields (RunResult) join once it ended."""
    run_id: str
    session_id: str
    status: Literal["queued", "running", "completed", "failed", "cancelled", "interrupted"]
    source: str = Field(description="who submitted it: rest, sse, ws, background, schedule, gateway")
    code: Optional[str] = None
    submitted_at: Optional[str] = None
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    reason: Optional[str] = Field(None, description="why it did not complete: timeout, killed: out of memory, "
                                  "kernel died, server restarted, cancelled by request, ...")
    position: Optional[int] = Field(None, description="while queued or running")
    exit_code: Optional[int] = None
    kernel_state_lost: Optional[bool] = Field(None, description="queued across a restart: ran on a fresh kernel")


class RunEvents(BaseModel):
    session_id: str
    run_id: str
    status: str = Field(description="the run's status when the events were read")
    events: list[dict[str, Any]] = Field(description="journal events, oldest first, each with its seq")
    last_seq: int = Field(description="the seq to pass as `after` next time")


class SessionEvents(BaseModel):
    session_id: str
    events: list[SessionEvent] = Field(description="oldest first; the newest 1000 of the session are kept")
    last_id: int = Field(description="the id to pass as `after` next time")


class RunList(BaseModel):
    session_id: str
    runs: list[RunRecord]
    count: int


class SkippedFiring(BaseModel):
    slot: str = Field(description="the slot not fired, ISO-8601 UTC")
    reason: str
    at: str = Field(description="when it was skipped")


class ScheduleDocument(BaseModel):
    id: str = Field(description="`sch_<ms>_<8 hex>`")
    session_id: str
    cron: str
    timezone: str
    code: Optional[str] = Field(description="null: each firing runs the session's stored program")
    created_at: str
    next_run_at: str = Field(description="the next slot, ISO-8601 UTC")
    last_slot: Optional[str] = Field(description="the latest slot fired (or skipped while its previous run ran)")
    last_run_id: Optional[str] = Field(description="the run of that slot")
    last_skipped: Optional[SkippedFiring] = None


class ScheduleList(BaseModel):
    session_id: str
    schedules: list[ScheduleDocument]
    count: int


class Notebook(_Open):
    nbformat: Literal[4]
    nbformat_minor: int
    metadata: dict[str, Any]
    cells: list[dict[str, Any]]


class Interrupted(BaseModel):
    session_id: str
    interrupted: bool


class Restarted(BaseModel):
    session_id: str
    restarted: bool


class KernelStat(_Open):
    session_id: Optional[str]
    language: str
    provisioner: str
    state: str
    idle_s: float
    memory_bytes: Optional[int] = Field(description="process-tree RSS (local) or container cgroup usage (docker)")


class Stats(_Open):
    sessions: int
    live_kernels: int
    kernel_states: Optional[dict[str, int]] = None
    kernel_slots: Optional[dict[str, int]] = None
    pool: Optional[dict[str, Any]] = None
    culled: Optional[dict[str, int]] = None
    kernels: Optional[list[KernelStat]] = None
    memory: Optional[dict[str, Any]] = None
    uptime_s: Optional[float] = None
    replica: Optional[str] = Field(None, description="this server's id in the replica registry (GET /api/replicas)")
    leases: Optional[dict[str, Any]] = Field(None, description="this replica's session leases: enabled, held, "
                                             "taken_over (sessions taken over from another replica), ttl_s")
    cluster: Optional[dict[str, Any]] = Field(None, description="every live replica (`replicas`: id, address, "
                                              "live_kernels, capacity, heartbeat_age) and their totals "
                                              "(`live_kernels`, `max_kernels`)")
    server: dict[str, Any]
    # ERA's storage registry stats, in the same document.
    total: Optional[int] = Field(None, description="storage resources (KV entries, objects, D1 tables)")
    by_type: Optional[dict[str, int]] = None
    by_namespace: Optional[dict[str, int]] = None
    total_size: Optional[int] = Field(None, description="bytes of KV values and objects")


class Replica(_Open):
    id: str
    address: Optional[str] = Field(description="URL the other replicas reach this one at (ERA_REPLICA_ADDRESS)")
    started_at: str
    capacity: dict[str, Any] = Field(description="max_kernels: its kernel limit")
    live_kernels: int
    heartbeat_at: str = Field(description="its last heartbeat, by the store's clock")
    heartbeat_age: float = Field(description="seconds since that heartbeat, by the store's clock; a replica "
                                             "that died stops renewing it")


class ReplicaList(BaseModel):
    replica: str = Field(description="the id of the server that answered")
    replicas: list[Replica]


class OpenAPI(_Open):
    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]


# ---- Jupyter kernel gateway (server/jupyter.py) ------------------------------------------
class KernelSpecEntry(BaseModel):
    name: str
    spec: dict[str, Any] = Field(description="the kernel.json: argv, display_name, language, metadata, ...")
    resources: dict[str, str]


class KernelSpecList(BaseModel):
    default: Optional[str]
    kernelspecs: dict[str, KernelSpecEntry]


class StartKernel(BaseModel):
    name: Optional[str] = Field(None, description="a kernelspec name; the listing's default when absent")
    env: Optional[dict[str, Any]] = Field(None, description="only KERNEL_* variables are passed to the kernel")


class KernelModel(BaseModel):
    id: str = Field(description="the kernel id, which is the id of the ERA session underneath")
    name: str
    last_activity: str = Field(description="%Y-%m-%dT%H:%M:%S.%fZ")
    execution_state: str
    connections: int
    last_exit: Optional[SessionEventBody] = Field(None, description="ERA's, present once a kernel went away: how "
                                                  "(culled idle, died, ...); the next message starts a new one")


class KernelList(RootModel[list[KernelModel]]):
    pass


# ---- streaming events (SSE `data:` and WebSocket messages) -------------------------------
class OutputEvent(BaseModel):
    type: Literal["stdout", "stderr"]
    content: str
    id: Optional[str] = Field(None, description="run id (WebSocket); a `command` message's id when `command`")
    command: Optional[bool] = Field(None, description="WebSocket: output of a `command` message, not of a run")
    pid: Optional[int] = Field(None, description="a command's pid in the session's sandbox")


class DisplayEvent(BaseModel):
    type: Literal["display"]
    data: dict[str, Any]
    metadata: dict[str, Any] = Field(default_factory=dict)
    id: Optional[str] = None


class ErrorEvent(BaseModel):
    type: Literal["error"]
    ename: str
    evalue: str
    traceback: list[str]
    id: Optional[str] = None


class DoneEvent(BaseModel):
    type: Literal["done"]
    exit_code: int
    duration: str
    duration_ms: Optional[float] = None
    timed_out: Optional[bool] = None
    truncated: Optional[bool] = None
    id: Optional[str] = None


class InputRequestEvent(BaseModel):
    type: Literal["input_request"]
    prompt: str
    password: bool
    id: Optional[str] = None


class StatusEvent(BaseModel):
    type: Literal["status"]
    state: str
    reason: Optional[str] = Field(None, description="culled, dead and deleted: why (idle, kernel limit, out of memory, "
                                                    "exit status N, ...)")
    last_exit: Optional[SessionEventBody] = Field(None, description="the first message of a WebSocket: how the "
                                                  "session's last kernel ended")
    id: Optional[str] = None


class WsResult(BaseModel):
    type: Literal["result"]
    id: str
    result: RunResult


class WsCommandResult(BaseModel):
    type: Literal["command_result"]
    id: Optional[str]
    result: "CommandResult"


class WsProtocolError(BaseModel):
    type: Literal["error"]
    id: Optional[str]
    error: str
    status_code: int
    field: Optional[str] = None


class WsRun(BaseModel):
    type: Literal["run"]
    code: Optional[str] = None
    timeout: Optional[float] = None
    env: dict[str, str] = Field(default_factory=dict)
    id: Optional[str] = Field(None, description="run id echoed on every event of the run; generated if absent")


class WsInterrupt(BaseModel):
    type: Literal["interrupt"]


class WsInputReply(BaseModel):
    type: Literal["input_reply"]
    value: str


class WsCommand(BaseModel):
    """A foreground command beside the kernel (``POST .../commands``'s body, no
    ``background``): its output comes to this socket only, then ``command_result``."""
    type: Literal["command"]
    id: Optional[str] = Field(None, description="echoed on its output events and its command_result")
    cmd: Any = Field(description="argv list, or a program name; with `shell`, a script for `bash -c`")
    args: list[str] = Field(default_factory=list)
    shell: bool = False
    cwd: Optional[str] = None
    env: dict[str, str] = Field(default_factory=dict)
    timeout: Optional[float] = None
    stdin: Optional[str] = None


STREAM_EVENTS = (OutputEvent, DisplayEvent, ErrorEvent, DoneEvent)
WS_SERVER_MESSAGES = STREAM_EVENTS + (InputRequestEvent, StatusEvent, WsResult, WsCommandResult, WsProtocolError)
WS_CLIENT_MESSAGES = (WsRun, WsInterrupt, WsInputReply, WsCommand)


# ---- ERA's local-agent routes (handlers/vm.py) -----------------------------------------------
class CreateVm(_Open):
    language: str = Field("python", description="python, node, typescript, deno, go, bash")
    cpu_count: Optional[float] = Field(None, description="CPUs (containers)")
    memory_mib: Optional[int] = Field(None, description="memory, MiB")
    network_mode: Literal["none", "full"] = "none"
    persist: bool = False
    id: Optional[str] = Field(None, description="ours: choose the id (default `<language>-<nanoseconds>`)")


class Vm(_Open):
    id: str
    language: str
    rootfs_image: str
    cpu_count: Optional[float]
    memory_mib: int
    network_mode: Literal["none", "full"]
    persist: bool
    status: Literal["running", "stopped"]
    created_at: str
    last_run_at: Optional[str]
    limits_enforced: dict[str, bool] = Field(description="which limits this provisioner enforces")
    session: SessionDocument = Field(description="the session behind it")


class VmSummary(BaseModel):
    id: str
    language: str
    status: Literal["running", "stopped"]
    cpu_count: Optional[float]
    memory_mib: int
    created_at: str


class VmList(BaseModel):
    vms: list[VmSummary]
    count: int


class VmDone(BaseModel):
    status: Literal["stopped", "deleted"]
    vm_id: str
    message: str


class CommandResult(_Open):
    exit_code: int = Field(description="the command's; 124 when its timeout ended it")
    stdout: str
    stderr: str
    duration: str = Field(description="Go-style, e.g. `1.234s`")
    duration_ms: float
    timed_out: bool
    truncated: bool = Field(False, description="output went past ERA_OUTPUT_LIMIT per stream")
    pid: Optional[int] = Field(None, description="its pid in the session's sandbox")


class ProcessInfo(BaseModel):
    pid: Optional[int] = Field(description="in the session's sandbox (the kernel's pid namespace)")
    cmd: list[str]
    kind: Literal["command", "background", "terminal"]
    started: str
    state: Literal["starting", "running", "exited", "killed", "failed"]
    exit_code: Optional[int]
    ended: Optional[str]
    reason: Optional[str] = Field(description="why it ended, when it did not exit by itself")
    output_seq: Optional[int] = Field(None, description="seq of its last output event (absent for a process of an "
                                                        "earlier server process: page its output)")


class ProcessList(BaseModel):
    processes: list[ProcessInfo]
    count: int


class ProcessOutput(BaseModel):
    pid: Optional[int]
    state: str
    exit_code: Optional[int]
    events: list[dict[str, Any]] = Field(description="`stdout`/`stderr` {seq, content}, last `exit` {seq, exit_code}")
    next: int = Field(description="ask with after=next for what follows")
    dropped: bool = Field(description="events after `after` fell out of the ring buffer")


class ProcessStdinResult(BaseModel):
    pid: int
    written: int
    eof: bool


class ProcessSignalResult(BaseModel):
    pid: int
    signal: str

