//! The submitter-facing subcommands: `submit`, `status`, `results`, `jobs`, `cancel`,
//! `retry`, `demo`.
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
use tasks::wire::{
    JobResults, JobState, JobStatus, StatusReport, TaskFailure, TaskResult, TaskState,
};
use tasks::{Determinism, JobId, JobSpec, Ticket};

use crate::client::Client;

pub mod failures;

/// The environment variable submitter commands read the submit token from when neither
/// `--token` nor `--token-file` is given.
pub const TOKEN_ENV: &str = "PEERGRID_TOKEN";

/// Which coordinator a submitter command talks to, and its submit token.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The coordinator's ticket (`peergrid1:<node-id>@<host:port>`, from its `ticket` file).
    #[arg(long = "to", value_name = "TICKET")]
    pub to: String,
    /// The coordinator's submit token. Other users of this machine can read it in `ps`:
    /// prefer --token-file or the PEERGRID_TOKEN environment variable.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// File holding the submit token, e.g. the coordinator's `<data-dir>/submit-token`
    /// (a trailing newline is ignored). Used when --token is not given.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

impl Target {
    /// The submit token: `--token`, else `--token-file`'s contents, else `$PEERGRID_TOKEN`.
    pub fn token(&self) -> anyhow::Result<String> {
        resolve_token(
            self.token.as_deref(),
            self.token_file.as_deref(),
            std::env::var(TOKEN_ENV).ok().as_deref(),
        )
    }
}

/// The submit token from the first source given, in this order: the `--token` value, the
/// `--token-file` file (its trailing newline trimmed), the `PEERGRID_TOKEN` value.
pub fn resolve_token(
    token: Option<&str>,
    file: Option<&Path>,
    env: Option<&str>,
) -> anyhow::Result<String> {
    if let Some(t) = token {
        anyhow::ensure!(!t.trim().is_empty(), "--token is empty: give the coordinator's submit token (from its <data-dir>/submit-token)");
        return Ok(t.to_string());
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the token file {} (--token-file): give the coordinator's <data-dir>/submit-token",
                path.display()
            )
        })?;
        let t = text.trim_end_matches(['\n', '\r']);
        anyhow::ensure!(
            !t.trim().is_empty(),
            "the token file {} is empty: give the coordinator's <data-dir>/submit-token",
            path.display()
        );
        return Ok(t.to_string());
    }
    if let Some(t) = env.filter(|t| !t.trim().is_empty()) {
        return Ok(t.to_string());
    }
    anyhow::bail!("no submit token: give --token-file FILE (the coordinator's <data-dir>/submit-token), --token TOKEN, or set the {TOKEN_ENV} environment variable")
}

/// `coordinator submit`.
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub target: Target,
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
    #[command(flatten)]
    pub target: Target,
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
    #[command(flatten)]
    pub target: Target,
    /// The job whose results to download.
    #[arg(value_name = "JOB_ID")]
    pub job: JobId,
    /// Directory for `<task-index>.out` files and `results.json`.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// `coordinator jobs`.
#[derive(Debug, Clone, clap::Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print JSON (`{"jobs": [...]}`, each job with the keys of `status --json`) instead of
    /// a table.
    #[arg(long)]
    pub json: bool,
}

/// `coordinator cancel`.
#[derive(Debug, Clone, clap::Args)]
pub struct CancelArgs {
    #[command(flatten)]
    pub target: Target,
    /// The job to cancel (see `coordinator jobs`).
    #[arg(value_name = "JOB_ID")]
    pub job: JobId,
}

/// `coordinator retry`.
#[derive(Debug, Clone, clap::Args)]
pub struct RetryArgs {
    #[command(flatten)]
    pub target: Target,
    /// The job whose failed tasks to reissue (see `coordinator jobs`).
    #[arg(value_name = "JOB_ID")]
    pub job: JobId,
    /// Reissue the tasks that failed (no quorum within max_replicas, or too many replicas
    /// lost), each with a fresh replica budget. The default, and the only kind: accepted
    /// tasks are never touched.
    #[arg(long)]
    pub failed: bool,
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

async fn connect(target: &Target) -> anyhow::Result<Client> {
    // The token first: a missing one is the user's to fix before any network wait.
    let token = target.token()?;
    let ticket: Ticket = target.to.parse()?;
    Ok(Client::connect(&ticket, &token).await?)
}

/// Run `coordinator submit`; returns the process exit code.
pub async fn submit(args: SubmitArgs) -> anyhow::Result<i32> {
    let spec = JobSpec::from_file(&args.job)?;
    let mut client = connect(&args.target).await?;
    let (job, tasks) = client.submit(&spec).await?;
    if !args.wait {
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "id": job, "tasks": tasks, "determinism": spec.determinism })
            );
        } else {
            eprintln!(
                "submitted job {job} ({}: {tasks} tasks, quorum {}, {})",
                spec.name, spec.limits.quorum, spec.determinism
            );
            println!("{job}");
        }
        client.close().await;
        return Ok(0);
    }
    if !args.json {
        eprintln!("submitted job {job} ({}: {tasks} tasks, quorum {}, {}); waiting for results (Ctrl-C stops waiting, not the job)", spec.name, spec.limits.quorum, spec.determinism);
    }
    let end = tokio::select! {
        r = wait_for_job(&mut client, job, !args.json) => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("stopped waiting; job {job} keeps running: `coordinator status --to ... --token-file ... {job}`");
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
                "determinism": spec.determinism,
            })
        );
    } else {
        println!("{job}");
        eprintln!("{}", summary_line(&end));
    }
    Ok(if ok { 0 } else { 1 })
}

fn summary_line(s: &JobStatus) -> String {
    let state = state_name(s.state);
    let mut line = format!(
        "job {} {state}: {}/{} tasks accepted, {} failed, {} replicas reported",
        s.id, s.tasks_done, s.tasks_total, s.tasks_failed, s.replicas_reported
    );
    if s.tasks_failed > 0 {
        line.push_str(&format!(
            " — failed tasks reached no quorum; see `coordinator results {}` for reasons, `coordinator retry {}` runs them again",
            s.id, s.id
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
    // Asked while the coordinator answers it (an older one does not know the request).
    let mut ask_progress = true;
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
        let mut msg = format!(
            "accepted {}, failed {}, in flight {}, replicas {}, {:.1} tasks/s",
            s.tasks_done, s.tasks_failed, s.replicas_in_flight, s.replicas_reported, rate
        );
        if ask_progress && show && s.state == JobState::Running {
            match client.progress(job).await {
                Ok(Some(p)) if p.reporting > 0 && !p.tasks.is_empty() => {
                    let mean =
                        p.tasks.iter().map(|t| t.fraction).sum::<f64>() / p.tasks.len() as f64;
                    msg.push_str(&format!(
                        ", {} running at {:.0}% on average",
                        p.reporting,
                        mean * 100.0
                    ));
                }
                Ok(Some(_)) => {}
                // A coordinator that does not know the request: stop asking.
                Ok(None) => ask_progress = false,
                // Anything else shows up on the next status request.
                Err(_) => {}
            }
        }
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
    let client = connect(&args.target).await?;
    let report = client.status(args.job).await?;
    let failed = match args.job {
        Some(job) if !args.json => failures::brief(&client, job).await,
        _ => Vec::new(),
    };
    // Last: an older coordinator that does not know the request drops the connection.
    let progress = match args.job {
        Some(job) => client.progress(job).await.ok().flatten(),
        None => None,
    };
    let classes = job_classes(&client, args.job).await;
    client.close().await;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        add_classes(&mut v["jobs"], &report.jobs, &classes);
        if let (Some(p), Some(job)) = (&progress, v["jobs"].get_mut(0)) {
            job["progress"] = serde_json::json!({
                "reporting": p.reporting,
                "tasks": p.tasks.iter().map(|t| serde_json::json!({"index": t.index, "fraction": t.fraction})).collect::<Vec<_>>(),
            });
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_status(&report, &classes);
        if let Some(line) = progress.as_ref().and_then(progress_line) {
            println!("{line}");
        }
        for line in failed {
            println!("{line}");
        }
    }
    Ok(0)
}

/// The determinism class of one job or all; empty from a coordinator older than classes
/// (whose jobs are all portable) or on any error (the rest of the answer stands).
async fn job_classes(
    client: &Client,
    job: Option<JobId>,
) -> std::collections::HashMap<JobId, Determinism> {
    client
        .classes(job)
        .await
        .ok()
        .flatten()
        .map(|v| v.into_iter().collect())
        .unwrap_or_default()
}

/// `"determinism"` into each job object of the JSON array `jobs` (made from `report`).
fn add_classes(
    jobs: &mut serde_json::Value,
    report: &[JobStatus],
    classes: &std::collections::HashMap<JobId, Determinism>,
) {
    if let Some(list) = jobs.as_array_mut() {
        for (j, s) in list.iter_mut().zip(report) {
            if let Some(d) = classes.get(&s.id) {
                j["determinism"] = serde_json::json!(d);
            }
        }
    }
}

/// "3 running tasks report progress (mean 41%): task 0 42%, task 5 10%, ..." (the first
/// ten), or nothing when no running task reports it.
fn progress_line(p: &tasks::wire::JobProgress) -> Option<String> {
    if p.reporting == 0 || p.tasks.is_empty() {
        return None;
    }
    let mean = p.tasks.iter().map(|t| t.fraction).sum::<f64>() / p.tasks.len() as f64;
    let shown: Vec<String> = p
        .tasks
        .iter()
        .take(10)
        .map(|t| format!("task {} {:.0}%", t.index, t.fraction * 100.0))
        .collect();
    let more = if p.reporting as usize > shown.len() {
        ", ..."
    } else {
        ""
    };
    Some(format!(
        "job {}: {} running tasks report progress (mean {:.0}%): {}{more}",
        p.job,
        p.reporting,
        mean * 100.0,
        shown.join(", ")
    ))
}

fn print_status(r: &StatusReport, classes: &std::collections::HashMap<JobId, Determinism>) {
    if r.jobs.is_empty() {
        println!("no jobs");
    } else {
        println!(
            "{:>6}  {:<16} {:<9} {:>8} {:>8} {:>8} {:>9}  {}",
            "JOB", "NAME", "STATE", "TASKS", "DONE", "FAILED", "IN FLIGHT", "CLASS"
        );
        for j in &r.jobs {
            println!(
                "{:>6}  {:<16} {:<9} {:>8} {:>8} {:>8} {:>9}  {}",
                j.id.to_string(),
                j.name,
                serde_json::to_value(j.state)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                j.tasks_total,
                j.tasks_done,
                j.tasks_failed,
                j.replicas_in_flight,
                classes.get(&j.id).map_or("?", |d| d.as_str())
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

/// Run `coordinator results`: the job's results page by page, each page's outputs written
/// before the next is asked for (memory stays bounded whatever the job's size); returns
/// the process exit code.
pub async fn results(args: ResultsArgs) -> anyhow::Result<i32> {
    let client = connect(&args.target).await?;
    let failed = failures::fetch(&client, args.job).await;
    let w = download_results(&client, args.job, &args.out, results_page_size(), &failed).await?;
    client.close().await;
    eprintln!(
        "job {}: wrote {} verified outputs and results.json to {} ({} pending, {} failed)",
        args.job,
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

/// Tasks asked for per results page. The coordinator caps a page at
/// [`tasks::wire::MAX_RESULTS_PAGE`] tasks and a few MiB.
const RESULTS_PAGE: u32 = tasks::wire::MAX_RESULTS_PAGE;

/// Test knob, deliberately undocumented: tasks per results page request, so a test can make
/// a small job span many pages.
const RESULTS_PAGE_ENV: &str = "PEERGRID_RESULTS_PAGE";

fn results_page_size() -> u32 {
    std::env::var(RESULTS_PAGE_ENV)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(RESULTS_PAGE)
}

/// Move an accepted task's output bytes to `DIR/<index>.out` (results.json carries its hash)
/// and count the task in `w`.
fn write_output(t: &mut TaskResult, dir: &Path, w: &mut Written) -> anyhow::Result<()> {
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
    Ok(())
}

/// One task of `results.json`, as `serde_json::to_string_pretty` prints it inside the
/// document (four spaces deep): the output itself lives in its `.out` file.
fn task_json(t: &TaskResult, failure: Option<&TaskFailure>) -> anyhow::Result<String> {
    let mut v = serde_json::to_value(t)?;
    if let Some(obj) = v.as_object_mut() {
        obj.remove("output");
    }
    if let Some(f) = failure {
        failures::annotate_task(&mut v, f);
    }
    let text = serde_json::to_string_pretty(&v)?;
    Ok(text
        .lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Download a job's results into `dir` page by page (`page` tasks per request): every
/// accepted output at hand to `DIR/<index>.out`, and `DIR/results.json` written as a stream
/// (the same document [`write_results`] writes; renamed into place once complete). Accepted
/// outputs the coordinator is still collecting from the workers are asked for again for up
/// to [`OUTPUT_PATIENCE`] once the job has ended. A progress bar shows on a terminal.
pub async fn download_results(
    client: &Client,
    job: JobId,
    dir: &Path,
    page: u32,
    failed: &[TaskFailure],
) -> anyhow::Result<Written> {
    use std::io::Write;
    let failed: std::collections::HashMap<u32, &TaskFailure> =
        failed.iter().map(|f| (f.index, f)).collect();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let final_path = dir.join("results.json");
    let part = dir.join("results.json.part");
    let file =
        std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
    let mut json = std::io::BufWriter::new(file);
    let bar = if std::io::stderr().is_terminal() && std::io::stdout().is_terminal() {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} tasks ({eta} left) {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let until = Instant::now() + OUTPUT_PATIENCE;
    let mut outputs = crate::client::OutputFetcher::default();
    let mut w = Written::default();
    let mut first = 0u32;
    let mut wrote_any = false;
    let mut header = false;
    let write_err = |e: std::io::Error| anyhow::anyhow!("writing {}: {e}", part.display());
    loop {
        let mut p = client.results_page(job, first, page).await?;
        // Accepted outputs still on their way to the coordinator: once the job has ended
        // they will come, so ask for this page again (running jobs are downloaded as they
        // are).
        loop {
            let mut missing = false;
            for t in &mut p.tasks {
                missing |= !client.fill_output(t, &mut outputs).await?;
            }
            if !missing || p.state == JobState::Running || Instant::now() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            p = client.results_page(job, first, page).await?;
        }
        if !header {
            header = true;
            bar.set_length(u64::from(p.tasks_total));
            let head = serde_json::json!({ "job": p.job, "name": p.name, "state": p.state });
            write!(
                json,
                "{{\n  \"job\": {},\n  \"name\": {},\n  \"state\": {},\n  \"tasks\": [",
                head["job"], head["name"], head["state"]
            )
            .map_err(write_err)?;
        }
        let n = p.tasks.len() as u32;
        for mut t in p.tasks {
            write_output(&mut t, dir, &mut w)?;
            json.write_all(if wrote_any { b",\n" } else { b"\n" })
                .map_err(write_err)?;
            json.write_all(task_json(&t, failed.get(&t.index).copied())?.as_bytes())
                .map_err(write_err)?;
            wrote_any = true;
        }
        first = first.saturating_add(n);
        bar.set_position(u64::from(first));
        bar.set_message(format!("{} outputs written", w.written));
        if n == 0 || first >= p.tasks_total {
            break;
        }
    }
    // Asked last: a coordinator that predates classes (its jobs are all `portable`) drops
    // the connection on a request it cannot decode.
    let class = client
        .classes(Some(job))
        .await
        .ok()
        .flatten()
        .and_then(|v| v.first().map(|(_, d)| *d))
        .unwrap_or(Determinism::Portable);
    json.write_all(if wrote_any { b"\n  ]" } else { b"]" })
        .map_err(write_err)?;
    write!(
        json,
        ",\n  \"determinism\": {}\n}}\n",
        serde_json::json!(class)
    )
    .map_err(write_err)?;
    json.into_inner()
        .map_err(|e| anyhow::anyhow!("writing {}: {}", part.display(), e.error()))?
        .sync_all()
        .map_err(write_err)?;
    std::fs::rename(&part, &final_path)
        .with_context(|| format!("renaming {} to results.json", part.display()))?;
    bar.finish_and_clear();
    Ok(w)
}

/// Run `coordinator jobs`; returns the process exit code.
pub async fn jobs(args: JobsArgs) -> anyhow::Result<i32> {
    let client = connect(&args.target).await?;
    let report = client.status(None).await?;
    // Last: a coordinator older than classes drops the connection on the request.
    let classes = job_classes(&client, None).await;
    client.close().await;
    if args.json {
        let mut jobs = serde_json::to_value(&report.jobs)?;
        add_classes(&mut jobs, &report.jobs, &classes);
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "jobs": jobs }))?
        );
    } else if report.jobs.is_empty() {
        println!("no jobs");
    } else {
        println!(
            "{:>6}  {:<16} {:<9} {:>8} {:>8} {:>8}  {}",
            "JOB", "NAME", "STATE", "TASKS", "DONE", "FAILED", "CLASS"
        );
        for j in &report.jobs {
            println!(
                "{:>6}  {:<16} {:<9} {:>8} {:>8} {:>8}  {}",
                j.id.to_string(),
                j.name,
                state_name(j.state),
                j.tasks_total,
                j.tasks_done,
                j.tasks_failed,
                classes.get(&j.id).map_or("?", |d| d.as_str())
            );
        }
    }
    Ok(0)
}

fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Running => "running",
        JobState::Done => "done",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

/// Run `coordinator cancel`; returns the process exit code.
pub async fn cancel(args: CancelArgs) -> anyhow::Result<i32> {
    let client = connect(&args.target).await?;
    let job = args.job;
    let report = client.status(Some(job)).await?;
    let s = report
        .jobs
        .into_iter()
        .find(|j| j.id == job)
        .with_context(|| format!("the coordinator does not list job {job}"))?;
    if s.state != JobState::Running {
        client.close().await;
        anyhow::bail!(
            "job {job} has already ended ({}): there is nothing to cancel",
            state_name(s.state)
        );
    }
    client.cancel(job).await?;
    client.close().await;
    eprintln!(
        "cancelled job {job} ({}): {} of {} tasks had been accepted; workers are told to stop the rest",
        s.name, s.tasks_done, s.tasks_total
    );
    Ok(0)
}

/// Run `coordinator retry`; returns the process exit code.
pub async fn retry(args: RetryArgs) -> anyhow::Result<i32> {
    // `--failed` is the only kind of retry there is (see RetryArgs).
    let _ = args.failed;
    let client = connect(&args.target).await?;
    let job = args.job;
    let n = client.retry(job).await?;
    client.close().await;
    if n == 0 {
        eprintln!("job {job} has no failed tasks: nothing to retry");
    } else {
        eprintln!(
            "job {job}: {n} failed tasks are pending again, each with a fresh replica budget; follow it with `coordinator status {job}`"
        );
    }
    println!("{n}");
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
    write_results_with(res, &[], None, dir)
}

/// [`write_results`], with the stderr (and exit code or trap) of the tasks in `failed`
/// added to their entries in `results.json`, and the job's determinism class (when known)
/// as its last key, exactly as [`download_results`] writes the document.
pub fn write_results_with(
    res: &JobResults,
    failed: &[tasks::wire::TaskFailure],
    determinism: Option<Determinism>,
    dir: &Path,
) -> anyhow::Result<Written> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut json = res.clone();
    let mut w = Written::default();
    for t in &mut json.tasks {
        write_output(t, dir, &mut w)?;
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
    let mut text = serde_json::to_string_pretty(&value)?;
    if let Some(d) = determinism {
        // Last, after `tasks` (serde_json sorts a map's keys), where the streamed writer puts
        // it: it learns the class only after the pages.
        if text.ends_with("\n}") {
            text.truncate(text.len() - 2);
            text.push_str(&format!(
                ",\n  \"determinism\": {}\n}}",
                serde_json::json!(d)
            ));
        }
    }
    let path = dir.join("results.json");
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
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
    } = write_results_with(&res, &[], Some(spec.determinism), &args.out)?;
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
