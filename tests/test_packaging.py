"""The wheel, installed as a user would (`pip install era-kernel`), not editable.

Everything the package needs at run time must be inside it: the kernelspecs, the image
recipes, the JavaScript launchers of the language kernels. A regular install of a wheel
that lacked them would fail at `era kernelspecs install` or at the first kernel start,
which an editable install (the tests' own) can never show.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, short_tmpdir


def _declared_closure() -> list:
    """The distributions era-kernel's wheel declares (its Requires-Dist without extras),
    and theirs, transitively, as installed in this environment."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, object] = {}
    todo = [(Requirement(r), "") for r in distribution("era-kernel").requires or []]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        for wanted in [""] + sorted(req.extras):
            if (name, wanted) in seen:
                continue
            try:
                dist = distribution(req.name)
            except PackageNotFoundError:
                continue  # the install below then fails on it, naming it
            seen[(name, wanted)] = dist
            todo += [(Requirement(r), wanted) for r in dist.requires or []]
    return list({canonicalize_name(d.metadata["Name"]): d for d in seen.values()}.values())  # once each


def _link_installed(dists: list, site_packages: Path) -> None:
    """Put the installed files of ``dists`` into another environment's site-packages, as
    pip would, but hard-linked from this environment (copied across filesystems)."""
    for dist in dists:
        for file in dist.files or []:
            if ".." in file.parts:
                continue  # scripts: their shebangs name this environment's Python
            source = Path(dist.locate_file(file))
            target = site_packages / file
            if not source.is_file() or target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with the project's wheel installed by pip.

    Its dependencies are the ones already installed here, put in the new environment
    before the install, and only those the wheel declares (transitively): pip, with no
    index, must find every requirement the wheel names satisfied there, and a module
    the package imports without declaring it is missing at run time, as after a
    `pip install era-kernel` from an index. That costs seconds; downloading and
    installing them afresh took a minute of every CI run."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                            "-w", str(tmp / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    warnings = [line for line in (build.stdout + build.stderr).splitlines()
                if "Warning" in line or "deprecat" in line.lower()]
    assert not warnings, "building the wheel printed warnings:\n" + "\n".join(warnings)
    (wheel,) = (tmp / "dist").glob("era_kernel-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site_packages = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    dependencies = _declared_closure()
    assert "jupyter-client" in {d.metadata["Name"].lower().replace("_", "-") for d in dependencies}
    _link_installed(dependencies, site_packages)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                              "--no-index", "--disable-pip-version-check", str(wheel)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return venv


def test_the_wheel_installs_kernelspecs_and_runs_code(wheel_venv, tmp_path):
    venv_bin = wheel_venv / "bin"
    # The installed package, not this checkout, is what runs.
    where = subprocess.run([str(venv_bin / "python"), "-c", "import era_kernel; print(era_kernel.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    assert where.startswith(str(wheel_venv)), where

    prefix = tmp_path / "prefix"
    subprocess.run([str(venv_bin / "era"), "kernelspecs", "install", "--prefix", str(prefix)], check=True,
                   capture_output=True, cwd=tmp_path, timeout=120)
    # Jupyter's own listing (`jupyter kernelspec list`; its command is a dependency's script)
    listed = subprocess.run([str(venv_bin / "python"), "-m", "jupyter_client.kernelspecapp", "list", "--json"],
                            capture_output=True,
                            text=True, check=True, cwd=tmp_path,
                            env=dict(os.environ, JUPYTER_PATH=str(prefix / "share" / "jupyter")))
    specs = json.loads(listed.stdout)["kernelspecs"]
    for language in ("python", "node", "typescript", "deno", "bash", "go"):
        assert {f"era-{language}", f"era-{language}-local"} <= specs.keys(), sorted(specs)
    local = specs["era-python-local"]["spec"]
    assert Path(local["argv"][0]).parent == venv_bin  # pinned to the installed interpreter
    assert local["metadata"]["kernel_provisioner"]["provisioner_name"] == "era-local"

    runtime = short_tmpdir("erw")
    env = dict(os.environ, ERA_DATA_DIR=str(tmp_path / "data"), ERA_RUNTIME_DIR=str(runtime), ERA_POOL_SIZE="0")
    env.pop("ERA_STORE_URL", None)
    env.pop("ERA_WORKSPACE_URL", None)
    run = subprocess.run([str(venv_bin / "era"), "run", "import sys; print('hello from', sys.prefix); sys.exit(3)"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=180)
    assert run.returncode == 3, run.stderr[-3000:]
    assert run.stdout == f"hello from {wheel_venv}\n"


def test_every_python_package_of_the_source_is_in_the_wheel_list():
    """pyproject's explicit package list misses new packages silently: the wheel then
    fails only where a missing one is imported (era_kernel.egress once broke `era run`)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    names = {"era_kernel": "era_kernel", "server": "era_server"}
    found = set()
    for top, name in names.items():
        for init in (ROOT / top).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / top)
            if "__pycache__" not in relative.parts:
                found.add(".".join([name, *relative.parts]))
    assert found <= listed, sorted(found - listed)
