//! A real PgBouncer in transaction mode in front of the tests' PostgreSQL,
//! for the tests of `DB_POOLER=transaction` (runtime/tests/pooler.rs,
//! tests/e2e/pooler.rs). It is Debian's `pgbouncer` (1.18 on Debian 12:
//! no protocol-level prepared statements), started as a child process on a
//! free loopback port with a configuration of its own in a temporary
//! directory, and killed when dropped.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    str::FromStr,
    time::{Duration, Instant},
};

use sqlx::postgres::PgConnectOptions;

use super::{admin_url, process::free_port, with_host};

/// Where Debian installs it (`/usr/sbin` is not on every user's PATH).
const DEBIAN_BINARY: &str = "/usr/sbin/pgbouncer";

/// The pgbouncer executable: on PATH, else Debian's.
pub fn binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("pgbouncer"))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| Some(PathBuf::from(DEBIAN_BINARY)).filter(|p| p.is_file()))
}

/// The executable, or `None` when it is missing and the caller should skip.
/// Under CI (`CI` set) a missing pgbouncer fails the test instead: a skip
/// there would prove nothing.
pub fn require(test: &str) -> Option<PathBuf> {
    decide(test, binary(), std::env::var_os("CI").is_some())
}

/// [`require`]'s rule, apart from the machine it runs on.
fn decide(test: &str, found: Option<PathBuf>, under_ci: bool) -> Option<PathBuf> {
    if found.is_some() {
        return found;
    }
    let how = "install it: apt-get install -y pgbouncer (scripts/install-tools.sh does, as root)";
    if under_ci {
        panic!("{test}: pgbouncer not found on PATH nor at {DEBIAN_BINARY}; {how}");
    }
    eprintln!("{test}: SKIPPED, pgbouncer not found on PATH nor at {DEBIAN_BINARY}; {how}");
    None
}

/// A running PgBouncer, pool_mode = transaction.
pub struct PgBouncer {
    child: Child,
    /// Its configuration and log (kept for a failed test's message).
    dir: tempdir::Dir,
    /// `127.0.0.1:<port>` it listens on.
    pub addr: String,
}

impl PgBouncer {
    /// Starts `binary` in front of the server `DATABASE_URL` names, every
    /// database passed through (`* =`), with `pool_size` server connections
    /// per database and user; returns once it accepts connections.
    pub fn start(binary: &Path, pool_size: u32) -> PgBouncer {
        let admin = PgConnectOptions::from_str(&admin_url()).expect("DATABASE_URL parses");
        let port = free_port();
        let dir = tempdir::Dir::new("maitre-pgbouncer");
        let path = dir.path();
        let users = path.join("users.txt");
        let log = path.join("pgbouncer.log");
        // trust: clients are the test itself; PgBouncer logs in to
        // PostgreSQL as the client's user (the tests' server trusts loopback).
        fs::write(&users, format!("\"{}\" \"\"\n", admin.get_username())).expect("users.txt");
        let ini = format!(
            "[databases]\n\
             * = host={host} port={server_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {users}\n\
             pool_mode = transaction\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 2000\n\
             logfile = {log}\n\
             log_connections = 0\n\
             log_disconnections = 0\n",
            host = admin.get_host(),
            server_port = admin.get_port(),
            users = users.display(),
            log = log.display(),
        );
        let config = path.join("pgbouncer.ini");
        fs::write(&config, ini).expect("pgbouncer.ini");
        let mut command = Command::new(binary);
        // PgBouncer refuses to run as root (CI is root): it drops to `nobody`,
        // who must be able to read its files.
        if running_as_root() {
            command.args(["-u", "nobody"]);
            dir.open_to_all();
        }
        let mut child = command
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "pgbouncer did not start ({exited:?}); its log:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        PgBouncer { child, dir, addr }
    }

    /// `direct_url` (a database on the tests' server) through this PgBouncer.
    pub fn url(&self, direct_url: &str) -> String {
        with_host(direct_url, &self.addr)
    }

    /// What PgBouncer logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether this process runs as root (its effective uid, from /proc).
fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .and_then(|line| line.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

/// A directory removed when dropped (no tempfile dependency for one use).
mod tempdir {
    use std::{
        fs,
        os::unix::fs::PermissionsExt,
        path::{Path, PathBuf},
    };

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(prefix: &str) -> Dir {
            let path =
                std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::now_v7().simple()));
            fs::create_dir_all(&path).expect("a temporary directory");
            Dir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }

        /// Readable and writable by every user (PgBouncer dropped to
        /// `nobody` writes its log here).
        pub fn open_to_all(&self) {
            let _ = fs::set_permissions(&self.0, fs::Permissions::from_mode(0o777));
            if let Ok(entries) = fs::read_dir(&self.0) {
                for entry in entries.flatten() {
                    let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o666));
                }
            }
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_pgbouncer_skips_locally_and_fails_under_ci() {
        let found = Some(PathBuf::from("/usr/sbin/pgbouncer"));
        assert_eq!(decide("t", found.clone(), true), found);
        assert_eq!(decide("t", None, false), None);
        let under_ci = std::panic::catch_unwind(|| decide("t", None, true));
        assert!(
            under_ci.is_err(),
            "under CI a missing pgbouncer fails the test"
        );
    }
}
