#!/bin/sh
# Runs as root inside era/python, with host networking and the host's CA bundle for this
# build step only; the container is then committed as era/node (and era/typescript
# builds on it). Lines starting with "era-progress <percent>" drive the progress bar.
set -eu
RECIPE="$(dirname "$0")"
TSLAB_VERSION=1.0.22  # as scripts/install-languages.sh: tslab_launcher.js adjusts tslab 1.0.x

echo "era-progress 5 installing Node.js and npm"
apt-get update -qq
apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null

echo "era-progress 45 installing tslab ${TSLAB_VERSION}"
npm install --global --prefix /opt/era/node --no-fund --no-audit --loglevel=error "tslab@${TSLAB_VERSION}"
ln -sfn /opt/era/node/bin/tslab /usr/local/bin/tslab

echo "era-progress 80 cleaning up"
# npm stays: a session's package setup runs in a container of this image (with network)
# and installs `setup.npm` with it; the kernel itself never gets network to use it.
apt-get clean
rm -rf /var/lib/apt/lists/* /root/.npm /usr/share/doc/* /usr/share/man/*

echo "era-progress 90 installing ERA's kernel helpers"
if [ ! -f "$RECIPE/kernels/install-into-image.sh" ]; then
    echo "kernels/ links to era_kernel/kernels/: the builder must mount the recipe with links resolved" >&2
    exit 1
fi
sh "$RECIPE/kernels/install-into-image.sh"

node --version
/opt/era/venv/bin/python -c "from era_kernel.kernels.tslab import tslab_package_dir; print('tslab at', tslab_package_dir())"
echo "era-progress 100 done"
