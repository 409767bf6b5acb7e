#!/usr/bin/env bash
# THE one command that benchmarks maitre against the local stack:
#
#   scripts/bench.sh [--quick] [--record] [other maitre-bench flags]
#
#  1. PostgreSQL of its own: scripts/ensure-postgres.sh --private in
#     $BENCH_PG_DIR (default /tmp/maitre-bench-pg-<uid>) on port
#     $BENCH_PG_PORT (default 55433), started with pg_stat_statements
#     preloaded so the report breaks PostgreSQL time down by statement; the
#     server keeps running afterwards (stop it with the pg_ctl line it
#     printed). DATABASE_URL is exported as its admin URL; the bench drops
#     and recreates its own database `maitre_bench`.
#  2. cargo build --release -p memory-service -p booking-service -p maitre-bench
#     (skip with BENCH_NO_BUILD=1).
#  3. target/release/maitre-bench "$@": starts both services from
#     target/release as child processes, runs the scenarios (store-message,
#     create-booking, journey, get-context-10/-1k/-100k, follow-ups) at 1, 4,
#     16 and 64 clients, each
#     beside pgbench running the same SQL, and writes target/bench/
#     {results.json,chart.svg,report.txt} (--record: also bench/results/).
#
# --quick finishes in under a minute after the build (CI's smoke test; its
# numbers are not judged). The exit status is 2 when any call failed.
# `target/release/maitre-bench --help` lists every flag.
set -euo pipefail

me="bench"
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

for arg in "$@"; do
    case "$arg" in
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
    esac
done

export MAITRE_PG_DIR="${BENCH_PG_DIR:-${TMPDIR:-/tmp}/maitre-bench-pg-$(id -u)}"
export MAITRE_PG_PORT="${BENCH_PG_PORT:-55433}"
url="$("$root/scripts/ensure-postgres.sh" --private | tail -n 1)" || die "scripts/ensure-postgres.sh --private failed: no PostgreSQL to benchmark against"
[[ -n "$url" ]] || die "scripts/ensure-postgres.sh printed no URL"
export DATABASE_URL="$url"
command -v pgbench >/dev/null 2>&1 || die "pgbench not found (Debian: it comes with the postgresql package)"

target_dir="${CARGO_TARGET_DIR:-$root/target}"
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    log "cargo build --release -p memory-service -p booking-service -p maitre-bench"
    cargo build --release -p memory-service -p booking-service -p maitre-bench || die "cargo build failed"
fi
bench="$target_dir/release/maitre-bench"
[[ -x "$bench" ]] || die "$bench not built"

log "$bench --bin-dir $target_dir/release $*"
exec "$bench" --bin-dir "$target_dir/release" "$@"
