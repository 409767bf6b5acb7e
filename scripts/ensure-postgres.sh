#!/usr/bin/env bash
# Makes a PostgreSQL server reachable and prints an admin DATABASE_URL as the
# last (and only) line of stdout. All progress messages go to stderr.
#
# Usage: scripts/ensure-postgres.sh [--private]
#
# Without --private, in this order:
#   1. $DATABASE_URL, if set and `pg_isready -d "$DATABASE_URL"` succeeds;
#   2. a server already answering on 127.0.0.1:5432;
#   3. the newest Debian cluster under /etc/postgresql, started with
#      pg_ctlcluster (waits up to 30 s);
#   4. as root, when no PostgreSQL is installed at all:
#      apt-get install postgresql, then as 3.
#   For 2-4, TCP trust auth for user postgres from 127.0.0.1 is checked and,
#   on a local Debian cluster as root, fixed in pg_hba.conf (then reloaded).
#
# With --private: a throwaway cluster of our own (initdb, trust auth,
# 127.0.0.1 only) in ${MAITRE_PG_DIR:-<repo>/target/dev-pg} on port
# ${MAITRE_PG_PORT:-55432}. Data in $dir/data, log in $dir/postgres.log.
# Stop it with: pg_ctl -D "$dir/data" stop  (as user postgres when root).
# shellcheck disable=SC2012,SC2119  # ls | sort -V picks versions; debian_cluster args are optional
set -euo pipefail

me="ensure-postgres"
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

root_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

private=0
for arg in "$@"; do
    case "$arg" in
        --private) private=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | grep -v '^# shellcheck' | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
        *) die "unknown argument: $arg (usage: $0 [--private])" ;;
    esac
done

is_root() { [[ "$(id -u)" -eq 0 ]]; }
export PGCONNECT_TIMEOUT="${PGCONNECT_TIMEOUT:-5}"

# Path of a PostgreSQL program: on PATH, else from the newest
# /usr/lib/postgresql/*/bin. Empty output (and status 1) when not found.
pg_bin() {
    local name="$1" d
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [[ -x "$d/$name" ]]; then printf '%s\n' "$d/$name"; return 0; fi
    done
    return 1
}

# Directory of the newest installed server binaries (has bin/postgres).
server_bin_dir() {
    local p
    p="$(ls /usr/lib/postgresql/*/bin/postgres 2>/dev/null | sort -V | tail -n 1)" || true
    [[ -n "$p" ]] || return 1
    dirname "$p"
}

tcp_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# ready_hostport HOST PORT
ready_hostport() {
    local isready
    if isready="$(pg_bin pg_isready)"; then
        "$isready" -q -h "$1" -p "$2" -t 3 >/dev/null 2>&1
    else
        tcp_open "$1" "$2"
    fi
}

# ready_url URL
ready_url() {
    local url="$1" isready
    if isready="$(pg_bin pg_isready)"; then
        "$isready" -q -d "$url" -t 3 >/dev/null 2>&1
        return
    fi
    # No client tools: fall back to a TCP probe of the URL's host:port.
    local re='^postgres(ql)?://([^@/]*@)?(\[[^]/]+\]|[^:/?]+)(:([0-9]+))?'
    [[ "$url" =~ $re ]] || return 1
    local host="${BASH_REMATCH[3]}" port="${BASH_REMATCH[5]:-5432}"
    host="${host#[}"; host="${host%]}"
    tcp_open "$host" "$port"
}

# wait_ready HOST PORT SECONDS
wait_ready() {
    local deadline=$((SECONDS + $3))
    while ((SECONDS < deadline)); do
        ready_hostport "$1" "$2" && return 0
        sleep 1
    done
    ready_hostport "$1" "$2"
}

# trust_ok PORT: can user postgres log in over TCP from 127.0.0.1 without a password?
trust_ok() {
    local psql
    if ! psql="$(pg_bin psql)"; then
        log "warning: psql not found; cannot check auth on 127.0.0.1:$1"
        return 0
    fi
    "$psql" -w -X -q -h 127.0.0.1 -p "$1" -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1
}

# fix_hba FILE: set the auth method of every pg_hba line for 127.0.0.1/32 and
# ::1/128 to trust; add "host all all ... trust" lines first if there are none.
fix_hba() {
    local hba="$1"
    [[ -f "$hba.maitre-bak" ]] || cp -p "$hba" "$hba.maitre-bak"
    sed -i -E \
        -e 's#^([[:space:]]*host[a-z]*[[:space:]]+[^[:space:]]+[[:space:]]+[^[:space:]]+[[:space:]]+(127\.0\.0\.1/32|::1/128)[[:space:]]+)[^[:space:]]+.*$#\1trust#' \
        "$hba"
    local tmp
    tmp="$(mktemp)"
    {
        grep -Eq '^[[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba" \
            || echo 'host    all    all    127.0.0.1/32    trust    # added by maitre scripts/ensure-postgres.sh'
        grep -Eq '^[[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+::1/128[[:space:]]+trust' "$hba" \
            || echo 'host    all    all    ::1/128         trust    # added by maitre scripts/ensure-postgres.sh'
        cat "$hba"
    } >"$tmp"
    cat "$tmp" >"$hba"   # keep owner and mode of the original
    rm -f "$tmp"
}

# ensure_trust PORT [VERSION CLUSTER]: make sure trust auth works, fixing the
# Debian cluster's pg_hba.conf when we know which cluster it is and are root.
ensure_trust() {
    local port="$1" ver="${2:-}" cluster="${3:-}"
    trust_ok "$port" && return 0
    if [[ -z "$ver" ]]; then
        # Find the local Debian cluster listening on that port, if any.
        local line
        line="$(pg_lsclusters -h 2>/dev/null | awk -v p="$port" '$3 == p {print $1, $2; exit}')" || true
        if [[ -n "$line" ]]; then read -r ver cluster <<<"$line"; fi
    fi
    local hba="/etc/postgresql/$ver/$cluster/pg_hba.conf"
    if [[ -z "$ver" || ! -f "$hba" ]]; then
        die "user postgres cannot log in without a password on 127.0.0.1:$port and it is not a local Debian cluster I can fix; set DATABASE_URL, or run: scripts/ensure-postgres.sh --private"
    fi
    is_root || die "user postgres cannot log in without a password on 127.0.0.1:$port; as root, set 127.0.0.1/32 and ::1/128 to trust in $hba (or run: scripts/ensure-postgres.sh --private)"
    log "password-less TCP login for postgres fails; setting 127.0.0.1/32 and ::1/128 to trust in $hba (backup: $hba.maitre-bak)"
    fix_hba "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$ver" "$cluster" reload >&2 \
        || die "pg_ctlcluster $ver $cluster reload failed"
    local i
    for ((i = 0; i < 10; i++)); do
        trust_ok "$port" && return 0
        sleep 1
    done
    die "still cannot log in as postgres on 127.0.0.1:$port after fixing $hba"
}

apt_install_postgres() {
    is_root || die "PostgreSQL is not installed and I am not root; install it (apt-get install postgresql), set DATABASE_URL, or run scripts/dev-up.sh"
    command -v apt-get >/dev/null 2>&1 || die "PostgreSQL is not installed and apt-get is not available"
    log "PostgreSQL is not installed: apt-get install postgresql (this takes a minute)"
    apt-get update >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql >&2 \
        || die "apt-get install postgresql failed"
}

# ------------------------------------------------------------------ private
private_cluster() {
    local dir="${MAITRE_PG_DIR:-$root_dir/target/dev-pg}"
    local port="${MAITRE_PG_PORT:-55432}"
    local url="postgres://postgres@127.0.0.1:$port/postgres"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    local data="$dir/data" logfile="$dir/postgres.log"

    if ready_hostport 127.0.0.1 "$port"; then
        log "a server already answers on 127.0.0.1:$port (private cluster in $dir?)"
        trust_ok "$port" || die "server on 127.0.0.1:$port refuses password-less login as postgres; stop it or set MAITRE_PG_PORT"
        printf '%s\n' "$url"
        return 0
    fi

    local bindir
    if ! bindir="$(server_bin_dir)"; then
        apt_install_postgres
        bindir="$(server_bin_dir)" || die "no /usr/lib/postgresql/*/bin/postgres after installing postgresql"
    fi

    # initdb and postgres refuse to run as root: run them as user postgres.
    local -a as_owner=()
    if is_root; then
        if ! id postgres >/dev/null 2>&1; then
            log "creating system user postgres"
            useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres \
                || die "could not create user postgres"
        fi
        chown postgres: "$dir"
        [[ ! -d "$data" ]] || chown -R postgres: "$data"
        [[ ! -e "$logfile" ]] || chown postgres: "$logfile"
        if command -v runuser >/dev/null 2>&1; then
            as_owner=(runuser -u postgres --)
        else
            # shellcheck disable=SC2016  # expanded by the inner sh
            as_owner=(su postgres -s /bin/sh -c '"$0" "$@"' --)
        fi
        "${as_owner[@]}" test -w "$dir" \
            || die "user postgres cannot write $dir (a parent directory is not searchable?); set MAITRE_PG_DIR to e.g. /tmp/maitre-pg"
    fi

    if [[ ! -f "$data/PG_VERSION" ]]; then
        if [[ -d "$data" ]] && [[ -n "$(ls -A "$data")" ]]; then
            die "$data exists but is not a PostgreSQL data directory; remove it"
        fi
        log "initdb: new private cluster in $data ($("$bindir/postgres" --version))"
        "${as_owner[@]}" "$bindir/initdb" -D "$data" -U postgres --auth=trust \
            --encoding=UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
            || { tail -n 20 "$dir/initdb.log" >&2; die "initdb failed (log: $dir/initdb.log)"; }
        # Private settings: TCP on 127.0.0.1 only, no unix socket (its path
        # could be too long and /var/run/postgresql may not be writable).
        # fsync stays on (the default).
        cat >>"$data/postgresql.conf" <<'EOF'

# --- maitre scripts/ensure-postgres.sh --private ---
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
EOF
    fi

    log "starting private cluster on 127.0.0.1:$port (log: $logfile)"
    "${as_owner[@]}" "$bindir/pg_ctl" -D "$data" -l "$logfile" -o "-p $port" -w -t 30 start >&2 \
        || { tail -n 20 "$logfile" >&2 2>/dev/null || true; die "pg_ctl start failed (log: $logfile)"; }
    wait_ready 127.0.0.1 "$port" 30 || die "private cluster did not become ready on 127.0.0.1:$port (log: $logfile)"
    trust_ok "$port" || die "private cluster on 127.0.0.1:$port refuses password-less login as postgres"
    local hint
    printf -v hint '%q ' "${as_owner[@]}" "$bindir/pg_ctl" -D "$data" stop
    log "private cluster ready; stop it with: ${hint% }"
    printf '%s\n' "$url"
}

# ------------------------------------------------------------------ system
# debian_cluster [VERSION CLUSTER]: default the newest version's "main".
# shellcheck disable=SC2120
debian_cluster() {
    local ver="${1:-}" cluster="${2:-}" port status
    [[ -n "$ver" ]] || ver="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)" || true
    [[ -n "$ver" ]] || return 1
    if [[ -n "$cluster" ]]; then
        :
    elif [[ -d "/etc/postgresql/$ver/main" ]]; then
        cluster=main
    else
        cluster="$(ls "/etc/postgresql/$ver" | head -n 1)"
        [[ -n "$cluster" ]] || return 1
    fi
    command -v pg_ctlcluster >/dev/null 2>&1 || die "/etc/postgresql/$ver/$cluster exists but pg_ctlcluster is missing (apt-get install postgresql-common)"

    read -r port status < <(pg_lsclusters -h "$ver" "$cluster" 2>/dev/null | awk '{print $3, $4}') || true
    port="${port:-5432}"
    if [[ "${status:-}" != online* ]]; then
        log "starting Debian cluster $ver/$cluster (port $port)"
        pg_ctlcluster --skip-systemctl-redirect "$ver" "$cluster" start >&2 \
            || die "pg_ctlcluster $ver $cluster start failed (as root? log: /var/log/postgresql/postgresql-$ver-$cluster.log)"
    else
        log "Debian cluster $ver/$cluster is already running (port $port)"
    fi
    wait_ready 127.0.0.1 "$port" 30 \
        || die "cluster $ver/$cluster is not accepting connections on 127.0.0.1:$port after 30 s (log: /var/log/postgresql/postgresql-$ver-$cluster.log)"
    ensure_trust "$port" "$ver" "$cluster"
    printf '%s\n' "postgres://postgres@127.0.0.1:$port/postgres"
}

system_server() {
    # 1. An explicit DATABASE_URL that answers.
    if [[ -n "${DATABASE_URL:-}" ]]; then
        if ready_url "$DATABASE_URL"; then
            log "using DATABASE_URL from the environment"
            printf '%s\n' "$DATABASE_URL"
            return 0
        fi
        log "DATABASE_URL is set but its server does not answer; looking for a local server"
    fi

    # 2. Something already listening on 127.0.0.1:5432.
    if ready_hostport 127.0.0.1 5432; then
        log "a server answers on 127.0.0.1:5432"
        ensure_trust 5432
        printf '%s\n' "postgres://postgres@127.0.0.1:5432/postgres"
        return 0
    fi

    # 3. An existing Debian cluster.
    if [[ -n "$(ls /etc/postgresql 2>/dev/null)" ]]; then
        debian_cluster
        return 0
    fi

    # 4. Nothing installed: install it (root only), then as 3.
    if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        apt_install_postgres
    fi
    if [[ -z "$(ls /etc/postgresql 2>/dev/null)" ]]; then
        # Binaries but no cluster (e.g. it was dropped): create one.
        is_root || die "PostgreSQL is installed but has no cluster and I am not root; run: scripts/ensure-postgres.sh --private"
        local ver
        ver="$(basename "$(dirname "$(server_bin_dir)")")"
        log "no Debian cluster: pg_createcluster $ver main"
        pg_createcluster "$ver" main >&2 || die "pg_createcluster $ver main failed"
    fi
    debian_cluster
}

# (Sourcing the file only defines the functions, for testing.)
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    if ((private)); then
        private_cluster
    else
        system_server
    fi
fi
