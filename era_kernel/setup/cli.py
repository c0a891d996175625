"""``era setup``: build (or warm) an environment from the command line with live progress,
and ``era setup --list`` the environments this host has.

Wiring, in ``era_kernel.cli.build_parser``::

    from .setup.cli import add_setup_parser
    add_setup_parser(sub)

The environment is the one a session with the same language, provisioner and packages
would get, so running this ahead of time makes those sessions' setup instant. Commands
(``-c``) are each session's own, so here they only run in a scratch sandbox, to try them.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from typing import Any

NOBODY = 65534  # as root, the setup runs as an unprivileged uid (sessions use their own)


def add_setup_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "setup", help="build or warm a package environment (pip, npm, go, commands) with live logs",
        description="Run a session setup outside any session. Sessions created later with the same language, "
                    "provisioner and packages reuse the environment at once.")
    parser.add_argument("--language", "-l", default="python")
    parser.add_argument("--provisioner", choices=["local", "docker"], default=None,
                        help="default ERA_PROVISIONER")
    parser.add_argument("--pip", action="append", default=[], metavar="REQ", help="a pip requirement (repeatable)")
    parser.add_argument("--npm", action="append", default=[], metavar="PKG", help="an npm package (repeatable)")
    parser.add_argument("--go", action="append", default=[], metavar="MOD", help="a Go module (repeatable)")
    parser.add_argument("--command", "-c", action="append", default=[], dest="commands", metavar="CMD",
                        help="a shell command run after the packages (repeatable, in order), in a scratch "
                             "sandbox thrown away afterwards: commands are each session's own, not part of the "
                             "environment; this tries them")
    parser.add_argument("--json", action="store_true", help="print the setup result as JSON")
    parser.add_argument("--quiet", "-q", action="store_true", help="no live log, only the outcome")
    parser.add_argument("--list", action="store_true", help="list the environments on this host and exit")
    parser.set_defaults(func=setup_main)
    return parser


def setup_main(args: argparse.Namespace) -> int:
    import asyncio

    from ..config import Settings
    from ..errors import EraError

    settings = Settings.from_env()
    if args.list:
        return _list(settings)
    try:
        return asyncio.run(_run(args, settings))
    except EraError as exc:
        print(f"era setup: {exc.message}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace, settings) -> int:
    import asyncio

    from ..workspaces import WorkspaceStore
    from .manager import SetupManager

    store = WorkspaceStore.from_url(settings["ERA_WORKSPACE_URL"], settings["ERA_WORKSPACE_OPTIONS"])
    setups = SetupManager(settings, store)
    spec = setups.normalize({"pip": args.pip, "npm": args.npm, "go": args.go, "commands": args.commands})
    if spec is None:
        print("era setup: nothing to do (give --pip, --npm, --go or --command)", file=sys.stderr)
        return 2
    provisioner = args.provisioner or settings["ERA_PROVISIONER"]
    uid = NOBODY if os.getuid() == 0 else os.getuid()
    started = time.monotonic()
    outcome: dict[str, Any] = {}

    def show(line: str) -> None:
        if not args.quiet:
            stamp = f"{time.monotonic() - started:6.1f}s"
            print(f"{stamp}  {line}", file=sys.stderr, flush=True)

    def status(state: str, result: dict | None) -> None:
        if result is not None:
            outcome.update(status=state, result=result)

    scratch = settings.data_dir / "scratch" / f"cli-{os.getpid()}-{secrets.token_hex(4)}"
    sandbox = None
    if spec.get("commands"):
        sandbox = await _scratch_sandbox(settings, provisioner, args.language, scratch, uid)
    try:
        await setups.start("cli", args.language, provisioner, uid, spec, show, status, sandbox)
        await setups.wait("cli")
    finally:
        await setups.shutdown()
        if sandbox is not None:
            await asyncio.to_thread(_remove_scratch, scratch)
    result = outcome.get("result") or {}
    if args.json:
        print(json.dumps({"setup_status": outcome.get("status"), "setup_result": result}, indent=2))
    elif outcome.get("status") == "completed":
        ran = f"; {len(result.get('commands_run') or [])} command(s) ran in a scratch sandbox" if sandbox else ""
        env = f"environment {result['env']} ({result['source']})" if result.get("env") else "no package environment"
        print(f"completed in {result['duration']}: {env}{ran}")
    else:
        print(f"era setup: {result.get('error') or 'setup did not finish'}", file=sys.stderr)
    return 0 if outcome.get("status") == "completed" else 1


async def _scratch_sandbox(settings, provisioner: str, language: str, scratch, uid: int):
    """A throwaway workspace and /tmp for trying commands, owned by ``uid``."""
    import asyncio

    from ..workspaces import Workspace
    from .session import CommandSandbox

    await Workspace(scratch / "ws").create(uid=uid if os.getuid() == 0 else None)

    def make_tmp() -> None:
        (scratch / "tmp").mkdir(mode=0o700)
        os.chmod(scratch / "tmp", 0o1777)

    await asyncio.to_thread(make_tmp)
    return CommandSandbox(settings, provisioner, language, scratch / "ws", scratch / "tmp", uid)


def _remove_scratch(scratch) -> None:
    from ..workspaces import fdtree

    fdtree.remove_tree(scratch)


def _list(settings) -> int:
    from .cache import STAGING

    root = settings.data_dir / "envs"
    rows = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        manifest_path = entry / ".era-env.json"
        if entry.name == STAGING or not manifest_path.is_file():
            continue
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError:
            continue
        spec = manifest.get("spec") or {}
        what = "; ".join(f"{k}: {' '.join(v)}" for k, v in spec.items() if v and isinstance(v, list))
        rows.append((entry.name, manifest.get("bytes", 0), manifest.get("runtime", "?"), what))
    print(f"{'ENVIRONMENT':<34} {'SIZE':>9}  {'RUNTIME':<28} SPEC")
    for key, size, runtime, what in rows:
        print(f"{key:<34} {size / 1024**2:>6.1f} MiB  {runtime[:28]:<28} {what}")
    return 0
