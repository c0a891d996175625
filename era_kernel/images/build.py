"""Build chains, the cache check, and the async entry point the provisioner uses."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from typing import Any, TextIO

import docker
import docker.errors

from ..config import Settings
from .builders import BuildError, build_debootstrap, build_script
from .progress import BuildProgress
from .recipes import LABEL_FROM, LABEL_HASH, LABEL_RECIPE, LABEL_SOURCE, BuildStep, plan_chain
from .reference import validate_image_ref, validate_language

log = logging.getLogger("era.images")

# Relative cost of each stage, for the progress bar.
_WEIGHTS = {"debootstrap": 60.0, "import": 10.0, "install": 25.0, "commit": 3.0}
# One build at a time in this process: concurrent kernel starts asking for the same
# missing image must not run debootstrap twice.
_BUILD_LOCK = threading.Lock()


def docker_client(timeout: int = 600) -> Any:
    """A client for the engine named by DOCKER_HOST (read now, not at import)."""
    return docker.from_env(timeout=timeout)


def image_prefix(settings: Settings | None = None) -> str:
    settings = settings or Settings.from_env()
    return settings["ERA_DOCKER_IMAGE_PREFIX"]


def _image_or_none(client: Any, ref: str) -> Any:
    try:
        return client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None


def _resolve_from_image(client: Any, from_image: str, progress: BuildProgress) -> str:
    """The id of the official image to start from, pulling it when it is not here."""
    image = _image_or_none(client, from_image)
    if image is None:
        progress.update("pull", 0.0, f"pulling {from_image}")
        try:
            image = client.images.pull(from_image)
        except Exception as exc:  # no registry reachable: say so plainly
            raise BuildError(f"cannot pull {from_image}: {exc}") from exc
        progress.update("pull", 1.0, from_image)
    return image.id


def build_image(language: str, *, client: Any = None, from_image: str | None = None, force: bool = False,
                prefix: str | None = None, verbose: bool = False, stream: TextIO | None = None,
                show_progress: bool = True, workdir: str | None = None, mirror: str | None = None) -> str:
    """Build ``<prefix>/<language>`` and whatever it needs; return its hash-tagged ref.

    Images whose tag already exists are reused (that is the cache: the tag is the hash of
    the recipe and its parent). ``force`` rebuilds the requested image only, not its parents.
    Blocking: async code calls :func:`ensure_image`.
    """
    validate_language(language)
    client = client or docker_client()
    prefix = prefix or image_prefix()
    with _BUILD_LOCK:
        progress = BuildProgress([], stream or sys.stderr, enabled=show_progress)
        from_id = ""
        if from_image:
            validate_image_ref(from_image, field="from")
            from_id = _resolve_from_image(client, from_image, progress)
        chain = plan_chain(language, prefix=prefix, from_image=from_image, from_image_id=from_id)
        todo = [s for s in chain if (force and s is chain[-1]) or _image_or_none(client, s.ref) is None]
        if not todo:
            _point_latest(client, chain[-1])
            return chain[-1].ref
        progress = BuildProgress(_stages(todo), stream or sys.stderr, enabled=show_progress)
        for step in todo:
            log.info("building %s (%s)", step.ref, step.recipe.kind)
            replaced = _image_or_none(client, step.ref)  # only with --force
            if step.recipe.kind == "debootstrap":
                build_debootstrap(client, step, progress, workdir=workdir, mirror=mirror, verbose=verbose)
            else:
                build_script(client, step, progress, verbose=verbose)
            _point_latest(client, step)
            if replaced is not None:
                _remove_if_unused(client, replaced.id)
        progress.finish(f"built {chain[-1].ref}")
        return chain[-1].ref


def _stages(steps: list[BuildStep]) -> list[tuple[str, float]]:
    stages = []
    for step in steps:
        parts = ("debootstrap", "import") if step.recipe.kind == "debootstrap" else ("install", "commit")
        stages += [(f"{step.recipe.name}: {part}", _WEIGHTS[part]) for part in parts]
    return stages


def _remove_if_unused(client: Any, image_id: str) -> None:
    """Drop the image a forced rebuild replaced, unless a container or child still uses it."""
    try:
        client.api.remove_image(image_id, noprune=False)
    except docker.errors.APIError:
        pass


def _point_latest(client: Any, step: BuildStep) -> None:
    client.api.tag(step.ref, step.repository, "latest")


def current_image(language: str, *, client: Any = None, prefix: str | None = None) -> str | None:
    """The hash-tagged ref of ``<prefix>/<language>:latest`` if it matches today's recipes.

    ``latest`` may have been built ``--from`` an official image: that choice is kept, and
    only a change of the recipe files (ours or a parent's) makes it stale.
    """
    client = client or docker_client()
    prefix = prefix or image_prefix()
    latest = _image_or_none(client, f"{prefix}/{language}:latest")
    if latest is None:
        return None
    labels = latest.labels or {}
    if labels.get(LABEL_RECIPE) != language:
        return None
    from_image = labels.get(LABEL_FROM) or None
    chain = plan_chain(language, prefix=prefix, from_image=from_image)
    if labels.get(LABEL_SOURCE) != chain[-1].source:
        return None
    ref = f"{prefix}/{language}:{labels.get(LABEL_HASH)}"
    return ref if ref in (latest.tags or []) else f"{prefix}/{language}:latest"


async def ensure_image(language: str, client: Any = None, *, from_image: str | None = None,
                       force: bool = False) -> str:
    """Return the image ref for ``language``, building it first if it is missing or stale.

    A cache hit costs two Docker API calls. A miss runs the whole build (a minute or more
    for the debootstrap base) in a worker thread, logging progress lines.
    """
    validate_language(language)
    prefix = image_prefix()

    def run() -> str:
        docker = client or docker_client()
        if not force and from_image is None:
            ref = current_image(language, client=docker, prefix=prefix)
            if ref is not None:
                return ref
            latest = _image_or_none(docker, f"{prefix}/{language}:latest")
            keep_from = (latest.labels or {}).get(LABEL_FROM) if latest is not None else None
            return build_image(language, client=docker, from_image=keep_from or None, prefix=prefix,
                               stream=_LogStream(), show_progress=True)
        return build_image(language, client=docker, from_image=from_image, force=force, prefix=prefix,
                           stream=_LogStream(), show_progress=True)

    return await asyncio.to_thread(run)


def list_images(client: Any = None) -> list[dict[str, Any]]:
    """Every image built from a recipe: ref, id, size, creation time, whether it is latest."""
    client = client or docker_client()
    rows = []
    for image in client.images.list(filters={"label": LABEL_RECIPE}):
        labels = image.labels or {}
        tags = image.tags or []
        hashed = [t for t in tags if t.endswith(":" + labels.get(LABEL_HASH, "?"))]
        rows.append({
            "ref": hashed[0] if hashed else (tags[0] if tags else image.short_id),
            "id": image.short_id.removeprefix("sha256:"),
            "recipe": labels.get(LABEL_RECIPE, ""),
            "from": labels.get(LABEL_FROM, ""),
            "latest": any(t.endswith(":latest") for t in tags),
            "size": image.attrs.get("Size", 0),
            "created": image.attrs.get("Created", ""),
        })
    return sorted(rows, key=lambda r: (r["recipe"], r["created"]), reverse=False)


class _LogStream:
    """Progress lines of builds started by the engine go to the log, not a terminal."""

    def write(self, text: str) -> None:
        text = text.strip()
        if text:
            log.info("image build: %s", text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False
