"""The engine's facade: sessions = a kernel + a workspace + a record in the store.

``SessionManager`` is what the server and the CLI call (docs/engine-api.md). It owns
the collaborators and wires them one way, each knowing only what it is handed:

    SessionManager ─┬─ store (records, history)      SessionFiles (workspaces)
                    ├─ SessionRunner ── KernelLauncher ── KernelTable (kernels, slots)
                    ├─ Upkeep (culling, stats)          KernelPool (warm kernels)
                    ├─ Scheduler (schedules: cron-timed background runs, through run())
                    └─ EngineEvents (run events, lifecycle) ── SessionLog (session events)

It keeps session lifecycle (create, patch, delete, duplicate) and the documents it
answers with; everything about kernels is the table's and the launcher's, everything
about running code the runner's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from .. import models
from ..config import Settings
from ..errors import BadRequest, Conflict, EraError, NotFound, TooLarge
from ..kernel import EventSink, InputHandler, SessionKernel
from ..languages import get_language
from ..listing import SessionPage, read_page, record_chunks
from ..setup import SetupManager
from ..storage import Storage
from ..store.base import SessionExists, store_for_url
from ..commands.history import ProcessHistory
from ..commands.service import CommandService
from ..egress.gate import EgressGate
from ..ports.service import PortService
from .callbacks import CallbackSender
from .events import KERNEL_GONE, EngineEvents, KernelStopped, LifecycleEvent, RunEvent, SessionDeleted, SetupFinished
from .files import POOL_ROOT, SessionFiles
from .gateway_runs import GatewayRuns
from .kernels import KernelSlots, KernelTable
from .launcher import KernelLauncher
from .journal import RunJournal
from .pool import KernelPool, WarmKernel, auto_pool_size, parse_pool_keys
from .queue import RunQueue
from .recovery import recover
from .records import SessionRecord, check_isolation, new_session_id, session_limits, session_uid
from .results import notebook_from_runs, utc_now
from .runner import SessionRunner
from .session_log import SessionLog
from .schedules import Scheduler
from .replicas import ReplicaRegistration
from .ownership import Ownership
from .takeover import ownership_hooks
from .upkeep import Upkeep

log = logging.getLogger("era.sessions")


class SessionManager:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()
        self.store = store_for_url(self.settings["ERA_STORE_URL"])
        self.journal = RunJournal(self.store, 2 * self.settings["ERA_OUTPUT_LIMIT"], self.settings["ERA_RUN_JOURNAL"])
        self.events = EngineEvents(self.journal)
        # Every lifecycle event becomes a session event (GET .../events, kernel.last_exit).
        self.session_log = SessionLog(self.store)
        self.events.watch(self.session_log.record)
        # Cells run through the Jupyter gateway, recorded as runs (gateway_runs.py).
        self.gateway_runs = GatewayRuns(self.settings, self.store, self.events, self.journal)
        self.events.watch(lambda ev: isinstance(ev, KERNEL_GONE) and self.gateway_runs.kernel_gone(
            ev.session_id, f"kernel {type(ev).__name__.removeprefix('Kernel').lower()}: {ev.reason}"))
        self.files = SessionFiles(self.settings)
        self.storage = Storage(self.settings, lambda: self.files.store.objects, self.store.get_session)  # ERA's
        # Package setups into shared environments, archived in the workspace store (built lazily).
        self.setups = SetupManager(self.settings, lambda: self.files.store)
        self.table = KernelTable(self.settings["ERA_MAX_KERNELS"], self.events)
        self.launcher = KernelLauncher(self.settings, self.setups, self.files, self.table, self.events)
        pool_keys = parse_pool_keys(self.settings["ERA_POOL_KERNELS"], self.settings["ERA_PROVISIONER"])
        for language, _ in pool_keys:
            get_language(language)  # a typo in ERA_POOL_KERNELS fails at start, not at the first request
        pool_size = self.settings["ERA_POOL_SIZE"]
        if pool_size == "auto":
            pool_size = auto_pool_size(self.launcher.pools_fork(pool_keys), self.settings["ERA_MAX_KERNELS"])
        self.pool = KernelPool(pool_keys, pool_size, self.table.slots,
                               self.launcher.spawn_warm, self.launcher.discard_warm,
                               max_size=self.settings["ERA_POOL_MAX"], starts=self.settings["ERA_POOL_STARTS"],
                               starts_per_core=2 if self.launcher.pools_fork(pool_keys) else 1,
                               idle=self.settings["ERA_POOL_IDLE"])
        self.table.evict_pooled = self.pool.evict
        self.runner = SessionRunner(self.settings, self.store, self.files, self.setups, self.table, self.launcher,
                                    self.pool, self.events)
        self.queue = RunQueue(self.settings, self.store, self.table, self.runner)
        # Completion callbacks (callbacks.py): told of every run that ends.
        self.callbacks = CallbackSender(self.settings, self.store)
        self.queue.on_finished.append(self.callbacks.run_finished)
        self.upkeep = Upkeep(self.settings, self.store, self.table, self.pool, self.events, self._delete)
        self.scheduler = Scheduler(self.settings, self.store, self.run)  # fires through the run path below
        # This server in the store's replica registry (a server sets .address once bound).
        self.replica = ReplicaRegistration(self.settings, self.store, lambda: {"live_kernels": self.table.slots.used})
        self.ownership = Ownership(self.settings, self.store, self.replica, ownership_hooks(self))  # among replicas
        self.scheduler.serves = self.ownership.serves if self.ownership.enabled else None
        # Commands, background processes and terminals in a session's kernel's sandbox (commands/).
        self.commands = CommandService(self.settings, record=self._record, kernel=self.jupyter_kernel,
                                       workspace=self.files.path, setup_wait=self.setups.wait, watch=self.events.watch,
                                       sync=self.files.sync, history=ProcessHistory(self.journal, self.store))
        # A session's ports reached from outside, and ERA's relay mode (ports/).
        self.ports = PortService(record=self._record, kernel=self.jupyter_kernel, run=self.run,
                                 touch=lambda sid: self.jupyter_activity(sid, touch=True))
        self.launcher.session_env = self.commands.session_env = self.storage.session_env
        # The egress proxy: the only way out of sessions with an egress policy (egress/).
        self.egress = self.launcher.egress = EgressGate(self.settings["ERA_EGRESS_PORT"],
                                                        self.settings["ERA_EGRESS_RESOLVER"], self.session_log.note,
                                                        self.settings["ERA_EGRESS_DENY"])
        self.setups.network.egress = self.egress  # package builds reach the registries through it too
        self.events.watch(lambda ev: isinstance(ev, (*KERNEL_GONE, SessionDeleted)) and self.egress.detach(
            ev.session_id, keep=self.table.kernel(ev.session_id)))
        self._workdirs: dict[str, str] = {}  # session id -> its directory, when not sessions/<id>
        self._opened = False
        self._serving = False

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self, *, serve: bool = True) -> None:
        """Open the store. ``serve`` (a server): also recover what a previous process left
        (orphaned kernels, unclaimed pool directories, unfinished setups), then start the
        warm pool and the culler. ``serve=False`` (``era run``): none of that, so a
        one-shot engine on a server's data directory leaves the server's work alone."""
        await asyncio.to_thread(self._make_dirs)
        await self.files.start()
        await self.store.open()
        self._opened = True
        await self.storage.start()
        await self.callbacks.start()  # before recovery: runs a restart cut off have callbacks too
        if serve:
            leases = self.ownership.enabled  # among replicas, a session's unfinished work is its owner's
            await recover(self.settings, self.store, self.files, None if leases else self._start_setup)
            requeued = {} if leases else await self.queue.recover(lambda s: lambda: self._record(s), self.journal.ready)
            if any(requeued.values()):
                log.info("runs of a previous process: %(interrupted)d interrupted, %(requeued)d queued again",
                         requeued)
            self._serving = True
            self.files.volumes.start_stock()  # workspace volumes made ahead: a server's, like the pool
            self.pool.start()
            self.upkeep.start()
            self.scheduler.start()  # after the recovery: a requeued firing counts as its schedule's previous run
            await self.replica.start()
            self.ownership.start()

    def _make_dirs(self) -> None:
        for path in (self.settings.data_dir / "sessions", self.settings.data_dir / POOL_ROOT,
                     self.settings.data_dir / "scratch"):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o711)  # kernels traverse to their own directory; nobody lists
        self.settings.runtime_dir.mkdir(parents=True, exist_ok=True)

    async def shutdown(self) -> None:
        """Interrupt running code, stop every kernel, close the store."""
        await self.replica.stop()  # first: no replica looks for this one any more
        await self.scheduler.stop()  # nothing fires into an engine that is stopping
        await self.setups.shutdown()
        await self.upkeep.stop()
        await self.queue.shutdown()
        await self.pool.shutdown()
        await self.runner.settle()
        busy = [k for k in self.table.live().values() if k.state == "busy"]
        await asyncio.gather(*(k.interrupt() for k in busy), return_exceptions=True)
        for sid in list(self.table.live()):  # after a restart, each session still says why its kernel went
            self.events.publish(KernelStopped(sid, "server shutdown"))
        await asyncio.gather(*(self.table.stop(sid) for sid in self.table.sessions()), return_exceptions=True)
        await self.commands.shutdown()  # their processes' ends are recorded (commands/history.py)
        await self.runner.settle()
        await self.callbacks.stop()  # after the last runs ended, before the store closes
        await self.journal.settle()
        await self.session_log.settle()
        await self.commands.history.settle()
        await self.files.shutdown()  # no kernel uses a volume any more: unmount them all
        self.egress.close_all()
        await self.storage.close()
        await self.ownership.stop()  # last write under the leases: the next request's replica serves at once
        if self._opened:
            await self.store.close()
            self._opened = False

    async def settle(self) -> None:
        """Wait for work the answers did not wait for (history writes, journal batches,
        kernels stopping)."""
        await self.runner.settle()
        await self.journal.settle()
        await self.session_log.settle()
        await self.commands.history.settle()

    # ---- what callers may look at ------------------------------------------------------------
    @property
    def kernels(self) -> Mapping[str, SessionKernel]:
        """Session id -> its live (or starting) kernel."""
        return self.table.live()

    @property
    def slots(self) -> KernelSlots:
        return self.table.slots

    @property
    def culled(self) -> dict[str, int]:
        return {**self.upkeep.culled, "lru": self.table.lru_culls}

    def workspace_dir(self, session_id: str) -> Path:
        return self.files.path(SessionRecord(session_id, "python", "local", "", workdir=self._workdirs.get(session_id)))

    # ---- records and documents ----------------------------------------------------------------
    async def _record(self, session_id: str) -> SessionRecord:
        if not models.is_session_id(session_id):
            raise NotFound("session not found")
        row = await self.store.get_session(session_id)
        if row is None:
            raise NotFound(f"session {session_id} not found")
        record = SessionRecord.from_row(row)
        if record.workdir:
            self._workdirs[session_id] = record.workdir
        return record

    async def _document(self, record: SessionRecord | dict[str, Any]) -> dict[str, Any]:
        if isinstance(record, dict):  # a store row (the paged listing)
            record = SessionRecord.from_row(record)
        file_count, total = await self.files.usage(record)
        return {
            "id": record.id, "created_at": record.created_at, "last_run_at": record.last_run_at,
            "language": record.language, "persistent": record.persistent, "provisioner": record.provisioner,
            "file_count": file_count, "total_size_bytes": total, "metadata": record.metadata, "data": record.data,
            "default_timeout": record.default_timeout, "allowInternetAccess": record.allow_internet,
            "allowPublicAccess": record.allow_public, "typecheck": record.typecheck, "limits": record.limits,
            "isolation": record.isolation or ("runc" if record.provisioner == "docker" else None), "setup": record.setup,
            "setup_status": record.setup_status, "setup_result": record.setup_result,
            "kernel": {"state": str(self.table.state(record.id)), "last_exit": record.last_exit},
            "owner": (await self.ownership.owners([record.id]))[record.id],  # the replica serving it
        }

    def _check_sizes(self, fields: dict[str, Any]) -> None:
        """TooLarge for a ``data`` or ``metadata`` over its limit; called before anything is
        written. Both are in every session document, so they bound every listing too."""
        for name, setting in (("metadata", "ERA_MAX_METADATA_BYTES"), ("data", "ERA_MAX_DATA_BYTES")):
            if fields.get(name) is None:
                continue
            size, limit = len(json.dumps(fields[name]).encode()), self.settings[setting]
            if size > limit:
                raise TooLarge(f"field '{name}' is {size} bytes; the limit is {limit} ({setting})", field=name)

    # ---- sessions -----------------------------------------------------------------------------
    async def create(self, body: Any, owner: str | None = None) -> dict[str, Any]:
        """``owner``: the tenant making it (tenants.py); its record keeps it."""
        req = models.parse(models.CreateSession, body)
        get_language(req.language)
        self._check_sizes({"metadata": req.metadata, "data": req.data})
        setup = self.setups.normalize(req.setup)
        provisioner = req.provisioner or self.settings["ERA_PROVISIONER"]
        record = SessionRecord(
            id=req.id or new_session_id(), language=req.language, provisioner=provisioner, created_at=utc_now(),
            persistent=req.persistent, metadata=req.metadata, data=req.data, setup=setup,
            setup_status="pending" if setup else None,
            default_timeout=req.default_timeout or self.settings["ERA_DEFAULT_TIMEOUT"],
            allow_internet=self._default(req.allowInternetAccess, "ERA_ALLOW_INTERNET_DEFAULT"),
            allow_public=self._default(req.allowPublicAccess, "ERA_ALLOW_PUBLIC_DEFAULT"), typecheck=req.typecheck,
            limits=session_limits(self.settings, req.limits, provisioner), env=req.env, startup=req.startup,
            max_age=req.max_age, isolation=check_isolation(req.isolation, provisioner), owner=owner)
        return await self._insert(record)

    async def limits_enforced(self, provisioner: str) -> dict[str, bool]:
        """Which of a session's own ``limits`` hold on this provisioner: containers bound
        memory and CPUs; the local sandbox bounds memory through the session's cgroup
        (none here: not held, since its per-process cap stays the server's) and no CPUs."""
        if provisioner == "docker":
            return {"memory_mib": True, "cpu_count": True}
        from ..provisioning import cgroups

        try:
            found = await asyncio.to_thread(cgroups.resolve, self.settings["ERA_KERNEL_CGROUPS"])
        except cgroups.CgroupsUnavailable:
            found = None
        return {"memory_mib": found is not None, "cpu_count": False}

    @staticmethod
    def _taken(session_id: str) -> Conflict:
        return Conflict(f"session id already exists: {session_id}", field="id", details={"id": session_id})

    def _default(self, value: bool | None, setting: str) -> bool:
        return bool(self.settings[setting]) if value is None else value

    async def _insert(self, record: SessionRecord, copy_from: SessionRecord | None = None) -> dict[str, Any]:
        """Take a kernel (a pooled one, or a slot for a new one), store the record, make
        the workspace; all or nothing."""
        warm = await self._take_warm(record)
        if warm is not None:  # its directory and uid become the session's
            record.workdir, record.uid, lease = f"{POOL_ROOT}/{warm.workdir.name}", warm.uid, warm.lease
        else:
            lease = await self.table.admit()  # Busy before anything is written
        try:
            if await self.store.get_session(record.id) is not None:  # the common case, said plainly
                raise self._taken(record.id)
            await self.files.check_unused(record)
            try:
                record.seq = (await self.store.insert_session(record.to_row()))["seq"]
            except SessionExists:
                raise self._taken(record.id) from None
            await self.ownership.created(record.id)
            try:
                await self.files.create(record, session_uid(record), copy_from,
                                        session_uid(copy_from) if copy_from else None)
            except BaseException:
                await self.store.delete_session(record.id)
                await self.files.remove(record)
                raise
        except BaseException:
            if warm is not None:
                await self.launcher.discard_warm(warm)
            lease.release()
            raise
        if record.workdir:
            self._workdirs[record.id] = record.workdir
        if record.setup:
            await self._start_setup(record)  # before the kernel task, which waits for it
        self.launcher.start_in_background(record, lease, warm)
        return await self._document(record)

    async def _take_warm(self, record: SessionRecord) -> WarmKernel | None:
        """A pooled kernel for this record: a ready one, or the next the pool finishes
        starting (a burst's excess waits on those rather than each starting its own). Sessions with a
        package setup, network access or gVisor need a kernel launched for them, so never pool."""
        if record.setup or record.allow_internet or record.typecheck or record.limits or record.isolation:
            return None
        return await self.pool.claim((record.language, record.provisioner), self.settings["ERA_KERNEL_START_TIMEOUT"])

    async def _start_setup(self, record: SessionRecord) -> None:
        sid = record.id

        async def on_status(status: str, result: dict[str, Any] | None) -> None:
            await self.store.update_session(sid, {"setup_status": status, "setup_result": result})
            if status in ("completed", "failed"):
                details = {k: (result or {}).get(k) for k in ("error", "duration_ms", "source", "env")}
                self.events.publish(SetupFinished(sid, status, details))

        await self.setups.start(sid, record.language, record.provisioner, session_uid(record), record.setup,
                                on_log=lambda line: self.events.emit(sid, {"type": "setup", "content": line}),
                                on_status=on_status, sandbox=self.launcher.command_sandbox(record))

    async def get(self, session_id: str) -> dict[str, Any]:
        return await self._document(await self._record(session_id))

    async def list(self, limit: int | None = None, cursor: str | None = None, owner: str | None = None) -> SessionPage:
        """One page of session documents, oldest first: after ``cursor`` (a page's
        ``next_cursor``), at most ``limit`` (default and most ``ERA_LIST_MAX``) and about
        ``ERA_LIST_MAX_BYTES`` of JSON; ``next_cursor`` is None on the last page. With
        ``owner``, only that tenant's sessions."""
        return await read_page(self.store, self._document, limit=limit, cursor=cursor, owner=owner,
                               cap=self.settings["ERA_LIST_MAX"], max_bytes=self.settings["ERA_LIST_MAX_BYTES"])

    async def patch(self, session_id: str, body: Any) -> dict[str, Any]:
        await self._record(session_id)
        req = models.parse(models.PatchSession, body)
        changes = req.model_dump(exclude_unset=True, exclude_none=True)
        self._check_sizes(changes)
        row = await self.store.update_session(session_id, changes)
        if row is None:
            raise NotFound(f"session {session_id} not found")
        restart = {"allowInternetAccess", "env", "typecheck"} & changes.keys()
        if restart:
            if await self.table.stop(session_id):  # takes effect at the next kernel start
                self.events.publish(KernelStopped(session_id, "settings changed", {"fields": sorted(restart)}))
        return await self._document(SessionRecord.from_row(row))

    async def delete(self, session_id: str) -> None:
        await self._delete(session_id, "request")

    async def _delete(self, session_id: str, reason: str) -> None:
        record = await self._record(session_id)
        await self.setups.cancel(session_id)
        await self.table.stop(session_id)
        # Files first, the record last: a delete that fails half-way leaves the session
        # listed, and deleting it again finishes the job; never files without a record.
        try:
            await self.files.remove(record)
        except OSError as exc:
            log.error("session %s: its files could not be removed: %s", session_id, exc)
            raise EraError(f"the files of session {session_id} could not all be removed ({exc.strerror or exc}); "
                           "the session is kept: retry the delete") from None
        await self.store.delete_session(session_id)  # its schedules with it
        await self.ownership.deleted(session_id)
        self.scheduler.changed()
        self.events.publish(SessionDeleted(session_id, reason))
        self.table.forget(session_id)
        self.runner.forget(session_id)
        self.queue.forget(session_id)
        self.journal.forget(session_id)
        self._workdirs.pop(session_id, None)

    async def delete_many(self, ids: list[str] | None = None, prefix: str | None = None,
                          owner: str | None = None) -> list[str]:
        """With ``owner``, only that tenant's sessions are candidates."""
        wanted = set(ids) if ids is not None else None
        targets: list[str] = []
        async for rows in record_chunks(self.store, owner=owner):
            targets += [r["id"] for r in rows
                        if (wanted is None or r["id"] in wanted) and (prefix is None or r["id"].startswith(prefix))]
        for sid in targets:
            try:
                await self.delete(sid)
            except NotFound:
                pass
        return targets

    async def duplicate(self, session_id: str, body: Any = None, owner: str | None = None) -> dict[str, Any]:
        source = await self._record(session_id)
        req = models.parse(models.DuplicateRequest, body)
        # Stored under a larger limit: not copied past today's.
        self._check_sizes({"metadata": source.metadata, "data": source.data})
        return await self._insert(source.duplicate(req.id, owner), copy_from=source)

    async def interrupt(self, session_id: str) -> None:
        """The current run only (RunQueue.interrupt): one waiting for its kernel ends without running."""
        await self._record(session_id)
        await self.queue.interrupt(session_id)

    async def restart(self, session_id: str) -> None:
        record = await self._record(session_id)
        if await self.table.stop(session_id):
            self.events.publish(KernelStopped(session_id, "restart"))
        self.events.emit(session_id, {"type": "status", "state": "restarting"})
        lease = await self.table.admit()
        self.launcher.start_in_background(record, lease)

    async def stop_kernel(self, session_id: str) -> None:
        """Stop the session's kernel (ERA's VM stop): its files, data and history stay,
        and its next run starts a kernel."""
        await self._record(session_id)
        if await self.table.stop(session_id):
            self.events.publish(KernelStopped(session_id, "request"))

    async def run_command(self, session_id: str, body: Any) -> dict[str, Any]:
        """ERA's VM run: ``{command, timeout?, envs?}``, ``bash -c command`` in the session's
        kernel's sandbox (``commands.vm_run``): ``{exit_code, stdout, stderr, duration,
        duration_ms, pid, timed_out, truncated}``, 124 on timeout."""
        return await self.commands.vm_run(session_id, body)

    # ---- runs -------------------------------------------------------------------------------
    def subscribe(self, session_id: str, callback: Callable[[RunEvent], None]) -> Callable[[], None]:
        """``callback(event)`` for every event of the session's runs (docs/engine-api.md)."""
        return self.events.subscribe(session_id, callback)

    def watch(self, callback: Callable[[LifecycleEvent], None]) -> Callable[[], None]:
        """``callback(event)`` for sessions deleted, kernels culled, replaced or dead."""
        return self.events.watch(callback)

    async def run(self, session_id: str, body: Any, *, on_event: EventSink | None = None,
                  on_input: InputHandler | None = None, run_id: str | None = None,
                  fresh_id: bool = False, source: str = "rest",
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run code in the session: its result (API.md), or with ``background`` in the
        body ``{run_id, status, position}`` at once. ``source``: who asked (rest, sse, ws,
        schedule); ``extra``: fields kept on the run record (a schedule's id and slot).
        A ``run_id`` from a client must be new in the session (409 otherwise); ``fresh_id``
        says the caller made it with ``new_run_id`` and the check can be skipped."""
        await self.ownership.ensure_local(session_id)
        if self.journal.last_seq(session_id) is None:  # the first run in this process
            await self._record(session_id)  # an unknown id is a 404 before anything else
            await self.journal.ready(session_id)
        body = models.parse(models.RunRequest, body)
        if body.callback_url is not None:  # where it points is checked before anything is queued
            await self.callbacks.check(body.callback_url)
        return await self.queue.submit(session_id, body, lambda: self._record(session_id), source=source,
                                       on_event=on_event, on_input=on_input, run_id=run_id, fresh_id=fresh_id,
                                       extra=extra)

    async def get_run(self, session_id: str, run_id: str) -> dict[str, Any]:
        """A run's record: status, timestamps, reason, position while queued, and the
        result document once it ended. NotFound for an unknown id."""
        await self._record(session_id)
        return await self.queue.get(session_id, run_id)

    async def cancel_run(self, session_id: str, run_id: str) -> dict[str, Any]:
        """Drop a queued run, interrupt a running one; the run's record after."""
        await self._record(session_id)
        return await self.queue.cancel(session_id, run_id)

    async def run_events(self, session_id: str, run_id: str | None = None, after: int = 0, *, limit: int = 1000,
                         wait: float = 0.0) -> list[dict[str, Any]]:
        """Journal events of the session (of one run, when given) after ``after``, oldest
        first; ``wait`` seconds for some when there are none yet (long-poll)."""
        await self._record(session_id)
        if run_id is not None:
            await self.queue.get(session_id, run_id)  # NotFound for an unknown run
        await self.journal.ready(session_id)
        return await self.journal.read(session_id, after, run_id=run_id, limit=limit, wait=wait)

    async def execute(self, body: Any, *, on_event: EventSink | None = None) -> dict[str, Any]:
        """One-shot: a fresh kernel in a scratch workspace, discarded afterwards."""
        return await self.runner.execute(body, on_event=on_event)

    async def session_events(self, session_id: str, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Why the session's kernels started and went away, oldest first: its events with
        ``id`` greater than ``after``, at most ``limit`` (session_log.py). NotFound."""
        await self._record(session_id)
        return await self.session_log.read(session_id, after, limit)

    async def runs(self, session_id: str, limit: int = 100) -> list[dict[str, Any]]:
        await self._record(session_id)
        return await self.store.list_runs(session_id, limit)

    async def notebook(self, session_id: str) -> dict[str, Any]:
        record = await self._record(session_id)
        runs = await self.store.list_runs(session_id, 10_000)
        # In a thread: building and validating up to 10,000 cells is real work, and the
        # first call imports nbformat and jsonschema (seconds on a loaded host).
        return await asyncio.to_thread(notebook_from_runs, runs, record.language, session_id)

    async def set_code(self, session_id: str, body: Any) -> dict[str, Any]:
        """Store the session's default program, ERA's way: in ``data.code`` (with
        ``code_description`` and ``code_updated_at``), where runs, the code itself and
        duplicates see it. ``{code_length, updated_at}``."""
        record = await self._record(session_id)
        req = models.parse(models.CodeBody, {"code": body} if isinstance(body, str) else body)
        if not req.code:
            raise BadRequest("code field required", field="code")
        updated_at = utc_now()
        description = req.description if req.description is not None else record.data.get("code_description")
        data = {**record.data, "code": req.code, "code_description": description, "code_updated_at": updated_at}
        self._check_sizes({"data": data})
        await self.store.update_session(session_id, {"data": data, "code": None})
        return {"code_length": len(req.code), "updated_at": updated_at}

    async def get_code(self, session_id: str) -> dict[str, Any]:
        """``{code, description, updated_at, code_length}``; NotFound (with ERA's hint) when
        the session has none."""
        record = await self._record(session_id)
        code = record.stored_code
        if code is None:
            raise NotFound("no code stored", details={"hint": f"Use PUT /api/sessions/{session_id}/code to store code"})
        return {"code": code, "description": record.data.get("code_description"),
                "updated_at": record.data.get("code_updated_at"), "code_length": len(code)}

    # ---- schedules (engine/schedules.py) ------------------------------------------------------
    async def create_schedule(self, session_id: str, body: Any) -> dict[str, Any]:
        """A schedule of background runs: ``{cron, code?, timezone?}``; its document."""
        record = await self._record(session_id)
        # In a thread: validating asks croniter for the next slot (pure Python, can search
        # years ahead for a date that never comes) and may read the zone's file.
        req = await asyncio.to_thread(models.parse, models.ScheduleRequest, body)
        if req.code is None and record.stored_code is None:
            raise BadRequest("field 'code' is required: the session has no stored program (PUT .../code) "
                             "for the schedule to run", field="code")
        return await self.scheduler.create(session_id, req)

    async def list_schedules(self, session_id: str) -> list[dict[str, Any]]:
        await self._record(session_id)
        return await self.scheduler.list(session_id)

    async def get_schedule(self, session_id: str, schedule_id: str) -> dict[str, Any]:
        await self._record(session_id)
        return await self.scheduler.get(session_id, schedule_id)

    async def delete_schedule(self, session_id: str, schedule_id: str) -> None:
        await self._record(session_id)
        await self.scheduler.delete(session_id, schedule_id)

    # ---- upkeep --------------------------------------------------------------------------------
    async def cull(self) -> dict[str, list[str]]:
        """One culling pass (also run every ``ERA_CULL_INTERVAL``)."""
        return await self.upkeep.cull()

    async def stats(self, owner: str | None = None) -> dict[str, Any]:
        """Counts for /api/resources/stats, /health and /metrics; ``owner``: a tenant's own
        (its sessions and kernels, and the cluster's totals without the replicas' addresses)."""
        cluster = await self.ownership.cluster_stats()
        if owner is not None:
            cluster = {k: v for k, v in cluster.items() if k != "replicas"}
        return {**await self.upkeep.stats(owner), "replica": self.replica.id, "leases": self.ownership.stats(),
                "cluster": cluster}

    async def replicas(self) -> dict[str, Any]:
        """The servers registered in the store (this one among them), with their heartbeats."""
        return {"replica": self.replica.id, "replicas": await self.store.list_replicas()}

    # ---- files -------------------------------------------------------------------------------
    async def list_files(self, session_id: str) -> list[dict[str, Any]]:
        record = await self._record(session_id)
        return await self.files.list(record, session_uid(record))

    async def read_file(self, session_id: str, path: str) -> bytes:
        record = await self._record(session_id)
        return await self.files.read(record, session_uid(record), path)

    async def write_file(self, session_id: str, path: str, data: bytes) -> dict[str, Any]:
        record = await self._record(session_id)
        self.runner.data_changed(session_id)
        return await self.files.write(record, session_uid(record), path, data)

    async def delete_file(self, session_id: str, path: str) -> None:
        record = await self._record(session_id)
        self.runner.data_changed(session_id)
        await self.files.delete(record, session_uid(record), path)

    # ---- Jupyter kernel gateway (server/jupyter.py) -----------------------------------------
    async def kernelspecs(self) -> dict[str, dict[str, Any]]:
        """Our kernelspecs as Jupyter describes them (name -> kernel.json), read once."""
        from ..kernelspecs import available, read_spec

        def read() -> dict[str, dict[str, Any]]:
            return {name: read_spec(name) for name in available()}

        return await asyncio.to_thread(read)

    async def jupyter_kernel(self, session_id: str, start: bool = True) -> SessionKernel | None:
        """The session's live kernel for a raw Jupyter channels connection, started when it
        has none (``start=False``: None then). Counts as activity for culling."""
        record = await self._record(session_id)
        await self.ownership.ensure_local(session_id)
        kernel = self.table.kernel(session_id)
        ready = kernel is not None and kernel.state != "dead" and self.table.starting(session_id) is None
        if not ready:
            if not start:
                return None
            async with self.table.run_lock(session_id):  # no double start beside a run
                kernel = await self.launcher.ensure(record)
        self.table.touch(session_id)
        return kernel

    async def gateway_execute(self, session_id: str, kernel: SessionKernel, msg: dict[str, Any]) -> None:
        """A Jupyter client's ``execute_request``, about to be relayed to ``kernel``:
        recorded as a run (``source: "gateway"``) whose output is journaled."""
        record = await self._record(session_id)
        await self.gateway_runs.execute(session_id, kernel, get_language(record.language), msg)

    def jupyter_activity(self, session_id: str, touch: bool = False) -> float | None:
        """The session's last activity (epoch s); ``touch``: a Jupyter client's message is
        activity now (culling counts it as a run)."""
        if touch and self.table.kernel(session_id) is not None:
            self.table.touch(session_id)
        return self.table.active_at(session_id)
