"""Running code: one cell-execution path for session runs and one-shot runs.

``run_cell`` applies a run's own ``env``, executes the code with the output cap and the
timeout's interrupt-then-restart escalation, and undoes the ``env``; both callers use
it. A session run (``SessionRunner.run``) also writes the session's ``data`` to its data
file before, reads it back after, pushes a persistent workspace, and queues the run's
history record (the store applies calls in order, so the answer need not wait for the
commit). A one-shot run (``SessionRunner.execute``) takes a pooled kernel or a fresh one
in a scratch directory and discards it after answering.

Runs on one session are serialized in arrival order (the table's FIFO run lock);
sessions run concurrently.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from .. import models
from ..config import Settings
from ..egress.gate import ONESHOT_PREFIX
from ..errors import BadRequest, NotFound, SetupPending, TooLarge
from ..kernel import EventSink, ExecOutcome, InputHandler, OutputCollector, SessionKernel
from ..languages import Language, get_language
from ..store.base import MetadataStore
from .events import EngineEvents, KernelDied
from .kernels import KernelTable, Lease
from .launcher import KernelLauncher
from .pool import KernelPool
from .records import EphemeralUids, KernelRequest, SessionRecord, check_isolation, session_uid
from .tickets import RunTicket
from .results import death_details, death_reason, done_event, new_run_id, run_result, utc_now

if TYPE_CHECKING:
    from ..setup import SetupManager
    from .files import SessionFiles

log = logging.getLogger("era.runs")

DATA_FILE = ".session_data.json"
ENV_CELL_TIMEOUT = 10.0
NOT_STARTED = "interrupted before it started (while it waited for its kernel); its code did not run"


async def run_cell(kernel: SessionKernel, language: Language, code: str, settings: Settings, *, timeout: float,
                   env: dict[str, str] | None = None, on_event: EventSink | None = None,
                   on_input: InputHandler | None = None) -> ExecOutcome:
    """Execute ``code`` with this run's ``env`` applied around it (never raises for what
    the code does; a dead kernel is the outcome's status)."""
    if env and language.env_apply:
        await kernel.execute(language.env_apply(env), timeout=ENV_CELL_TIMEOUT, silent=True)
    outcome = await kernel.execute(code, timeout=timeout, on_event=on_event, on_input=on_input,
                                   output_limit=settings["ERA_OUTPUT_LIMIT"],
                                   interrupt_grace=settings["ERA_INTERRUPT_GRACE"])
    if env and language.env_restore and outcome.status != "dead" and not outcome.restarted:
        await kernel.execute(language.env_restore(env), timeout=ENV_CELL_TIMEOUT, silent=True)
    return outcome


class SessionRunner:
    def __init__(self, settings: Settings, store: MetadataStore, files: "SessionFiles", setups: "SetupManager",
                 table: KernelTable, launcher: KernelLauncher, pool: KernelPool, events: EngineEvents) -> None:
        self.settings = settings
        self.store = store
        self.files = files
        self.setups = setups
        self.table = table
        self.launcher = launcher
        self.pool = pool
        self.events = events
        self.uids = EphemeralUids()
        self._data_on_disk: dict[str, str] = {}  # session id -> JSON known to be in its data file
        self._background: set[asyncio.Future] = set()  # history writes, one-shot kernels being stopped

    # ---- session runs -----------------------------------------------------------------------
    async def run_locked(self, ticket: "RunTicket", load: "Callable[[], Awaitable[SessionRecord]]",
                         on_event: EventSink | None = None, on_input: InputHandler | None = None) -> dict[str, Any]:
        """One run of a session's code; the caller (``RunQueue``) holds the session's run
        lock. ``load`` reads the record now (a patch may have just landed)."""
        record = await load()
        req = ticket.request
        # ERA runs the stored program when `code` is absent or empty.
        code = req.code if req.code or (req.code == "" and record.stored_code is None) else record.stored_code
        if code is None:
            raise BadRequest("no code provided and no stored code found", field="code",
                             details={"hint": "send 'code', or store a default program first: "
                                              "PUT /api/sessions/{id}/code {\"code\": ...}"})
        ticket.code = code
        timeout = req.timeout or record.default_timeout
        kernel = await self._kernel_unless_interrupted(ticket, record, timeout, on_event)
        if kernel is None:
            return self._interrupted_before_start(record, ticket, timeout, on_event)
        ticket.kernel = kernel
        return await self._run_locked(record, kernel, ticket, timeout, on_event, on_input)

    async def _kernel_unless_interrupted(self, ticket: "RunTicket", record: SessionRecord, timeout: float,
                                         on_event: EventSink | None) -> SessionKernel | None:
        """The session's kernel once package setup is over and the kernel is up; None when
        ``POST .../interrupt`` reached the run first. Only the wait stops: setup and the
        kernel's start go on (the launcher's start is a task of its own) for the next run."""
        kernel = self.launcher.ready(record.id)
        if kernel is not None and not self.setups.running(record.id):
            return kernel  # nothing to wait for (the common case: no tasks to race)

        async def ready() -> SessionKernel:
            await self._wait_for_setup(record.id, timeout, on_event)
            return await self.launcher.ensure(record)

        preparing = asyncio.ensure_future(ready())
        interrupted = asyncio.ensure_future(ticket.interrupted.wait())
        try:
            await asyncio.wait((preparing, interrupted), return_when=asyncio.FIRST_COMPLETED)
        finally:
            preparing.cancel()
            interrupted.cancel()
            await asyncio.gather(preparing, interrupted, return_exceptions=True)
        if ticket.interrupt_requested:
            return None
        return preparing.result()  # or the error it failed with (setup pending, the start failed)

    def _interrupted_before_start(self, record: SessionRecord, ticket: "RunTicket", timeout: float,
                                  on_event: EventSink | None) -> dict[str, Any]:
        """A run interrupted before its code reached the kernel ends as one interrupted in
        its cell does (KeyboardInterrupt, exit code 1, status ``interrupted``: the same
        events, record and callback), with a note in the error's ``evalue``; nothing ran."""
        sid, run_id = record.id, ticket.run_id
        emit: EventSink = lambda ev: self.events.emit(sid, dict(ev, run_id=run_id), on_event)  # noqa: E731
        self.in_background(_record_run(sid, run_id, ticket.started(self.store)))
        collector = OutputCollector(self.settings["ERA_OUTPUT_LIMIT"])
        emit(collector.add("error", {"ename": "KeyboardInterrupt", "evalue": NOT_STARTED, "traceback": []}))
        outcome = ExecOutcome(collector, status="error")
        result = run_result(outcome, language=get_language(record.language), timeout=timeout, session_id=sid,
                            data=record.data, run_id=run_id)
        emit(done_event(result))
        emit({"type": "status", "state": str(self.table.state(sid))})
        self.events.flush(sid)
        self.in_background(_record_run(sid, run_id, ticket.finished(self.store, result, outcome)))
        return result

    async def _wait_for_setup(self, session_id: str, timeout: float, on_event: EventSink | None) -> None:
        """A run sent before package setup finishes waits for it, up to its own timeout;
        meanwhile its caller sees the setup log too."""
        unsubscribe = lambda: None  # noqa: E731
        if on_event is not None and self.setups.running(session_id):
            unsubscribe = self.events.subscribe(session_id, lambda ev: ev["type"] == "setup" and on_event(ev))
        try:
            await self.setups.wait(session_id, timeout)
        except TimeoutError:
            raise SetupPending(f"package setup still running after {timeout:g}s (the run's timeout); "
                               "retry when setup_status is completed or failed") from None
        finally:
            unsubscribe()

    async def _run_locked(self, record: SessionRecord, kernel: SessionKernel, ticket: "RunTicket", timeout: float,
                          on_event: EventSink | None, on_input: InputHandler | None) -> dict[str, Any]:
        sid, run_id = record.id, ticket.run_id
        language = get_language(record.language)
        ws = self.files.own(record)
        data_json = json.dumps(record.data)
        if self._data_on_disk.get(sid) != data_json:  # skip the write when the file already says it
            await ws.write(DATA_FILE, data_json.encode(), uid=session_uid(record))
        emit: EventSink = lambda ev: self.events.emit(sid, dict(ev, run_id=run_id), on_event)  # noqa: E731
        if ticket.interrupt_requested:  # while its data file was written: its code is not sent yet
            return self._interrupted_before_start(record, ticket, timeout, on_event)
        self.in_background(_record_run(sid, run_id, ticket.started(self.store)))
        self.table.touch(sid)
        emit({"type": "status", "state": "busy"})
        outcome = await run_cell(kernel, language, ticket.code, self.settings, timeout=timeout, env=ticket.request.env,
                                 on_event=emit, on_input=on_input)
        if outcome.status in ("dead", "cut") or outcome.restarted:
            if await self.table.stop(sid, kernel=kernel):  # the next run starts a fresh kernel
                self.events.publish(KernelDied(sid, death_reason(outcome), death_details(outcome, timeout)))
        data = await self._read_back_data(ws, record)
        await self._note_full(ws.root, outcome, emit)
        sync_error = await self.files.sync(record)
        if sync_error:
            outcome.collector.note("stderr", f"\n[era] {sync_error}\n")
        changes: dict[str, Any] = {"last_run_at": utc_now()}
        self.table.touch(sid)
        if data != record.data:
            changes["data"] = data
        result = run_result(outcome, language=language, timeout=timeout, session_id=sid, data=data, run_id=run_id)
        emit(done_event(result))
        emit({"type": "status", "state": self.table.state(sid) if self.table.kernel(sid) else "dead"})
        # Queued, not awaited: every later store call sees it (MetadataStore.put_run), and
        # the caller gets its answer one store round trip sooner. The journal's events go
        # first, so a client that sees the run finished finds all of them.
        self.events.flush(sid)
        self.in_background(_record_run(sid, run_id, ticket.finished(self.store, result, outcome, changes)))
        return result

    async def _note_full(self, root, outcome: ExecOutcome, emit: EventSink | None) -> None:
        """A run that filled its workspace volume says so in its stderr (and stream)."""
        note = await self.files.full_note(root)
        if note:
            event = outcome.collector.note("stderr", f"\n[era] {note}\n")
            if emit is not None:
                emit(event)

    async def _read_back_data(self, ws, record: SessionRecord) -> dict[str, Any]:
        """What the code left in .session_data.json; the old data if it is gone or invalid."""
        self._data_on_disk.pop(record.id, None)
        try:
            raw = await ws.read(DATA_FILE, max_bytes=self.settings["ERA_MAX_DATA_BYTES"])
            data = json.loads(raw)
        except (NotFound, BadRequest, TooLarge, ValueError, RecursionError):  # deep nesting: not data
            return record.data
        if not isinstance(data, dict):
            return record.data
        if raw == json.dumps(data).encode():
            self._data_on_disk[record.id] = raw.decode()
        return data

    def data_changed(self, session_id: str) -> None:
        """The session's files changed through the API: the data file must be written again."""
        self._data_on_disk.pop(session_id, None)

    def forget(self, session_id: str) -> None:
        self._data_on_disk.pop(session_id, None)

    # ---- one-shot runs ---------------------------------------------------------------------
    async def execute(self, body: Any, *, on_event: EventSink | None = None) -> dict[str, Any]:
        """A fresh kernel (a pooled one when one is ready) in its own directory, discarded
        once the answer is out."""
        req = models.parse(models.ExecuteRequest, body)
        language = get_language(req.language)
        allow_internet = (self.settings["ERA_ALLOW_INTERNET_DEFAULT"] if req.allowInternetAccess is None
                          else req.allowInternetAccess)
        provisioner = req.provisioner or self.settings["ERA_PROVISIONER"]
        request = KernelRequest(req.language, provisioner,
                                allow_internet if isinstance(allow_internet, dict) else bool(allow_internet),
                                isolation=check_isolation(req.isolation, provisioner))
        warm = (self.pool.take((request.language, request.provisioner))
                if not (request.allow_internet or request.isolation) else None)
        kernel: SessionKernel | None = None
        egress_id = f"{ONESHOT_PREFIX}{secrets.token_hex(6)}"  # its egress listener's key (no session to log to)
        if warm is not None:
            uid, ws, kernel, lease = warm.uid, self.files.workspace(warm.workdir), warm.kernel, warm.lease
        else:
            lease = await self.table.admit()
            uid = self.uids.next()
            ws = self.files.workspace(self.settings.data_dir / "scratch" / secrets.token_hex(8))
        try:
            if warm is None:
                await self.files.make_dir(ws.root, uid)
            for path, content in req.files.items():  # before any code runs, pooled or not
                await ws.write(path, content.encode(), uid=uid)
            cells = self.launcher.startup_cells(request, ws.root)
            if warm is not None:
                if warm.cells != cells:
                    await kernel.claim(cells)
            else:
                kernel = await self.launcher.new_kernel(request, ws.root, uid)
                await kernel.start()
                await self.launcher.attach_egress(egress_id, kernel)
            run_id = new_run_id()
            emit: EventSink | None = (lambda ev: on_event(dict(ev, run_id=run_id))) if on_event else None
            timeout = req.timeout or self.settings["ERA_DEFAULT_TIMEOUT"]
            outcome = await run_cell(kernel, language, req.code, self.settings, timeout=timeout, env=req.env,
                                     on_event=emit)
            await self._note_full(ws.root, outcome, emit)
            result = run_result(outcome, language=language, timeout=timeout, session_id=None, data=None,
                                run_id=run_id)
            if emit:
                emit(done_event(result))
            return result
        finally:  # the answer does not wait for the kernel's shutdown; shutdown() does
            if self.launcher.egress is not None:
                self.launcher.egress.detach(egress_id)
            self.in_background(_discard_oneshot(kernel, ws.root, self.files, lease))

    # ---- background work -------------------------------------------------------------------
    def in_background(self, work: Awaitable[None]) -> None:
        """Work the answer does not wait for; ``settle`` (and the engine's shutdown) does."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait for the background work queued so far (history writes, kernels stopping)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)


async def _record_run(sid: str, run_id: str, written: Awaitable[None]) -> None:
    try:
        await written
    except Exception as exc:  # the caller already has its result: say what was not kept
        log.error("run %s of session %s was not recorded in the history: %s", run_id, sid, exc)


async def _discard_oneshot(kernel: SessionKernel | None, root, files: "SessionFiles", lease: Lease) -> None:
    try:
        if kernel is not None:
            await kernel.stop(now=True)
        await files.remove_dir(root)
    finally:
        lease.release()
