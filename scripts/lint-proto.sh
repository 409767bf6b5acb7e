#!/usr/bin/env bash
# Runs `buf lint` on proto/ (config: proto/buf.yaml) with the buf installed
# by scripts/install-tools.sh (installing it first if needed).
# Extra arguments are passed to `buf lint`.
set -euo pipefail

me="lint-proto"
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
proto_dir="$root/proto"
[[ -f "$proto_dir/buf.yaml" ]] || die "$proto_dir/buf.yaml not found"

bin_dir="$("$root/scripts/install-tools.sh" | tail -n 1)" || die "scripts/install-tools.sh failed"
buf="$bin_dir/buf"
[[ -x "$buf" ]] || die "buf not found at $buf"

log "buf lint in $proto_dir ($("$buf" --version 2>&1))"
cd "$proto_dir"
if "$buf" lint "$@"; then
    log "ok: no lint violations"
else
    rc=$?
    die "buf lint reported violations (exit $rc)"
fi
