"""The engine: sessions = a kernel + a workspace + a record in the store.

``SessionManager`` is what the server and the CLI call (docs/engine-api.md). It keeps
live kernels in memory and everything else in the store and the workspace, so a
restarted process finds every session, its data, files and history, and starts kernels
lazily on the next run. Runs on one session are serialized in arrival order (a FIFO
lock per session); different sessions run concurrently. The warm pool, admission under
the kernel limit, culling and stats live in ``upkeep.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from . import models
from .config import Settings
from .errors import BadRequest, Conflict, EraError, KernelFailed, NotFound, TooLarge
from .kernel import EventSink, InputHandler, SessionKernel
from .kernelspecs import EraKernelSpecManager
from .languages import get_language
from .listing import SessionPage, read_page, record_chunks
from .orphans import reap_orphans
from .pool import KernelPool, WarmKernel, parse_pool_keys
from .runs import done_event, new_run_id, notebook_from_runs, run_result, utc_now
from .slots import KernelSlots
from .store.base import SessionExists, store_for_url
from .session_files import POOL_ROOT, SessionFiles
from .setup import SetupManager
from .upkeep import KernelUpkeep

log = logging.getLogger("era.sessions")

DATA_FILE = ".session_data.json"
CONTAINER_WORKSPACE = "/workspace"
UID_BASE = 100_000  # sandbox uids when running as root: UID_BASE + the session's seq
EPHEMERAL_UID_BASE = 900_000_000
_FIELDS_COPIED_BY_DUPLICATE = ("language", "persistent", "provisioner", "metadata", "data", "setup",
                               "default_timeout", "allowInternetAccess", "env", "startup", "code")


class SessionManager(KernelUpkeep):
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()
        self.store = store_for_url(self.settings["ERA_STORE_URL"])
        self.spec_manager = EraKernelSpecManager()
        self.files = SessionFiles(self.settings)
        # Package setups into shared environments, archived in the workspace store (built lazily).
        self.setups = SetupManager(self.settings, lambda: self.files.store)
        self.slots = KernelSlots(self.settings["ERA_MAX_KERNELS"])
        self.kernels: dict[str, SessionKernel] = {}
        self._starting: dict[str, asyncio.Task] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._subscribers: dict[str, set[Callable[[dict], None]]] = {}
        self._data_on_disk: dict[str, str] = {}  # session id -> JSON known to be in its data file
        self._workdirs: dict[str, str] = {}  # session id -> its directory name, when not the id
        self._active_at: dict[str, float] = {}  # session id -> wall time its kernel last started or ran
        self._ephemeral = 0
        self._pool_uids: list[int] = []
        pool_keys = parse_pool_keys(self.settings["ERA_POOL_KERNELS"], self.settings["ERA_PROVISIONER"])
        for language, _ in pool_keys:
            get_language(language)  # a typo in ERA_POOL_KERNELS fails at start, not at the first request
        self.pool = KernelPool(pool_keys, self.settings["ERA_POOL_SIZE"], self.slots, self._spawn_warm,
                               self._discard_warm)
        self.culled = {"idle": 0, "max_age": 0, "lru": 0}
        self._culler: asyncio.Task | None = None
        self._cleanups: set[asyncio.Future] = set()  # one-shot kernels being stopped, runs being recorded
        self._started = False
        self._started_at = time.monotonic()

    # ---- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Open the store and reap what a previous process left (kernels, sockets)."""
        await asyncio.to_thread(self._make_dirs)
        await self.store.open()
        reaped = await reap_orphans(self.settings)
        if reaped:
            log.info("reaped %d orphaned kernel(s) from a previous process", reaped)
        claimed: set[Path] = set()
        async for records in record_chunks(self.store):
            for record in records:  # setups a previous process did not finish
                if record.get("setup") and record.get("setup_status") in ("pending", "running"):
                    await self._start_setup(record)
            claimed.update(self.files.path(r) for r in records)
        await self._remove_unclaimed_workdirs(claimed)
        self._started = True
        self._started_at = time.monotonic()
        self.pool.start()
        self._culler = asyncio.create_task(self._cull_loop(), name="era-culler")

    async def _remove_unclaimed_workdirs(self, claimed: set[Path]) -> None:
        """Pooled kernels' directories a previous process left unclaimed: every directory
        under ``pool/`` that no record names, and the ``sessions/pool-<hex>`` ones of the
        older layout that are neither a record's directory nor a session's own. A failure
        is logged, never fatal: nothing a session left on disk may stop the server.
        ``claimed``: every record's directory."""

        def unclaimed() -> list[Path]:
            found = [p for p in (self.settings.data_dir / POOL_ROOT).iterdir()]
            found += [p for p in (self.settings.data_dir / "sessions").iterdir() if p.name.startswith("pool-")]
            return [p for p in found if p not in claimed]

        for path in await asyncio.to_thread(unclaimed):
            try:
                await self.files.workspace(path).remove()
            except Exception as exc:
                log.error("cannot remove the unclaimed pool directory %s: %s", path.name, exc)

    def _make_dirs(self) -> None:
        for path in (self.settings.data_dir / "sessions", self.settings.data_dir / POOL_ROOT,
                     self.settings.data_dir / "scratch"):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o711)  # kernels traverse to their own dir; nobody lists
        self.settings.runtime_dir.mkdir(parents=True, exist_ok=True)

    async def shutdown(self) -> None:
        """Interrupt running code, stop every kernel, close the store."""
        await self.setups.shutdown()
        if self._culler is not None:
            self._culler.cancel()
        await self.pool.shutdown()
        await asyncio.gather(*self._cleanups, return_exceptions=True)
        for task in list(self._starting.values()):
            task.cancel()
        kernels = list(self.kernels.items())
        await asyncio.gather(*(k.interrupt() for _, k in kernels if k.state == "busy"), return_exceptions=True)
        await asyncio.gather(*(self._stop_kernel(sid) for sid, _ in kernels), return_exceptions=True)
        if self._started:
            await self.store.close()
            self._started = False

    # ---- records and documents ----------------------------------------------------------
    def workspace_dir(self, session_id: str) -> Path:
        return self.files.path({"id": session_id, "workdir": self._workdirs.get(session_id)})

    def _uid(self, record: dict[str, Any]) -> int:
        if os.getuid() != 0:
            return os.getuid()
        return record["uid"] if record.get("uid") else UID_BASE + record["seq"]

    async def _record(self, session_id: str) -> dict[str, Any]:
        if not models.is_session_id(session_id):
            raise NotFound("session not found")
        record = await self.store.get_session(session_id)
        if record is None:
            raise NotFound(f"session {session_id} not found")
        if record.get("workdir"):
            self._workdirs[session_id] = record["workdir"]
        return record

    async def _document(self, record: dict[str, Any]) -> dict[str, Any]:
        file_count, total = await self.files.of(record).usage()
        kernel = self.kernels.get(record["id"])
        state = "starting" if record["id"] in self._starting else (kernel.state if kernel else "none")
        return {
            "id": record["id"], "created_at": record["created_at"], "last_run_at": record.get("last_run_at"),
            "language": record["language"], "persistent": record["persistent"],
            "provisioner": record["provisioner"], "file_count": file_count, "total_size_bytes": total,
            "metadata": record["metadata"], "data": record["data"], "default_timeout": record["default_timeout"],
            "allowInternetAccess": record["allowInternetAccess"], "setup_status": record.get("setup_status"),
            "setup_result": record.get("setup_result"), "kernel": {"state": state},
        }

    def _check_sizes(self, fields: dict[str, Any]) -> None:
        """413 for a ``data`` or ``metadata`` over its limit; called before anything is
        written. Both are in every session document, so they bound every listing too."""
        for name, setting in (("metadata", "ERA_MAX_METADATA_BYTES"), ("data", "ERA_MAX_DATA_BYTES")):
            if fields.get(name) is None:
                continue
            size, limit = len(json.dumps(fields[name]).encode()), self.settings[setting]
            if size > limit:
                raise TooLarge(f"field '{name}' is {size} bytes; the limit is {limit} ({setting})", field=name)

    # ---- sessions -------------------------------------------------------------------------
    async def create(self, body: Any) -> dict[str, Any]:
        req = models.parse(models.CreateSession, body)
        get_language(req.language)
        self._check_sizes({"metadata": req.metadata, "data": req.data})
        setup = self.setups.normalize(req.setup)
        record = {
            "id": req.id or f"sess_{int(time.time() * 1000)}_{secrets.token_hex(4)}",
            "created_at": utc_now(), "last_run_at": None, "language": req.language,
            "persistent": req.persistent, "provisioner": req.provisioner or self.settings["ERA_PROVISIONER"],
            "metadata": req.metadata, "data": req.data, "setup": setup,
            "setup_status": "pending" if setup else None, "setup_result": None,
            "default_timeout": req.default_timeout or self.settings["ERA_DEFAULT_TIMEOUT"],
            "allowInternetAccess": req.allowInternetAccess, "env": req.env, "startup": req.startup, "code": None,
            "max_age": req.max_age,
        }
        return await self._insert(record)

    async def _insert(self, record: dict[str, Any], copy_from: dict[str, Any] | None = None) -> dict[str, Any]:
        """Take a kernel (a pooled one, or a slot for a new one), store the record, make
        the workspace; all or nothing."""
        warm = self._take_warm(record)
        if warm is not None:  # its directory and uid become the session's
            record.update(workdir=f"{POOL_ROOT}/{warm.workdir.name}", uid=warm.uid)
        else:
            await self._admit()  # 429 before anything is written
        try:
            await self.files.check_unused(record)
            try:
                record = await self.store.insert_session(record)
            except SessionExists:
                raise Conflict(f"session {record['id']} already exists", field="id") from None
            try:
                await self.files.create(record, self._uid(record), copy_from,
                                        self._uid(copy_from) if copy_from else None)
            except BaseException:
                await self.store.delete_session(record["id"])
                await self.files.remove(record)
                raise
        except BaseException:
            if warm is not None:
                await self._discard_warm(warm)
            self.slots.release()
            raise
        if record.get("workdir"):
            self._workdirs[record["id"]] = record["workdir"]
        if record.get("setup"):
            await self._start_setup(record)  # before the kernel task, which waits for it
        self._start_in_background(record, warm)
        return await self._document(record)

    async def get(self, session_id: str) -> dict[str, Any]:
        return await self._document(await self._record(session_id))

    async def list(self, limit: int | None = None, cursor: str | None = None) -> SessionPage:
        """One page of session documents, oldest first: after ``cursor`` (a page's
        ``next_cursor``), at most ``limit`` (default and most ``ERA_LIST_MAX``) and about
        ``ERA_LIST_MAX_BYTES`` of JSON; ``next_cursor`` is None on the last page."""
        return await read_page(self.store, self._document, limit=limit, cursor=cursor,
                               cap=self.settings["ERA_LIST_MAX"], max_bytes=self.settings["ERA_LIST_MAX_BYTES"])

    async def patch(self, session_id: str, body: Any) -> dict[str, Any]:
        await self._record(session_id)
        req = models.parse(models.PatchSession, body)
        changes = req.model_dump(exclude_unset=True, exclude_none=True)
        self._check_sizes(changes)
        record = await self.store.update_session(session_id, changes)
        if record is None:
            raise NotFound(f"session {session_id} not found")
        if {"allowInternetAccess", "env"} & changes.keys() and session_id in self.kernels:
            await self._stop_kernel(session_id)  # takes effect at the next kernel start
        return await self._document(record)

    async def delete(self, session_id: str) -> None:
        record = await self._record(session_id)
        await self.setups.cancel(session_id)
        await self._stop_kernel(session_id)
        # Files first, the record last: a delete that fails half-way leaves the session
        # listed, and deleting it again finishes the job; never files without a record.
        try:
            await self.files.remove(record)
        except OSError as exc:
            log.error("session %s: its files could not be removed: %s", session_id, exc)
            raise EraError(f"the files of session {session_id} could not all be removed ({exc.strerror or exc}); "
                           "the session is kept: retry the delete") from None
        await self.store.delete_session(session_id)
        for per_session in (self._locks, self._subscribers, self._data_on_disk, self._workdirs, self._active_at):
            per_session.pop(session_id, None)

    async def delete_many(self, ids: list[str] | None = None, prefix: str | None = None) -> list[str]:
        wanted = None if ids is None else set(ids)
        targets: list[str] = []
        async for records in record_chunks(self.store):
            targets += [r["id"] for r in records
                        if (wanted is None or r["id"] in wanted) and (prefix is None or r["id"].startswith(prefix))]
        for sid in targets:
            try:
                await self.delete(sid)
            except NotFound:
                pass
        return targets

    async def duplicate(self, session_id: str, body: Any = None) -> dict[str, Any]:
        source = await self._record(session_id)
        req = models.parse(models.DuplicateRequest, body)
        record = {k: source.get(k) for k in _FIELDS_COPIED_BY_DUPLICATE}
        self._check_sizes(record)  # stored under a larger limit: not copied past today's
        record.update(id=req.id or f"sess_{int(time.time() * 1000)}_{secrets.token_hex(4)}",
                      created_at=utc_now(), last_run_at=None, max_age=source.get("max_age"),
                      setup_status="pending" if source.get("setup") else None, setup_result=None)
        return await self._insert(record, copy_from=source)

    # ---- kernels --------------------------------------------------------------------------
    def _launch_options(self, record: dict[str, Any], workspace: Path, uid: int) -> dict[str, Any]:
        options = {"workspace": str(workspace), "runtime_dir": str(self.settings.runtime_dir), "uid": uid,
                   "allow_network": record["allowInternetAccess"], "env": {},
                   "labels": {"era.session": record["id"]} if record.get("id") else {}}
        if record["provisioner"] != "docker":  # the engine's limits, not the process environment's
            options.update(memory=self.settings["ERA_KERNEL_MEMORY"], pids=self.settings["ERA_KERNEL_PIDS"],
                           tmp_size=self.settings["ERA_KERNEL_TMP_SIZE"], cgroups=self.settings["ERA_KERNEL_CGROUPS"])
        return options

    def _startup_cells(self, record: dict[str, Any], workspace: Path) -> list[str]:
        language = get_language(record["language"])
        env = {"ERA_SESSION": "true", "ERA_SESSION_ID": record.get("id") or "", "ERA_LANGUAGE": record["language"],
               **record.get("env", {})}
        # The working directory as the kernel sees it: containers mount it at /workspace.
        cwd = CONTAINER_WORKSPACE if record["provisioner"] == "docker" else str(workspace)
        return language.startup_cells(cwd, env, record.get("startup"))

    async def _start_setup(self, record: dict[str, Any]) -> None:
        sid = record["id"]

        async def on_status(status: str, result: dict[str, Any] | None) -> None:
            await self.store.update_session(sid, {"setup_status": status, "setup_result": result})

        await self.setups.start(sid, record["language"], record["provisioner"], self._uid(record),
                                record["setup"], on_log=lambda line: self._emit(sid, {"type": "setup", "content": line}),
                                on_status=on_status)

    def _new_kernel(self, record: dict[str, Any], workspace: Path, uid: int, cells: bool = True) -> SessionKernel:
        """A kernel for this record; ``cells=False`` for a pooled one (its user's startup
        cells run when it is claimed)."""
        language = get_language(record["language"])
        extras = self.setups.launch_extras(record["language"], record["provisioner"], record.get("setup"))
        launch = self._launch_options(record, workspace, uid)
        launch["readonly"] = extras["readonly"]
        launch["env"].update(extras["env"])
        return SessionKernel(self.spec_manager, language.kernelspec_name(record["provisioner"]),
                             launch, extras["startup"] + self._startup_cells(record, workspace) if cells else [],
                             start_timeout=self.settings["ERA_KERNEL_START_TIMEOUT"],
                             max_message=max(self.settings["ERA_KERNEL_MESSAGE_LIMIT"],
                                             2 * self.settings["ERA_OUTPUT_LIMIT"]))

    async def _start_kernel(self, record: dict[str, Any], slot_held: bool = False) -> SessionKernel | None:
        """Start the session's kernel (background task on create; inline on a cold run)."""
        sid = record["id"]
        if not slot_held:
            await self._admit()
        if record.get("setup"):
            try:  # the environment must exist before a kernel is launched with it bound
                await self.setups.wait(sid)
                await self.setups.ensure(record["language"], record["provisioner"], record["setup"])
            except BaseException:
                self._starting.pop(sid, None)
                self.slots.release()
                raise
        kernel = self._new_kernel(record, self.files.path(record), self._uid(record))
        self.kernels[sid] = kernel
        self._emit(sid, {"type": "status", "state": "starting"})
        try:
            await self.files.ensure_restored(record, self._uid(record))
            await kernel.start()
        except BaseException as exc:
            self.kernels.pop(sid, None)
            self.slots.release()
            if isinstance(exc, KernelFailed):
                log.warning("session %s: %s", sid, exc.message)
            raise
        finally:
            self._starting.pop(sid, None)
        self._active_at[sid] = time.time()
        self._emit(sid, {"type": "status", "state": "idle"})
        return kernel

    async def _claim_kernel(self, record: dict[str, Any], warm: WarmKernel) -> SessionKernel:
        """Make a pooled kernel the session's: its startup cells run now."""
        sid = record["id"]
        self.kernels[sid] = warm.kernel
        try:
            await warm.kernel.claim(self._startup_cells(record, warm.workdir))
        except BaseException:
            self.kernels.pop(sid, None)
            await warm.kernel.stop(now=True)
            self.slots.release()
            raise
        finally:
            self._starting.pop(sid, None)
        self._active_at[sid] = time.time()
        return warm.kernel

    def _start_in_background(self, record: dict[str, Any], warm: WarmKernel | None = None) -> None:
        """Start (or claim) the kernel without waiting (the slot is already held); a
        failure is logged, and the next run tries again and reports it."""
        start = self._claim_kernel(record, warm) if warm else self._start_kernel(record, slot_held=True)
        task = asyncio.create_task(start)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no "never retrieved" noise
        self._starting[record["id"]] = task

    async def _ensure_kernel(self, record: dict[str, Any]) -> SessionKernel:
        sid = record["id"]
        task = self._starting.get(sid)
        if task is not None:
            try:
                await asyncio.shield(task)
            except Exception:
                pass  # the background start failed: try once more below, reporting that error
        kernel = self.kernels.get(sid)
        if kernel is not None and kernel.state != "dead":
            return kernel
        if kernel is not None:
            await self._stop_kernel(sid)
        kernel = await self._start_kernel(record)
        assert kernel is not None
        return kernel

    async def _stop_kernel(self, session_id: str) -> None:
        task = self._starting.pop(session_id, None)
        if task is not None:
            # Once only: a start already cancelled (by shutdown) is stopping its kernel, and
            # a second cancel would cut that short, leaving the kernel's directory and cgroup.
            if not task.cancelling():
                task.cancel()
            try:
                await task
            except BaseException:
                pass
        kernel = self.kernels.pop(session_id, None)
        if kernel is not None:
            await kernel.stop(now=True)
            self.slots.release()

    async def interrupt(self, session_id: str) -> None:
        await self._record(session_id)
        kernel = self.kernels.get(session_id)
        if kernel is not None:
            await kernel.interrupt()

    async def restart(self, session_id: str) -> None:
        record = await self._record(session_id)
        await self._stop_kernel(session_id)
        self._emit(session_id, {"type": "status", "state": "restarting"})
        await self._admit()
        self._start_in_background(record)

    # ---- runs -----------------------------------------------------------------------------
    def subscribe(self, session_id: str, callback: Callable[[dict], None]) -> Callable[[], None]:
        subs = self._subscribers.setdefault(session_id, set())
        subs.add(callback)
        return lambda: subs.discard(callback)

    def _emit(self, session_id: str, event: dict[str, Any], on_event: EventSink | None = None) -> None:
        if on_event is not None:
            on_event(event)
        for callback in list(self._subscribers.get(session_id, ())):
            try:
                callback(event)
            except Exception:
                log.exception("event subscriber failed")

    async def run(self, session_id: str, body: Any, *, on_event: EventSink | None = None,
                  on_input: InputHandler | None = None, run_id: str | None = None) -> dict[str, Any]:
        req = models.parse(models.RunRequest, body)
        run_id = run_id or new_run_id()
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            record = await self._record(session_id)  # read under the lock: a patch may have just landed
            code = req.code if req.code is not None else record.get("code")
            if code is None:
                raise BadRequest("field 'code' is required (no default program is stored for this session)",
                                 field="code")
            timeout = req.timeout or record["default_timeout"]
            await self._wait_for_setup(session_id, timeout, on_event)
            kernel = await self._ensure_kernel(record)
            return await self._run_locked(record, kernel, code, timeout, req.env, on_event, on_input, run_id)

    async def _wait_for_setup(self, session_id: str, timeout: float, on_event: EventSink | None) -> None:
        """A run sent before package setup finishes waits for it, up to its own timeout;
        meanwhile its caller sees the setup log too."""
        unsubscribe = lambda: None  # noqa: E731
        if on_event is not None and self.setups.running(session_id):
            unsubscribe = self.subscribe(session_id, lambda ev: ev["type"] == "setup" and on_event(ev))
        try:
            await self.setups.wait(session_id, timeout)
        except TimeoutError:
            raise KernelFailed(f"package setup still running after {timeout:g}s (the run's timeout); "
                               "retry when setup_status is completed or failed") from None
        finally:
            unsubscribe()

    async def _run_locked(self, record, kernel: SessionKernel, code: str, timeout: float, env: dict[str, str],
                          on_event, on_input, run_id: str) -> dict[str, Any]:
        sid = record["id"]
        language = get_language(record["language"])
        ws = self.files.of(record)
        data_json = json.dumps(record["data"])
        if self._data_on_disk.get(sid) != data_json:  # skip the write when the file already says it
            await ws.write(DATA_FILE, data_json.encode(), uid=self._uid(record))
        emit: EventSink = lambda ev: self._emit(sid, dict(ev, run_id=run_id), on_event)  # noqa: E731
        started_at = utc_now()
        self._active_at[sid] = time.time()
        emit({"type": "status", "state": "busy"})
        if env and language.env_apply:
            await kernel.execute(language.env_apply(env), timeout=10, silent=True)
        outcome = await kernel.execute(code, timeout=timeout, on_event=emit, on_input=on_input,
                                       output_limit=self.settings["ERA_OUTPUT_LIMIT"],
                                       interrupt_grace=self.settings["ERA_INTERRUPT_GRACE"])
        if outcome.status == "dead" or outcome.restarted:
            await self._stop_kernel(sid)  # the next run starts a fresh kernel
        elif env and language.env_restore:
            await kernel.execute(language.env_restore(env), timeout=10, silent=True)
        data = await self._read_back_data(ws, record)
        sync_error = await self.files.sync(record)
        if sync_error:
            outcome.collector.note("stderr", f"\n[era] {sync_error}\n")
        changes = {"last_run_at": utc_now()}
        self._active_at[sid] = time.time()
        if data != record["data"]:
            changes["data"] = data
        result = run_result(outcome, language=language, timeout=timeout, session_id=sid, data=data, run_id=run_id)
        # Queued, not awaited: every later store call sees it (MetadataStore.add_run), and
        # the caller gets its answer one store round trip sooner.
        self._in_background(self._record_run(sid, run_id, self.store.add_run(
            sid, {"run_id": run_id, "code": code, "started_at": started_at,
                  **{k: result[k] for k in ("exit_code", "outputs", "stdout", "stderr", "duration_ms",
                                            "execution_count", "error", "timed_out", "truncated")}},
            session_changes=changes)))
        emit(done_event(result))
        emit({"type": "status", "state": self.kernels[sid].state if sid in self.kernels else "dead"})
        return result

    async def _read_back_data(self, ws, record: dict[str, Any]) -> dict[str, Any]:
        """What the code left in .session_data.json; the old data if it is gone or invalid."""
        self._data_on_disk.pop(record["id"], None)
        try:
            raw = await ws.read(DATA_FILE, max_bytes=self.settings["ERA_MAX_DATA_BYTES"])
            data = json.loads(raw)
        except (NotFound, BadRequest, TooLarge, ValueError, RecursionError):  # deep nesting: not data
            return record["data"]
        if not isinstance(data, dict):
            return record["data"]
        if raw == json.dumps(data).encode():
            self._data_on_disk[record["id"]] = raw.decode()
        return data

    async def execute(self, body: Any, *, on_event: EventSink | None = None) -> dict[str, Any]:
        """One-shot: a fresh kernel in a scratch workspace, discarded afterwards."""
        req = models.parse(models.ExecuteRequest, body)
        language = get_language(req.language)
        record = {"id": None, "language": req.language, "provisioner": req.provisioner or self.settings["ERA_PROVISIONER"],
                  "allowInternetAccess": req.allowInternetAccess, "env": {}, "startup": None}
        warm = self._take_warm(record)
        if warm is not None:
            uid, ws, kernel = warm.uid, self.files.workspace(warm.workdir), warm.kernel
        else:
            await self._admit()
            self._ephemeral += 1
            uid = EPHEMERAL_UID_BASE + self._ephemeral % 1_000_000 if os.getuid() == 0 else os.getuid()
            ws, kernel = self.files.workspace(self.settings.data_dir / "scratch" / secrets.token_hex(8)), None
        try:
            if warm is None:
                await ws.create(uid=uid)
            for path, content in req.files.items():  # before any code runs, pooled or not
                await ws.write(path, content.encode(), uid=uid)
            if warm is not None:
                if warm.cells != self._startup_cells(record, ws.root):
                    await kernel.claim(self._startup_cells(record, ws.root))
            else:
                kernel = self._new_kernel(record, ws.root, uid)
                await kernel.start()
            env_code = language.env_apply(req.env) if req.env and language.env_apply else None
            if env_code:
                await kernel.execute(env_code, timeout=10, silent=True)
            run_id = new_run_id()
            emit: EventSink | None = (lambda ev: on_event(dict(ev, run_id=run_id))) if on_event else None
            timeout = req.timeout or self.settings["ERA_DEFAULT_TIMEOUT"]
            outcome = await kernel.execute(req.code, timeout=timeout, on_event=emit,
                                           output_limit=self.settings["ERA_OUTPUT_LIMIT"],
                                           interrupt_grace=self.settings["ERA_INTERRUPT_GRACE"])
            result = run_result(outcome, language=language, timeout=timeout, session_id=None, data=None,
                                run_id=run_id)
            if emit:
                emit(done_event(result))
            return result
        finally:  # the answer does not wait for the kernel's shutdown; shutdown() does
            self._in_background(self._discard_oneshot(kernel, ws))

    def _in_background(self, work: Awaitable[None]) -> None:
        """Work the answer does not wait for; shutdown() does."""
        task = asyncio.ensure_future(work)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    @staticmethod
    async def _record_run(sid: str, run_id: str, written: Awaitable[None]) -> None:
        try:
            await written
        except Exception as exc:  # the caller already has its result: say what was not kept
            log.error("run %s of session %s was not recorded in the history: %s", run_id, sid, exc)

    async def _discard_oneshot(self, kernel: SessionKernel | None, ws) -> None:
        try:
            if kernel is not None:
                await kernel.stop(now=True)
            await ws.remove()
        finally:
            self.slots.release()

    async def runs(self, session_id: str, limit: int = 100) -> list[dict[str, Any]]:
        await self._record(session_id)
        return await self.store.list_runs(session_id, limit)

    async def notebook(self, session_id: str) -> dict[str, Any]:
        record = await self._record(session_id)
        return notebook_from_runs(await self.store.list_runs(session_id, 10_000), record["language"], session_id)

    async def set_code(self, session_id: str, code: Any) -> None:
        await self._record(session_id)
        req = models.parse(models.CodeBody, {"code": code})
        await self.store.update_session(session_id, {"code": req.code})

    async def get_code(self, session_id: str) -> str | None:
        return (await self._record(session_id)).get("code")

    # ---- files ----------------------------------------------------------------------------
    async def list_files(self, session_id: str) -> list[dict[str, Any]]:
        record = await self._record(session_id)
        return await self.files.list(record, self._uid(record))

    async def read_file(self, session_id: str, path: str) -> bytes:
        record = await self._record(session_id)
        return await self.files.read(record, self._uid(record), path)

    async def write_file(self, session_id: str, path: str, data: bytes) -> dict[str, Any]:
        record = await self._record(session_id)
        self._data_on_disk.pop(session_id, None)
        return await self.files.write(record, self._uid(record), path, data)

    async def delete_file(self, session_id: str, path: str) -> None:
        record = await self._record(session_id)
        self._data_on_disk.pop(session_id, None)
        await self.files.delete(record, self._uid(record), path)

    # ---- Jupyter kernel gateway (server/jupyter.py) -----------------------------------------
    async def jupyter_kernel(self, session_id: str, start: bool = True) -> SessionKernel | None:
        """The session's live kernel for a raw Jupyter channels connection, started when it
        has none (``start=False``: None then). Counts as activity for culling."""
        record = await self._record(session_id)
        kernel = self.kernels.get(session_id)
        ready = kernel is not None and kernel.state != "dead" and session_id not in self._starting
        if not ready:
            if not start:
                return None
            async with self._locks.setdefault(session_id, asyncio.Lock()):  # no double start beside a run
                kernel = await self._ensure_kernel(record)
        self._active_at[session_id] = time.time()
        return kernel

    def jupyter_activity(self, session_id: str, touch: bool = False) -> float | None:
        """The session's last activity (epoch s); ``touch``: a Jupyter client's message is
        activity now (culling counts it as a run)."""
        if touch and session_id in self.kernels:
            self._active_at[session_id] = time.time()
        return self._active_at.get(session_id)
