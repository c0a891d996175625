#!/usr/bin/env bash
# A try-out cluster on loopback: PostgreSQL (the shared store), an S3 server (moto, the
# shared workspace store), 3 `era serve` replicas and HAProxy in front of them.
#
#   bash scripts/cluster.sh up      # start everything; one line per part
#   bash scripts/cluster.sh status  # what is running
#   bash scripts/cluster.sh down    # stop everything and remove the state directory
#
# Everything lives under $ERA_CLUSTER_DIR (default /tmp/era-cluster): the database, the
# replicas' data directories, logs and pids. Ports: the balancer on $ERA_CLUSTER_PORT
# (default 8800), replicas on the next three, S3 on the fourth. The replicas share one
# API key, made at `up` and kept in the state directory; set ERA_API_KEY to choose it.
# Needs `bash scripts/setup.sh --test` (moto, psycopg); as root, installs PostgreSQL and
# HAProxy from Debian when missing. This is for trying the layout on one machine; see
# docs/deploy.md for production.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dir=${ERA_CLUSTER_DIR:-/tmp/era-cluster}
base=${ERA_CLUSTER_PORT:-8800}
replicas=3
bucket=era-workspaces

say() { printf 'cluster: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Wait until a command succeeds, or fail naming the part and its log.
wait_for() {
    local what=$1 log=$2; shift 2
    for _ in $(seq 1 300); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    say "$what did not come up; the end of its log ($log):"
    tail -n 20 "$log" >&2 || true
    return 1
}

need_packages() {
    local missing=()
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
    command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 || die "install ${missing[*]} first"
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; }
    # Debian's packages start their own services; this cluster runs its own instances.
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now haproxy >/dev/null 2>&1 || true; fi
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_postgres() {
    local bin pg=$dir/pg as=()
    bin=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)")
    mkdir -p "$pg"
    if [ "$(id -u)" -eq 0 ]; then  # PostgreSQL refuses to run as root
        chown postgres: "$pg"
        as=(runuser -u postgres --)
    fi
    "${as[@]}" "$bin/initdb" -D "$pg/data" -U era --auth=trust -E UTF8 --locale=C --no-instructions >"$dir/postgres-init.log" 2>&1 \
        || { tail -n 20 "$dir/postgres-init.log" >&2; die "initdb failed"; }
    # Only a unix socket in the state directory: nothing listens on a TCP port.
    "${as[@]}" setsid "$bin/postgres" -D "$pg/data" -k "$pg" -c listen_addresses= -c max_connections=300 \
        >"$dir/postgres.log" 2>&1 </dev/null &
    store_url="postgresql://era@/era?host=$pg"
    wait_for PostgreSQL "$dir/postgres.log" "${as[@]}" "$bin/psql" -h "$pg" -U era -d postgres -c 'select 1'
    head -n 1 "$pg/data/postmaster.pid" >"$dir/postgres.pid"  # the postmaster itself, not runuser
    "${as[@]}" "$bin/psql" -h "$pg" -U era -d postgres -qc 'CREATE DATABASE era' >/dev/null
    echo "$store_url" >"$dir/store-url"
}

start_s3() {
    local port=$((base + replicas + 1))
    port_free "$port" || die "port $port (S3) is taken; set ERA_CLUSTER_PORT"
    setsid .venv/bin/moto_server -H 127.0.0.1 -p "$port" >"$dir/s3.log" 2>&1 </dev/null &
    echo $! >"$dir/s3.pid"
    s3_url="http://127.0.0.1:$port"
    wait_for "S3 (moto)" "$dir/s3.log" .venv/bin/python - "$s3_url" "$bucket" <<'EOF'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="testing",
                  aws_secret_access_key="testing", region_name="us-east-1")
s3.create_bucket(Bucket=sys.argv[2])
EOF
}

start_replica() {
    local n=$1 port=$((base + n)) id="replica-$1"
    port_free "$port" || die "port $port (replica $n) is taken; set ERA_CLUSTER_PORT"
    mkdir -p "$dir/$id"
    # Each replica: its own data and runtime directories, the same store and workspace store.
    ERA_DATA_DIR="$dir/$id" ERA_HOST=127.0.0.1 ERA_PORT=$port ERA_REPLICA_ID=$id \
    ERA_REPLICA_ADDRESS="http://127.0.0.1:$port" ERA_STORE_URL="$store_url" ERA_API_KEY="$key" \
    ERA_WORKSPACE_URL="s3://$bucket" \
    ERA_WORKSPACE_OPTIONS="{\"key\": \"testing\", \"secret\": \"testing\", \"client_kwargs\": {\"endpoint_url\": \"$s3_url\", \"region_name\": \"us-east-1\"}}" \
        setsid .venv/bin/era serve >"$dir/$id.log" 2>&1 </dev/null &
    echo $! >"$dir/$id.pid"
}

ready() { curl -fsS "$1/health" | grep -q '"ready": true'; }

up() {
    [ -x .venv/bin/era ] && [ -x .venv/bin/moto_server ] || die "run 'bash scripts/setup.sh --test' first (the cluster needs moto and psycopg)"
    [ -d "$dir" ] && [ -n "$(ls -A "$dir" 2>/dev/null)" ] && die "$dir is in use; 'bash scripts/cluster.sh down' first"
    need_packages
    port_free "$base" || die "port $base (balancer) is taken; set ERA_CLUSTER_PORT"
    mkdir -p "$dir"
    key=${ERA_API_KEY:-$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(24))')}
    (umask 077 && echo "$key" >"$dir/api-key")
    start_postgres
    echo "postgres $(cat "$dir/postgres.pid") $store_url"
    start_s3
    echo "s3 $(cat "$dir/s3.pid") $s3_url/$bucket"
    for n in $(seq 1 $replicas); do start_replica "$n"; done
    for n in $(seq 1 $replicas); do
        wait_for "replica-$n" "$dir/replica-$n.log" ready "http://127.0.0.1:$((base + n))"
        echo "replica replica-$n $(cat "$dir/replica-$n.pid") http://127.0.0.1:$((base + n))"
    done
    ERA_BALANCER_BIND="127.0.0.1:$base" ERA_REPLICA_1="127.0.0.1:$((base + 1))" \
    ERA_REPLICA_2="127.0.0.1:$((base + 2))" ERA_REPLICA_3="127.0.0.1:$((base + 3))" \
        setsid haproxy -db -f "$root/deploy/haproxy.cfg" >"$dir/haproxy.log" 2>&1 </dev/null &
    echo $! >"$dir/haproxy.pid"
    wait_for HAProxy "$dir/haproxy.log" ready "http://127.0.0.1:$base"
    echo "balancer http://127.0.0.1:$base"
    echo "key $dir/api-key"
}

status() {
    local part pid
    for f in "$dir"/*.pid; do
        [ -e "$f" ] || { say "nothing running under $dir"; return 0; }
        part=$(basename "$f" .pid); pid=$(cat "$f")
        if kill -0 "$pid" 2>/dev/null; then echo "$part $pid running"; else echo "$part $pid stopped"; fi
    done
}

# Stop these parts together: SIGTERM, then SIGKILL for any still running after 15 s.
stop_parts() {
    local part pid pids=() names=()
    for part in "$@"; do
        alive "$dir/$part.pid" || continue
        pid=$(cat "$dir/$part.pid")
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid"); names+=("$part")
    done
    for i in "${!pids[@]}"; do
        for _ in $(seq 1 150); do kill -0 "${pids[$i]}" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "${pids[$i]}" 2>/dev/null; then
            say "${names[$i]} (${pids[$i]}) did not stop in 15 s; killing it"
            kill -KILL "${pids[$i]}" 2>/dev/null || true
        fi
        echo "stopped ${names[$i]} ${pids[$i]}"
    done
}

down() {
    [ -d "$dir" ] || { say "nothing to stop ($dir does not exist)"; return 0; }
    # The balancer first, then the replicas (SIGTERM: they stop their kernels and leave the
    # registry), then the stores they were writing to.
    stop_parts haproxy
    stop_parts $(for n in $(seq 1 $replicas); do echo "replica-$n"; done)
    stop_parts s3 postgres
    rm -rf "$dir"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: bash scripts/cluster.sh up|status|down" >&2; exit 2 ;;
esac
