#!/bin/sh
# Runs as root inside era/python; committed as era/bash. Nothing to fetch: bash is in
# the base image and the kernel is ERA's own.
set -eu
RECIPE="$(dirname "$0")"
echo "era-progress 50 installing ERA's kernel helpers"
sh "$RECIPE/install-kernels.sh" "$RECIPE/kernels"
bash --version | head -n 1
echo "era-progress 100 done"
