"""Request and response schemas: the one source of truth for validation and OpenAPI.

The engine validates every request body with these models (so the CLI, the server and
tests get the same errors), and the server builds ``/api/openapi.json`` from them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, WithJsonSchema,
                      field_validator)

from .egress.policy import parse_policy
from .errors import BadRequest
from .languages import LANGUAGES as _LANGUAGES
# The API's rules, in one place (some re-exported).
from .validation import SESSION_ID_RE, callback_url_problem, env_problem, is_session_id  # noqa: F401

LANGUAGES = tuple(_LANGUAGES)  # the one list is languages.py's
LANGUAGE_ALIASES = {"javascript": "node", "js": "node", "py": "python", "python3": "python", "ts": "typescript"}


def normalize_language(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    name = LANGUAGE_ALIASES.get(value.strip().lower(), value.strip().lower())
    if name not in LANGUAGES:
        raise ValueError(f"unknown language {value[:40]!r}; expected one of {', '.join(LANGUAGES)} (or javascript)")
    return name


def check_session_id(value: Any) -> str:
    if not is_session_id(value):
        raise ValueError("must be 1-128 characters of A-Z, a-z, 0-9, '_' or '-'")
    return value


def check_env(value: dict[str, str]) -> dict[str, str]:
    for key, val in value.items():
        problem = env_problem(key, val)
        if problem:
            raise ValueError(problem)
    return value


class _Strict(BaseModel):
    # Unknown fields are ignored (ERA clients send extras); types are strict so that
    # `code: 123` is an error rather than silently "123".
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


class SetupSpec(_Strict):
    # The package kinds take ERA's two forms each; setup/spec.py validates them (its
    # errors name the item or the line: `setup.pip.requirements line 3`).
    pip: Any = Field(None, description="pip requirement strings, or {\"requirements\": \"<requirements.txt>\"}")
    npm: Any = Field(None, description="npm package specs, or {\"packageJson\": \"<package.json>\"}")
    go: Any = Field(None, description="Go module paths, or {\"goMod\": \"<go.mod>\"}")
    commands: list[str] = Field(default_factory=list, description="shell commands run in order in the session's "
                                "sandbox")
    envs: dict[str, str] = Field(default_factory=dict, description="environment of the setup commands only")

    def is_empty(self) -> bool:
        return not (self.pip or self.npm or self.go or self.commands)


class Limits(_Strict):
    """A session's own resources, below the server's (ERA's VM fields)."""
    memory_mib: Optional[int] = Field(None, description="memory of the session's kernel and its processes, MiB "
                                      "(64 to the server's `ERA_KERNEL_MEMORY` / `ERA_DOCKER_MEMORY`)")
    cpu_count: Optional[float] = Field(None, description="CPUs (containers; the local sandbox has no CPU limit)")

    @field_validator("memory_mib", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> Any:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 64):
            raise ValueError("must be a whole number of MiB, at least 64")
        return v

    @field_validator("cpu_count", mode="before")
    @classmethod
    def _cpus(cls, v: Any) -> Any:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 64):
            raise ValueError("must be a number of CPUs above 0 (at most 64)")
        return float(v) if v is not None else v


_ENTRIES = {"type": "array", "maxItems": 256, "items": {"type": "string"}}
EGRESS_POLICY_SCHEMA = {
    "type": "object", "title": "EgressPolicy", "additionalProperties": False, "required": ["allow"],
    "description": "Where the session's code may connect out, through the egress proxy (README: Egress policy). "
                   "Entries: host patterns (`example.org`, `*.example.org`, `*`) and CIDRs (`203.0.113.0/24`). "
                   "Loopback, private, link-local and the host's own addresses are always denied; allowing one of "
                   "those ranges is a 400.",
    "properties": {"allow": {**_ENTRIES, "minItems": 1, "description": "names and ranges that may be reached"},
                   "deny": {**_ENTRIES, "description": "names and ranges refused even when allowed"}}}
EgressPolicyDoc = Annotated[dict[str, Any], WithJsonSchema(EGRESS_POLICY_SCHEMA)]
InternetAccess = Optional[Union[bool, EgressPolicyDoc]]


def internet_access(value: Any) -> Any:
    """``allowInternetAccess``: a boolean, or an egress policy checked now (each bad entry
    named; a range that is always denied refused) and kept as given."""
    if isinstance(value, dict):
        return parse_policy(value).source
    return value


class CreateSession(_Strict):
    id: Optional[str] = Field(None, validation_alias=AliasChoices("id", "session_id"),
                              description="custom id; auto `sess_<ms>_<random>` when absent")
    language: str = Field("python", description="python, node (javascript), typescript, deno, go, bash")
    persistent: bool = False
    metadata: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict, description="reaches the code as .session_data.json")
    setup: Optional[SetupSpec] = None
    default_timeout: Optional[float] = Field(None, description="seconds, > 0")
    allowInternetAccess: InternetAccess = Field(None, description="outbound network for the session's code "
                                                "(default `ERA_ALLOW_INTERNET_DEFAULT`, off): `true`, `false`, or "
                                                "an egress policy `{\"allow\": [...], \"deny\": [...]}` of host "
                                                "patterns and CIDRs (README: Egress policy)")
    allowPublicAccess: Optional[bool] = Field(None, description="`/proxy/{id}/...` answers without the API key "
                                              "(default `ERA_ALLOW_PUBLIC_DEFAULT`, off)")
    typecheck: bool = Field(False, description="typescript: type-check each cell and refuse it on a type error "
                            "(default: transpile only, as ERA's tsx)")
    limits: Optional[Limits] = Field(None, description="the session's own memory and CPUs, below the server's")
    env: dict[str, str] = Field(default_factory=dict)
    provisioner: Optional[Literal["local", "docker"]] = None
    isolation: Optional[Literal["runc", "gvisor"]] = Field(None, description="Docker sessions: `gvisor` runs the "
                                                           "kernel under gVisor's runsc (its own kernel in user "
                                                           "space); default `runc`")
    startup: Optional[str] = Field(None, description="code run after the startup cells at every kernel start")
    max_age: Optional[float] = Field(None, description="seconds after creation the session is deleted "
                                     "(default `ERA_SESSION_MAX_AGE`; absent = never)")

    _check_id = field_validator("id")(lambda v: None if v is None else check_session_id(v))
    _check_internet = field_validator("allowInternetAccess", mode="before")(lambda v: internet_access(v))
    _check_lang = field_validator("language", mode="before")(normalize_language)
    _check_env = field_validator("env")(check_env)

    @field_validator("default_timeout", "max_age", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> Any:
        return _positive_timeout(v)


class PatchSession(_Strict):
    metadata: Optional[dict[str, Any]] = None
    data: Optional[dict[str, Any]] = None
    default_timeout: Optional[float] = None
    allowInternetAccess: InternetAccess = None
    allowPublicAccess: Optional[bool] = None
    typecheck: Optional[bool] = None
    env: Optional[dict[str, str]] = None

    _check_internet = field_validator("allowInternetAccess", mode="before")(lambda v: internet_access(v))

    @field_validator("default_timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> Any:
        return _positive_timeout(v)

    _check_env = field_validator("env")(lambda v: None if v is None else check_env(v))


class RunRequest(_Strict):
    code: Optional[str] = Field(None, description="code to run; the stored default program when absent")
    timeout: Optional[float] = Field(None, description="seconds, > 0; the session's default_timeout when absent")
    env: dict[str, str] = Field(default_factory=dict, description="applies to this run only")
    background: bool = Field(False, description="answer 202 with {run_id, status, position} at once; "
                             "GET .../runs/{run_id} for its status and result")
    callback_url: Optional[str] = Field(None, description="background runs only: an http(s) URL the run's record "
                                        "is POSTed to, signed, once it ends (README: Completion callbacks)")

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> Any:
        return _positive_timeout(v)

    _check_env = field_validator("env")(check_env)

    @field_validator("callback_url")
    @classmethod
    def _callback_url(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        # Declared after `background`, so its value is known here: a synchronous run's
        # caller has the result already, and a callback it asked for would never come.
        if v is not None and not info.data.get("background"):
            raise ValueError("only allowed with background: true")
        problem = None if v is None else callback_url_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class ExecuteRequest(RunRequest):
    code: str
    language: str = "python"
    files: dict[str, str] = Field(default_factory=dict, description="path -> text content written before the run")
    provisioner: Optional[Literal["local", "docker"]] = None
    isolation: Optional[Literal["runc", "gvisor"]] = Field(None, description="Docker runs: `gvisor` for gVisor")
    allowInternetAccess: InternetAccess = None

    _check_internet = field_validator("allowInternetAccess", mode="before")(lambda v: internet_access(v))

    _check_lang = field_validator("language", mode="before")(normalize_language)

    @field_validator("callback_url")
    @classmethod
    def _no_callback(cls, v: Optional[str]) -> Optional[str]:
        # Inherited from RunRequest, but a one-shot run is answered, never posted anywhere.
        if v is not None:
            raise ValueError("not for one-shot runs: only a session's background run has one")
        return v


class DuplicateRequest(_Strict):
    id: Optional[str] = Field(None, validation_alias=AliasChoices("id", "session_id"))
    _check_id = field_validator("id")(lambda v: None if v is None else check_session_id(v))


class BulkDelete(_Strict):
    ids: Optional[list[str]] = None
    prefix: Optional[str] = None


class CommandRequest(_Strict):
    """ERA's ``POST /api/vm/{id}/run``: a shell command in the session's sandbox."""
    command: str = Field(description="run with `bash -c` inside the sandbox")
    timeout: Optional[float] = Field(None, description="seconds, > 0; the session's default_timeout when absent")
    envs: dict[str, str] = Field(default_factory=dict, description="environment variables for this command")

    _check_env = field_validator("envs")(check_env)

    @field_validator("command")
    @classmethod
    def _command(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        if "\x00" in v:
            raise ValueError("contains a NUL character")
        return v

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> Any:
        return _positive_timeout(v)


def _no_nul(v: str, what: str = "") -> str:
    if "\x00" in v:
        raise ValueError(f"{what}contains a NUL character")
    return v


class SessionCommand(_Strict):
    """``POST /api/sessions/{id}/commands``: a process in the session's sandbox, beside its
    kernel. ``cmd`` as a list is the argv; as a string it is one program name, or, with
    ``shell``, a script run by ``bash -c`` (``args`` become ``$1``...)."""
    cmd: Any = Field(description="argv list, or a program name; with `shell`, a script for `bash -c`")
    args: list[str] = Field(default_factory=list, description="more arguments (after `cmd`, or `$1`... with `shell`)")
    shell: bool = Field(False, description="run the string `cmd` with `bash -c`")
    cwd: Optional[str] = Field(None, description="working directory, relative to the workspace (or absolute inside it)")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables for this process")
    timeout: Optional[float] = Field(None, description="seconds, > 0; the session's default_timeout when absent. "
                                     "Past it the process group is killed and exit_code is 124 (not for background)")
    stdin: Optional[str] = Field(None, description="written to its stdin, which is then closed (background: kept open)")
    background: bool = Field(False, description="answer at once with its pid; follow it under .../processes/{pid}")

    _check_env = field_validator("env")(check_env)

    @field_validator("cmd")
    @classmethod
    def _cmd(cls, v: Any) -> Any:
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("must not be empty")
            return _no_nul(v)
        if isinstance(v, list) and v and all(isinstance(a, str) for a in v) and v[0]:
            for a in v:
                _no_nul(a, "an argument ")
            return v
        raise ValueError("must be a non-empty list of strings, or a string")

    @field_validator("args")
    @classmethod
    def _args(cls, v: list[str]) -> list[str]:
        for a in v:
            _no_nul(a, "an argument ")
        return v

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> Any:
        return _positive_timeout(v)


class ProcessInput(_Strict):
    """``POST .../processes/{pid}/stdin``."""
    data: str = Field("", description="text written to the process's stdin")
    eof: bool = Field(False, description="close its stdin after the data")


class ProcessSignal(_Strict):
    """``POST .../processes/{pid}/signal``."""
    signal: str = Field(description="HUP, INT, QUIT, KILL, TERM, USR1, USR2, CONT, STOP, TSTP or WINCH "
                        "(with or without SIG); sent to the process's group")


class CodeBody(_Strict):
    code: str
    description: Optional[str] = Field(None, description="what the program does (ERA's `code_description`)")


class ScheduleRequest(_Strict):
    cron: str = Field(description="5 fields (minute hour day-of-month month day-of-week, e.g. `*/5 * * * *`), "
                      "6 with seconds first (`*/30 * * * * *`), or `@hourly`, `@daily`, `@weekly`, `@monthly`, "
                      "`@yearly`")
    code: Optional[str] = Field(None, description="code each firing runs; the session's stored program "
                                "(`PUT .../code`) when absent")
    timezone: str = Field("UTC", description="IANA zone the cron fields are read in, e.g. `Europe/Paris`")

    # croniter and zoneinfo are imported when a schedule is made, not with the models.
    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        from .cron import check_cron

        return check_cron(v)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        from .cron import check_timezone

        return check_timezone(v)


class ErrorInfo(BaseModel):
    ename: str
    evalue: str
    traceback: list[str]


class RunResult(BaseModel):
    exit_code: int
    stdout: str
    stderr: str
    duration: str
    duration_ms: float
    session_id: Optional[str]
    data: Optional[dict[str, Any]] = None
    outputs: list[dict[str, Any]]
    execution_count: Optional[int] = None
    error: Optional[ErrorInfo] = None
    timed_out: bool = False
    truncated: bool = False
    run_id: Optional[str] = None


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # some errors say more: ERA's `hint`, a taken `id`

    error: str
    status_code: int
    field: Optional[str] = None
    hint: Optional[str] = Field(None, description="what to do about it, where ERA gives one")


def _positive_timeout(v: Any) -> Any:
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("must be a number of seconds")
    if not v > 0 or v != v or v == float("inf"):
        raise ValueError("must be greater than 0")
    return float(v)


def parse(model: type[BaseModel], body: Any):
    """Validate ``body`` into ``model``; a failure is a ``BadRequest`` naming the field."""
    if isinstance(body, model):
        return body
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "body"
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"].endswith("_type") or first["type"] == "string_type":
            msg = f"{msg} (got {type(first.get('input')).__name__})"
        raise BadRequest(f"invalid field '{loc}': {msg}", field=loc) from None
