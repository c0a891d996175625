#!/bin/sh
# Run by the language image recipes: copies the files beside it (ERA's in-kernel
# helpers, which a recipe's kernels/ directory links to) into the image's venv as the
# package era_kernel.kernels, so kernelspec argvs are the same in Docker as locally:
# python -m era_kernel.kernels.<module>.
set -eu
SOURCE="$(dirname "$0")"
if [ ! -f "$SOURCE/__init__.py" ]; then
    echo "$SOURCE has no files: the image builder must mount the recipe with its symlinks resolved" >&2
    exit 1
fi
SITE="$(/opt/era/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$SITE/era_kernel/kernels"
if [ ! -f "$SITE/era_kernel/__init__.py" ]; then
    printf '"""ERA Kernel, image edition: only era_kernel.kernels, the helpers kernels run."""\n' \
        > "$SITE/era_kernel/__init__.py"
fi
for file in "$SOURCE"/*.py "$SOURCE"/*.js; do
    if [ -f "$file" ]; then cp "$file" "$SITE/era_kernel/kernels/"; fi
done
chmod -R a+rX "$SITE/era_kernel"
# The root filesystem is read-only at run time: compile now.
/opt/era/venv/bin/python -m compileall -q "$SITE/era_kernel" >/dev/null
