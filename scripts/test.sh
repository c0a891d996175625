#!/usr/bin/env bash
# Set up everything the tests need and run them: system packages, a private Docker
# engine (as root), the kernel images, the Python environment, then pytest.
#
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --test

if [ "$(id -u)" -eq 0 ]; then
    eval "$(bash scripts/bootstrap-docker.sh)"
    export DOCKER_HOST
    # Images are tagged by a hash of their recipe: unchanged recipes are not rebuilt.
    for language in python node typescript deno bash go; do
        .venv/bin/era images build --language "$language"
    done
fi

exec .venv/bin/python -m pytest -q "$@"
