"""The two ways an image is made: debootstrap + ``docker import``, and script + commit.

Both are blocking (subprocesses, Docker SDK); async callers go through
``era_kernel.images.ensure_image``, which runs them in a worker thread.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Any, Iterator

import docker.errors
from docker.types import Mount

from ..errors import EraError
from .progress import BuildProgress
from .recipes import BuildStep

# Where the recipe directory and the host's CA bundle appear inside a build container.
# Under /tmp, which is a tmpfs when kernels run, so the empty mount points committed
# into the image are never visible.
BUILD_MOUNT = "/tmp/era-build"
# Host variables a build step may need to reach a package registry (never secrets).
_BUILD_ENV_PASSTHROUGH = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")

# debootstrap --debian-installer reports "P: <now> <end> <STAGE>" on fd 3; these are the
# stages in order with the share of the debootstrap step each takes (measured: the
# download and the unpack/configure of ~90 packages dominate).
_DEBOOTSTRAP_STAGES = {
    "DOWNREL": (0.00, 0.02), "DOWNRELSIG": (0.02, 0.03), "DOWNPKGS": (0.03, 0.10),
    "SIZEDEBS": (0.10, 0.12), "DOWNDEBS": (0.12, 0.45), "EXTRACTPKGS": (0.45, 0.55),
    "INSTCORE": (0.55, 0.60), "UNPACKREQ": (0.60, 0.72), "CONFREQ": (0.72, 0.84),
    "UNPACKBASE": (0.84, 0.92), "CONFBASE": (0.92, 1.00),
}


class BuildError(EraError):
    """A Docker image build failed."""


# --------------------------------------------------------------------------- debootstrap


def build_debootstrap(client: Any, step: BuildStep, progress: BuildProgress, *, workdir: str | None = None,
                      mirror: str | None = None, verbose: bool = False) -> None:
    """debootstrap a root filesystem into a temporary directory and ``docker import`` it."""
    if os.geteuid() != 0:
        raise BuildError(f"building {step.repository} runs debootstrap, which needs root; run the build as root, "
                         "or build a language image on an official one with --from IMAGE")
    if not shutil.which("debootstrap"):
        raise BuildError("debootstrap is not installed (scripts/bootstrap-docker.sh installs it)")
    spec = step.recipe.spec
    tmp = Path(tempfile.mkdtemp(prefix="era-rootfs-", dir=workdir))
    rootfs = tmp / "rootfs"
    try:
        argv = ["debootstrap", "--debian-installer", f"--variant={spec.get('variant', 'minbase')}"]
        if spec.get("include"):
            argv.append("--include=" + ",".join(spec["include"]))
        argv += [spec["suite"], str(rootfs)]
        if mirror:
            argv.append(mirror)
        _run_debootstrap(argv, tmp / "debootstrap.log", progress, step.recipe.name, verbose)
        _prune(rootfs, spec.get("prune", []))
        progress.update(f"{step.recipe.name}: import", 0.0, "docker import")
        changes = [f"ENV {key}={json.dumps(value)}" for key, value in spec.get("env", {}).items()]
        if spec.get("cmd"):
            changes.append("CMD " + json.dumps(spec["cmd"]))
        changes += [f"LABEL {key}={json.dumps(value)}" for key, value in step.labels.items()]
        _import_rootfs(client, rootfs, step, changes, progress)
    finally:
        _remove_rootfs(tmp)


def _run_debootstrap(argv: list[str], log_path: Path, progress: BuildProgress, name: str, verbose: bool) -> None:
    stage = f"{name}: debootstrap"
    read_fd, write_fd = os.pipe()
    # debootstrap's installer mode writes progress to fd 3 exactly; the shell maps our pipe
    # there. Only our own fd number is interpolated; argv goes through as "$@".
    wrapper = ["sh", "-c", 'fd=$1; shift; exec "$@" 3>&"$fd"', "sh", str(write_fd), *argv]
    tail: deque[str] = deque(maxlen=30)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(wrapper, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                pass_fds=(write_fd,), env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        os.close(write_fd)

        def copy_log() -> None:  # the full log, for errors and --verbose
            assert proc.stdout is not None
            for raw in proc.stdout:
                log.write(raw)
                text = raw.decode(errors="replace").rstrip()
                tail.append(text)
                if verbose:
                    progress.line(text)

        reader = threading.Thread(target=copy_log, daemon=True)
        reader.start()
        errors: list[str] = []
        with os.fdopen(read_fd, "r", errors="replace") as events:
            _parse_installer_events(events, progress, stage, errors, verbose)
        rc = proc.wait()
        reader.join(timeout=5)
    if rc != 0:
        detail = "\n".join(errors or list(tail))
        raise BuildError(f"debootstrap failed (exit {rc}); full log was {log_path}:\n{detail}")
    progress.update(stage, 1.0, "base system installed")


def _parse_installer_events(events: Any, progress: BuildProgress, stage: str, errors: list[str], verbose: bool) -> None:
    """Turn debootstrap's P:/I:/E: protocol into progress updates."""
    current, fraction, detail, args = "DOWNREL", 0.0, "", []
    for raw in events:
        key, _, value = raw.rstrip("\n").partition(": ")
        if key == "P":
            fields = value.split()
            if len(fields) >= 3:
                current = fields[2]
            if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit() and int(fields[1]) > 0:
                lo, hi = _DEBOOTSTRAP_STAGES.get(current, (fraction, fraction))
                fraction = max(fraction, lo + (hi - lo) * int(fields[0]) / int(fields[1]))
                progress.update(stage, fraction, detail)
        elif key in ("I", "E", "W"):
            args = []
        elif key in ("IA", "EA", "WA"):
            args.append(value)
        elif key in ("IF", "EF", "WF", "PF"):
            text = _format_message(value, args) if key != "PF" else value
            if key == "EF":
                errors.append(text)
            elif key == "WF" and verbose:
                progress.line("W: " + text)
            detail = text
            progress.update(stage, fraction, detail)


def _format_message(fmt: str, args: list[str]) -> str:
    out = fmt
    for arg in args:
        out = out.replace("%s", arg, 1)
    return out


def _prune(rootfs: Path, patterns: list[str]) -> None:
    """Drop package caches, docs and locales: they only make the image bigger."""
    for pattern in patterns:
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _import_rootfs(client: Any, rootfs: Path, step: BuildStep, changes: list[str], progress: BuildProgress) -> None:
    stage = f"{step.recipe.name}: import"
    expected = max(_tree_size(rootfs), 1)
    tar = subprocess.Popen(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-c", "."],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def chunks() -> Iterator[bytes]:
        assert tar.stdout is not None
        sent = 0
        while True:
            chunk = tar.stdout.read(1 << 20)
            if not chunk:
                return
            sent += len(chunk)
            progress.update(stage, min(sent / expected, 0.99), f"{sent >> 20} MiB sent")
            yield chunk

    try:
        client.api.import_image_from_stream(chunks(), repository=step.repository, tag=step.tag, changes=changes)
    finally:
        _, err = tar.communicate()
    if tar.returncode != 0:
        raise BuildError(f"tar of the root filesystem failed: {err.decode(errors='replace')[-2000:]}")
    progress.update(stage, 1.0, step.ref)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mount_point = line.split()[4].encode().decode("unicode_escape")
            if mount_point.startswith(prefix):
                found.append(mount_point)
    return found


def _remove_rootfs(tmp: Path) -> None:
    # An interrupted debootstrap can leave /proc, /sys or bind-mounted /dev nodes mounted
    # in the target: unmount them first, and never rmtree through a mount.
    for mount_point in sorted(_mounts_under(tmp), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount_point], check=False, capture_output=True)
    if _mounts_under(tmp):
        raise BuildError(f"{tmp} still has mounts under it; remove it by hand after unmounting")
    shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- script + commit


def host_ca_bundle() -> str | None:
    """The host's CA bundle: package registries may sit behind a TLS-inspecting proxy."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            return os.path.realpath(candidate)
    return None


def build_script(client: Any, step: BuildStep, progress: BuildProgress, *, verbose: bool = False) -> None:
    """Run the recipe's script as root in a container of the parent image, then commit it.

    The script runs through ``exec`` with the registry settings in the exec's own
    environment, so neither the CA path nor a proxy is committed into the image's config.
    """
    name = f"era-build-{step.recipe.name}-{step.tag}"
    try:  # a build killed earlier leaves its container behind
        client.api.remove_container(name, force=True)
    except docker.errors.NotFound:
        pass
    # A recipe's kernels/ links to era_kernel/kernels/: the container gets a copy with the
    # links resolved (the recipe hash already follows them).
    staged = Path(tempfile.mkdtemp(prefix="era-recipe-"))
    try:
        shutil.copytree(step.recipe.path, staged / "recipe", symlinks=False)
        _build_in_container(client, step, progress, staged / "recipe", name, verbose=verbose)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _build_in_container(client: Any, step: BuildStep, progress: BuildProgress, recipe_dir: Path, name: str, *,
                        verbose: bool) -> None:
    stage = f"{step.recipe.name}: install"
    parent = client.images.get(step.parent_ref)
    mounts = [Mount(target=f"{BUILD_MOUNT}/recipe", source=str(recipe_dir), type="bind", read_only=True)]
    build_env = {"DEBIAN_FRONTEND": "noninteractive", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"}
    ca_bundle = host_ca_bundle()
    if ca_bundle:
        mounts.append(Mount(target=f"{BUILD_MOUNT}/ca.crt", source=ca_bundle, type="bind", read_only=True))
        for key in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
            build_env[key] = f"{BUILD_MOUNT}/ca.crt"
    build_env.update({k: os.environ[k] for k in _BUILD_ENV_PASSTHROUGH if os.environ.get(k)})

    progress.update(stage, 0.0, f"starting {step.parent_ref}")
    # Host networking for this step only: the engine may have no bridge, and the kernels
    # built from this image never get it by default.
    container = client.containers.create(
        step.parent_ref, entrypoint=["sleep"], command=["infinity"], name=name, user="0:0",
        network_mode="host", mounts=mounts, working_dir="/", detach=True)
    try:
        container.start()
        script = f"{BUILD_MOUNT}/recipe/{step.recipe.spec['script']}"
        exec_id = client.api.exec_create(container.id, ["/bin/sh", script], user="0:0", environment=build_env,
                                         workdir="/")["Id"]
        tail: deque[str] = deque(maxlen=40)
        fraction = 0.0
        for line in _lines(client.api.exec_start(exec_id, stream=True)):
            tail.append(line)
            if line.startswith("era-progress "):
                _, pct, *text = line.split(" ", 2)
                fraction = max(fraction, int(pct) / 100) if pct.isdigit() else fraction
                progress.update(stage, fraction, text[0] if text else "")
            else:
                if verbose:
                    progress.line(line)
                # Between markers, creep towards the end so a long pip install still
                # shows movement; the next marker moves it on if it is further.
                fraction += (0.99 - fraction) * 0.01
                progress.update(stage, fraction, line[:120])
        exit_code = client.api.exec_inspect(exec_id)["ExitCode"]
        if exit_code != 0:
            raise BuildError(f"{step.recipe.name} recipe failed (exit {exit_code}):\n" + "\n".join(tail))
        container.kill()
        container.wait(timeout=30)
        progress.update(f"{step.recipe.name}: commit", 0.0, "docker commit")
        env = dict(item.split("=", 1) for item in (parent.attrs["Config"].get("Env") or []))
        env.update(step.recipe.spec.get("env", {}))
        labels = {**(parent.attrs["Config"].get("Labels") or {}), **step.labels}
        conf = {"Env": [f"{k}={v}" for k, v in env.items()], "Cmd": step.recipe.spec.get("cmd", ["sh"]),
                "Entrypoint": [], "WorkingDir": step.recipe.spec.get("workdir", "/"), "User": "", "Labels": labels}
        container.commit(repository=step.repository, tag=step.tag, conf=conf, pause=False,
                         message=f"era recipe {step.recipe.name} on {step.parent_ref}")
        progress.update(f"{step.recipe.name}: commit", 1.0, step.ref)
    finally:
        try:
            container.remove(force=True)
        except docker.errors.APIError:
            pass


def _lines(stream: Iterator[bytes]) -> Iterator[str]:
    pending = b""
    for chunk in stream:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            yield raw.decode(errors="replace").rstrip("\r")
    if pending:
        yield pending.decode(errors="replace")
