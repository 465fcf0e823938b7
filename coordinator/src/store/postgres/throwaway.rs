//! A private, throwaway PostgreSQL server for tests and benchmarks: `initdb` into a temporary
//! directory, a server listening only on a Unix socket in that directory (no TCP port, so
//! nothing else on the machine can reach it or collide with it), stopped and removed when
//! dropped (also when a test panics). It needs Debian's `postgresql` package (the binaries in
//! `/usr/lib/postgresql/VERSION/bin`), not a running system service.
//!
//! PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user
//! (`runuser -u postgres --`) in a directory handed to that user.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// What a test prints when it cannot start a server (outside CI).
pub const SKIPPED: &str = "skipped: no PostgreSQL server (install Debian's postgresql)";

/// A running throwaway server; stopped and deleted on drop.
#[derive(Debug)]
pub struct ThrowawayPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    databases: AtomicU32,
    /// Also listening on TCP at this address, inside this network namespace
    /// ([`ThrowawayPostgres::start_in_netns`]).
    tcp: Option<(String, std::net::IpAddr)>,
}

/// The newest installed server's `bin` directory, if any.
fn find_bin() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl ThrowawayPostgres {
    /// Start a server. `Ok(None)` when none is installed (or, as root, there is no
    /// `postgres` user to run it as); `Err` when one is installed but would not start.
    /// Blocks for a second or two.
    pub fn start() -> Result<Option<ThrowawayPostgres>, String> {
        Self::start_with(None)
    }

    /// [`ThrowawayPostgres::start`] as a database host of a network lab: the server runs in
    /// the network namespace `netns` and also listens on TCP `ip:5432` there (any client
    /// that reaches it is trusted, as on the Unix socket), for [`Self::tcp_url_of`].
    pub fn start_in_netns(
        netns: &str,
        ip: std::net::IpAddr,
    ) -> Result<Option<ThrowawayPostgres>, String> {
        Self::start_with(Some((netns.to_string(), ip)))
    }

    fn start_with(
        tcp: Option<(String, std::net::IpAddr)>,
    ) -> Result<Option<ThrowawayPostgres>, String> {
        let Some(bin) = find_bin() else {
            return Ok(None);
        };
        let as_postgres = is_root();
        if as_postgres
            && !Command::new("id")
                .arg("postgres")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        {
            return Ok(None);
        }
        // Short path: a Unix socket path has a ~100-byte limit.
        let dir = tempfile::Builder::new()
            .prefix("pg")
            .tempdir_in("/tmp")
            .map_err(|e| format!("creating a temporary directory: {e}"))?;
        let server = ThrowawayPostgres {
            dir,
            bin,
            as_postgres,
            databases: AtomicU32::new(0),
            tcp,
        };
        if as_postgres {
            let ok = Command::new("chown")
                .arg("postgres:")
                .arg(server.dir.path())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err(format!(
                    "cannot hand {} to the postgres user",
                    server.dir.path().display()
                ));
            }
        }
        let data = server.data();
        // --no-sync: only initdb's own files are not fsynced; the server itself runs with
        // its durable defaults (fsync, synchronous_commit on).
        server.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let sock = path_str(server.dir.path())?.to_string();
        let listen = match &server.tcp {
            Some((_, ip)) => {
                use std::io::Write;
                let hba = data.join("pg_hba.conf");
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&hba)
                    .map_err(|e| format!("opening {}: {e}", hba.display()))?;
                writeln!(f, "host all all 0.0.0.0/0 trust")
                    .map_err(|e| format!("writing {}: {e}", hba.display()))?;
                ip.to_string()
            }
            None => String::new(),
        };
        let log = server.dir.path().join("server.log");
        server
            .run(
                "pg_ctl",
                &[
                    "-D",
                    path_str(&data)?,
                    "-l",
                    path_str(&log)?,
                    "-w",
                    "-t",
                    "120",
                    "-o",
                    &format!("-k {sock} -c listen_addresses='{listen}'"),
                    "start",
                ],
            )
            .map_err(|e| {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                format!("{e}; server log: {}", log.trim())
            })?;
        Ok(Some(server))
    }

    /// For tests: a server, or `None` after printing [`SKIPPED`] when none is installed. With
    /// `CI=true` a missing server is a failure instead, so CI really runs what needs one.
    /// Panics when a server is installed but does not start.
    pub fn for_tests() -> Option<ThrowawayPostgres> {
        match Self::start() {
            Ok(Some(s)) => Some(s),
            Ok(None) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("no PostgreSQL server can be started in CI: install Debian's postgresql (see .ci/run)")
            }
            Ok(None) => {
                eprintln!("{SKIPPED}");
                None
            }
            Err(e) => panic!("cannot start a throwaway PostgreSQL server: {e}"),
        }
    }

    /// URL of the `postgres` database (superuser `postgres`, no password: Unix socket only).
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    fn url_of(&self, db: &str) -> String {
        format!(
            "postgres:///{db}?host={}&user=postgres",
            self.dir.path().display()
        )
    }

    /// URL of database `db` over TCP, for clients on other hosts of the lab (only after
    /// [`Self::start_in_netns`]).
    pub fn tcp_url_of(&self, db: &str) -> Option<String> {
        let (_, ip) = self.tcp.as_ref()?;
        Some(format!("postgres://postgres@{ip}:5432/{db}"))
    }

    /// Create a new, empty database on this server; returns its URL. Blocks: call it from a
    /// plain thread, not an async task.
    pub fn fresh_database(&self) -> Result<String, String> {
        Ok(self.url_of(&self.create_database()?))
    }

    /// [`Self::fresh_database`]: its URL over TCP ([`Self::tcp_url_of`], for the lab's
    /// hosts) and over the Unix socket (for the test itself, outside the lab).
    pub fn fresh_tcp_database(&self) -> Result<(String, String), String> {
        let name = self.create_database()?;
        let tcp = self
            .tcp_url_of(&name)
            .ok_or_else(|| "this server does not listen on TCP (start_in_netns)".to_string())?;
        Ok((tcp, self.url_of(&name)))
    }

    fn create_database(&self) -> Result<String, String> {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("peergrid_{n}");
        let mut c = postgres::Client::connect(&self.url(), postgres::NoTls)
            .map_err(|e| super::describe(&e))?;
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .map_err(|e| super::describe(&e))?;
        Ok(name)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.tcp {
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]);
                c
            }
            None => Command::new(if self.as_postgres { "runuser" } else { "env" }),
        };
        if self.tcp.is_some() && self.as_postgres {
            cmd.arg("runuser");
        }
        if self.as_postgres {
            cmd.args(["-u", "postgres", "--"]);
        }
        cmd.arg(&exe);
        // Run from the temporary directory: as the postgres user, the caller's directory may
        // not be readable.
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{tool} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", p.display()))
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        let data = self.data();
        if let Some(data) = data.to_str() {
            // Immediate: nothing in it is worth a clean shutdown. The directory goes with
            // the TempDir.
            let _ = self.run("pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"]);
        }
    }
}
