"""Image recipes kept in the repository, and the content hashes that name their images.

A recipe is a directory under ``recipes/`` with a ``recipe.json``:

- ``kind: "debootstrap"`` (``base``): a Debian root filesystem made by debootstrap and
  imported with ``docker import`` -- no registry involved;
- ``kind: "script"`` (one per language): a shell script run as root in a container of
  the parent image (host network and CA bundle for that step only), then committed.

An image is tagged ``<prefix>/<recipe>:<12 hex>``, the hash covering every file of the
recipe and the parent's reference (itself a hash, or the image id of an official image
given with ``--from``), so an unchanged recipe maps to an existing tag and is not
rebuilt. ``<prefix>/<recipe>:latest`` is a moving alias to the last built one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadRequest, NotFound
from .reference import validate_image_ref, validate_language

RECIPES_DIR = Path(__file__).with_name("recipes")
HASH_LENGTH = 12
# Bumped when the build procedure itself changes in a way that changes images.
BUILD_VERSION = "era-image-v1"

# Image labels: how a built image remembers where it came from.
LABEL_RECIPE = "era.recipe"
LABEL_HASH = "era.recipe.hash"          # the tag of this image
LABEL_SOURCE = "era.recipe.source"      # hash of the recipe files of the whole chain
LABEL_FROM = "era.recipe.from"          # official image given with --from, if any
LABEL_PARENT = "era.recipe.parent"


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    spec: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.spec["kind"]

    @property
    def parent(self) -> str | None:
        return self.spec.get("parent")

    def files_digest(self) -> str:
        """sha256 over every file of the recipe directory (names and contents)."""
        digest = hashlib.sha256(BUILD_VERSION.encode())
        for file in sorted(p for p in self.path.rglob("*") if p.is_file()):
            digest.update(b"\0" + file.relative_to(self.path).as_posix().encode() + b"\0")
            digest.update(file.read_bytes())
        return digest.hexdigest()


def load_recipe(name: str) -> Recipe:
    validate_language(name, field="language")
    path = RECIPES_DIR / name
    spec_file = path / "recipe.json"
    if not spec_file.is_file():
        available = ", ".join(available_recipes()) or "none"
        raise NotFound(f"no image recipe for {name!r} (available: {available})", field="language")
    spec = json.loads(spec_file.read_text())
    if spec.get("kind") not in {"debootstrap", "script"}:
        raise BadRequest(f"recipe {name!r} has unknown kind {spec.get('kind')!r}")
    return Recipe(name, path, spec)


def available_recipes() -> list[str]:
    return sorted(p.name for p in RECIPES_DIR.iterdir() if (p / "recipe.json").is_file())


def short_hash(*parts: str) -> str:
    digest = hashlib.sha256("\0".join(parts).encode())
    return digest.hexdigest()[:HASH_LENGTH]


@dataclass
class BuildStep:
    """One image of a build chain: what to build, on top of what, under which tag."""

    recipe: Recipe
    repository: str           # e.g. era/python
    tag: str                  # content hash
    parent_ref: str | None    # image to start from (None for debootstrap)
    source: str               # hash of the chain's recipe files (no image ids)
    from_image: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"

    @property
    def latest(self) -> str:
        return f"{self.repository}:latest"


def plan_chain(name: str, *, prefix: str, from_image: str | None = None, from_image_id: str = "") -> list[BuildStep]:
    """The ordered steps that produce image ``name``, parents first.

    With ``from_image`` the chain stops there: the language recipe runs on top of that
    image (which must have ``python3 -m venv``) instead of ``<prefix>/base``. Its image id
    enters the hash, so a moved upstream tag gives a new image.
    """
    validate_image_ref(f"{prefix}/{name}", field="prefix")
    recipe = load_recipe(name)
    if from_image is not None:
        validate_image_ref(from_image, field="from")
        if recipe.kind != "script":
            raise BadRequest(f"--from applies to language recipes, not {name!r}", field="from")
        source = short_hash(recipe.files_digest(), "from=" + from_image)
        tag = short_hash(recipe.files_digest(), "parent=" + from_image, "id=" + from_image_id)
        return [_step(recipe, prefix, tag, from_image, source, from_image)]
    if recipe.parent is None:
        source = short_hash(recipe.files_digest())
        return [_step(recipe, prefix, source, None, source, None)]
    parents = plan_chain(recipe.parent, prefix=prefix)
    parent = parents[-1]
    source = short_hash(recipe.files_digest(), "parent-source=" + parent.source)
    tag = short_hash(recipe.files_digest(), "parent=" + parent.ref)
    return [*parents, _step(recipe, prefix, tag, parent.ref, source, None)]


def _step(recipe: Recipe, prefix: str, tag: str, parent_ref: str | None, source: str,
          from_image: str | None) -> BuildStep:
    labels = {LABEL_RECIPE: recipe.name, LABEL_HASH: tag, LABEL_SOURCE: source}
    if parent_ref:
        labels[LABEL_PARENT] = parent_ref
    if from_image:
        labels[LABEL_FROM] = from_image
    return BuildStep(recipe, f"{prefix}/{recipe.name}", tag, parent_ref, source, from_image, labels)
