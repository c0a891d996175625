#!/bin/sh
# Runs as root inside era/python, with host networking for this build step only;
# committed as era/go.
set -eu
RECIPE="$(dirname "$0")"

echo "era-progress 5 installing Go"
apt-get update -qq
apt-get install -y -qq --no-install-recommends golang-go >/dev/null

echo "era-progress 70 trimming"
# Tests and test data of the standard library are never built by a kernel; the sources
# themselves stay (go build checks them against the precompiled packages).
SRC="$(readlink -f "$(go env GOROOT)/src")"  # Debian keeps it under /usr/share
find "$SRC" -name '*_test.go' -delete
find "$SRC" -depth -type d -name testdata -exec rm -rf {} +
rm -rf "$SRC/../test" "$SRC/../api"
apt-get clean
rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/*

echo "era-progress 85 installing ERA's kernel helpers"
if [ ! -f "$RECIPE/kernels/install-into-image.sh" ]; then
    echo "kernels/ links to era_kernel/kernels/: the builder must mount the recipe with links resolved" >&2
    exit 1
fi
sh "$RECIPE/kernels/install-into-image.sh"

# A program using the standard library builds without a C compiler or network.
mkdir -p /tmp/era-go-check && cd /tmp/era-go-check
printf 'package main\n\nimport (\n\t"fmt"\n\t"net/http"\n)\n\nfunc main() { fmt.Println(http.StatusOK) }\n' > main.go
GOCACHE=/tmp/era-go-check/cache GOFLAGS=-mod=mod go mod init era.check >/dev/null 2>&1
GOCACHE=/tmp/era-go-check/cache go build -o check . && ./check
cd / && rm -rf /tmp/era-go-check
go version
echo "era-progress 100 done"
