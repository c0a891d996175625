#!/bin/sh
# Runs as root inside era/node; committed as era/typescript. tslab (in era/node) is the
# TypeScript kernel too: this only checks that its compiler is there, so the image
# exists under the name the era-typescript kernelspec asks for.
set -eu
echo "era-progress 50 checking tslab's TypeScript compiler"
package="$(/opt/era/venv/bin/python -c 'from era_kernel.kernels.tslab import tslab_package_dir; print(tslab_package_dir())')"
node -e "require(require.resolve('@tslab/typescript-for-tslab', {paths: [process.argv[1] + '/dist']}))" "$package"
echo "era-progress 100 done"
