#!/usr/bin/env bash
# THE one command that runs all of maitre's tests:
#
#   scripts/test.sh [extra args for cargo nextest run / cargo test]
#
# Makes sure PostgreSQL is reachable (scripts/ensure-postgres.sh), exports
# DATABASE_URL (an admin URL; tests create their own databases), then runs
#   cargo nextest run --workspace --no-fail-fast "$@"
# (each test in its own process), or `cargo test --workspace --no-fail-fast`
# when cargo-nextest is not installed.
set -euo pipefail

me="test"
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

url="$("$root/scripts/ensure-postgres.sh" | tail -n 1)" || die "scripts/ensure-postgres.sh failed: no PostgreSQL for the tests"
[[ -n "$url" ]] || die "scripts/ensure-postgres.sh printed no URL"
export DATABASE_URL="$url"
log "DATABASE_URL=$DATABASE_URL"

# Each test makes its own database maitre_test_<uuid>; drop earlier runs' ones.
if command -v psql >/dev/null 2>&1; then
    stale="$(psql "$DATABASE_URL" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'maitre\_test\_%'" 2>/dev/null || true)"
    for db in $stale; do
        psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
    done
    [[ -z "$stale" ]] || log "dropped $(wc -w <<<"$stale") leftover test databases"
fi

if cargo nextest --version >/dev/null 2>&1; then
    log "cargo nextest run --workspace --no-fail-fast $*"
    exec cargo nextest run --workspace --no-fail-fast "$@"
else
    log "warning: cargo-nextest not found, falling back to cargo test (install: cargo install --locked cargo-nextest)"
    log "cargo test --workspace --no-fail-fast $*"
    exec cargo test --workspace --no-fail-fast "$@"
fi
