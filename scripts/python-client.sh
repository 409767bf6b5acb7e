#!/usr/bin/env bash
# Runs the Python example client (examples/python/client.py) against a
# running stack:
#
#   scripts/python-client.sh [extra client.py arguments]
#
# Makes a virtualenv in ${MAITRE_TOOLS_DIR:-$HOME/.cache/maitre-tools}/venv
# (once), installs examples/python/requirements.txt into it (again only when
# that file changed), then runs the client.
#
# Environment (all optional):
#   MEMORY_ADDR   memory-service host:port   (127.0.0.1:50051)
#   BOOKING_ADDR  booking-service host:port  (127.0.0.1:50052)
#   AUTH_TOKEN    bearer token, when the stack requires one
#   PYTHON        interpreter for the virtualenv (python3)
set -euo pipefail

me="python-client"
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }
# shellcheck source=lib/venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/venv.sh"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="${MAITRE_TOOLS_DIR:-${HOME:-/root}/.cache/maitre-tools}"
venv="$tools/venv"
requirements="$root/examples/python/requirements.txt"
python="${PYTHON:-python3}"

command -v "$python" >/dev/null 2>&1 || die "$python not found"

ensure_venv "$venv" "$requirements" "$python"

export MEMORY_ADDR="${MEMORY_ADDR:-127.0.0.1:50051}"
export BOOKING_ADDR="${BOOKING_ADDR:-127.0.0.1:50052}"
log "running examples/python/client.py against memory $MEMORY_ADDR, booking $BOOKING_ADDR"
exec "$venv/bin/python" "$root/examples/python/client.py" --proto-dir "$root/proto" "$@"
