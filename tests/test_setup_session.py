"""ERA's ``setup``, exactly, through the engine on both provisioners: the text forms
(``requirements``, ``packageJson``, ``goMod``), ``envs`` for commands only, commands that
run one after another in the session's sandbox (ERA's README example: ``mkdir -p
/tmp/data``, ``echo 'a,b' > /tmp/data/test.csv``, then a run reads the file), ERA's
``setup_result`` fields, packages shared by key while each session keeps its own /tmp.
Real PyPI and npm (the Go module proxy where reachable)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from era_kernel.errors import BadRequest

from .conftest import both_provisioners

pytestmark = both_provisioners

ERA_EXAMPLE = ["mkdir -p /tmp/data", "echo 'a,b' > /tmp/data/test.csv"]


async def settled(engine, sid: str, timeout: float = 300) -> dict:
    await engine.setups.wait(sid, timeout)
    for _ in range(100):  # the status callback writes the record just after
        doc = await engine.get(sid)
        if doc["setup_status"] in ("completed", "failed"):
            return doc
        await asyncio.sleep(0.05)
    raise AssertionError(f"setup of {sid} did not settle: {doc['setup_status']}")


async def run(engine, sid: str, code: str) -> dict:
    r = await engine.run(sid, {"code": code, "timeout": 240})
    assert r["exit_code"] == 0, r
    return r


async def test_era_readme_example_envs_and_the_result_fields(engine):
    setup = {"commands": [*ERA_EXAMPLE, "echo \"$GREETING from setup\" > made-by-setup.txt; echo out; echo err >&2"],
             "envs": {"GREETING": "hello"}}
    sid = (await engine.create({"language": "python", "setup": setup}))["id"]
    doc = await settled(engine, sid)
    result = doc["setup_result"]
    assert doc["setup_status"] == "completed", result
    assert result["success"] is True and result["error"] is None and result["duration_ms"] > 0
    assert result["commands_run"] == setup["commands"]
    assert result["pip_packages"] == result["npm_packages"] == result["go_modules"] == []
    assert result["stdout"] == "out\n" and result["stderr"] == "err\n"
    assert "[3/3] $ echo" in result["logs"] and {"logs", "duration", "env", "source"} <= result.keys()
    r = await run(engine, sid, "import os\nprint(open('/tmp/data/test.csv').read().strip())\n"
                               "print(open('made-by-setup.txt').read().strip())\nprint(os.environ.get('GREETING'))")
    # The command's /tmp and workspace are the run's; envs were the commands' only.
    assert r["stdout"] == "a,b\nhello from setup\nNone\n"
    names = [f["path"] for f in await engine.files.list(await engine._record(sid), 0)]
    assert "made-by-setup.txt" in names


async def test_requirements_text_installs_and_is_in_the_workspace(engine):
    requirements = "# pinned for the test\nsix==1.16.0  # a small one\n\n"
    setup = {"pip": {"requirements": requirements}, "commands": ["pip install --quiet tomli==2.0.1"]}
    sid = (await engine.create({"language": "python", "setup": setup}))["id"]
    doc = await settled(engine, sid)
    assert doc["setup_status"] == "completed", doc["setup_result"]
    assert doc["setup_result"]["pip_packages"] == ["six==1.16.0"]
    r = await run(engine, sid, "import six, tomli\nprint(six.__version__, tomli.__file__.startswith('/tmp/'))\n"
                               "print(open('requirements.txt').read() == " + json.dumps(requirements) + ")")
    # The shared environment gave six; the command's own `pip install` went to the session's
    # package directory (in its /tmp), importable by its runs.
    assert r["stdout"] == "1.16.0 True\nTrue\n"


async def test_package_json_installs_and_is_the_sessions_file(engine):
    package_json = json.dumps({"name": "era-app", "version": "1.0.0", "dependencies": {"ms": "2.1.3"}})
    sid = (await engine.create({"language": "node", "setup": {"npm": {"packageJson": package_json}}}))["id"]
    doc = await settled(engine, sid)
    assert doc["setup_status"] == "completed", doc["setup_result"]
    assert doc["setup_result"]["npm_packages"] == ["ms@2.1.3"]
    r = await run(engine, sid, "const ms = require('ms'); const fs = require('fs');\n"
                               "console.log(ms('2 days'), JSON.parse(fs.readFileSync('package.json', 'utf8')).name)")
    assert r["stdout"] == "172800000 era-app\n"


async def test_go_mod_require_lines_are_the_modules(engine):
    go_mod = ("module example.com/app\n\ngo 1.21\n\nrequire github.com/google/uuid v1.6.0\n"
              "require (\n\tgolang.org/x/text v0.14.0 // indirect\n)\n")
    sid = (await engine.create({"language": "go", "setup": {"go": {"goMod": go_mod}}}))["id"]
    doc = await settled(engine, sid)
    result = doc["setup_result"]
    assert result["go_modules"] == ["github.com/google/uuid@v1.6.0", "golang.org/x/text@v0.14.0"]
    assert "go mod download github.com/google/uuid@v1.6.0 golang.org/x/text@v0.14.0" in result["logs"]
    if doc["setup_status"] == "failed" and "proxy.golang.org" in result["error"]:
        pytest.skip("the Go module proxy is not reachable from this machine")
    assert doc["setup_status"] == "completed", result
    r = await run(engine, sid, 'import (\n"fmt"\n"github.com/google/uuid"\n)\nfmt.Println(len(uuid.NewString()))')
    assert r["stdout"] == "36\n"


async def test_same_spec_shares_packages_but_not_tmp_and_delete_removes_it(engine):
    setup = {"pip": ["six==1.16.0"], "commands": [*ERA_EXAMPLE, "echo $$ > /tmp/data/pid"]}
    a = (await engine.create({"language": "python", "setup": setup}))["id"]
    first = await settled(engine, a)
    b = (await engine.create({"language": "python", "setup": setup}))["id"]
    second = await settled(engine, b)
    assert first["setup_status"] == second["setup_status"] == "completed", (first, second)
    assert first["setup_result"]["env"] == second["setup_result"]["env"]  # one shared environment
    assert second["setup_result"]["source"] == "cache"
    await run(engine, a, "open('/tmp/data/only-a', 'w').write('a')")
    r = await run(engine, b, "import os, six\nprint(os.path.exists('/tmp/data/test.csv'), "
                             "os.path.exists('/tmp/data/only-a'))")
    assert r["stdout"] == "True False\n"  # each ran its own commands into its own /tmp
    record = await engine._record(a)
    tmp = engine.files.tmp_path(engine.files.path(record))
    assert (tmp / "data" / "only-a").is_file()
    await engine.delete(a)
    assert not tmp.exists()
    assert (await run(engine, b, "print(open('/tmp/data/test.csv').read().strip())"))["stdout"] == "a,b\n"


async def test_a_failing_command_stops_the_rest_and_the_session_works(engine):
    setup = {"commands": ["echo one > one.txt", "echo bad >&2; exit 7", "echo never > never.txt"]}
    sid = (await engine.create({"language": "python", "setup": setup}))["id"]
    doc = await settled(engine, sid)
    result = doc["setup_result"]
    assert doc["setup_status"] == "failed" and result["success"] is False
    assert result["commands_run"] == setup["commands"][:2] and result["stderr"] == "bad\n"
    assert "exit 7" in result["error"] and "bad" in result["error"]
    r = await run(engine, sid, "import os\nprint(os.path.exists('one.txt'), os.path.exists('never.txt'))")
    assert r["stdout"] == "True False\n"


@pytest.mark.parametrize("setup, field", [
    ({"pip": {"requirements": "six\n--extra-index-url https://evil.example\n"}}, "setup.pip.requirements line 2"),
    ({"npm": {"packageJson": '{"dependencies": {"x": "github:evil/x"}}'}}, "setup.npm.packageJson.dependencies.x"),
    ({"go": {"goMod": "require (\n  example.com/x\n)"}}, "setup.go.goMod line 2"),
    ({"commands": ["true"], "envs": {"BAD NAME": "x"}}, "setup.envs.BAD NAME"),
])
async def test_bad_setup_is_refused_before_anything_is_made(engine, setup, field):
    with pytest.raises(BadRequest) as err:
        await engine.create({"id": "refused", "language": "python", "setup": setup})
    assert err.value.field == field
    assert not os.path.exists(engine.settings.data_dir / "sessions" / "refused")
