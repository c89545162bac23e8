//! A throwaway PostgreSQL cluster for tests and the demo: `initdb` into a temporary directory,
//! `pg_ctl start` on a free loopback port with trust authentication, stopped and removed on
//! drop. The binaries are looked up on PATH, then under /usr/lib/postgresql/*/bin.
//!
//! PostgreSQL refuses to run as root, so when we are root the cluster is owned and run by the
//! unprivileged `postgres` system user.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use tempfile::TempDir;

/// Settings of the throwaway server.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// `false` turns fsync and synchronous commit off: much faster, and safe for a cluster whose
    /// data dies with the test anyway. Benchmarks keep it `true` to measure honest numbers.
    pub durable: bool,
    pub max_connections: u32,
    /// The lock table is this times `max_connections`. Large by default, so that the tests'
    /// replicas get every connection's full batches (`src/store/lock_budget.rs`).
    pub max_locks_per_transaction: u32,
    /// Serve TLS with this certificate, and only TLS over TCP (`hostssl`; plain TCP is
    /// refused), as managed services are set up. Local socket connections stay plain.
    pub tls: Option<ServerTls>,
    /// Load `pg_stat_statements` (time spent per statement), for profiling.
    pub statement_stats: bool,
    /// The server's buffer cache (`shared_buffers`, e.g. `128MB`, PostgreSQL's default).
    pub shared_buffers: String,
}

/// A server certificate chain and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            durable: false,
            max_connections: 100,
            max_locks_per_transaction: 1024,
            tls: None,
            statement_stats: false,
            shared_buffers: "128MB".to_owned(),
        }
    }
}

pub struct ThrowawayPostgres {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    run_as: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
    running: bool,
}

impl ThrowawayPostgres {
    pub fn start(options: PostgresOptions) -> anyhow::Result<Self> {
        let bin = find_bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("inventory-pg-")
            .tempdir()
            .context("creating a temporary directory for PostgreSQL")?;
        let run_as = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .context("running as root, PostgreSQL needs an unprivileged user, and there is no `postgres` user (create one, or run as a normal user)")?;
            std::os::unix::fs::chown(dir.path(), Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .context("giving the data directory to the postgres user")?;
            Some((user.uid, user.gid))
        } else {
            None
        };
        let mut pg = ThrowawayPostgres {
            dir,
            bin,
            port: 0,
            run_as,
            running: false,
        };
        pg.init()?;
        pg.write_settings(options)?;
        // Another process may take the free port between our probe and the server's bind.
        let mut last_error = None;
        for _ in 0..5 {
            pg.port = free_port()?;
            match pg.pg_ctl_start() {
                Ok(()) => {
                    pg.running = true;
                    return Ok(pg);
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("PostgreSQL did not start")))
    }

    /// URL of database `db` (the cluster has `postgres`; create others with `CREATE DATABASE`).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id (the postmaster, parent of every backend), while it runs.
    pub fn server_pid(&self) -> Option<i32> {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        pid_file.lines().next()?.trim().parse().ok()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(self.dir.path())
            .stdin(Stdio::null())
            .env_remove("PGDATA");
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        cmd
    }

    fn init(&self) -> anyhow::Result<()> {
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data())
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn write_settings(&self, options: PostgresOptions) -> anyhow::Result<()> {
        let mut conf = format!(
            "\n# throwaway cluster\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nmax_connections = {}\nmax_locks_per_transaction = {}\nshared_buffers = '{}'\n",
            self.dir.path().display(),
            options.max_connections,
            options.max_locks_per_transaction,
            options.shared_buffers
        );
        if !options.durable {
            conf.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        if options.statement_stats {
            conf.push_str("shared_preload_libraries = 'pg_stat_statements'\n");
        }
        if let Some(tls) = &options.tls {
            self.write_server_file("server.crt", &tls.cert_pem)?;
            self.write_server_file("server.key", &tls.key_pem)?;
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
            std::fs::write(
                self.data().join("pg_hba.conf"),
                "local all all trust\n\
                 hostssl all all 127.0.0.1/32 trust\n\
                 hostnossl all all 0.0.0.0/0 reject\n",
            )
            .context("writing pg_hba.conf")?;
        }
        let path = self.data().join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&path).context("reading postgresql.conf")?;
        existing.push_str(&conf);
        std::fs::write(&path, existing).context("writing postgresql.conf")?;
        Ok(())
    }

    /// A file in the data directory only the server's user may read (PostgreSQL insists for keys).
    fn write_server_file(&self, name: &str, contents: &str) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.data().join(name);
        std::fs::write(&path, contents).with_context(|| format!("writing {name}"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&path, Some(uid.as_raw()), Some(gid.as_raw()))?;
        }
        Ok(())
    }

    fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let log = self.dir.path().join("postgres.log");
        let status = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(&log)
            .args([
                "-o",
                &format!("-p {}", self.port),
                "-w",
                "-t",
                "60",
                "start",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running pg_ctl start")?;
        if !status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            bail!(
                "PostgreSQL did not start on port {}: {}",
                self.port,
                tail.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
            );
        }
        Ok(())
    }

    /// Restarts the server on the same port and data, as for maintenance or a failover: every
    /// session is ended (`-m fast`), and what was committed stays (a crash would lose recent
    /// commits of a cluster that is not durable).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop_with("fast");
        self.pg_ctl_start()?;
        self.running = true;
        Ok(())
    }

    /// Stops the server at once, as a crash would (`-m immediate`). Called by drop; idempotent.
    pub fn stop(&mut self) {
        self.stop_with("immediate");
    }

    fn stop_with(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        self.running = false;
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A program of the same PostgreSQL installation as the throwaway servers (`pg_dump`,
/// `pg_restore`), so that its version matches theirs.
pub fn client_program(name: &str) -> anyhow::Result<PathBuf> {
    // `initdb` on PATH is often a link into the installation's own directory.
    let initdb =
        std::fs::canonicalize(find_bin_dir()?.join("initdb")).context("locating initdb")?;
    let program = initdb.with_file_name(name);
    anyhow::ensure!(
        program.is_file(),
        "{} not found beside initdb",
        program.display()
    );
    Ok(program)
}

/// The directory holding `initdb` and `pg_ctl`.
fn find_bin_dir() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    // Newest version first.
    versioned.sort_by_key(|p| {
        std::cmp::Reverse(
            p.parent()
                .and_then(Path::file_name)
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(0),
        )
    });
    on_path
        .into_iter()
        .chain(versioned)
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
        .context(
            "no PostgreSQL server binaries found (initdb and pg_ctl on PATH or under \
             /usr/lib/postgresql/*/bin): install them (Debian: apt-get install postgresql) \
             or set DATABASE_URL to a server you can create databases on",
        )
}
