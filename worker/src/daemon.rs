//! `worker join`: the volunteer's daemon.
//!
//! One actor loop owns the session with the coordinator, the outbox of unacknowledged
//! results and the bookkeeping of replicas; it never blocks. Around it:
//! - a QUIC endpoint that serves blobs to peers ([`crate::swarm::BlobServer`]) and connects
//!   to the coordinator with its pinned node id;
//! - preparation tasks that fetch a task's blobs through the swarm and load its module;
//! - task slots ([`executor`]) on idle-priority threads;
//! - the idle policy ([`idle`]) and `--cpu-limit` duty cycle, applied through each task's
//!   [`RunControl`], which pauses a task without losing it;
//! - the local control socket ([`socket`]): `worker status | pause | resume` ask the loop
//!   for its state, or to hold every task and take no new work.
//!
//! The session survives coordinator restarts: tasks keep running while it is unreachable,
//! results wait in the [`outbox`] (on disk), and the loop reconnects with exponential backoff
//! and jitter, then resends them (reports are idempotent).
//!
//! Long tasks survive the worker itself: a guest that checkpoints (docs/guest-abi.md) has its
//! newest state and its assignment kept in [`checkpoints`], and a worker started again on the
//! same data dir (after a restart, `kill -9` or a power cut) resumes those replicas from their
//! newest checkpoint and lists them in `Holding`. A graceful shutdown keeps them too.

pub mod checkpoints;
pub mod executor;
pub mod idle;
pub mod outbox;
pub mod socket;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tasks::wire::{
    self, Assignment, ClassedAssignment, CoordMsg, PeerAddr, ReplicaId, Report, WorkerMsg,
};
use tasks::Determinism;
use tasks::{BlobId, NodeKey, TaskId, Ticket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::blobs::BlobStore;
use crate::priority::Priority;
use crate::sandbox::{LoadedModule, RunControl, RunSpec, Sandbox, SandboxConfig};
use crate::swarm::{BlobServer, Fetcher, ServeLimits};
use checkpoints::CheckpointDir;
use executor::{Done, Executor, Job, Module};
use outbox::{Outbox, Segment};

/// Arguments of `worker join`.
#[derive(Debug, Clone, clap::Args)]
pub struct JoinArgs {
    /// The coordinator's ticket (`peergrid1:<node-id>@<host:port>`), from its `ticket` file.
    pub ticket: String,
    /// Where the worker keeps its identity, blobs, compile cache and unsent results.
    #[arg(long, default_value = "peergrid-worker")]
    pub data_dir: PathBuf,
    /// Tasks to run at once (default: the cores this process may use).
    #[arg(long)]
    pub slots: Option<usize>,
    /// Address for serving blobs to peers (default: an ephemeral port on all interfaces).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Only compute while the machine is otherwise idle; pause tasks when it is busy.
    #[arg(long)]
    pub idle_only: bool,
    /// Scheduling priority of tasks and compilation: `idle` only uses CPU time nobody else
    /// wants; `normal` is for machines dedicated to the grid, where other load must not
    /// starve the tasks.
    #[arg(long, value_enum, default_value_t = Priority::Idle)]
    pub priority: Priority,
    /// Use at most this percentage of each slot's CPU time (duty-cycle throttling).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub cpu_limit: Option<u8>,
    /// Most disk space for cached blobs, in MiB (least recently used are evicted).
    #[arg(long, default_value_t = 4096)]
    pub disk_limit_mb: u64,
}

/// Everything a worker needs; `worker join` builds it from [`JoinArgs`], the demo and tests
/// build it directly.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub ticket: Ticket,
    pub data_dir: PathBuf,
    pub slots: usize,
    pub listen: SocketAddr,
    pub idle_only: bool,
    pub priority: Priority,
    pub cpu_limit: Option<u8>,
    pub disk_limit_bytes: Option<u64>,
}

impl WorkerConfig {
    pub fn new(ticket: Ticket, data_dir: PathBuf) -> WorkerConfig {
        WorkerConfig {
            ticket,
            data_dir,
            slots: default_slots(),
            listen: "0.0.0.0:0".parse().expect("valid"),
            idle_only: false,
            priority: Priority::Idle,
            cpu_limit: None,
            disk_limit_bytes: Some(4 << 30),
        }
    }
}

/// The cores this process may use.
pub fn default_slots() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Counters a running worker exposes (for the demo's summary and for tests).
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub completed: AtomicU64,
    pub reported: AtomicU64,
    pub acked: AtomicU64,
    /// Blob bytes received from the coordinator vs from other workers.
    pub bytes_from_coordinator: AtomicU64,
    pub bytes_from_peers: AtomicU64,
    /// Sum and count of assignment-to-guest-start latencies, in microseconds.
    pub start_latency_us_sum: AtomicU64,
    pub start_latency_count: AtomicU64,
    /// The same latencies as a histogram: bucket `i` counts latencies in `[2^i, 2^(i+1))` µs
    /// (bucket 0 also holds 0 µs).
    pub start_latency_hist: [AtomicU64; LATENCY_BUCKETS],
}

/// Buckets of [`WorkerStats::start_latency_hist`] (the last one holds everything ≥ 2^31 µs).
pub const LATENCY_BUCKETS: usize = 32;

impl WorkerStats {
    fn record_start_latency(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        self.start_latency_us_sum.fetch_add(us, Ordering::Relaxed);
        self.start_latency_count.fetch_add(1, Ordering::Relaxed);
        let bucket = (63 - us.max(1).leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.start_latency_hist[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The `q`-quantile (0..=1) of start latencies, as the upper bound of its histogram
    /// bucket in microseconds; `None` before any task started.
    pub fn start_latency_quantile_us(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .start_latency_hist
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64 * q.clamp(0.0, 1.0)).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(1u64 << (i + 1));
            }
        }
        None
    }
}

/// `worker join`: run until Ctrl-C.
pub async fn join(args: JoinArgs) -> anyhow::Result<()> {
    let ticket: Ticket = args.ticket.parse()?;
    let mut cfg = WorkerConfig::new(ticket, args.data_dir);
    if let Some(s) = args.slots {
        anyhow::ensure!(s > 0, "--slots must be at least 1");
        cfg.slots = s;
    }
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    cfg.idle_only = args.idle_only;
    cfg.priority = args.priority;
    cfg.cpu_limit = args.cpu_limit;
    cfg.disk_limit_bytes = Some(args.disk_limit_mb << 20);
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("worker: Ctrl-C: abandoning unfinished tasks and reporting finished ones (Ctrl-C again to quit at once)");
            on_signal.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    run(cfg, Arc::new(WorkerStats::default()), shutdown).await
}

/// Run a worker until `shutdown` is cancelled, then stop taking work, abandon what has not
/// finished (so the coordinator reissues it at once) and flush the outbox.
pub async fn run(
    cfg: WorkerConfig,
    stats: Arc<WorkerStats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    // First, so a second worker on this data dir stops here, before touching anything in it.
    let control = match socket::Listener::bind(&cfg.data_dir) {
        Ok(l) => Some(l),
        Err(e @ socket::ControlError::AlreadyRunning { .. }) => return Err(e.into()),
        Err(e) => {
            tracing::warn!("{e}; `worker status | pause | resume` cannot reach this worker");
            None
        }
    };
    let key = NodeKey::load_or_create(&cfg.data_dir)?;
    // One engine per determinism class (`tasks::Determinism`): the hello names the portable
    // one, `WorkerMsg::Engines` the native one. Their compile caches are apart (keyed by
    // fingerprint).
    let engine = |class: Determinism| {
        Sandbox::new(SandboxConfig {
            cache_dir: Some(cfg.data_dir.join("cache")),
            priority: cfg.priority,
            deterministic: class.nan_canonicalization(),
            // Each slot runs one task at a time, so a pool of `slots` runs is never short.
            pooled_runs: cfg.slots,
            ..SandboxConfig::default()
        })
        .with_context(|| format!("starting the sandbox of the {class} class"))
    };
    let sandbox = engine(Determinism::Portable)?;
    let native = engine(Determinism::Native)?;
    let store = BlobStore::open(&cfg.data_dir.join("blobs"), cfg.disk_limit_bytes)
        .context("opening the blob store")?;
    let outbox = Outbox::open(&cfg.data_dir.join("outbox")).context("opening the outbox")?;
    let checkpoints = CheckpointDir::open(&cfg.data_dir.join("checkpoints"))
        .context("opening the checkpoint directory")?;
    // Replicas with a checkpoint that a previous run of this worker held (restart, kill -9,
    // power cut): resumed from their newest checkpoint before the session says what we hold.
    let resume = checkpoints.held();
    for a in &resume {
        tracing::info!(replica = a.assignment.replica, task = %a.assignment.task.id, class = %a.determinism, "resuming a replica held before the restart");
    }
    let endpoint = tasks::net::endpoint(&key, cfg.listen, &[wire::ALPN_BLOB])
        .with_context(|| format!("binding {}", cfg.listen))?;
    let server = BlobServer::new(store.clone(), ServeLimits::default());
    let fetcher = Fetcher::new(endpoint.clone(), store.clone(), Some(server.clone()));
    tracing::info!(node = %key.node_id(), coordinator = %cfg.ticket, slots = cfg.slots, addr = %endpoint.local_addr()?, fingerprint = %sandbox.fingerprint(), "worker starting");

    let (punch_tx, punch_rx) = mpsc::channel(PUNCH_QUEUE);
    fetcher.set_rendezvous(punch_tx);
    let conns = CancellationToken::new();
    let accept = tokio::spawn(accept_peers(
        endpoint.clone(),
        server.clone(),
        fetcher.clone(),
        conns.clone(),
    ));
    let (ctl_tx, ctl_rx) = mpsc::channel(8);
    let ctl = control.map(|control| {
        tracing::debug!(socket = %control.path().display(), "control socket listening");
        tokio::spawn(control.serve(ctl_tx, conns.clone()))
    });
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let executor = Executor::start(cfg.slots, cfg.priority, done_tx);
    let (copy_tx, copy_rx) = mpsc::unbounded_channel();
    let copier = tokio::spawn(copy_outputs(store.clone(), copy_rx));
    // Sessions to a deployment with standby coordinators notice a dead leader within seconds.
    let failover = tasks::net::failover_client_config(&key)?;
    let mut daemon = Daemon {
        cfg,
        endpoint: endpoint.clone(),
        failover,
        sandbox,
        native,
        store,
        server,
        fetcher,
        outbox,
        checkpoints,
        resume,
        executor,
        stats,
        modules: HashMap::new(),
        controls: HashMap::new(),
        preparing: 0,
        queued: VecDeque::new(),
        session: None,
        request_outstanding: false,
        next_request: Instant::now(),
        paused: false,
        idle_busy: false,
        held_by_command: false,
        in_hand: HashMap::new(),
        progress_of: HashMap::new(),
        last_progress: Instant::now(),
        observed_addr: None,
        since: Instant::now(),
        node_id: key.node_id(),
        unsaved: Vec::new(),
        stderr_tails: HashMap::new(),
        saving: 0,
        saving_replicas: Vec::new(),
        task_secs: None,
        sync_budget: outbox::SyncBudget::default(),
        copy_tx,
    };
    // `worker pause` outlives a restart (a reboot included) until `worker resume`.
    if daemon.cfg.data_dir.join(PAUSED_FILE).exists() {
        tracing::info!("paused by `worker pause` before this start: tasks are held and no new work is taken until `worker resume`");
        daemon.held_by_command = true;
        daemon.apply_pause();
    }
    let result = daemon.run(done_rx, punch_rx, ctl_rx, shutdown).await;
    conns.cancel();
    accept.abort();
    // The listener ends with `conns`; dropping it removes the socket file.
    if let Some(ctl) = ctl {
        let _ = ctl.await;
    }
    endpoint.close(
        wire::CloseCode::Shutdown.code().into(),
        b"worker shutting down",
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    drop(daemon);
    // The output copies still queued are written before the worker stops.
    let _ = copier.await;
    result
}

/// Copies of small outputs kept at most this many per blocking task (then the next task).
const COPIES_PER_BATCH: usize = 256;

/// Writes the copies of small outputs ([`Daemon::on_done`]) into the blob store, one batch at
/// a time on one blocking thread, until the daemon drops its sender. One writer, not a
/// blocking task per output: concurrent file creations in the one blob directory contended
/// for its lock, and each woke a thread of the blocking pool. A batch is one append to the
/// store's current pack ([`BlobStore::put_small_batch_unsynced`]): a file per output was half
/// of the worker's time on tiny tasks (ext4 allocating inodes). Not fsynced: these copies
/// only back up outputs the coordinator already received inline, and a crash of the machine
/// that loses them would also have to lose the coordinator's copy to matter.
async fn copy_outputs(store: BlobStore, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < COPIES_PER_BATCH {
            match rx.try_recv() {
                Ok(b) => batch.push(b),
                Err(_) => break,
            }
        }
        let store = store.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = store.put_small_batch_unsynced(&batch) {
                tracing::warn!(
                    outputs = batch.len(),
                    "cannot keep a copy of small outputs ({e}): a coordinator that lost them cannot fetch them from this worker (check the data dir's disk)"
                );
            }
        })
        .await;
    }
}

/// Punch requests waiting for the session (more are dropped: the dial goes ahead anyway).
const PUNCH_QUEUE: usize = 64;

async fn accept_peers(
    endpoint: quinn::Endpoint,
    server: BlobServer,
    fetcher: Fetcher,
    cancel: CancellationToken,
) {
    while let Some(incoming) = endpoint.accept().await {
        let server = server.clone();
        let fetcher = fetcher.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("peer handshake failed: {e}");
                    return;
                }
            };
            // Blob connections serve both ways: a peer that dialled us (perhaps punching
            // through its NAT) can be asked for chunks on the same connection.
            if let Some(node) = tasks::net::remote_node_id(&conn) {
                fetcher.adopt(node, conn.clone());
            }
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = server.serve_connection(conn) => {}
            }
        });
    }
}

/// A live session with the coordinator.
struct Session {
    send: quinn::SendStream,
    inbox: mpsc::Receiver<anyhow::Result<CoordMsg>>,
    conn: quinn::Connection,
    coordinator: PeerAddr,
    /// Where the coordinator sees us (our NAT's public address, if any).
    observed_addr: std::net::SocketAddr,
    /// The coordinator takes [`WorkerMsg::Stderr`] (its capability [`wire::CAP_STDERR`]).
    takes_stderr: bool,
    /// The coordinator takes [`WorkerMsg::Holding`] (its capability [`wire::CAP_HOLDING`]).
    takes_holding: bool,
    /// The coordinator takes [`WorkerMsg::Progress`] (its capability [`wire::CAP_PROGRESS`]).
    takes_progress: bool,
    /// The coordinator runs both determinism classes (its capability [`wire::CAP_CLASSES`]):
    /// it is told of the native engine ([`WorkerMsg::Engines`]).
    takes_classes: bool,
}

/// A task's blobs fetched and its module loaded, ready for a slot.
struct Prepared {
    assignment: Assignment,
    /// The engine it runs on.
    determinism: Determinism,
    received: Instant,
    result: anyhow::Result<(Module, Vec<u8>)>,
    from_coordinator: u64,
    from_peers: u64,
    bad_peers: Vec<tasks::NodeId>,
}

struct Daemon {
    cfg: WorkerConfig,
    endpoint: quinn::Endpoint,
    /// Client config for sessions when the ticket lists several coordinators.
    failover: quinn::ClientConfig,
    /// The `portable` class's engine (NaN canonicalization): the one the hello names.
    sandbox: Sandbox,
    /// The `native` class's engine.
    native: Sandbox,
    store: BlobStore,
    /// Also answers the coordinator's blob requests on the session connection.
    server: BlobServer,
    fetcher: Fetcher,
    outbox: Outbox,
    /// Guest checkpoints and the replicas that have one (`checkpoints::CheckpointDir`).
    checkpoints: CheckpointDir,
    /// Replicas held before a restart, started first thing in `run`.
    resume: Vec<ClassedAssignment>,
    executor: Executor,
    stats: Arc<WorkerStats>,
    /// Loaded modules by blob id and class (the warm path: no disk, no compile).
    modules: HashMap<(BlobId, Determinism), LoadedModule>,
    /// Replicas being prepared, queued or running, with their pause/cancel handles.
    controls: HashMap<ReplicaId, RunControl>,
    preparing: usize,
    queued: VecDeque<ReplicaId>,
    session: Option<Session>,
    request_outstanding: bool,
    next_request: Instant,
    /// Tasks are held and no work is asked for: `idle_busy || held_by_command`.
    paused: bool,
    /// `--idle-only` found the machine busy.
    idle_busy: bool,
    /// `worker pause` (until `worker resume`).
    held_by_command: bool,
    /// Where each replica's guest reports its progress, its deadline (seconds) and the
    /// fraction last sent to the coordinator (entries of ended replicas are pruned when
    /// progress is next sent).
    progress_of: HashMap<ReplicaId, (Arc<checkpoints::FileCheckpoint>, u64, Option<f64>)>,
    last_progress: Instant,
    /// The task and arrival time of every replica in `controls` (for `worker status`).
    in_hand: HashMap<ReplicaId, (TaskId, Instant)>,
    /// Where the coordinator sees us, while connected.
    observed_addr: Option<SocketAddr>,
    since: Instant,
    node_id: tasks::NodeId,
    /// Finished results not yet durable in the outbox (the next group commit).
    unsaved: Vec<Report>,
    /// The stderr tail of reported replicas whose status is not `ok`, sent after their
    /// report and kept until it is acknowledged (one entry per unacknowledged report at
    /// most; not kept across restarts).
    stderr_tails: HashMap<ReplicaId, Vec<u8>>,
    /// Reports in the group commit being written on a blocking thread (0: none)...
    saving: usize,
    /// ...and their replicas.
    saving_replicas: Vec<ReplicaId>,
    /// Small outputs to keep a copy of in the blob store ([`copy_outputs`]).
    copy_tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Moving average of task wall time, which sizes how much work to keep in hand.
    task_secs: Option<f64>,
    /// Which outbox batches are fsynced.
    sync_budget: outbox::SyncBudget,
}

/// How much work in hand per slot: enough to cover this long of recent task times, so tiny
/// tasks do not wait for a round trip to the coordinator...
const PREFETCH_COVER: Duration = Duration::from_millis(250);
/// ...within these bounds per slot.
const PREFETCH_PER_SLOT: (usize, usize) = (2, 128);
/// A `Reports` frame is cut at about this many bytes of inline output (frames max 8 MiB).
const REPORTS_FRAME_BYTES: u64 = 2 << 20;

/// In the data dir while `worker pause` holds the worker: the next start is paused too.
const PAUSED_FILE: &str = "paused";

/// Exponential backoff with jitter, 250 ms doubling to 30 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: Duration::from_millis(250),
        }
    }
    fn reset(&mut self) {
        self.next = Duration::from_millis(250);
    }
    fn step(&mut self) -> Duration {
        use rand::Rng;
        let base = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(30));
        base.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
    }
}

impl Daemon {
    fn in_hand(&self) -> usize {
        self.controls.len()
    }

    /// Replicas to keep in hand: two per slot, more when recent tasks were short.
    fn hand_target(&self) -> usize {
        let (lo, hi) = PREFETCH_PER_SLOT;
        let per_slot = match self.task_secs {
            Some(t) if t > 0.0 => {
                ((PREFETCH_COVER.as_secs_f64() / t).ceil() as usize).clamp(lo, hi)
            }
            Some(_) => hi,
            None => lo,
        };
        self.cfg.slots * per_slot
    }

    async fn run(
        &mut self,
        mut done_rx: mpsc::UnboundedReceiver<Done>,
        mut punch_rx: mpsc::Receiver<tasks::NodeId>,
        mut ctl_rx: mpsc::Receiver<socket::Call>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let (prep_tx, mut prep_rx) = mpsc::unbounded_channel::<Prepared>();
        let (saved_tx, mut saved_rx) = mpsc::unbounded_channel::<(Segment, std::io::Result<()>)>();
        let (conn_tx, mut conn_rx) = mpsc::channel::<anyhow::Result<Session>>(1);
        let mut connecting = false;
        let mut next_connect = tokio::time::Instant::now();
        let mut backoff = Backoff::new();
        let mut shutting_down: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut idle = idle::IdlePolicy::default();
        let mut last_idle_sample = Instant::now();
        let mut last_status = Instant::now();
        let mut last_error: Option<String> = None;
        for a in std::mem::take(&mut self.resume) {
            self.start_preparing(a, prep_tx.clone());
        }

        loop {
            let want_connect = self.session.is_none()
                && !connecting
                && (shutting_down.is_none() || !self.outbox.is_empty());
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if shutting_down.is_none() => {
                    shutting_down = Some(tokio::time::Instant::now() + Duration::from_secs(10));
                    self.abandon_all().await;
                }
                Some(prep) = prep_rx.recv() => self.on_prepared(prep).await,
                Some(done) = done_rx.recv() => {
                    self.on_done(done).await;
                    // Everything else that finished meanwhile goes into the same commit.
                    while let Ok(done) = done_rx.try_recv() {
                        self.on_done(done).await;
                    }
                }
                Some((seg, res)) = saved_rx.recv() => self.on_saved(seg, res).await,
                Some((req, reply)) = ctl_rx.recv() => {
                    match req {
                        socket::Request::Status => {}
                        socket::Request::Pause => {
                            if !self.held_by_command {
                                tracing::info!("paused by `worker pause`: tasks are held where they are and no new work is taken until `worker resume`, also across restarts (the coordinator is told, for tasks that report progress)");
                            }
                            if let Err(e) = tasks::identity::write_private(&self.cfg.data_dir.join(PAUSED_FILE), b"paused by `worker pause`\n") {
                                tracing::warn!("cannot record the pause in the data dir ({e}); a restart resumes work");
                            }
                            self.held_by_command = true;
                            self.apply_pause();
                        }
                        socket::Request::Resume => {
                            if self.held_by_command {
                                tracing::info!("resumed by `worker resume`");
                            }
                            match std::fs::remove_file(self.cfg.data_dir.join(PAUSED_FILE)) {
                                Err(e) if e.kind() != std::io::ErrorKind::NotFound => tracing::warn!("cannot remove the pause mark from the data dir ({e}); the next start would be paused"),
                                _ => {}
                            }
                            self.held_by_command = false;
                            self.apply_pause();
                        }
                    }
                    let _ = reply.send(self.state());
                }
                Some(peer) = punch_rx.recv() => {
                    if self.session.as_ref().is_some_and(|s| s.coordinator.node_id != peer) {
                        self.send(&WorkerMsg::Punch { peer }).await;
                    }
                }
                msg = next_msg(&mut self.session) => match msg {
                    Some(Ok(msg)) => self.on_msg(msg, &prep_tx).await,
                    Some(Err(e)) => {
                        tracing::warn!("lost the coordinator: {e:#}; tasks keep running, results wait in the outbox");
                        self.drop_session();
                        next_connect = tokio::time::Instant::now() + backoff.step();
                    }
                    None => {
                        tracing::warn!("coordinator closed the session; reconnecting");
                        self.drop_session();
                        next_connect = tokio::time::Instant::now() + backoff.step();
                    }
                },
                Some(res) = conn_rx.recv() => {
                    connecting = false;
                    match res {
                        Ok(session) => {
                            backoff.reset();
                            last_error = None;
                            tracing::info!(coordinator = %session.coordinator.addr, observed_addr = %session.observed_addr, "connected to coordinator");
                            self.observed_addr = Some(session.observed_addr);
                            self.session = Some(session);
                            self.request_outstanding = false;
                            self.next_request = Instant::now();
                            self.send_holding().await;
                            self.send_engines().await;
                            // A new session: the coordinator may have restarted and
                            // forgotten progress; say it again.
                            for entry in self.progress_of.values_mut() {
                                entry.2 = None;
                            }
                            self.resend_outbox().await;
                        }
                        Err(e) => {
                            let d = backoff.step();
                            let text = format!("{e:#}");
                            if last_error.as_deref() != Some(&text) {
                                tracing::warn!("cannot reach the coordinator: {text}; retrying with backoff");
                            } else {
                                tracing::debug!("still cannot reach the coordinator; retrying in {d:?}");
                            }
                            last_error = Some(text);
                            next_connect = tokio::time::Instant::now() + d;
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_connect), if want_connect => {
                    connecting = true;
                    let tx = conn_tx.clone();
                    let hello = self.hello();
                    let (endpoint, ticket) = (self.endpoint.clone(), self.cfg.ticket.clone());
                    let (server, failover) = (self.server.clone(), self.failover.clone());
                    tokio::spawn(async move {
                        let _ = tx.send(open_session(endpoint, failover, ticket, hello, server).await).await;
                    });
                }
                _ = tick.tick() => {
                    if let Some(deadline) = shutting_down {
                        let flushed = self.outbox.is_empty() && self.in_hand() == 0 && self.unsaved.is_empty() && self.saving == 0;
                        if flushed || tokio::time::Instant::now() >= deadline {
                            if !self.outbox.is_empty() {
                                tracing::warn!("{} results not yet acknowledged; they stay in the outbox and are sent on the next start", self.outbox.len());
                            }
                            if let Some(mut s) = self.session.take() {
                                let _ = s.send.finish();
                                s.conn.close(wire::CloseCode::Done.code().into(), b"worker leaving");
                            }
                            return Ok(());
                        }
                        continue;
                    }
                    if self.cfg.idle_only && last_idle_sample.elapsed() >= idle::SAMPLE_EVERY {
                        last_idle_sample = Instant::now();
                        let busy = idle.sample();
                        if busy != self.idle_busy {
                            self.idle_busy = busy;
                            if busy {
                                tracing::info!("paused: the machine is busy (other processes use {:.0}% of the CPUs); tasks resume when it is idle", idle.others * 100.0);
                            } else {
                                tracing::info!("the machine is idle again");
                            }
                            self.apply_pause();
                        }
                    }
                    self.send_progress().await;
                    self.abandon_overdue().await;
                    if last_status.elapsed() >= Duration::from_secs(10) {
                        last_status = Instant::now();
                        tracing::info!(
                            "status: {} tasks in hand ({} queued), {} done, {} unacknowledged, {}{}",
                            self.in_hand(), self.queued.len(),
                            self.stats.completed.load(Ordering::Relaxed), self.outbox.len(),
                            if self.session.is_some() { "connected" } else { "disconnected" },
                            match (self.held_by_command, self.idle_busy) {
                                (true, _) => ", paused (worker pause)",
                                (false, true) => ", paused (machine busy)",
                                (false, false) => "",
                            },
                        );
                    }
                }
            }
            self.start_saving(&saved_tx);
            if shutting_down.is_none() {
                self.maybe_request_work().await;
            }
        }
    }

    fn hello(&self) -> WorkerMsg {
        WorkerMsg::Hello {
            agent: format!("peergrid-worker/{}", env!("CARGO_PKG_VERSION")),
            fingerprint: self.sandbox.fingerprint().clone(),
            slots: self.cfg.slots as u32,
            peer_addr: self.endpoint.local_addr().ok(),
            // The coordinator takes this many at most: a longer list is only a larger frame
            // (and one over `MAX_FRAME` could never be sent).
            blobs: self
                .store
                .list_to_announce(tasks::limits::MAX_HAVE_BLOBS_PER_MSG),
        }
    }

    /// Right after `Welcome`, before anything else: every replica this worker still has, so
    /// the coordinator takes back at once any it counts here that never arrived (an
    /// `Assign` lost when it or the connection died) instead of waiting for their deadline.
    async fn send_holding(&mut self) {
        if !self.session.as_ref().is_some_and(|s| s.takes_holding) {
            return;
        }
        let mut replicas: Vec<ReplicaId> = self.controls.keys().copied().collect();
        replicas.extend(self.unsaved.iter().map(|r| r.replica));
        replicas.extend(self.saving_replicas.iter().copied());
        replicas.extend(self.outbox.pending().map(|r| r.replica));
        replicas.sort_unstable();
        replicas.dedup();
        if replicas.len() > tasks::limits::MAX_HOLDING_PER_MSG {
            tracing::debug!(
                "{} replicas in hand: too many to list; the coordinator waits for deadlines",
                replicas.len()
            );
            return;
        }
        self.send(&WorkerMsg::Holding { replicas }).await;
    }

    /// After `Holding`: the native engine, to a coordinator that runs both classes.
    async fn send_engines(&mut self) {
        if !self.session.as_ref().is_some_and(|s| s.takes_classes) {
            return;
        }
        let native = self.native.fingerprint().clone();
        self.send(&WorkerMsg::Engines { native }).await;
    }

    /// The engine of a determinism class.
    fn sandbox_for(&self, class: Determinism) -> &Sandbox {
        match class {
            Determinism::Portable => &self.sandbox,
            Determinism::Native => &self.native,
        }
    }

    /// Every few seconds (a third of the shortest deadline in hand, 1 to 10 s): the
    /// progress of replicas whose guests report it, when it advanced, and of every such
    /// replica while paused, so the coordinator does not reissue work that is being done
    /// (or is held by a pause) for being slow.
    async fn send_progress(&mut self) {
        self.progress_of
            .retain(|r, _| self.controls.contains_key(r));
        if !self.session.as_ref().is_some_and(|s| s.takes_progress) {
            return;
        }
        let every = self
            .progress_of
            .values()
            .map(|(_, deadline, _)| Duration::from_secs(*deadline) / 3)
            .min()
            .unwrap_or(Duration::from_secs(10))
            .clamp(Duration::from_secs(1), Duration::from_secs(10));
        if self.last_progress.elapsed() < every {
            return;
        }
        self.last_progress = Instant::now();
        let paused = self.paused;
        let mut updates = Vec::new();
        for (replica, (store, _, sent)) in &mut self.progress_of {
            let Some(fraction) = store.progress() else {
                continue;
            };
            if paused || *sent != Some(fraction) {
                *sent = Some(fraction);
                updates.push(wire::ProgressUpdate {
                    replica: *replica,
                    fraction,
                    paused,
                });
            }
        }
        if updates.is_empty() {
            return;
        }
        updates.sort_by_key(|u| u.replica);
        updates.truncate(tasks::limits::MAX_PROGRESS_PER_MSG);
        self.send(&WorkerMsg::Progress { updates }).await;
    }

    fn drop_session(&mut self) {
        self.session = None;
        self.observed_addr = None;
        self.request_outstanding = false;
    }

    /// Hold or release every task after `idle_busy` or `held_by_command` changed.
    fn apply_pause(&mut self) {
        let paused = self.idle_busy || self.held_by_command;
        if paused == self.paused {
            return;
        }
        self.paused = paused;
        if !paused {
            tracing::info!("resumed: tasks run and new work is taken");
            self.next_request = Instant::now();
        }
        for c in self.controls.values() {
            if paused {
                c.pause()
            } else {
                c.resume()
            }
        }
    }

    /// What `worker status` shows.
    fn state(&self) -> socket::WorkerState {
        let now = Instant::now();
        let mut tasks: Vec<socket::TaskInfo> = self
            .controls
            .iter()
            .map(|(replica, control)| {
                let (task, received) = self
                    .in_hand
                    .get(replica)
                    .map(|(t, at)| (t.to_string(), *at))
                    .unwrap_or_else(|| (String::from("?"), now));
                let started = control.started();
                let state = if started.is_some() {
                    "running"
                } else if self.queued.contains(replica) {
                    "queued"
                } else {
                    "preparing"
                };
                socket::TaskInfo {
                    replica: *replica,
                    task,
                    state: state.into(),
                    in_hand_secs: now.duration_since(received).as_secs_f64(),
                    running_secs: started.map(|s| now.duration_since(s).as_secs_f64()),
                    ticks: control.ticks(),
                    held: control.held() > 0,
                }
            })
            .collect();
        tasks.sort_by_key(|t| t.replica);
        let mut pause_reasons = Vec::new();
        if self.held_by_command {
            pause_reasons.push(socket::PauseReason::Command);
        }
        if self.idle_busy {
            pause_reasons.push(socket::PauseReason::IdlePolicy);
        }
        socket::WorkerState {
            node_id: self.node_id.to_string(),
            data_dir: self.cfg.data_dir.display().to_string(),
            coordinator: self.cfg.ticket.addr.clone(),
            connected: self.session.is_some(),
            observed_addr: self.observed_addr.map(|a| a.to_string()),
            slots: self.cfg.slots,
            priority: format!("{:?}", self.cfg.priority).to_lowercase(),
            cpu_limit: self.cfg.cpu_limit,
            paused: self.paused,
            pause_reasons,
            tasks,
            completed: self.stats.completed.load(Ordering::Relaxed),
            reported: self.stats.reported.load(Ordering::Relaxed),
            acknowledged: self.stats.acked.load(Ordering::Relaxed),
            unacknowledged: self.outbox.len() as u64,
            credit: None,
            uptime_secs: self.since.elapsed().as_secs_f64(),
        }
    }

    async fn send(&mut self, msg: &WorkerMsg) {
        if let Some(s) = &mut self.session {
            if let Err(e) = tasks::net::write_frame(&mut s.send, msg).await {
                tracing::warn!("sending to the coordinator failed: {e}; reconnecting");
                s.conn
                    .close(wire::CloseCode::Done.code().into(), b"send failed");
                // The reader notices the closed connection and ends the session.
            }
        }
    }

    async fn maybe_request_work(&mut self) {
        if self.session.is_none()
            || self.request_outstanding
            || self.paused
            || Instant::now() < self.next_request
        {
            return;
        }
        let target = self.hand_target();
        // As the coordinator counts: a replica is in flight until its report is committed
        // there, so finished results not yet acknowledged still take a place in the hand.
        // Asking beyond that only earns an empty answer and a wait.
        let have = self.in_hand() + self.unsaved.len() + self.saving + self.outbox.len();
        // Top up in batches, not one replica per finished task.
        if have >= target || (have > 0 && target - have < (target / 4).max(1)) {
            return;
        }
        self.request_outstanding = true;
        self.send(&WorkerMsg::RequestWork {
            max: (target - have) as u32,
        })
        .await;
    }

    async fn resend_outbox(&mut self) {
        let reports: Vec<Report> = self.outbox.pending().cloned().collect();
        if reports.is_empty() {
            return;
        }
        tracing::info!("sending {} results saved while disconnected", reports.len());
        self.send_reports(reports).await;
    }

    /// Send reports in `Reports` frames of bounded size.
    async fn send_reports(&mut self, reports: Vec<Report>) {
        let mut batch: Vec<Report> = Vec::new();
        let mut bytes = 0;
        for r in reports {
            let size = r.output.as_ref().map_or(0, |o| o.len() as u64) + 256;
            if !batch.is_empty() && bytes + size > REPORTS_FRAME_BYTES {
                let ids: Vec<ReplicaId> = batch.iter().map(|b| b.replica).collect();
                self.send(&WorkerMsg::Reports(std::mem::take(&mut batch)))
                    .await;
                self.send_stderr(&ids).await;
                bytes = 0;
            }
            bytes += size;
            batch.push(r);
        }
        if !batch.is_empty() {
            let ids: Vec<ReplicaId> = batch.iter().map(|b| b.replica).collect();
            self.send(&WorkerMsg::Reports(batch)).await;
            self.send_stderr(&ids).await;
        }
    }

    /// After their reports: the stderr tails of those that did not end `ok`, to a
    /// coordinator that takes them.
    async fn send_stderr(&mut self, sent: &[ReplicaId]) {
        if !self.session.as_ref().is_some_and(|s| s.takes_stderr) {
            return;
        }
        for &replica in sent {
            if let Some(stderr) = self.stderr_tails.get(&replica).cloned() {
                self.send(&WorkerMsg::Stderr { replica, stderr }).await;
            }
        }
    }

    /// Group commit: write every finished, unsaved result as one outbox segment on a
    /// blocking thread; they are sent when it is durable ([`Daemon::on_saved`]).
    fn start_saving(&mut self, saved_tx: &mpsc::UnboundedSender<(Segment, std::io::Result<()>)>) {
        if self.saving > 0 || self.unsaved.is_empty() {
            return;
        }
        self.saving = self.unsaved.len();
        self.saving_replicas = self.unsaved.iter().map(|r| r.replica).collect();
        let mut seg = self.outbox.segment(std::mem::take(&mut self.unsaved));
        let checkpointed = self
            .checkpoints
            .any_has_files(seg.reports.iter().map(|r| r.replica));
        seg.sync = self.sync_budget.sync_batch(&seg.reports, checkpointed);
        let tx = saved_tx.clone();
        tokio::task::spawn_blocking(move || {
            let res = seg.persist();
            let _ = tx.send((seg, res));
        });
    }

    async fn on_saved(&mut self, seg: Segment, res: std::io::Result<()>) {
        self.saving = 0;
        self.saving_replicas.clear();
        if let Err(e) = res {
            tracing::error!("cannot save {} results to the outbox ({e}); sending them anyway, but they are lost if this worker dies before the coordinator acknowledges them", seg.reports.len());
        }
        let reports = seg.reports.clone();
        // The results are in the outbox now (or will never be): their checkpoints are done.
        for r in &reports {
            self.checkpoints.release(r.replica);
        }
        self.outbox.adopt(seg);
        self.stats
            .reported
            .fetch_add(reports.len() as u64, Ordering::Relaxed);
        self.send_reports(reports).await;
    }

    async fn on_msg(&mut self, msg: CoordMsg, prep_tx: &mpsc::UnboundedSender<Prepared>) {
        match msg {
            CoordMsg::Welcome { .. } => {}
            CoordMsg::Assign {
                assignments,
                retry_after_ms,
            } => {
                self.request_outstanding = false;
                if assignments.is_empty() {
                    self.next_request =
                        Instant::now() + Duration::from_millis(retry_after_ms.clamp(50, 30_000));
                }
                for assignment in assignments {
                    let a = ClassedAssignment {
                        assignment,
                        determinism: Determinism::Portable,
                    };
                    self.start_preparing(a, prep_tx.clone());
                }
            }
            CoordMsg::AssignClass {
                assignments,
                retry_after_ms,
            } => {
                self.request_outstanding = false;
                if assignments.is_empty() {
                    self.next_request =
                        Instant::now() + Duration::from_millis(retry_after_ms.clamp(50, 30_000));
                }
                for a in assignments {
                    self.start_preparing(a, prep_tx.clone());
                }
            }
            CoordMsg::Room => {
                // A vote of ours was decided after the coordinator refused us at a full hand.
                self.next_request = Instant::now();
            }
            CoordMsg::Ack { replicas } => {
                let known = replicas
                    .iter()
                    .filter(|r| self.outbox.contains(**r))
                    .count();
                self.stats.acked.fetch_add(known as u64, Ordering::Relaxed);
                self.outbox.remove_all(&replicas);
                for r in &replicas {
                    self.stderr_tails.remove(r);
                }
            }
            CoordMsg::Rejected { replica, reason } => {
                tracing::warn!(?replica, "coordinator refused: {reason}");
                if let Some(r) = replica {
                    self.outbox.remove(r);
                    self.stderr_tails.remove(&r);
                }
            }
            CoordMsg::Cancel { replicas } => {
                for r in replicas {
                    if let Some(c) = self.controls.get(&r) {
                        tracing::debug!(replica = r, "cancelled by the coordinator");
                        c.cancel();
                    }
                }
            }
            CoordMsg::Reachability {
                observed_addr,
                reachable,
            } => {
                if reachable {
                    tracing::info!(%observed_addr, "directly reachable: serving other workers as a super-peer");
                } else {
                    tracing::info!(%observed_addr, "not directly reachable (NAT or firewall): peers reach us by hole punching through the coordinator");
                }
            }
            CoordMsg::Punch { peer, addr } => {
                let fetcher = self.fetcher.clone();
                tokio::spawn(async move { fetcher.punch(peer, addr).await });
            }
        }
    }

    fn start_preparing(&mut self, ca: ClassedAssignment, tx: mpsc::UnboundedSender<Prepared>) {
        let control = RunControl::default();
        control.set_cpu_limit(self.cfg.cpu_limit);
        let store = self.checkpoints.replica_store(&ca);
        let ClassedAssignment {
            assignment: a,
            determinism,
        } = ca;
        self.progress_of
            .insert(a.replica, (store.clone(), a.deadline_secs, None));
        control.set_checkpoints(store);
        if self.paused {
            control.pause();
        }
        if self.controls.insert(a.replica, control).is_some() {
            return; // duplicate assignment
        }
        self.in_hand.insert(a.replica, (a.task.id, Instant::now()));
        self.preparing += 1;
        let received = Instant::now();
        let warm = self.modules.get(&(a.task.module.id, determinism)).cloned();
        let (fetcher, store, sandbox) = (
            self.fetcher.clone(),
            self.store.clone(),
            self.sandbox_for(determinism).clone(),
        );
        let coordinator = self.session.as_ref().map(|s| s.coordinator.node_id);
        // (A cheap placeholder: an `anyhow::Error` would capture a backtrace when
        // RUST_BACKTRACE is set, a cost per assignment.)
        let placeholder = Ok((Module::Invalid(Arc::new(Vec::new())), Vec::new()));
        let mut p = Prepared {
            assignment: a,
            determinism,
            received,
            result: placeholder,
            from_coordinator: 0,
            from_peers: 0,
            bad_peers: Vec::new(),
        };
        if let (Some(m), None) = (&warm, &p.assignment.task.input) {
            // Warm module and no input: nothing to fetch or compile, no task to spawn.
            p.result = Ok((Module::Loaded(m.clone()), Vec::new()));
            let _ = tx.send(p);
            return;
        }
        tokio::spawn(async move {
            p.result = prepare(&mut p, warm, &fetcher, &store, &sandbox, coordinator).await;
            let _ = tx.send(p);
        });
    }

    async fn on_prepared(&mut self, p: Prepared) {
        self.preparing -= 1;
        self.stats
            .bytes_from_coordinator
            .fetch_add(p.from_coordinator, Ordering::Relaxed);
        self.stats
            .bytes_from_peers
            .fetch_add(p.from_peers, Ordering::Relaxed);
        for peer in &p.bad_peers {
            self.send(&WorkerMsg::BadPeer {
                peer: *peer,
                blob: p.assignment.task.module.id,
            })
            .await;
        }
        let replica = p.assignment.replica;
        let Some(control) = self.controls.get(&replica).cloned() else {
            return;
        };
        match p.result {
            Ok((module, input)) => {
                if let Module::Loaded(m) = &module {
                    self.modules
                        .entry((p.assignment.task.module.id, p.determinism))
                        .or_insert_with(|| m.clone());
                }
                let spec = RunSpec::from_manifest(&p.assignment.task, input);
                self.queued.push_back(replica);
                self.executor.submit(Job {
                    replica,
                    sandbox: self.sandbox_for(p.determinism).clone(),
                    module,
                    spec,
                    control,
                    received: p.received,
                });
                if p.from_coordinator + p.from_peers > 0 {
                    // New blobs here: peers may fetch them from us now.
                    self.send(&WorkerMsg::HaveBlobs {
                        blobs: p
                            .assignment
                            .task
                            .input
                            .iter()
                            .map(|b| b.id)
                            .chain([p.assignment.task.module.id])
                            .collect(),
                    })
                    .await;
                }
            }
            Err(e) => {
                tracing::warn!(replica, task = %p.assignment.task.id, "cannot run task: {e:#}; handing it back");
                self.controls.remove(&replica);
                self.in_hand.remove(&replica);
                self.checkpoints.release(replica);
                self.send(&WorkerMsg::Abandon {
                    replicas: vec![replica],
                })
                .await;
            }
        }
    }

    async fn on_done(&mut self, done: Done) {
        self.queued.retain(|r| *r != done.replica);
        let ours = self.controls.remove(&done.replica).is_some();
        self.in_hand.remove(&done.replica);
        let out = match done.outcome {
            Ok(out) => out,
            Err(_) => {
                // Cancelled: decided elsewhere, or abandoned. (`abandon_all` has already
                // released what it abandoned and keeps the rest, with their checkpoints,
                // for the next start: not ours to release any more.)
                if ours {
                    self.checkpoints.release(done.replica);
                }
                return;
            }
        };
        self.stats.completed.fetch_add(1, Ordering::Relaxed);
        self.stats.record_start_latency(done.queue_wait);
        let secs = out.wall.as_secs_f64();
        self.task_secs = Some(match self.task_secs {
            Some(avg) => avg * 0.8 + secs * 0.2,
            None => secs,
        });
        // Every output is kept here as a blob, served to the coordinator on request (LRU-evicted
        // like any blob under --disk-limit-mb). A large one travels only that way, so it is
        // stored (a file of its own) before it is announced. A small one travels inline in the
        // report; the copy kept here only serves a coordinator that lost it (e.g. evicted from
        // its pending outputs, or restarted), so it is written off the daemon's loop, which a
        // tiny task must not wait on: `copy_outputs` appends them in batches to a pack of the
        // blob store, served by hash like any blob.
        let output = if out.result.output_len <= wire::INLINE_OUTPUT_MAX {
            if !out.output.is_empty() {
                let _ = self.copy_tx.send(out.output.clone());
            }
            Some(out.output)
        } else {
            if let Err(e) = self.store.put(&out.output) {
                // Reported, it could never be collected: hand the replica back instead.
                tracing::error!(replica = done.replica, "cannot store a large output ({e}); handing the task back (check the data dir's disk)");
                self.checkpoints.release(done.replica);
                self.send(&WorkerMsg::Abandon {
                    replicas: vec![done.replica],
                })
                .await;
                return;
            }
            let blobs = vec![out.result.output_hash];
            self.send(&WorkerMsg::HaveBlobs { blobs }).await;
            None
        };
        if out.result.status != tasks::Status::Ok && !out.stderr.is_empty() {
            let cut = out
                .stderr
                .len()
                .saturating_sub(tasks::limits::MAX_STDERR_TAIL);
            self.stderr_tails
                .insert(done.replica, out.stderr[cut..].to_vec());
        }
        self.unsaved.push(Report {
            replica: done.replica,
            result: out.result,
            output,
            wall_ms: out.wall.as_millis() as u64,
        });
    }

    /// Hand back replicas held far past their deadline, saying so: by then the coordinator
    /// has reissued them, so finishing one only wastes this machine. "Far": twice the
    /// deadline for a task that does not report progress (a moderately late report still
    /// counts while the task was not reissued), and the coordinator's longest extension
    /// ([`tasks::limits::MAX_DEADLINE_STRETCH`] deadlines) for one that does. Counted from
    /// when the assignment arrived (after a restart: from the restart).
    async fn abandon_overdue(&mut self) {
        let now = Instant::now();
        let overdue: Vec<(ReplicaId, TaskId, u64, bool)> = self
            .in_hand
            .iter()
            .filter_map(|(replica, (task, arrived))| {
                let (store, deadline, _) = self.progress_of.get(replica)?;
                let reports = store.progress().is_some();
                let limit = deadline.saturating_mul(if reports {
                    tasks::limits::MAX_DEADLINE_STRETCH
                } else {
                    2
                });
                (now.duration_since(*arrived) > Duration::from_secs(limit))
                    .then_some((*replica, *task, *deadline, reports))
            })
            .collect();
        if overdue.is_empty() {
            return;
        }
        let mut replicas = Vec::new();
        for (replica, task, deadline, reports) in overdue {
            tracing::warn!(
                replica, %task,
                "abandoning replica: held {}x its {deadline} s deadline{}; the coordinator has reissued it",
                if reports { tasks::limits::MAX_DEADLINE_STRETCH } else { 2 },
                if reports { " (the longest extension its progress earns)" } else { " without reporting progress" },
            );
            if let Some(c) = self.controls.remove(&replica) {
                c.cancel();
            }
            self.in_hand.remove(&replica);
            self.queued.retain(|r| *r != replica);
            self.progress_of.remove(&replica);
            self.checkpoints.release(replica);
            replicas.push(replica);
        }
        self.send(&WorkerMsg::Abandon { replicas }).await;
    }

    async fn abandon_all(&mut self) {
        let mut replicas: Vec<ReplicaId> = self.controls.keys().copied().collect();
        for c in self.controls.values() {
            c.cancel();
        }
        // Those with a checkpoint are kept: the next start resumes them (the coordinator
        // waits for them for its disconnect grace period, then for their deadline).
        let (kept, gone): (Vec<ReplicaId>, Vec<ReplicaId>) =
            replicas.iter().partition(|r| self.checkpoints.is_held(**r));
        if !kept.is_empty() {
            tracing::info!(
                "keeping {} replicas with a checkpoint: the next start of this worker resumes them",
                kept.len()
            );
        }
        for r in &gone {
            self.checkpoints.release(*r);
        }
        replicas = gone;
        if !replicas.is_empty() {
            tracing::info!(
                "abandoning {} unfinished replicas so they are reissued at once",
                replicas.len()
            );
            self.send(&WorkerMsg::Abandon { replicas }).await;
        }
        self.controls.clear();
        self.in_hand.clear();
        self.queued.clear();
    }
}

async fn next_msg(session: &mut Option<Session>) -> Option<anyhow::Result<CoordMsg>> {
    match session {
        Some(s) => s.inbox.recv().await,
        None => std::future::pending().await,
    }
}

/// Connect, say hello, and wait for the welcome.
async fn open_session(
    endpoint: quinn::Endpoint,
    failover: quinn::ClientConfig,
    ticket: Ticket,
    hello: WorkerMsg,
    server: BlobServer,
) -> anyhow::Result<Session> {
    // Every coordinator the ticket lists is dialled at once; the one that leads answers.
    let targets = ticket
        .resolve_all()
        .await
        .with_context(|| format!("resolving {}", ticket.addr))?;
    let (conn, i) =
        tasks::net::connect_any(&endpoint, &targets, wire::ALPN_COORD, Some(&failover)).await?;
    let (addr, node_id) = targets[i];
    let (mut send, mut recv) = conn.open_bi().await.context("opening the session stream")?;
    tasks::net::write_frame(&mut send, &hello).await?;
    let welcome: Option<CoordMsg> =
        tokio::time::timeout(Duration::from_secs(10), tasks::net::read_frame(&mut recv))
            .await
            .context("no welcome from the coordinator within 10 s")??;
    let (observed_addr, takes_stderr, takes_holding, takes_progress, takes_classes) = match welcome
    {
        Some(CoordMsg::Welcome {
            observed_addr,
            agent,
        }) => (
            observed_addr,
            wire::has_capability(&agent, wire::CAP_STDERR),
            wire::has_capability(&agent, wire::CAP_HOLDING),
            wire::has_capability(&agent, wire::CAP_PROGRESS),
            wire::has_capability(&agent, wire::CAP_CLASSES),
        ),
        Some(other) => anyhow::bail!("coordinator answered hello with {other:?}"),
        None => anyhow::bail!("coordinator closed the session before welcoming us"),
    };
    // The coordinator collects outputs on streams it opens on this connection (it may not
    // be able to dial us): answer them as blob requests while the session lives.
    let c = conn.clone();
    tokio::spawn(async move { server.serve_connection(c).await });
    let (tx, inbox) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            match tasks::net::read_frame::<CoordMsg>(&mut recv).await {
                Ok(Some(msg)) => {
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::anyhow!(e))).await;
                    return;
                }
            }
        }
    });
    Ok(Session {
        send,
        inbox,
        conn,
        coordinator: PeerAddr { node_id, addr },
        observed_addr,
        takes_stderr,
        takes_holding,
        takes_progress,
        takes_classes,
    })
}

/// Fetch the task's module and input through the swarm and load the module.
async fn prepare(
    p: &mut Prepared,
    warm: Option<LoadedModule>,
    fetcher: &Fetcher,
    store: &BlobStore,
    sandbox: &Sandbox,
    coordinator: Option<tasks::NodeId>,
) -> anyhow::Result<(Module, Vec<u8>)> {
    let task = p.assignment.task.clone();
    let peers = p.assignment.peers.clone();
    let count = |report: &crate::swarm::FetchReport, p: &mut Prepared| {
        for (node, bytes) in &report.bytes_by_peer {
            if Some(*node) == coordinator {
                p.from_coordinator += bytes;
            } else {
                p.from_peers += bytes;
            }
        }
        p.bad_peers.extend(report.bad_peers.iter().copied());
    };
    let module = match warm {
        Some(m) => Module::Loaded(m),
        None => {
            let r = fetcher
                .fetch(task.module, &peers)
                .await
                .with_context(|| format!("fetching module {}", task.module.id))?;
            count(&r, p);
            let _pin = store.pin(&task.module.id);
            let bytes = Arc::new(store.read(&task.module.id)?);
            let (sandbox, b2) = (sandbox.clone(), bytes.clone());
            match tokio::task::spawn_blocking(move || sandbox.load(&b2)).await? {
                Ok(m) => Module::Loaded(m),
                Err(e) => {
                    tracing::warn!(module = %task.module.id, "module does not load ({e}); reporting invalid_module");
                    Module::Invalid(bytes)
                }
            }
        }
    };
    let input = match task.input {
        None => Vec::new(),
        Some(blob) => {
            let r = fetcher
                .fetch(blob, &peers)
                .await
                .with_context(|| format!("fetching input {}", blob.id))?;
            count(&r, p);
            store.read(&blob.id)?
        }
    };
    Ok((module, input))
}
