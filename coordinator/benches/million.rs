//! A million-task job end to end (not a test): `cargo bench -p coordinator --bench million`.
//!
//! Real `coordinator serve` and `worker join` processes, each on its own host of a
//! [`netsim`] lab (network namespaces, a router between the public documentation /24s), as
//! in `tests/multihost.rs`; the scientist's `coordinator submit` and `coordinator results`
//! on a host of their own. One job of `N` tiny tasks (`examples/tiny/tiny.wat`: echo
//! `argv[1]`, here the task's index) at quorum 2 (`serve --policy trusting`: a scientist's
//! own machines), in three phases:
//!
//! - **submit**: `coordinator submit JOB --json` (the manifest, some 9 MB for a million
//!   tasks, goes up as a blob) until it prints the job id;
//! - **run**: until `status --json` says the job is done (polled every 2 s);
//! - **download**: `coordinator results JOB --out DIR` (pages of 4096 tasks, one `.out` file
//!   per task, results.json streamed), then every task of results.json checked accepted
//!   with its output the task's index.
//!
//! For each phase: wall time, and the coordinator's peak resident memory during it
//! (`VmRSS` of `/proc/PID/status`, sampled every 100 ms) — the target is ≤ 1 GiB for
//! 1,000,000 tasks. `status --json` is also timed at the end (what a scientist's poll costs
//! on a job of that size). Prints a table and `BENCH|what|result|baseline|ratio|target|met`
//! lines. Needs root (network namespaces): otherwise one `million: skipped: <reason>` line.
//! Env: `PEERGRID_BENCH_SMOKE=1` (2,000 tasks), `PEERGRID_BENCH_MILLION_TASKS=N`,
//! `PEERGRID_BENCH_WORKERS=W` (worker hosts, default 2), `PEERGRID_BENCH_KEEP_LOGS=DIR`.

#[path = "../tests/common/netgrid.rs"]
mod netgrid;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netsim::{Host, Lab, Proc};
use serde_json::Value;

const START_GUARD: Duration = Duration::from_secs(120);
/// Hang guards, not speed claims.
const SUBMIT_GUARD: Duration = Duration::from_secs(1800);
const RUN_GUARD: Duration = Duration::from_secs(4 * 3600);
const RSS_TARGET: u64 = 1 << 30;

fn coordinator_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_coordinator"))
}

/// `VmRSS` of `pid` in bytes.
fn rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Samples a process's RSS every 100 ms; [`Sampler::take`] returns the peak since the last
/// call (a phase's peak).
struct Sampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let peak = Arc::new(AtomicU64::new(rss(pid).unwrap_or(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(r) = rss(pid) {
                    p.fetch_max(r, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn take(&self, pid: u32) -> u64 {
        let now = rss(pid).unwrap_or(0);
        self.peak.swap(now, Ordering::Relaxed).max(now)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1 << 20) as f64)
}

struct Phase {
    name: &'static str,
    secs: f64,
    peak: u64,
}

fn main() {
    let smoke = std::env::var_os("PEERGRID_BENCH_SMOKE").is_some_and(|v| v != "0");
    let tasks: u64 = std::env::var("PEERGRID_BENCH_MILLION_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke { 2_000 } else { 1_000_000 });
    let workers: usize = std::env::var("PEERGRID_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .max(1);
    let mut lab = match Lab::new() {
        Ok(l) => l,
        Err(e) => {
            println!("million: skipped: {}", format!("{e:#}").replace('\n', " "));
            return;
        }
    };
    let dir = match tempfile::Builder::new().prefix("million-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("million: failed: {e}");
            std::process::exit(1);
        }
    };
    let result = bench(&mut lab, dir.path(), tasks, workers);
    let keep = std::env::var_os("PEERGRID_BENCH_KEEP_LOGS").map(PathBuf::from);
    if let Some(k) = keep.or_else(|| {
        result
            .is_err()
            .then(|| std::env::temp_dir().join("million-failed"))
    }) {
        netgrid::keep_logs(dir.path(), &k);
        eprintln!("million: logs kept in {}", k.display());
    }
    if let Err(e) = result {
        eprintln!("million: failed: {e:#}");
        std::process::exit(1);
    }
}

fn cli(bin: &Path, sci: &Host, ticket: &str, token: &str, cmd: &str) -> std::process::Command {
    netgrid::cli(bin, sci, ticket, token, cmd)
}

fn status(bin: &Path, sci: &Host, ticket: &str, token: &str) -> Result<Value> {
    let mut c = cli(bin, sci, ticket, token, "status");
    c.arg("--json");
    let out = netsim::run_with_timeout(&mut c, Duration::from_secs(120))?;
    if !out.status.success() {
        bail!("status: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn bench(lab: &mut Lab, dir: &Path, tasks: u64, n_workers: usize) -> Result<()> {
    let bin = coordinator_bin();
    let worker_bin = netsim::workspace_bin(&bin, "worker", |l| eprintln!("million: {l}"))?;
    let coord_host = lab.public_host("coord", 0)?;
    let sci = lab.public_host("sci", 2)?;
    let hosts: Vec<Host> = (0..n_workers)
        .map(|i| lab.public_host(&format!("w{i}"), 1 + i % 2))
        .collect::<Result<_>>()?;

    let (coord, ticket, token) = netgrid::start_coordinator(
        &bin,
        &coord_host,
        dir,
        "info",
        &["--policy", "trusting"],
        START_GUARD,
    )?;
    let pid = coord.id();
    let mut workers: Vec<Proc> = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let log = File::create(dir.join(format!("worker-{i}.log")))?;
        let wdir = dir.join(format!("worker-{i}"));
        workers.push(netgrid::spawn_worker(
            &worker_bin,
            h,
            &ticket,
            &wdir,
            "info",
            log,
            &format!("worker-{i}"),
        )?);
    }
    let t = Instant::now();
    loop {
        let on = status(&bin, &sci, &ticket, &token)
            .ok()
            .and_then(|s| s["workers"].as_array().cloned())
            .map(|w| w.iter().filter(|w| w["connected"] == true).count())
            .unwrap_or(0);
        if on >= n_workers {
            break;
        }
        if t.elapsed() > START_GUARD {
            bail!("only {on} of {n_workers} workers connected within {START_GUARD:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let jd = dir.join("job");
    std::fs::create_dir_all(&jd)?;
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny/tiny.wat");
    std::fs::write(jd.join("tiny.wasm"), wat::parse_file(&tiny)?)?;
    std::fs::write(
        jd.join("job.toml"),
        format!(
            "name = \"million\"\nmodule = \"tiny.wasm\"\nquorum = 2\nmax_replicas = 4\nfuel = 1_000_000\nmemory_mb = 1\nmax_output = 16\ndeadline_secs = 3600\n[tasks]\ncount = {tasks}\nargs = [\"{{i}}\"]\n"
        ),
    )?;
    let idle = rss(pid).unwrap_or(0);
    let sampler = Sampler::start(pid);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "million: {tasks} tiny tasks at quorum 2 on {n_workers} worker hosts (default slots), {cores} cores; coordinator idle RSS {}",
        mib(idle)
    );
    let mut phases = Vec::new();

    // 1. submit
    let t = Instant::now();
    let mut c = cli(&bin, &sci, &ticket, &token, "submit");
    c.arg(jd.join("job.toml")).arg("--json");
    let out = netsim::run_with_timeout(&mut c, SUBMIT_GUARD)?;
    if !out.status.success() {
        bail!("submit: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("submit --json")?;
    let job = v["id"].as_u64().context("job id")?;
    anyhow::ensure!(v["tasks"] == tasks, "submitted {v}");
    phases.push(Phase {
        name: "submit",
        secs: t.elapsed().as_secs_f64(),
        peak: sampler.take(pid),
    });
    println!("million: submitted job {job} in {:.1} s", phases[0].secs);

    // 2. run
    let t = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let s = status(&bin, &sci, &ticket, &token)?;
        let j = s["jobs"]
            .as_array()
            .and_then(|l| l.iter().find(|j| j["id"] == job))
            .cloned()
            .context("job in status")?;
        if j["state"] != "running" {
            anyhow::ensure!(j["state"] == "done", "job ended {j}");
            break;
        }
        if last_print.elapsed() > Duration::from_secs(30) {
            last_print = Instant::now();
            println!(
                "million: {:.0} s: {} of {tasks} accepted, coordinator RSS {}",
                t.elapsed().as_secs_f64(),
                j["tasks_done"],
                mib(rss(pid).unwrap_or(0))
            );
        }
        if t.elapsed() > RUN_GUARD {
            bail!("job not done within {RUN_GUARD:?}: {j}");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    phases.push(Phase {
        name: "run",
        secs: t.elapsed().as_secs_f64(),
        peak: sampler.take(pid),
    });

    // 3. download
    let out_dir = dir.join("results");
    let t = Instant::now();
    let mut c = cli(&bin, &sci, &ticket, &token, "results");
    c.arg(job.to_string()).arg("--out").arg(&out_dir);
    let out = netsim::run_with_timeout(&mut c, SUBMIT_GUARD)?;
    if !out.status.success() {
        bail!("results: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    phases.push(Phase {
        name: "download",
        secs: t.elapsed().as_secs_f64(),
        peak: sampler.take(pid),
    });
    let t = Instant::now();
    let s = status(&bin, &sci, &ticket, &token)?;
    let status_secs = t.elapsed().as_secs_f64();
    let total_workers = s["workers"].as_array().map_or(0, Vec::len);

    // Check every result.
    let json: Value = serde_json::from_reader(std::io::BufReader::new(File::open(
        out_dir.join("results.json"),
    )?))?;
    let list = json["tasks"].as_array().context("results.json tasks")?;
    anyhow::ensure!(list.len() as u64 == tasks, "{} results", list.len());
    for (i, t) in list.iter().enumerate() {
        anyhow::ensure!(t["status"] == "accepted", "task {i}: {t}");
        let out = std::fs::read_to_string(out_dir.join(format!("{i}.out")))?;
        anyhow::ensure!(out == i.to_string(), "task {i} output {out:?}");
    }
    drop(sampler);
    drop(workers);
    drop(coord);

    println!("\n| phase | wall time | coordinator peak RSS |");
    println!("|---|---|---|");
    for p in &phases {
        println!("| {} | {:.1} s | {} |", p.name, p.secs, mib(p.peak));
    }
    let peak = phases.iter().map(|p| p.peak).max().unwrap_or(0);
    let run = &phases[1];
    println!(
        "\n{tasks} tasks: {:.0} tasks/s while running ({:.0} replicas/s at quorum 2); `status --json` on the done job took {status_secs:.2} s ({total_workers} workers listed); every result checked",
        tasks as f64 / run.secs,
        2.0 * tasks as f64 / run.secs
    );
    for p in &phases {
        println!(
            "BENCH|million-task job, {} phase ({tasks} tasks, quorum 2, {n_workers} worker hosts): coordinator peak RSS|{}|-|-|<= 1024 MiB|{}",
            p.name,
            mib(p.peak),
            if p.peak <= RSS_TARGET { "yes" } else { "no" }
        );
    }
    println!(
        "BENCH|million-task job end to end ({tasks} tasks): submit + run + download|{:.0} s|-|-|-|-",
        phases.iter().map(|p| p.secs).sum::<f64>()
    );
    anyhow::ensure!(peak > 0, "no RSS sample");
    Ok(())
}
