#!/usr/bin/env bash
# Checks that the committed sqlx query data (.sqlx/) matches the SQL in the
# code and the schema the migrations build:
#
#   scripts/sqlx-check.sh           # CI: fail when .sqlx/ is stale
#   scripts/sqlx-check.sh --write   # after changing a query: rewrite .sqlx/
#
# Installs sqlx-cli (the version of the workspace's sqlx) if missing, makes a
# scratch database, applies both services' migrations to it (booking-service
# `migrate` applies apalis's and its own), runs `cargo sqlx prepare
# --workspace [--check]` against it, and drops it on exit.
set -euo pipefail

me="sqlx-check"
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

mode="--check"
case "${1:-}" in
    "") ;;
    --write) mode="" ;;
    *) die "usage: $0 [--write]" ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

sqlx_version="0.9.0"
if [[ "$(cargo sqlx --version 2>/dev/null || true)" != *" $sqlx_version"* ]]; then
    log "installing sqlx-cli $sqlx_version"
    cargo install sqlx-cli --version "$sqlx_version" --locked \
        --no-default-features --features postgres,rustls
fi

admin_url="$("$root/scripts/ensure-postgres.sh" | tail -n 1)" \
    || die "scripts/ensure-postgres.sh failed: no PostgreSQL"
[[ -n "$admin_url" ]] || die "scripts/ensure-postgres.sh printed no URL"
scratch="maitre_sqlx_$$"
scratch_url="${admin_url%/*}/$scratch"

drop_scratch() {
    psql "$admin_url" -qc "DROP DATABASE IF EXISTS \"$scratch\" WITH (FORCE)" >/dev/null 2>&1 || true
}
trap drop_scratch EXIT
psql "$admin_url" -qc "CREATE DATABASE \"$scratch\"" >/dev/null || die "could not create $scratch"

log "migrating $scratch"
DATABASE_URL="$scratch_url" cargo run --quiet --locked -p booking-service -- migrate
DATABASE_URL="$scratch_url" cargo run --quiet --locked -p memory-service -- migrate

# Dependencies first, offline (.cargo/config.toml): `prepare` then rebuilds
# only the workspace's crates, so apalis-postgres's own queries (checked
# against its shipped data) never land in .sqlx/.
cargo check --quiet --locked --workspace

log "cargo sqlx prepare --workspace ${mode:-(writing .sqlx/)}"
# The cargo arguments after `--` matter: the root package is a crate of its
# own (maitre-api), so a bare `cargo check` would compile only it, find no
# queries, and a check would pass while a --write emptied .sqlx/.
DATABASE_URL="$scratch_url" cargo sqlx prepare --workspace ${mode:+"$mode"} -- --locked --workspace
