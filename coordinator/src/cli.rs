//! The submitter-facing subcommands: `submit`, `status`, `results`, `demo`.
//!
//! Built on [`crate::client::Client`]; the demo also starts a coordinator
//! ([`crate::server::Coordinator::start`]) and workers (`worker::daemon::run`) in this
//! process, on loopback, with real QUIC and the real embedded store. The demo is the only
//! part of the coordinator that links the worker (and so wasmtime): it needs the cargo
//! feature `demo` (on by default); without it, `coordinator demo` says so and exits.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
#[cfg(feature = "demo")]
use std::sync::atomic::Ordering;
#[cfg(feature = "demo")]
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tasks::wire::{JobResults, JobState, JobStatus, StatusReport, TaskState};
use tasks::{JobId, JobSpec, Ticket};

use crate::client::Client;

pub mod failures;

/// `coordinator submit`.
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    /// The coordinator's ticket (`peergrid1:<node-id>@<host:port>`, from its `ticket` file).
    #[arg(long = "to", value_name = "TICKET")]
    pub to: String,
    /// The coordinator's submit token (from its `<data-dir>/submit-token` file).
    #[arg(long, value_name = "TOKEN")]
    pub token: String,
    /// The job file (TOML).
    #[arg(value_name = "JOB.toml")]
    pub job: PathBuf,
    /// Show progress until the job ends; exit 0 only when every task has an accepted result.
    #[arg(long)]
    pub wait: bool,
    /// Print JSON (`{"id": JOB_ID, "tasks": N}`) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `coordinator status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The coordinator's ticket.
    #[arg(long = "to", value_name = "TICKET")]
    pub to: String,
    /// The coordinator's submit token.
    #[arg(long, value_name = "TOKEN")]
    pub token: String,
    /// One job (default: all jobs).
    #[arg(value_name = "JOB_ID")]
    pub job: Option<JobId>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `coordinator results`.
#[derive(Debug, Clone, clap::Args)]
pub struct ResultsArgs {
    /// The coordinator's ticket.
    #[arg(long = "to", value_name = "TICKET")]
    pub to: String,
    /// The coordinator's submit token.
    #[arg(long, value_name = "TOKEN")]
    pub token: String,
    /// The job whose results to download.
    #[arg(value_name = "JOB_ID")]
    pub job: JobId,
    /// Directory for `<task-index>.out` files and `results.json`.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// `coordinator demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Workers to run in this process (one task slot each).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Job file to run (default: the built-in Mandelbrot sample, 2048x2048 in 64 tiles).
    #[arg(long, value_name = "JOB.toml")]
    pub job: Option<PathBuf>,
    /// Where to write the results and, for the Mandelbrot sample, the PNG.
    #[arg(long, value_name = "DIR", default_value = "demo-out")]
    pub out: PathBuf,
}

async fn connect(to: &str, token: &str) -> anyhow::Result<Client> {
    let ticket: Ticket = to.parse()?;
    Ok(Client::connect(&ticket, token).await?)
}

/// Run `coordinator submit`; returns the process exit code.
pub async fn submit(args: SubmitArgs) -> anyhow::Result<i32> {
    let spec = JobSpec::from_file(&args.job)?;
    let mut client = connect(&args.to, &args.token).await?;
    let (job, tasks) = client.submit(&spec).await?;
    if !args.wait {
        if args.json {
            println!("{}", serde_json::json!({ "id": job, "tasks": tasks }));
        } else {
            eprintln!(
                "submitted job {job} ({}: {tasks} tasks, quorum {})",
                spec.name, spec.limits.quorum
            );
            println!("{job}");
        }
        client.close().await;
        return Ok(0);
    }
    if !args.json {
        eprintln!("submitted job {job} ({}: {tasks} tasks, quorum {}); waiting for results (Ctrl-C stops waiting, not the job)", spec.name, spec.limits.quorum);
    }
    let end = tokio::select! {
        r = wait_for_job(&mut client, job, !args.json) => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("stopped waiting; job {job} keeps running: `coordinator status --to ... --token ... {job}`");
            return Ok(130);
        }
    };
    client.close().await;
    let ok = end.state == JobState::Done && end.tasks_failed == 0;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "id": job, "tasks": tasks, "state": end.state, "tasks_done": end.tasks_done,
                "tasks_failed": end.tasks_failed, "replicas_reported": end.replicas_reported,
            })
        );
    } else {
        println!("{job}");
        eprintln!("{}", summary_line(&end));
    }
    Ok(if ok { 0 } else { 1 })
}

fn summary_line(s: &JobStatus) -> String {
    let state = match s.state {
        JobState::Done => "done",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Running => "running",
    };
    let mut line = format!(
        "job {} {state}: {}/{} tasks accepted, {} failed, {} replicas reported",
        s.id, s.tasks_done, s.tasks_total, s.tasks_failed, s.replicas_reported
    );
    if s.tasks_failed > 0 {
        line.push_str(&format!(
            " — failed tasks reached no quorum; see `coordinator results {}` for reasons",
            s.id
        ));
    }
    line
}

/// How long [`wait_for_job`] keeps trying to reach a coordinator that went away.
const RECONNECT_PATIENCE: Duration = Duration::from_secs(30 * 60);

/// Poll a job until it ends, drawing a progress bar (or, without a terminal, a line every
/// few seconds) when `show` is set. A coordinator that goes away (a restart, a move to the
/// address its ticket's name now gives) is waited for, reconnecting with back-off for up to
/// [`RECONNECT_PATIENCE`]: the job keeps running there meanwhile.
pub async fn wait_for_job(
    client: &mut Client,
    job: JobId,
    show: bool,
) -> anyhow::Result<JobStatus> {
    let tty = std::io::stderr().is_terminal();
    let bar = if show && tty {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} tasks ({eta} left) {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        Some(b)
    } else {
        None
    };
    let started = Instant::now();
    let mut last_line = Instant::now();
    let mut lost: Option<Instant> = None;
    let mut backoff = Duration::from_millis(500);
    loop {
        let report = match client.status(Some(job)).await {
            Ok(r) => r,
            Err(e) if Client::is_unreachable(&e) => {
                let since = *lost.get_or_insert_with(Instant::now);
                anyhow::ensure!(
                    since.elapsed() < RECONNECT_PATIENCE,
                    "lost the coordinator {:.0} min ago and could not reach it since ({e}); job {job} may still be running: `coordinator status {job}` once it is back",
                    since.elapsed().as_secs_f64() / 60.0
                );
                if let Some(b) = &bar {
                    b.suspend(|| eprintln!("lost the coordinator ({e}); reconnecting in {backoff:?} (job {job} keeps running there)"));
                } else {
                    eprintln!("lost the coordinator ({e}); reconnecting in {backoff:?} (job {job} keeps running there)");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                match client.reconnect().await {
                    Ok(c) => *client = c,
                    Err(e) if Client::is_unreachable(&e) => {}
                    Err(e) => return Err(e.into()),
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if lost.take().is_some() {
            backoff = Duration::from_millis(500);
            if show {
                eprintln!("reconnected to the coordinator");
            }
        }
        let s = report
            .jobs
            .into_iter()
            .find(|j| j.id == job)
            .with_context(|| format!("the coordinator no longer lists job {job}"))?;
        let ended = s.tasks_done + s.tasks_failed;
        let rate = s.tasks_done as f64 / started.elapsed().as_secs_f64().max(0.001);
        let msg = format!(
            "accepted {}, failed {}, in flight {}, replicas {}, {:.1} tasks/s",
            s.tasks_done, s.tasks_failed, s.replicas_in_flight, s.replicas_reported, rate
        );
        if let Some(b) = &bar {
            b.set_length(s.tasks_total as u64);
            b.set_position(ended as u64);
            b.set_message(msg);
        } else if show && last_line.elapsed() >= Duration::from_secs(5) {
            last_line = Instant::now();
            eprintln!("job {job}: {ended}/{} tasks ended; {msg}", s.tasks_total);
        }
        if s.state != JobState::Running {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Run `coordinator status`; returns the process exit code.
pub async fn status(args: StatusArgs) -> anyhow::Result<i32> {
    let client = connect(&args.to, &args.token).await?;
    let report = client.status(args.job).await?;
    let failed = match args.job {
        Some(job) if !args.json => failures::brief(&client, job).await,
        _ => Vec::new(),
    };
    client.close().await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_status(&report);
        for line in failed {
            println!("{line}");
        }
    }
    Ok(0)
}

fn print_status(r: &StatusReport) {
    if r.jobs.is_empty() {
        println!("no jobs");
    } else {
        println!(
            "{:>6}  {:<16} {:<9} {:>8} {:>8} {:>8} {:>9}",
            "JOB", "NAME", "STATE", "TASKS", "DONE", "FAILED", "IN FLIGHT"
        );
        for j in &r.jobs {
            println!(
                "{:>6}  {:<16} {:<9} {:>8} {:>8} {:>8} {:>9}",
                j.id.to_string(),
                j.name,
                serde_json::to_value(j.state)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                j.tasks_total,
                j.tasks_done,
                j.tasks_failed,
                j.replicas_in_flight
            );
        }
        let connected = r.workers.iter().filter(|w| w.connected).count();
        for j in r.jobs.iter().filter(|j| {
            j.state == JobState::Running
                && j.replicas_reported > 0
                && j.replicas_in_flight == 0
                && j.tasks_done + j.tasks_failed < j.tasks_total
        }) {
            println!(
                "job {}: results are in but nothing is running and tasks wait for agreement: more workers are needed (serve's default open policy wants quorum + 1 agreeing workers of one engine before anyone has a record; {connected} connected)",
                j.id
            );
        }
        for j in r.jobs.iter().filter(|j| j.outputs_collecting > 0) {
            println!(
                "job {}: {} accepted outputs are still being collected from their workers (offline workers are retried until they return)",
                j.id, j.outputs_collecting
            );
        }
    }
    println!();
    if r.workers.is_empty() {
        println!("no workers have joined yet");
    } else {
        println!(
            "{:<66} {:<9} {:>12} {:>7} {:>7}",
            "WORKER", "CONNECTED", "CREDIT", "VALID", "INVALID"
        );
        for w in &r.workers {
            println!(
                "{:<66} {:<9} {:>12.3} {:>7} {:>7}",
                w.node_id.to_string(),
                if w.connected { "yes" } else { "no" },
                w.credit,
                w.valid,
                w.invalid
            );
        }
    }
    println!(
        "\ncoordinator has served {} of blob data",
        human_bytes(r.coordinator_bytes_sent)
    );
}

/// Run `coordinator results`; returns the process exit code.
pub async fn results(args: ResultsArgs) -> anyhow::Result<i32> {
    let client = connect(&args.to, &args.token).await?;
    let res = client.collect(args.job, OUTPUT_PATIENCE).await?;
    let failed = failures::fetch(&client, args.job).await;
    client.close().await;
    let w = write_results_with(&res, &failed, &args.out)?;
    eprintln!(
        "job {}: wrote {} verified outputs and results.json to {} ({} pending, {} failed)",
        res.job,
        w.written,
        args.out.display(),
        w.pending,
        w.failed
    );
    if w.collecting > 0 {
        eprintln!(
            "{} accepted outputs are still being collected from the workers; run `coordinator results` again shortly",
            w.collecting
        );
    }
    Ok(0)
}

/// How long `results` waits for accepted outputs the coordinator is still pulling from workers.
const OUTPUT_PATIENCE: Duration = Duration::from_secs(30);

/// What [`write_results`] wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct Written {
    /// `<index>.out` files written.
    pub written: usize,
    /// Tasks not decided yet.
    pub pending: usize,
    /// Tasks that reached no quorum.
    pub failed: usize,
    /// Accepted tasks whose output the coordinator has not collected from the workers yet.
    pub collecting: usize,
}

/// Write `DIR/<index>.out` for every accepted task whose output is at hand, and
/// `DIR/results.json`.
pub fn write_results(res: &JobResults, dir: &Path) -> anyhow::Result<Written> {
    write_results_with(res, &[], dir)
}

/// [`write_results`], with the stderr (and exit code or trap) of the tasks in `failed`
/// added to their entries in `results.json`.
pub fn write_results_with(
    res: &JobResults,
    failed: &[tasks::wire::TaskFailure],
    dir: &Path,
) -> anyhow::Result<Written> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut json = res.clone();
    let mut w = Written::default();
    for t in &mut json.tasks {
        match t.status {
            TaskState::Accepted => match t.output.take() {
                Some(out) => {
                    let path = dir.join(format!("{}.out", t.index));
                    std::fs::write(&path, out)
                        .with_context(|| format!("writing {}", path.display()))?;
                    w.written += 1;
                }
                None => w.collecting += 1,
            },
            TaskState::Pending => w.pending += 1,
            TaskState::Failed => w.failed += 1,
        }
        t.output = None;
    }
    // Outputs live in the .out files; results.json carries their hashes.
    let mut value = serde_json::to_value(&json)?;
    if let Some(list) = value.get_mut("tasks").and_then(|t| t.as_array_mut()) {
        for t in list {
            if let Some(obj) = t.as_object_mut() {
                obj.remove("output");
            }
        }
    }
    failures::annotate(&mut value, failed);
    let path = dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(w)
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(feature = "demo")]
const DEMO_JOB: &str = include_str!("../../examples/mandelbrot/job.toml");
#[cfg(feature = "demo")]
const DEMO_WASM: &[u8] = include_bytes!("../../examples/mandelbrot/mandelbrot.wasm");

/// `coordinator demo` in a coordinator built without the feature `demo`: a one-line error.
#[cfg(not(feature = "demo"))]
pub async fn demo(_args: DemoArgs) -> anyhow::Result<i32> {
    anyhow::bail!(
        "this coordinator was built without the demo (cargo feature `demo`, which links the worker and wasmtime)"
    )
}

/// Run `coordinator demo`; returns the process exit code.
#[cfg(feature = "demo")]
pub async fn demo(args: DemoArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("peergrid-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let job_path = match &args.job {
        Some(p) => p.clone(),
        None => {
            let dir = tmp.path().join("job");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("mandelbrot.wasm"), DEMO_WASM)?;
            std::fs::write(dir.join("job.toml"), DEMO_JOB)?;
            dir.join("job.toml")
        }
    };
    let spec = JobSpec::from_file(&job_path)?;
    let quorum = spec.limits.quorum as usize;
    if args.workers < quorum {
        anyhow::bail!("the job needs a quorum of {quorum} agreeing workers: run the demo with --workers {quorum} or more");
    }

    let coord = crate::server::Coordinator::start(crate::server::ServeConfig::new(
        tmp.path().join("coordinator"),
        "127.0.0.1:0".parse()?,
    ))
    .await
    .context("starting the coordinator")?;
    eprintln!(
        "coordinator {} on {} (store in {})",
        coord.node_id.short(),
        coord.addr,
        tmp.path().display()
    );

    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for i in 0..args.workers {
        let mut cfg = worker::daemon::WorkerConfig::new(
            coord.ticket.clone(),
            tmp.path().join(format!("worker-{i}")),
        );
        cfg.slots = 1;
        cfg.listen = "127.0.0.1:0".parse()?;
        let stats = Arc::new(worker::daemon::WorkerStats::default());
        let handle = tokio::spawn(worker::daemon::run(
            cfg,
            stats.clone(),
            shutdown.child_token(),
        ));
        workers.push((stats, handle));
    }
    eprintln!("{} workers joined over QUIC on loopback", args.workers);

    let mut client = Client::connect(&coord.ticket, &coord.token).await?;
    let (job, tasks) = client.submit(&spec).await?;
    eprintln!(
        "submitted job {job}: {} ({tasks} tasks, quorum {}, up to {} replicas each)",
        spec.name, spec.limits.quorum, spec.limits.max_replicas
    );
    let end = tokio::select! {
        r = wait_for_job(&mut client, job, true) => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted; stopping the demo");
            shutdown.cancel();
            let _ = coord.shutdown().await;
            return Ok(130);
        }
    };
    let res = client.collect(job, OUTPUT_PATIENCE).await?;
    let report = client.status(Some(job)).await?;
    let Written {
        written,
        failed,
        collecting,
        ..
    } = write_results(&res, &args.out)?;
    anyhow::ensure!(
        collecting == 0,
        "{collecting} accepted outputs never reached the coordinator"
    );
    let compute_wall = started.elapsed();

    let mut png = None;
    if spec.name == "mandelbrot" && failed == 0 {
        let outputs = res.tasks.iter().filter_map(|t| t.output.as_deref());
        let img = peergrid_examples::mandel::assemble(outputs, 128)?;
        let path = args.out.join("mandelbrot.png");
        peergrid_examples::mandel::write_png(&img, &path)?;
        png = Some((path, img.width, img.height));
    }

    let coordinator_bytes = coord.bytes_sent();
    let (mut from_coord, mut from_peers) = (0u64, 0u64);
    for (s, _) in &workers {
        from_coord += s.bytes_from_coordinator.load(Ordering::Relaxed);
        from_peers += s.bytes_from_peers.load(Ordering::Relaxed);
    }
    client.close().await;
    shutdown.cancel();
    for (_, h) in workers {
        let _ = tokio::time::timeout(Duration::from_secs(15), h).await;
    }
    coord.shutdown().await?;

    let agreeing: usize = res
        .tasks
        .iter()
        .filter(|t| t.status == TaskState::Accepted)
        .map(|t| t.agreeing_workers.len())
        .sum();
    println!("Peergrid demo: job {} \"{}\"", end.id, end.name);
    println!(
        "  tasks:      {} accepted, {} failed, of {}",
        end.tasks_done, end.tasks_failed, end.tasks_total
    );
    println!(
        "  replicas:   {} reported; {} agreeing replicas behind accepted results (quorum {})",
        end.replicas_reported, agreeing, quorum
    );
    println!("  workers:");
    for w in &report.workers {
        println!(
            "    {}  credit {:>9.4}  valid {:>4}  invalid {:>3}",
            w.node_id.short(),
            w.credit,
            w.valid,
            w.invalid
        );
    }
    println!(
        "  blob data:  workers fetched {} from the coordinator and {} from each other; the coordinator served {} in all (incl. results to this submitter)",
        human_bytes(from_coord),
        human_bytes(from_peers),
        human_bytes(coordinator_bytes),
    );
    println!("  wall time:  {:.1} s", compute_wall.as_secs_f64());
    println!(
        "  outputs:    {written} files and results.json in {}",
        args.out.display()
    );
    if let Some((path, w, h)) = png {
        println!("  image:      {} ({w}x{h})", path.display());
    }
    Ok(if end.state == JobState::Done && end.tasks_failed == 0 {
        0
    } else {
        1
    })
}
