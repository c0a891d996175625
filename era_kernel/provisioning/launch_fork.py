"""The fork launcher of ``era-local`` (``ERA_LOCAL_LAUNCHER=fork``): which launches it
takes, and the request the zygote's child turns into a sandboxed kernel (``zygote.py``,
``forked.py``). Everything else of a launch (the IPC directory, the cgroup, the output
tail, the seal, clean-up) is the provisioner's, as for a bubblewrap launch.

It takes a launch only when the result is the kernel bubblewrap would have started:
- the server is root (the child builds its namespaces and mounts itself, then drops to
  the session's uid);
- the kernelspec's argv is ``<this interpreter> -m ipykernel_launcher ...``: the zygote
  is this interpreter with that ipykernel imported;
- the session's environment sets no ``PYTHON*`` variable that changes what an
  interpreter imports at start (``PYTHONPATH`` of a setup environment could bring its
  own ipykernel or IPython, which the zygote has already imported): those launches use
  bubblewrap.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .base import LaunchOptions

# Read at interpreter start, so they would be ignored after a fork; the rest are harmless.
_START_ONLY = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "PYTHONNOUSERSITE", "PYTHONUSERBASE",
               "PYTHONHASHSEED", "PYTHONMALLOC", "PYTHONDEVMODE", "PYTHONWARNINGS", "PYTHONOPTIMIZE", "PYTHONINSPECT",
               "PYTHONPLATLIBDIR", "PYTHONEXECUTABLE", "PYTHONSETUPTOOLS", "PYTHONTRACEMALLOC", "PYTHONPYCACHEPREFIX",
               "PYTHONUTF8", "PYTHONIOENCODING", "PYTHONDONTWRITEBYTECODE", "PYTHONVERBOSE", "PYTHONDEBUG",
               "PYTHONCASEOK", "PYTHONINTMAXSTRDIGITS", "PYTHONFAULTHANDLER", "PYTHONPROFILEIMPORTTIME",
               "PYTHONASYNCIODEBUG", "PYTHONBREAKPOINT", "PYTHONLEGACYWINDOWSSTDIO", "PYTHONCOERCECLOCALE",
               "PYTHONNODEBUGRANGES", "PYTHONPERFSUPPORT", "LD_PRELOAD", "LD_LIBRARY_PATH", "MALLOC_ARENA_MAX")


def why_not(options: LaunchOptions, argv: list[str]) -> str | None:
    """None when the fork launcher takes this launch, else why it does not (logged)."""
    if options.launcher != "fork":
        return "ERA_LOCAL_LAUNCHER is not fork"
    if os.getuid() != 0:
        return "the server is not root"
    if options.sandbox == "none":
        return "ERA_SANDBOX=none"
    if len(argv) < 3 or argv[1:3] != ["-m", "ipykernel_launcher"] or not _same_python(argv[0]):
        return "not this interpreter's ipykernel"
    if any(key in options.env for key in _START_ONLY if not (key == "PYTHONPATH" and _sdk_only(options.env.get(key, "")))):
        return "the session's environment changes the interpreter's start"
    return None


def _sdk_only(pythonpath: str) -> bool:
    """``PYTHONPATH`` holds nothing but our SDK directory (``era_storage``, which every
    kernel gets, engine/launcher.py): plain modules, no ipykernel or IPython of their
    own, so the forked child adds them to ``sys.path`` itself (forked.py)."""
    from ..sdk import PYTHON_DIR

    return all(os.path.realpath(p) == os.path.realpath(PYTHON_DIR) for p in pythonpath.split(":") if p)


def _same_python(path: str) -> bool:
    try:
        return os.path.samefile(path, sys.executable) or os.path.realpath(path) == os.path.realpath(sys.executable)
    except OSError:
        return False


PLACEHOLDER_SIZE = 1024**2


def request(options: LaunchOptions, argv: list[str], *, env: dict[str, str], uid: int, gid: int, workspace: Path,
            kernel_dir: Path, hidden: list[str], readonly: list[str], cgroup_dirs: list[str],
            address_space: int) -> dict[str, Any]:
    """What ``forked.become_kernel`` needs: bwrap_argv's filesystem plan, as data."""
    masks = []
    for path in [p for p in ["/tmp", "/root", "/home", "/run", *hidden] if os.path.isdir(p)]:
        if path == "/tmp":
            masks.append((path, 0o1777, options.tmp_size))
        else:
            masks.append((path, 0o755, PLACEHOLDER_SIZE))
    return {
        "argv": argv[3:], "cmdline": argv, "env": env, "cwd": str(workspace), "uid": uid, "gid": gid,
        "cgroups": cgroup_dirs, "rlimit_as": address_space, "rlimit_nproc": options.pids,
        "allow_network": options.allow_network, "masks": masks, "dev_size": options.tmp_size,
        "tmp_dir": str(options.tmp_dir) if options.tmp_dir is not None else None,
        "readonly": readonly, "writable": [str(kernel_dir), str(workspace)],
    }
