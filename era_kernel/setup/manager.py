"""``SetupManager``: what the engine calls to give sessions their packages.

A session's setup runs as a background task in two parts. Packages first: it resolves
the runtime (the local interpreter, or the session's image by id), hashes (language,
runtime, packages) into an environment key, and then takes the first of
1. the local environment directory of that key (a second session: instant),
2. the key's archive in the workspace store (another host built it: one GET),
3. a build: pip, npm, go in a sandbox whose only network is the egress proxy, to the
   package registries the operator's configuration names (``egress/registries.py``;
   ERA_SETUP_NETWORK=host: the host's network), sealed, archived to the store,
   published under the key.
Sessions asking for the same key at once share one build and all see its log. Then the
session's own part (``session.py``): the text forms' files into its workspace, and its
``commands`` one by one in its sandbox, with the environment on their paths read-only.
Each session's on_status hears ``running`` then ``completed`` or ``failed`` with its
``setup_result``: ERA's fields ``{success, duration_ms, pip_packages, npm_packages,
go_modules, commands_run, error, stdout, stderr}`` and ours ``{logs, duration, env,
source}``; on_log hears every line as it comes. A failed build publishes nothing, so
the next attempt starts clean.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import ssl
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from ..config import Settings
from ..errors import EraError
from ..kernel.outputs import format_duration
from .cache import EnvCache
from .layout import EnvLayout, python_startup_cell
from .logs import LineSplitter, LogTail, error_message
from .runner_local import LocalRunner, setting
from .network import SetupNetwork
from .session import SESSION_SITE, CommandSandbox
from .spec import FORMAT, env_key, normalize, packages, workspace_files
from .steps import SetupFailed, Toolchain, plan, step_env

log = logging.getLogger("era.setup")

LogSink = Callable[[str], None]
StatusSink = Callable[[str, "dict[str, Any] | None"], "Awaitable[None] | None"]

DEFAULT_SETUP_TIMEOUT = 900.0
DEFAULT_COMMAND_TIMEOUT = 300.0
DEFAULT_MAX_BYTES = 2 * 1024**3
LIVE_LOG_CHARS = 1024 * 1024  # per session setup; past it the live stream stops, the tail goes on
STEP_ERROR_LINES = 50
RESULT_OUTPUT_CHARS = 64 * 1024  # setup_result stdout / stderr: their tails, kept in the record


@dataclass(frozen=True)
class Runtime:
    provisioner: str
    identity: str
    tools: Toolchain
    image: Any = None  # docker: ImageFacts


class _Build:
    """One environment being made; every session that needs it listens to its log."""

    def __init__(self, key: str):
        self.key = key
        self.task: asyncio.Task | None = None
        self.listeners: list[LogSink] = []
        self.backlog = LogTail()

    def emit(self, line: str) -> None:
        self.backlog.add(line)
        for listener in list(self.listeners):
            listener(line)

    def attach(self, listener: LogSink) -> None:
        for line in self.backlog.lines():  # a late joiner first sees what it missed
            listener(line)
        self.listeners.append(listener)

    def detach(self, listener: LogSink) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)


class SetupManager:
    """Background setups per session, shared builds per environment key, and what a
    kernel needs to see a finished environment (``launch_extras``)."""

    def __init__(self, settings: Settings, store: Any = None):
        """``store``: the workspace store (a ``WorkspaceStore``), a function returning it
        (called on first use), or None to keep environments in local directories only."""
        self.settings = settings
        self.cache = EnvCache(settings.data_dir / "envs", store,
                              max_bytes=int(setting(settings, "ERA_SETUP_MAX_BYTES", DEFAULT_MAX_BYTES)))
        self.setup_timeout = float(setting(settings, "ERA_SETUP_TIMEOUT", DEFAULT_SETUP_TIMEOUT))
        self.command_timeout = float(setting(settings, "ERA_SETUP_COMMAND_TIMEOUT", DEFAULT_COMMAND_TIMEOUT))
        self.local = LocalRunner(settings)
        self._docker = None  # DockerRunner, made on first use (imports the Docker SDK)
        self._images: dict[str, Any] = {}  # language -> ImageFacts last seen (docker)
        self._sessions: dict[str, asyncio.Task] = {}
        self._builds: dict[str, _Build] = {}
        # Where builds and commands may connect: the registries, through the egress proxy.
        self.network = SetupNetwork(settings, lambda: self.local.sandboxed)

    # ---- the engine's interface -----------------------------------------------------------
    @staticmethod
    def normalize(setup: Any) -> dict[str, list[str]] | None:
        """Validated canonical spec, or None when it asks for nothing (BadRequest otherwise)."""
        return normalize(setup)

    async def start(self, session_id: str, language: str, provisioner: str, uid: int, spec: Any,
                    on_log: LogSink | None = None, on_status: StatusSink | None = None,
                    sandbox: CommandSandbox | None = None) -> None:
        """Start (or restart) the session's setup in the background and return at once.
        The record should already say ``pending``; on_status reports what follows.
        ``sandbox``: where the session's files and commands go (a spec with either fails
        without one)."""
        spec = normalize(spec)
        await self.cancel(session_id)
        if spec is None:
            return
        task = asyncio.create_task(self._session_setup(session_id, language, provisioner, uid, spec,
                                                       on_log, on_status, sandbox), name=f"era-setup-{session_id}")
        self._sessions[session_id] = task
        task.add_done_callback(lambda t: self._sessions.pop(session_id, None)
                               if self._sessions.get(session_id) is t else None)

    async def wait(self, session_id: str, timeout: float | None = None) -> None:
        """Return once the session's setup is over (or it has none running); raise
        ``TimeoutError`` if it is still running after ``timeout`` seconds."""
        task = self._sessions.get(session_id)
        if task is None or task.done():
            return
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            raise TimeoutError(f"the session's setup is still running after {timeout:g}s")

    def running(self, session_id: str) -> bool:
        task = self._sessions.get(session_id)
        return task is not None and not task.done()

    async def launch_extras(self, language: str, provisioner: str, spec: Any) -> dict[str, Any]:
        """What a kernel of this session needs to see its environment: ``readonly`` paths
        for the provisioner to bind, ``env`` for the kernel process, ``startup`` cells to
        run first. Empty when there is no setup or its environment is not here (a failed
        setup: the session works without it). Called by the engine before every launch;
        the environment's files and the image are looked at off the event loop."""
        if normalize(spec) is None:
            return {"readonly": [], "env": {}, "startup": []}
        return await asyncio.to_thread(self._launch_extras, language, provisioner, spec)

    def _launch_extras(self, language: str, provisioner: str, spec: Any) -> dict[str, Any]:
        extras: dict[str, Any] = {"readonly": [], "env": {}, "startup": []}
        spec = normalize(spec)
        if spec is None:
            return extras
        # Packages a command pip-installed into the session's own directory, first.
        site = SESSION_SITE if spec.get("commands") and language == "python" else None
        wanted = packages(spec)
        layout = None
        if any(wanted.values()):
            try:
                key = env_key(language, self._identity_now(language, provisioner), spec)
            except Exception as exc:  # no Docker engine: that kernel will not start either; say why there
                log.warning("cannot tell the environment of a %s/%s session: %s", language, provisioner, exc)
                key = None
            if key is not None and self.cache.present(key):
                layout = EnvLayout(str(self.cache.final(key)))
        if layout is not None:
            extras.update(readonly=[layout.root], env=layout.kernel_env(wanted, site),
                          startup=[layout.python_startup_cell(site)] if language == "python" else [])
        elif site is not None:
            # No shared environment (commands only, or it failed): the session's own packages.
            extras.update(env={"PYTHONPATH": site}, startup=[python_startup_cell([site], [f"{site}/bin"])])
        return extras

    async def ensure(self, language: str, provisioner: str, spec: Any) -> bool:
        """Make a completed setup's environment present locally (restoring it from the
        store on a host that never built it) before a kernel starts. Never builds, never
        raises (but for cancellation): a kernel without its environment beats no kernel.
        True when the environment is here, or none is needed."""
        try:
            spec = normalize(spec)
            if spec is None:
                return True
            runtime = await self._runtime(language, provisioner)
            key = env_key(language, runtime.identity, spec)
            if await asyncio.to_thread(self.cache.present, key):
                return True
            return await self.cache.restore(key, os.getuid(), asyncio.to_thread, lambda line: log.info("%s", line))
        except Exception as exc:
            log.warning("environment for a %s/%s session is not available: %s", language, provisioner, exc)
            return False

    async def cancel(self, session_id: str) -> None:
        """Stop the session's setup (its build too, unless another session waits for it).
        Reports no status: the caller is deleting or restarting the session."""
        task = self._sessions.pop(session_id, None)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def shutdown(self) -> None:
        for session_id in list(self._sessions):
            await self.cancel(session_id)
        builds = [b.task for b in self._builds.values() if b.task is not None and not b.task.done()]
        for task in builds:
            task.cancel()
        if builds:
            await asyncio.wait(builds)

    # ---- one session's setup ----------------------------------------------------------------
    async def _session_setup(self, session_id: str, language: str, provisioner: str, uid: int,
                             spec: dict[str, Any], on_log: LogSink | None, on_status: StatusSink | None,
                             sandbox: CommandSandbox | None) -> None:
        started = time.perf_counter()
        tail = LogTail()
        budget = LIVE_LOG_CHARS

        def emit(line: str) -> None:
            nonlocal budget
            tail.add(line)
            if on_log is None or budget <= 0:
                return
            budget -= len(line) + 1
            if budget <= 0:
                line = "(setup output continues; the live log stops here, the result keeps its tail)"
            try:
                on_log(line)
            except Exception:
                log.exception("setup log callback failed")

        await _report(on_status, "running", None)
        wanted = packages(spec)
        outcome = _Outcome()
        key = source = error = None
        try:
            runtime = await self._runtime(language, provisioner)
            if any(wanted.values()):
                key = env_key(language, runtime.identity, spec)
                source = await self._obtain(key, runtime, uid, spec, emit)
            if spec.get("commands") or workspace_files(spec):
                if sandbox is None:
                    raise SetupFailed("setup commands and files need a session to run in")
                await self._session_part(spec, runtime, key, sandbox, emit, outcome)
        except asyncio.CancelledError:
            raise
        except SetupFailed as exc:
            error = str(exc)
        except EraError as exc:
            error = exc.message
        except Exception as exc:  # a bug or an unreachable Docker engine: say so, keep the session
            log.exception("setup of session %s failed", session_id)
            error = f"setup failed: {type(exc).__name__}: {exc}"
        duration = time.perf_counter() - started
        if error:
            for line in ("setup failed: " + error).splitlines():
                emit(line)
            if outcome.failed_step is None:
                outcome.stderr.append(error)  # not a command: a package step's tool's words, as ERA gives them
        result = {
            # ERA's fields
            "success": error is None, "duration_ms": round(duration * 1000, 1),
            "pip_packages": wanted["pip"], "npm_packages": wanted["npm"], "go_modules": wanted["go"],
            "commands_run": outcome.commands, "error": error,
            "stdout": _tail("".join(outcome.stdout)), "stderr": _tail("".join(outcome.stderr)),
            # ours
            "logs": tail.text(), "duration": format_duration(duration), "env": key, "source": source}
        log.info("setup of session %s %s in %.2fs (environment %s, %s)", session_id,
                 "failed" if error else "completed", duration, key, source)
        await _report(on_status, "failed" if error else "completed", result)

    async def _session_part(self, spec: dict[str, Any], runtime: Runtime, key: str | None, sandbox: CommandSandbox,
                            emit: LogSink, outcome: "_Outcome") -> None:
        """The session's own part, in its sandbox: the text forms' files into its
        workspace, then its commands one after another (``session.py`` says what they
        can change). Stops at the first failing command."""
        try:
            for name, text in workspace_files(spec).items():
                await sandbox.write_file(name, text.encode())
                emit(f"wrote {name} into the workspace")
            commands = spec.get("commands") or []
            if not commands:
                return
            root = str(self.cache.final(key)) if key else "/nonexistent-era-env"
            layout = EnvLayout(root)
            ca = self.ca_bundle()
            readonly = [root] if key else []
            if ca and runtime.provisioner == "docker":
                ca = os.path.realpath(ca)  # the container sees its directory, bound read-only
                readonly.append(os.path.dirname(ca))
            tools = await self.network.tools_env(runtime.provisioner)  # the same registries as the build's
            env = {**layout.command_env(runtime.tools.base_path, SESSION_SITE, ca), **tools,
                   **(spec.get("envs") or {})}
            if not key:
                for name in ("ERA_SETUP_DIR", "NODE_PATH"):
                    env.pop(name, None)
                env["PYTHONPATH"] = SESSION_SITE
            deadline = time.monotonic() + self.setup_timeout
            for number, command in enumerate(commands, 1):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SetupFailed(f"setup timed out after {self.setup_timeout:g}s (ERA_SETUP_TIMEOUT)")
                first = command.splitlines()[0]
                title = first[:200] + (" ..." if len(first) > 200 or "\n" in command else "")
                emit(f"[{number}/{len(commands)}] $ {title}")
                outcome.commands.append(command)
                splitters = {"stdout": LineSplitter(), "stderr": LineSplitter()}
                shown = LogTail(max_lines=STEP_ERROR_LINES)

                def on_output(stream: str, text: str) -> None:
                    for line in splitters[stream].feed(text.encode()):
                        shown.add(line)
                        emit(line)

                timeout = min(self.command_timeout, remaining)
                result = await sandbox.run(["bash", "-c", command], timeout=timeout, allow_network=True, env=env,
                                           readonly=readonly, on_output=on_output)
                for splitter in splitters.values():
                    for line in splitter.flush():
                        shown.add(line)
                        emit(line)
                outcome.stdout.append(result.stdout)
                outcome.stderr.append(result.stderr)
                if result.out_of_memory:
                    emit("era: a process of this command was killed for exceeding its memory limit (ERA_SETUP_MEMORY)")
                if result.timed_out:
                    outcome.failed_step = command
                    raise SetupFailed(f"$ {title} timed out after {timeout:g}s (ERA_SETUP_COMMAND_TIMEOUT)")
                if result.exit_code != 0:
                    outcome.failed_step = command
                    if result.exit_code == 127 and runtime.provisioner == "docker" and not result.stderr.strip():
                        raise SetupFailed(f"bash is not installed in image {runtime.image.ref}; setup commands need it")
                    raise SetupFailed(error_message(f"$ {title}", result.exit_code, shown.lines()))
        finally:
            await sandbox.finished()

    async def _obtain(self, key: str, runtime: Runtime, uid: int, spec: dict[str, Any], emit: LogSink) -> str:
        """The environment ``key`` present locally; returns where it came from."""
        if await asyncio.to_thread(self.cache.present, key):
            emit(f"using cached environment {key}")
            return "cache"
        build = self._builds.get(key)
        if build is None:
            build = _Build(key)
            self._builds[key] = build
            build.task = asyncio.create_task(self._build(build, runtime, uid, spec), name=f"era-env-{key}")
            build.task.add_done_callback(lambda _t: self._builds.pop(key, None)
                                         if self._builds.get(key) is build else None)
        else:
            emit(f"joining the setup of environment {key} already under way")
        build.attach(emit)
        try:
            return await asyncio.shield(build.task)
        except asyncio.CancelledError:
            build.detach(emit)
            if not build.listeners and build.task is not None:
                build.task.cancel()  # nobody waits for it any more: stop it, and let it clean up
                await asyncio.wait({build.task})  # so that cancel() returns with nothing left running
            raise
        finally:
            build.detach(emit)

    async def _build(self, build: _Build, runtime: Runtime, uid: int, spec: dict[str, Any]) -> str:
        key, emit = build.key, build.emit
        if await self.cache.restore(key, uid, asyncio.to_thread, emit):
            return "store"
        started = time.perf_counter()
        staging, home = await asyncio.to_thread(self.cache.make_staging, key, uid)
        try:
            final = self.cache.final(key)
            runner = self._runner(runtime)
            layout = EnvLayout(str(runner.build_path(final, staging)))
            steps = plan(packages(spec), layout, runtime.tools, setup_timeout=self.setup_timeout,
                         command_timeout=self.command_timeout)
            env = step_env(layout, runtime.tools, home=str(home), ca_bundle=self.ca_bundle())
            where = await self.network.describe(runtime.provisioner)
            if where:
                emit(where)
            deadline = time.monotonic() + self.setup_timeout
            for number, step in enumerate(steps, 1):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SetupFailed(f"setup timed out after {self.setup_timeout:g}s (ERA_SETUP_TIMEOUT)")
                # "[2/3] $ npm install ms": the progress a client shows is in the log itself.
                emit(f"[{number}/{len(steps)}] " + (step.title if step.kind == "command" else f"$ {step.title}"))
                output = LogTail(max_lines=STEP_ERROR_LINES)

                def on_line(line: str) -> None:
                    output.add(line)
                    emit(line)

                hook, network_env = await self.network.step(runtime.provisioner, key, emit)
                kwargs = dict(final=final, staging=staging, home=home, uid=uid, env={**env, **network_env},
                              timeout=min(step.timeout, remaining), on_line=on_line, egress=hook)
                if runtime.image is not None:
                    kwargs["facts"] = runtime.image
                try:
                    code = await runner.run(step, **kwargs)
                finally:
                    if hook is not None:
                        hook.detach()
                if code != 0:
                    raise SetupFailed(error_message(step.title.removeprefix("$ "), code, output.lines()))
            manifest = {"key": key, "format": FORMAT, "runtime": runtime.identity, "spec": packages(spec), "path": str(final),
                        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "build_seconds": round(time.perf_counter() - started, 3)}
            sealed = await asyncio.to_thread(self.cache.seal, staging, manifest, emit)
            emit(f"environment {key}: {sealed['files']} files, {sealed['bytes']} bytes, "
                 f"built in {time.perf_counter() - started:.1f}s")
            if self.cache.store is not None:
                try:
                    size = await self.cache.upload(key, staging, asyncio.to_thread)
                    emit(f"saved environment {key} to the store ({size} bytes)")
                except Exception as exc:  # the environment still serves this host
                    log.warning("could not save environment %s to the store: %s", key, exc)
                    emit(f"could not save environment {key} to the store: {exc}")
            await asyncio.to_thread(self.cache.promote, key, staging)
            return "built"
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self.cache.discard, staging))
            raise
        finally:
            await asyncio.shield(asyncio.to_thread(self.cache.discard, home))

    # ---- runtimes ---------------------------------------------------------------------------
    def _docker_runner(self):
        if self._docker is None:
            from .runner_docker import DockerRunner

            self._docker = DockerRunner(self.settings)
            self._docker.ca_bundle = self.ca_bundle()
        return self._docker

    def _runner(self, runtime: Runtime):
        return self._docker_runner() if runtime.provisioner == "docker" else self.local

    async def _runtime(self, language: str, provisioner: str) -> Runtime:
        if provisioner == "docker":
            runner = self._docker_runner()
            facts = await asyncio.to_thread(runner.inspect_image, language)
            self._images[language] = facts
            return Runtime("docker", runner.identity(facts), runner.toolchain(facts), facts)
        if provisioner != "local":
            raise SetupFailed(f"unknown provisioner {provisioner!r}")
        return Runtime("local", LocalRunner.identity(), LocalRunner.toolchain())

    def _identity_now(self, language: str, provisioner: str) -> str:
        if provisioner != "docker":
            return LocalRunner.identity()
        facts = self._images.get(language)
        if facts is None:
            # Only when no start/ensure ran for this language in this process: one quick
            # call to the local Docker engine (the engine calls ensure() first).
            facts = self._docker_runner().inspect_image(language)
            self._images[language] = facts
        return self._docker_runner().identity(facts)

    def ca_bundle(self) -> str | None:
        """The host's CA bundle, through which setups reach registries (ERA_SETUP_CA_BUNDLE,
        else the file OpenSSL trusts by default here, which SSL_CERT_FILE can name)."""
        configured = setting(self.settings, "ERA_SETUP_CA_BUNDLE", "")
        if configured:
            return str(configured)
        paths = ssl.get_default_verify_paths()
        for candidate in (paths.cafile, paths.openssl_cafile):
            if candidate and os.path.isfile(candidate):
                return candidate
        return None


class _Outcome:
    """What a session's own part of the setup did, for ERA's result fields."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.failed_step: str | None = None


def _tail(text: str) -> str:
    return text if len(text) <= RESULT_OUTPUT_CHARS else "[...]\n" + text[-RESULT_OUTPUT_CHARS:]


async def _report(on_status: StatusSink | None, status: str, result: dict[str, Any] | None) -> None:
    if on_status is None:
        return
    try:
        outcome = on_status(status, result)
        if inspect.isawaitable(outcome):
            await outcome
    except Exception:
        log.exception("setup status callback failed")
