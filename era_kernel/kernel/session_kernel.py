"""One live Jupyter kernel of a session: start, execute, interrupt, restart, stop.

``SessionKernel`` owns a jupyter_client ``AsyncKernelManager`` (which owns the
provisioner) and a client. Three pump tasks read the shell, IOPub and stdin channels
for the kernel's whole life and route each message by its parent id to the execution
waiting for it, so no read is ever cancelled half-way and no message is lost between
runs. It knows nothing of sessions: the caller hands it the launch options and the
startup cells.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from jupyter_client.kernelspec import KernelSpecManager

from .channel_reader import ChannelReader
from ..errors import KernelFailed
from ..provisioning.base import EraProvisioner
from ..provisioning.local import MOUNT_RACE  # bubblewrap's unmount race (see start())
from .outputs import OutputCollector
from .ready import wait_for_ready
from .wire import EraKernelManager, kernel_context

if TYPE_CHECKING:
    from ..provisioning.base import LaunchOptions

log = logging.getLogger("era.kernel")

EventSink = Callable[[dict[str, Any]], None]
Listener = Callable[[str, dict[str, Any]], None]  # (channel name, message), every message
InputHandler = Callable[[str, bool], Awaitable[str]]

ALIVE_POLL = 0.5  # seconds between liveness checks while a run waits for output
# A dying kernel drops its connections too: a cut only counts if the kernel outlives this.
CUT_GRACE = 0.5


class KernelState(StrEnum):
    NONE = "none"  # not started, or stopped
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"  # running a cell (ERA's, or a raw Jupyter client's)
    DEAD = "dead"  # died or cut off: the next run starts a fresh kernel


@dataclass
class ExecOutcome:
    collector: OutputCollector
    status: str = "ok"  # ok | error | aborted | timeout | dead | cut
    duration: float = 0.0
    dead_status: int | None = None  # the kernel process's exit status when it died
    out_of_memory: bool = False  # the kernel was killed for exceeding its memory limit
    restarted: bool = False
    cut: str | None = None  # why the kernel's connection was cut (a message over the limit)


ENTER_WAIT_S = 2.0  # interrupt(): how long a cell sent may take to begin in the kernel


@dataclass
class _Pending:
    collector: OutputCollector
    on_event: EventSink | None
    on_input: InputHandler | None
    idle: bool = False
    entered: bool = False  # the kernel's busy status for it came: it handles the request now
    reply: dict[str, Any] | None = None
    replied: bool = False
    # Resolved once both the reply and the idle status are in (or the kernel stops): one
    # future to wait on, not a task per run (each run is ~20 turns of the loop already).
    finished: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def settle(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)


class SessionKernel:
    def __init__(self, spec_manager: KernelSpecManager, kernel_name: str, launch: "LaunchOptions",
                 startup_cells: list[str], *, start_timeout: float = 60.0, max_message: int = 0):
        self.spec_manager = spec_manager
        self.kernel_name = kernel_name
        self.launch = launch
        self.startup_cells = startup_cells
        self.start_timeout = start_timeout
        self.max_message = max_message
        self.km: EraKernelManager | None = None
        self.kc = None
        self.state = KernelState.NONE
        self.execution_count = 0
        self._pending: dict[str, _Pending] = {}
        self._readers: list[ChannelReader] = []
        self._monitors: list[tuple[Any, Any]] = []  # (channel socket, its monitor socket)
        self.cut: str | None = None
        self._checks: set[asyncio.Future] = set()
        self._listeners: list[Listener] = []

    # ---- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        """Start the kernel, wait until it answers, run the startup cells."""
        try:
            await self._start_once()
        except KernelFailed as exc:
            if not MOUNT_RACE.search(exc.message):
                raise
            # bubblewrap binds the host's mounts recursively, then remounts each read-only:
            # another session's workspace volume unmounted in between fails that walk,
            # though nothing is wrong with this kernel. Once more: the walk is quick.
            log.info("kernel %s: bubblewrap raced an unmount while binding the host's mounts; starting it again",
                     self.kernel_name)
            await self._start_once()

    async def _start_once(self) -> None:
        self.state = KernelState.STARTING
        context = kernel_context(self.max_message)
        km = EraKernelManager(kernel_name=self.kernel_name, kernel_spec_manager=self.spec_manager, context=context)
        self.km = km
        try:
            await km.start_kernel(era=self.launch)
            kc = km.client(context=context)
            kc.start_channels(hb=False)  # liveness is the manager's answer (wire.py)
            self.kc = kc
            await asyncio.wait_for(wait_for_ready(kc, self.start_timeout), self.start_timeout + 5)
            provisioner = self._era_provisioner()
            if provisioner is not None:
                await provisioner.seal_ipc()
            self._readers = [self._reader(ch, name)
                             for name, ch in (("shell", kc.shell_channel), ("iopub", kc.iopub_channel),
                                              ("stdin", kc.stdin_channel), ("control", kc.control_channel))]
            if self.max_message:
                self._readers += [self._monitor(ch, name)
                                  for name, ch in (("shell", kc.shell_channel), ("iopub", kc.iopub_channel))]
            await self._run_cells(self.startup_cells)
        except BaseException as exc:
            await self.stop(now=True)
            self.state = KernelState.DEAD
            if isinstance(exc, KernelFailed):
                raise
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise KernelFailed(f"kernel {self.kernel_name} failed to start: {exc}{self._log_tail}") from exc
        self.state = KernelState.IDLE

    async def _run_cells(self, cells: list[str]) -> None:
        for cell in cells:
            outcome = await self.execute(cell, timeout=self.start_timeout, silent=True)
            if outcome.status != "ok":
                err = outcome.collector.error or {}
                raise KernelFailed(f"startup cell failed: {err.get('ename', outcome.status)}: {err.get('evalue', '')}")

    async def claim(self, startup_cells: list[str]) -> None:
        """Make a pre-started (pooled) kernel its user's: run that user's startup cells.
        Called once, by the engine, when a session or a one-shot run takes the kernel."""
        if self.state != "idle" or not await self.is_alive():
            raise KernelFailed("the pooled kernel is no longer running")
        self.startup_cells = startup_cells
        await self._run_cells(startup_cells)

    _log_tail = ""

    async def stop(self, now: bool = False) -> None:
        """Stop the kernel and release everything; safe to call twice."""
        for reader in self._readers:  # before the sockets close: their fds are registered
            reader.close()
        self._readers = []
        for socket, monitor in self._monitors:
            try:
                socket.disable_monitor()
            except Exception:
                pass
            monitor.close(linger=0)
        self._monitors = []
        for pending in self._pending.values():
            pending.settle()
        if self.kc is not None:
            # Closes the channels' sockets (linger 0), nothing more: no heartbeat thread to
            # join, and the context is the process's (wire.kernel_context).
            kc, self.kc = self.kc, None
            kc.stop_channels()
        provisioner = self._era_provisioner()
        km, self.km = self.km, None
        if km is not None:
            if self.state == KernelState.STARTING and provisioner is not None:
                tail = (await asyncio.to_thread(provisioner.kernel_log)).strip()
                self._log_tail = f"\nkernel output:\n{tail}" if tail else ""
            try:
                if km.has_kernel:
                    await km.shutdown_kernel(now=now)
                else:
                    await km.cleanup_resources()
            except Exception as exc:  # the process may already be gone
                log.debug("shutdown of %s: %s", self.kernel_name, exc)
                try:
                    if km.provisioner is not None:
                        await km.provisioner.kill()
                        await km.provisioner.cleanup(restart=False)
                except Exception:
                    pass
        self.state = KernelState.NONE

    async def is_alive(self) -> bool:
        return self.km is not None and await self.km.is_alive()

    async def exit_status(self) -> int | None:
        if self.km is None or self.km.provisioner is None:
            return None
        try:
            status = await self.km.provisioner.poll()
        except Exception:
            return None
        if status is not None and status < 0:
            return 128 - status  # killed by signal -status, shell convention
        return status

    async def interrupt(self) -> None:
        """Interrupt the cell the kernel runs. ipykernel takes SIGINT only while it handles
        a request: one sent after we sent a cell but before the kernel began it (its busy
        status) would be ignored and the cell run on, so it waits for that, up to
        ``ENTER_WAIT_S``."""
        deadline = time.monotonic() + ENTER_WAIT_S
        while (self._pending and not any(p.entered for p in self._pending.values())
               and time.monotonic() < deadline):
            await asyncio.sleep(0.01)
        if self.km is not None and self.km.has_kernel:
            await self.km.interrupt_kernel()

    # ---- raw Jupyter protocol access (the kernel gateway's channels WebSocket) ------------
    def add_listener(self, callback: Listener) -> Callable[[], None]:
        """``callback(channel, msg)`` for every message the kernel sends on shell, IOPub,
        stdin and control, ours included (sync, on the loop; must not modify ``msg``).
        Returns the function that removes it."""
        self._listeners.append(callback)

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return remove

    def send_raw(self, channel: str, msg: dict[str, Any]) -> None:
        """Send a client's message as it is (its header and msg_id kept, signed by our
        session) on shell, control or stdin. Replies reach the listeners."""
        kc = self.kc
        if kc is None:
            raise KernelFailed("kernel is not running")
        channels = {"shell": kc.shell_channel, "control": kc.control_channel, "stdin": kc.stdin_channel}
        if channel not in channels:
            raise ValueError(f"cannot send on channel {channel!r}")
        target = channels[channel]
        message = {"header": msg["header"], "parent_header": msg.get("parent_header") or {},
                   "metadata": msg.get("metadata") or {}, "content": msg.get("content") or {}}
        target.session.send(target.socket, message, buffers=list(msg.get("buffers") or []))
        self._poke(channel)

    def _track_foreign_state(self, msg: dict[str, Any]) -> None:
        """A raw client's execution moves the kernel's state too (culling skips busy kernels)."""
        if msg.get("msg_type") != "status" or self._pending or self.state not in ("idle", "busy"):
            return
        if msg.get("parent_header", {}).get("msg_type") != "execute_request":
            return
        state = msg.get("content", {}).get("execution_state")
        if state in ("idle", "busy"):
            self.state = KernelState(state)

    # ---- message routing -----------------------------------------------------------
    def _reader(self, channel, name: str) -> ChannelReader:
        session = channel.session

        def on_frames(frames: list[bytes]) -> None:
            try:
                msg = session.deserialize(session.feed_identities(frames)[1])
            except Exception as exc:  # a malformed or badly signed message: dropped
                log.debug("%s channel: dropped a message: %s", name, exc)
                return
            self._dispatch(name, msg)

        return ChannelReader(channel.socket, on_frames, name)

    def _monitor(self, channel, name: str) -> ChannelReader:
        """ZeroMQ refuses a message over ``max_message`` by dropping the connection, and
        (seen with libzmq 4.3) never reconnects it: no output can reach us after that. Its
        monitor tells us, so the run fails with a reason rather than at its timeout."""
        import zmq
        from zmq.utils.monitor import parse_monitor_message

        monitor = channel.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._monitors.append((channel.socket, monitor))

        def on_frames(frames: list[bytes]) -> None:
            if parse_monitor_message(frames)["event"] == zmq.EVENT_DISCONNECTED:
                task = asyncio.ensure_future(self._connection_lost(name))
                self._checks.add(task)  # the loop keeps only weak references to tasks
                task.add_done_callback(self._checks.discard)

        return ChannelReader(monitor, on_frames, f"{name} monitor")

    async def _connection_lost(self, name: str) -> None:
        await asyncio.sleep(CUT_GRACE)
        if self.km is None or self.cut is not None or not await self.is_alive():
            return  # stopped, already cut, or dead: the liveness poll reports a death
        limit = f"{self.max_message / 1024**2:g} MiB"
        self.cut = (f"the kernel sent a message over the {limit} limit on its {name} channel (a display or "
                    "output too big to carry: ERA_KERNEL_MESSAGE_LIMIT); the connection was cut, so anything "
                    "after it is lost and the kernel was stopped: the next run starts a fresh kernel")
        log.warning("kernel %s: %s connection cut (message over %s)", self.kernel_name, name, limit)
        self.state = KernelState.DEAD  # between runs too: the next run must not wait on a deaf kernel
        for pending in self._pending.values():
            pending.settle()

    def _dispatch(self, name: str, msg: dict[str, Any]) -> None:
        for listener in list(self._listeners) if self._listeners else ():  # no copy per message when none
            try:
                listener(name, msg)
            except Exception:
                log.exception("a %s listener failed", name)
        parent = msg.get("parent_header", {}).get("msg_id")
        pending = self._pending.get(parent)
        if pending is None:
            if name == "iopub":
                self._track_foreign_state(msg)
            return
        self._route(msg, pending)

    def _poke(self, name: str = "") -> None:
        """After a send on a channel (or as a safety net, all of them): drain what came in."""
        for reader in self._readers:
            if not name or reader.name == name:
                reader.poke()

    def _route(self, msg: dict[str, Any], pending: _Pending) -> None:
        msg_type = msg["header"]["msg_type"]
        content = msg.get("content", {})
        if msg_type == "status":
            state = content.get("execution_state")
            if state == "busy":
                pending.entered = True
            elif state == "idle":
                pending.idle = True
                if pending.replied:
                    pending.settle()
            return
        if msg_type == "execute_reply":
            pending.reply = content
            pending.replied = True
            if pending.idle:
                pending.settle()
            return
        if msg_type == "input_request":
            asyncio.ensure_future(self._answer_input(content, pending))
            return
        event = pending.collector.add(msg_type, content)
        if event is not None and pending.on_event is not None:
            pending.on_event(event)

    async def _answer_input(self, content: dict[str, Any], pending: _Pending) -> None:
        prompt, password = content.get("prompt", ""), bool(content.get("password", False))
        if pending.on_event is not None:
            pending.on_event({"type": "input_request", "prompt": prompt, "password": password})
        try:
            value = await pending.on_input(prompt, password) if pending.on_input else ""
        except Exception:
            value = ""
        if self.kc is not None:
            self.kc.input(str(value))
            self._poke("stdin")

    # ---- execution -------------------------------------------------------------------
    async def execute(self, code: str, *, timeout: float, on_event: EventSink | None = None,
                      on_input: InputHandler | None = None, output_limit: int = 10 * 1024**2,
                      silent: bool = False, interrupt_grace: float = 2.0) -> ExecOutcome:
        """Run one cell; never raises for anything the code does."""
        if self.kc is None:
            raise KernelFailed("kernel is not running")
        collector = OutputCollector(output_limit)
        pending = _Pending(collector, on_event, on_input)
        started = time.perf_counter()
        oom_before = self._oom_kills()
        msg_id = self.kc.execute(code, silent=silent, store_history=not silent,
                                 allow_stdin=on_input is not None, stop_on_error=False)
        self._pending[msg_id] = pending
        self._poke("shell")
        outcome = ExecOutcome(collector)
        if not silent:
            self.state = KernelState.BUSY
        try:
            finished = await self._wait(pending, started + timeout)
            if self.cut is not None:
                outcome.status, outcome.cut, outcome.restarted = "cut", self.cut, True
            elif finished == "dead":
                outcome.status = "dead"
                outcome.dead_status = await self.exit_status()
                outcome.out_of_memory = self._out_of_memory(oom_before)
            elif finished == "timeout":
                outcome.status = "timeout"
                await self.interrupt()
                after = await self._wait(pending, time.perf_counter() + interrupt_grace)
                if after != "done":  # the interrupt did not take: start over
                    outcome.restarted = True
            else:
                reply = pending.reply or {}
                outcome.status = reply.get("status", "ok")
                if reply.get("execution_count") is not None and not silent:
                    self.execution_count = reply["execution_count"]
                    collector.execution_count = collector.execution_count or reply["execution_count"]
                if outcome.status == "error" and collector.error is None:
                    collector.error = {k: reply.get(k, "") for k in ("ename", "evalue")}
                    collector.error["traceback"] = reply.get("traceback", [])
        finally:
            self._pending.pop(msg_id, None)
            outcome.duration = time.perf_counter() - started
            if self.state == "busy":
                self.state = KernelState.IDLE
        if outcome.status != "dead" and not silent:
            self._note_oom_kills(oom_before, pending)
        if outcome.status == "dead" or outcome.restarted:
            self.state = KernelState.DEAD
        return outcome

    # ---- out of memory: a provisioner with a cgroup counts OOM kills in the session ----------
    def _era_provisioner(self) -> EraProvisioner | None:
        """The kernel's provisioner, when it is one of ours (a kernelspec could name a
        stock one): only ours seal, keep the kernel's output and count OOM kills."""
        provisioner = self.km.provisioner if self.km is not None else None
        return provisioner if isinstance(provisioner, EraProvisioner) else None

    def _oom_kills(self) -> int | None:
        provisioner = self._era_provisioner()
        try:
            return provisioner.oom_kills() if provisioner is not None else None  # an in-memory cgroup file read
        except Exception:
            return None

    def _out_of_memory(self, before: int | None) -> bool:
        """The kernel died: was it the memory limit? Counted over this run when the
        provisioner counts; else its own verdict (era-docker's container state)."""
        after = self._oom_kills()
        if before is not None and after is not None:
            return after > before
        provisioner = self._era_provisioner()
        return bool(provisioner.oom_killed) if provisioner is not None else False

    def _note_oom_kills(self, before: int | None, pending: _Pending) -> None:
        """The kernel survived but the OOM killer took some of its session's processes (a
        child it started): say so in the run's stderr, or the run just looks odd."""
        after = self._oom_kills()
        if before is None or after is None or after <= before:
            return
        killed = after - before
        text = (f"era: {killed} process{'es' if killed > 1 else ''} of this session "
                f"{'were' if killed > 1 else 'was'} killed for exceeding the session's memory limit\n")
        event = pending.collector.add("stream", {"name": "stderr", "text": text})
        if event is not None and pending.on_event is not None:
            pending.on_event(event)

    async def _wait(self, pending: _Pending, deadline: float) -> str:
        """Wait for reply + idle. Returns done, timeout or dead."""
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return "timeout"
            done, _ = await asyncio.wait({pending.finished}, timeout=min(remaining, ALIVE_POLL))
            if done:
                return "done" if self.kc is not None else "dead"
            self._poke()  # a safety net: ZeroMQ's fd signal is an edge, see channel_reader.py
            if not await self.is_alive():
                return "dead"
