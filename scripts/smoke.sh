#!/usr/bin/env bash
# The release binaries, run for real, for CI's smoke steps (.ci/run names
# each one):
#
#   scripts/smoke.sh start        fresh database maitre_ci_smoke, both services
#                                 on high ports, wait until both are SERVING
#                                 and serve /metrics
#   scripts/smoke.sh run CMD...   CMD with MEMORY_ADDR, BOOKING_ADDR and
#                                 GRPCURL pointing at that stack
#   scripts/smoke.sh stop         SIGTERM to both: each must exit 0 within 20 s
#   scripts/smoke.sh logs         the last lines of the running stack's logs
#
# Needs target/release/{memory-service,booking-service} (cargo build
# --release) and grpcurl (scripts/install-tools.sh). Follow-ups are due at
# once (BOOKING_FOLLOWUP_DELAY=0s) and reminders 5 s before the event
# (BOOKING_REMINDER_LEAD=5s) so the clients see them. With
# SMOKE_POOLER=host:port, `start` runs both services through that
# transaction-mode pooler (DB_POOLER=transaction, DATABASE_DIRECT_URL
# straight to the server; scripts/pooler-check.sh). The stack's
# ports and pids are in target/ci-smoke/stack.env, logs next to it; `stop`
# does nothing when no stack runs, so it can sit in an EXIT trap.
set -euo pipefail

me="smoke"
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
dir="$root/target/ci-smoke"
state="$dir/stack.env"
database=maitre_ci_smoke
services=(memory-service booking-service)

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# free_port PREFERRED: PREFERRED when nothing listens there, else any free port.
free_port() {
    if ! tcp_open "$1"; then
        echo "$1"
    else
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    fi
}

# with_database ADMIN_URL NAME: the same server URL with the database set to NAME.
with_database() {
    python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$1" "$2"
}

# with_host URL HOST:PORT: the same URL pointing at another server.
with_host() {
    python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); cred = p.netloc.rpartition("@"); print(u.urlunsplit(p._replace(netloc=cred[0] + cred[1] + sys.argv[2])))' "$1" "$2"
}

grpcurl_bin() { echo "${GRPCURL:-$(scripts/install-tools.sh 2>/dev/null | tail -n 1)/grpcurl}"; }

# launch NAME ENV...: starts target/release/NAME serve in the background. A
# watcher subshell waits for it and writes its exit status to NAME.rc, so
# `stop`, a later process, can tell a clean exit from a crash.
launch() {
    local name="$1"
    shift
    rm -f "$dir/$name.rc"
    (
        env "$@" "$target_dir/release/$name" serve >"$dir/$name.log" 2>&1 &
        echo "$!" >"$dir/$name.pid"
        rc=0
        wait "$!" || rc=$?
        echo "$rc" >"$dir/$name.rc"
    ) </dev/null >/dev/null 2>&1 &
    local n=0
    until [[ -s "$dir/$name.pid" ]] || ((n++ > 50)); do sleep 0.1; done
}

# wait_serving NAME PORT HEALTH_SERVICE: until grpc.health.v1 says SERVING.
wait_serving() {
    local deadline=$((SECONDS + 60)) answer=""
    while :; do
        [[ ! -e "$dir/$1.rc" ]] || die "$1 exited (status $(cat "$dir/$1.rc")) before it was ready; log: $dir/$1.log"
        answer="$("$grpcurl" -plaintext -max-time 2 -d "{\"service\":\"$3\"}" \
            "127.0.0.1:$2" grpc.health.v1.Health/Check 2>&1)" || true
        if [[ "$answer" == *'"SERVING"'* ]]; then
            log "$1 is SERVING on 127.0.0.1:$2"
            return 0
        fi
        ((SECONDS < deadline)) || die "$1 not SERVING after 60 s; last answer: $answer"
        sleep 0.2
    done
}

start() {
    [[ ! -f "$state" ]] || die "a smoke stack is already running ($state); run: scripts/smoke.sh stop"
    local name
    for name in "${services[@]}"; do
        [[ -x "$target_dir/release/$name" ]] || die "$target_dir/release/$name not built (cargo build --release)"
    done
    grpcurl="$(grpcurl_bin)"
    [[ -x "$grpcurl" ]] || die "grpcurl not found at $grpcurl (scripts/install-tools.sh)"
    command -v psql >/dev/null 2>&1 || die "psql not found (apt-get install postgresql-client)"

    local admin_url url
    admin_url="$(scripts/ensure-postgres.sh | tail -n 1)"
    [[ -n "$admin_url" ]] || die "scripts/ensure-postgres.sh printed no URL"
    log "fresh database $database on $admin_url"
    local sql
    for sql in "DROP DATABASE IF EXISTS $database WITH (FORCE)" "CREATE DATABASE $database"; do
        psql "$admin_url" -v ON_ERROR_STOP=1 -qX -c "$sql" || die "$sql failed"
    done
    url="$(with_database "$admin_url" "$database")"

    local memory_port booking_port memory_admin booking_admin
    memory_port="$(free_port 55051)"
    booking_port="$(free_port 55052)"
    memory_admin="$(free_port 59101)"
    booking_admin="$(free_port 59102)"
    mkdir -p "$dir"
    log "memory-service  gRPC 127.0.0.1:$memory_port  admin 127.0.0.1:$memory_admin"
    log "booking-service gRPC 127.0.0.1:$booking_port  admin 127.0.0.1:$booking_admin"

    # No auth (loopback only), no TLS, whatever the caller's environment says.
    local -a common=(-u AUTH_TOKENS -u AUTH_TOKENS_FILE -u AUTH_GRANTS -u TLS_CERT_FILE -u TLS_KEY_FILE
        -u TLS_CLIENT_CA_FILE -u BOOKING_MEMORY_TOKEN_FILE -u BOOKING_MEMORY_CA_FILE
        -u BOOKING_MEMORY_CLIENT_CERT_FILE -u BOOKING_MEMORY_CLIENT_KEY_FILE
        AUTH_MODE=none DATABASE_URL="$url" RUST_LOG="${RUST_LOG:-info}" NO_COLOR=1)
    if [[ -n "${SMOKE_POOLER:-}" ]]; then
        log "both services through the pooler at $SMOKE_POOLER (DB_POOLER=transaction)"
        common+=(DATABASE_URL="$(with_host "$url" "$SMOKE_POOLER")" DATABASE_DIRECT_URL="$url" DB_POOLER=transaction)
    fi
    {
        echo "MEMORY_ADDR=127.0.0.1:$memory_port"
        echo "BOOKING_ADDR=127.0.0.1:$booking_port"
        echo "GRPCURL=$grpcurl"
    } >"$state"

    launch memory-service "${common[@]}" GRPC_ADDR="127.0.0.1:$memory_port" ADMIN_ADDR="127.0.0.1:$memory_admin"
    wait_serving memory-service "$memory_port" maitre.memory.v1.MemoryService
    launch booking-service "${common[@]}" GRPC_ADDR="127.0.0.1:$booking_port" ADMIN_ADDR="127.0.0.1:$booking_admin" \
        BOOKING_MEMORY_URL="http://127.0.0.1:$memory_port" \
        BOOKING_FOLLOWUP_DELAY=0s BOOKING_REMINDER_LEAD=5s BOOKING_WORKER_POLL_INTERVAL=100ms \
        BOOKING_FOLLOWUP_RETRY_BASE=200ms BOOKING_FOLLOWUP_RETRY_MAX=2s
    wait_serving booking-service "$booking_port" maitre.booking.v1.BookingService

    if command -v curl >/dev/null 2>&1; then
        local admin metrics
        for admin in "$memory_admin" "$booking_admin"; do
            metrics="$(curl -fsS --max-time 5 "http://127.0.0.1:$admin/metrics")" \
                || die "admin port $admin: GET /metrics failed"
            [[ "$metrics" == *"# TYPE"* ]] || die "admin port $admin: /metrics is no Prometheus exposition"
        done
        log "both admin ports serve /metrics"
    fi
}

run() {
    [[ -f "$state" ]] || die "no smoke stack running (scripts/smoke.sh start)"
    set -a
    # shellcheck source=/dev/null
    . "$state"
    set +a
    "$@"
}

logs() {
    [[ -f "$state" ]] || return 0
    local name
    for name in "${services[@]}"; do
        [[ -f "$dir/$name.log" ]] || continue
        echo "---- last lines of $dir/$name.log"
        tail -n 40 "$dir/$name.log"
    done
}

# stop: SIGTERM to both, then each must exit 0 within 20 s (else SIGKILL).
stop() {
    [[ -f "$state" ]] || { log "no smoke stack running"; return 0; }
    local name pid n status=0
    for name in "${services[@]}"; do
        pid="$(cat "$dir/$name.pid" 2>/dev/null)" || continue
        [[ -e "$dir/$name.rc" ]] || kill -TERM "$pid" 2>/dev/null || true
    done
    for name in "${services[@]}"; do
        pid="$(cat "$dir/$name.pid" 2>/dev/null)" || continue
        n=0
        until [[ -e "$dir/$name.rc" ]] || ((n++ >= 200)); do sleep 0.1; done
        if [[ ! -e "$dir/$name.rc" ]]; then
            log "$name (pid $pid) did not stop within 20 s of SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            status=1
        elif [[ "$(cat "$dir/$name.rc")" != 0 ]]; then
            log "$name exited $(cat "$dir/$name.rc") after SIGTERM"
            status=1
        else
            log "$name stopped cleanly"
        fi
        rm -f "$dir/$name.pid"
    done
    ((status == 0)) || logs >&2
    rm -f "$state"
    return "$status"
}

case "${1:-}" in
    start|stop|logs) "$1" ;;
    run) shift; (($#)) || die "usage: $0 run CMD [ARGS...]"; run "$@" ;;
    *) die "usage: $0 start | run CMD [ARGS...] | stop | logs" ;;
esac
