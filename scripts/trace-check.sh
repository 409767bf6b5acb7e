#!/usr/bin/env bash
# CI step: one booking's whole life in ONE exported trace. Starts a real
# OTLP/gRPC receiver (scripts/otlp_receiver.py) on a free loopback port, the
# release binaries with OTEL_EXPORTER_OTLP_ENDPOINT pointing at it and a
# follow-up due a few seconds after booking, makes ONE CreateBooking, waits
# (bounded) until its follow-up is SENT, then until the spans show
# CreateBooking → follow-up job (→ deliver job, if retried) → StoreMessage client → memory-service
# StoreMessage, SQL spans and every parent link (scripts/otlp/check_trace.py).
#
#   scripts/trace-check.sh
#
# Needs target/release/{memory-service,booking-service}, grpcurl
# (scripts/install-tools.sh), psql, python3 with venv. The receiver's
# packages (scripts/otlp/requirements.txt) go into a virtualenv of their own
# under ${MAITRE_TOOLS_DIR:-~/.cache/maitre-tools}. Everything it started is
# stopped on exit; logs stay in target/ci-trace/.
set -euo pipefail

me="trace-check"
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }
# shellcheck source=lib/venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/venv.sh"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
dir="$root/target/ci-trace"
database=maitre_ci_trace
tools="${MAITRE_TOOLS_DIR:-${HOME:-/root}/.cache/maitre-tools}"
venv="$tools/otlp-venv"
requirements="$root/scripts/otlp/requirements.txt"
grpcurl="${GRPCURL:-$(scripts/install-tools.sh 2>/dev/null | tail -n 1)/grpcurl}"

for name in memory-service booking-service; do
    [[ -x "$target_dir/release/$name" ]] || die "$target_dir/release/$name not built (cargo build --release)"
done
[[ -x "$grpcurl" ]] || die "grpcurl not found at $grpcurl (scripts/install-tools.sh)"
command -v psql >/dev/null 2>&1 || die "psql not found (apt-get install postgresql-client)"

# ---------------------------------------------------------------- receiver venv
ensure_venv "$venv" "$requirements"

# ---------------------------------------------------------------- processes
rm -rf "$dir"
mkdir -p "$dir"
pids=()
stop_all() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
}
on_exit() {
    local rc=$?
    if ((rc != 0)); then
        for f in "$dir"/*.log; do
            [[ -f "$f" ]] && { echo "---- last lines of $f"; tail -n 30 "$f"; } >&2
        done
    fi
    stop_all
    exit "$rc"
}
trap on_exit EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_for WHAT SECONDS CMD...: until CMD succeeds, or die after SECONDS.
wait_for() {
    local what="$1" within="$2" deadline=$((SECONDS + $2))
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what: not within $within s"
        sleep 0.2
    done
}

"$venv/bin/python" scripts/otlp_receiver.py --out "$dir/spans.jsonl" --port-file "$dir/receiver.port" \
    >"$dir/receiver.log" 2>&1 &
pids+=($!)
wait_for "the OTLP receiver's port" 30 test -s "$dir/receiver.port"
collector="http://127.0.0.1:$(cat "$dir/receiver.port")"
log "OTLP receiver at $collector"

admin_url="$(scripts/ensure-postgres.sh | tail -n 1)"
for sql in "DROP DATABASE IF EXISTS $database WITH (FORCE)" "CREATE DATABASE $database"; do
    psql "$admin_url" -v ON_ERROR_STOP=1 -qX -c "$sql" >/dev/null || die "$sql failed"
done
url="$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$admin_url" "$database")"

memory_port="$(free_port)"
booking_port="$(free_port)"
# Loopback, no auth, whatever the caller's environment says; spans every
# 200 ms so the check need not wait for the 5 s default.
common=(-u AUTH_TOKENS -u AUTH_TOKENS_FILE -u AUTH_GRANTS -u TLS_CERT_FILE -u TLS_KEY_FILE
    -u TLS_CLIENT_CA_FILE -u BOOKING_MEMORY_TOKEN_FILE -u BOOKING_MEMORY_CA_FILE
    -u BOOKING_MEMORY_CLIENT_CERT_FILE -u BOOKING_MEMORY_CLIENT_KEY_FILE
    -u OTEL_EXPORTER_OTLP_TRACES_ENDPOINT -u OTEL_SERVICE_NAME -u OTEL_RESOURCE_ATTRIBUTES
    -u OTEL_EXPORTER_OTLP_HEADERS -u OTEL_EXPORTER_OTLP_TRACES_HEADERS -u DB_POOLER -u DATABASE_DIRECT_URL
    AUTH_MODE=none DATABASE_URL="$url" ADMIN_ADDR=off RUST_LOG="${RUST_LOG:-info}" NO_COLOR=1
    OTEL_EXPORTER_OTLP_ENDPOINT="$collector" OTEL_TRACES_SAMPLER=parentbased_always_on
    OTEL_BSP_SCHEDULE_DELAY=200)

env "${common[@]}" GRPC_ADDR="127.0.0.1:$memory_port" \
    "$target_dir/release/memory-service" serve >"$dir/memory-service.log" 2>&1 &
pids+=($!)
health() { "$grpcurl" -plaintext -max-time 2 -d "{\"service\":\"$2\"}" "127.0.0.1:$1" grpc.health.v1.Health/Check | grep -q '"SERVING"'; }
wait_for "memory-service SERVING" 60 health "$memory_port" maitre.memory.v1.MemoryService
env "${common[@]}" GRPC_ADDR="127.0.0.1:$booking_port" \
    BOOKING_MEMORY_URL="http://127.0.0.1:$memory_port" \
    BOOKING_FOLLOWUP_DELAY=0s BOOKING_WORKER_POLL_INTERVAL=100ms \
    "$target_dir/release/booking-service" serve >"$dir/booking-service.log" 2>&1 &
pids+=($!)
wait_for "booking-service SERVING" 60 health "$booking_port" maitre.booking.v1.BookingService

# ---------------------------------------------------------------- one booking
booking_svc=maitre.booking.v1.BookingService
call() { "$grpcurl" -plaintext -max-time 10 -d "$2" "127.0.0.1:$booking_port" "$booking_svc/$1"; }
field() { python3 -c 'import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }
rfc3339() { date -u -d "@$(($(date +%s) + $1))" +%Y-%m-%dT%H:%M:%SZ; }

# The slot starts in 10 s (the booking must come before) and ends a second
# later: the follow-up is due then.
slot="$(call CreateSlot "{\"start_time\":\"$(rfc3339 10)\",\"end_time\":\"$(rfc3339 11)\",\"capacity\":2,\"label\":\"trace check\",\"request_id\":\"trace-check-slot\"}" \
    | field 'd["slot"]["slotId"]')" || die "CreateSlot failed"
conversation="$(python3 -c 'import uuid; print(uuid.uuid4())')"
booking="$(call CreateBooking "{\"customer_id\":\"trace-check\",\"customer_name\":\"Ada Trace\",\"conversation_id\":\"$conversation\",\"slot_id\":\"$slot\",\"party_size\":1,\"deposit\":{\"currency_code\":\"EUR\",\"amount_minor\":100},\"request_id\":\"trace-check-booking\"}" \
    | field 'd["booking"]["bookingId"]')" || die "CreateBooking failed"
log "booking $booking; waiting for its follow-up to be SENT"

sent() { call ListFollowUps "{\"booking_id\":\"$booking\"}" | grep -q FOLLOW_UP_STATE_SENT; }
wait_for "the follow-up SENT" 60 sent

log "follow-up SENT; waiting for the trace"
deadline=$((SECONDS + 30))
until "$venv/bin/python" scripts/otlp/check_trace.py "$dir/spans.jsonl" "$booking"; do
    ((SECONDS < deadline)) || die "the booking's trace is incomplete after 30 s (spans: $dir/spans.jsonl)"
    sleep 0.5
done
log "ok"
