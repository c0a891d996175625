"""Languages: which kernel runs them and the startup cells that make a kernel a session.

A language contributes code snippets, never engine logic: the cell that sets the working
directory and environment at kernel start, the cells that apply and then undo a run's
own ``env``, and how an error reply maps to an exit code (``sys.exit(n)`` -> n).
Values are embedded as JSON literals, which are valid Python and JavaScript expressions
and the argument syntax of the Go kernel's directives, or single-quoted for bash, so
nothing from a request is ever spliced into code unquoted.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Callable

from .errors import BadRequest
from .validation import ENV_NAME_RE


def _py_literal(value: object) -> str:
    """A Python literal of JSON-able strings, lists and dicts. Not ``json.dumps`` as is:
    its ASCII escapes write a non-BMP character as a surrogate pair ("\\ud83d\\ude00"),
    which JSON joins back into one character but a Python string literal does not."""
    return json.dumps(value, ensure_ascii=False)


def _py_startup(workspace: str, env: dict[str, str], startup: str | None) -> list[str]:
    cells = [
        "import os as _era_os, warnings as _era_warnings\n"
        f"_era_os.chdir({_py_literal(workspace)})\n"
        f"_era_os.environ.update({_py_literal(env)})\n"
        # sys.exit(n) is how scripts end; IPython's "To exit: use 'exit'" hint is noise here.
        "_era_warnings.filterwarnings('ignore', message='To exit: use')\n"
        "del _era_os, _era_warnings"
    ]
    if startup:
        cells.append(startup)
    return cells


def _py_env_apply(env: dict[str, str]) -> str:
    return (
        "import os as _era_os\n"
        f"_era_saved_env = {{k: _era_os.environ.get(k) for k in {_py_literal(sorted(env))}}}\n"
        f"_era_os.environ.update({_py_literal(env)})"
    )


def _py_env_restore(env: dict[str, str]) -> str:
    return (
        "for _k, _v in _era_saved_env.items():\n"
        "    _era_os.environ.pop(_k, None) if _v is None else _era_os.environ.__setitem__(_k, _v)\n"
        "del _era_saved_env, _era_os"
    )


def _py_exit_code(ename: str, evalue: str) -> int | None:
    """``sys.exit(n)`` reaches us as an error reply with ename SystemExit."""
    if ename != "SystemExit":
        return None
    text = evalue.strip()
    if text in ("", "None"):
        return 0
    try:
        return int(text)
    except ValueError:
        return 1  # sys.exit("message"), as Python itself does


# ---- JavaScript and TypeScript (tslab, through era_kernel/kernels/tslab.py) -----------------
# These cells declare nothing at top level (a declaration would become a session
# variable) and end in `void 0` (a cell's last value is an execute_result). process.exit(n)
# in a cell is SystemExit(n), by the launcher.
_JS_SAVED = 'globalThis["__era_saved_env"]'


def _node_startup(workspace: str, env: dict[str, str], startup: str | None) -> list[str]:
    cells = [f"process.chdir({json.dumps(workspace)});\n"
             f"Object.assign(process.env, {json.dumps(env)});\n"
             "void 0;"]
    return cells + ([startup] if startup else [])


def _node_env_apply(env: dict[str, str]) -> str:
    return (f"{_JS_SAVED} = Object.fromEntries({json.dumps(sorted(env))}.map((k) => [k, process.env[k]]));\n"
            f"Object.assign(process.env, {json.dumps(env)});\n"
            "void 0;")


def _node_env_restore(env: dict[str, str]) -> str:
    return (f"for (const [k, v] of Object.entries({_JS_SAVED} || {{}})) {{\n"
            "  if (v === undefined) delete process.env[k]; else process.env[k] = String(v);\n"
            "}\n"
            f"delete {_JS_SAVED};\n"
            "void 0;")


# ---- Deno (its own kernel, behind era_kernel/kernels/ipc_bridge.py) ------------------------
def _deno_startup(workspace: str, env: dict[str, str], startup: str | None) -> list[str]:
    cells = [f"Deno.chdir({json.dumps(workspace)});\n"
             f"for (const [k, v] of Object.entries({json.dumps(env)})) Deno.env.set(k, v);\n"
             # Deno.exit (and node:process's exit, which calls it) ends the cell, not the
             # kernel, as sys.exit does in IPython: the session keeps its state and output.
             "Deno.exit = (code) => {\n"
             "  const exit = new Error(String(code ?? 0));\n"
             '  exit.name = "SystemExit";\n'
             "  throw exit;\n"
             "};"]
    return cells + ([startup] if startup else [])


def _deno_env_apply(env: dict[str, str]) -> str:
    return (f"{_JS_SAVED} = Object.fromEntries({json.dumps(sorted(env))}.map((k) => [k, Deno.env.get(k)]));\n"
            f"for (const [k, v] of Object.entries({json.dumps(env)})) Deno.env.set(k, v);")


def _deno_env_restore(env: dict[str, str]) -> str:
    return (f"for (const [k, v] of Object.entries({_JS_SAVED} ?? {{}})) {{\n"
            "  if (v === undefined) Deno.env.delete(k); else Deno.env.set(k, v);\n"
            "}\n"
            f"delete {_JS_SAVED};")


# ---- Bash (era_kernel/kernels/bash_kernel.py) -----------------------------------------------


def _sh_quote(value: str) -> str:
    """Single-quoted: bash expands nothing inside. (JSON is not bash syntax.)"""
    return "'" + value.replace("'", "'\\''") + "'"


def _sh_names(env: dict[str, str]) -> list[str]:
    names = sorted(env)
    bad = [n for n in names if not ENV_NAME_RE.fullmatch(n)]
    if bad:  # the API validates names; this guards the splice below all the same
        raise BadRequest(f"invalid environment variable name {bad[0][:40]!r}", field="env")
    return names


def _sh_exports(env: dict[str, str]) -> str:
    return "export " + " ".join(f"{name}={_sh_quote(env[name])}" for name in _sh_names(env))


def _bash_startup(workspace: str, env: dict[str, str], startup: str | None) -> list[str]:
    cells = [f"cd {_sh_quote(workspace)}" + (f"\n{_sh_exports(env)}" if env else "")]
    return cells + ([startup] if startup else [])


def _bash_env_apply(env: dict[str, str]) -> str:
    # `declare -p` prints the old definitions (nothing for unset names) for restore to eval.
    return f"__era_saved_env=$(declare -p {' '.join(_sh_names(env))} 2>/dev/null)\n{_sh_exports(env)}"


def _bash_env_restore(env: dict[str, str]) -> str:
    return f"unset {' '.join(_sh_names(env))}\neval \"$__era_saved_env\"\nunset __era_saved_env"


# ---- Go (era_kernel/kernels/go_kernel.py) ----------------------------------------------------
# Go programs cannot change the kernel's state, so these cells are the kernel's own
# directives (%cd, %env, %env_push, %env_pop), with JSON arguments.
def _go_startup(workspace: str, env: dict[str, str], startup: str | None) -> list[str]:
    cells = [f"%cd {json.dumps(workspace)}\n%env {json.dumps(env)}"]
    return cells + ([startup] if startup else [])


def _go_env_apply(env: dict[str, str]) -> str:
    return f"%env_push {json.dumps(env)}"


def _go_env_restore(env: dict[str, str]) -> str:
    return "%env_pop"


@dataclass(frozen=True)
class Language:
    name: str
    kernel: str  # kernelspec name stem: era-<kernel>-local / era-<kernel>
    startup_cells: Callable[[str, dict[str, str], str | None], list[str]]
    env_apply: Callable[[dict[str, str]], str] | None
    env_restore: Callable[[dict[str, str]], str] | None
    exit_code: Callable[[str, str], int | None]

    def kernelspec_name(self, provisioner: str) -> str:
        return f"era-{self.kernel}" if provisioner == "docker" else f"era-{self.kernel}-local"


# Every ERA kernel reports an exit as an error named SystemExit whose value is the
# status, as IPython does for sys.exit(n): one mapping serves all of them.
LANGUAGES: dict[str, Language] = {
    "python": Language("python", "python", _py_startup, _py_env_apply, _py_env_restore, _py_exit_code),
    "node": Language("node", "node", _node_startup, _node_env_apply, _node_env_restore, _py_exit_code),
    "typescript": Language("typescript", "typescript", _node_startup, _node_env_apply, _node_env_restore,
                           _py_exit_code),
    "deno": Language("deno", "deno", _deno_startup, _deno_env_apply, _deno_env_restore, _py_exit_code),
    "bash": Language("bash", "bash", _bash_startup, _bash_env_apply, _bash_env_restore, _py_exit_code),
    "go": Language("go", "go", _go_startup, _go_env_apply, _go_env_restore, _py_exit_code),
}


PROVISIONERS = ("local", "docker")
# Every kernelspec of ours -> (language, provisioner): era-python -> (python, docker).
KERNEL_KINDS: dict[str, tuple[str, str]] = {lang.kernelspec_name(prov): (name, prov)
                                            for name, lang in LANGUAGES.items() for prov in PROVISIONERS}
# Kernelspecs of Docker kernels under gVisor (their provisioner config says
# "isolation": "gvisor") -> language. Kept apart from KERNEL_KINDS, whose inverse must
# stay one name per (language, provisioner).
GVISOR_KERNELSPECS: dict[str, str] = {"era-python-gvisor": "python"}


def kernel_kind(kernelspec_name: str) -> tuple[str, str]:
    """``era-node-local`` -> ``("node", "local")``: the inverse of ``kernelspec_name``
    (a name that is not ours: itself and an empty provisioner)."""
    if kernelspec_name in GVISOR_KERNELSPECS:
        return GVISOR_KERNELSPECS[kernelspec_name], "docker"
    return KERNEL_KINDS.get(kernelspec_name, (kernelspec_name, ""))


def get_language(name: str) -> Language:
    try:
        return LANGUAGES[name]
    except KeyError:
        raise BadRequest(f"language {name!r} is not available on this server yet "
                         f"(available: {', '.join(LANGUAGES)})", field="language") from None


# ---- ipykernel tuning for ERA's Python kernels (latency of every run) -------------------
# Appended to the argv of the era-python* kernelspecs by kernelspecs.py, so both
# provisioners get them without an image rebuild (the Docker provisioner passes the
# kernelspec argv as the container's command). Measured on ipykernel 7.4, print('x'):
# - hist_file=:memory: history in an in-memory SQLite database, not a file written by a
#   thread after every cell (~0.7 ms/run). In, Out, _, _i and %history (-l too) work as
#   before; only history from earlier kernels is gone (each kernel's home is fresh anyway).
# - _execute_sleep=0: ipykernel sleeps 0.5 ms before every execute_reply (a "FIXME" from
#   before its stream flush waited for the IOPub thread; it does now).
# (A patch to ipykernel's OutStream.flush would save ~0.7 ms more, but it reaches into
# ipykernel's thread internals: not worth a risk to output order. Left for upstream.)
PYTHON_KERNEL_TUNING: tuple[str, ...] = (
    "--HistoryManager.hist_file=:memory:",
    "--IPythonKernel._execute_sleep=0",
)


# ---- protocol fixes for ERA's Python kernels -------------------------------------------------
# Run by ipykernel before any other cell and kept out of the history (exec_lines), so no
# image rebuild is needed (the argv carries them, see kernelspecs.py):
# - A history_request for a range of the current session by its number (what a client
#   gets from a "tail" request) came back labelled session 0, IPython's alias for "this
#   session", so the client could not match the lines to what it asked for (Jupyter's
#   conformance suite, jupyter_kernel_test, checks it): they carry the number asked now.
# - An exception without a message (`raise ValueError()`) had an empty evalue, and a
#   failed run must always say something: its evalue (in the error message and in the
#   reply, which ipykernel builds apart) is the exception's name. Not for
#   SystemExit, whose evalue is the exit status ("" is 0, see _py_exit_code).
PYTHON_FIXES_CELL = (
    "def _era_fixes(shell):\n"
    "    kernel = shell.kernel\n"
    "    do_history = kernel.do_history\n"
    "    def do_history_labelled(hist_access_type, output, raw, session=0, start=0, stop=None, n=None,\n"
    "                            pattern=None, unique=False):\n"
    "        reply = do_history(hist_access_type, output, raw, session, start, stop, n, pattern, unique)\n"
    "        if hist_access_type == 'range' and session and session > 0:\n"
    "            reply['history'] = [(session if s == 0 else s, line, entry) for s, line, entry in reply['history']]\n"
    "        return reply\n"
    "    kernel.do_history = do_history_labelled\n"
    "    showtraceback = shell._showtraceback\n"
    "    def showtraceback_named(etype, evalue, stb):\n"
    "        if not str(evalue) and etype is not None and not issubclass(etype, SystemExit):\n"
    "            evalue = etype.__name__\n"
    "        return showtraceback(etype, evalue, stb)\n"
    "    shell._showtraceback = showtraceback_named\n"
    "    do_execute = kernel.do_execute\n"
    "    async def do_execute_named(*args, **kwargs):\n"
    "        reply = do_execute(*args, **kwargs)\n"
    "        reply = await reply if hasattr(reply, '__await__') else reply\n"
    "        if reply.get('status') == 'error' and not reply.get('evalue') and reply.get('ename') != 'SystemExit':\n"
    "            reply['evalue'] = reply.get('ename') or 'Error'\n"
    "        return reply\n"
    "    kernel.do_execute = do_execute_named\n"
    "_era_fixes(get_ipython())\n"
    "del _era_fixes"
)
PYTHON_KERNEL_FIXES: tuple[str, ...] = (f"--IPKernelApp.exec_lines={PYTHON_FIXES_CELL}",)


def python_kernel_argv() -> list[str]:
    """argv of the local Python kernel: this interpreter's ipykernel, tuned as ERA runs it
    (the benchmarks launch their raw baseline with it too)."""
    return [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}", *PYTHON_KERNEL_TUNING]
