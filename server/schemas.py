"""Response and extension models for the OpenAPI document.

Request models and the run result come from ``era_kernel.models`` (the one source the
engine validates with); this module only adds what the server answers with beyond
them. Imported by ``openapi`` only, never on the request path.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from era_kernel.models import ErrorInfo, RunResult
from pydantic import BaseModel, ConfigDict, Field, RootModel


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


class KernelInfo(BaseModel):
    state: Literal["idle", "busy", "starting", "dead", "none", "restarting"]


class SetupResult(_Open):
    logs: Optional[str] = None
    duration: Optional[str] = None
    error: Optional[str] = None


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
    allowInternetAccess: bool
    setup_status: Optional[Literal["pending", "running", "completed", "failed"]]
    setup_result: Optional[SetupResult]
    kernel: KernelInfo


class SessionList(BaseModel):
    sessions: list[SessionDocument]
    count: int = Field(description="sessions in this answer")
    next_cursor: Optional[str] = Field(None, description="pass as `cursor` for the next page; null on the last "
                                       "page; absent when neither `limit` nor `cursor` was sent and nothing was cut")
    truncated: Optional[bool] = Field(None, description="true when a request without `limit` or `cursor` was cut "
                                      "at `ERA_LIST_MAX` / `ERA_LIST_MAX_BYTES`; absent otherwise")


class Deleted(BaseModel):
    deleted: str


class BulkDeleted(BaseModel):
    deleted: list[str]
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
    code: Optional[str]


class RunRecord(_Open):
    run_id: Optional[str] = None
    code: str
    started_at: Optional[str] = None
    exit_code: int
    outputs: list[dict[str, Any]]
    stdout: str
    stderr: str
    duration_ms: float
    execution_count: Optional[int] = None
    error: Optional[ErrorInfo] = None
    timed_out: bool = False
    truncated: bool = False


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
    server: dict[str, Any]


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


class KernelList(RootModel[list[KernelModel]]):
    pass


# ---- streaming events (SSE `data:` and WebSocket messages) -------------------------------
class OutputEvent(BaseModel):
    type: Literal["stdout", "stderr"]
    content: str
    id: Optional[str] = Field(None, description="run id (WebSocket)")


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
    id: Optional[str] = None


class WsResult(BaseModel):
    type: Literal["result"]
    id: str
    result: RunResult


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


STREAM_EVENTS = (OutputEvent, DisplayEvent, ErrorEvent, DoneEvent)
WS_SERVER_MESSAGES = STREAM_EVENTS + (InputRequestEvent, StatusEvent, WsResult, WsProtocolError)
WS_CLIENT_MESSAGES = (WsRun, WsInterrupt, WsInputReply)
