"""What the zygote (``zygote.py``) works out once for every kernel it forks, so that each
forked kernel (``forked.py``) runs less of ipykernel's start and writes fewer of the
zygote's pages: every page a kernel writes becomes its own copy, its private memory,
and in CPython reading an object writes it (its reference count).

- ``prepare_command_line``: the kernelspec's command line parsed once
  (``use_parsed_command_line`` gives each kernel the result with its connection file);
- ``rehearse_kernel_start``: ipykernel's whole start run once in the zygote, for a
  throw-away kernel, so the code every kernel runs is already warmed up;
- ``prepare_module_files``: ipykernel's list of the kernel's own module files
  (``list_modules_as_prepared`` gives it to each kernel);
- ``immortalize_heap``: on CPython 3.12 and 3.13, every object the zygote holds made
  immortal, last before it forks, so a kernel reading one writes nothing.

Each is an optimisation only: a kernel without it starts as ipykernel starts it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

PREPARED: dict[str, Any] = {}


CONNECTION_FILE_PLACEHOLDER = "/era-connection-file.json"


def prepare_command_line(tail: list[str]) -> None:
    """In the zygote: parse a kernel's command line, ``-f <connection file> <tail>``, once
    (traitlets' parser is about 5 ms of CPU, and writes to 2.6 MiB of the zygote's pages,
    in every kernel). A kernel whose command line is that one with its own connection
    file gets the result (``use_parsed_command_line``); any other is parsed as usual."""
    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp()
    app.parse_command_line(["-f", CONNECTION_FILE_PLACEHOLDER, *tail])
    if app.cli_config.get("IPKernelApp", {}).get("connection_file") == CONNECTION_FILE_PLACEHOLDER:
        PREPARED["command_line"] = (list(tail), app.cli_config, list(app.extra_args))
        # Its exec_lines (the protocol fixes, languages.PYTHON_FIXES_CELL) compiled here too:
        # IPython would put each through its input transformers, compile and run it as a
        # cell, about 7 ms of every kernel's start (``_run_exec_lines``).
        PREPARED["exec_lines"] = {line: compile(line, "<exec_lines>", "exec")
                                   for line in app.cli_config.IPKernelApp.get("exec_lines", [])}


def use_parsed_command_line(app: Any, argv: list[str]) -> bool:
    """Make ``app.parse_command_line(argv)`` apply the zygote's parse of the same command
    line (``prepare_command_line``) with this kernel's connection file, as traitlets'
    ``Application.parse_command_line`` would have set it; False (parsed as usual) when
    the command line is another."""
    found = PREPARED.get("command_line")
    if found is None or len(argv) < 2 or argv[0] != "-f" or argv[2:] != found[0]:
        return False
    from copy import deepcopy

    _, config, extra = found

    def parse_command_line(argv: list[str] | None = None) -> None:
        assert argv is not None
        app.argv = list(argv)
        app.cli_config = deepcopy(config)
        app.cli_config.IPKernelApp.connection_file = argv[1]
        app.update_config(app.cli_config)
        app.extra_args = list(extra)

    app.parse_command_line = parse_command_line
    app._run_exec_lines = lambda: _run_exec_lines(app)
    return True


def _run_exec_lines(app: Any) -> None:
    """``InteractiveShellApp._run_exec_lines`` with the lines the zygote compiled run as
    compiled (in the user's namespace, outside the history, as IPython runs them); any
    other line (a profile's own configuration) as IPython runs it."""
    compiled = PREPARED.get("exec_lines", {})
    for line in app.exec_lines:
        code = compiled.get(line)
        try:
            if code is None:
                app.shell.run_cell(line, store_history=False)
            else:
                exec(code, app.shell.user_ns)  # noqa: S102 - our own kernelspec's line
        except Exception:  # as IPython: the kernel starts, the log says why
            app.log.warning("Error in executing line in user namespace: %s", line, exc_info=True)


class _ModuleFile:
    """What ipykernel reads of a module to list the kernel's own: its ``__file__``."""

    __slots__ = ("__file__",)

    def __init__(self, path: str):
        self.__file__ = path


def prepare_module_files() -> None:
    """In the zygote, after its imports: ipykernel's list of the kernel's own module files
    (``IPythonKernel.__init__``'s ``_kernel_modules``, which its debugger steps over),
    taken once for every kernel. Each kernel took it by reading every module in
    ``sys.modules`` (some 580), and a read in CPython writes (reference counts): it
    copied the pages of every module object and file name, about 0.5 MiB of private
    memory a kernel (``list_modules_as_prepared``)."""
    files = {name: _ModuleFile(m.__file__) for name, m in sys.modules.copy().items()
             if getattr(m, "__file__", None)}
    last = next(reversed(sys.modules))
    PREPARED["modules"] = (files, last, sys.modules[last])


class _PreparedModules:
    """``sys.modules`` as ipykernel reads it to list module files (its ``copy()``): the
    zygote's list, and the modules the kernel has imported since, found from the end of
    ``sys.modules`` (a dict keeps the order of insertion) back to the zygote's last.
    A module the kernel replaced in place in ``sys.modules`` keeps the zygote's file;
    a removed one stays listed (the list only tells the debugger what to step over)."""

    def __init__(self, prepared: tuple[dict[str, Any], str, Any]):
        self.files, self.last, self.last_module = prepared

    def copy(self) -> dict[str, Any]:
        newer = {}
        for name, module in reversed(sys.modules.items()):
            if name == self.last and module is self.last_module:
                break
            newer[name] = module
        else:  # the zygote's last module went: the whole of sys.modules, as ipykernel reads it
            return sys.modules.copy()
        return {**self.files, **newer}


class _SysWithPreparedModules:
    """``sys``, but for ``modules``: ``_PreparedModules``."""

    def __init__(self, modules: _PreparedModules):
        self.modules = modules

    def __getattr__(self, name: str) -> Any:
        return getattr(sys, name)


class list_modules_as_prepared:  # noqa: N801 - used as a context manager, like contextlib's
    """While in it, ipykernel's kernel lists its module files from the zygote's list
    (``prepare_module_files``): ``ipykernel.ipkernel``'s ``sys`` is ``_SysWithPreparedModules``.
    Nothing changes without a prepared list, or when ipykernel's ``sys`` is not ``sys``."""

    def __enter__(self) -> None:
        self.module = None
        prepared = PREPARED.get("modules")
        if prepared is None:
            return
        import ipykernel.ipkernel as module

        if getattr(module, "sys", None) is sys:
            self.module = module
            module.sys = _SysWithPreparedModules(_PreparedModules(prepared))

    def __exit__(self, *exc: Any) -> None:
        if self.module is not None:
            self.module.sys = sys


# ---------------------------------------------------------------------------- the rehearsal


def rehearse_kernel_start(tail: list[str], times: int = 2) -> None:
    """In the zygote: ipykernel's start (``IPKernelApp.initialize``: its sockets, on IPC
    files in a private directory, the shell, the history in memory) for a throw-away
    kernel, ``times`` over; then all of it taken down and what it changed in this process
    put back (``_Rehearsal``).

    Why: CPython 3.11 counts the calls of each function in its code object until it
    rewrites the bytecode in place ("quickening"), then specializes instructions as they
    run, each a write to the code object. Every forked kernel ran the same start on code
    the zygote had never run: each copied those code objects' pages and paid for the
    warm-up in CPU. Run here first, the warm code is in the pages the kernels share.
    Measured (unsandboxed forks of a zygote, 6 kernels): 38 -> 27 ms of CPU for a kernel's
    initialize, 1.2 MiB less private memory a kernel; a second run warms a little more
    than the first, a third nothing. Raises RuntimeError, with everything put back that
    could be, when the start left a thread or a descriptor (the zygote must hold none)."""
    for _ in range(times):
        with _Rehearsal() as rehearsal:
            rehearsal.run(tail)
        PREPARED["rehearsals"] = PREPARED.get("rehearsals", 0) + 1


class _Rehearsal:
    """One throw-away kernel start, and the process as it was before it."""

    def __enter__(self) -> "_Rehearsal":
        import atexit
        import builtins
        import faulthandler
        import pdb
        import signal
        import tempfile
        import threading

        from IPython.core import debugger

        self.fds = set(os.listdir("/proc/self/fd"))
        self.threads = threading.active_count()
        self.tasks = len(os.listdir("/proc/self/task"))
        self.attributes = [(owner, name, getattr(owner, name)) for owner, name in (
            (sys, "stdin"), (sys, "stdout"), (sys, "stderr"), (sys, "displayhook"), (sys, "excepthook"),
            (faulthandler, "enable"), (faulthandler, "register"), (pdb, "Pdb"), (pdb, "set_trace"),
            (debugger, "Pdb"), (atexit, "register")) if hasattr(owner, name)]
        self.builtins = dict(builtins.__dict__)
        self.path, self.argv, self.environ, self.cwd = list(sys.path), list(sys.argv), dict(os.environ), os.getcwd()
        self.main = sys.modules.get("__main__")
        self.signals = {}
        for signum in signal.valid_signals():
            try:
                self.signals[signum] = signal.getsignal(signum)
            except (OSError, ValueError):
                continue
        # What the start registers to run at exit (the app's close, the shell's, ...):
        # unregistered afterwards, or this process's exit would run them.
        self.at_exit: list[Any] = []
        register = atexit.register

        def recorded(func: Any, *args: Any, **kwargs: Any) -> Any:
            self.at_exit.append(func)
            return register(func, *args, **kwargs)

        atexit.register = recorded
        # The start's log and greeting (ipykernel prints how to connect) reach nobody.
        sys.stdout.flush()  # what this process has written so far still reaches its output
        sys.stderr.flush()
        self.saved_fds = (os.dup(1), os.dup(2))
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
        self.root = tempfile.mkdtemp(prefix="era-zygote-rehearsal-")
        self.app: Any = None
        return self

    def run(self, tail: list[str]) -> None:
        """What ``forked._run_kernel`` does, with a kernel's own directories (as
        ``local.kernel_env`` makes them) in the private directory."""
        from pathlib import Path

        from ipykernel.kernelapp import IPKernelApp

        from .ipc import ipc_connection_info, write_connection_file

        root = Path(self.root)
        home, workspace = root / "home", root / "workspace"
        home.mkdir()
        workspace.mkdir()
        os.environ.update({"HOME": str(home), "IPYTHONDIR": str(home / ".ipython"), "MPLCONFIGDIR": str(home / ".mpl")})
        os.chdir(workspace)
        connection_file = write_connection_file(root, ipc_connection_info(root))
        argv = ["-f", str(connection_file), *tail]
        self.app = app = IPKernelApp.instance()
        # A kernel's output goes through a pipe and a thread; here it has nowhere to go.
        app.capture_fd_output = False
        use_parsed_command_line(app, argv)
        with list_modules_as_prepared():
            app.initialize(argv)

    def __exit__(self, *exc: Any) -> None:
        import atexit
        import builtins
        import gc
        import shutil
        import signal
        import threading

        from traitlets.config import SingletonConfigurable

        try:
            if self.app is not None:
                self.app.close()  # its sockets, threads and ZeroMQ contexts
        finally:
            for owner, name, value in self.attributes:
                setattr(owner, name, value)
            while self.at_exit:  # bound methods: no name may keep one (and the kernel) past the collection below
                atexit.unregister(self.at_exit.pop())
            classes = [SingletonConfigurable]  # the app, the kernel, the shell: each kernel makes its own
            while classes:
                cls = classes.pop()
                classes.extend(cls.__subclasses__())
                if cls.__dict__.get("_instance") is not None:
                    cls.clear_instance()
            builtins.__dict__.clear()
            builtins.__dict__.update(self.builtins)
            sys.path[:], sys.argv[:] = self.path, self.argv
            os.environ.clear()
            os.environ.update(self.environ)
            if self.main is not None:
                sys.modules["__main__"] = self.main
            os.chdir(self.cwd)
            for signum, handler in self.signals.items():
                if handler is not None and signal.getsignal(signum) is not handler:
                    signal.signal(signum, handler)
            shutil.rmtree(self.root, ignore_errors=True)
            self.app = None
            gc.collect()  # while the output still goes nowhere: asyncio complains of the tasks it ends
            for fd, saved in zip((1, 2), self.saved_fds):
                os.dup2(saved, fd)
                os.close(saved)
        left = sorted(set(os.listdir("/proc/self/fd")) - self.fds, key=int)
        # Threads ZeroMQ starts are not Python's: counted as the system sees them.
        if threading.active_count() != self.threads or len(os.listdir("/proc/self/task")) != self.tasks or left:
            raise RuntimeError(f"a rehearsed kernel start left threads {threading.enumerate()} and descriptors "
                               f"{left}")


# CPython 3.12 and 3.13 (PEP 683): an object whose reference count's low 32 bits are all
# set is immortal, and Py_INCREF/Py_DECREF leave it unwritten. Other versions, debug
# builds (two more pointers before the count) and free-threaded ones (a thread id before
# it) keep their counts.
_IMMORTAL = 0xFFFFFFFF


def immortalisable() -> bool:
    """Whether this interpreter has immortal objects the way ``immortalize_heap`` sets
    them; ``era doctor`` says what a kernel costs without."""
    import sysconfig

    return ((3, 12) <= sys.version_info[:2] <= (3, 13) and not hasattr(sys, "gettotalrefcount")
            and not sysconfig.get_config_var("Py_GIL_DISABLED"))


def immortalize_heap() -> int:
    """In the zygote, last before it forks: make every object it holds immortal (PEP 683),
    so that a kernel reading one no longer writes its reference count, and the page under
    it stays the zygote's, shared. Instagram's Cinder does the same before it forks its
    web workers (CinderX's ``immortalize_heap``). Measured here before it: of the 14.4 MiB
    a forked kernel had copied from the zygote, 8.3 MiB were pages that differ from the
    zygote's in at most two words or none at all: counts raised and lowered again. With
    it an idle pooled kernel keeps 7.5 MiB private, not 13.5 (3.13 and 3.12 alike).

    The zygote's objects are never freed then: none is, in a zygote that only forks. A
    kernel that drops one keeps its memory (it was shared, not its own). Objects found
    from the collector's lists and what they refer to; one reachable only through an
    object already immortal (interned strings, static types) stays as it was.
    Returns the number made immortal; 0 where this Python has no immortal objects."""
    if not immortalisable():
        return 0
    import ctypes
    import gc

    count_at = ctypes.c_ssize_t.from_address
    getrefcount = sys.getrefcount
    referents = gc.get_referents
    stack = gc.get_objects()
    made = 0
    while stack:
        obj = stack.pop()
        if getrefcount(obj) >= _IMMORTAL:
            continue  # immortal already, or seen
        count_at(id(obj)).value = _IMMORTAL
        made += 1
        stack.extend(referents(obj))
    return made
