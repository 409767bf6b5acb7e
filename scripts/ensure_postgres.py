"""Makes a PostgreSQL server reachable and prints an admin DATABASE_URL as
the last (and only) line of stdout; progress goes to stderr. Run by
scripts/ensure-postgres.sh, which documents the usage and the order in which
servers are tried. Standard library only: it runs before anything else is
installed, on a fresh Debian 12 machine too."""
import glob
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

ME = "ensure-postgres"
DEFAULT_PORT = 5432
PRIVATE_PORT = 55432
HBA_BACKUP_SUFFIX = ".maitre-bak"
# The two loopback lines this script wants set to trust, as pg_hba.conf
# spells their addresses.
LOOPBACK = ("127.0.0.1/32", "::1/128")
PRIVATE_SETTINGS = """
# --- maitre scripts/ensure-postgres.sh --private ---
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
"""
# Per-statement costs for the bench (scripts/bench.sh reads them); loaded
# at start only, so written before the first start. Utility statements
# (BEGIN, COMMIT) are not timed: an autocommit statement's commit is not
# either, so both kinds of transaction are measured alike.
STATEMENT_STATS = """
# --- maitre: pg_stat_statements for scripts/bench.sh ---
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track_utility = off
"""


def add_statement_stats(conf_path):
    """Appends STATEMENT_STATS to postgresql.conf unless it is there; returns
    whether it wrote (a cluster made by an older version of this script)."""
    with open(conf_path) as f:
        if "pg_stat_statements for scripts/bench.sh" in f.read():
            return False
    with open(conf_path, "a") as f:
        f.write(STATEMENT_STATS)
    return True


def log(msg):
    print(f"{ME}: {msg}", file=sys.stderr, flush=True)


class Failure(Exception):
    """Nothing usable: the message says what to do instead."""


# ------------------------------------------------------------------ pure parts
def version_key(text):
    """Sort key of a version-like string, as `sort -V` orders them (9.6 < 15 < 16)."""
    return tuple(int(n) for n in re.findall(r"\d+", text))


def newest(versions):
    """The newest of some version strings, or None."""
    return max(versions, key=version_key, default=None)


def choose_cluster(clusters):
    """The cluster name to use among a version's clusters: main, else the
    first by name; None when there is none."""
    if "main" in clusters:
        return "main"
    return min(clusters, default=None)


def admin_url(port):
    return f"postgres://postgres@127.0.0.1:{port}/postgres"


def url_host_port(url):
    """(host, port) of a postgres:// URL, or None when it is not one."""
    m = re.match(r"^postgres(?:ql)?://(?:[^@/]*@)?(\[[^\]/]+\]|[^:/?]+)(?::(\d+))?", url)
    if not m:
        return None
    return m.group(1).strip("[]"), int(m.group(2) or DEFAULT_PORT)


def parse_lsclusters(text):
    """[(version, cluster, port, status)] from `pg_lsclusters -h` output."""
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 4 and f[2].isdigit():
            out.append((f[0], f[1], int(f[2]), f[3]))
    return out


HBA_LOOPBACK_LINE = re.compile(r"^(\s*host[a-z]*\s+\S+\s+\S+\s+(?:127\.0\.0\.1/32|::1/128)\s+)\S+.*$")


def trust_loopback(hba):
    """pg_hba.conf text with every line for 127.0.0.1/32 and ::1/128 set to
    trust (their options and comments dropped), and `host all all ... trust`
    lines added in front for an address that has none."""
    lines = [HBA_LOOPBACK_LINE.sub(r"\1trust", line) for line in hba.splitlines()]
    added = []
    for address in LOOPBACK:
        pattern = re.compile(r"^\s*host\s+all\s+all\s+" + re.escape(address) + r"\s+trust")
        if not any(pattern.match(line) for line in lines):
            added.append(f"host    all    all    {address:<15} trust    # added by maitre scripts/ensure-postgres.sh")
    return "\n".join(added + lines) + "\n"


# ------------------------------------------------------------------ the machine
def is_root():
    return os.geteuid() == 0


def pg_bin(name):
    """Path of a PostgreSQL program: on PATH, else from the newest
    /usr/lib/postgresql/*/bin; None when not found."""
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key, reverse=True):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def server_bin_dir():
    """Directory of the newest installed server binaries (has postgres), or None."""
    p = newest(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return os.path.dirname(p) if p else None


def run(argv, **kw):
    """Runs a command with its output on stderr (stdout is for the URL)."""
    return subprocess.run(argv, stdout=sys.stderr, **kw).returncode == 0


def quiet(argv):
    try:
        return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except OSError:
        return False


def tcp_open(host, port):
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def ready(host, port):
    isready = pg_bin("pg_isready")
    if isready:
        return quiet([isready, "-q", "-h", host, "-p", str(port), "-t", "3"])
    return tcp_open(host, port)


def ready_url(url):
    isready = pg_bin("pg_isready")
    if isready:
        return quiet([isready, "-q", "-d", url, "-t", "3"])
    # No client tools: a TCP probe of the URL's host:port.
    hp = url_host_port(url)
    return hp is not None and tcp_open(*hp)


def wait_ready(port, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ready("127.0.0.1", port):
            return True
        time.sleep(1)
    return ready("127.0.0.1", port)


def trust_ok(port):
    """Can user postgres log in over TCP from 127.0.0.1 without a password?"""
    psql = pg_bin("psql")
    if not psql:
        log(f"warning: psql not found; cannot check auth on 127.0.0.1:{port}")
        return True
    return quiet([psql, "-w", "-X", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres",
                  "-Atc", "select 1"])


def lsclusters(*args):
    try:
        p = subprocess.run(["pg_lsclusters", "-h", *args], capture_output=True, text=True)
    except OSError:
        return []
    return parse_lsclusters(p.stdout)


def fix_hba(path):
    """trust_loopback on the file, keeping a first backup and the file's owner and mode."""
    if not os.path.exists(path + HBA_BACKUP_SUFFIX):
        shutil.copy2(path, path + HBA_BACKUP_SUFFIX)
    with open(path) as f:
        text = trust_loopback(f.read())
    with open(path, "w") as f:  # rewriting in place keeps owner and mode
        f.write(text)


def ensure_trust(port, version=None, cluster=None):
    """Makes sure trust auth works, fixing the Debian cluster's pg_hba.conf
    when we know which cluster it is and are root."""
    if trust_ok(port):
        return
    if version is None:
        found = [(v, c) for v, c, p, _ in lsclusters() if p == port]
        if found:
            version, cluster = found[0]
    hba = f"/etc/postgresql/{version}/{cluster}/pg_hba.conf"
    if version is None or not os.path.isfile(hba):
        raise Failure(f"user postgres cannot log in without a password on 127.0.0.1:{port} and it is not a local "
                      "Debian cluster I can fix; set DATABASE_URL, or run: scripts/ensure-postgres.sh --private")
    if not is_root():
        raise Failure(f"user postgres cannot log in without a password on 127.0.0.1:{port}; as root, set 127.0.0.1/32 "
                      f"and ::1/128 to trust in {hba} (or run: scripts/ensure-postgres.sh --private)")
    log(f"password-less TCP login for postgres fails; setting 127.0.0.1/32 and ::1/128 to trust in {hba} "
        f"(backup: {hba}{HBA_BACKUP_SUFFIX})")
    fix_hba(hba)
    if not run(["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "reload"]):
        raise Failure(f"pg_ctlcluster {version} {cluster} reload failed")
    for _ in range(10):
        if trust_ok(port):
            return
        time.sleep(1)
    raise Failure(f"still cannot log in as postgres on 127.0.0.1:{port} after fixing {hba}")


def apt_install_postgres():
    if not is_root():
        raise Failure("PostgreSQL is not installed and I am not root; install it (apt-get install postgresql), "
                      "set DATABASE_URL, or run scripts/dev-up.sh")
    if not shutil.which("apt-get"):
        raise Failure("PostgreSQL is not installed and apt-get is not available")
    log("PostgreSQL is not installed: apt-get install postgresql (this takes a minute)")
    if not run(["apt-get", "update"]):
        raise Failure("apt-get update failed")
    if not run(["apt-get", "install", "-y", "postgresql"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive")):
        raise Failure("apt-get install postgresql failed")


# ------------------------------------------------------------------ private
def as_postgres_user():
    """The command prefix that runs a program as user postgres (initdb and
    postgres refuse to run as root), creating the user if needed."""
    if not quiet(["id", "postgres"]):
        log("creating system user postgres")
        if not run(["useradd", "--system", "--user-group", "--home-dir", "/var/lib/postgresql",
                    "--shell", "/bin/bash", "postgres"]):
            raise Failure("could not create user postgres")
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--"]
    return ["su", "postgres", "-s", "/bin/sh", "-c", '"$0" "$@"', "--"]


def private_cluster(root):
    directory = os.environ.get("MAITRE_PG_DIR") or os.path.join(root, "target", "dev-pg")
    port = int(os.environ.get("MAITRE_PG_PORT") or PRIVATE_PORT)
    os.makedirs(directory, exist_ok=True)
    directory = os.path.abspath(directory)
    data, logfile = os.path.join(directory, "data"), os.path.join(directory, "postgres.log")

    if ready("127.0.0.1", port):
        log(f"a server already answers on 127.0.0.1:{port} (private cluster in {directory}?)")
        if not trust_ok(port):
            raise Failure(f"server on 127.0.0.1:{port} refuses password-less login as postgres; "
                          "stop it or set MAITRE_PG_PORT")
        return admin_url(port)

    bindir = server_bin_dir()
    if bindir is None:
        apt_install_postgres()
        bindir = server_bin_dir()
        if bindir is None:
            raise Failure("no /usr/lib/postgresql/*/bin/postgres after installing postgresql")

    as_owner = []
    if is_root():
        as_owner = as_postgres_user()
        run(["chown", "postgres:", directory])
        if os.path.isdir(data):
            run(["chown", "-R", "postgres:", data])
        if os.path.exists(logfile):
            run(["chown", "postgres:", logfile])
        if not quiet(as_owner + ["test", "-w", directory]):
            raise Failure(f"user postgres cannot write {directory} (a parent directory is not searchable?); "
                          "set MAITRE_PG_DIR to e.g. /tmp/maitre-pg")

    if not os.path.isfile(os.path.join(data, "PG_VERSION")):
        if os.path.isdir(data) and os.listdir(data):
            raise Failure(f"{data} exists but is not a PostgreSQL data directory; remove it")
        version = subprocess.run([os.path.join(bindir, "postgres"), "--version"], capture_output=True, text=True).stdout.strip()
        log(f"initdb: new private cluster in {data} ({version})")
        initdb_log = os.path.join(directory, "initdb.log")
        with open(initdb_log, "w") as out:
            ok = subprocess.run(as_owner + [os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust",
                                            "--encoding=UTF8", "--locale=C"], stdout=out, stderr=out).returncode == 0
        if not ok:
            tail(initdb_log)
            raise Failure(f"initdb failed (log: {initdb_log})")
        # TCP on 127.0.0.1 only, no unix socket (its path could be too long
        # and /var/run/postgresql may not be writable); fsync stays on.
        with open(os.path.join(data, "postgresql.conf"), "a") as f:
            f.write(PRIVATE_SETTINGS)
    if add_statement_stats(os.path.join(data, "postgresql.conf")):
        log("postgresql.conf: pg_stat_statements preloaded")

    log(f"starting private cluster on 127.0.0.1:{port} (log: {logfile})")
    if not run(as_owner + [os.path.join(bindir, "pg_ctl"), "-D", data, "-l", logfile, "-o", f"-p {port}",
                           "-w", "-t", "30", "start"]):
        tail(logfile)
        raise Failure(f"pg_ctl start failed (log: {logfile})")
    if not wait_ready(port, 30):
        raise Failure(f"private cluster did not become ready on 127.0.0.1:{port} (log: {logfile})")
    if not trust_ok(port):
        raise Failure(f"private cluster on 127.0.0.1:{port} refuses password-less login as postgres")
    log("private cluster ready; stop it with: " + shlex.join(as_owner + [os.path.join(bindir, "pg_ctl"), "-D", data, "stop"]))
    return admin_url(port)


def tail(path, n=20):
    try:
        with open(path, errors="replace") as f:
            sys.stderr.writelines(f.readlines()[-n:])
    except OSError:
        pass


# ------------------------------------------------------------------ system
def debian_versions():
    return os.listdir("/etc/postgresql") if os.path.isdir("/etc/postgresql") else []


def debian_cluster():
    """Starts (if needed) the newest version's main cluster under /etc/postgresql."""
    version = newest(debian_versions())
    cluster = choose_cluster(os.listdir(f"/etc/postgresql/{version}")) if version else None
    if cluster is None:
        raise Failure("no Debian cluster under /etc/postgresql")
    if not shutil.which("pg_ctlcluster"):
        raise Failure(f"/etc/postgresql/{version}/{cluster} exists but pg_ctlcluster is missing "
                      "(apt-get install postgresql-common)")
    found = lsclusters(version, cluster)
    port, status = (found[0][2], found[0][3]) if found else (DEFAULT_PORT, "")
    log_file = f"/var/log/postgresql/postgresql-{version}-{cluster}.log"
    if not status.startswith("online"):
        log(f"starting Debian cluster {version}/{cluster} (port {port})")
        if not run(["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "start"]):
            raise Failure(f"pg_ctlcluster {version} {cluster} start failed (as root? log: {log_file})")
    else:
        log(f"Debian cluster {version}/{cluster} is already running (port {port})")
    if not wait_ready(port, 30):
        raise Failure(f"cluster {version}/{cluster} is not accepting connections on 127.0.0.1:{port} "
                      f"after 30 s (log: {log_file})")
    ensure_trust(port, version, cluster)
    return admin_url(port)


def system_server():
    # 1. An explicit DATABASE_URL that answers.
    url = os.environ.get("DATABASE_URL")
    if url:
        if ready_url(url):
            log("using DATABASE_URL from the environment")
            return url
        log("DATABASE_URL is set but its server does not answer; looking for a local server")
    # 2. Something already listening on 127.0.0.1:5432.
    if ready("127.0.0.1", DEFAULT_PORT):
        log(f"a server answers on 127.0.0.1:{DEFAULT_PORT}")
        ensure_trust(DEFAULT_PORT)
        return admin_url(DEFAULT_PORT)
    # 3. An existing Debian cluster.
    if debian_versions():
        return debian_cluster()
    # 4. Nothing installed: install it (root only), then as 3.
    if server_bin_dir() is None:
        apt_install_postgres()
    if not debian_versions():
        # Binaries but no cluster (e.g. it was dropped): create one.
        if not is_root():
            raise Failure("PostgreSQL is installed but has no cluster and I am not root; "
                          "run: scripts/ensure-postgres.sh --private")
        version = os.path.basename(os.path.dirname(server_bin_dir()))
        log(f"no Debian cluster: pg_createcluster {version} main")
        if not run(["pg_createcluster", version, "main"]):
            raise Failure(f"pg_createcluster {version} main failed")
    return debian_cluster()


def main(argv):
    private = argv == ["--private"]
    if argv and not private:
        log(f"error: unknown arguments: {' '.join(argv)} (usage: scripts/ensure-postgres.sh [--private])")
        return 1
    os.environ.setdefault("PGCONNECT_TIMEOUT", "5")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        url = private_cluster(root) if private else system_server()
    except Failure as e:
        log(f"error: {e}")
        return 1
    print(url, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
