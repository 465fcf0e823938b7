//! The `worker` command: `join` donates idle CPU to a coordinator; `exec` runs one task
//! locally in the same sandbox; `status`, `pause` and `resume` talk to a running `join`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use tasks::job::{defaults, limits};
use tasks::{JobId, Status, TaskId};
use worker::daemon::socket::{self, PauseReason, WorkerState};
use worker::sandbox::{RunControl, RunSpec, Sandbox, SandboxConfig};

/// Peergrid worker: volunteer computing on WebAssembly.
///
/// `worker join` donates this machine's idle CPU to a Peergrid coordinator: it fetches task
/// modules and inputs from peers, runs them in a deterministic wasm sandbox, and reports
/// result digests that other volunteers cross-check.
///
/// `worker exec` runs one task module locally in that same sandbox, to develop and debug
/// tasks: the digest it prints is the one every honest worker computes.
#[derive(Debug, Parser)]
#[command(name = "worker", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines on stderr look: `text` (coloured only on a terminal, never with
    /// NO_COLOR set) or `json` (one object per line: timestamp, level, fields.message, target).
    #[arg(long, global = true, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Donate idle CPU to a coordinator: run its tasks in the sandbox and report the results.
    ///
    /// Logs go to stderr (RUST_LOG, default info).
    Join(worker::daemon::JoinArgs),
    /// Run one task locally in the same sandbox the worker uses and print its result.
    ///
    /// Without --json, the task's stdout goes to stdout, its stderr to stderr, and a one-line
    /// summary (status, fuel, output hash, digest) to stderr. Exit code: 0 when the task's
    /// status is ok, 1 for any other status, 2 when the task could not be run at all.
    /// Logs: RUST_LOG (default warn).
    Exec(ExecArgs),
    /// Show what the running `worker join` of a data dir is doing: its connection, slots,
    /// tasks (and for how long they ran), whether it is paused and why, results reported.
    Status(ControlArgs),
    /// Pause the running `worker join` of a data dir: its tasks stop where they are (no CPU
    /// used, nothing lost) and it takes no new work, until `worker resume`.
    ///
    /// Paused tasks still count against their deadlines: after a long pause the coordinator
    /// gives them to other workers.
    Pause(ControlArgs),
    /// Resume a worker paused by `worker pause` (with --idle-only, tasks still wait while the
    /// machine is busy).
    Resume(ControlArgs),
    /// Print a shell completion script, e.g. `worker completions bash > ~/.local/share/bash-completion/completions/worker`.
    Completions(CompletionsArgs),
}

/// Arguments of `status`, `pause` and `resume`.
#[derive(Debug, clap::Args)]
struct ControlArgs {
    /// The data dir of the running `worker join` (its control socket is DIR/control.sock).
    #[arg(long, value_name = "DIR", default_value = "peergrid-worker")]
    data_dir: PathBuf,
    /// Print the worker's state as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(Debug, clap::Args)]
struct ExecArgs {
    /// The task module: a WASI preview 1 command (.wasm; WebAssembly text .wat is accepted too).
    module: PathBuf,
    /// File whose bytes become the task's stdin (default: empty).
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
    /// An argument for the task (repeatable): argv = [NAME, A...].
    #[arg(long = "arg", value_name = "A", allow_hyphen_values = true)]
    args: Vec<String>,
    /// argv[0] of the task, as a job's name would be (default: the module's file stem).
    #[arg(long)]
    name: Option<String>,
    /// Instruction budget; the task ends with status out_of_fuel when it runs out.
    #[arg(long, value_name = "N", default_value_t = defaults::FUEL)]
    fuel: u64,
    /// Linear memory limit in MiB; exceeding it ends the task with status memory_limit.
    #[arg(long, value_name = "M", default_value_t = defaults::MEMORY_MB,
          value_parser = clap::value_parser!(u32).range(1..=limits::MAX_MEMORY_MB as i64))]
    memory_mb: u32,
    /// Stdout cap in bytes; writing more ends the task with status output_limit.
    #[arg(long, value_name = "BYTES", default_value_t = defaults::MAX_OUTPUT)]
    max_output: u64,
    /// Seed random_get as task JOB/INDEX of a job would be (default: an all-zero seed).
    #[arg(long, value_name = "JOB/INDEX", value_parser = parse_task_id)]
    task: Option<TaskId>,
    /// Also write the task's stdout to this file.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Cache compiled modules in this directory (default: no disk cache).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Determinism class to run in, as a job's `determinism` key names it: `native` (the
    /// architecture's fixed ISA baseline without NaN canonicalization: identical on every
    /// host of this architecture, and faster on float code; the default, as for jobs) or
    /// `portable` (NaN canonicalization: results identical on every architecture).
    #[arg(long, value_name = "CLASS", default_value = "native",
          value_parser = ["portable", "native"])]
    determinism: String,
    /// Keep the task's checkpoints (docs/guest-abi.md) in this directory, so running the same
    /// command again after an interruption (Ctrl-C, kill) resumes from the newest one; they
    /// are deleted when the task ends. Default: checkpoints last as long as the run.
    #[arg(long, value_name = "DIR")]
    checkpoint_dir: Option<PathBuf>,
    /// Print one JSON object: {"status","exit_code","fuel_used","output_hash","output_len",
    /// "error","trap","digest","wall_ms","fingerprint","stderr","progress"} instead of the
    /// task's output.
    #[arg(long)]
    json: bool,
}

fn parse_task_id(s: &str) -> Result<TaskId, String> {
    let (job, index) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not JOB/INDEX (e.g. 7/0)"))?;
    let job: JobId = job.parse()?;
    let index = index
        .trim()
        .parse()
        .map_err(|_| format!("{index:?} is not a task index"))?;
    Ok(TaskId { job, index })
}

/// Logs to stderr, filtered by RUST_LOG (else `default_level`). Text is coloured only when
/// stderr is a terminal and NO_COLOR is unset or empty, so log files hold no escape codes.
fn init_logs(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            logs.with_ansi(colour).init()
        }
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Join(_) => "info",
        _ => "warn",
    };
    init_logs(cli.log_format, default_level);

    let result = match cli.command {
        Command::Join(args) => join(args).map(|()| ExitCode::SUCCESS),
        Command::Exec(args) => exec(args),
        Command::Status(args) => control(args, socket::Request::Status),
        Command::Pause(args) => control(args, socket::Request::Pause),
        Command::Resume(args) => control(args, socket::Request::Resume),
        Command::Completions(args) => {
            // Into a buffer first: clap_complete panics on a write error (`| head`).
            let mut script = Vec::new();
            clap_complete::generate(args.shell, &mut Cli::command(), "worker", &mut script);
            let _ = std::io::stdout().write_all(&script);
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(2)
        }
    }
}

fn join(args: worker::daemon::JoinArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(worker::daemon::join(args))
}

/// `worker status | pause | resume`.
fn control(args: ControlArgs, req: socket::Request) -> anyhow::Result<ExitCode> {
    let state = socket::request(&args.data_dir, req)?;
    if args.json {
        println!("{}", serde_json::to_string(&state)?);
        return Ok(ExitCode::SUCCESS);
    }
    match req {
        socket::Request::Status => print_state(&state),
        socket::Request::Pause => {
            let held = state.tasks.len();
            println!("paused: {held} tasks held where they are; no new work is taken until `worker resume --data-dir {}`", args.data_dir.display());
        }
        socket::Request::Resume if state.paused => {
            println!(
                "resumed from `worker pause`; tasks still wait: --idle-only finds the machine busy"
            )
        }
        socket::Request::Resume => println!("resumed: tasks run and new work is taken"),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_state(s: &WorkerState) {
    println!("worker {} (data dir {})", s.node_id, s.data_dir);
    match (&s.observed_addr, s.connected) {
        (Some(seen), true) => println!(
            "coordinator: {} connected (sees us as {seen})",
            s.coordinator
        ),
        (None, true) => println!("coordinator: {} connected", s.coordinator),
        (_, false) => println!(
            "coordinator: {} not connected (retrying; results wait in the outbox)",
            s.coordinator
        ),
    }
    let limit = s
        .cpu_limit
        .map(|p| format!(", each limited to {p}% of a core (--cpu-limit)"))
        .unwrap_or_default();
    println!("slots: {} at {} priority{limit}", s.slots, s.priority);
    let state = if s.paused {
        let why: Vec<&str> = s
            .pause_reasons
            .iter()
            .map(|r| match r {
                PauseReason::Command => "by `worker pause` (until `worker resume`)",
                PauseReason::IdlePolicy => "--idle-only: the machine is busy",
            })
            .collect();
        format!("paused {}", why.join(" and "))
    } else {
        "running".to_string()
    };
    println!("state: {state}");
    println!("tasks: {} in hand", s.tasks.len());
    for t in &s.tasks {
        let time = match t.running_secs {
            Some(r) => format!("running for {r:.1} s"),
            None => format!("{} for {:.1} s", t.state, t.in_hand_secs),
        };
        println!(
            "  replica {:<8} task {:<12} {time}{}",
            t.replica,
            t.task,
            if t.held { " (held)" } else { "" }
        );
    }
    println!(
        "results: {} completed, {} reported, {} acknowledged, {} waiting in the outbox",
        s.completed, s.reported, s.acknowledged, s.unacknowledged
    );
    match s.credit {
        Some(c) => println!("credit: {c:.3}"),
        None => {
            println!("credit: the coordinator keeps it (`coordinator status` lists it per worker)")
        }
    }
    println!("up for {:.0} s", s.uptime_secs);
}

fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let module = read_module(&args.module)?;
    let input = match &args.input {
        Some(p) => {
            std::fs::read(p).with_context(|| format!("cannot read input {}", p.display()))?
        }
        None => Vec::new(),
    };
    let name = args.name.clone().unwrap_or_else(|| {
        args.module
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "task".into())
    });
    let spec = RunSpec {
        argv: std::iter::once(name)
            .chain(args.args.iter().cloned())
            .collect(),
        input,
        fuel: args.fuel,
        memory_mb: args.memory_mb,
        max_output: args.max_output,
        seed: args.task.map(|t| t.random_seed()).unwrap_or([0; 32]),
    };
    let sandbox = Sandbox::new(SandboxConfig {
        cache_dir: args.cache_dir.clone(),
        deterministic: args.determinism == "portable",
        // One run: no instance pool. Building the pool's engine and reserving its slots
        // costs ~0.5 ms of process start (of ~2 ms) and saves nothing for a single run.
        pooled_runs: 0,
        ..SandboxConfig::default()
    })
    .context("setting up the sandbox")?;
    let control = RunControl::default();
    // One checkpoint per (module, argv, input): another task in the same directory does not
    // resume this one's state.
    let ckpt = match &args.checkpoint_dir {
        Some(dir) => {
            let dir = worker::daemon::checkpoints::CheckpointDir::open(dir)
                .with_context(|| format!("cannot open checkpoint dir {}", dir.display()))?;
            let mut h = blake3::Hasher::new();
            h.update(&module);
            for a in &spec.argv {
                h.update(&(a.len() as u64).to_le_bytes());
                h.update(a.as_bytes());
            }
            h.update(&spec.input);
            let key = format!("exec-{}", &h.finalize().to_hex()[..16]);
            let store = dir.store(&key);
            control.set_checkpoints(store.clone());
            Some((dir, key, store))
        }
        None => None,
    };
    let out = sandbox
        .run_bytes(&module, &spec, &control)
        .context("the run was cancelled")?;
    let progress = ckpt.as_ref().and_then(|(_, _, s)| s.progress());
    if let Some((dir, key, _)) = &ckpt {
        // The task ended: its checkpoint is done with.
        dir.remove(key);
    }
    if let Some(p) = &args.out {
        std::fs::write(p, &out.output)
            .with_context(|| format!("cannot write output to {}", p.display()))?;
    }
    let r = &out.result;
    let digest = r.digest().to_string();
    if args.json {
        let json = serde_json::json!({
            "status": r.status.as_str(),
            "exit_code": r.exit_code,
            "fuel_used": r.fuel_used,
            "output_hash": r.output_hash.to_string(),
            "output_len": r.output_len,
            "error": out.error,
            "trap": r.trap,
            "digest": digest,
            "wall_ms": out.wall.as_secs_f64() * 1e3,
            "fingerprint": sandbox.fingerprint().to_string(),
            "stderr": String::from_utf8_lossy(&out.stderr),
            "progress": progress,
        });
        println!("{json}");
    } else {
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(&out.output)
            .context("writing the task's output")?;
        stdout.flush().ok();
        let mut stderr = std::io::stderr().lock();
        stderr.write_all(&out.stderr).ok();
        let mut line = format!("{}", r.status);
        if r.status == Status::Exit {
            line += &format!(" (exit code {})", r.exit_code);
        }
        if !r.trap.is_empty() {
            line += &format!(" ({})", r.trap);
        }
        line += &format!(
            " fuel_used={} output_len={} output_hash={} digest={} wall={:.1}ms",
            r.fuel_used,
            r.output_len,
            r.output_hash,
            digest,
            out.wall.as_secs_f64() * 1e3
        );
        if let Some(e) = &out.error {
            line += &format!(" error: {e}");
        }
        writeln!(stderr, "{line}").ok();
    }
    Ok(if r.status == Status::Ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The module's bytes; `.wat` files are assembled first.
fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read module {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "wat") {
        return wat::parse_bytes(&bytes)
            .map(|b| b.into_owned())
            .map_err(|e| {
                anyhow::anyhow!("{}: {}", path.display(), e.to_string().replace('\n', " "))
            });
    }
    Ok(bytes)
}
