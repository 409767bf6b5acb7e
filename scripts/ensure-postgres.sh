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
#
# The logic is scripts/ensure_postgres.py (tests: scripts/tests/).
set -euo pipefail

case "${1:-}" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
esac
command -v python3 >/dev/null 2>&1 || { echo "ensure-postgres: error: python3 not found (apt-get install python3)" >&2; exit 1; }
exec python3 "$(dirname "${BASH_SOURCE[0]}")/ensure_postgres.py" "$@"
