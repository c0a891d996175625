"""Node, TypeScript, Deno, Bash and Go sessions end to end, on both provisioners.

One engine per provisioner and one session per language on it, shared by the whole
module (a kernel start costs up to a few seconds; a Go build a fraction of one), so
every behaviour below is checked on a real kernel, locally in bubblewrap and in Docker,
without starting fifty of them. Each test is a table of snippets, one per language.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import pytest_asyncio

from era_kernel.config import Settings
from era_kernel.sessions import SessionManager

from .conftest import short_tmpdir

LANGUAGES = ("node", "typescript", "deno", "bash", "go")
PROVISIONERS = ("local", "docker")

pytestmark = pytest.mark.asyncio(loop_scope="module")


def go(body: str, imports: tuple[str, ...] = ("fmt", "os")) -> str:
    return "package main\n\nimport (\n" + "".join(f'\t"{i}"\n' for i in imports) + ")\n\nfunc main() {\n" + body + "\n}\n"


# What each language prints to stdout and stderr.
STREAMS = {
    "node": 'console.log("out"); console.error("err")',
    "typescript": 'const n: number = 1; console.log("out"); console.error("err")',
    "deno": 'console.log("out"); console.error("err")',
    "bash": "echo out; echo err >&2",
    "go": go('\tfmt.Println("out")\n\tfmt.Fprintln(os.Stderr, "err")'),
}
UNCAUGHT = {
    "node": 'throw new TypeError("boom")',
    "typescript": 'throw new TypeError("boom")',
    "deno": 'throw new TypeError("boom")',
    "bash": "false",
    "go": go('\tvar m map[string]int\n\tm["boom"] = 1', imports=()),
}
EXIT_3 = {
    "node": 'console.log("bye"); process.exit(3)',
    "typescript": 'console.log("bye"); process.exit(3)',
    "deno": 'console.log("bye"); Deno.exit(3)',
    "bash": "echo bye; exit 3; echo never",
    "go": go('\tfmt.Println("bye")\n\tos.Exit(3)'),
}
EXIT_0 = {"node": "process.exit(0)", "typescript": "process.exit()", "deno": "Deno.exit(0)", "bash": "exit 0",
          "go": go("\tos.Exit(0)", imports=("os",))}
PRINT_ENV = {  # prints ERA_SESSION ERA_SESSION_ID ERA_LANGUAGE GREETING ONLY_THIS_RUN, one per line
    "node": 'for (const k of ["ERA_SESSION", "ERA_SESSION_ID", "ERA_LANGUAGE", "GREETING", "ONLY_THIS_RUN"]) '
            'console.log(process.env[k] ?? "-")',
    "typescript": 'for (const k of ["ERA_SESSION", "ERA_SESSION_ID", "ERA_LANGUAGE", "GREETING", "ONLY_THIS_RUN"]) '
                  'console.log(process.env[k] ?? "-")',
    "deno": 'for (const k of ["ERA_SESSION", "ERA_SESSION_ID", "ERA_LANGUAGE", "GREETING", "ONLY_THIS_RUN"]) '
            'console.log(Deno.env.get(k) ?? "-")',
    "bash": 'for k in ERA_SESSION ERA_SESSION_ID ERA_LANGUAGE GREETING ONLY_THIS_RUN; do echo "${!k:--}"; done',
    "go": go('\tfor _, k := range []string{"ERA_SESSION", "ERA_SESSION_ID", "ERA_LANGUAGE", "GREETING", '
             '"ONLY_THIS_RUN"} {\n\t\tv, ok := os.LookupEnv(k)\n\t\tif !ok {\n\t\t\tv = "-"\n\t\t}\n'
             '\t\tfmt.Println(v)\n\t}'),
}
# Reads .session_data.json and the uploaded input.txt, writes the data back with
# count + 1 and a file out.txt.
DATA_AND_FILES = {
    "node": 'const fs = require("fs");\n'
            'const d = JSON.parse(fs.readFileSync(".session_data.json", "utf8"));\n'
            'd.count += 1;\n'
            'fs.writeFileSync(".session_data.json", JSON.stringify(d));\n'
            'fs.writeFileSync("out.txt", fs.readFileSync("input.txt", "utf8").toUpperCase());\n'
            'console.log(process.cwd())',
    "typescript": 'import * as fs from "fs";\n'
                  'const d: { count: number } = JSON.parse(fs.readFileSync(".session_data.json", "utf8"));\n'
                  'd.count += 1;\n'
                  'fs.writeFileSync(".session_data.json", JSON.stringify(d));\n'
                  'fs.writeFileSync("out.txt", fs.readFileSync("input.txt", "utf8").toUpperCase());\n'
                  'console.log(process.cwd())',
    "deno": 'const d = JSON.parse(Deno.readTextFileSync(".session_data.json"));\n'
            'd.count += 1;\n'
            'Deno.writeTextFileSync(".session_data.json", JSON.stringify(d));\n'
            'Deno.writeTextFileSync("out.txt", Deno.readTextFileSync("input.txt").toUpperCase());\n'
            'console.log(Deno.cwd())',
    "bash": 'count=$(sed -E \'s/.*"count": *([0-9]+).*/\\1/\' .session_data.json)\n'
            'printf \'{"count": %d}\' $((count + 1)) > .session_data.json\n'
            "tr a-z A-Z < input.txt > out.txt\n"
            "pwd",
    "go": go('\traw, _ := os.ReadFile(".session_data.json")\n'
             '\tvar d map[string]int\n'
             '\tif err := json.Unmarshal(raw, &d); err != nil {\n\t\tpanic(err)\n\t}\n'
             '\td["count"]++\n'
             '\tout, _ := json.Marshal(d)\n'
             '\tos.WriteFile(".session_data.json", out, 0o644)\n'
             '\tin, _ := os.ReadFile("input.txt")\n'
             '\tos.WriteFile("out.txt", []byte(strings.ToUpper(string(in))), 0o644)\n'
             '\twd, _ := os.Getwd()\n'
             '\tfmt.Println(wd)', imports=("encoding/json", "fmt", "os", "strings")),
}
FOREVER = {
    "node": "while (true) {}",
    "typescript": "while (true) {}",
    "deno": "while (true) {}",
    "bash": "sleep 600",
    "go": go("\tfor {\n\t}", imports=()),
}
STATE = {  # set something in one run ...
    "node": "var kept = 41", "typescript": "var kept: number = 41", "deno": "var kept = 41",
    "bash": "kept=41", "go": '%env {"KEPT": "41"}',
}
STATE_READ = {  # ... and read it in the next: prints 42
    "node": "console.log(kept + 1)", "typescript": "console.log(kept + 1)", "deno": "console.log(kept + 1)",
    "bash": "echo $((kept + 1))",
    "go": go('\tk, _ := strconv.Atoi(os.Getenv("KEPT"))\n\tfmt.Println(k + 1)', imports=("fmt", "os", "strconv")),
}


def require_language(provisioner: str, language: str) -> None:
    """Skip when the runtime or image is missing; fail instead under ERA_REQUIRE_DOCKER=1 (CI)."""
    problem = None
    if provisioner == "docker":
        try:
            from era_kernel.images.build import current_image

            if current_image(language) is None:
                problem = f"the era/{language} image is not built (era images build --language {language})"
        except Exception as exc:
            problem = f"Docker provisioner unavailable: {exc}"
        strict = os.environ.get("ERA_REQUIRE_DOCKER") == "1"
    else:
        needed = {"node": ("node", "tslab"), "typescript": ("node", "tslab"), "deno": ("deno",), "bash": ("bash",),
                  "go": ("go",)}[language]
        missing = [c for c in needed if shutil.which(c) is None]
        if missing:
            problem = f"{', '.join(missing)} not installed (scripts/install-languages.sh)"
        strict = os.environ.get("CI") == "true"
    if problem:
        if strict:
            pytest.fail(problem)
        pytest.skip(problem)


class Sessions:
    """One engine per provisioner, one session per language, made on first use."""

    def __init__(self, tmp_root):
        self.tmp_root = tmp_root
        self.engines: dict[str, SessionManager] = {}
        self.ids: dict[tuple[str, str], str] = {}
        self.runtime_dirs: list = []

    async def engine(self, provisioner: str) -> SessionManager:
        if provisioner not in self.engines:
            runtime = short_tmpdir("erl")
            self.runtime_dirs.append(runtime)
            settings = Settings.from_env({}, data_dir=str(self.tmp_root / f"data-{provisioner}"),
                                         runtime_dir=str(runtime), provisioner=provisioner, pool_size=2)
            manager = SessionManager(settings)
            await manager.start()
            self.engines[provisioner] = manager
        return self.engines[provisioner]

    async def session(self, provisioner: str, language: str) -> tuple[SessionManager, str]:
        require_language(provisioner, language)
        engine = await self.engine(provisioner)
        key = (provisioner, language)
        if key not in self.ids:
            doc = await engine.create({"id": f"lang-{language}", "language": language, "data": {"count": 41},
                                       "env": {"GREETING": "hi 'there' $(nothing) \U0001F600"}})
            self.ids[key] = doc["id"]
        return engine, self.ids[key]

    async def close(self) -> None:
        for engine in self.engines.values():
            await engine.shutdown()
        for path in self.runtime_dirs:
            shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sessions(tmp_path_factory):
    shared = Sessions(tmp_path_factory.mktemp("languages"))
    yield shared
    await shared.close()


def cases(*languages: str):
    """Every (provisioner, language) pair, provisioner-major so one engine's kernels run together."""
    return pytest.mark.parametrize("provisioner, language",
                                   [(p, lang) for p in PROVISIONERS for lang in (languages or LANGUAGES)])


async def run(sessions: Sessions, provisioner: str, language: str, code: str, **extra):
    engine, sid = await sessions.session(provisioner, language)
    return await engine.run(sid, {"code": code, **extra})


@cases()
async def test_stdout_and_stderr_stream_apart(sessions, provisioner, language):
    engine, sid = await sessions.session(provisioner, language)
    events = []
    result = await engine.run(sid, {"code": STREAMS[language]}, on_event=events.append)
    assert (result["exit_code"], result["error"]) == (0, None), result
    assert result["stdout"] == "out\n" and result["stderr"] == "err\n", result
    streamed = [(e["type"], e["content"]) for e in events if e["type"] in ("stdout", "stderr")]
    # Two pipes read by two threads (bash, go) keep each stream's order, not their interleaving.
    assert sorted(streamed) == [("stderr", "err\n"), ("stdout", "out\n")]


@cases()
async def test_state_persists_between_runs(sessions, provisioner, language):
    assert (await run(sessions, provisioner, language, STATE[language]))["exit_code"] == 0
    result = await run(sessions, provisioner, language, STATE_READ[language])
    assert result["stdout"] == "42\n", result


@cases()
async def test_uncaught_error_is_exit_code_1(sessions, provisioner, language):
    result = await run(sessions, provisioner, language, UNCAUGHT[language])
    assert result["exit_code"] == 1, result
    assert result["error"]["ename"], result
    if language in ("node", "typescript", "deno"):
        assert (result["error"]["ename"], result["error"]["evalue"]) == ("TypeError", "boom")
    if language == "go":
        assert result["error"]["ename"] == "panic" and "nil map" in result["error"]["evalue"]
        assert "goroutine" in result["stderr"]


@cases()
async def test_exit_n_is_the_exit_code_and_the_session_goes_on(sessions, provisioner, language):
    result = await run(sessions, provisioner, language, EXIT_3[language])
    assert result["exit_code"] == 3, result
    assert result["stdout"] == "bye\n", "output before the exit is kept"
    assert result["error"]["ename"] == "SystemExit"
    result = await run(sessions, provisioner, language, EXIT_0[language])
    assert (result["exit_code"], result["error"]) == (0, None), result
    assert (await run(sessions, provisioner, language, STREAMS[language]))["stdout"] == "out\n"


@cases()
async def test_era_session_and_run_env(sessions, provisioner, language):
    engine, sid = await sessions.session(provisioner, language)
    expected = ["true", sid, language, "hi 'there' $(nothing) \U0001F600"]
    result = await run(sessions, provisioner, language, PRINT_ENV[language],
                       env={"ONLY_THIS_RUN": "yes \"quoted\" $HOME \u00fc\U0001F600", "GREETING": "overridden"})
    assert result["stdout"].splitlines() == expected[:3] + ["overridden", 'yes "quoted" $HOME \u00fc\U0001F600'], result
    result = await run(sessions, provisioner, language, PRINT_ENV[language])
    assert result["stdout"].splitlines() == expected + ["-"], "a run's env does not leak into the next run"


@cases()
async def test_session_data_and_workspace_files(sessions, provisioner, language):
    engine, sid = await sessions.session(provisioner, language)
    await engine.write_file(sid, "input.txt", b"hello files")
    before = (await engine.get(sid))["data"]["count"]
    result = await run(sessions, provisioner, language, DATA_AND_FILES[language])
    assert result["exit_code"] == 0, result
    cwd = "/workspace" if provisioner == "docker" else str(engine.workspace_dir(sid))
    assert result["stdout"].strip() == cwd, "the working directory is the workspace"
    assert result["data"] == {"count": before + 1}
    assert await engine.read_file(sid, "out.txt") == b"HELLO FILES"


@cases()
async def test_timeout_is_124_and_the_session_stays_usable(sessions, provisioner, language):
    result = await run(sessions, provisioner, language, FOREVER[language], timeout=1.5)
    assert result["exit_code"] == 124 and result["timed_out"], result
    assert (await run(sessions, provisioner, language, STREAMS[language]))["stdout"] == "out\n"


@cases("node", "typescript")
async def test_an_interrupted_run_keeps_the_sessions_state(sessions, provisioner, language):
    """tslab kernels are interrupted by SIGINT: it must reach the kernel, not kill the
    sandbox around it (a local timeout used to restart the kernel and lose the state)."""
    assert (await run(sessions, provisioner, language, STATE[language]))["exit_code"] == 0
    result = await run(sessions, provisioner, language, FOREVER[language], timeout=1.5)
    assert result["exit_code"] == 124 and "restarted" not in result["error"]["evalue"], result
    assert (await run(sessions, provisioner, language, STATE_READ[language]))["stdout"] == "42\n"


NODE_PACKAGE = {
    "lib/node_modules/era-pad/package.json": json.dumps({"name": "era-pad", "version": "1.0.0", "main": "index.js"}),
    "lib/node_modules/era-pad/index.js": "module.exports = { pad: (s) => `[${s}]` };\n",
    "lib/node_modules/era-pad/index.d.ts": "export declare function pad(s: string): string;\n",
}


@cases("node", "typescript")
async def test_npm_packages_on_node_path(sessions, provisioner, language):
    """What a session's npm setup installs is found through NODE_PATH, by require and by import."""
    engine, sid = await sessions.session(provisioner, language)
    for path, text in NODE_PACKAGE.items():
        await engine.write_file(sid, path, text.encode())
    cwd = "/workspace" if provisioner == "docker" else str(engine.workspace_dir(sid))
    code = 'import { pad } from "era-pad";\nconsole.log(pad("x"), require("era-pad").pad("y"))'
    result = await run(sessions, provisioner, language, code, env={"NODE_PATH": f"{cwd}/lib/node_modules"})
    assert (result["exit_code"], result["stdout"]) == (0, "[x] [y]\n"), result


@cases("deno")
async def test_deno_npm_imports_need_internet(sessions, provisioner, language):
    result = await run(sessions, provisioner, language, 'import leftPad from "npm:left-pad@1.3.0";')
    assert result["exit_code"] == 1, result
    assert result["error"] is not None


@cases("go")
async def test_go_build_errors_and_missing_modules(sessions, provisioner, language):
    result = await run(sessions, provisioner, language, go("\tx := 1", imports=()))
    assert result["exit_code"] == 1 and result["error"]["ename"] == "CompileError", result
    assert "declared" in result["error"]["evalue"] and "main.go" in result["stderr"]
    result = await run(sessions, provisioner, language,
                       'package main\n\nimport "github.com/google/uuid"\n\nfunc main() { _ = uuid.New() }\n')
    assert result["exit_code"] == 1 and result["error"]["ename"] == "CompileError", result
    assert "module proxy" in result["error"]["evalue"]


def go_module_cache(root: str) -> dict[str, bytes]:
    """A module cache holding example.com/greet v1.0.0, as `go mod download` leaves one."""
    import io
    import zipfile

    mod = b"module example.com/greet\n\ngo 1.19\n"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("example.com/greet@v1.0.0/go.mod", mod)
        zf.writestr("example.com/greet@v1.0.0/greet.go",
                    'package greet\n\nfunc Hello(name string) string { return "hello " + name }\n')
    at = f"{root}/cache/download/example.com/greet/@v"
    return {f"{at}/list": b"v1.0.0\n", f"{at}/v1.0.0.mod": mod, f"{at}/v1.0.0.zip": archive.getvalue(),
            f"{at}/v1.0.0.info": b'{"Version":"v1.0.0","Time":"2024-01-01T00:00:00Z"}'}


@cases("go")
async def test_go_modules_from_the_setup_cache_without_network(sessions, provisioner, language):
    """A session's setup points GOMODCACHE at the modules it downloaded, with GOPROXY=off."""
    engine, sid = await sessions.session(provisioner, language)
    for path, content in go_module_cache("gomod").items():
        await engine.write_file(sid, path, content)
    cwd = "/workspace" if provisioner == "docker" else str(engine.workspace_dir(sid))
    code = 'package main\n\nimport (\n\t"fmt"\n\n\t"example.com/greet"\n)\n\nfunc main() { fmt.Println(greet.Hello("go")) }\n'
    result = await run(sessions, provisioner, language, code,
                       env={"GOMODCACHE": f"{cwd}/gomod", "GOPROXY": "off", "GOSUMDB": "off", "GOFLAGS": "-mod=mod"})
    assert (result["exit_code"], result["stdout"]) == (0, "hello go\n"), result


async def test_deno_npm_imports_with_internet_access(sessions):
    """Locally only: a container's CA bundle is Debian's, which a TLS-inspecting proxy
    (CI's network has one) does not sign, while the local sandbox sees the host's."""
    require_language("local", "deno")
    engine = await sessions.engine("local")
    doc = await engine.create({"language": "deno", "allowInternetAccess": True})
    try:
        result = await engine.run(doc["id"], {"code": 'import leftPad from "npm:left-pad@1.3.0";\n'
                                                      'console.log(leftPad("x", 3, "-"))', "timeout": 60})
        assert (result["exit_code"], result["stdout"]) == (0, "--x\n"), result
    finally:
        await engine.delete(doc["id"])
