"""Languages: which kernel runs them and the startup cells that make a kernel a session.

A language contributes code snippets, never engine logic: the cell that sets the working
directory and environment at kernel start, the cells that apply and then undo a run's
own ``env``, and how an error reply maps to an exit code (``sys.exit(n)`` -> n).
Values are embedded as JSON literals, which are valid Python, JavaScript and Go
expressions, so nothing from a request is ever spliced into code unquoted.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Callable

from .errors import BadRequest


def _py_startup(workspace: str, env: dict[str, str], startup: str | None) -> list[str]:
    cells = [
        "import os as _era_os, warnings as _era_warnings\n"
        f"_era_os.chdir({json.dumps(workspace)})\n"
        f"_era_os.environ.update({json.dumps(env)})\n"
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
        f"_era_saved_env = {{k: _era_os.environ.get(k) for k in {json.dumps(sorted(env))}}}\n"
        f"_era_os.environ.update({json.dumps(env)})"
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


LANGUAGES: dict[str, Language] = {
    "python": Language("python", "python", _py_startup, _py_env_apply, _py_env_restore, _py_exit_code),
}


def get_language(name: str) -> Language:
    try:
        return LANGUAGES[name]
    except KeyError:
        raise BadRequest(f"language {name!r} is not available on this server yet "
                         f"(available: {', '.join(LANGUAGES)})", field="language") from None


def python_kernel_argv() -> list[str]:
    """argv of the local Python kernel: this interpreter's ipykernel."""
    return [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
