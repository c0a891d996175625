"""Container images for ERA kernels, built from recipes kept in this repository.

``era/base`` is made with debootstrap and ``docker import`` (no registry needed); each
language image (``era/python``) runs its recipe script on top and is committed. Tags are
content hashes of the recipes, so an unchanged recipe is never rebuilt; ``:latest`` is a
moving alias. See ``recipes.py`` for the format and ``cli.py`` for ``era images``.
"""

from .build import build_image, current_image, ensure_image, list_images
from .cli import add_images_parser, images_main
from .reference import validate_image_ref, validate_language

__all__ = ["add_images_parser", "build_image", "current_image", "ensure_image", "images_main", "list_images",
           "validate_image_ref", "validate_language"]
