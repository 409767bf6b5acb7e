#!/usr/bin/env bash
# CI's smoke test of the real binaries with real clients (run by .ci/run
# after the tests):
#
#   scripts/ci-extra.sh
#
#  1. cargo build --release -p memory-service -p booking-service
#  2. a fresh database `maitre_ci_smoke` on the server scripts/ensure-postgres.sh
#     finds (dropped and created with psql)
#  3. both services on high ports (55051/55052, admin 59101/59102; other free
#     ports when those are taken), follow-ups due at once
#     (BOOKING_FOLLOWUP_DELAY=0s, BOOKING_WORKER_POLL_INTERVAL=100ms); waits until both
#     report SERVING
#  4. scripts/grpcurl-journey.sh (the real grpcurl) against them
#  5. scripts/python-client.sh (a Python backend) against them
#  6. scripts/bench.sh --quick, when that script exists (it must pass)
#  7. SIGTERM to both services: each must exit 0 within 20 s
# The services are stopped whatever happens (EXIT trap). Logs:
# target/ci-smoke/*.log, printed in part when a step fails.
set -euo pipefail

me="ci-extra"
log() { printf '%s: %s\n' "$me" "$*" >&2; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
log_dir="$root/target/ci-smoke"
database=maitre_ci_smoke
start=$SECONDS

pids=()
names=()
logs=()

show_logs() {
    local i
    for i in "${!names[@]}"; do
        echo "---- last lines of ${names[$i]} (${logs[$i]})"
        tail -n 40 "${logs[$i]}" 2>/dev/null || true
    done
}

# stop_services: SIGTERM, wait up to 20 s each, then SIGKILL. Returns 1 when
# a service had to be killed or exited non-zero.
stop_services() {
    local i pid n rc status=0
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for i in "${!pids[@]}"; do
        pid="${pids[$i]}"
        n=0
        while kill -0 "$pid" 2>/dev/null && ((n < 200)); do sleep 0.1; n=$((n + 1)); done
        if kill -0 "$pid" 2>/dev/null; then
            echo "${names[$i]} (pid $pid) did not stop within 20 s of SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            status=1
        fi
        rc=0
        wait "$pid" 2>/dev/null || rc=$?
        if ((rc != 0)); then
            echo "${names[$i]} exited $rc after SIGTERM"
            status=1
        else
            echo "${names[$i]} stopped cleanly"
        fi
    done
    pids=()
    return "$status"
}

cleanup() {
    ((${#pids[@]} == 0)) || stop_services >&2 || true
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

step() {
    local name="$1" t0=$SECONDS rc=0
    shift
    echo "==> $name"
    "$@" || rc=$?
    if ((rc != 0)); then
        echo "==> FAILED: $name (exit $rc, $((SECONDS - t0)) s)"
        show_logs
        exit "$rc"
    fi
    echo "==> ok: $name ($((SECONDS - t0)) s)"
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# port PREFERRED: PREFERRED when nothing listens there, else a free port.
port() {
    if ! tcp_open "$1"; then
        echo "$1"
    else
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    fi
}

# db_url ADMIN_URL NAME: the same server URL with the database set to NAME.
db_url() {
    local url="$1" query="" base scheme rest authority
    base="${url%%\?*}"
    [[ "$url" == *\?* ]] && query="?${url#*\?}"
    scheme="${base%%://*}"
    rest="${base#*://}"
    authority="${rest%%/*}"
    printf '%s://%s/%s%s\n' "$scheme" "$authority" "$2" "$query"
}

# ------------------------------------------------------------ steps
build() {
    cargo build --release -p memory-service -p booking-service
}

admin_url=""
fresh_database() {
    admin_url="$(scripts/ensure-postgres.sh | tail -n 1)"
    [[ -n "$admin_url" ]] || { echo "scripts/ensure-postgres.sh printed no URL"; return 1; }
    command -v psql >/dev/null 2>&1 || { echo "psql not found (apt-get install postgresql-client)"; return 1; }
    echo "admin URL $admin_url; DROP/CREATE DATABASE $database"
    psql "$admin_url" -v ON_ERROR_STOP=1 -qX -c "DROP DATABASE IF EXISTS $database WITH (FORCE)" \
        && psql "$admin_url" -v ON_ERROR_STOP=1 -qX -c "CREATE DATABASE $database"
}

memory_port="" booking_port=""
start_stack() {
    local url memory_admin booking_admin
    url="$(db_url "$admin_url" "$database")"
    memory_port="$(port 55051)"
    booking_port="$(port 55052)"
    memory_admin="$(port 59101)"
    booking_admin="$(port 59102)"
    mkdir -p "$log_dir"
    echo "memory-service  gRPC 127.0.0.1:$memory_port  admin 127.0.0.1:$memory_admin"
    echo "booking-service gRPC 127.0.0.1:$booking_port  admin 127.0.0.1:$booking_admin"
    echo "database        $url"
    # No auth (loopback only), no TLS: whatever the environment says.
    local -a clean_env=(env -u AUTH_TOKENS -u AUTH_TOKENS_FILE -u AUTH_GRANTS -u TLS_CERT_FILE -u TLS_KEY_FILE
        -u TLS_CLIENT_CA_FILE -u BOOKING_MEMORY_TOKEN_FILE -u BOOKING_MEMORY_CA_FILE
        -u BOOKING_MEMORY_CLIENT_CERT_FILE -u BOOKING_MEMORY_CLIENT_KEY_FILE
        AUTH_MODE=none DATABASE_URL="$url" RUST_LOG="${RUST_LOG:-info}" NO_COLOR=1)

    "${clean_env[@]}" GRPC_ADDR="127.0.0.1:$memory_port" ADMIN_ADDR="127.0.0.1:$memory_admin" \
        "$target_dir/release/memory-service" serve >"$log_dir/memory-service.log" 2>&1 &
    pids+=("$!"); names+=(memory-service); logs+=("$log_dir/memory-service.log")
    wait_serving memory-service "$memory_port" maitre.memory.v1.MemoryService 0 || return 1

    "${clean_env[@]}" GRPC_ADDR="127.0.0.1:$booking_port" ADMIN_ADDR="127.0.0.1:$booking_admin" \
        BOOKING_MEMORY_URL="http://127.0.0.1:$memory_port" \
        BOOKING_FOLLOWUP_DELAY=0s BOOKING_WORKER_POLL_INTERVAL=100ms BOOKING_FOLLOWUP_RETRY_BASE=200ms BOOKING_FOLLOWUP_RETRY_MAX=2s \
        "$target_dir/release/booking-service" serve >"$log_dir/booking-service.log" 2>&1 &
    pids+=("$!"); names+=(booking-service); logs+=("$log_dir/booking-service.log")
    wait_serving booking-service "$booking_port" maitre.booking.v1.BookingService 1 || return 1

    if command -v curl >/dev/null 2>&1; then
        local name admin metrics
        for name in memory-service:"$memory_admin" booking-service:"$booking_admin"; do
            admin="${name#*:}"
            metrics="$(curl -fsS --max-time 5 "http://127.0.0.1:$admin/metrics")" \
                || { echo "${name%%:*} admin port: GET /metrics failed"; return 1; }
            [[ "$metrics" == *"# TYPE"* ]] \
                || { echo "${name%%:*} admin port: /metrics is no Prometheus exposition"; return 1; }
        done
        echo "both admin ports serve /metrics"
    fi
}

grpcurl_bin=""
# wait_serving NAME PORT HEALTH_NAME INDEX: until grpc.health.v1 says SERVING.
wait_serving() {
    local name="$1" port="$2" service="$3" i="$4" deadline=$((SECONDS + 60)) answer=""
    while :; do
        if ! kill -0 "${pids[$i]}" 2>/dev/null; then
            echo "$name exited before it was ready"
            return 1
        fi
        answer="$("$grpcurl_bin" -plaintext -max-time 2 -d "{\"service\":\"$service\"}" \
            "127.0.0.1:$port" grpc.health.v1.Health/Check 2>&1)" || true
        if [[ "$answer" == *'"SERVING"'* ]]; then
            echo "$name is SERVING on 127.0.0.1:$port"
            return 0
        fi
        if ((SECONDS >= deadline)); then
            echo "$name not SERVING after 60 s; last answer: $answer"
            return 1
        fi
        sleep 0.2
    done
}

tools() {
    local bin
    bin="$(scripts/install-tools.sh | tail -n 1)" || return 1
    grpcurl_bin="$bin/grpcurl"
    [[ -x "$grpcurl_bin" ]]
}

journey() {
    MEMORY_ADDR="127.0.0.1:$memory_port" BOOKING_ADDR="127.0.0.1:$booking_port" GRPCURL="$grpcurl_bin" \
        bash scripts/grpcurl-journey.sh
}

python_client() {
    MEMORY_ADDR="127.0.0.1:$memory_port" BOOKING_ADDR="127.0.0.1:$booking_port" \
        bash scripts/python-client.sh
}

bench() {
    MEMORY_ADDR="127.0.0.1:$memory_port" BOOKING_ADDR="127.0.0.1:$booking_port" \
        bash scripts/bench.sh --quick
}

step "grpcurl (scripts/install-tools.sh)" tools
step "cargo build --release -p memory-service -p booking-service" build
step "fresh database $database" fresh_database
step "start memory-service and booking-service" start_stack
step "scripts/grpcurl-journey.sh" journey
step "scripts/python-client.sh" python_client
if [[ -f scripts/bench.sh ]]; then
    step "scripts/bench.sh --quick" bench
else
    echo "==> skipped: scripts/bench.sh --quick (scripts/bench.sh does not exist yet)"
fi
step "stop both services with SIGTERM (each exits 0)" stop_services
echo "==> ci-extra passed ($((SECONDS - start)) s)"
