#!/bin/sh
# Copies ERA's in-kernel helpers (the files linked from era_kernel/kernels/ in this
# recipe's kernels/ directory) into the image's venv as the package era_kernel.kernels,
# so kernelspec argvs are the same in Docker as locally: python -m era_kernel.kernels.X
set -eu
SOURCE="$1"
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
cp "$SOURCE"/* "$SITE/era_kernel/kernels/"
chmod -R a+rX "$SITE/era_kernel"
# The root filesystem is read-only at run time: compile now.
/opt/era/venv/bin/python -m compileall -q "$SITE/era_kernel" >/dev/null
