#!/bin/sh
# Runs as root inside era/python, with host networking and the host's CA bundle for this
# build step only; committed as era/deno. Deno is published as an npm package with the
# binary inside: npm fetches it here, then npm and Node.js leave again.
set -eu
RECIPE="$(dirname "$0")"
DENO_VERSION=2.9.6  # as scripts/install-languages.sh

echo "era-progress 5 installing npm (for this step only)"
apt-get update -qq
apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null

echo "era-progress 40 fetching deno ${DENO_VERSION}"
npm install --global --prefix /tmp/deno-npm --no-fund --no-audit --loglevel=error "deno@${DENO_VERSION}"
binary="$(find /tmp/deno-npm/lib/node_modules/deno -name deno -type f -perm -u+x | head -n 1)"
[ -n "$binary" ] || { echo "no deno binary in the npm package" >&2; exit 1; }
install -m 0755 "$binary" /usr/local/bin/deno

echo "era-progress 80 removing npm and Node.js"
apt-get purge -y -qq npm nodejs >/dev/null
apt-get autoremove -y -qq --purge >/dev/null
apt-get clean
rm -rf /tmp/deno-npm /var/lib/apt/lists/* /root/.npm /usr/share/doc/* /usr/share/man/*

echo "era-progress 90 installing ERA's kernel helpers"
if [ ! -f "$RECIPE/kernels/install-into-image.sh" ]; then
    echo "kernels/ links to era_kernel/kernels/: the builder must mount the recipe with links resolved" >&2
    exit 1
fi
sh "$RECIPE/kernels/install-into-image.sh"

deno --version
echo "era-progress 100 done"
