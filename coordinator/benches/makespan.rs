//! Job makespan against the ideal (not a test): `cargo test -p coordinator --bench makespan`
//! (or `cargo bench`).
//!
//! Real `coordinator serve` and `worker join --slots 1 --priority normal` processes (machines
//! dedicated to the grid; the baseline runs at that priority too), each on its own host of a
//! [`netsim`] lab (network namespaces), as in `tests/multihost.rs`; the scientist's
//! `coordinator submit --wait` on a host of its own. One job of `T` tasks of the primes
//! sample (`primes 0 N`: a segmented sieve, time linear in N) whose sizes are spread
//! log-uniformly so that one run takes from about 20 ms to about `MAX` s, at quorum 2
//! (`serve --policy trusting`, or `PEERGRID_BENCH_POLICY`), on `W` workers.
//!
//! - **makespan**: from the start of `submit --wait` until it reports the job done;
//! - **ideal**, measured in the same run: every task once in the sandbox alone
//!   (`worker exec --json`, its `wall_ms`: the run itself, compile cached), interleaved with
//!   the jobs; ideal = max(2 × Σ runs / P, longest run), P = min(W, cores) the replicas that
//!   can really run at once (the workers share this machine's cores);
//! - **ideal at the replicas run**: the same with the replicas per task the job really ran
//!   (its `replicas_reported` / tasks) instead of 2: a policy that asks more agreement of a
//!   cold pool (the open preset: quorum + 1 while no worker has a record) runs more replica
//!   work, which no scheduling can hide; this ratio is the scheduling's share alone;
//! - **ratio to the job's own replica work** (issue 18's definition: replica work / worker
//!   slots, with the work as the job ran it): from the coordinator's store, each worker's
//!   busy time (the union of its replicas' [assigned or previous report, reported]
//!   intervals), summed over the workers, over `W` slots. It does not depend on the load of
//!   the shared machine differing between the baseline's runs and the job (both sides come
//!   from the job), and it charges the scheduler for every moment a slot sat idle.
//!
//! Ratio = makespan / ideal, per run; target ≤ 1.2 (issue 18). `PEERGRID_BENCH_RUNS` jobs
//! (default 3) with a fresh coordinator each; the median of the runs' ratios. Env: `PEERGRID_BENCH_SMOKE=1` (16 tasks, 4
//! workers, 1 run), `PEERGRID_BENCH_MAKESPAN_TASKS`, `PEERGRID_BENCH_WORKERS`,
//! `PEERGRID_BENCH_POLICY` (`serve --policy`, default `trusting`; `open` is `serve`'s default;
//! a comma-separated list runs one job per policy in each run, beside the same baseline),
//! `PEERGRID_BENCH_MAKESPAN_MAX_SECS` (default 4), `PEERGRID_BENCH_KEEP=DIR` (keep each job's
//! coordinator data dir and logs in `DIR/run<R>-<policy>/`, for profiling: the store's
//! `replicas` table has every replica's worker, assignment and report times). Needs root:
//! otherwise one `makespan: skipped: <reason>` line.

#[path = "../tests/common/netgrid.rs"]
mod netgrid;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netsim::{Host, Lab};
use serde_json::Value;

const START_GUARD: Duration = Duration::from_secs(120);
const RUN_GUARD: Duration = Duration::from_secs(3600);
const TARGET: f64 = 1.2;
const PRIMES_WASM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/primes/primes.wasm"
);
/// `primes 0 N` runs about this many N per second in the sandbox here (calibration only
/// picks the sizes; the ideal is measured).
const N_PER_SEC: f64 = 8.0e8;

fn env<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) / 2]
}

fn main() {
    let smoke = std::env::var_os("PEERGRID_BENCH_SMOKE").is_some_and(|v| v != "0");
    let tasks: usize = env("PEERGRID_BENCH_MAKESPAN_TASKS", if smoke { 16 } else { 64 });
    let workers: usize = env("PEERGRID_BENCH_WORKERS", 4).max(1);
    let max_secs: f64 = env(
        "PEERGRID_BENCH_MAKESPAN_MAX_SECS",
        if smoke { 0.5 } else { 4.0 },
    );
    let runs: usize = env("PEERGRID_BENCH_RUNS", if smoke { 1 } else { 3 }).max(1);
    let policy: String = env("PEERGRID_BENCH_POLICY", "trusting".to_string());
    let mut lab = match Lab::new() {
        Ok(l) => l,
        Err(e) => {
            println!("makespan: skipped: {}", format!("{e:#}").replace('\n', " "));
            return;
        }
    };
    if let Err(e) = bench(&mut lab, tasks, workers, max_secs, runs, &policy) {
        eprintln!("makespan: failed: {e:#}");
        std::process::exit(1);
    }
}

/// The task sizes: N log-uniform from ~20 ms to `max_secs` of sandbox time, in a shuffled
/// order (a fixed permutation), so long tasks are not all at one end of the job.
fn sizes(tasks: usize, max_secs: f64) -> Vec<u64> {
    let (lo, hi) = ((0.02 * N_PER_SEC).ln(), (max_secs * N_PER_SEC).ln());
    let mut v: Vec<u64> = (0..tasks)
        .map(|i| {
            let f = if tasks > 1 {
                i as f64 / (tasks - 1) as f64
            } else {
                1.0
            };
            (lo + f * (hi - lo)).exp() as u64
        })
        .collect();
    // A fixed shuffle: index i goes to (i * 37) mod tasks when 37 is coprime to it.
    let step = (37..).find(|s| gcd(*s, tasks) == 1).unwrap_or(1);
    let mut out = vec![0; tasks];
    for (i, n) in v.drain(..).enumerate() {
        out[(i * step) % tasks] = n;
    }
    out
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Every task once in the sandbox alone: the sum and the longest of their run times.
fn alone(worker: &Path, cache: &Path, sizes: &[u64]) -> Result<(f64, f64)> {
    let (mut sum, mut longest) = (0.0, 0.0f64);
    for n in sizes {
        let out = std::process::Command::new(worker)
            .args(["exec", PRIMES_WASM, "--json", "--fuel", "1000000000000000"])
            .args(["--memory-mb", "64", "--name", "primes", "--arg", "0"])
            .arg("--arg")
            .arg(n.to_string())
            .arg("--cache-dir")
            .arg(cache)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .output()?;
        let v: Value = serde_json::from_slice(&out.stdout).context("worker exec --json")?;
        anyhow::ensure!(v["status"] == "ok", "primes 0 {n}: {v}");
        let s = v["wall_ms"].as_f64().context("wall_ms")? / 1000.0;
        sum += s;
        longest = longest.max(s);
    }
    Ok((sum, longest))
}

fn bench(
    lab: &mut Lab,
    tasks: usize,
    n_workers: usize,
    max_secs: f64,
    runs: usize,
    policy: &str,
) -> Result<()> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_coordinator"));
    let worker_bin = netsim::workspace_bin(&bin, "worker", |l| eprintln!("makespan: {l}"))?;
    let coord_host = lab.public_host("coord", 0)?;
    let sci = lab.public_host("sci", 2)?;
    let hosts: Vec<Host> = (0..n_workers)
        .map(|i| lab.public_host(&format!("w{i}"), i % 3))
        .collect::<Result<_>>()?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let parallel = n_workers.min(cores) as f64;
    let sizes = sizes(tasks, max_secs);
    let files = tempfile::Builder::new().prefix("makespan-").tempdir()?;
    let jd = files.path().join("job");
    std::fs::create_dir_all(&jd)?;
    std::fs::copy(PRIMES_WASM, jd.join("primes.wasm"))?;
    let mut toml = String::from(
        "name = \"primes\"\nmodule = \"primes.wasm\"\nquorum = 2\nmax_replicas = 4\nfuel = 1_000_000_000_000_000\nmemory_mb = 64\nmax_output = 64\ndeadline_secs = 3600\n",
    );
    for n in &sizes {
        toml.push_str(&format!("[[task]]\nargs = [\"0\", \"{n}\"]\n"));
    }
    std::fs::write(jd.join("job.toml"), toml)?;
    let cache = files.path().join("exec-cache");
    println!(
        "makespan: {tasks} primes tasks (~20 ms to ~{max_secs} s each alone), quorum 2, policy {policy}, {n_workers} workers of 1 slot on their own hosts, {cores} cores; {runs} run(s)"
    );

    // Per policy: each run's makespan, ideal, ratio and ratio at the replicas run.
    let policies: Vec<&str> = policy.split(',').map(str::trim).collect();
    let mut per: Vec<[Vec<f64>; 5]> = vec![Default::default(); policies.len()];
    for r in 0..runs {
        // The baseline first on even runs, after on odd ones; the policies' jobs in between,
        // in turn (first to last on even runs, last to first on odd ones).
        let mut ideal = None;
        if r % 2 == 0 {
            ideal = Some(alone(&worker_bin, &cache, &sizes)?);
        }
        let mut order: Vec<usize> = (0..policies.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        let mut jobs = vec![(0.0, 0, 0.0); policies.len()];
        for &k in &order {
            jobs[k] = job(
                &bin,
                &worker_bin,
                &coord_host,
                &sci,
                &hosts,
                &jd,
                r,
                policies[k],
            )?;
        }
        if ideal.is_none() {
            ideal = Some(alone(&worker_bin, &cache, &sizes)?);
        }
        let (sum, longest) = ideal.expect("measured");
        let ideal = (2.0 * sum / parallel).max(longest);
        for (k, &(span, reported, busy)) in jobs.iter().enumerate() {
            let per_task = reported as f64 / tasks as f64;
            let ideal_run = (per_task * sum / parallel).max(longest);
            let own = busy / n_workers as f64;
            println!(
                "makespan: run {}/{runs}, policy {}: job {span:.2} s, ideal {ideal:.2} s (runs alone: sum {sum:.2} s, longest {longest:.2} s), ratio {:.2}x; {per_task:.2} replicas/task reported, ideal at that {ideal_run:.2} s, ratio {:.2}x; workers busy {busy:.2} s in all, / {n_workers} slots = {own:.2} s, ratio to the job's own replica work {:.2}x",
                r + 1,
                policies[k],
                span / ideal,
                span / ideal_run,
                span / own
            );
            for (v, x) in
                per[k]
                    .iter_mut()
                    .zip([span, ideal, span / ideal, span / ideal_run, span / own])
            {
                v.push(x);
            }
        }
    }
    // The ratio of each run (its job beside the baseline measured next to it), then their
    // median: on a shared machine the load differs between runs more than within one.
    let list = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.2}x"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("\n| policy | makespan (median) | ideal (median) | ratio, per run | ratio (median) | ratio at the replicas run, per run | ratio to the job's own replica work, per run (median) | target |\n|---|---|---|---|---|---|---|---|");
    let mut bench = Vec::new();
    for (k, [spans, ideals, ratios, run_ratios, own_ratios]) in per.into_iter().enumerate() {
        let (span, ideal, ratio) = (median(spans), median(ideals), median(ratios.clone()));
        println!(
            "| {} | {span:.2} s | {ideal:.2} s | {} | {ratio:.2}x | {} | {} ({:.2}x) | <= {TARGET}x |",
            policies[k],
            list(&ratios),
            list(&run_ratios),
            list(&own_ratios),
            median(own_ratios.clone())
        );
        bench.push(format!(
            "BENCH|job makespan: {tasks} tasks of ~20 ms to ~{max_secs} s, quorum 2, policy {}, {n_workers} one-slot workers on {cores} cores|{span:.2} s|{ideal:.2} s (ideal)|{ratio:.2}x|<= {TARGET}x|{}",
            policies[k],
            if ratio <= TARGET { "yes" } else { "no" }
        ));
    }
    for line in bench {
        println!("{line}");
    }
    Ok(())
}

/// One job on a fresh coordinator: seconds from `submit --wait` until it says done, the
/// replicas it reported, and its workers' busy seconds (see [`busy_secs`]).
#[allow(clippy::too_many_arguments)]
fn job(
    bin: &Path,
    worker_bin: &Path,
    coord_host: &Host,
    sci: &Host,
    hosts: &[Host],
    jd: &Path,
    r: usize,
    policy: &str,
) -> Result<(f64, u64, f64)> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("makespan-run{r}-"))
        .tempdir()?;
    let dir = dir.path();
    let (_coord, ticket, token) = netgrid::start_coordinator(
        bin,
        coord_host,
        dir,
        "info",
        &["--policy", policy],
        START_GUARD,
    )?;
    // Normal priority, as the baseline's `worker exec` runs: at the default idle priority
    // the replicas would yield to whatever else this shared machine runs.
    let workers = netgrid::start_workers(
        bin,
        worker_bin,
        sci,
        hosts,
        &ticket,
        &token,
        &["--slots", "1", "--priority", "normal"],
        dir,
        START_GUARD,
    )?;
    let (out, err) = (dir.join("submit.out.log"), dir.join("submit.log"));
    let t = Instant::now();
    let mut sub =
        netgrid::spawn_submit(bin, sci, &ticket, &token, &jd.join("job.toml"), &out, &err)?;
    let code = loop {
        if let Some(code) = sub.exited() {
            break code;
        }
        if t.elapsed() > RUN_GUARD {
            bail!("job not done within {RUN_GUARD:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let span = t.elapsed().as_secs_f64();
    let v = netgrid::last_json(&std::fs::read_to_string(&out).unwrap_or_default())
        .unwrap_or(Value::Null);
    if !code.success() || v["state"] != "done" {
        let keep = std::env::temp_dir().join(format!("makespan-failed-{r}"));
        netgrid::keep_logs(dir, &keep);
        bail!(
            "the job did not complete ({code}): {v}; logs in {}",
            keep.display()
        );
    }
    let reported = v["replicas_reported"]
        .as_u64()
        .context("replicas_reported")?;
    let busy = busy_secs(&dir.join("coord").join("coordinator.db"))?;
    if let Some(keep) = std::env::var_os("PEERGRID_BENCH_KEEP") {
        drop(workers);
        drop(_coord);
        let keep = PathBuf::from(keep).join(format!("run{r}-{policy}"));
        netgrid::keep_logs(dir, &keep);
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(dir.join("coord"))
            .arg(&keep)
            .status()?;
        anyhow::ensure!(
            status.success(),
            "cp -a {} {}",
            dir.display(),
            keep.display()
        );
    }
    Ok((span, reported, busy))
}

/// The workers' busy time in the job, from the coordinator's store: per worker, the union of
/// its replicas' intervals from when it could start one (assigned, or its previous report if
/// later: one slot) to the report, in seconds, summed over the workers.
fn busy_secs(db: &Path) -> Result<f64> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("open {}", db.display()))?;
    let mut q = c.prepare(
        "SELECT worker, assigned_ms, reported_ms FROM replicas WHERE reported_ms IS NOT NULL ORDER BY worker, assigned_ms",
    )?;
    let rows = q.query_map([], |r| {
        Ok((
            r.get::<_, Vec<u8>>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let (mut total, mut last, mut end) = (0i64, None::<Vec<u8>>, 0i64);
    for row in rows {
        let (w, assigned, reported) = row?;
        if last.as_ref() != Some(&w) {
            (last, end) = (Some(w), i64::MIN);
        }
        let start = assigned.max(end);
        total += (reported - start).max(0);
        end = end.max(reported);
    }
    Ok(total as f64 / 1000.0)
}
