#!/usr/bin/env bash
# Compares two builds of memory-service at one client, alternating between
# them so that both see the same background load (a noisy 2-core VM moves
# absolute numbers by ±50 % between minutes; the pairs stay comparable).
#
#   bench/ab-one-client.sh BIN_DIR_A BIN_DIR_B [ROUNDS] [SECONDS]
#
# Each round runs `one_client` (bench/examples/one_client.rs: GetContext on
# the bench's 10-message conversation, back to back) for SECONDS against A,
# then against B, and prints p50, p90 and the CPU memory-service plus every
# PostgreSQL process spent per call (then the median of a bare Health/Check,
# the gRPC round trip alone). Needs the bench's PostgreSQL
# (DATABASE_URL, an admin URL; default the private bench cluster,
# `scripts/ensure-postgres.sh --private` with MAITRE_PG_PORT=55433) and
# builds the example; the bench's database is (re)made by a one-second
# maitre-bench run of get-context-10. Both services run with AUTH_MODE=none
# on loopback and stop with the script.
set -euo pipefail

me="ab-one-client"
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }
[[ $# -ge 2 ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
a="$(cd "$1" && pwd)"; b="$(cd "$2" && pwd)"
rounds="${3:-4}"; seconds="${4:-5}"
for dir in "$a" "$b"; do [[ -x "$dir/memory-service" ]] || die "$dir/memory-service not built"; done
admin="${DATABASE_URL:-postgres://postgres@127.0.0.1:55433/postgres}"
db="${admin%/*}/maitre_bench"
conversation=01930000-0000-7000-8000-00000000000a # bench/src/scenarios/get_context.rs, length 10

cd "$root"
cargo build --release -q -p maitre-bench --example one_client
target="${CARGO_TARGET_DIR:-$root/target}/release"
"$target/maitre-bench" --bin-dir "$a" --database-url "$admin" --scenarios get-context-10 \
    --clients 1 --rounds 1 --duration 1s --warmup 0s --retained-jobs 0 --out "$(mktemp -d)" >/dev/null \
    || die "maitre-bench could not set up the bench database"

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
start() { # DIR GRPC_PORT ADMIN_PORT
    AUTH_MODE=none DATABASE_URL="$db" GRPC_ADDR="127.0.0.1:$2" ADMIN_ADDR="127.0.0.1:$3" RUST_LOG=warn \
        "$1/memory-service" >"$(mktemp)" 2>&1 &
    pids+=($!)
}
start "$a" 55061 55062; pid_a=${pids[-1]}
start "$b" 55063 55064; pid_b=${pids[-1]}
sleep 2
for round in $(seq 1 "$rounds"); do
    printf 'round %s A ' "$round"; "$target/examples/one_client" http://127.0.0.1:55061 "$conversation" "$pid_a" "$seconds"
    printf 'round %s B ' "$round"; "$target/examples/one_client" http://127.0.0.1:55063 "$conversation" "$pid_b" "$seconds"
done
