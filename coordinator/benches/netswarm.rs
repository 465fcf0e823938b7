//! The blob swarm on simulated networks (not a test): `cargo bench --workspace --bench netswarm`.
//!
//! Real `coordinator serve` and `worker join` processes, each on its own host of a
//! [`netsim`] lab (network namespaces; a router between the public documentation /24s;
//! NAT sites with private LANs), as in `tests/multihost.rs`. One job over an ~8 MiB module
//! (the primes example with 8 MiB of random bytes in a custom section), on two topologies:
//!
//! - **public**: 16 public workers spread over the three /24s (target: the coordinator
//!   uploads ≤ 1.2 copies of the module);
//! - **nat**: 8 public workers, 4 behind a port-preserving NAT (`MASQUERADE`) and 4 behind a
//!   port-randomizing one (`MASQUERADE --random-fully`) (target ≤ 1.5 copies). The NAT boxes
//!   drop unsolicited packets to themselves, as home routers do (netsim's default).
//!
//! Each is run with the swarm and with `serve --central-only` (the coordinator lists only
//! itself as a blob source: every worker fetches everything from it), interleaved in one
//! process (swarm, central, swarm, central, ...), `PEERGRID_BENCH_RUNS` times each (default
//! 3); the medians are reported. A fresh coordinator and fresh worker data dirs for every
//! run; the lab (hosts, NAT boxes) is built once.
//!
//! - **copies**: `coordinator_bytes_sent` (status --json) uploaded during the job, over the
//!   module's size (the wire column: what the coordinator's interface sent, protocol and
//!   control traffic included);
//! - **distribution time**: from the start of `coordinator submit` (which includes uploading
//!   the job to the coordinator) until every worker's data dir holds the module
//!   (`blobs/<blake3 hex>`, polled every 20 ms). The job has 4 tasks per worker so every
//!   worker gets a replica; a run in which some worker never fetched the module reports
//!   `-` and says how many did;
//! - **job time**: until `submit --wait` reports the job done.
//!
//! Prints a line per run, a markdown table of the medians and
//! `BENCH|what|result|baseline|ratio|target|met` lines for `bench.sh`. Needs root (network
//! namespaces, iptables): otherwise prints one `netswarm: skipped: <reason>` line and exits 0.
//! Env: `PEERGRID_BENCH_SMOKE=1` (6 public workers / 3+2+2, 1 run), `PEERGRID_BENCH_RUNS`,
//! `PEERGRID_BENCH_KEEP_LOGS=DIR` (keep every run's logs), `PEERGRID_BENCH_ONLY=public|nat`
//! (one topology), `PEERGRID_BENCH_RUST_LOG` (the processes' `RUST_LOG`, default `info`).
//!
//! The processes are started as in `tests/multihost.rs`, by the same code: `netgrid` (shared
//! with it) and netsim.

/// Peergrid's processes on netsim hosts (the bench includes this one file of the tests'
/// `common`, nothing else).
#[path = "../tests/common/netgrid.rs"]
mod netgrid;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use netsim::{Host, Lab, Nat, Proc};
use serde_json::Value;

const CLI_GUARD: Duration = Duration::from_secs(90);
const START_GUARD: Duration = Duration::from_secs(120);
const RUN_GUARD: Duration = Duration::from_secs(300);
const PUBLIC_TARGET: f64 = 1.2;
const NAT_TARGET: f64 = 1.5;

fn coordinator_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_coordinator"))
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    Swarm,
    Central,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Swarm => "swarm",
            Mode::Central => "central only",
        }
    }
}

struct Topology {
    key: &'static str,
    label: String,
    workers: Vec<Host>,
    target: f64,
}

/// What one run measured.
#[derive(Clone, Debug)]
struct Run {
    copies: f64,
    wire: f64,
    /// Seconds until every worker held the module, if every one did.
    dist: Option<f64>,
    holders: usize,
    job: f64,
}

struct Bench {
    coord_host: Host,
    sci: Host,
    worker: PathBuf,
    module: PathBuf,
    module_size: usize,
    module_hex: String,
    tasks_per_worker: u32,
    keep_logs: Option<PathBuf>,
}

fn cli(b: &Bench, ticket: &str, token: &str, cmd: &str, args: &[&str]) -> Result<Value> {
    let mut c = netgrid::cli(&coordinator_bin(), &b.sci, ticket, token, cmd);
    c.args(args);
    let out = netsim::run_with_timeout(&mut c, CLI_GUARD)?;
    if !out.status.success() {
        bail!(
            "coordinator {cmd}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn status(b: &Bench, ticket: &str, token: &str) -> Result<Value> {
    cli(b, ticket, token, "status", &["--json"])
}

/// One job on `hosts`, with a fresh coordinator (`--central-only` for [`Mode::Central`]).
fn run_once(b: &Bench, hosts: &[Host], mode: Mode, tag: &str) -> Result<Run> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("netswarm-{tag}-"))
        .tempdir()?;
    let result = run_in(b, hosts, mode, dir.path());
    let keep = match (&b.keep_logs, &result) {
        (Some(k), _) => Some(k.join(tag)),
        (None, Err(_)) => {
            let k = std::env::temp_dir().join(format!("netswarm-failed-{tag}"));
            eprintln!("netswarm: {tag} failed; logs kept in {}", k.display());
            Some(k)
        }
        _ => None,
    };
    if let Some(keep) = keep {
        netgrid::keep_logs(dir.path(), &keep);
    }
    result
}

fn run_in(b: &Bench, hosts: &[Host], mode: Mode, dir: &Path) -> Result<Run> {
    let log = |name: &str| File::create(dir.join(name));
    // On an early return the processes are killed as their `Proc`s drop (workers first).
    // The policy of the recorded figures (the swarm's copies do not depend on it).
    let extra: &[&str] = match mode {
        Mode::Central => &["--central-only", "--policy", "trusting"],
        Mode::Swarm => &["--policy", "trusting"],
    };
    let rust_log = std::env::var("PEERGRID_BENCH_RUST_LOG").unwrap_or_else(|_| "info".into());
    let (mut coord, ticket, token) = netgrid::start_coordinator(
        &coordinator_bin(),
        &b.coord_host,
        dir,
        &rust_log,
        extra,
        START_GUARD,
    )?;

    let mut workers: Vec<(Proc, PathBuf)> = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let wdir = dir.join(format!("worker-{i}"));
        let log = log(&format!("worker-{i}-{}.log", h.name))?;
        let name = format!("worker-{i}");
        let p = netgrid::spawn_worker(&b.worker, h, &ticket, &wdir, &rust_log, log, &name)?;
        workers.push((p, wdir));
    }
    let t1 = Instant::now();
    loop {
        let s = status(b, &ticket, &token).ok();
        let on = s
            .as_ref()
            .and_then(|s| s["workers"].as_array())
            .map(|w| w.iter().filter(|w| w["connected"] == true).count())
            .unwrap_or(0);
        if on >= hosts.len() {
            break;
        }
        if t1.elapsed() > START_GUARD {
            bail!(
                "only {on} of {} workers connected within {START_GUARD:?}",
                hosts.len()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let jd = dir.join("job");
    std::fs::create_dir_all(&jd)?;
    std::fs::copy(&b.module, jd.join("primes.wasm"))?;
    let count = b.tasks_per_worker * hosts.len() as u32;
    std::fs::write(
        jd.join("job.toml"),
        format!(
            "name = \"netswarm\"\nmodule = \"primes.wasm\"\nquorum = 2\nmax_replicas = 6\nfuel = 200_000_000\nmemory_mb = 32\nmax_output = 64\ndeadline_secs = 600\n[tasks]\ncount = {count}\nargs = [\"block\", \"{{i}}\", \"20000\"]\n"
        ),
    )?;
    let before = status(b, &ticket, &token)?["coordinator_bytes_sent"]
        .as_u64()
        .ok_or_else(|| anyhow!("status has no coordinator_bytes_sent"))?;
    let wire0 = b.coord_host.tx_bytes()?;

    let (out, err) = (dir.join("submit.out.log"), dir.join("submit.log"));
    let bin = coordinator_bin();
    let job_file = jd.join("job.toml");
    let t0 = Instant::now();
    let mut sub = netgrid::spawn_submit(&bin, &b.sci, &ticket, &token, &job_file, &out, &err)?;
    let mut held: Vec<Option<f64>> = vec![None; workers.len()];
    let code = loop {
        let now = t0.elapsed().as_secs_f64();
        for (i, (_, wdir)) in workers.iter().enumerate() {
            if held[i].is_none() && wdir.join("blobs").join(&b.module_hex).exists() {
                held[i] = Some(now);
            }
        }
        if let Some(code) = sub.exited() {
            break code;
        }
        if t0.elapsed() > RUN_GUARD {
            let st = status(b, &ticket, &token).unwrap_or(Value::Null);
            bail!("job not done within {RUN_GUARD:?}; status: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let job = t0.elapsed().as_secs_f64();
    // A last look: a worker may have finished its download during the last poll.
    for (i, (_, wdir)) in workers.iter().enumerate() {
        if held[i].is_none() && wdir.join("blobs").join(&b.module_hex).exists() {
            held[i] = Some(job);
        }
    }
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let v = netgrid::last_json(&text).unwrap_or(Value::Null);
    if !code.success() || v["state"] != "done" {
        bail!(
            "the job did not complete ({code}): {v} {}",
            std::fs::read_to_string(&err).unwrap_or_default().trim()
        );
    }
    let after = status(b, &ticket, &token)?["coordinator_bytes_sent"]
        .as_u64()
        .unwrap_or(0);
    let wire = b.coord_host.tx_bytes()?.saturating_sub(wire0);
    let holders = held.iter().filter(|h| h.is_some()).count();
    let dist = if holders == held.len() {
        held.iter().flatten().copied().reduce(f64::max)
    } else {
        None
    };
    drop(workers);
    coord.kill();
    let size = b.module_size as f64;
    Ok(Run {
        copies: after.saturating_sub(before) as f64 / size,
        wire: wire as f64 / size,
        dist,
        holders,
        job,
    })
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[(v.len() - 1) / 2])
}

fn ratio_str(a: f64, b: f64) -> String {
    if b <= 0.0 {
        return "-".into();
    }
    let r = a / b;
    if r >= 0.1 {
        format!("{r:.2}x")
    } else {
        format!("{r:.2e}x")
    }
}

fn build_lab(lab: &mut Lab, smoke: bool) -> Result<(Host, Host, Vec<Topology>)> {
    let coord = lab.public_host("coord", 0)?;
    let sci = lab.public_host("sci", 2)?;
    let (n_pub, n_nat) = if smoke { (6, 2) } else { (16, 4) };
    let public: Vec<Host> = (0..n_pub)
        .map(|i| lab.public_host(&format!("p{i}"), i % 3))
        .collect::<Result<_>>()?;
    let easy = lab.nat_site("easy", 1, Nat::PortPreserving, [192, 168, 1], n_nat)?;
    let hard = lab.nat_site("hard", 2, Nat::RandomPorts, [10, 0, 7], n_nat)?;
    let half = n_pub / 2;
    let mut mixed: Vec<Host> = public[..half].to_vec();
    mixed.extend(easy.hosts.iter().cloned());
    mixed.extend(hard.hosts.iter().cloned());
    let topologies = vec![
        Topology {
            key: "public",
            label: format!("{n_pub} public workers (3 /24s)"),
            workers: public,
            target: PUBLIC_TARGET,
        },
        Topology {
            key: "nat",
            label: format!(
                "{half} public + {n_nat} port-preserving NAT + {n_nat} port-randomizing NAT"
            ),
            workers: mixed,
            target: NAT_TARGET,
        },
    ];
    Ok((coord, sci, topologies))
}

fn main() {
    let smoke = std::env::var_os("PEERGRID_BENCH_SMOKE").is_some_and(|v| v != "0");
    let runs: usize = std::env::var("PEERGRID_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke { 1 } else { 3 })
        .max(1);
    let mut lab = match Lab::new() {
        Ok(l) => l,
        Err(e) => {
            let reason = format!("{e:#}").replace('\n', " ");
            println!("netswarm: skipped: {reason}");
            return;
        }
    };
    if let Err(e) = bench(&mut lab, smoke, runs) {
        eprintln!("netswarm: failed: {e:#}");
        std::process::exit(1);
    }
}

fn bench(lab: &mut Lab, smoke: bool, runs: usize) -> Result<()> {
    let worker =
        netsim::workspace_bin(&coordinator_bin(), "worker", |l| eprintln!("netswarm: {l}"))?;
    let (coord_host, sci, mut topologies) = build_lab(lab, smoke)?;
    if let Ok(only) = std::env::var("PEERGRID_BENCH_ONLY") {
        topologies.retain(|t| t.key == only);
        if topologies.is_empty() {
            bail!("PEERGRID_BENCH_ONLY={only}: no such topology (public, nat)");
        }
    }
    let files = tempfile::Builder::new()
        .prefix("netswarm-module-")
        .tempdir()?;
    let wasm = netgrid::padded_primes()?;
    let module = files.path().join("primes.wasm");
    std::fs::write(&module, &wasm)?;
    let b = Bench {
        coord_host,
        sci,
        worker,
        module,
        module_size: wasm.len(),
        module_hex: tasks::BlobId::of(&wasm).to_string(),
        tasks_per_worker: 4,
        keep_logs: std::env::var_os("PEERGRID_BENCH_KEEP_LOGS").map(PathBuf::from),
    };
    if !b.module_hex.chars().all(|c| c.is_ascii_hexdigit()) || b.module_hex.len() != 64 {
        bail!("unexpected blob id form {}", b.module_hex);
    }
    println!(
        "netswarm: {:.1} MiB module, {runs} run(s) of each (topology, mode), interleaved, {} cores",
        b.module_size as f64 / (1 << 20) as f64,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let mut got: BTreeMap<(&str, Mode), Vec<Run>> = BTreeMap::new();
    let mut failed = Vec::new();
    for r in 0..runs {
        for t in &topologies {
            // Alternate which mode goes first, so neither always runs on a warmer machine.
            let modes = if r % 2 == 0 {
                [Mode::Swarm, Mode::Central]
            } else {
                [Mode::Central, Mode::Swarm]
            };
            for mode in modes {
                let tag = format!(
                    "{}-{}-{}",
                    t.key,
                    if mode == Mode::Swarm {
                        "swarm"
                    } else {
                        "central"
                    },
                    r + 1
                );
                match run_once(&b, &t.workers, mode, &tag) {
                    Ok(run) => {
                        println!(
                            "netswarm: run {}/{runs} {} {}: {:.2} copies ({:.2} on the wire), distribution {}, job {:.2} s",
                            r + 1,
                            t.key,
                            mode.name(),
                            run.copies,
                            run.wire,
                            match run.dist {
                                Some(d) => format!("{d:.2} s"),
                                None => format!(
                                    "- (only {}/{} workers fetched the module)",
                                    run.holders,
                                    t.workers.len()
                                ),
                            },
                            run.job
                        );
                        got.entry((t.key, mode)).or_default().push(run);
                    }
                    Err(e) => {
                        println!(
                            "netswarm: run {}/{runs} {} {}: FAILED: {}",
                            r + 1,
                            t.key,
                            mode.name(),
                            format!("{e:#}").replace('\n', " ")
                        );
                        failed.push(tag);
                    }
                }
                let _ = std::io::stdout().flush();
            }
        }
    }

    let med = |k: &str, m: Mode, f: &dyn Fn(&Run) -> Option<f64>| -> Option<f64> {
        median(got.get(&(k, m))?.iter().filter_map(f).collect())
    };
    let n_of = |k: &str, m: Mode| got.get(&(k, m)).map_or(0, |v| v.len());
    let fmt = |v: Option<f64>, unit: &str| match v {
        Some(x) => format!("{x:.2}{unit}"),
        None => "-".into(),
    };
    println!();
    println!("| topology | mode | coordinator upload (copies of the module) | on the wire | distribution time (every worker holds the module) | job time | runs |");
    println!("|---|---|---|---|---|---|---|");
    for t in &topologies {
        for m in [Mode::Swarm, Mode::Central] {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                t.label,
                m.name(),
                fmt(med(t.key, m, &|r| Some(r.copies)), ""),
                fmt(med(t.key, m, &|r| Some(r.wire)), ""),
                fmt(med(t.key, m, &|r| r.dist), " s"),
                fmt(med(t.key, m, &|r| Some(r.job)), " s"),
                n_of(t.key, m)
            );
        }
    }
    println!();
    for t in &topologies {
        let sc = med(t.key, Mode::Swarm, &|r| Some(r.copies));
        let cc = med(t.key, Mode::Central, &|r| Some(r.copies));
        if let Some(sc) = sc {
            let base = cc.map_or("-".into(), |c| format!("{c:.2}x module (central only)"));
            let ratio = cc.map_or("-".into(), |c| ratio_str(sc, c));
            let met = if sc <= t.target { "yes" } else { "no" };
            println!(
                "BENCH|coordinator upload on a simulated network: {}, {:.0} MiB module|{sc:.2}x module|{base}|{ratio}|<= {}x module|{met}",
                t.label,
                b.module_size as f64 / (1 << 20) as f64,
                t.target
            );
        }
        let sd = med(t.key, Mode::Swarm, &|r| r.dist);
        let cd = med(t.key, Mode::Central, &|r| r.dist);
        if let Some(sd) = sd {
            let base = cd.map_or("-".into(), |c| format!("{c:.2} s (central only)"));
            let ratio = cd.map_or("-".into(), |c| ratio_str(sd, c));
            println!(
                "BENCH|distribution time on a simulated network (submit until every worker holds the module): {}|{sd:.2} s|{base}|{ratio}|-|-",
                t.label
            );
        }
    }
    for t in &topologies {
        if let Some(sc) = med(t.key, Mode::Swarm, &|r| Some(r.copies)) {
            println!(
                "netswarm: target {}: swarm {sc:.2} copies vs <= {} -> {}",
                t.key,
                t.target,
                if sc <= t.target { "met" } else { "missed" }
            );
        }
    }
    if !failed.is_empty() {
        bail!("runs failed: {}", failed.join(", "));
    }
    Ok(())
}
