"""Node, TypeScript and Deno sessions behave as those runtimes do, and every failed run
says why, on both provisioners (issue 16: ERA drop-in, items 9 and 10).

- `node` runs JavaScript as Node runs it: no type checker refuses valid code, and an
  ES-module-only package from `setup.npm` loads by `require` (Node 20.19+ can require an
  ES module) and by `import`.
- `typescript` transpiles without type-checking (as ERA's tsx does), unless its kernel is
  started with ERA_TYPECHECK=1.
- `deno` with an `npm:` import and no network fails with a message that says what it
  could not download and how to allow network.
- A run that fails inside any kernel has a non-empty error name and message.

npm packages come from the real registry, in the setup step only (as in
tests/test_setup_languages.py); only the Deno-with-network test lets a kernel itself
reach the registry, on the local provisioner (the test Docker engine has no egress
network).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from jupyter_client import AsyncKernelManager

from era_kernel.kernelspecs import EraKernelSpecManager

from .conftest import both_provisioners, short_tmpdir
from .test_languages import go, require_language

CHALK = "chalk@5.6.2"  # ES modules only ("type": "module", no CommonJS build)


async def create(engine, language: str, **body) -> str:
    if language != "python":  # python is the engine's own: always there
        require_language(engine.settings["ERA_PROVISIONER"], language)
    doc = await engine.create({"language": language, **body})
    return doc["id"]


async def setup_done(engine, sid: str) -> None:
    """A session's setup runs in the background; its first run waits for it."""
    final = await engine.get(sid)
    assert final["setup_status"] == "completed", final["setup_result"]


def results(run: dict) -> list[str]:
    return [o["data"]["text/plain"] for o in run["outputs"] if o["output_type"] == "execute_result"]


@both_provisioners
async def test_node_runs_javascript_as_node_does(engine):
    sid = await create(engine, "node", setup={"npm": [CHALK]})
    # What `node` itself prints: require() of an ES module gives its namespace, whose
    # `default` is chalk; before, TypeScript refused the cell ("Property 'blue' does not exist").
    r = await engine.run(sid, {"code": 'const chalk = require("chalk");\n'
                                       "console.log(typeof chalk.blue, typeof chalk.default.blue)", "timeout": 240})
    await setup_done(engine, sid)
    assert (r["exit_code"], r["error"], r["stdout"]) == (0, None, "undefined function\n"), r
    r = await engine.run(sid, {"code": 'import c from "chalk";\nconsole.log(typeof c.blue, c.blue("x"))'})
    assert (r["exit_code"], r["stdout"]) == (0, "function x\n"), r
    r = await engine.run(sid, {"code": 'const { Chalk } = await import("chalk");\nnew Chalk({ level: 0 }).red("y")'})
    assert (r["exit_code"], results(r)) == (0, ["'y'"]), r
    # Valid JavaScript that a type checker would refuse runs.
    r = await engine.run(sid, {"code": "let v = 1;\nv = 'one';\nconst o = {};\no.added = v;\nconsole.log(o.added)"})
    assert (r["exit_code"], r["stdout"]) == (0, "one\n"), r
    # A cell's last value is a result, as in Node's REPL; stdout stays the program's.
    r = await engine.run(sid, {"code": "6 * 7"})
    assert (r["exit_code"], r["stdout"], results(r)) == (0, "", ["42"]), r


@both_provisioners
async def test_typescript_runs_without_type_checking(engine):
    sid = await create(engine, "typescript", setup={"npm": [CHALK]})
    r = await engine.run(sid, {"code": 'const n: number = "not a number";\nconsole.log(typeof n)', "timeout": 240})
    await setup_done(engine, sid)
    assert (r["exit_code"], r["error"], r["stdout"]) == (0, None, "string\n"), r
    r = await engine.run(sid, {"code": 'import chalk from "chalk";\nconst s: string = chalk.blue("x");\n'
                                       'console.log(s, typeof require("chalk").default.blue)'})
    assert (r["exit_code"], r["stdout"]) == (0, "x function\n"), r
    # Syntax errors still refuse a cell, with a message.
    r = await engine.run(sid, {"code": "let broken = ;"})
    assert r["exit_code"] == 1 and r["error"]["ename"] == "SyntaxError", r
    assert "Expression expected" in r["error"]["evalue"], r


@pytest.mark.parametrize("provisioner", ["local", "docker"])
async def test_typescript_checks_types_with_era_typecheck(provisioner, tmp_path):
    """The kernel side of a session's "typecheck": ERA_TYPECHECK=1 in its environment at start."""
    require_language(provisioner, "typescript")
    code = 'const n: number = "not a number";\nconsole.log(typeof n)'
    checked = await run_in_kernel(provisioner, "typescript", {"ERA_TYPECHECK": "1"}, code, tmp_path)
    assert checked["reply"]["status"] == "error", checked
    assert checked["reply"]["ename"] == "CompileError", checked
    assert "not assignable to type 'number'" in checked["reply"]["evalue"], checked
    assert checked["stdout"] == "", "a refused cell does not run"
    # A JavaScript kernel never type-checks, whatever the environment says.
    js = await run_in_kernel(provisioner, "node", {"ERA_TYPECHECK": "1"},
                             "const o = {};\no.x = 1;\nconsole.log(o.x)", tmp_path)
    assert (js["reply"]["status"], js["stdout"]) == ("ok", "1\n"), js


async def run_in_kernel(provisioner: str, language: str, env: dict[str, str], code: str, tmp_path: Path) -> dict:
    """One cell on a kernel started from our kernelspec with ``env`` in its environment."""
    name = f"era-{language}" if provisioner == "docker" else f"era-{language}-local"
    workspace = tmp_path / f"ws-{language}"
    workspace.mkdir()
    workspace.chmod(0o777)
    runtime = short_tmpdir("erk")
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=EraKernelSpecManager())
    await km.start_kernel(cwd=str(workspace), era={"env": env, "runtime_dir": str(runtime)})
    kc = km.client()
    kc.start_channels()
    stdout: list[str] = []
    try:
        await kc.wait_for_ready(timeout=120)

        def hook(msg: dict) -> None:
            if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
                stdout.append(msg["content"]["text"])

        reply = await kc.execute_interactive(code, output_hook=hook, timeout=120, stop_on_error=False)
        return {"reply": reply["content"], "stdout": "".join(stdout)}
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
        shutil.rmtree(runtime, ignore_errors=True)


@both_provisioners
async def test_deno_npm_without_network_says_how_to_allow_it(engine):
    sid = await create(engine, "deno")
    r = await engine.run(sid, {"code": 'import leftPad from "npm:left-pad@1.3.0";\nconsole.log(leftPad("x", 3))',
                               "timeout": 60})
    assert r["exit_code"] == 1, r
    message = r["error"]["evalue"]
    assert "registry.npmjs.org/left-pad" in message and '"allowInternetAccess": true' in message, r
    assert r["error"]["traceback"], r


@pytest.mark.parametrize("era_settings", ["local"], indirect=True)
async def test_deno_npm_with_network_works(engine):
    sid = await create(engine, "deno", allowInternetAccess=True)
    r = await engine.run(sid, {"code": 'import leftPad from "npm:left-pad@1.3.0";\nconsole.log(leftPad("x", 3, "-"))',
                               "timeout": 120})
    assert (r["exit_code"], r["stdout"]) == (0, "--x\n"), r


# Runs that fail inside the kernel, each language's usual ways.
FAILURES = {
    "python": ["raise ValueError()", "1/0", "import no_such_module_era", "def broken(:"],
    "node": ["throw new Error()", "throw undefined", 'require("no-such-module-era")', "let broken = ;",
             'await Promise.reject(new Error(""))'],
    "typescript": ["throw new Error()", 'const s: string = undefined as any; s.length', "let broken = ;"],
    "deno": ["throw new Error()", "throw undefined", 'import x from "./no-such-module.ts"',
             'import leftPad from "npm:left-pad@1.3.0"'],
    "bash": ["false", "no_such_command_era", "exit 4"],
    "go": [go("\tx := 1", imports=()), go('\tpanic("")', imports=()), go("\tos.Exit(2)", imports=("os",))],
}


@both_provisioners
async def test_every_failed_run_says_why(engine):
    async def fail_in(language: str, snippets: list[str]) -> None:
        sid = await create(engine, language)
        for code in snippets:
            r = await engine.run(sid, {"code": code, "timeout": 60})
            assert r["exit_code"] != 0, (language, code, r)
            error = r["error"] or {}
            assert error.get("ename") and error.get("evalue", "").strip(), (language, code, json.dumps(r)[:2000])
        await engine.delete(sid)

    # One session per language, side by side (each language's runs stay in order in its
    # own session): the kernels' starts and compiles overlap instead of adding up.
    await asyncio.gather(*(fail_in(language, snippets) for language, snippets in FAILURES.items()))
