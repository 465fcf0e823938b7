//! Helpers shared by the multi-process tests (`journeys`, `faults`, `hostile`): real
//! `coordinator serve` and `worker join` processes on loopback, the submitter CLI, and checks
//! on what `status --json` and `results.json` say.
#![allow(dead_code)]

pub mod netgrid;
pub mod netns;
pub mod simworker;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const PRIMES_WASM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/primes/primes.wasm"
);

/// A child process killed (SIGKILL) when dropped, so a failing test leaves nothing behind.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// Send `sig` (e.g. `libc::SIGSTOP` to pause the process where it is, `SIGCONT` to resume).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "signal {sig} to {}", self.name);
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn coordinator_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_coordinator"))
}

/// The `worker` binary: built beside ours by `cargo test --workspace`; rebuilt (with
/// `--workspace`, once per test process) when it is missing or older than its sources, so a
/// test never runs a stale worker.
pub fn worker_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        netsim::workspace_bin(&coordinator_bin(), "worker", |line| eprintln!("{line}"))
            .unwrap_or_else(|e| panic!("{e:#}; run `cargo build --workspace` first"))
    })
    .clone()
}

pub fn log_file(dir: &Path, name: &str) -> Stdio {
    Stdio::from(std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file"))
}

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub coord: Option<Proc>,
    /// Worker processes; `start_worker` appends, `restart_worker` replaces in place.
    pub workers: Vec<Proc>,
    pub port: u16,
    pub ticket: String,
    pub token: String,
    /// Processes started so far (names log files uniquely).
    pub spawned: usize,
    /// `serve --policy` of every (re)start; `None`: serve's default (the open-pool policy).
    pub policy: Option<&'static str>,
    /// `serve --store URL` of every (re)start; `None`: serve's default (SQLite in the data dir).
    pub store: Option<String>,
}

impl Drop for Cluster {
    /// A failed test shows (and with `PEERGRID_KEEP_LOGS` keeps) the logs of its processes.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
    }
}

impl Cluster {
    /// A coordinator with `serve`'s default (open-pool) policy and `workers` workers. The
    /// open policy accepts nothing before quorum + 1 workers of one engine agree: use
    /// [`Cluster::start_trusting`] for fewer.
    pub fn start(workers: usize) -> Cluster {
        Self::start_with(workers, None, None)
    }

    /// Like [`Cluster::start`], with `serve --store store` when `store` is set.
    pub fn start_with_store(workers: usize, store: Option<String>) -> Cluster {
        Self::start_with(workers, None, store)
    }

    /// A scientist's own machines: `serve --policy trusting` (a quorum of 2 needs 2 workers).
    pub fn start_trusting(workers: usize) -> Cluster {
        Self::start_with(workers, Some("trusting"), None)
    }

    fn start_with(workers: usize, policy: Option<&'static str>, store: Option<String>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let port = free_udp_port();
        let mut c = Cluster {
            dir,
            coord: None,
            workers: Vec::new(),
            port,
            ticket: String::new(),
            token: String::new(),
            spawned: 0,
            policy,
            store,
        };
        c.start_coordinator();
        for i in 0..workers {
            c.start_worker(i);
        }
        c
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("coord")
    }

    pub fn start_coordinator(&mut self) {
        let data = self.data();
        let _ = std::fs::remove_file(data.join("ticket"));
        self.spawned += 1;
        let n = self.spawned;
        let child = Command::new(coordinator_bin())
            .args(["serve", "--data-dir"])
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(self.policy.map(|p| ["--policy", p]).iter().flatten())
            .args(self.store.iter().flat_map(|s| ["--store", s.as_str()]))
            .env(
                "RUST_LOG",
                std::env::var("PEERGRID_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(log_file(self.dir.path(), &format!("coordinator-{n}.out")))
            .stderr(log_file(self.dir.path(), &format!("coordinator-{n}")))
            .spawn()
            .expect("spawning coordinator serve");
        self.coord = Some(Proc {
            child,
            name: "coordinator".into(),
        });
        let t0 = Instant::now();
        loop {
            if let (Ok(t), Ok(k)) = (
                std::fs::read_to_string(data.join("ticket")),
                std::fs::read_to_string(data.join("submit-token")),
            ) {
                if !t.trim().is_empty() && !k.trim().is_empty() {
                    self.ticket = t.trim().to_string();
                    self.token = k.trim().to_string();
                    break;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "coordinator wrote no ticket within 120 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // On a PostgreSQL store the ticket is written before the coordinator takes the
        // leader lease, and until it leads it refuses every connection (as a standby does):
        // wait until it answers.
        if self.store.is_some() {
            while self.try_status().is_none() {
                assert!(
                    t0.elapsed() < Duration::from_secs(120),
                    "coordinator did not start leading within 120 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The coordinator's log files (stderr of every `coordinator serve` started), concatenated.
    pub fn coordinator_logs(&self) -> String {
        let mut all = String::new();
        for n in 1..=self.spawned {
            all += &std::fs::read_to_string(self.dir.path().join(format!("coordinator-{n}.log")))
                .unwrap_or_default();
        }
        all
    }

    pub fn worker_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("worker-{i}"))
    }

    fn spawn_worker(&mut self, i: usize) -> Proc {
        self.spawned += 1;
        let child = Command::new(worker_bin())
            .args([
                "join",
                &self.ticket,
                "--slots",
                "1",
                "--listen",
                "127.0.0.1:0",
                // The tests are about the protocol, not about politeness: at the default
                // idle priority, any other load on the machine (a build, another test
                // binary) starves the tasks, and no progress-paced test can make progress.
                "--priority",
                "normal",
                "--data-dir",
            ])
            .arg(self.worker_dir(i))
            .env(
                "RUST_LOG",
                std::env::var("PEERGRID_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log_file(
                self.dir.path(),
                &format!("worker-{i}-{}", self.spawned),
            ))
            .spawn()
            .expect("spawning worker join");
        Proc {
            child,
            name: format!("worker-{i}"),
        }
    }

    /// Start worker `i` (data dir `worker-i`) and append it to `workers`.
    pub fn start_worker(&mut self, i: usize) {
        let p = self.spawn_worker(i);
        self.workers.push(p);
    }

    /// Start `workers[slot]` again on the same data dir (same identity, same outbox); kills
    /// the old process first if it still runs.
    pub fn restart_worker(&mut self, slot: usize) {
        self.workers[slot].kill9();
        let p = self.spawn_worker(slot);
        self.workers[slot] = p;
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(coordinator_bin());
        cmd.arg(args[0])
            .args(["--to", &self.ticket, "--token", &self.token])
            .args(&args[1..]);
        cmd.env("RUST_LOG", "warn");
        cmd.output().expect("running the coordinator CLI")
    }

    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    /// `status --json`, or `None` while the coordinator is unreachable.
    pub fn try_status(&self) -> Option<Value> {
        let out = self.cli(&["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Value) -> bool,
    ) -> Value {
        let t0 = Instant::now();
        loop {
            let s = self.status();
            if f(&s) {
                return s;
            }
            if t0.elapsed() > timeout {
                panic!("timed out waiting for {what}; last status: {s}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn dump_logs(&self) {
        // PEERGRID_KEEP_LOGS=DIR keeps every log file of a failed test for a closer look.
        let keep = std::env::var_os("PEERGRID_KEEP_LOGS").map(PathBuf::from);
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) == Some("log") {
                if let Some(keep) = &keep {
                    let _ = std::fs::create_dir_all(keep);
                    let _ = std::fs::copy(&p, keep.join(p.file_name().unwrap()));
                }
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!("--- {} (last lines)", p.display());
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }

    /// A primes job over [0, count*block) in `count` tasks.
    pub fn primes_job(&self, count: u32, block: u64, deadline_secs: u64) -> PathBuf {
        self.primes_job_with(count, block, deadline_secs, 6)
    }

    pub fn primes_job_with(
        &self,
        count: u32,
        block: u64,
        deadline_secs: u64,
        max_replicas: u32,
    ) -> PathBuf {
        let jd = self.dir.path().join("job");
        std::fs::create_dir_all(&jd).unwrap();
        std::fs::copy(PRIMES_WASM, jd.join("primes.wasm")).unwrap();
        let toml = format!(
            "name = \"primes\"\nmodule = \"primes.wasm\"\nquorum = 2\nmax_replicas = {max_replicas}\nfuel = 20_000_000_000\nmemory_mb = 32\nmax_output = 64\ndeadline_secs = {deadline_secs}\n[tasks]\ncount = {count}\nargs = [\"block\", \"{{i}}\", \"{block}\"]\n"
        );
        let path = jd.join("job.toml");
        std::fs::write(&path, toml).unwrap();
        path
    }

    pub fn submit(&self, job: &Path) -> u64 {
        let out = self.cli(&["submit", job.to_str().unwrap(), "--json"]);
        assert!(
            out.status.success(),
            "submit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("submit --json prints JSON");
        v["id"].as_u64().expect("job id")
    }

    /// `coordinator results JOB --out DIR` (must succeed); returns (DIR, results.json).
    pub fn download(&self, job: u64) -> (PathBuf, Value) {
        let out_dir = self.dir.path().join(format!("results-{job}"));
        let out = self.cli(&[
            "results",
            &job.to_string(),
            "--out",
            out_dir.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "results failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(out_dir.join("results.json")).unwrap())
                .unwrap();
        (out_dir, json)
    }

    /// Download results; returns (sum of outputs as numbers, results.json).
    pub fn results(&self, job: u64) -> (u64, Value) {
        let (out_dir, json) = self.download(job);
        let mut sum = 0;
        for t in json["tasks"].as_array().unwrap() {
            let idx = t["index"].as_u64().unwrap();
            let text = std::fs::read_to_string(out_dir.join(format!("{idx}.out")))
                .expect("an .out per accepted task");
            sum += text
                .trim()
                .parse::<u64>()
                .expect("primes output is a number");
        }
        (sum, json)
    }
}

pub fn job_of(status: &Value, id: u64) -> Value {
    status["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"].as_u64() == Some(id))
        .cloned()
        .expect("job listed")
}

/// Every task accepted by at least two distinct workers; returns Σ agreeing replicas.
pub fn check_quorum(results: &Value, tasks: usize) -> u64 {
    let list = results["tasks"].as_array().unwrap();
    assert_eq!(list.len(), tasks);
    let mut agreeing = 0;
    for t in list {
        assert_eq!(t["status"], "accepted", "task {t}");
        let w: Vec<&str> = t["agreeing_workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        let mut d = w.clone();
        d.sort();
        d.dedup();
        assert!(
            d.len() >= 2 && d.len() == w.len(),
            "task {} needs 2 distinct agreeing workers, got {w:?}",
            t["index"]
        );
        agreeing += w.len() as u64;
    }
    agreeing
}

/// Credit bookkeeping of a finished job as `status` and `results.json` report it:
/// (Σ workers' `valid`, Σ workers' `credit`, Σ over tasks of fuel × agreeing replicas / 1e9).
/// With one job on the coordinator, `valid` must equal the agreeing replicas and credit the
/// valid fuel: anything credited twice (or lost) breaks one of the two.
pub fn credit_figures(status: &Value, results: &Value) -> (u64, f64, f64) {
    let workers = status["workers"].as_array().unwrap();
    let valid: u64 = workers.iter().map(|w| w["valid"].as_u64().unwrap()).sum();
    let credit: f64 = workers.iter().map(|w| w["credit"].as_f64().unwrap()).sum();
    let expected: f64 = results["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t["fuel_used"].as_f64().unwrap()
                * t["agreeing_workers"].as_array().unwrap().len() as f64
                / 1e9
        })
        .sum();
    (valid, credit, expected)
}

/// argc 1: prints "fine" (stderr too, which must not be reported); argc 2: stderr, exit 2;
/// argc 3: stderr with an escape sequence, then a trap.
pub const FAILING_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "reading input\nerror: bad input, giving up\n")
  (data (i32.const 200) "about to trap \1b[31mred\n")
  (data (i32.const 300) "fine\n")
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 8) (local.get $ptr))
    (i32.store (i32.const 12) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 8) (i32.const 1) (i32.const 16))))
  (func (export "_start")
    (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
    (if (i32.eq (i32.load (i32.const 0)) (i32.const 2)) (then
      (call $write (i32.const 2) (i32.const 100) (i32.const 42))
      (call $proc_exit (i32.const 2))))
    (if (i32.eq (i32.load (i32.const 0)) (i32.const 3)) (then
      (call $write (i32.const 2) (i32.const 200) (i32.const 23))
      unreachable))
    (call $write (i32.const 2) (i32.const 300) (i32.const 5))
    (call $write (i32.const 1) (i32.const 300) (i32.const 5))))"#;
