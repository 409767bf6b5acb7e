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

if cargo nextest --version >/dev/null 2>&1; then
    log "cargo nextest run --workspace --no-fail-fast $*"
    exec cargo nextest run --workspace --no-fail-fast "$@"
else
    log "warning: cargo-nextest not found, falling back to cargo test (install: cargo install --locked cargo-nextest)"
    log "cargo test --workspace --no-fail-fast $*"
    exec cargo test --workspace --no-fail-fast "$@"
fi
