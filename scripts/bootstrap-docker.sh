#!/usr/bin/env bash
# Start a private Docker engine for ERA kernels, as root, idempotently.
#
#   eval "$(sudo scripts/bootstrap-docker.sh)"     # sets DOCKER_HOST for this shell
#
# Installs docker.io, debootstrap and bubblewrap when missing, then starts dockerd on its
# own socket, data root and exec root (so it never collides with a system engine), with
# no bridge, no iptables and no masquerading: containers get network `none` or `host`
# only, and no registry is needed (images are built by `era images build`).
# Running it again while the engine answers only prints the export line.
#
# Everything goes to stderr except the final `export DOCKER_HOST=...` line, so the
# output can be eval'ed. Overrides (environment):
#   ERA_DOCKER_SOCKET     default /run/era-docker.sock   (short: unix socket paths are limited)
#   ERA_DOCKER_DATA_ROOT  default /var/lib/era-docker
#   ERA_DOCKER_EXEC_ROOT  default /run/era-docker
#   ERA_DOCKER_LOG        default /var/log/era-docker.log
#   ERA_DOCKER_WAIT       seconds to wait for the engine, default 30
set -euo pipefail

SOCKET="${ERA_DOCKER_SOCKET:-/run/era-docker.sock}"
DATA_ROOT="${ERA_DOCKER_DATA_ROOT:-/var/lib/era-docker}"
EXEC_ROOT="${ERA_DOCKER_EXEC_ROOT:-/run/era-docker}"
LOG_FILE="${ERA_DOCKER_LOG:-/var/log/era-docker.log}"
WAIT_SECONDS="${ERA_DOCKER_WAIT:-30}"
PID_FILE="${EXEC_ROOT}.pid"
HOST_URL="unix://${SOCKET}"

say() { printf 'bootstrap-docker: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

engine_answers() {
    command -v docker >/dev/null 2>&1 || return 1
    timeout 5 docker --host "$HOST_URL" info >/dev/null 2>&1
}

# Already up (second run, or started by someone else on this socket): nothing to do,
# and no root needed for that.
if engine_answers; then
    say "engine already answering on ${SOCKET}"
    echo "export DOCKER_HOST=${HOST_URL}"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "run as root (installs packages and starts dockerd)"

missing=()
for pkg in docker.io debootstrap bubblewrap; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    # No recommends: they bring git, perl and needrestart (which restarts services on
    # later upgrades); docker.io already depends on tini, its docker-init.
    apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi
command -v dockerd >/dev/null 2>&1 || die "dockerd not found after installing docker.io"

# A dockerd we started earlier may still be starting up: wait for it instead of
# launching a second one on the same data root.
running_pid=""
if [ -s "$PID_FILE" ]; then
    candidate="$(cat "$PID_FILE")"
    if [ -n "$candidate" ] && kill -0 "$candidate" 2>/dev/null \
        && grep -q dockerd "/proc/${candidate}/cmdline" 2>/dev/null; then
        running_pid="$candidate"
        say "dockerd (pid ${running_pid}) is running but not answering yet; waiting"
    fi
fi

if [ -z "$running_pid" ]; then
    mkdir -p "$DATA_ROOT" "$(dirname "$SOCKET")" "$(dirname "$LOG_FILE")"
    say "starting dockerd on ${SOCKET} (data root ${DATA_ROOT}, log ${LOG_FILE})"
    # setsid + nohup: the engine outlives this script and the caller's terminal.
    # Own containerd namespaces: on a machine whose system dockerd shares the system
    # containerd, the two engines never see each other's containers.
    setsid nohup dockerd \
        --iptables=false --ip-masq=false --bridge=none \
        --data-root "$DATA_ROOT" --exec-root "$EXEC_ROOT" --pidfile "$PID_FILE" \
        --containerd-namespace era-docker --containerd-plugins-namespace era-docker-plugins \
        --host "$HOST_URL" \
        >>"$LOG_FILE" 2>&1 </dev/null &
    running_pid=$!
fi

deadline=$((SECONDS + WAIT_SECONDS))
until engine_answers; do
    if ! kill -0 "$running_pid" 2>/dev/null; then
        say "dockerd exited; last lines of ${LOG_FILE}:"
        tail -n 20 "$LOG_FILE" >&2 || true
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        say "dockerd did not answer within ${WAIT_SECONDS}s; last lines of ${LOG_FILE}:"
        tail -n 20 "$LOG_FILE" >&2 || true
        exit 1
    fi
    sleep 0.5
done

say "engine ready (pid ${running_pid})"
echo "export DOCKER_HOST=${HOST_URL}"
