#!/usr/bin/env bash
# Set up ERA Kernel on a fresh Debian/Ubuntu machine: system packages (as root) and a
# Python virtual environment in .venv with the project installed editable.
#
#   bash scripts/setup.sh            # runtime only
#   bash scripts/setup.sh --test     # plus the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test,bench,postgres]"  # the tests check the bench report writers too

say() { printf 'setup: %s\n' "$*" >&2; }

# bubblewrap sandboxes local kernels; util-linux gives prlimit and setpriv.
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    missing=()
    command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
    command -v prlimit >/dev/null 2>&1 || missing+=(util-linux)
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    # A C compiler for the forked kernels' init (below).
    if ! command -v cc >/dev/null 2>&1 || [ ! -e /usr/include/stdio.h ]; then missing+=(gcc libc6-dev); fi
    # The egress tests build their "internet" in a network namespace with a self-signed certificate.
    if [ "${1:-}" = "--test" ] && ! command -v ip >/dev/null 2>&1; then missing+=(iproute2); fi
    if [ "${1:-}" = "--test" ] && ! command -v openssl >/dev/null 2>&1; then missing+=(openssl); fi
    # The PostgreSQL store's tests start a throwaway cluster (tests/support/postgres.py).
    if [ "${1:-}" = "--test" ] && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
        missing+=(postgresql)
    fi
    # The web console's tests drive Debian's chromium through Playwright (tests/test_console.py).
    if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then missing+=(chromium); fi
    # The replica tests put Debian's HAProxy in front of several servers (scripts/cluster.sh too).
    if [ "${1:-}" = "--test" ] && ! command -v haproxy >/dev/null 2>&1; then missing+=(haproxy); fi
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
    # Node, TypeScript, Deno and Go kernels for local sessions (idempotent; fast when done).
    bash scripts/install-languages.sh >&2
elif ! command -v bwrap >/dev/null 2>&1; then
    say "bubblewrap is not installed and we are not root: local kernels will run UNSANDBOXED"
fi

# The Python of .venv. Python kernels fork from a zygote of it, and on CPython 3.12 and
# 3.13 the zygote makes its objects immortal before it forks (PEP 683), so each idle
# kernel copies about 6 MiB less of the zygote's memory (README, Fast kernels): a 3.13 or
# 3.12 (with the GIL) found on PATH or under pyenv is preferred to python3; 3.13 first,
# as fast as 3.11 here where 3.12 was slower. ERA_PYTHON names another.
pick_python() {
    if [ -n "${ERA_PYTHON:-}" ]; then echo "$ERA_PYTHON"; return; fi
    local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}" candidate
    for candidate in python3.13 python3.12 "$pyenv_root"/versions/3.13*/bin/python3.13 \
                     "$pyenv_root"/versions/3.12*/bin/python3.12; do
        if "$candidate" -c 'import sys, sysconfig, venv, ensurepip
sys.exit(sys.version_info[:2] not in ((3, 12), (3, 13)) or bool(sysconfig.get_config_var("Py_GIL_DISABLED")))' \
                >/dev/null 2>&1; then
            echo "$candidate"; return
        fi
    done
    echo python3
}

if [ ! -x .venv/bin/python ]; then
    python="$(pick_python)"
    say "creating .venv with $("$python" -c 'import sys; print("Python", sys.version.split()[0])') ($python)"
    "$python" -m venv .venv
fi
say "installing era-kernel${extras} into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >&2
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}" >&2
# The forked kernels' pid 1 (era_kernel/provisioning/fork_init.c): a static program that
# keeps a few KiB a kernel, where a copy of the zygote's Python kept some 4 MiB.
init_src=era_kernel/provisioning/fork_init.c
if command -v cc >/dev/null 2>&1; then
    mkdir -p .venv/libexec
    if cc -O2 -s -static -o .venv/libexec/era-fork-init.new "$init_src" 2>/dev/null \
        || cc -O2 -s -o .venv/libexec/era-fork-init.new "$init_src" >&2; then
        mv -f .venv/libexec/era-fork-init.new .venv/libexec/era-fork-init
    else
        say "could not build $init_src: forked kernels keep their init in Python (era doctor says so)"
    fi
else
    say "no C compiler: forked kernels keep their init in Python (era doctor says so)"
fi
say "done: $(.venv/bin/era --help >/dev/null && echo 'era is at .venv/bin/era')"
