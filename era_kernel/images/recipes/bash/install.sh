#!/bin/sh
# Runs as root inside era/python; committed as era/bash. Nothing to fetch: bash is in
# the base image and the kernel is ERA's own.
set -eu
RECIPE="$(dirname "$0")"
echo "era-progress 50 installing ERA's kernel helpers"
if [ ! -f "$RECIPE/kernels/install-into-image.sh" ]; then
    echo "kernels/ links to era_kernel/kernels/: the builder must mount the recipe with links resolved" >&2
    exit 1
fi
sh "$RECIPE/kernels/install-into-image.sh"
bash --version | head -n 1
echo "era-progress 100 done"
