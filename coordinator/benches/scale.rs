//! Scale benchmark (not a test): `cargo bench -p coordinator --bench scale`.
//!
//! One real coordinator (`coordinator serve`, this package's binary, started as a child process
//! so that its memory is measured alone) and many **simulated workers** in this process: raw
//! QUIC clients speaking `peergrid/coord/1` with `tasks::net` framing and `tasks::wire`
//! messages (Hello, then RequestWork), no wasm. Each simulated worker has its own ed25519
//! identity; one client endpoint (UDP socket) carries up to [`CONNS_PER_ENDPOINT`]
//! connections. Client-side keep-alives are off (the coordinator's own keep-alives keep the
//! sessions open), so the bench process spends its CPU on handshakes and requests.
//!
//! Measured:
//! - **work-request latency** (RequestWork → Assign, p50/p99) with 1 (baseline), 1k, 10k and
//!   as many connected workers as the machine holds within the time limit (target 100,000,
//!   p99 ≤ 50 ms): requests sent open-loop at a fixed rate, each from a random session,
//!   while every other session stays connected;
//! - **memory per worker session**: coordinator RSS delta / sessions (baseline: this
//!   process's RSS delta per client connection);
//! - **memory per queued task**: coordinator RSS delta after creating 1M tiny tasks (four jobs
//!   of 250k; the frame limit caps one job upload) / 1M (baseline: the job upload's encoded
//!   bytes per task).
//!
//! Env: `PEERGRID_BENCH_SMOKE=1` (tiny sizes), `PEERGRID_BENCH_SCALE_MAX` (default 100000),
//! `PEERGRID_BENCH_SCALE_SECS` (time limit for ramping beyond 10k, default 240),
//! `PEERGRID_BENCH_SCALE_TASKS` (queued tasks, default 1000000), `PEERGRID_BENCH_SCALE_LEVELS`
//! (default `1,1000,10000`; the first level is the baseline), `PEERGRID_BENCH_SCALE_SETTLE`
//! (seconds between reaching a level and measuring it, default 2),
//! `PEERGRID_BENCH_SCALE_RUST_LOG` (the coordinator's `RUST_LOG`, default `warn`; its log is
//! copied to `PEERGRID_BENCH_SCALE_LOG` when that names a file).
//! Prints a human table and `BENCH|what|result|baseline|ratio|target|met` lines.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use quinn::crypto::rustls::QuicClientConfig;
use tokio::sync::{mpsc, oneshot};

use coordinator::client::Client;
use tasks::identity::tls::{Identity, CERT_NAME};
use tasks::job::{JobLimits, TaskEntry};
use tasks::net;
use tasks::wire::{CoordMsg, WorkerMsg, ALPN_COORD};
use tasks::{BlobId, BlobRef, EngineFingerprint, JobManifest, NodeId, NodeKey, Ticket};

/// Connections per client endpoint (one UDP socket each).
pub const CONNS_PER_ENDPOINT: usize = 1000;
/// Handshakes in flight at once while ramping up.
const CONNECT_CONCURRENCY: usize = 128;

/// One row of the results table.
#[derive(Debug, Clone)]
pub struct Row {
    pub what: String,
    pub result: f64,
    pub unit: &'static str,
    pub baseline: Option<(f64, String)>,
    pub target: String,
    pub met: Option<bool>,
}

impl Row {
    /// The machine-readable line `bench.sh` collects.
    pub fn bench_line(&self) -> String {
        let base = self
            .baseline
            .as_ref()
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| "-".into());
        let ratio = self
            .baseline
            .as_ref()
            .filter(|(b, _)| *b > 0.0)
            .map(|(b, _)| ratio_str(self.result / b))
            .unwrap_or_else(|| "-".into());
        let met = match self.met {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        format!(
            "BENCH|{}|{}|{}|{}|{}|{}",
            self.what,
            num(self.result, self.unit),
            base,
            ratio,
            self.target,
            met
        )
    }
}

fn num(v: f64, unit: &str) -> String {
    let n = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if unit.is_empty() {
        n
    } else {
        format!("{n} {unit}")
    }
}

/// Latency and memory at one number of connected workers.
#[derive(Debug, Clone)]
pub struct Level {
    /// `"1"`, `"1000"`, ... or `"max reached"`.
    pub name: String,
    pub workers: usize,
    /// Sessions whose connection was still open after the measurement.
    pub alive: usize,
    /// Requests issued (a sample is skipped when every session picked was busy).
    pub samples: usize,
    pub answered: usize,
    /// Answers that carried at least one assignment.
    pub assigned: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub coord_rss_kib: u64,
    pub client_rss_kib: u64,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub rows: Vec<Row>,
    pub levels: Vec<Level>,
    pub reached: usize,
    pub queued_tasks: u64,
    pub bytes_per_task: f64,
    pub bytes_per_session: f64,
}

struct Sizes {
    levels: Vec<usize>,
    max: usize,
    ramp_limit: Duration,
    tasks: u64,
    tasks_per_job: u64,
    samples: usize,
    rate: f64,
    /// Wait after reaching a level, before measuring its latency.
    settle: Duration,
}

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// This release's engine (what `serve` admits by default).
fn fp() -> EngineFingerprint {
    EngineFingerprint {
        engine: tasks::release::ENGINE.into(),
        arch: "x86_64-linux".into(),
        settings: tasks::release::settings(true),
    }
}

/// `VmRSS` of a process in KiB (`None`: this process).
pub fn rss_kib(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".into(),
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(u64::MAX)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Run the whole benchmark once.
pub fn run(smoke: bool) -> anyhow::Result<Report> {
    let s = if smoke {
        Sizes {
            levels: vec![1, 20],
            max: 100,
            ramp_limit: Duration::from_secs(60),
            tasks: 10_000,
            tasks_per_job: 10_000,
            samples: 100,
            rate: 200.0,
            settle: Duration::from_secs(2),
        }
    } else {
        Sizes {
            levels: std::env::var("PEERGRID_BENCH_SCALE_LEVELS")
                .ok()
                .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
                .unwrap_or_else(|| vec![1, 1_000, 10_000]),
            max: env_num("PEERGRID_BENCH_SCALE_MAX").unwrap_or(100_000) as usize,
            ramp_limit: Duration::from_secs(env_num("PEERGRID_BENCH_SCALE_SECS").unwrap_or(240)),
            tasks: env_num("PEERGRID_BENCH_SCALE_TASKS").unwrap_or(1_000_000),
            tasks_per_job: 250_000,
            samples: 3_000,
            rate: 1_000.0,
            settle: Duration::from_secs(env_num("PEERGRID_BENCH_SCALE_SETTLE").unwrap_or(2)),
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(bench(&s));
    // Sessions and endpoints are gone with the runtime; nothing lingers.
    rt.shutdown_timeout(Duration::from_secs(5));
    report
}

/// The coordinator child process, killed on drop.
struct CoordProc {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    ticket: Ticket,
    token: String,
}

impl Drop for CoordProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_coordinator() -> anyhow::Result<CoordProc> {
    let dir = tempfile::Builder::new()
        .prefix("peergrid-scale-")
        .tempdir()?;
    let data = dir.path().join("coordinator");
    let log = std::fs::File::create(dir.path().join("coordinator.log"))?;
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
        // The policy of the recorded figures: the open policy's small allowance for
        // newcomers would hand each simulated worker a couple of replicas at most.
        .args([
            "serve",
            "--policy",
            "trusting",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .env(
            "RUST_LOG",
            std::env::var("PEERGRID_BENCH_SCALE_RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting `coordinator serve`")?;
    // Placeholder ticket until the coordinator has written its own.
    let mut proc = CoordProc {
        child,
        _dir: dir,
        ticket: Ticket::new(NodeKey::generate().node_id(), "127.0.0.1:1"),
        token: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = proc.child.try_wait()? {
            let log = std::fs::read_to_string(proc._dir.path().join("coordinator.log"))
                .unwrap_or_default();
            anyhow::bail!("`coordinator serve` exited ({st}): {log}");
        }
        let ticket = std::fs::read_to_string(data.join("ticket"))
            .ok()
            .and_then(|t| t.trim().parse::<Ticket>().ok());
        let token = std::fs::read_to_string(data.join("submit-token"))
            .ok()
            .map(|t| t.trim().to_string());
        if let (Some(ticket), Some(token)) = (ticket, token) {
            if Client::connect(&ticket, &token)
                .await
                .map(|c| drop(c))
                .is_ok()
            {
                proc.ticket = ticket;
                proc.token = token;
                return Ok(proc);
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "`coordinator serve` did not come up within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One simulated worker's session, owned by its task; triggered to send one RequestWork.
type Trigger = oneshot::Sender<Option<(Duration, bool)>>;

struct Swarm {
    coord: NodeId,
    addr: std::net::SocketAddr,
    transport: Arc<quinn::TransportConfig>,
    endpoints: Vec<quinn::Endpoint>,
    sessions: Vec<mpsc::Sender<Trigger>>,
    conns: Vec<quinn::Connection>,
    failures: usize,
}

impl Swarm {
    fn new(ticket: &Ticket) -> anyhow::Result<Swarm> {
        let addr = ticket
            .socket_addrs()?
            .into_iter()
            .next()
            .context("ticket has no address")?;
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(None);
        t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(net::IDLE_TIMEOUT)?));
        Ok(Swarm {
            coord: ticket.node_id,
            addr,
            transport: Arc::new(t),
            endpoints: Vec::new(),
            sessions: Vec::new(),
            conns: Vec::new(),
            failures: 0,
        })
    }

    fn len(&self) -> usize {
        self.sessions.len()
    }

    fn alive(&self) -> usize {
        self.conns
            .iter()
            .filter(|c| c.close_reason().is_none())
            .count()
    }

    /// Connect until `target` sessions exist, `deadline` passes or failures pile up.
    async fn grow(
        &mut self,
        target: usize,
        deadline: Instant,
        progress: bool,
    ) -> anyhow::Result<()> {
        let mut inflight = tokio::task::JoinSet::new();
        let mut started = self.len();
        let mut last_print = Instant::now();
        let (mut recent_ok, mut recent_fail) = (0usize, 0usize);
        loop {
            while started < target
                && inflight.len() < CONNECT_CONCURRENCY
                && Instant::now() < deadline
            {
                if started >= self.endpoints.len() * CONNS_PER_ENDPOINT {
                    self.endpoints.push(
                        quinn::Endpoint::client("127.0.0.1:0".parse()?)
                            .context("binding a client endpoint")?,
                    );
                }
                let ep = self.endpoints.last().expect("pushed above").clone();
                let (coord, addr, transport) = (self.coord, self.addr, self.transport.clone());
                inflight.spawn(async move { connect_one(ep, addr, coord, transport).await });
                started += 1;
            }
            let Some(res) = inflight.join_next().await else {
                break;
            };
            match res? {
                Ok((conn, tx)) => {
                    self.conns.push(conn);
                    self.sessions.push(tx);
                    recent_ok += 1;
                }
                Err(e) => {
                    if self.failures < 3 {
                        println!("  connect failed: {e:#}");
                    }
                    self.failures += 1;
                    recent_fail += 1;
                    started -= 1;
                }
            }
            if recent_ok + recent_fail >= 1000 {
                if recent_fail * 10 > recent_ok + recent_fail {
                    println!(
                        "  stopping the ramp: {recent_fail} of the last {} connects failed",
                        recent_ok + recent_fail
                    );
                    inflight.shutdown().await;
                    break;
                }
                recent_ok = 0;
                recent_fail = 0;
            }
            if mem_available_kib() < 1_500_000 {
                println!("  stopping the ramp: less than 1.5 GiB of memory left");
                inflight.shutdown().await;
                break;
            }
            if progress && last_print.elapsed() >= Duration::from_secs(10) {
                last_print = Instant::now();
                println!("  ... {} workers connected", self.len());
            }
        }
        Ok(())
    }

    /// `samples` requests at `rate`/s, each from a random idle session. Returns the sorted
    /// latencies in ms, and how many requests were issued, answered, and got an assignment.
    async fn measure(&self, samples: usize, rate: f64) -> (Vec<f64>, usize, usize, usize) {
        use rand::{Rng, SeedableRng};
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut waits = Vec::with_capacity(samples);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        println!(
            "  measuring {} sessions from unix time {:.3}",
            self.sessions.len(),
            epoch.as_secs_f64()
        );
        for _ in 0..samples {
            tick.tick().await;
            for _ in 0..16 {
                let i = rng.gen_range(0..self.sessions.len());
                let (tx, rx) = oneshot::channel();
                if self.sessions[i].try_send(tx).is_ok() {
                    waits.push(rx);
                    break;
                }
            }
        }
        // A sample whose picks all found busy sessions is skipped (few sessions, high rate).
        let issued = waits.len();
        let mut lat = Vec::with_capacity(issued);
        let mut assigned = 0;
        for w in waits {
            if let Ok(Ok(Some((d, got)))) = tokio::time::timeout(Duration::from_secs(30), w).await {
                lat.push(d.as_secs_f64() * 1e3);
                assigned += got as usize;
            }
        }
        let answered = lat.len();
        lat.sort_by(|a, b| a.total_cmp(b));
        (lat, issued, answered, assigned)
    }
}

/// Handshake with a fresh identity, Hello, Welcome; then a task that serves triggers.
async fn connect_one(
    ep: quinn::Endpoint,
    addr: std::net::SocketAddr,
    coord: NodeId,
    transport: Arc<quinn::TransportConfig>,
) -> anyhow::Result<(quinn::Connection, mpsc::Sender<Trigger>)> {
    let identity = Identity::new(&NodeKey::generate())?;
    let tls = identity.client_config(coord, &[ALPN_COORD])?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    cfg.transport_config(transport);
    let conn = tokio::time::timeout(
        Duration::from_secs(30),
        ep.connect_with(cfg, addr, CERT_NAME)?,
    )
    .await
    .context("handshake timed out")??;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = WorkerMsg::Hello {
        agent: "scale-bench".into(),
        fingerprint: fp(),
        slots: 256,
        peer_addr: None,
        blobs: vec![],
    };
    net::write_frame(&mut send, &hello).await?;
    match tokio::time::timeout(
        Duration::from_secs(30),
        net::read_frame::<CoordMsg>(&mut recv),
    )
    .await
    .context("no welcome")??
    {
        Some(CoordMsg::Welcome { .. }) => {}
        other => anyhow::bail!("expected Welcome, got {other:?}"),
    }
    let (tx, mut rx) = mpsc::channel::<Trigger>(1);
    let keep = conn.clone();
    tokio::spawn(async move {
        let _conn = keep;
        while let Some(reply) = rx.recv().await {
            let t = Instant::now();
            let r: anyhow::Result<bool> = async {
                net::write_frame(&mut send, &WorkerMsg::RequestWork { max: 1 }).await?;
                loop {
                    match net::read_frame::<CoordMsg>(&mut recv).await? {
                        Some(CoordMsg::Assign { assignments, .. }) => {
                            return Ok(!assignments.is_empty())
                        }
                        Some(_) => continue,
                        None => anyhow::bail!("session closed"),
                    }
                }
            }
            .await;
            let _ = reply.send(r.ok().map(|got| (t.elapsed(), got)));
        }
    });
    Ok((conn, tx))
}

async fn bench(s: &Sizes) -> anyhow::Result<Report> {
    let coord = start_coordinator().await?;
    let pid = coord.child.id();
    println!(
        "scale benchmark: `coordinator serve` (pid {pid}) + simulated workers (raw QUIC, Hello + RequestWork) in this process; {} cores, {} requests at {}/s per level",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        s.samples,
        s.rate
    );

    // Memory per queued task.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = rss_kib(Some(pid));
    let client = Client::connect(&coord.ticket, &coord.token).await?;
    let module = b"scale bench module".to_vec();
    let blobs: BTreeMap<BlobId, Vec<u8>> = [(BlobId::of(&module), module.clone())].into();
    let mut created = 0u64;
    let mut upload_bytes = 0usize;
    let t = Instant::now();
    while created < s.tasks {
        let n = (s.tasks - created).min(s.tasks_per_job);
        let m = JobManifest {
            name: format!("scale-{created}"),
            module: BlobRef::of(&module),
            limits: JobLimits {
                quorum: 2,
                max_replicas: 4,
                ..JobLimits::default()
            },
            tasks: (created..created + n)
                .map(|i| TaskEntry {
                    args: vec![i.to_string()],
                    input: None,
                })
                .collect(),
        };
        upload_bytes += postcard::to_stdvec(&m)?.len();
        let (_, got) = client.submit_manifest(m, &blobs).await?;
        anyhow::ensure!(got as u64 == n, "job has {got} tasks, expected {n}");
        created += n;
    }
    let create_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = rss_kib(Some(pid));
    let bytes_per_task = (rss1.saturating_sub(rss0) * 1024) as f64 / created as f64;
    let upload_per_task = upload_bytes as f64 / created as f64;
    println!(
        "queued {created} tasks in {create_secs:.1} s: coordinator RSS {:.1} -> {:.1} MiB = {bytes_per_task:.0} B per queued task (upload: {upload_per_task:.1} B per task)",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0
    );
    client.close().await;

    // Sessions and latency, level by level.
    let mut swarm = Swarm::new(&coord.ticket)?;
    let client_rss0 = rss_kib(None);
    let mut levels = Vec::new();
    let mut targets: Vec<(usize, bool)> = s.levels.iter().map(|&l| (l, false)).collect();
    if s.max > *s.levels.last().unwrap_or(&0) {
        targets.push((s.max, true));
    }
    println!();
    println!(
        "{:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>13} {:>13}",
        "workers", "alive", "answered", "assigned", "p50", "p99", "coord RSS", "bench RSS"
    );
    for (target, is_max) in targets {
        let t = Instant::now();
        let deadline = if is_max {
            Instant::now() + s.ramp_limit
        } else {
            Instant::now() + Duration::from_secs(600)
        };
        swarm.grow(target, deadline, true).await?;
        if swarm.len() == 0 {
            anyhow::bail!(
                "no simulated worker could connect ({} failures)",
                swarm.failures
            );
        }
        if is_max || swarm.len() < target {
            println!(
                "  reached {} workers in {:.0} s (target {target})",
                swarm.len(),
                t.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(s.settle).await;
        let coord_rss = rss_kib(Some(pid));
        let client_rss = rss_kib(None);
        let samples = if swarm.len() == 1 {
            s.samples.min(400)
        } else {
            s.samples
        };
        let (lat, issued, answered, assigned) = swarm.measure(samples, s.rate).await;
        let level = Level {
            name: if is_max {
                "max reached".into()
            } else {
                target.to_string()
            },
            workers: swarm.len(),
            alive: swarm.alive(),
            samples: issued,
            answered,
            assigned,
            p50_ms: percentile(&lat, 0.5),
            p99_ms: percentile(&lat, 0.99),
            coord_rss_kib: coord_rss,
            client_rss_kib: client_rss,
        };
        println!(
            "{:>9} {:>9} {:>9} {:>9} {:>7.2} ms {:>7.2} ms {:>9.1} MiB {:>9.1} MiB",
            level.workers,
            level.alive,
            level.answered,
            level.assigned,
            level.p50_ms,
            level.p99_ms,
            coord_rss as f64 / 1024.0,
            client_rss as f64 / 1024.0
        );
        levels.push(level);
        if swarm.len() < target {
            break;
        }
    }
    let reached = swarm.len();
    let last = levels.last().cloned().context("no level measured")?;
    let bytes_per_session =
        (last.coord_rss_kib.saturating_sub(rss1) * 1024) as f64 / last.workers as f64;
    let client_per_session =
        (last.client_rss_kib.saturating_sub(client_rss0) * 1024) as f64 / last.workers as f64;
    println!(
        "memory per worker session: coordinator {:.1} KiB, this process (client side) {:.1} KiB ({} sessions); {} connect failures",
        bytes_per_session / 1024.0,
        client_per_session / 1024.0,
        last.workers,
        swarm.failures
    );
    let log =
        std::fs::read_to_string(coord._dir.path().join("coordinator.log")).unwrap_or_default();
    if let Ok(keep) = std::env::var("PEERGRID_BENCH_SCALE_LOG") {
        let _ = std::fs::copy(coord._dir.path().join("coordinator.log"), keep);
    }
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .count();
    if warnings > 0 {
        println!(
            "coordinator logged {warnings} warnings/errors; first: {}",
            log.lines()
                .find(|l| l.contains("WARN") || l.contains("ERROR"))
                .unwrap_or("")
        );
    }

    // Rows.
    let base = levels.first().cloned().context("no baseline level")?;
    let mut rows = Vec::new();
    for l in levels.iter().skip(1) {
        let name = &l.name;
        rows.push(Row {
            what: format!("work-request latency p50 @ {name} workers"),
            result: l.p50_ms,
            unit: "ms",
            baseline: Some((
                base.p50_ms,
                format!("{} (1 worker)", num(base.p50_ms, "ms")),
            )),
            target: "-".into(),
            met: None,
        });
        rows.push(Row {
            what: format!("work-request latency p99 @ {name} workers"),
            result: l.p99_ms,
            unit: "ms",
            baseline: Some((
                base.p99_ms,
                format!("{} (1 worker)", num(base.p99_ms, "ms")),
            )),
            target: "<= 50 ms".into(),
            met: Some(l.p99_ms <= 50.0),
        });
    }
    let goal = s.max.max(*s.levels.last().unwrap_or(&0));
    rows.push(Row {
        what: format!(
            "simulated workers connected to one coordinator (ramp limit {} s)",
            s.ramp_limit.as_secs()
        ),
        result: reached as f64,
        unit: "workers",
        baseline: None,
        target: format!(">= {goal} workers"),
        met: Some(reached >= goal),
    });
    rows.push(Row {
        what: "coordinator memory per worker session".into(),
        result: bytes_per_session / 1024.0,
        unit: "KiB",
        baseline: Some((
            client_per_session / 1024.0,
            format!(
                "{} (client side, per connection)",
                num(client_per_session / 1024.0, "KiB")
            ),
        )),
        target: "-".into(),
        met: None,
    });
    rows.push(Row {
        what: format!("coordinator memory per queued task ({created} tasks)"),
        result: bytes_per_task,
        unit: "B",
        baseline: Some((
            upload_per_task,
            format!("{} (job upload per task)", num(upload_per_task, "B")),
        )),
        target: "-".into(),
        met: None,
    });
    drop(swarm);
    drop(coord);
    Ok(Report {
        rows,
        levels,
        reached,
        queued_tasks: created,
        bytes_per_task,
        bytes_per_session,
    })
}

fn ratio_str(r: f64) -> String {
    if r >= 0.1 {
        format!("{r:.2}x")
    } else {
        format!("{r:.2e}x")
    }
}

#[allow(dead_code)]
fn main() {
    let smoke = std::env::var_os("PEERGRID_BENCH_SMOKE").is_some_and(|v| v != "0");
    let report = run(smoke).expect("scale benchmark");
    println!();
    for r in &report.rows {
        println!("{}", r.bench_line());
    }
}
