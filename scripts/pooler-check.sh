#!/usr/bin/env bash
# Both release binaries behind a real PgBouncer in transaction mode (CI's
# step "pooler: journey and load through pgbouncer"):
#
#   scripts/pooler-check.sh
#
#  1. pgbouncer (Debian's, 1.18 on Debian 12): installed with apt-get when
#     missing and running as root, else the script says how;
#  2. PostgreSQL from scripts/ensure-postgres.sh; PgBouncer in front of it
#     on a free loopback port, pool_mode = transaction, default_pool_size
#     $POOLER_POOL_SIZE (20), every database passed through, its files in a
#     temporary directory;
#  3. scripts/smoke.sh's stack with SMOKE_POOLER set: DATABASE_URL through
#     PgBouncer, DB_POOLER=transaction, DATABASE_DIRECT_URL straight to the
#     server (migrations, LISTEN); scripts/grpcurl-journey.sh against it
#     (follow-ups delivered through the queue); SIGTERM, clean exits;
#  4. a bench scenario ($POOLER_LOAD_SCENARIO = create-booking, with the
#     follow-up workers on; $POOLER_LOAD_CLIENTS = 16 clients,
#     $POOLER_LOAD_SECONDS = 10 s), once direct and once through PgBouncer:
#     prints both throughputs; any failed call fails the script.
#
# Needs target/release/{memory-service,booking-service,maitre-bench} (cargo
# build --release -p memory-service -p booking-service -p maitre-bench) and
# grpcurl (scripts/install-tools.sh). Everything it started is stopped on
# exit; each step is bounded in time. Logs and results: target/ci-pooler/.
set -euo pipefail

me="pooler-check"
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
out="$root/target/ci-pooler"
pool_size="${POOLER_POOL_SIZE:-20}"
clients="${POOLER_LOAD_CLIENTS:-16}"
seconds="${POOLER_LOAD_SECONDS:-10}"
scenario="${POOLER_LOAD_SCENARIO:-create-booking}"

for name in memory-service booking-service maitre-bench; do
    [[ -x "$target_dir/release/$name" ]] || die "$target_dir/release/$name not built (cargo build --release -p memory-service -p booking-service -p maitre-bench)"
done

# ---------------------------------------------------------------- pgbouncer
pgbouncer="$(command -v pgbouncer || true)"
[[ -n "$pgbouncer" || ! -x /usr/sbin/pgbouncer ]] || pgbouncer=/usr/sbin/pgbouncer
if [[ -z "$pgbouncer" ]]; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing pgbouncer (apt-get install -y pgbouncer)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >&2 \
            || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >&2; } \
            || die "apt-get install pgbouncer failed"
        pgbouncer=/usr/sbin/pgbouncer
    else
        die "pgbouncer not found; install it: apt-get install -y pgbouncer (as root)"
    fi
fi
log "$("$pgbouncer" --version | head -n 1)"

admin_url="$(scripts/ensure-postgres.sh | tail -n 1)"
[[ -n "$admin_url" ]] || die "scripts/ensure-postgres.sh printed no URL"
read -r pg_host pg_port pg_user < <(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(p.hostname or "127.0.0.1", p.port or 5432, u.unquote(p.username or "postgres"))' "$admin_url")
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

mkdir -p "$out"
work="$(mktemp -d "${TMPDIR:-/tmp}/maitre-pgbouncer.XXXXXX")"
pgbouncer_pid=""
cleanup() {
    local rc=$?
    scripts/smoke.sh stop >/dev/null 2>&1 || true
    if [[ -n "$pgbouncer_pid" ]]; then
        kill -TERM "$pgbouncer_pid" 2>/dev/null || true
        wait "$pgbouncer_pid" 2>/dev/null || true
    fi
    cp "$work/pgbouncer.log" "$out/pgbouncer.log" 2>/dev/null || true
    rm -rf "$work"
    ((rc == 0)) || log "FAILED; pgbouncer's log: $out/pgbouncer.log"
}
trap cleanup EXIT

printf '"%s" ""\n' "$pg_user" >"$work/users.txt"
cat >"$work/pgbouncer.ini" <<EOF
[databases]
* = host=$pg_host port=$pg_port
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $work/users.txt
pool_mode = transaction
default_pool_size = $pool_size
max_client_conn = 1000
query_wait_timeout = 10
logfile = $work/pgbouncer.log
log_connections = 0
log_disconnections = 0
EOF
as_user=()
if [[ "$(id -u)" == 0 ]]; then
    # PgBouncer refuses to run as root; it drops to nobody, who needs its files.
    as_user=(-u nobody)
    chmod 0777 "$work"
    chmod 0666 "$work"/*
fi
"$pgbouncer" "${as_user[@]}" "$work/pgbouncer.ini" </dev/null >/dev/null 2>&1 &
pgbouncer_pid=$!
n=0
until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    kill -0 "$pgbouncer_pid" 2>/dev/null || die "pgbouncer exited: $(cat "$work/pgbouncer.log" 2>/dev/null)"
    ((n++ < 100)) || die "pgbouncer not listening on 127.0.0.1:$port after 10 s"
    sleep 0.1
done
log "PgBouncer on 127.0.0.1:$port, transaction mode, $pool_size server connections per database and user, in front of $pg_host:$pg_port"

# ---------------------------------------------------------------- journey
SMOKE_POOLER="127.0.0.1:$port" timeout 120 scripts/smoke.sh start
timeout 300 scripts/smoke.sh run scripts/grpcurl-journey.sh
timeout 60 scripts/smoke.sh stop
log "the grpcurl journey passed through PgBouncer"

# ---------------------------------------------------------------- load
# bench DIR ARGS...: the scenario; prints its calls per second.
bench() {
    local dir="$1"
    shift
    DATABASE_URL="$admin_url" timeout 300 "$target_dir/release/maitre-bench" \
        --bin-dir "$target_dir/release" --out "$dir" --no-floor \
        --scenarios "$scenario" --clients "$clients" --duration "${seconds}s" --warmup 2s --rounds 1 \
        "$@" >"$dir.log" 2>&1 || { tail -n 30 "$dir.log" >&2; die "maitre-bench $* failed (log: $dir.log)"; }
    python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(round(d["scenarios"][0]["points"][0]["service"]["per_second"], 1))' "$dir/results.json"
}
direct="$(bench "$out/direct")"
pooled="$(bench "$out/pgbouncer" --pooler "127.0.0.1:$port")"
python3 - "$direct" "$pooled" "$scenario" "$clients" "$seconds" "$pool_size" <<'EOF' | tee "$out/throughput.txt"
import sys
direct, pooled, scenario, clients, seconds, pool = float(sys.argv[1]), float(sys.argv[2]), *sys.argv[3:]
print(f"{scenario}, {clients} clients, {seconds} s, follow-up workers on:")
print(f"  direct:                                  {direct:8.1f} calls/s")
print(f"  through PgBouncer (transaction, pool {pool}): {pooled:8.1f} calls/s ({pooled / direct:.0%} of direct)")
EOF
