//! End-to-end journeys with real processes: `coordinator serve`, several `worker join`, and
//! the submitter commands, talking QUIC over loopback.
//!
//! Faults are real too: `kill -9` of a worker and of the coordinator mid-job.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const PRIMES_WASM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/primes/primes.wasm");

/// A child process killed (SIGKILL) when dropped, so a failing test leaves nothing behind.
struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn coordinator_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_coordinator"))
}

/// The `worker` binary: built beside ours by `cargo test --workspace`; built on demand otherwise.
fn worker_bin() -> PathBuf {
    let path = coordinator_bin().with_file_name(format!("worker{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "worker", "--bin", "worker"])
            .status()
            .expect("running cargo build for the worker binary");
        assert!(status.success(), "building the worker binary failed; run `cargo build --workspace` first");
    }
    assert!(path.exists(), "no worker binary at {}", path.display());
    path
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    Stdio::from(std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file"))
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Cluster {
    dir: tempfile::TempDir,
    coord: Option<Proc>,
    workers: Vec<Proc>,
    port: u16,
    ticket: String,
    token: String,
}

impl Cluster {
    fn start(workers: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let port = free_udp_port();
        let mut c = Cluster { dir, coord: None, workers: Vec::new(), port, ticket: String::new(), token: String::new() };
        c.start_coordinator();
        for i in 0..workers {
            c.start_worker(i);
        }
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("coord")
    }

    fn start_coordinator(&mut self) {
        let data = self.data();
        let _ = std::fs::remove_file(data.join("ticket"));
        let n = self.coord.as_ref().map_or(0, |_| 1) + self.workers.len();
        let child = Command::new(coordinator_bin())
            .args(["serve", "--data-dir"])
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .env("RUST_LOG", "info")
            .stdout(log_file(self.dir.path(), &format!("coordinator-{n}.out")))
            .stderr(log_file(self.dir.path(), &format!("coordinator-{n}")))
            .spawn()
            .expect("spawning coordinator serve");
        self.coord = Some(Proc { child, name: "coordinator".into() });
        let t0 = Instant::now();
        loop {
            if let (Ok(t), Ok(k)) = (std::fs::read_to_string(data.join("ticket")), std::fs::read_to_string(data.join("submit-token"))) {
                if !t.trim().is_empty() && !k.trim().is_empty() {
                    self.ticket = t.trim().to_string();
                    self.token = k.trim().to_string();
                    break;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "coordinator wrote no ticket within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_worker(&mut self, i: usize) {
        let child = Command::new(worker_bin())
            .args(["join", &self.ticket, "--slots", "1", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(self.dir.path().join(format!("worker-{i}")))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file(self.dir.path(), &format!("worker-{i}-{}", self.workers.len())))
            .spawn()
            .expect("spawning worker join");
        self.workers.push(Proc { child, name: format!("worker-{i}") });
    }

    fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(coordinator_bin());
        cmd.arg(args[0]).args(["--to", &self.ticket, "--token", &self.token]).args(&args[1..]);
        cmd.env("RUST_LOG", "warn");
        let out = cmd.output().expect("running the coordinator CLI");
        out
    }

    fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            let s = self.status();
            if f(&s) {
                return s;
            }
            if t0.elapsed() > timeout {
                self.dump_logs();
                panic!("timed out waiting for {what}; last status: {s}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn dump_logs(&self) {
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) == Some("log") {
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
    fn primes_job(&self, count: u32, block: u64, deadline_secs: u64) -> PathBuf {
        let jd = self.dir.path().join("job");
        std::fs::create_dir_all(&jd).unwrap();
        std::fs::copy(PRIMES_WASM, jd.join("primes.wasm")).unwrap();
        let toml = format!(
            "name = \"primes\"\nmodule = \"primes.wasm\"\nquorum = 2\nmax_replicas = 6\nfuel = 20_000_000_000\nmemory_mb = 32\nmax_output = 64\ndeadline_secs = {deadline_secs}\n[tasks]\ncount = {count}\nargs = [\"block\", \"{{i}}\", \"{block}\"]\n"
        );
        let path = jd.join("job.toml");
        std::fs::write(&path, toml).unwrap();
        path
    }

    fn submit(&self, job: &Path) -> u64 {
        let out = self.cli(&["submit", job.to_str().unwrap(), "--json"]);
        assert!(out.status.success(), "submit failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("submit --json prints JSON");
        v["id"].as_u64().expect("job id")
    }

    /// Download results; returns (sum of outputs as numbers, results.json).
    fn results(&self, job: u64) -> (u64, Value) {
        let out_dir = self.dir.path().join(format!("results-{job}"));
        let out = self.cli(&["results", &job.to_string(), "--out", out_dir.to_str().unwrap()]);
        assert!(out.status.success(), "results failed: {}", String::from_utf8_lossy(&out.stderr));
        let json: Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("results.json")).unwrap()).unwrap();
        let mut sum = 0;
        for t in json["tasks"].as_array().unwrap() {
            let idx = t["index"].as_u64().unwrap();
            let text = std::fs::read_to_string(out_dir.join(format!("{idx}.out"))).expect("an .out per accepted task");
            sum += text.trim().parse::<u64>().expect("primes output is a number");
        }
        (sum, json)
    }
}

fn job_of(status: &Value, id: u64) -> Value {
    status["jobs"].as_array().unwrap().iter().find(|j| j["id"].as_u64() == Some(id)).cloned().expect("job listed")
}

/// Every task accepted by at least two distinct workers; returns Σ agreeing replicas.
fn check_quorum(results: &Value, tasks: usize) -> u64 {
    let list = results["tasks"].as_array().unwrap();
    assert_eq!(list.len(), tasks);
    let mut agreeing = 0;
    for t in list {
        assert_eq!(t["status"], "accepted", "task {t}");
        let w: Vec<&str> = t["agreeing_workers"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
        let mut d = w.clone();
        d.sort();
        d.dedup();
        assert!(d.len() >= 2 && d.len() == w.len(), "task {} needs 2 distinct agreeing workers, got {w:?}", t["index"]);
        agreeing += w.len() as u64;
    }
    agreeing
}

#[test]
fn scientist_runs_primes_to_1e7_on_three_worker_processes_and_gets_664579() {
    let c = Cluster::start(3);
    let job = c.primes_job(10, 1_000_000, 60);
    let out = c.cli(&["submit", job.to_str().unwrap(), "--wait", "--json"]);
    if !out.status.success() {
        c.dump_logs();
    }
    assert!(out.status.success(), "submit --wait failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["state"], "done");
    assert_eq!(last["tasks_done"], 10);
    let id = last["id"].as_u64().unwrap();

    let (sum, results) = c.results(id);
    assert_eq!(sum, 664_579);
    let agreeing = check_quorum(&results, 10);

    let status = c.status();
    let j = job_of(&status, id);
    assert_eq!(j["tasks_total"], 10);
    assert_eq!(j["tasks_done"], 10);
    assert_eq!(j["tasks_failed"], 0);
    let workers = status["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 3, "{status}");
    let valid: u64 = workers.iter().map(|w| w["valid"].as_u64().unwrap()).sum();
    assert_eq!(valid, agreeing, "valid replicas counted once each");
    let credit: f64 = workers.iter().map(|w| w["credit"].as_f64().unwrap()).sum();
    let expected: f64 = results["tasks"].as_array().unwrap().iter()
        .map(|t| t["fuel_used"].as_f64().unwrap() * t["agreeing_workers"].as_array().unwrap().len() as f64 / 1e9)
        .sum();
    assert!((credit - expected).abs() < 1e-6, "credit {credit} != valid fuel {expected}");

    // Helpful errors: a wrong token and an unknown job.
    let mut bad = Command::new(coordinator_bin());
    bad.args(["status", "--to", &c.ticket, "--token", "wrong"]);
    let out = bad.output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = c.cli(&["results", "999", "--out", c.dir.path().join("nope").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("999"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn job_completes_when_a_worker_is_killed_with_sigkill_mid_job() {
    let mut c = Cluster::start(3);
    let job = c.primes_job(20, 5_000_000, 10);
    let id = c.submit(&job);
    let s = c.wait_until("the first accepted result", Duration::from_secs(120), |s| job_of(s, id)["tasks_done"].as_u64().unwrap() >= 1);
    assert_eq!(job_of(&s, id)["state"], "running", "the kill must land mid-job");
    let victim = &mut c.workers[0];
    eprintln!("killing {}", victim.name);
    victim.kill9();
    let s = c.wait_until("the job to end", Duration::from_secs(240), |s| job_of(s, id)["state"] != "running");
    assert_eq!(job_of(&s, id)["state"], "done", "{s}");
    let (sum, results) = c.results(id);
    assert_eq!(sum, 5_761_455, "primes below 10^8");
    check_quorum(&results, 20);
}

#[test]
fn job_completes_without_losing_or_double_crediting_results_across_coordinator_kill9_and_restart() {
    let mut c = Cluster::start(3);
    let job = c.primes_job(20, 5_000_000, 30);
    let id = c.submit(&job);
    let before = c.wait_until("some accepted results", Duration::from_secs(120), |s| job_of(s, id)["tasks_done"].as_u64().unwrap() >= 2);
    let done_before = job_of(&before, id)["tasks_done"].as_u64().unwrap();
    assert_eq!(job_of(&before, id)["state"], "running", "the kill must land mid-job");
    c.coord.as_mut().unwrap().kill9();
    std::thread::sleep(Duration::from_millis(500));
    c.start_coordinator();
    // Nothing accepted before the crash is lost.
    let after = c.status();
    assert!(job_of(&after, id)["tasks_done"].as_u64().unwrap() >= done_before, "accepted results lost: {before} vs {after}");
    let s = c.wait_until("the job to end after the restart", Duration::from_secs(240), |s| job_of(s, id)["state"] != "running");
    assert_eq!(job_of(&s, id)["state"], "done", "{s}");
    let (sum, results) = c.results(id);
    assert_eq!(sum, 5_761_455, "primes below 10^8");
    let agreeing = check_quorum(&results, 20);
    let workers = s["workers"].as_array().unwrap();
    let valid: u64 = workers.iter().map(|w| w["valid"].as_u64().unwrap()).sum();
    assert_eq!(valid, agreeing, "each agreeing replica credited exactly once");
    let credit: f64 = workers.iter().map(|w| w["credit"].as_f64().unwrap()).sum();
    let expected: f64 = results["tasks"].as_array().unwrap().iter()
        .map(|t| t["fuel_used"].as_f64().unwrap() * t["agreeing_workers"].as_array().unwrap().len() as f64 / 1e9)
        .sum();
    assert!((credit - expected).abs() < 1e-6, "credit {credit} != valid fuel {expected}: something was credited twice or lost");
}

#[test]
fn worker_killed_with_sigkill_reports_results_it_finished_while_the_coordinator_was_down() {
    let mut c = Cluster::start(2);
    let job = c.primes_job(4, 250_000_000, 120);
    let id = c.submit(&job);
    let s = c.wait_until("the first report", Duration::from_secs(120), |s| job_of(s, id)["replicas_reported"].as_u64().unwrap() >= 1);
    assert_eq!(job_of(&s, id)["state"], "running");
    // The coordinator dies; worker 0 finishes what it has in hand into its outbox.
    c.coord.as_mut().unwrap().kill9();
    let w0 = c.dir.path().join("worker-0");
    let outbox = w0.join("outbox");
    let t0 = Instant::now();
    let saved: Vec<tasks::wire::Report> = loop {
        let reports: Vec<_> = std::fs::read_dir(&outbox)
            .map(|d| d.flatten().filter(|e| e.path().extension().and_then(|x| x.to_str()) == Some("report")).collect())
            .unwrap_or_default();
        if !reports.is_empty() {
            std::thread::sleep(Duration::from_millis(300));
            break std::fs::read_dir(&outbox).unwrap().flatten()
                .filter(|e| e.path().extension().and_then(|x| x.to_str()) == Some("report"))
                .map(|e| tasks::wire::decode(&std::fs::read(e.path()).unwrap()).expect("saved reports decode"))
                .collect();
        }
        if t0.elapsed() > Duration::from_secs(60) {
            c.dump_logs();
            panic!("worker 0 saved no result while the coordinator was down");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // ... and is killed before it could send them.
    c.workers[0].kill9();
    c.start_coordinator();
    c.start_worker(0);
    let s = c.wait_until("the job to end", Duration::from_secs(240), |s| job_of(s, id)["state"] != "running");
    assert_eq!(job_of(&s, id)["state"], "done", "{s}");
    let (sum, results) = c.results(id);
    assert_eq!(sum, 50_847_534, "primes below 10^9");
    check_quorum(&results, 4);
    // Everything saved was delivered and acknowledged: the outbox drains.
    let t0 = Instant::now();
    while std::fs::read_dir(&outbox).unwrap().flatten().any(|e| e.path().extension().and_then(|x| x.to_str()) == Some("report")) {
        assert!(t0.elapsed() < Duration::from_secs(30), "saved reports were never acknowledged");
        std::thread::sleep(Duration::from_millis(100));
    }
    // And the saved results count: worker 0 agrees on the tasks it finished offline.
    let me = tasks::NodeKey::load_or_create(&w0).unwrap().node_id().to_string();
    let credited = results["tasks"].as_array().unwrap().iter()
        .filter(|t| t["agreeing_workers"].as_array().unwrap().iter().any(|w| w.as_str() == Some(me.as_str())))
        .count();
    assert!(credited >= 1, "none of worker 0's {} saved results was accepted", saved.len());
}
