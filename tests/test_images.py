"""Image recipes, content-hash tags, the build cache and ``era images``.

The first half needs nothing; the second needs a Docker engine and the era base image
(skipped without an engine unless ERA_REQUIRE_DOCKER=1). The script-recipe test builds
from a local image with a recipe that downloads nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time

import pytest

from era_kernel.errors import BadRequest
from era_kernel.images import add_images_parser, recipes
from era_kernel.images.builders import _parse_installer_events
from era_kernel.images.progress import BuildProgress
from era_kernel.images.reference import split_ref, validate_image_ref, validate_language

# ---------------------------------------------------------------------------- references


@pytest.mark.parametrize("ref", ["era/python:latest", "era/python:0123456789ab", "python:3.11-slim", "ubuntu",
                                 "localhost:5000/team/img:v1.2", "ghcr.io/org/img@sha256:" + "a" * 64])
def test_valid_image_refs(ref):
    assert validate_image_ref(ref) == ref


@pytest.mark.parametrize("ref", ["--privileged", "-v /:/host", "-it", "", " era/python", "era/python latest",
                                 "ERA/python", "era/python:a:b", "era/python:latest\n", "$(id)", "`id`", "a;b",
                                 "a/../b", "x" * 300, None, 5, "era/python:" + "t" * 200])
def test_invalid_image_refs(ref):
    with pytest.raises(BadRequest):
        validate_image_ref(ref)


@pytest.mark.parametrize("language", ["--privileged", "-v /:/host", "Python", "py thon", "../base", "", "a" * 40])
def test_invalid_languages(language):
    with pytest.raises(BadRequest):
        validate_language(language)


def test_split_ref():
    assert split_ref("era/python") == ("era/python", "latest")
    assert split_ref("localhost:5000/a:b") == ("localhost:5000/a", "b")


# ---------------------------------------------------------------------------- recipes and hashes


@pytest.fixture
def recipe_copy(tmp_path, monkeypatch):
    root = tmp_path / "recipes"
    shutil.copytree(recipes.RECIPES_DIR, root)
    monkeypatch.setattr(recipes, "RECIPES_DIR", root)
    return root


def test_chain_is_base_then_language_with_stable_tags():
    chain = recipes.plan_chain("python", prefix="era")
    assert [s.recipe.name for s in chain] == ["base", "python"]
    assert chain[0].parent_ref is None and chain[1].parent_ref == chain[0].ref
    assert all(len(s.tag) == 12 and int(s.tag, 16) >= 0 for s in chain)
    assert [s.ref for s in recipes.plan_chain("python", prefix="era")] == [s.ref for s in chain]


def test_tags_follow_recipe_contents(recipe_copy):
    before = recipes.plan_chain("python", prefix="era")
    script = recipe_copy / "python" / "install.sh"
    script.write_text(script.read_text() + "\n# changed\n")
    after_python = recipes.plan_chain("python", prefix="era")
    assert after_python[0].ref == before[0].ref and after_python[1].ref != before[1].ref
    spec = recipe_copy / "base" / "recipe.json"
    data = json.loads(spec.read_text())
    data["include"].append("curl")
    spec.write_text(json.dumps(data))
    after_base = recipes.plan_chain("python", prefix="era")
    assert after_base[0].ref != before[0].ref and after_base[1].ref != after_python[1].ref
    assert after_base[1].source != after_python[1].source


def test_from_image_replaces_the_base():
    chain = recipes.plan_chain("python", prefix="era", from_image="python:3.11-slim", from_image_id="sha256:1")
    assert len(chain) == 1 and chain[0].parent_ref == "python:3.11-slim"
    assert chain[0].labels[recipes.LABEL_FROM] == "python:3.11-slim"
    other = recipes.plan_chain("python", prefix="era", from_image="python:3.11-slim", from_image_id="sha256:2")
    assert other[0].tag != chain[0].tag and other[0].source == chain[0].source  # new upstream image, same recipe
    with pytest.raises(BadRequest):
        recipes.plan_chain("python", prefix="era", from_image="--privileged")


def test_unknown_recipe():
    with pytest.raises(LookupError):
        recipes.load_recipe("cobol")


# ---------------------------------------------------------------------------- progress


DEBOOTSTRAP_EVENTS = """\
P: 0 100 DOWNREL
PF: Downloading Release file
I: RETRIEVING
IA: InRelease
IA: 
IF: Retrieving %s %s
P: 100 100 DOWNREL
P: 0 50 DOWNDEBS
PF: Downloading packages
P: 25 50
P: 50 50
P: 1 30 CONFBASE
PF: Configuring base system
I: CONFIGURING
IA: libc-bin
IF: Configuring %s...
P: 30 30 CONFBASE
E: COULDNOTDO
EA: something
EF: could not do %s
"""


def test_debootstrap_events_drive_progress():
    out = io.StringIO()
    progress = BuildProgress([("base: debootstrap", 1.0)], out)
    errors: list[str] = []
    seen = []
    original = progress.update

    def spy(stage, fraction, detail=""):
        seen.append(fraction)
        original(stage, fraction, detail)

    progress.update = spy
    _parse_installer_events(io.StringIO(DEBOOTSTRAP_EVENTS), progress, "base: debootstrap", errors, False)
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert errors == ["could not do something"]
    assert "Configuring libc-bin..." in out.getvalue()


def test_progress_lines_when_not_a_terminal():
    out = io.StringIO()
    progress = BuildProgress([("a", 1.0), ("b", 3.0)], out)
    for i in range(11):
        progress.update("a", i / 10, f"step {i}")
    progress.update("b", 0.5, "half of b")
    progress.finish("built x")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[  0.0%] a: step 0")
    assert "[ 62.5%] b: half of b" in lines
    assert lines[-1].startswith("built x (") and len(lines) < 10


def test_cli_arguments():
    parser = argparse.ArgumentParser(prog="era")
    add_images_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["images", "build", "--language", "python", "--from", "python:3.11-slim", "--force"])
    assert (args.images_command, args.language, args.from_image, args.force) == ("build", "python",
                                                                                  "python:3.11-slim", True)
    assert parser.parse_args(["images", "list"]).images_command == "list"
    assert callable(args.func)


# ---------------------------------------------------------------------------- with an engine


@pytest.fixture(scope="module")
def docker_client():
    try:
        import docker

        client = docker.from_env(timeout=30)
        client.ping()
        return client
    except Exception as exc:
        if os.environ.get("ERA_REQUIRE_DOCKER") == "1":
            pytest.fail(f"no Docker engine answers: {exc}")
        pytest.skip(f"no Docker engine answers: {exc}")


@pytest.fixture(scope="module")
def python_image(docker_client):
    from era_kernel.images import build_image

    return build_image("python", client=docker_client, show_progress=False)


async def test_cache_hit_is_instant(docker_client, python_image):
    from era_kernel.images import build_image, current_image, ensure_image

    started = time.monotonic()
    assert build_image("python", client=docker_client, show_progress=False) == python_image
    assert await ensure_image("python", docker_client) == python_image
    assert time.monotonic() - started < 2.0
    assert current_image("python", client=docker_client) == python_image
    latest = docker_client.images.get("era/python:latest")
    assert python_image in latest.tags and latest.labels[recipes.LABEL_RECIPE] == "python"


def test_images_list_command(docker_client, python_image, capsys):
    from era_kernel.images import images_main

    assert images_main(argparse.Namespace(images_command="list")) == 0
    assert python_image in capsys.readouterr().out


PROBE_RECIPE = {"kind": "script", "script": "install.sh", "language": "probe",
                "env": {"PROBE": "1", "PATH": "/usr/local/bin:/usr/bin:/bin"}, "workdir": "/workspace",
                "cmd": ["cat", "/opt/probe/ok"]}
PROBE_SCRIPT = """#!/bin/sh
set -eu
echo "era-progress 50 writing"
mkdir -p /opt/probe /workspace
env | grep -q '^PIP_CERT=' && echo "build env present" > /opt/probe/env
echo ok > /opt/probe/ok
echo "era-progress 100 done"
"""


def test_script_recipe_on_a_given_image(docker_client, python_image, recipe_copy):
    from era_kernel.images import build_image, current_image, list_images

    probe = recipe_copy / "probe"
    probe.mkdir()
    (probe / "recipe.json").write_text(json.dumps(PROBE_RECIPE))
    (probe / "install.sh").write_text(PROBE_SCRIPT)
    base = docker_client.images.get("era/base:latest")
    out = io.StringIO()
    try:
        ref = build_image("probe", client=docker_client, from_image="era/base:latest", prefix="era-test", stream=out)
        assert ref.startswith("era-test/probe:") and "built " + ref in out.getvalue()
        image = docker_client.images.get(ref)
        config = image.attrs["Config"]
        env = dict(e.split("=", 1) for e in config["Env"])
        assert env["PROBE"] == "1" and not any(k.startswith(("PIP_", "SSL_", "HTTP")) for k in env)
        assert not config.get("Entrypoint") and config["Cmd"] == ["cat", "/opt/probe/ok"]
        assert config["WorkingDir"] == "/workspace" and image.labels[recipes.LABEL_FROM] == "era/base:latest"
        output = docker_client.containers.run(ref, remove=True, network_mode="none")
        assert output.strip() == b"ok"
        assert docker_client.containers.list(all=True, filters={"name": "era-build-"}) == []

        started = time.monotonic()
        assert build_image("probe", client=docker_client, from_image="era/base:latest", prefix="era-test",
                           show_progress=False) == ref
        assert time.monotonic() - started < 2.0
        assert current_image("probe", client=docker_client, prefix="era-test") == ref  # --from choice kept
        assert any(row["ref"] == ref and row["latest"] for row in list_images(docker_client))
        assert base.id == docker_client.images.get("era/base:latest").id
    finally:
        for image in docker_client.images.list("era-test/probe"):
            docker_client.images.remove(image.id, force=True)
