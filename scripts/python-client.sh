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

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="${MAITRE_TOOLS_DIR:-${HOME:-/root}/.cache/maitre-tools}"
venv="$tools/venv"
requirements="$root/examples/python/requirements.txt"
python="${PYTHON:-python3}"

command -v "$python" >/dev/null 2>&1 || die "$python not found"

make_venv() {
    rm -rf "$venv"
    "$python" -m venv "$venv" >&2
}

if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
    log "creating virtualenv $venv"
    mkdir -p "$tools"
    if ! make_venv; then
        # Debian's python3 has no ensurepip without python3-venv.
        if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
            log "python3 -m venv failed: apt-get install python3-venv"
            { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv; } >&2 \
                || die "apt-get install python3-venv failed"
            make_venv || die "$python -m venv $venv failed even with python3-venv"
        else
            die "$python -m venv $venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
        fi
    fi
fi

# Reinstall only when requirements.txt changed since the last install.
stamp="$venv/.maitre-requirements"
if ! cmp -s "$requirements" "$stamp"; then
    log "pip install -r examples/python/requirements.txt into $venv"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install --quiet -r "$requirements" >&2 \
        || die "pip install -r $requirements failed"
    cp "$requirements" "$stamp"
else
    log "virtualenv $venv is up to date"
fi

export MEMORY_ADDR="${MEMORY_ADDR:-127.0.0.1:50051}"
export BOOKING_ADDR="${BOOKING_ADDR:-127.0.0.1:50052}"
log "running examples/python/client.py against memory $MEMORY_ADDR, booking $BOOKING_ADDR"
exec "$venv/bin/python" "$root/examples/python/client.py" --proto-dir "$root/proto" "$@"
