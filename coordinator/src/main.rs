//! `coordinator`: serve workers and submitters, or talk to a coordinator.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

use coordinator::cli;
use coordinator::config;
use coordinator::server::{self, ServeConfig};

/// Peergrid coordinator: publishes tasks, hands out replicas, accepts results by quorum.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
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
enum Cmd {
    /// Run a coordinator: writes DIR/ticket and DIR/submit-token on first start and prints
    /// both; restarts from the same DIR with all its state. Ctrl-C stops it gracefully.
    Serve(ServeArgs),
    /// Submit a job file; prints the job id.
    Submit(cli::SubmitArgs),
    /// Show jobs and workers.
    Status(cli::StatusArgs),
    /// Download a job's accepted outputs and results.json.
    Results(cli::ResultsArgs),
    /// List the coordinator's jobs.
    Jobs(cli::JobsArgs),
    /// Cancel a running job: nothing more is scheduled, workers stop its replicas.
    Cancel(cli::CancelArgs),
    /// Reissue a job's failed tasks (no quorum reached, or too many replicas lost).
    Retry(cli::RetryArgs),
    /// Run a coordinator and N workers in this process on loopback and a sample job end to end.
    Demo(cli::DemoArgs),
    /// Print a shell completion script, e.g. `coordinator completions bash > ~/.local/share/bash-completion/completions/coordinator`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `coordinator serve`.
#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Where the coordinator keeps its key, database, blobs, ticket and submit token.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// UDP address for QUIC (workers, submitters and blob transfers).
    #[arg(long, value_name = "ADDR", default_value = server::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Host name or IP to put in the ticket (default: the listen IP, or 127.0.0.1 when
    /// listening on all interfaces).
    #[arg(long, value_name = "HOST")]
    advertise: Option<String>,
    /// TCP address for a read-only HTTP server (default: none). `GET /` is a live dashboard
    /// of jobs, tasks and workers; `/metrics` is Prometheus text; `/status`, `/overview`,
    /// `/jobs/ID`, `/jobs/ID/tasks` and `/jobs/ID/results` are JSON; `/health` says ok.
    /// Results need the submit token (`Authorization: Bearer TOKEN`); the rest is public and
    /// shows job names, worker ids and credit: bind it to localhost (e.g. 127.0.0.1:8080) or a
    /// trusted network.
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Hand out only this coordinator as the source of every blob, so workers never fetch
    /// from each other: a baseline for measuring the peer-to-peer swarm (it multiplies the
    /// coordinator's upload by the number of workers).
    #[arg(long)]
    central_only: bool,
    /// TOML file with the scheduler and trust policy settings (`[policy]`, `[scheduler]`);
    /// every key optional. See README "Running an open pool".
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Trust policy preset (overrides the config file's `preset`). `open` (the default) is
    /// safe when anyone may join: it needs quorum + 1 workers before the first result is
    /// accepted. `trusting` is for a pool of your own machines.
    #[arg(long, value_enum, value_name = "PRESET")]
    policy: Option<config::Preset>,
    /// Where to keep the durable state (jobs, results, credit): `sqlite` (the default:
    /// DIR/coordinator.db) or a PostgreSQL server, `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`
    /// (or `postgres:///DB?host=/run/postgresql` over a Unix socket). The database must exist;
    /// the coordinator creates its tables. Overrides the config file's `store`. DIR still
    /// holds the key, ticket, submit token and blobs.
    ///
    /// Several coordinators may share one PostgreSQL database, each on its own machine and
    /// data dir: one leads, the others stand by (refusing connections) and take over within
    /// seconds when it dies. They share the submit token, and each writes a ticket listing
    /// all of them: give workers and submitters that one. See README "Standby coordinators".
    #[arg(long, value_name = "URL")]
    store: Option<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The server logs what it does; the demo prints its own progress and summary, so only
    // warnings unless RUST_LOG asks for more.
    let default_filter = match cli.cmd {
        Cmd::Demo(_) => "warn",
        _ => "info",
    };
    init_logs(cli.log_format, default_filter);
    if let Cmd::Completions { shell } = cli.cmd {
        // Into a buffer first: clap_complete panics on a write error (`| head`).
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "coordinator", &mut script);
        let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
        return std::process::ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Serve(a) => serve(a).await.map(|()| 0),
            Cmd::Submit(a) => cli::submit(a).await,
            Cmd::Status(a) => cli::status(a).await,
            Cmd::Results(a) => cli::results(a).await,
            Cmd::Jobs(a) => cli::jobs(a).await,
            Cmd::Cancel(a) => cli::cancel(a).await,
            Cmd::Retry(a) => cli::retry(a).await,
            Cmd::Demo(a) => cli::demo(a).await,
            Cmd::Completions { .. } => Ok(0), // handled above
        }
    });
    match result {
        Ok(code) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// Logs to stderr, filtered by RUST_LOG (else `default_filter`). Text is coloured only when
/// stderr is a terminal and NO_COLOR is unset or empty, so log files hold no escape codes.
fn init_logs(format: LogFormat, default_filter: &str) {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
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

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let file = match &a.config {
        Some(path) => config::ConfigFile::load(path)?,
        None => config::ConfigFile::default(),
    };
    let eff = file.effective(a.policy)?;
    let mut cfg = ServeConfig::new(a.data_dir, a.listen);
    cfg.store = file.store(a.store.as_deref())?;
    cfg.ha = eff.ha;
    cfg.advertise = a.advertise;
    cfg.http = a.http;
    cfg.core = eff.core;
    cfg.core.central_only |= a.central_only;
    tracing::info!(
        preset = eff.preset.name(),
        seed = if eff.fixed_seed { "fixed" } else { "random" },
        policy = ?cfg.core.policy,
        "trust policy"
    );
    let running = server::Coordinator::start(cfg).await?;
    println!("ticket: {}", running.ticket);
    println!("submit token: {}", running.token);
    println!(
        "(also in {} and {})",
        running.data_dir.join(server::TICKET_FILE).display(),
        running.data_dir.join(server::TOKEN_FILE).display()
    );
    if let Some(http) = running.http_addr {
        println!("status page: http://{http}/ (the dashboard; read-only, public; Prometheus metrics at /metrics, JSON at /status, /overview, /jobs/ID and /jobs/ID/tasks; /jobs/ID/results needs the submit token as Authorization: Bearer)");
    }
    if running.ticket_host_guessed {
        println!(
            "note: listening on all interfaces ({}); the ticket names 127.0.0.1. For workers on other machines restart with --advertise <this host's name or IP>.",
            running.addr
        );
    }
    server::run_until(running, async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => tracing::info!("Ctrl-C: shutting down (committing, closing connections)"),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for Ctrl-C; serving until the engine stops");
                std::future::pending::<()>().await
            }
        }
    })
    .await
}
