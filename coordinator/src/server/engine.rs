//! The engine: one OS thread that owns the [`Core`] and the [`Store`] and applies events in
//! batches (group commit).
//!
//! Sessions send [`Cmd`]s through a bounded channel. The engine blocks for the first, drains
//! whatever else is queued (up to [`MAX_BATCH`]), applies all of them to the core, commits
//! every resulting mutation in **one transaction**, and only then answers: a report is
//! acknowledged, an assignment handed out, a job id returned only once it is durable. A
//! store failure stops the engine (pending callers see the channel close); committed state
//! stays consistent and a restart resumes from it.

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};

use tasks::wire::{
    CoordMsg, FailurePage, JobResults, JobState, PeerAddr, ReplicaId, Report, ResultsPage,
    StatusReport, TaskResult, TaskState, INLINE_OUTPUT_MAX, MAX_FAILURES_PER_PAGE,
    MAX_RESULTS_PAGE,
};
use tasks::{BlobId, EngineFingerprint, JobId, JobManifest, NodeId, RunResult, Status, TaskId};

use crate::core::{Core, Notice, ReportOutcome, RetryError, Work};
use crate::store::{Mutation, Output, SqliteStore, Store};

pub mod overview;
pub use overview::{EngineStats, Overview, TasksPage};

/// Most commands applied per transaction.
pub const MAX_BATCH: usize = 8192;

/// Results responses carry inline outputs up to this many bytes in total; the rest are
/// copied into the blob store and fetched by hash.
pub const RESULTS_INLINE_BUDGET: usize = 4 << 20;

/// A page of results carries at most about this many bytes (fields and inline outputs), far
/// inside a frame ([`tasks::wire::MAX_FRAME`]).
pub const RESULTS_PAGE_BUDGET: usize = 4 << 20;

/// A worker's hello, as the engine needs it.
#[derive(Debug, Clone)]
pub struct HelloInfo {
    pub fingerprint: EngineFingerprint,
    pub slots: u32,
    /// Where the session comes from (QUIC's remote address): what peers are handed and
    /// what the one-operator rule judges. The address a worker announces is only logged.
    pub observed_addr: std::net::SocketAddr,
    pub blobs: Vec<BlobId>,
}

/// What a session or submitter asks of the engine.
pub enum Cmd {
    Hello {
        worker: NodeId,
        session: u64,
        info: HelloInfo,
        tx: mpsc::UnboundedSender<CoordMsg>,
        /// `Some(why)`: refused (an engine not accepted, or no room for another engine
        /// class); nothing was recorded.
        reply: oneshot::Sender<Option<String>>,
    },
    Disconnected {
        worker: NodeId,
        session: u64,
    },
    RequestWork {
        worker: NodeId,
        max: u32,
        reply: oneshot::Sender<Work>,
    },
    /// Answered with one `Ack` for the recorded replicas and one `Rejected` per refusal.
    Reports {
        worker: NodeId,
        reports: Vec<Report>,
        reply: oneshot::Sender<Vec<CoordMsg>>,
    },
    HaveBlobs {
        worker: NodeId,
        blobs: Vec<BlobId>,
    },
    Abandon {
        worker: NodeId,
        replicas: Vec<ReplicaId>,
    },
    /// `worker` (just reconnected) still has exactly these replicas: the others it is
    /// counted for are taken back (see [`Core::reconcile`]).
    Holding {
        worker: NodeId,
        replicas: Vec<ReplicaId>,
    },
    /// A job's running tasks' progress (`None`: no such job).
    JobProgress {
        job: JobId,
        reply: oneshot::Sender<Option<tasks::wire::JobProgress>>,
    },
    /// `worker`'s replicas' progress (see [`Core::progress`]).
    Progress {
        worker: NodeId,
        updates: Vec<tasks::wire::ProgressUpdate>,
    },
    /// `from` says `peer` served bad data for `blob` (an accusation; see
    /// [`Core::bad_peer`]).
    BadPeer {
        from: NodeId,
        peer: NodeId,
        blob: BlobId,
    },
    /// `from` is about to dial `peer`: ask `peer` to dial back at once if it is not
    /// directly reachable (simultaneous open).
    Punch {
        from: NodeId,
        peer: NodeId,
    },
    /// The dial-back to session `session` of `worker` succeeded or not.
    Reachable {
        worker: NodeId,
        session: u64,
        reachable: bool,
    },
    CreateJob {
        manifest: JobManifest,
        determinism: tasks::Determinism,
        reply: oneshot::Sender<(JobId, u32)>,
    },
    /// The determinism class of one job or of all (`None`), in job id order.
    Classes {
        job: Option<JobId>,
        reply: oneshot::Sender<Vec<(JobId, tasks::Determinism)>>,
    },
    /// `worker` also runs `native` jobs on engine `native` (`WorkerMsg::Engines`):
    /// answered with why not, if it may not.
    Engines {
        worker: NodeId,
        native: tasks::EngineFingerprint,
        reply: oneshot::Sender<Option<String>>,
    },
    Status {
        job: Option<JobId>,
        reply: oneshot::Sender<Option<StatusReport>>,
    },
    Results {
        job: JobId,
        reply: oneshot::Sender<Result<Option<JobResults>, String>>,
    },
    Cancel {
        job: JobId,
        reply: oneshot::Sender<bool>,
    },
    /// `coordinator retry`: the job's failed tasks back to pending.
    Retry {
        job: JobId,
        reply: oneshot::Sender<Result<u32, RetryError>>,
    },
    /// One page of a job's results (see [`tasks::wire::SubmitBody::ResultsPage`]).
    ResultsPage {
        job: JobId,
        first: u32,
        max: u32,
        reply: oneshot::Sender<Result<Option<ResultsPage>, String>>,
    },
    OutputStored {
        task: TaskId,
        output: Output,
    },
    Tick,
    /// Jobs with task counts, workers with their standing, and validation totals: the
    /// dashboard and `/metrics` (see [`overview`]). Answered after the batch's commit.
    Overview {
        reply: oneshot::Sender<Overview>,
    },
    /// Up to `limit` of a job's tasks from index `offset`: state, replica counts and
    /// agreement, never digests or outputs. `None`: no such job.
    Tasks {
        job: JobId,
        offset: u32,
        limit: u32,
        reply: oneshot::Sender<Option<TasksPage>>,
    },
    /// The stderr tail of `worker`'s replica (already cut to
    /// [`tasks::limits::MAX_STDERR_TAIL`]): kept only if the replica is the worker's and its
    /// recorded result is not `ok`, and only the first one sent.
    Stderr {
        worker: NodeId,
        replica: ReplicaId,
        stderr: Vec<u8>,
    },
    /// A page of the job's tasks that did not end `ok`, with their stderr; `None`: no such job.
    Failures {
        job: JobId,
        after: Option<u32>,
        max: u32,
        reply: oneshot::Sender<Result<Option<FailurePage>, String>>,
    },
}

/// Punch requests a worker may have forwarded per window (it dials a few peers per blob).
const PUNCHES_PER_WINDOW: u32 = 32;
const PUNCH_WINDOW_MS: u64 = 10_000;

/// Inline outputs of recorded reports, by output hash, oldest evicted first beyond
/// [`PENDING_OUTPUT_BYTES`]: where every accepted small output comes from, whichever event
/// accepted its task. Past the bound, it is fetched from the agreeing workers, which keep
/// every output as a blob.
#[derive(Default)]
struct PendingOutputs {
    bytes: HashMap<BlobId, Vec<u8>>,
    order: std::collections::VecDeque<BlobId>,
    total: usize,
}

/// Memory the coordinator spends on [`PendingOutputs`].
const PENDING_OUTPUT_BYTES: usize = 64 << 20;
/// What one kept output costs beyond its bytes (map entry, queue entry, allocation), counted
/// in the bound: a million tiny outputs must not escape it by being small.
const PENDING_OUTPUT_OVERHEAD: usize = 128;

impl PendingOutputs {
    fn keep(&mut self, hash: BlobId, output: Vec<u8>) {
        if output.is_empty() || self.bytes.contains_key(&hash) {
            return;
        }
        self.total += output.len() + PENDING_OUTPUT_OVERHEAD;
        self.bytes.insert(hash, output);
        self.order.push_back(hash);
        while self.total > PENDING_OUTPUT_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.bytes.remove(&old) {
                self.total -= b.len() + PENDING_OUTPUT_OVERHEAD;
            }
        }
    }

    fn get(&self, hash: &BlobId) -> Option<Vec<u8>> {
        self.bytes.get(hash).cloned()
    }
}

/// An accepted output the shell must fetch from agreeing workers.
#[derive(Debug, Clone)]
pub struct FetchJob {
    pub task: TaskId,
    pub result: RunResult,
    pub peers: Vec<PeerAddr>,
}

/// A `Failures` request waiting for its batch's commit.
type FailuresWanted = (
    JobId,
    Option<u32>,
    u32,
    oneshot::Sender<Result<Option<FailurePage>, String>>,
);

/// Handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    pub tx: mpsc::Sender<Cmd>,
    /// Counters and the commit-latency histogram, read without asking the engine.
    pub stats: std::sync::Arc<EngineStats>,
}

impl EngineHandle {
    /// Commands waiting in the engine's inbox (sent, not yet taken into a batch).
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity().saturating_sub(self.tx.capacity())
    }

    /// Send a command and wait for its answer; `None` when the engine has stopped.
    pub async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    pub async fn send(&self, cmd: Cmd) -> bool {
        self.tx.send(cmd).await.is_ok()
    }
}

/// Milliseconds since the Unix epoch: the core's clock (absolute, so deadlines survive
/// restarts).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Effects that must wait for the batch's commit.
enum Reply {
    Work(oneshot::Sender<Work>, Work),
    Msgs(oneshot::Sender<Vec<CoordMsg>>, Vec<CoordMsg>),
    Job(oneshot::Sender<(JobId, u32)>, (JobId, u32)),
    Bool(oneshot::Sender<bool>, bool),
    Refusal(oneshot::Sender<Option<String>>, Option<String>),
    Status(oneshot::Sender<Option<StatusReport>>, Option<StatusReport>),
    Overview(oneshot::Sender<Overview>, Box<Overview>),
    Tasks(oneshot::Sender<Option<TasksPage>>, Option<TasksPage>),
    Retry(
        oneshot::Sender<Result<u32, RetryError>>,
        Result<u32, RetryError>,
    ),
}

impl Reply {
    fn send(self) {
        let _ = match self {
            Reply::Work(tx, w) => tx.send(w).map_err(|_| ()),
            Reply::Msgs(tx, m) => tx.send(m).map_err(|_| ()),
            Reply::Job(tx, j) => tx.send(j).map_err(|_| ()),
            Reply::Bool(tx, b) => tx.send(b).map_err(|_| ()),
            Reply::Refusal(tx, r) => tx.send(r).map_err(|_| ()),
            Reply::Status(tx, s) => tx.send(s).map_err(|_| ()),
            Reply::Overview(tx, o) => tx.send(*o).map_err(|_| ()),
            Reply::Tasks(tx, t) => tx.send(t).map_err(|_| ()),
            Reply::Retry(tx, r) => tx.send(r).map_err(|_| ()),
        };
    }
}

/// The engine's state on its thread.
pub struct Engine<S: Store = SqliteStore> {
    pub core: Core,
    pub store: S,
    blobs: blobs::BlobStore,
    sessions: HashMap<NodeId, (u64, mpsc::UnboundedSender<CoordMsg>)>,
    /// Punch requests per requesting worker in the current window: (window start, count).
    /// One entry per connected worker at most (removed with the session).
    punches: HashMap<NodeId, (u64, u32)>,
    /// Inline outputs of undecided reports, by hash (bounded).
    pending_outputs: PendingOutputs,
    fetches: mpsc::UnboundedSender<FetchJob>,
    /// Accepted tasks whose output is being fetched from their workers (at most one entry
    /// per accepted task), shown by `status` as `outputs_collecting`.
    collecting: std::collections::HashSet<TaskId>,
    /// `Results` asked in the current batch, answered after its commit.
    results_wanted: Vec<(JobId, oneshot::Sender<Result<Option<JobResults>, String>>)>,
    /// `ResultsPage` asked in the current batch (job, first, max), answered after its commit.
    #[allow(clippy::type_complexity)]
    pages_wanted: Vec<(
        JobId,
        u32,
        u32,
        oneshot::Sender<Result<Option<ResultsPage>, String>>,
    )>,
    /// `Failures` asked in the current batch, answered after its commit.
    failures_wanted: Vec<FailuresWanted>,
    /// A work request was served since this engine started (logged once: after a restart
    /// or a standby's take-over, when workers are being served again).
    served_work: bool,
    /// Statistics: batches committed and commands applied.
    pub batches: u64,
    pub commands: u64,
    /// Shared with every [`EngineHandle`]: what `/metrics` reads.
    pub stats: std::sync::Arc<EngineStats>,
    /// Contested tasks of ended jobs (they cannot change any more), so the overview does
    /// not walk finished jobs' replicas again on every poll.
    ended_contested: HashMap<JobId, u32>,
}

impl<S: Store> Engine<S> {
    pub fn new(
        core: Core,
        store: S,
        blobs: blobs::BlobStore,
        fetches: mpsc::UnboundedSender<FetchJob>,
    ) -> Self {
        Engine {
            core,
            store,
            blobs,
            sessions: HashMap::new(),
            punches: HashMap::new(),
            pending_outputs: PendingOutputs::default(),
            fetches,
            collecting: Default::default(),
            results_wanted: Vec::new(),
            pages_wanted: Vec::new(),
            failures_wanted: Vec::new(),
            served_work: false,
            batches: 0,
            commands: 0,
            stats: Default::default(),
            ended_contested: HashMap::new(),
        }
    }

    /// Run until every sender is dropped. Returns the store error that stopped it, if any.
    pub fn run(mut self, mut rx: mpsc::Receiver<Cmd>) -> Result<(), crate::store::StoreError> {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            self.apply_batch(batch.drain(..), now_ms())?;
        }
        // Flush whatever the last batch left (nothing, since every batch commits).
        Ok(())
    }

    /// Apply commands, commit once, then answer them.
    pub fn apply_batch(
        &mut self,
        cmds: impl Iterator<Item = Cmd>,
        now: u64,
    ) -> Result<(), crate::store::StoreError> {
        let mut replies = Vec::new();
        let mut extra: Vec<Mutation> = Vec::new();
        let mut fetch = Vec::new();
        let mut sends: Vec<(NodeId, CoordMsg)> = Vec::new();
        for cmd in cmds {
            self.commands += 1;
            self.apply(cmd, now, &mut replies, &mut extra);
            self.collect_notices(&mut sends, &mut extra, &mut fetch);
        }
        let mut muts = self.core.take_mutations();
        muts.append(&mut extra);
        crate::store::fold(&mut muts);
        let started = std::time::Instant::now();
        self.store.commit(&muts)?;
        self.stats.committed(started.elapsed(), self.commands);
        self.batches += 1;
        for r in replies {
            r.send();
        }
        for (job, reply) in std::mem::take(&mut self.results_wanted) {
            let _ = reply.send(self.results(job));
        }
        for (job, first, max, reply) in std::mem::take(&mut self.pages_wanted) {
            let _ = reply.send(self.results_page(job, first, max));
        }
        for (job, after, max, reply) in std::mem::take(&mut self.failures_wanted) {
            let page = match self.core.job_manifest(job) {
                None => Ok(None),
                Some(_) => self
                    .store
                    .task_failures(job, after, max.clamp(1, MAX_FAILURES_PER_PAGE))
                    .map(Some)
                    .map_err(|e| e.to_string()),
            };
            let _ = reply.send(page);
        }
        for (worker, msg) in sends {
            if let Some((_, tx)) = self.sessions.get(&worker) {
                let _ = tx.send(msg);
            }
        }
        for f in fetch {
            let _ = self.fetches.send(f);
        }
        Ok(())
    }

    /// Forward a punch request to `peer` (see [`Cmd::Punch`]), at most
    /// [`PUNCHES_PER_WINDOW`] per requester per [`PUNCH_WINDOW_MS`]: a worker cannot make
    /// the coordinator flood others with dial orders.
    fn punch(&mut self, from: NodeId, peer: NodeId, now: u64) {
        let Some(addr) = self.core.punch_target(&from, &peer) else {
            return;
        };
        let Some((_, tx)) = self.sessions.get(&peer) else {
            return;
        };
        let (start, count) = self.punches.entry(from).or_insert((now, 0));
        if now.saturating_sub(*start) >= PUNCH_WINDOW_MS {
            (*start, *count) = (now, 0);
        }
        if *count >= PUNCHES_PER_WINDOW {
            tracing::debug!(node = %from.short(), "punch request over the rate limit; dropped");
            return;
        }
        *count += 1;
        tracing::debug!(from = %from.short(), peer = %peer.short(), %addr, "coordinating a simultaneous open");
        let _ = tx.send(CoordMsg::Punch { peer: from, addr });
    }

    fn collect_notices(
        &mut self,
        sends: &mut Vec<(NodeId, CoordMsg)>,
        extra: &mut Vec<Mutation>,
        fetch: &mut Vec<FetchJob>,
    ) {
        for n in self.core.take_notices() {
            match n {
                Notice::Cancel { worker, replicas } => {
                    sends.push((worker, CoordMsg::Cancel { replicas }))
                }
                Notice::Accepted {
                    task,
                    result,
                    replica,
                    ..
                } => {
                    tracing::debug!(%task, replica, digest = %result.digest(), "task accepted");
                    // Whatever accepted it (the report completing the quorum, or a
                    // re-evaluation after a loss, a deadline or a lifted ban), the accepted
                    // result's output is kept: inline outputs of every recorded report are in
                    // `pending_outputs` by hash, so the bytes are those of the accepted
                    // result, never those of the report that happened to trigger it.
                    match self.output_at_hand(&result, None) {
                        Some(output) => extra.push(Mutation::TaskOutput { task, output }),
                        None => {
                            // Counted as collecting from now on, so a status in this very
                            // batch already shows it.
                            self.collecting.insert(task);
                            fetch.push(self.fetch_job(task, result));
                        }
                    }
                }
                Notice::Failed { task, reason } => tracing::info!(%task, %reason, "task failed"),
                Notice::JobEnded { job, state } => tracing::info!(%job, ?state, "job ended"),
                Notice::Room { worker } => sends.push((worker, CoordMsg::Room)),
            }
        }
    }

    fn apply(&mut self, cmd: Cmd, now: u64, replies: &mut Vec<Reply>, extra: &mut Vec<Mutation>) {
        match cmd {
            Cmd::Hello {
                worker,
                session,
                info,
                tx,
                reply,
            } => {
                if let Err(why) = self.core.admits_fingerprint(&info.fingerprint) {
                    tracing::warn!(%worker, fingerprint = %info.fingerprint, "worker refused: {why}");
                    replies.push(Reply::Refusal(reply, Some(why)));
                    return;
                }
                self.core.hello(
                    worker,
                    &info.fingerprint,
                    info.slots,
                    Some(info.observed_addr),
                    &info.blobs,
                    now,
                );
                self.core.observed_address(worker, info.observed_addr);
                self.sessions.insert(worker, (session, tx));
                self.punches.remove(&worker);
                replies.push(Reply::Refusal(reply, None));
            }
            Cmd::Disconnected { worker, session } => {
                if self
                    .sessions
                    .get(&worker)
                    .is_some_and(|(s, _)| *s == session)
                {
                    self.sessions.remove(&worker);
                    self.punches.remove(&worker);
                    self.core.disconnect(worker, now);
                }
            }
            Cmd::RequestWork { worker, max, reply } => {
                let work = self.core.request_work(worker, max, now);
                tracing::debug!(node = %worker.short(), max, given = work.assignments.len(), "work request");
                if !self.served_work {
                    self.served_work = true;
                    tracing::info!(node = %worker.short(), given = work.assignments.len(), "first work request served since this coordinator started");
                }
                replies.push(Reply::Work(reply, work));
            }
            Cmd::Reports {
                worker,
                reports,
                reply,
            } => {
                let mut acked = Vec::new();
                let mut msgs = Vec::new();
                for r in reports {
                    match self.report(worker, r, now) {
                        Ok(replica) => acked.push(replica),
                        Err((replica, reason)) => {
                            self.stats.report_rejected();
                            msgs.push(CoordMsg::Rejected {
                                replica: Some(replica),
                                reason,
                            })
                        }
                    }
                }
                if !acked.is_empty() {
                    msgs.insert(0, CoordMsg::Ack { replicas: acked });
                }
                replies.push(Reply::Msgs(reply, msgs));
            }
            Cmd::HaveBlobs { worker, blobs } => self.core.have_blobs(worker, &blobs),
            Cmd::Abandon { worker, replicas } => self.core.abandon(worker, &replicas, now),
            Cmd::JobProgress { job, reply } => {
                let _ = reply.send(self.core.job_progress(job));
            }
            Cmd::Progress { worker, updates } => {
                self.core.progress(worker, &updates, now);
            }
            Cmd::Holding { worker, replicas } => {
                let taken = self.core.reconcile(worker, &replicas, now);
                if taken > 0 {
                    tracing::info!(node = %worker.short(), taken, "the worker no longer has {taken} replicas counted as in flight there (an assignment lost with a connection or a restart): reissued at once");
                }
            }
            Cmd::BadPeer { from, peer, blob } => {
                if !self.core.bad_peer(from, peer, blob) {
                    tracing::info!(node = %from.short(), peer = %peer.short(), blob = %blob.short(), "uncorroborated bad-peer report ignored: the reporter holds no assignment needing that blob, or the peer is not listed for it");
                }
            }
            Cmd::Punch { from, peer } => self.punch(from, peer, now),
            Cmd::Reachable {
                worker,
                session,
                reachable,
            } => {
                if self
                    .sessions
                    .get(&worker)
                    .is_some_and(|(s, _)| *s == session)
                {
                    self.core.set_reachable(worker, reachable);
                }
            }
            Cmd::CreateJob {
                manifest,
                determinism,
                reply,
            } => {
                let created = self.core.add_job_in(manifest, determinism, now);
                tracing::info!(job = %created.0, tasks = created.1, %determinism, "job created");
                replies.push(Reply::Job(reply, created));
            }
            Cmd::Classes { job, reply } => {
                let _ = reply.send(self.core.job_classes(job));
            }
            Cmd::Engines {
                worker,
                native,
                reply,
            } => {
                let refusal = match self.core.worker_fingerprint(&worker).cloned() {
                    None => Some("Engines before a hello".to_string()),
                    Some(portable) => self.core.admits_native(&portable, &native).err(),
                };
                match &refusal {
                    None => {
                        self.core.engines(worker, &native);
                        tracing::info!(node = %worker.short(), fingerprint = %native, "the worker also runs native-class jobs");
                    }
                    Some(why) => {
                        tracing::warn!(node = %worker.short(), %why, "native engine refused: the worker gets portable jobs only")
                    }
                }
                replies.push(Reply::Refusal(reply, refusal));
            }
            // Sent after the commit, so a status never shows what a crash could still undo.
            Cmd::Status { job, reply } => replies.push(Reply::Status(reply, self.status(job))),
            // Read from the store after the batch's commit, like a status: results never
            // miss a decision (or its output) that this batch made.
            Cmd::Results { job, reply } => self.results_wanted.push((job, reply)),
            Cmd::Cancel { job, reply } => {
                let ok = self.core.cancel_job(job, now);
                replies.push(Reply::Bool(reply, ok));
            }
            Cmd::Retry { job, reply } => {
                let r = self.core.retry_failed(job, now);
                if let Ok(n) = r {
                    tracing::info!(%job, tasks = n, "failed tasks reissued");
                }
                replies.push(Reply::Retry(reply, r));
            }
            Cmd::ResultsPage {
                job,
                first,
                max,
                reply,
            } => self.pages_wanted.push((job, first, max, reply)),
            Cmd::OutputStored { task, output } => {
                self.collecting.remove(&task);
                extra.push(Mutation::TaskOutput { task, output })
            }
            Cmd::Tick => self.core.tick(now),
            // Like a status: sent after the commit.
            Cmd::Overview { reply } => {
                let o = Box::new(self.overview(now));
                replies.push(Reply::Overview(reply, o));
            }
            Cmd::Tasks {
                job,
                offset,
                limit,
                reply,
            } => {
                let page = self.tasks(job, offset, limit);
                replies.push(Reply::Tasks(reply, page));
            }
            Cmd::Stderr {
                worker,
                replica,
                stderr,
            } => match self.core.replica_result(replica) {
                Some((owner, task, Some(result)))
                    if owner == worker && result.status != Status::Ok && !stderr.is_empty() =>
                {
                    extra.push(Mutation::ReplicaStderr {
                        replica,
                        task,
                        stderr,
                    })
                }
                _ => {
                    tracing::debug!(node = %worker.short(), replica, "stderr ignored: not a replica of this worker with a reported non-ok result")
                }
            },
            Cmd::Failures {
                job,
                after,
                max,
                reply,
            } => self.failures_wanted.push((job, after, max, reply)),
        }
    }

    /// One report: check the inline output, feed the core, and keep the inline output by its
    /// hash. If the report completes an acceptance, [`Engine::collect_notices`] takes the
    /// accepted result's output from there (or fetches it).
    fn report(
        &mut self,
        worker: NodeId,
        r: Report,
        now: u64,
    ) -> Result<ReplicaId, (ReplicaId, String)> {
        if let Some(out) = &r.output {
            if out.len() as u64 > INLINE_OUTPUT_MAX
                || out.len() as u64 != r.result.output_len
                || BlobId::of(out) != r.result.output_hash
            {
                tracing::warn!(node = %worker.short(), replica = r.replica, "report rejected: inline output does not match output_hash/output_len");
                return Err((
                    r.replica,
                    "inline output does not match output_hash/output_len".into(),
                ));
            }
        }
        match self.core.report(worker, r.replica, r.result.clone(), now) {
            ReportOutcome::Rejected(reason) => {
                // A worker reporting for a replica it was not given (or changing a committed
                // result) is either buggy or hostile: say so, in one line.
                tracing::warn!(node = %worker.short(), replica = r.replica, "report rejected: {reason}");
                Err((r.replica, reason))
            }
            ReportOutcome::Recorded { .. } => {
                // Kept whether or not this report decided its task: an acceptance (now, or
                // later by a path that brings no report) looks the accepted result's bytes
                // up here by hash.
                if let Some(bytes) = r.output {
                    self.pending_outputs.keep(r.result.output_hash, bytes);
                }
                Ok(r.replica)
            }
        }
    }

    /// An accepted result's output if the coordinator has it (inline, empty, or already in
    /// its blob store); `None`: it must be fetched from the agreeing workers.
    fn output_at_hand(&self, result: &RunResult, inline: Option<Vec<u8>>) -> Option<Output> {
        match inline.or_else(|| self.pending_outputs.get(&result.output_hash)) {
            Some(bytes) => Some(Output::Inline(bytes)),
            None if result.output_len == 0 => Some(Output::Inline(Vec::new())),
            None if self.blobs.has(&result.output_hash) => Some(Output::Blob(result.output_hash)),
            None => None,
        }
    }

    /// The core's status, with the outputs still being collected per job.
    fn status(&self, job: Option<JobId>) -> Option<StatusReport> {
        let mut report = self.core.status(job)?;
        for j in &mut report.jobs {
            j.outputs_collecting = self.collecting.iter().filter(|t| t.job == j.id).count() as u32;
        }
        Some(report)
    }

    /// Where to fetch an accepted output: the agreeing workers' blob servers.
    pub fn fetch_job(&self, task: TaskId, result: RunResult) -> FetchJob {
        let peers = self.core.agreeing_peers(task).into_iter().collect();
        FetchJob {
            task,
            result,
            peers,
        }
    }

    /// Accepted outputs that were never fetched (e.g. the coordinator stopped first).
    pub fn resume_fetches(&mut self) -> Result<(), crate::store::StoreError> {
        for (task, result, _) in self.store.outputs_missing()? {
            if self.blobs.has(&result.output_hash) {
                self.store.commit(&[Mutation::TaskOutput {
                    task,
                    output: Output::Blob(result.output_hash),
                }])?;
            } else {
                let f = self.fetch_job(task, result);
                self.collecting.insert(task);
                let _ = self.fetches.send(f);
            }
        }
        Ok(())
    }

    fn results(&mut self, job: JobId) -> Result<Option<JobResults>, String> {
        let Some(manifest) = self.core.job_manifest(job) else {
            return Ok(None);
        };
        let state = self.core.job_state(job).unwrap_or(JobState::Running);
        let decided = self.store.task_results(job).map_err(|e| e.to_string())?;
        let mut by_index: HashMap<u32, (TaskResult, Option<Output>)> = decided
            .into_iter()
            .map(|(t, o)| (t.index, (t, o)))
            .collect();
        let mut budget = RESULTS_INLINE_BUDGET;
        let mut tasks = Vec::with_capacity(manifest.tasks.len());
        for index in 0..manifest.tasks.len() as u32 {
            let Some((mut t, output)) = by_index.remove(&index) else {
                tasks.push(pending_result(index));
                continue;
            };
            if let Some(Output::Inline(bytes)) = output {
                if bytes.len() <= budget {
                    budget -= bytes.len();
                    t.output = Some(bytes);
                } else if !self.blobs.has(&BlobId::of(&bytes)) {
                    // Over the frame budget: serve it by hash instead.
                    self.blobs.put(&bytes).map_err(|e| e.to_string())?;
                }
            }
            tasks.push(t);
        }
        Ok(Some(JobResults {
            job,
            name: manifest.name.clone(),
            state,
            tasks,
        }))
    }
}

fn pending_result(index: u32) -> TaskResult {
    TaskResult {
        index,
        status: TaskState::Pending,
        outcome: None,
        output_hash: None,
        output_len: None,
        fuel_used: None,
        agreeing_workers: Vec::new(),
        reason: None,
        output: None,
    }
}

impl<S: Store> Engine<S> {
    /// Tasks `first ..` of a job, at most `max` (and [`MAX_RESULTS_PAGE`]), cut short before
    /// the page would pass [`RESULTS_PAGE_BUDGET`] bytes; at least one task unless `first` is
    /// past the end. Reads only that range from the store. Inline outputs travel in the page.
    fn results_page(
        &mut self,
        job: JobId,
        first: u32,
        max: u32,
    ) -> Result<Option<ResultsPage>, String> {
        let Some(manifest) = self.core.job_manifest(job) else {
            return Ok(None);
        };
        let state = self.core.job_state(job).unwrap_or(JobState::Running);
        let total = manifest.tasks.len() as u32;
        let first = first.min(total);
        let end = first
            .saturating_add(max.clamp(1, MAX_RESULTS_PAGE))
            .min(total);
        let decided = self
            .store
            .task_results_range(job, first, end)
            .map_err(|e| e.to_string())?;
        let mut decided = decided.into_iter().peekable();
        let mut used = manifest.name.len() + 64;
        let mut tasks = Vec::new();
        for index in first..end {
            let mut t = match decided.next_if(|(t, _)| t.index == index) {
                Some((mut t, output)) => {
                    if let Some(Output::Inline(bytes)) = output {
                        t.output = Some(bytes);
                    }
                    t
                }
                None => pending_result(index),
            };
            // Postcard's size of the task, generously: fixed fields, workers, reason, output.
            let size = 128
                + 33 * t.agreeing_workers.len()
                + t.reason.as_ref().map_or(0, |r| r.len())
                + t.output.as_ref().map_or(0, |o| o.len());
            if !tasks.is_empty() && used + size > RESULTS_PAGE_BUDGET {
                break;
            }
            used += size;
            if t.status != TaskState::Accepted {
                t.output = None;
            }
            tasks.push(t);
        }
        Ok(Some(ResultsPage {
            job,
            name: manifest.name.clone(),
            state,
            tasks_total: total,
            first,
            tasks,
        }))
    }
}

/// The engine's thread; joins with the store error that stopped it, if any (or the panic).
pub type EngineThread = std::thread::JoinHandle<Result<(), crate::store::StoreError>>;

/// Spawn the engine on its own thread. Returns its handle, the receiver of output fetches,
/// and the thread's join handle. `died` is cancelled when the engine stops *abnormally* (a
/// store error or a panic), so the shell can stop serving instead of lingering as a
/// coordinator that answers every request with "shutting down"; a normal stop (every
/// sender dropped) leaves it alone.
pub fn spawn<S: Store + 'static>(
    core: Core,
    store: S,
    blobs: blobs::BlobStore,
    queue: usize,
    died: tokio_util::sync::CancellationToken,
) -> Result<
    (
        EngineHandle,
        mpsc::UnboundedReceiver<FetchJob>,
        EngineThread,
    ),
    crate::store::StoreError,
> {
    let (tx, rx) = mpsc::channel(queue);
    let (ftx, frx) = mpsc::unbounded_channel();
    let mut engine = Engine::new(core, store, blobs, ftx);
    engine.resume_fetches()?;
    let stats = engine.stats.clone();
    let thread = std::thread::Builder::new()
        .name("coordinator-engine".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.run(rx)));
            match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "store failed; the engine stopped and the coordinator stops serving (restart it to resume from committed state)");
                    died.cancel();
                    Err(e)
                }
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(panic = %what, "the engine panicked; the coordinator stops serving (restart it to resume from committed state)");
                    died.cancel();
                    std::panic::resume_unwind(panic)
                }
            }
        })
        .expect("spawn engine thread");
    Ok((EngineHandle { tx, stats }, frx, thread))
}
#[cfg(test)]
mod tests;
