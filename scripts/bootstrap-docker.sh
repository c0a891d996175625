#!/usr/bin/env bash
# Start a private Docker engine for ERA kernels, as root, idempotently.
#
#   eval "$(sudo scripts/bootstrap-docker.sh)"     # sets DOCKER_HOST for this shell
#
# Installs docker.io, debootstrap, bubblewrap and runsc (gVisor) when missing, then starts
# dockerd on its own socket, data root and exec root (so it never collides with a system
# engine), with no bridge, no iptables and no masquerading: containers get network `none`
# or `host` only, and no registry is needed (images are built by `era images build`).
# gVisor's runsc is registered as the runtimes `runsc` and `runsc-net` (sessions with
# "isolation": "gvisor"), through the engine's own config file (see write_config).
# Running it again while the engine answers only prints the export line; an engine of
# ours that answers without the runsc runtime gets it by a config reload (SIGHUP: no
# restart, running containers untouched).
#
# Everything goes to stderr except the final `export DOCKER_HOST=...` line, so the
# output can be eval'ed. Overrides (environment):
#   ERA_DOCKER_SOCKET     default /run/era-docker.sock   (short: unix socket paths are limited)
#   ERA_DOCKER_DATA_ROOT  default /var/lib/era-docker
#   ERA_DOCKER_EXEC_ROOT  default /run/era-docker
#   ERA_DOCKER_LOG        default /var/log/era-docker.log
#   ERA_DOCKER_WAIT       seconds to wait for the engine, default 30
#   ERA_DOCKER_CONFIG     default ${ERA_DOCKER_EXEC_ROOT}.json (the engine's config file)
set -euo pipefail

SOCKET="${ERA_DOCKER_SOCKET:-/run/era-docker.sock}"
DATA_ROOT="${ERA_DOCKER_DATA_ROOT:-/var/lib/era-docker}"
EXEC_ROOT="${ERA_DOCKER_EXEC_ROOT:-/run/era-docker}"
LOG_FILE="${ERA_DOCKER_LOG:-/var/log/era-docker.log}"
WAIT_SECONDS="${ERA_DOCKER_WAIT:-30}"
PID_FILE="${EXEC_ROOT}.pid"
CONFIG_FILE="${ERA_DOCKER_CONFIG:-${EXEC_ROOT}.json}"
HOST_URL="unix://${SOCKET}"
RUNSC="/usr/bin/runsc"

say() { printf 'bootstrap-docker: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

engine_answers() {
    command -v docker >/dev/null 2>&1 || return 1
    timeout 5 docker --host "$HOST_URL" info >/dev/null 2>&1
}

engine_has_runsc() {
    local runtimes
    runtimes="$(timeout 5 docker --host "$HOST_URL" info --format '{{json .Runtimes}}' 2>/dev/null)" || return 1
    grep -q '"runsc"' <<<"$runtimes" && grep -q '"runsc-net"' <<<"$runtimes"
}

# The engine's config: only the runtimes (every other setting is a flag below, as before).
# Two gVisor runtimes, both on the ptrace platform (no KVM here) and:
#   --host-uds=create  the kernel creates its ZeroMQ IPC sockets in the bind-mounted IPC
#                      directory and the host connects to them; without it they would
#                      exist only inside gVisor's own filesystem view;
#   --oci-seccomp      Docker's seccomp profile applies inside gVisor too (without it,
#                      code could unshare a user namespace there, which runc refuses);
#   runsc: --network=none  no network at all (gVisor's own stack refuses to start in an
#                      engine's namespace when there is no bridge);
#   runsc-net: --network=host  sockets passed through to the container's own network
#                      namespace (the egress network's, or the host's), for sessions with
#                      internet access and setup steps.
write_config() {
    mkdir -p "$(dirname "$CONFIG_FILE")"
    local common='"--platform=ptrace", "--host-uds=create", "--oci-seccomp"'
    cat >"${CONFIG_FILE}.new" <<JSON
{
  "runtimes": {
    "runsc": {"path": "${RUNSC}", "runtimeArgs": [${common}, "--network=none"]},
    "runsc-net": {"path": "${RUNSC}", "runtimeArgs": [${common}, "--network=host"]}
  }
}
JSON
    mv "${CONFIG_FILE}.new" "$CONFIG_FILE"
}

# Our dockerd's pid when it runs with our config file (so a SIGHUP rereads it), else empty.
our_dockerd_with_config() {
    [ -s "$PID_FILE" ] || return 0
    local pid
    pid="$(cat "$PID_FILE")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
        && tr '\0' ' ' <"/proc/${pid}/cmdline" 2>/dev/null | grep -q -- "--config-file ${CONFIG_FILE} "; then
        echo "$pid"
    fi
}

# Already up (second run, or started by someone else on this socket): nothing to do,
# and no root needed for that, unless gVisor is missing from an engine we can reload.
if engine_answers; then
    if ! engine_has_runsc && [ "$(id -u)" -eq 0 ]; then
        if [ ! -x "$RUNSC" ]; then
            say "installing runsc"
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends runsc >&2 \
                || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends runsc >&2; }
        fi
        pid="$(our_dockerd_with_config)"
        if [ -n "$pid" ]; then
            write_config
            kill -HUP "$pid"
            for _ in $(seq 1 20); do engine_has_runsc && break; sleep 0.25; done
        fi
        engine_has_runsc && say "registered runtime runsc (config reloaded)" \
            || say "warning: the engine on ${SOCKET} has no runsc runtime (started without ${CONFIG_FILE}:" \
                   "restart it when no container runs to get gVisor sessions)"
    fi
    say "engine already answering on ${SOCKET}"
    echo "export DOCKER_HOST=${HOST_URL}"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "run as root (installs packages and starts dockerd)"

missing=()
for pkg in docker.io debootstrap bubblewrap runsc; do
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
[ -x "$RUNSC" ] || die "${RUNSC} not found after installing runsc"
write_config

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
        --host "$HOST_URL" --config-file "$CONFIG_FILE" \
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
