"""The ``era`` command: run, serve, mcp, doctor, kernelspecs, images, setup, keys.

Imports stay inside the subcommands: ``era serve`` must bind its port within 100 ms,
before jupyter_client and the store are imported.
"""

from __future__ import annotations

import sys


def _cmd_run(args) -> int:
    import asyncio

    from .config import Settings
    from .errors import EraError
    from .engine import SessionManager

    code = sys.stdin.read() if args.code == "-" else args.code

    def show(event: dict) -> None:
        if event["type"] == "stdout":
            sys.stdout.write(event["content"])
            sys.stdout.flush()
        elif event["type"] == "stderr":
            sys.stderr.write(event["content"])
            sys.stderr.flush()
        elif event["type"] == "display" and "text/plain" in event.get("data", {}):
            print(event["data"]["text/plain"])

    async def main() -> int:
        engine = SessionManager(Settings.from_env())
        # Not a server: no recovery, pool or culler, so a server on the same data
        # directory keeps its kernels, pool and directories.
        await engine.start(serve=False)
        try:
            body = {"code": code, "language": args.language}
            if args.timeout:
                body["timeout"] = args.timeout
            if args.provisioner:
                body["provisioner"] = args.provisioner
            result = await engine.execute(body, on_event=show)
        except EraError as exc:
            print(f"era: {exc.message}", file=sys.stderr)
            return 2
        finally:
            await engine.shutdown()
        if result["error"] and result["error"]["ename"] != "SystemExit":
            err = result["error"]
            tb = "\n".join(err.get("traceback") or []) or f"{err['ename']}: {err['evalue']}"
            print(tb, file=sys.stderr)
        if args.json:
            import json

            print(json.dumps(result, indent=2))
        return int(result["exit_code"])

    return asyncio.run(main())


def _cmd_kernelspecs(args) -> int:
    from .kernelspecs import install

    prefix = sys.prefix if args.sys_prefix else args.prefix
    for path in install(user=args.user, prefix=prefix):
        print(f"installed {path}")
    return 0


def _cmd_doctor(args) -> int:
    from .doctor import run_checks

    ok = True
    for name, status, detail in run_checks():
        ok = ok and status != "FAIL"
        print(f"{status:5} {name}: {detail}")
    return 0 if ok else 1


def _cmd_serve(args) -> int:
    from era_server import main as serve_main

    argv = []
    if args.host is not None:
        argv += ["--host", args.host]
    if args.port is not None:
        argv += ["--port", str(args.port)]
    return serve_main(argv) or 0


def _cmd_mcp(args) -> int:
    import os

    import anyio

    from .mcp.server import serve_stdio, serve_stdio_embedded

    if args.embedded:
        anyio.run(serve_stdio_embedded)
        return 0
    url = args.url or os.environ.get("ERA_URL") or "http://127.0.0.1:8787"
    anyio.run(serve_stdio, url, os.environ.get("ERA_API_KEY") or None)
    return 0


def build_parser(with_images: bool = True):
    import argparse

    parser = argparse.ArgumentParser(prog="era", description="ERA Kernel: code execution in sandboxed Jupyter kernels")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run code once in a fresh sandboxed kernel")
    run.add_argument("code", help="the code, or - to read it from stdin")
    run.add_argument("--language", "-l", default="python")
    run.add_argument("--timeout", type=float, default=None)
    run.add_argument("--provisioner", choices=["local", "docker"], default=None)
    run.add_argument("--json", action="store_true", help="also print the full run result as JSON")
    run.set_defaults(func=_cmd_run)

    serve = sub.add_parser("serve", help="start the HTTP server")
    serve.add_argument("--host", default=None, help="default ERA_HOST or 127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help="default ERA_PORT or 8787")
    serve.set_defaults(func=_cmd_serve)

    ks = sub.add_parser("kernelspecs", help="manage ERA's Jupyter kernelspecs")
    ks_sub = ks.add_subparsers(dest="action", required=True)
    install = ks_sub.add_parser("install", help="install them where Jupyter finds them")
    where = install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true")
    where.add_argument("--sys-prefix", action="store_true")
    where.add_argument("--prefix", default=None)
    install.set_defaults(func=_cmd_kernelspecs)

    mcp = sub.add_parser("mcp", help="an MCP server on stdio (for desktop agents and IDEs)")
    where_mcp = mcp.add_mutually_exclusive_group()
    where_mcp.add_argument("--url", default=None, help="the ERA server to use (default ERA_URL or "
                                                      "http://127.0.0.1:8787; its key from ERA_API_KEY)")
    where_mcp.add_argument("--embedded", action="store_true", help="start a private server for this MCP session")
    mcp.set_defaults(func=_cmd_mcp)

    doctor = sub.add_parser("doctor", help="check what this machine can do")
    doctor.set_defaults(func=_cmd_doctor)

    if with_images:  # imports the Docker SDK: not on `era serve`'s path to listening
        from .images.cli import add_images_parser

        add_images_parser(sub)
    from .setup.cli import add_setup_parser

    add_setup_parser(sub)
    from .keys_cli import add_keys_parser

    add_keys_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"] and not {"-h", "--help"} & set(argv):
        # Fast path to a listening socket: era_server parses --host/--port itself with
        # the standard library only (argparse and the Docker SDK cost tens of ms).
        from era_server import main as serve_main

        return serve_main(argv[1:]) or 0
    # Only `era images` needs the Docker SDK, which costs a second to import.
    args = build_parser(with_images=argv[:1] == ["images"] or not argv or argv[0].startswith("-")).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
