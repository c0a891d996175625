"""Setup specs, archives and logs without any network: validation (docs/security.md
case 17), canonical form and hashing, archive extraction against hostile archives
(docs/security.md case 14), sealing of a built environment, and the log helpers."""

from __future__ import annotations

import io
import os
import resource
import stat
import tarfile
from pathlib import Path

import pytest

from era_kernel.errors import BadRequest
from era_kernel.models import SetupSpec
from era_kernel.setup import SetupManager, normalize
from era_kernel.setup.cache import CacheError, EnvCache
from era_kernel.setup.layout import MANIFEST, EnvLayout
from era_kernel.setup.logs import LineSplitter, LogTail, error_message
from era_kernel.setup.spec import env_key
from era_kernel.setup.steps import Toolchain, plan, step_env


# ---- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("setup, field", [
    ({"pip": ["-r", "req.txt"]}, "setup.pip[0]"),
    ({"pip": ["--index-url=https://evil.example/simple", "x"]}, "setup.pip[0]"),
    ({"pip": ["requests", "-e ."]}, "setup.pip[1]"),
    ({"pip": ["requests; rm -rf /"]}, "setup.pip[0]"),
    ({"pip": ["foo @ https://evil.example/foo.whl"]}, "setup.pip[0]"),
    ({"pip": ["git+https://github.com/psf/requests"]}, "setup.pip[0]"),
    ({"pip": ["requests\nurllib3"]}, "setup.pip[0]"),
    ({"pip": ["$(curl evil)"]}, "setup.pip[0]"),
    ({"pip": [""]}, "setup.pip[0]"),
    ({"pip": ["x" * 300]}, "setup.pip[0]"),
    ({"pip": "requests"}, "setup.pip"),
    ({"pip": [3]}, "setup.pip[0]"),
    ({"pip": ["a"] * 201}, "setup.pip"),
    ({"npm": ["-g"]}, "setup.npm[0]"),
    ({"npm": ["--registry=https://evil.example"]}, "setup.npm[0]"),
    ({"npm": ["../local-dir"]}, "setup.npm[0]"),
    ({"npm": ["file:../x"]}, "setup.npm[0]"),
    ({"npm": ["ms@git+https://evil.example/x.git"]}, "setup.npm[0]"),
    ({"npm": ["alias@npm:ms"]}, "setup.npm[0]"),
    ({"npm": ["ms; touch /tmp/x"]}, "setup.npm[0]"),
    ({"npm": ["`id`"]}, "setup.npm[0]"),
    ({"go": ["-x"]}, "setup.go[0]"),
    ({"go": ["example.com/../x"]}, "setup.go[0]"),
    ({"go": ["example.com/x@v1 && id"]}, "setup.go[0]"),
    ({"commands": ["echo \x00"]}, "setup.commands[0]"),
    ({"commands": ["echo \x1b[31m"]}, "setup.commands[0]"),
    ({"commands": ["   "]}, "setup.commands[0]"),
    ({"commands": ["true"] * 51}, "setup.commands"),
    ({"pips": ["requests"]}, "setup.pips"),
    # The text forms: parsed line by line / as JSON; options, URLs, paths, git and file specs refused.
    ({"pip": {"requirements": "requests\n-r other.txt\n"}}, "setup.pip.requirements line 2"),
    ({"pip": {"requirements": "# tools\n\n--index-url https://evil.example/simple\nx"}},
     "setup.pip.requirements line 3"),
    ({"pip": {"requirements": "-e ."}}, "setup.pip.requirements line 1"),
    ({"pip": {"requirements": "ok\nhttps://evil.example/x.whl"}}, "setup.pip.requirements line 2"),
    ({"pip": {"requirements": "git+https://github.com/psf/requests#egg=requests"}}, "setup.pip.requirements line 1"),
    ({"pip": {"requirements": "requests==2.31 --hash=sha256:abc"}}, "setup.pip.requirements line 1"),
    ({"pip": {"requirements": "foo @ file:///etc"}}, "setup.pip.requirements line 1"),
    ({"pip": {"requirements": 3}}, "setup.pip.requirements"),
    ({"pip": {"requirement": "x"}}, "setup.pip"),
    ({"pip": {"requirements": "x", "extra": "y"}}, "setup.pip"),
    ({"npm": {"packageJson": "{not json"}}, "setup.npm.packageJson"),
    ({"npm": {"packageJson": "[]"}}, "setup.npm.packageJson"),
    ({"npm": {"packageJson": '{"dependencies": {"x": "git+https://evil.example/x.git"}}'}},
     "setup.npm.packageJson.dependencies.x"),
    ({"npm": {"packageJson": '{"dependencies": {"x": "file:../x"}}'}}, "setup.npm.packageJson.dependencies.x"),
    ({"npm": {"packageJson": '{"dependencies": {"x": "https://evil.example/x.tgz"}}'}},
     "setup.npm.packageJson.dependencies.x"),
    ({"npm": {"packageJson": '{"devDependencies": {"y": "npm:ms@2"}}'}}, "setup.npm.packageJson.devDependencies.y"),
    ({"npm": {"packageJson": '{"dependencies": {"--registry=x": "1"}}'}},
     "setup.npm.packageJson.dependencies.--registry=x"),
    ({"npm": {"packageJson": '{"dependencies": ["ms"]}'}}, "setup.npm.packageJson.dependencies"),
    ({"go": {"goMod": "module m\nrequire (\n\tgithub.com/a/b\n)"}}, "setup.go.goMod line 3"),
    ({"go": {"goMod": "module m\nrequire -x v1.0.0"}}, "setup.go.goMod line 2"),
    ({"go": {"goMod": "module m\nrequire (\n\tgithub.com/a/b v1.0.0\n"}}, "setup.go.goMod"),
    ({"envs": {"A B": "x"}, "commands": ["true"]}, "setup.envs.A B"),
    ({"envs": {"A": 1}, "commands": ["true"]}, "setup.envs.A"),
    ({"envs": ["A=1"], "commands": ["true"]}, "setup.envs"),
    ("pip install requests", "setup"),
    ([], "setup"),
])
def test_bad_setup_is_refused_naming_the_item(setup, field):
    with pytest.raises(BadRequest) as err:
        normalize(setup)
    assert err.value.field == field
    assert isinstance(err.value, BadRequest)  # 400


def test_canonical_form_and_what_it_keeps():
    spec = normalize({"pip": ["Requests >= 2.0", "pydantic[email,dotenv]==2.7.4", "requests>=2.0"],
                      "npm": ["ms", "@types/node@^20", "chalk@ 4.1.2"], "go": ["golang.org/x/text@v0.14.0"],
                      "commands": ["echo b", "echo a"]})
    assert spec == {"pip": ["pydantic[dotenv,email]==2.7.4", "requests>=2.0"],
                    "npm": ["@types/node@^20", "chalk@4.1.2", "ms"], "go": ["golang.org/x/text@v0.14.0"],
                    "commands": ["echo b", "echo a"]}
    assert normalize(spec) == spec  # idempotent: records hold the canonical form
    assert normalize(SetupSpec(pip=["requests"])) == {"pip": ["requests"], "npm": [], "go": [], "commands": []}
    assert normalize({"envs": {"A": "1"}}) is None  # envs alone ask for nothing: they only reach commands
    assert normalize(None) is None
    assert normalize({}) is None
    assert normalize({"pip": [], "npm": None}) is None
    # Options stay out; commands are shell text by design and run only inside the sandbox.
    assert normalize({"commands": ["echo $(id) `date` > $ERA_SETUP_DIR/x\nls -la"]})["commands"] == [
        "echo $(id) `date` > $ERA_SETUP_DIR/x\nls -la"]


def test_environment_key_is_content_addressed():
    a = normalize({"pip": ["requests", "pydantic"], "npm": ["ms"]})
    b = normalize({"npm": ["ms", "ms"], "pip": ["Pydantic", "requests"]})
    assert env_key("python", "local:x", a) == env_key("python", "local:x", b)
    assert env_key("python", "local:x", a) != env_key("python", "docker:era/python@sha256:1", a)
    assert env_key("python", "local:x", a) != env_key("node", "local:x", a)
    # Commands and envs are the session's own: they do not make another environment.
    with_commands = normalize({"pip": ["requests", "pydantic"], "npm": ["ms"], "commands": ["echo 1"],
                               "envs": {"A": "1"}})
    assert env_key("python", "local:x", with_commands) == env_key("python", "local:x", a)
    # The text forms address the same environment as the lists they list.
    text = normalize({"pip": {"requirements": "requests\n# pinned below\nPydantic\n"},
                      "npm": {"packageJson": '{"name": "app", "dependencies": {"ms": "*"}}'}})
    lists = normalize({"pip": ["requests", "pydantic"], "npm": ["ms@*"]})
    assert env_key("python", "local:x", text) == env_key("python", "local:x", lists)
    assert len(env_key("python", "r", a)) == 32


def test_packages_reach_the_tools_after_double_dash_only():
    spec = normalize({"pip": ["requests"], "npm": ["ms"], "go": ["example.com/m@v1.0.0"], "commands": ["echo hi"]})
    layout = EnvLayout("/envs/k")
    steps = plan(spec, layout, Toolchain(python="/py/bin/python", base_path="/usr/bin"), setup_timeout=100,
                 command_timeout=5)
    assert [s.kind for s in steps] == ["pip", "npm", "go", "command"]
    for step in steps[:3]:
        dash = step.argv.index("--")
        assert step.argv[dash + 1:] == spec[step.kind]
        assert all(not a.startswith("-") for a in step.argv[dash + 1:])
    assert steps[0].argv[:5] == ["/py/bin/python", "-m", "pip", "install", "--target"]
    assert steps[3].argv == ["bash", "-c", "echo hi"] and steps[3].timeout == 5
    env = step_env(layout, Toolchain(python="/py", base_path="/usr/bin"), home="/h", ca_bundle="/ca.pem")
    assert env["PIP_CERT"] == env["NODE_EXTRA_CA_CERTS"] == "/ca.pem"
    assert env["PATH"].endswith(":/usr/bin") and env["ERA_SETUP_DIR"] == "/envs/k"


async def test_launch_extras_are_empty_without_an_environment(tmp_path):
    from era_kernel.config import Settings

    manager = SetupManager(Settings.from_env({}, data_dir=str(tmp_path)))
    assert await manager.launch_extras("python", "local", None) == {"readonly": [], "env": {}, "startup": []}
    assert await manager.launch_extras("python", "local", {"pip": ["requests"]}) == {"readonly": [], "env": {},
                                                                                     "startup": []}


def test_text_forms_give_packages_and_workspace_files():
    from era_kernel.setup.spec import packages, workspace_files

    requirements = "# data\nrequests==2.31.0  # pinned\n\nPandas>=2; python_version >= '3.9'\nurllib3 \\\n  <3\n"
    package_json = '{"name": "app", "dependencies": {"ms": "^2.1.3", "@types/node": "20"}, "devDependencies": {}}'
    go_mod = ("module example.com/app\n\ngo 1.21\n\nrequire github.com/google/uuid v1.6.0\n"
              "require (\n\tgolang.org/x/text v0.14.0 // indirect\n\t// a comment\n)\nreplace a => ../a\n")
    spec = normalize({"pip": {"requirements": requirements}, "npm": {"packageJson": package_json},
                      "go": {"goMod": go_mod}, "commands": ["ls"], "envs": {"B": "2", "A": "1"}})
    assert normalize(spec) == spec  # idempotent; the texts are kept verbatim
    assert spec["envs"] == {"A": "1", "B": "2"}
    assert packages(spec) == {"pip": ["pandas>=2; python_version >= \"3.9\"", "requests==2.31.0", "urllib3<3"],
                              "npm": ["@types/node@20", "ms@^2.1.3"],
                              "go": ["github.com/google/uuid@v1.6.0", "golang.org/x/text@v0.14.0"]}
    assert workspace_files(spec) == {"requirements.txt": requirements, "package.json": package_json}


# ---- archives and sealing ------------------------------------------------------------------------

def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    return info


@pytest.mark.parametrize("members, why", [
    ([(_info("/etc/evil"), b"x")], "outside"),
    ([(_info("../evil"), b"x")], "outside"),
    ([(_info("a/../../evil"), b"x")], "outside"),
    ([(_info("link", tarfile.SYMTYPE, "/etc"), None), (_info("link/passwd"), b"x")], "under a symlink"),
    ([(_info("x", tarfile.SYMTYPE, "/etc/passwd"), None), (_info("x"), b"pwned")], "twice"),
    ([(_info("hard", tarfile.LNKTYPE, "/etc/passwd"), None)], "not a file"),
    ([(_info("dev", tarfile.CHRTYPE), None)], "not a file"),
    ([(_info("fifo", tarfile.FIFOTYPE), None)], "not a file"),
    ([(_info("big"), b"x" * 2048)], "more than"),
])
def test_hostile_archives_are_refused(tmp_path, members, why):
    cache = EnvCache(tmp_path / "envs", max_bytes=1024)
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(CacheError, match=why):
        cache.unpack(_tar(*members), staging)
    assert not Path("/etc/evil").exists() and not (tmp_path / "evil").exists()


def test_seal_pack_unpack_round_trip(tmp_path):
    cache = EnvCache(tmp_path / "envs", max_bytes=10**6)
    built = tmp_path / "built"
    (built / "python" / "pkg").mkdir(parents=True)
    (built / "python" / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (built / "python" / "bin").mkdir()
    (built / "python" / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    os.chmod(built / "python" / "bin" / "tool", 0o4777)  # setuid and world-writable: both go
    os.chmod(built / "python" / "pkg", 0o777)
    os.symlink("../pkg/__init__.py", built / "python" / "bin" / "rel-link")
    os.symlink("/usr/bin/python3", built / "python" / "bin" / "abs-link")  # venvs made by commands have these
    os.link(built / "python" / "pkg" / "__init__.py", built / "hardlinked")
    os.mkfifo(built / "fifo")
    lines: list[str] = []
    manifest = cache.seal(built, {"key": "k"}, lines.append)
    assert manifest["files"] == 3 and manifest["key"] == "k"
    assert any("fifo" in line for line in lines) and not (built / "fifo").exists()
    assert os.stat(built / "hardlinked").st_nlink == 1
    assert stat.S_IMODE(os.stat(built / "python" / "bin" / "tool").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(built / "python" / "pkg").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(built / "python" / "pkg" / "__init__.py").st_mode) == 0o644

    restored = tmp_path / "restored"
    restored.mkdir()
    cache.unpack(cache.pack(built), restored)
    assert (restored / "python" / "pkg" / "__init__.py").read_text() == "VALUE = 1\n"
    assert os.readlink(restored / "python" / "bin" / "rel-link") == "../pkg/__init__.py"
    assert os.readlink(restored / "python" / "bin" / "abs-link") == "/usr/bin/python3"
    assert os.access(restored / "python" / "bin" / "tool", os.X_OK)
    assert (restored / MANIFEST).is_file()


def test_seal_never_writes_through_links_the_sandbox_planted(tmp_path):
    cache = EnvCache(tmp_path / "envs", max_bytes=10**6)
    victim = tmp_path / "host-file"
    victim.write_text("host data")
    built = tmp_path / "built"
    built.mkdir()
    os.symlink(victim, built / MANIFEST)  # a command's attempt to make root write a host file
    (built / "a").write_text("a")
    os.link(built / "a", built / "b")  # hard link: gets broken into a copy ...
    os.symlink(victim, built / "b.era-copy")  # ... next to a link named like an obvious temp file
    cache.seal(built, {"key": "k"}, lambda line: None)
    assert victim.read_text() == "host data"
    assert not (built / MANIFEST).is_symlink() and '"key": "k"' in (built / MANIFEST).read_text()
    assert (built / "b").read_text() == "a" and os.stat(built / "b").st_nlink == 1
    assert not [p for p in os.listdir(built) if p.startswith(".era-tmp-")]


def test_seal_enforces_the_size_limit(tmp_path):
    cache = EnvCache(tmp_path / "envs", max_bytes=100)
    built = tmp_path / "built"
    built.mkdir()
    (built / "big").write_bytes(b"x" * 101)
    with pytest.raises(CacheError, match="ERA_SETUP_MAX_BYTES"):
        cache.seal(built, {}, lambda line: None)


def test_promote_keeps_the_first_copy(tmp_path):
    cache = EnvCache(tmp_path / "envs", max_bytes=10**6)
    first, _ = cache.make_staging("k", os.getuid())
    second, _ = cache.make_staging("k", os.getuid())
    for staging, text in ((first, "first"), (second, "second")):
        (staging / "who").write_text(text)
        cache.seal(staging, {}, lambda line: None)
    cache.promote("k", first)
    cache.promote("k", second)
    assert (cache.final("k") / "who").read_text() == "first" and not second.exists()


def test_stale_staging_of_dead_processes_is_swept(tmp_path):
    cache = EnvCache(tmp_path / "envs", max_bytes=10**6)
    stale = tmp_path / "envs" / ".staging" / "k-999999999-abcd"
    live = tmp_path / "envs" / ".staging" / f"k-{os.getpid()}-abcd"
    for path in (stale, live):
        path.mkdir(parents=True)
    cache.make_staging("other", os.getuid())
    assert not stale.exists() and live.exists()


def test_discard_removes_a_deep_read_only_tree(tmp_path):
    """A setup's commands can nest directories deeper than our open-file limit and leave
    them read-only (go's module cache): discarding the staging tree removes all of it."""
    cache = EnvCache(tmp_path / "envs", max_bytes=10**6)
    staging, home = cache.make_staging("k", os.getuid())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = len(os.listdir("/proc/self/fd")) + 200
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(limit + 200):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.fchmod(fd, 0o555)
            os.close(fd)
            fd = child
        os.close(fd)
        cache.discard(staging, home)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert os.listdir(staging.parent) == []


# ---- logs --------------------------------------------------------------------------------------

def test_line_splitter_handles_chunks_carriage_returns_and_endless_lines():
    splitter = LineSplitter()
    assert splitter.feed(b"Collecting req") == []
    assert splitter.feed(b"uests\r\nprogress 10%\rprogress 20%\n\n") == ["Collecting requests", "progress 10%",
                                                                       "progress 20%"]
    assert splitter.feed("caf\u00e9".encode()[:-1]) == []  # a multi-byte character split across chunks
    assert splitter.feed("\u00e9 done\n".encode()[1:]) == ["caf\u00e9 done"]
    assert len(splitter.feed(b"y" * 100_000)) == 1  # no newline ever: cut, not buffered forever
    assert splitter.flush() == []


def test_log_tail_is_bounded():
    tail = LogTail(max_lines=3, max_chars=1000)
    for i in range(10):
        tail.add(f"line {i}")
    assert tail.lines() == ["line 7", "line 8", "line 9"]
    small = LogTail(max_lines=100, max_chars=20)
    for i in range(10):
        small.add("0123456789")
    assert len(small.text()) <= 21


def test_error_message_prefers_the_tools_own_error_lines():
    pip = ["Collecting nope", "ERROR: Could not find a version that satisfies the requirement nope",
           "ERROR: No matching distribution found for nope"]
    assert error_message("pip install nope", 1, pip).endswith("ERROR: No matching distribution found for nope")
    npm = ["npm http fetch GET 404 https://registry.npmjs.org/nope 57ms", "npm error code E404",
           "npm error 404 Not Found - GET https://registry.npmjs.org/nope",
           "npm error A complete log of this run can be found in: /h/.npm/_logs/x.log"]
    message = error_message("npm install nope", 1, npm)
    assert "E404" in message and "complete log" not in message
    assert error_message("$ false", 3, []) == "$ false failed (exit 3):\n(no output)"
    assert "boom" in error_message("$ x", 2, ["boom"])
