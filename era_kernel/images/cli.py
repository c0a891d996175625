"""``era images build`` and ``era images list``: the argparse hook for ``era_kernel.cli``.

Wiring, in the main parser::

    from era_kernel.images import add_images_parser
    add_images_parser(subparsers)          # subparsers = parser.add_subparsers(...)
    ...
    args = parser.parse_args(argv)
    return args.func(args)                 # images_main: returns an exit code
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import EraError


def add_images_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("images", help="build and list the kernel container images",
                                   description="Build and list the container images of the era-docker provisioner.")
    commands = parser.add_subparsers(dest="images_command", metavar="{build,list}")
    commands.required = True

    build = commands.add_parser("build", help="build an image (and its parents) unless it is up to date")
    build.add_argument("--language", default="python", help="recipe to build: a language, or 'base' (default python)")
    build.add_argument("--from", dest="from_image", metavar="IMAGE", default=None,
                       help="start from this image (e.g. python:3.11-slim, pulled if a registry is reachable) "
                            "instead of the debootstrap-built base")
    build.add_argument("--force", action="store_true", help="rebuild the image even if its tag exists")
    build.add_argument("--verbose", action="store_true", help="stream the build's log lines")
    build.add_argument("--mirror", default=None, help="Debian mirror URL for debootstrap (default: debootstrap's)")
    build.add_argument("--workdir", default=None, help="where the temporary root filesystem goes (default: $TMPDIR)")

    commands.add_parser("list", help="list images built from recipes")
    parser.set_defaults(func=images_main)
    return parser


def images_main(args: argparse.Namespace) -> int:
    from .build import build_image, list_images

    try:
        if args.images_command == "build":
            ref = build_image(args.language, from_image=args.from_image, force=args.force, verbose=args.verbose,
                              mirror=args.mirror, workdir=args.workdir)
            print(ref)
            return 0
        rows = list_images()
        print(f"{'IMAGE':<32} {'ID':<14} {'SIZE':>9}  {'LATEST':<6} FROM")
        for row in rows:
            size = f"{row['size'] / 1024**2:.0f} MiB"
            print(f"{row['ref']:<32} {row['id'][:12]:<14} {size:>9}  {'yes' if row['latest'] else '':<6} {row['from']}")
        return 0
    except EraError as exc:
        print(f"era images: {exc.message}", file=sys.stderr)
        return 1
    except Exception as exc:  # engine unreachable and the like: one line, no traceback
        if type(exc).__module__.startswith(("docker", "requests", "urllib3")):
            print(f"era images: Docker engine error: {exc} (is DOCKER_HOST set? see scripts/bootstrap-docker.sh)",
                  file=sys.stderr)
            return 1
        raise
