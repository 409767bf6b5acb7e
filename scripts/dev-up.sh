#!/usr/bin/env bash
# THE one command that starts the maitre stack on a developer's machine:
#
#   scripts/dev-up.sh [--no-build] [--private-pg]
#
#  1. PostgreSQL: scripts/ensure-postgres.sh, or, if that fails, a private
#     throwaway cluster (scripts/ensure-postgres.sh --private, port 55432);
#     --private-pg goes straight to the private cluster.
#  2. cargo build --release -p memory-service -p booking-service
#     (skipped with --no-build).
#  3. memory-service migrate (creates the `maitre` database and its tables),
#     then memory-service serve and booking-service serve in the background,
#     logging to target/dev-logs/<service>.log.
#  4. Waits for both gRPC ports, prints how to reach them, and stays in the
#     foreground: Ctrl-C (or SIGTERM) stops both services, and the private
#     PostgreSQL cluster if this script started it.
#
# Environment (all optional):
#   DATABASE_URL       admin URL of a PostgreSQL server to use; the services
#                      get the same URL with the database name set to `maitre`
#   DEV_MEMORY_ADDR          memory-service gRPC address   (127.0.0.1:50051)
#   DEV_MEMORY_ADMIN_ADDR    memory-service admin address  (127.0.0.1:9101)
#   DEV_BOOKING_ADDR         booking-service gRPC address  (127.0.0.1:50052)
#   DEV_BOOKING_ADMIN_ADDR   booking-service admin address (127.0.0.1:9102)
#   (each service gets its pair as GRPC_ADDR / ADMIN_ADDR)
#   AUTH_MODE          none (loopback, no credentials) or required (README, Security)
#   MAITRE_PG_DIR, MAITRE_PG_PORT  see scripts/ensure-postgres.sh
set -euo pipefail

me="dev-up"
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

build=1
private_only=0
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        --private-pg) private_only=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
        *) die "unknown argument: $arg (usage: $0 [--no-build] [--private-pg])" ;;
    esac
done

target_dir="${CARGO_TARGET_DIR:-$root/target}"
log_dir="$root/target/dev-logs"
memory_grpc="${DEV_MEMORY_ADDR:-127.0.0.1:50051}"
memory_admin="${DEV_MEMORY_ADMIN_ADDR:-127.0.0.1:9101}"
booking_grpc="${DEV_BOOKING_ADDR:-127.0.0.1:50052}"
booking_admin="${DEV_BOOKING_ADMIN_ADDR:-127.0.0.1:9102}"

# ------------------------------------------------------------ helpers
# connect_host ADDR -> host to dial for a listen address (wildcards -> loopback)
connect_host() {
    local host="${1%:*}"
    host="${host#[}"; host="${host%]}"
    case "$host" in
        ""|0.0.0.0) echo 127.0.0.1 ;;
        ::) echo ::1 ;;
        *) echo "$host" ;;
    esac
}
port_of() { echo "${1##*:}"; }
# dial_addr ADDR -> host:port to connect to ([v6]:port for IPv6)
dial_addr() {
    local h
    h="$(connect_host "$1")"
    if [[ "$h" == *:* ]]; then echo "[$h]:$(port_of "$1")"; else echo "$h:$(port_of "$1")"; fi
}
tcp_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
addr_open() { tcp_open "$(connect_host "$1")" "$(port_of "$1")"; }

# app_url URL: the same server URL with the database name set to `maitre`.
app_url() {
    local url="$1" query="" base scheme rest authority
    [[ "$url" == *://* ]] || die "DATABASE_URL must be a postgres:// URL, got: $url"
    base="${url%%\?*}"
    [[ "$url" == *\?* ]] && query="?${url#*\?}"
    scheme="${base%%://*}"
    rest="${base#*://}"
    authority="${rest%%/*}"
    printf '%s://%s/maitre%s\n' "$scheme" "$authority" "$query"
}

# ------------------------------------------------------------ cleanup
pids=()
names=()
private_data=""      # set when this script started a private cluster
cleaned=0
# shellcheck disable=SC2317,SC2329,SC2012  # called from the EXIT trap; ls | sort -V picks the version
cleanup() {
    ((cleaned)) && return 0
    cleaned=1
    local i pid
    for i in "${!pids[@]}"; do
        pid="${pids[$i]}"
        if kill -0 "$pid" 2>/dev/null; then
            log "stopping ${names[$i]} (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for i in "${!pids[@]}"; do
        pid="${pids[$i]}"
        local n=0
        while kill -0 "$pid" 2>/dev/null && ((n < 100)); do sleep 0.1; n=$((n + 1)); done
        if kill -0 "$pid" 2>/dev/null; then
            log "${names[$i]} (pid $pid) did not stop in 10 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "$private_data" ]]; then
        log "stopping the private PostgreSQL cluster ($private_data)"
        local pg_ctl
        pg_ctl="$(ls /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -n 1)" || true
        pg_ctl="${pg_ctl:-pg_ctl}"
        if [[ "$(id -u)" -eq 0 ]]; then
            runuser -u postgres -- "$pg_ctl" -D "$private_data" -m fast -w stop >&2 || true
        else
            "$pg_ctl" -D "$private_data" -m fast -w stop >&2 || true
        fi
    fi
}
trap 'cleanup' EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ------------------------------------------------------------ 1. postgres
admin_url=""
if ((!private_only)); then
    admin_url="$("$root/scripts/ensure-postgres.sh" | tail -n 1)" || admin_url=""
fi
if [[ -z "$admin_url" ]]; then
    log "using a private PostgreSQL cluster (scripts/ensure-postgres.sh --private)"
    pg_port="${MAITRE_PG_PORT:-55432}"
    was_up=0
    tcp_open 127.0.0.1 "$pg_port" && was_up=1
    admin_url="$("$root/scripts/ensure-postgres.sh" --private | tail -n 1)" \
        || die "could not start a private PostgreSQL cluster (see messages above)"
    if ((!was_up)); then
        pg_dir="${MAITRE_PG_DIR:-$root/target/dev-pg}"
        private_data="$(cd "$pg_dir" && pwd)/data"
    fi
fi
db_url="$(app_url "$admin_url")"
log "PostgreSQL admin URL: $admin_url"
log "services use:         $db_url"

# ------------------------------------------------------------ 2. build
if ((build)); then
    log "cargo build --release -p memory-service -p booking-service"
    cargo build --release -p memory-service -p booking-service || die "cargo build failed"
fi
memory_bin="$target_dir/release/memory-service"
booking_bin="$target_dir/release/booking-service"
[[ -x "$memory_bin" ]] || die "$memory_bin not found (run without --no-build?)"
if [[ ! -x "$booking_bin" ]]; then
    log "warning: $booking_bin not built (no binary yet?); starting memory-service only"
    booking_bin=""
fi

# ------------------------------------------------------------ 3. run
mkdir -p "$log_dir"
check_addrs=("$memory_grpc" "$memory_admin")
[[ -z "$booking_bin" ]] || check_addrs+=("$booking_grpc" "$booking_admin")
for addr in "${check_addrs[@]}"; do
    addr_open "$addr" && die "something already listens on $addr (another dev-up running?); stop it or set the DEV_*_ADDR variables"
done

export DATABASE_URL="$db_url"
export BOOKING_MEMORY_URL="${BOOKING_MEMORY_URL:-http://$(dial_addr "$memory_grpc")}"
# A local stack on loopback needs no credentials; the services refuse to run
# open on any other address unless told so (and then warn). Set AUTH_MODE=required
# with AUTH_TOKENS_FILE to try authentication locally (README, Security).
export AUTH_MODE="${AUTH_MODE:-none}"

log "memory-service migrate"
GRPC_ADDR="$memory_grpc" ADMIN_ADDR="$memory_admin" "$memory_bin" migrate 2>&1 | tee "$log_dir/memory-service-migrate.log" >&2 \
    || die "memory-service migrate failed (log: $log_dir/memory-service-migrate.log)"

# start NAME BIN LOG GRPC_ADDR ADMIN_ADDR
start() {
    log "starting $1 (log: $3)"
    GRPC_ADDR="$4" ADMIN_ADDR="$5" "$2" serve >"$3" 2>&1 &
    pids+=("$!")
    names+=("$1")
}
# wait_port NAME ADDR LOG PID
wait_port() {
    local deadline=$((SECONDS + 60))
    until addr_open "$2"; do
        if ! kill -0 "$4" 2>/dev/null; then
            log "$1 exited before listening on $2; last lines of $3:"
            tail -n 30 "$3" >&2 || true
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            log "$1 is not listening on $2 after 60 s; last lines of $3:"
            tail -n 30 "$3" >&2 || true
            exit 1
        fi
        sleep 0.5
    done
    log "$1 listens on $2"
}

memory_log="$log_dir/memory-service.log"
booking_log="$log_dir/booking-service.log"
start memory-service "$memory_bin" "$memory_log" "$memory_grpc" "$memory_admin"
wait_port memory-service "$memory_grpc" "$memory_log" "${pids[0]}"
if [[ -n "$booking_bin" ]]; then
    start booking-service "$booking_bin" "$booking_log" "$booking_grpc" "$booking_admin"
    wait_port booking-service "$booking_grpc" "$booking_log" "${pids[1]}"
fi

# ------------------------------------------------------------ 4. report, wait
grpcurl="grpcurl"
if ! command -v grpcurl >/dev/null 2>&1; then
    tools_bin="${MAITRE_TOOLS_DIR:-${HOME:-/root}/.cache/maitre-tools}/bin"
    if [[ -x "$tools_bin/grpcurl" ]]; then grpcurl="$tools_bin/grpcurl"; fi
fi
mem_dial="$(dial_addr "$memory_grpc")"
book_dial="$(dial_addr "$booking_grpc")"

{
    echo
    echo "maitre is up."
    echo "  memory-service   gRPC $memory_grpc   admin $memory_admin   log $memory_log"
    if [[ -n "$booking_bin" ]]; then
        echo "  booking-service  gRPC $booking_grpc   admin $booking_admin   log $booking_log"
    else
        echo "  booking-service  not built (no binary yet)"
    fi
    echo "  database         $db_url"
    if [[ -n "$private_data" ]]; then
        echo "                   (private cluster, data in $private_data; stopped on exit)"
    fi
    echo
    echo "Try:"
    echo "  $grpcurl -plaintext $mem_dial list"
    echo "  $grpcurl -plaintext -d '{\"service\":\"\"}' $mem_dial grpc.health.v1.Health/Check"
    if [[ -n "$booking_bin" ]]; then
        echo "  $grpcurl -plaintext $book_dial list"
        echo "  $grpcurl -plaintext -d '{\"service\":\"\"}' $book_dial grpc.health.v1.Health/Check"
    fi
    if [[ "$grpcurl" == grpcurl ]] && ! command -v grpcurl >/dev/null 2>&1; then
        echo "  (no grpcurl on PATH: scripts/install-tools.sh installs one and prints its directory)"
    fi
    echo
    echo "Press Ctrl-C to stop."
}

# Stay up until Ctrl-C / SIGTERM (traps above) or until a service exits.
set +e
wait -n "${pids[@]}"
rc=$?
set -e
for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
        log "${names[$i]} exited (status $rc); last lines of its log:"
        if [[ "${names[$i]}" == memory-service ]]; then tail -n 30 "$memory_log" >&2; else tail -n 30 "$booking_log" >&2; fi
    fi
done
exit 1
