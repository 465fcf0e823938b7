//! The deterministic scheduling core: jobs, tasks, replicas and workers, with no I/O.
//!
//! Like quinn-proto or raft-rs's `RawNode`, [`Core`] is driven by events with the current
//! time passed in (`now`, milliseconds since the Unix epoch, so deadlines survive restarts)
//! and never reads a clock or a socket. Each call may leave behind
//! - [`Mutation`]s (take them with [`Core::take_mutations`]) that the shell must commit to the
//!   store *before* it tells anyone about the call's outcome, and
//! - [`Notice`]s (take them with [`Core::take_notices`]): messages to workers and follow-up
//!   work such as fetching an accepted output.
//!
//! Submodules: [`scheduler`] (who gets what), [`validator`] (quorum and verdicts),
//! [`trust`] (reputation policy), [`adversary`] (saboteur scenarios driven through the core
//! by simulated workers, with the figures they produce).

pub mod adversary;
mod deals;
mod replica_table;
pub mod scheduler;
#[cfg(test)]
pub(crate) mod sim;
pub mod trust;
pub mod validator;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use tasks::wire::{
    JobState, JobStatus, PeerAddr, ProgressUpdate, ReplicaId, StatusReport, WorkerStatus,
};
use tasks::{
    BlobId, Determinism, EngineFingerprint, JobId, JobManifest, NodeId, ResultDigest, RunResult,
    TaskId,
};

use crate::store::{Decision, Mutation, ReplicaPhase, Snapshot, Verdict, WorkerRecord};
use trust::{AddressBlock, Reputation, TrustPolicy};

pub use scheduler::Work;
pub use validator::ReportOutcome;

/// How long a worker handed a blob it lacks is listed as a peer that is fetching it.
const FETCHING_FOR_MS: u64 = 60_000;
/// Fetching peers remembered per blob.
const FETCHING_KEPT: usize = 16;

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// A disconnected worker's in-flight replicas are reissued after this long.
    pub disconnect_grace_ms: u64,
    /// Hint sent with an empty batch.
    pub retry_after_ms: u64,
    /// Peers listed per assignment (besides the coordinator).
    pub max_peers: usize,
    /// Open-queue entries examined per pick, so a request costs O(batch), not O(tasks).
    pub open_scan_limit: usize,
    /// The coordinator's own blob server, listed last in every assignment.
    pub seed: Option<PeerAddr>,
    /// Distinct accusers (each holding an assignment that needs the blob) whose `BadPeer`
    /// reports delist a holder of a blob: one worker alone can never delist an honest one.
    pub bad_peer_accusers: usize,
    /// List only the coordinator as a blob source: every worker fetches everything from it.
    /// A baseline for measuring the swarm (`serve --central-only`); wastes upload otherwise.
    pub central_only: bool,
    pub policy: TrustPolicy,
    /// Engines whose workers may join (`EngineFingerprint::engine`, with this release's
    /// settings: [`tasks::release::accepted`]); `None`: any engine. A fingerprint is a
    /// worker's claim and results are compared only within a class, so colluders that invent
    /// an engine would be compared only with each other: `coordinator serve` accepts this
    /// release's engine ([`tasks::release::ENGINE`]) unless its config says otherwise.
    pub engines: Option<Vec<String>>,
    /// Architectures (fingerprint `arch`: `x86_64-linux isa=x86-64-v2`) whose workers may run
    /// `native`-class jobs; `None`: any. Native results are compared only within one
    /// architecture, so colluders claiming an architecture few honest workers have would be
    /// compared mostly with each other: `coordinator serve` admits its own
    /// ([`tasks::release::native_arch`]) unless its config names others.
    pub native_archs: Option<Vec<String>>,
    /// Tells whether a job's module imports the checkpoint API ([`tasks::module`]): such a
    /// job's results are compared without fuel and credited with the smallest fuel among
    /// the agreeing replicas (docs/guest-abi.md). Without a probe no job checkpoints.
    pub checkpoint_probe: CheckpointProbe,
}

/// Whether the module with this id is a checkpointing one (see
/// [`CoreConfig::checkpoint_probe`]); `coordinator serve` reads the module from its blob
/// store.
#[derive(Clone, Default)]
pub struct CheckpointProbe(pub Option<Arc<dyn Fn(&tasks::BlobId) -> bool + Send + Sync>>);

impl std::fmt::Debug for CheckpointProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "CheckpointProbe(set)"
        } else {
            "CheckpointProbe(none)"
        })
    }
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            disconnect_grace_ms: 60_000,
            retry_after_ms: 2_000,
            max_peers: 4,
            open_scan_limit: 256,
            seed: None,
            bad_peer_accusers: tasks::limits::BAD_PEER_ACCUSERS,
            central_only: false,
            policy: TrustPolicy::default(),
            engines: None,
            native_archs: None,
            checkpoint_probe: CheckpointProbe::default(),
        }
    }
}

/// Something the shell must do after a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// Tell this worker to stop these replicas.
    Cancel {
        worker: NodeId,
        replicas: Vec<ReplicaId>,
    },
    /// A task was accepted; its output must be kept. `from` are the agreeing workers.
    Accepted {
        task: TaskId,
        result: RunResult,
        from: Vec<NodeId>,
        replica: ReplicaId,
    },
    /// A task ended without consensus.
    Failed {
        task: TaskId,
        reason: String,
    },
    JobEnded {
        job: JobId,
        state: JobState,
    },
    /// This worker was refused work because its hand (replicas and undecided votes) was
    /// full, and a vote of it was just decided; or it found no work and a replica was just
    /// dealt to it or left to anyone: tell it to ask again now.
    Room {
        worker: NodeId,
    },
}

/// Why [`Core::retry_failed`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RetryError {
    #[error("no such job")]
    UnknownJob,
    #[error("the job was cancelled: submit it again to run it")]
    Cancelled,
}

/// Lifecycle of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskPhase {
    Pending,
    Accepted,
    Failed,
}

#[derive(Debug, Clone)]
pub(crate) struct TaskSlot {
    pub phase: TaskPhase,
    /// Effective quorum; 0 = the job's.
    pub quorum: u32,
    pub replicas: Vec<ReplicaId>,
    /// In its job's open queue.
    pub queued: bool,
    /// For accepted tasks: the fingerprint and digest later reports are judged against.
    pub accepted: Option<(u32, ResultDigest)>,
    /// Its partner replicas go out only once `Core::issued` reaches this (see
    /// `TrustPolicy::partner_spread`). Not persisted.
    pub ready_at: u64,
}

impl TaskSlot {
    fn new() -> TaskSlot {
        TaskSlot {
            phase: TaskPhase::Pending,
            quorum: 0,
            replicas: Vec::new(),
            queued: false,
            accepted: None,
            ready_at: 0,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Job {
    pub id: JobId,
    pub manifest: Arc<JobManifest>,
    pub state: JobState,
    pub tasks: Vec<TaskSlot>,
    /// Tasks below this index have been issued at least once.
    pub next_fresh: u32,
    /// Issued, undecided tasks that need more replicas, oldest first.
    pub open: VecDeque<u32>,
    pub done: u32,
    pub failed: u32,
    pub in_flight: u32,
    pub reported: u32,
    /// Its module imports the checkpoint API: results compared without fuel.
    pub checkpoints: bool,
    /// Which engines its replicas run on (and so which results are compared).
    pub determinism: Determinism,
    /// Its cold-start hold (see `TrustPolicy::deal_partners`). Not persisted: a restarted
    /// coordinator holds anew.
    pub hold: ColdHold,
}

/// A job's first deal window: until it is over, while no anchor of its engine is connected,
/// no decision is made for a group no anchor is part of (accepted or failed, contested or
/// not); then the held tasks are decided in [`Core::hold_order`], and split votes wait one
/// more window before they fail a task. Idle workers dealt its first replicas ask within
/// the window; the disputes they raise ban the liars whose votes would otherwise decide the
/// tasks those liars took first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ColdHold {
    /// Nothing assigned yet.
    Unstarted,
    /// Held until then (ms).
    Until(u64),
    /// Decided since, but a split vote still does not fail a task until then (ms): a liar
    /// caught by the decisions at the end of the hold loses its vote meanwhile.
    Failing(u64),
    Over,
}

#[derive(Debug, Clone)]
pub(crate) struct Replica {
    pub task: TaskId,
    pub worker: NodeId,
    pub fp: u32,
    pub deadline_ms: u64,
    pub phase: ReplicaPhase,
    pub result: Option<(ResultDigest, RunResult)>,
    pub verdict: Option<Verdict>,
    /// Its worker was an anchor when it got the replica, then (once reported) when it
    /// answered. Not persisted: rebuilt from reputations on restore.
    pub anchor: bool,
    /// Its worker's address block when it got the replica.
    pub block: Option<AddressBlock>,
    /// For a lost replica: the first replica id allocated after it was lost. A task replica
    /// at or above it is a reissue, and a late report then earns nothing. Not persisted
    /// (restored as `replica + 1`: stricter).
    pub lost_mark: ReplicaId,
    /// The deadline it was issued with (not persisted: restored as `deadline_ms`), the base
    /// of how far progress may push `deadline_ms` back.
    pub first_deadline_ms: u64,
    /// What its worker last said of its progress (not persisted).
    pub progress: Option<f64>,
}

#[derive(Debug)]
pub(crate) struct Worker {
    pub id: NodeId,
    /// Its engine's fingerprint for `portable` jobs (the one its hello names).
    pub fp: Option<u32>,
    /// Its engine's fingerprint for `native` jobs (`WorkerMsg::Engines`), this session; a
    /// worker without one gets no replica of a `native` job.
    pub native_fp: Option<u32>,
    pub slots: u32,
    pub connected: bool,
    pub disconnected_ms: Option<u64>,
    pub peer_addr: Option<SocketAddr>,
    /// Where this session's connection came from, as the shell saw it.
    pub observed_addr: Option<SocketAddr>,
    /// A dial-back to `observed_addr` succeeded this session: a super-peer, listed first.
    pub reachable: bool,
    pub credit_fuel: u64,
    pub rep: Reputation,
    pub in_flight: BTreeSet<ReplicaId>,
    pub last_seen_ms: u64,
    /// Counted in `Core::anchors` (connected and trusted), and in `Core::anchors_by_fp`
    /// under these fingerprints (portable, native).
    pub anchor: Option<(u32, Option<u32>)>,
    /// Its reported replicas of tasks still pending.
    pub undecided: u32,
    /// Its last request was refused only because its hand was full: the next decided vote
    /// sends it [`Notice::Room`].
    pub waiting_for_room: bool,
    /// Its last request found no work it could take (told to wait the full retry hint):
    /// a replica dealt to it, or one left to anyone, sends it [`Notice::Room`] at once.
    pub waiting_for_work: bool,
    /// Replicas it lost (deadline, abandon, disconnect) not yet made up for by valid
    /// results: each costs capacity (see `TrustPolicy::allowance`). Not persisted.
    pub lost: u64,
    /// Blobs it is listed as a holder of (bounded by `limits::MAX_HAVE_BLOBS_PER_WORKER`).
    pub holding: usize,
    /// A newcomer to an established pool: it first joined while anchors of its engine were
    /// connected (see `TrustPolicy::anchors_decide_for_newcomers`). Workers of a cold start
    /// are not. Persisted.
    pub junior: bool,
}

impl Worker {
    /// The address block the address rule judges this worker by: the observed address, or
    /// (if the shell gave none) the one it announced.
    pub fn block(&self) -> Option<AddressBlock> {
        self.observed_addr
            .or(self.peer_addr)
            .as_ref()
            .and_then(trust::address_block)
    }
}

/// The scheduler/validator state machine. See the module doc.
#[derive(Debug)]
pub struct Core {
    pub(crate) cfg: CoreConfig,
    pub(crate) jobs: BTreeMap<JobId, Job>,
    /// Running jobs in round-robin order.
    pub(crate) running: Vec<JobId>,
    pub(crate) rr: usize,
    pub(crate) replicas: replica_table::ReplicaTable,
    pub(crate) workers: HashMap<NodeId, Worker>,
    pub(crate) fingerprints: Vec<(String, EngineFingerprint)>,
    fp_index: HashMap<String, u32>,
    /// In-flight replicas by deadline.
    pub(crate) deadlines: BTreeSet<(u64, ReplicaId)>,
    pub(crate) holders: HashMap<BlobId, Vec<NodeId>>,
    /// Workers recently handed a task whose blob they did not hold (they are fetching it,
    /// and serve the chunks they have), newest last, with when. Not persisted: a hint.
    pub(crate) fetching: HashMap<BlobId, VecDeque<(NodeId, u64)>>,
    /// A new job woke only the idle super-peers (see [`Core::wake_for_new_job`]): the
    /// first of them handed a replica wakes the other idle workers.
    pub(crate) wake_rest_on_assign: bool,
    /// Connected anchors (trusted workers).
    pub(crate) anchors: usize,
    /// Slots of connected workers (each clamped as in [`Core::hello`]): the divisor of a
    /// worker's fair share of the work left (see `scheduler`).
    pub(crate) connected_slots: u64,
    /// Workers connected now that are not banned (that may take work), in an order that
    /// lets the dealer draw one at random in O(1).
    pub(crate) roster: indexmap::IndexSet<NodeId>,
    /// Exactly the workers whose `waiting_for_work` is set (their last request found no
    /// work): waking the idle visits these, in roster order, not the whole roster. (Visiting
    /// the roster on every queued replica was O(workers) per work request: at 100,000
    /// connected workers, ~5 ms each, and requests waited 10-26 s in the engine's queue.)
    pub(crate) idle: HashSet<NodeId>,
    /// Tasks whose next replica is reserved for one worker (see
    /// `TrustPolicy::deal_partners`).
    pub(crate) deals: deals::Deals,
    /// Connected anchors per engine fingerprint (entries at zero removed).
    pub(crate) anchors_by_fp: BTreeMap<u32, usize>,
    /// Workers banned by verdicts not yet settled (see `settle_bans`).
    pub(crate) newly_banned: Vec<NodeId>,
    next_replica: ReplicaId,
    next_job: u64,
    /// Replicas assigned so far (this run): the clock of `TaskSlot::ready_at`.
    pub(crate) issued: u64,
    /// Seeded from the policy's seed: who gets a partner replica is the coordinator's
    /// unpredictable (but reproducible) choice.
    pub(crate) rng: rand::rngs::StdRng,
    /// `BadPeer` accusers per (blob, accused holder), until the holder is delisted.
    pub(crate) accusations: BTreeMap<(BlobId, NodeId), BTreeSet<NodeId>>,
    pub(crate) mutations: Vec<Mutation>,
    pub(crate) notices: Vec<Notice>,
    /// When [`Core::tick`] last ran (deals lapsed up to then were seen).
    last_tick_ms: u64,
}

impl Core {
    pub fn new(cfg: CoreConfig) -> Core {
        Core {
            rng: rand::SeedableRng::seed_from_u64(cfg.policy.seed),
            cfg,
            jobs: BTreeMap::new(),
            running: Vec::new(),
            rr: 0,
            replicas: replica_table::ReplicaTable::default(),
            workers: HashMap::new(),
            fingerprints: Vec::new(),
            fp_index: HashMap::new(),
            deadlines: BTreeSet::new(),
            holders: HashMap::new(),
            fetching: HashMap::new(),
            wake_rest_on_assign: false,
            anchors: 0,
            connected_slots: 0,
            roster: indexmap::IndexSet::new(),
            idle: HashSet::new(),
            deals: deals::Deals::default(),
            anchors_by_fp: BTreeMap::new(),
            newly_banned: Vec::new(),
            next_replica: 1,
            next_job: 1,
            issued: 0,
            accusations: BTreeMap::new(),
            mutations: Vec::new(),
            notices: Vec::new(),
            last_tick_ms: 0,
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// Mutations produced since the last call; commit them before acting on the outcome.
    pub fn take_mutations(&mut self) -> Vec<Mutation> {
        std::mem::take(&mut self.mutations)
    }

    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// Whether a worker with this fingerprint may join: an engine the configuration accepts
    /// ([`CoreConfig::engines`]), of a known class or with room for a new one
    /// ([`tasks::limits::MAX_ENGINE_FINGERPRINTS`]). The error says why, in one line.
    pub fn admits_fingerprint(&self, fp: &EngineFingerprint) -> Result<(), String> {
        if let Some(engines) = &self.cfg.engines {
            if !tasks::release::accepted(fp, engines) {
                return Err(format!(
                    "engine {:?} with settings {:?} is not one this coordinator accepts ({}, with this release's settings): run the worker release the project names",
                    fp.engine,
                    fp.settings,
                    engines.join(", ")
                ));
            }
        }
        if self.fingerprints.len() >= tasks::limits::MAX_ENGINE_FINGERPRINTS
            && !self.fp_index.contains_key(&fp.class_id())
        {
            return Err(format!(
                "the coordinator already knows {} engine classes: run a worker release others run",
                self.fingerprints.len()
            ));
        }
        Ok(())
    }

    /// The index of `fp`'s class ([`EngineFingerprint::class_id`]: results are compared within
    /// it), recording the class on first sight with `fp` as its example.
    pub(crate) fn intern_fp(&mut self, fp: &EngineFingerprint) -> u32 {
        let short = fp.class_id();
        if let Some(&i) = self.fp_index.get(&short) {
            return i;
        }
        let i = self.fingerprints.len() as u32;
        self.fingerprints.push((short.clone(), fp.clone()));
        self.fp_index.insert(short.clone(), i);
        self.mutations.push(Mutation::Fingerprint {
            short,
            fingerprint: fp.clone(),
        });
        i
    }

    pub(crate) fn fp_short(&self, fp: u32) -> String {
        self.fingerprints[fp as usize].0.clone()
    }

    pub(crate) fn worker_record(&self, w: &Worker) -> WorkerRecord {
        WorkerRecord {
            node: w.id,
            fingerprint: w.fp.map(|f| self.fp_short(f)),
            credit_fuel: w.credit_fuel,
            reputation: w.rep,
            last_seen_ms: w.last_seen_ms,
            lost: w.lost,
            junior: w.junior,
        }
    }

    pub(crate) fn persist_worker(&mut self, id: NodeId) {
        if let Some(w) = self.workers.get(&id) {
            let rec = self.worker_record(w);
            self.mutations.push(Mutation::Worker(rec));
        }
    }

    fn worker_entry(&mut self, id: NodeId, now: u64) -> &mut Worker {
        self.workers.entry(id).or_insert_with(|| Worker {
            id,
            fp: None,
            native_fp: None,
            slots: 1,
            connected: false,
            disconnected_ms: None,
            peer_addr: None,
            observed_addr: None,
            reachable: false,
            credit_fuel: 0,
            rep: Reputation::default(),
            in_flight: BTreeSet::new(),
            last_seen_ms: now,
            anchor: None,
            undecided: 0,
            waiting_for_room: false,
            waiting_for_work: false,
            lost: 0,
            holding: 0,
            junior: false,
        })
    }

    /// Keep `anchors` in step with a worker's connection and trust.
    pub(crate) fn sync_anchor(&mut self, id: NodeId) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let want = (w.connected && self.cfg.policy.is_trusted(&w.rep))
            .then_some((w.fp.unwrap_or(u32::MAX), w.native_fp));
        if want == w.anchor {
            return;
        }
        if let Some((fp, native)) = w.anchor.take() {
            self.anchors -= 1;
            for fp in std::iter::once(fp).chain(native) {
                if let Some(n) = self.anchors_by_fp.get_mut(&fp) {
                    *n -= 1;
                    if *n == 0 {
                        self.anchors_by_fp.remove(&fp);
                    }
                }
            }
        }
        if let Some((fp, native)) = want {
            self.anchors += 1;
            for fp in std::iter::once(fp).chain(native) {
                *self.anchors_by_fp.entry(fp).or_insert(0) += 1;
            }
        }
        w.anchor = want;
    }

    /// A worker session began (or resumed after a reconnect).
    pub fn hello(
        &mut self,
        worker: NodeId,
        fp: &EngineFingerprint,
        slots: u32,
        peer_addr: Option<SocketAddr>,
        blobs: &[BlobId],
        now: u64,
    ) {
        let fpi = self.intern_fp(fp);
        // An identity never seen before, joining while anchors of its engine are connected,
        // is a newcomer to an established pool.
        let junior = !self.workers.contains_key(&worker) && self.anchors_of(fpi) > 0;
        let w = self.worker_entry(worker, now);
        w.junior |= junior;
        w.fp = Some(fpi);
        // A new session names its native engine anew (`engines`), if it has one.
        w.native_fp = None;
        let was = if w.connected { u64::from(w.slots) } else { 0 };
        let newly = !w.connected;
        // A claim, not a fact: clamped, and capacity follows delivered results anyway.
        w.slots = slots.clamp(1, tasks::limits::MAX_WORKER_SLOTS);
        w.connected = true;
        let slots_now = u64::from(w.slots);
        self.connected_slots = self.connected_slots.saturating_sub(was) + slots_now;
        let banned = self.cfg.policy.is_banned(&self.workers[&worker].rep);
        if newly && !banned {
            self.roster.insert(worker);
        }
        let w = self.workers.get_mut(&worker).expect("just made");
        w.disconnected_ms = None;
        w.last_seen_ms = now;
        // A new session: the shell tells us where it comes from with `observed_address`,
        // and whether it answers a dial-back with `set_reachable`.
        w.observed_addr = None;
        w.reachable = false;
        let addr_changed = w.peer_addr != peer_addr;
        w.peer_addr = peer_addr;
        if addr_changed {
            self.mutations.push(Mutation::PeerAddr {
                worker,
                addr: peer_addr,
            });
        }
        self.sync_anchor(worker);
        self.persist_worker(worker);
        self.have_blobs(worker, blobs);
    }

    /// The address this session's connection comes from (the QUIC remote address), after
    /// `hello`. The address-block rule judges workers by it; a worker cannot choose it as
    /// freely as the address it announces.
    pub fn observed_address(&mut self, worker: NodeId, addr: SocketAddr) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.observed_addr = Some(addr);
        }
    }

    /// The worker also runs `native` jobs, with engine `fp` (after `hello`, this session).
    /// The shell has checked `fp` ([`Core::admits_native`]).
    pub fn engines(&mut self, worker: NodeId, fp: &EngineFingerprint) {
        if !self.workers.get(&worker).is_some_and(|w| w.connected) {
            return;
        }
        let fpi = self.intern_fp(fp);
        if let Some(w) = self.workers.get_mut(&worker) {
            w.native_fp = Some(fpi);
        }
        self.sync_anchor(worker);
    }

    /// Whether `native` may be the native engine of a worker whose hello named `portable`:
    /// an engine this coordinator admits, the same engine and architecture, with this
    /// release's settings of the `native` class. The error says why, in one line.
    pub fn admits_native(
        &self,
        portable: &EngineFingerprint,
        native: &EngineFingerprint,
    ) -> Result<(), String> {
        self.admits_fingerprint(native)?;
        if native.engine != portable.engine || native.arch != portable.arch {
            return Err(format!(
                "the native engine ({} on {}) is not the engine of the hello ({} on {})",
                native.engine, native.arch, portable.engine, portable.arch
            ));
        }
        if native.settings != tasks::release::settings(false) {
            return Err(format!(
                "the native engine's settings {:?} are not this release's native settings",
                native.settings
            ));
        }
        if let Some(archs) = &self.cfg.native_archs {
            if !archs.contains(&native.arch) {
                return Err(format!(
                    "this coordinator runs native-class jobs only on {} (its [engines] native_archs), not on {}: the worker still runs portable jobs",
                    archs.join(", "),
                    native.arch
                ));
            }
        }
        Ok(())
    }

    /// The shell's dial-back to the worker's observed address succeeded (or not): reachable
    /// workers are listed before the others as peers (the swarm's super-peers).
    pub fn set_reachable(&mut self, worker: NodeId, reachable: bool) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.reachable = reachable && w.connected;
        }
    }

    /// Where `from` must be dialled from for a simultaneous open with `peer`: `Some(from's
    /// address)` when both are connected and `peer` is not known to be directly reachable
    /// (a reachable peer needs no help).
    pub fn punch_target(&self, from: &NodeId, peer: &NodeId) -> Option<SocketAddr> {
        let p = self.workers.get(peer)?;
        let f = self.workers.get(from)?;
        if from == peer || !p.connected || p.reachable || !f.connected {
            return None;
        }
        f.peer_addr
    }

    /// Connected anchors: workers trusted through their agreement history.
    pub fn anchors_connected(&self) -> usize {
        self.anchors
    }

    /// Connected anchors whose engine has fingerprint `fp`.
    pub(crate) fn anchors_of(&self, fp: u32) -> usize {
        self.anchors_by_fp.get(&fp).copied().unwrap_or(0)
    }

    /// Whether the policy has banned this worker (no work, votes on undecided tasks void).
    pub fn is_banned(&self, worker: &NodeId) -> bool {
        self.workers
            .get(worker)
            .is_some_and(|w| self.cfg.policy.is_banned(&w.rep))
    }

    /// The worker now holds and serves these blobs. At most
    /// [`tasks::limits::MAX_HAVE_BLOBS_PER_MSG`] of one message are taken, and a worker is
    /// listed for at most [`tasks::limits::MAX_HAVE_BLOBS_PER_WORKER`] blobs: one identity
    /// cannot grow the tracker without bound.
    pub fn have_blobs(&mut self, worker: NodeId, blobs: &[BlobId]) {
        let Some(holding) = self.workers.get(&worker).map(|w| w.holding) else {
            return;
        };
        let room = tasks::limits::MAX_HAVE_BLOBS_PER_WORKER.saturating_sub(holding);
        let mut added = 0;
        for b in blobs.iter().take(tasks::limits::MAX_HAVE_BLOBS_PER_MSG) {
            if added >= room {
                break;
            }
            let h = self.holders.entry(*b).or_default();
            if !h.contains(&worker) {
                h.push(worker);
                added += 1;
                self.mutations.push(Mutation::BlobLocation {
                    blob: *b,
                    worker,
                    present: true,
                });
            }
        }
        if let Some(w) = self.workers.get_mut(&worker) {
            w.holding += added;
        }
    }

    /// `accuser` reports that `peer` served bad data for `blob`. The accusation counts only
    /// if `accuser` holds an in-flight replica whose task needs `blob` (so it was handed
    /// holders of it) and `peer` is listed as a holder; `peer` stops being listed once
    /// [`CoreConfig::bad_peer_accusers`] distinct accusers agree. Returns whether it
    /// counted.
    pub fn bad_peer(&mut self, accuser: NodeId, peer: NodeId, blob: BlobId) -> bool {
        if accuser == peer || !self.holders.get(&blob).is_some_and(|h| h.contains(&peer)) {
            return false;
        }
        let needs = self.workers.get(&accuser).is_some_and(|w| {
            w.in_flight.iter().any(|r| {
                self.replicas.get(r).is_some_and(|rep| {
                    self.jobs.get(&rep.task.job).is_some_and(|j| {
                        j.manifest.module.id == blob
                            || j.manifest
                                .tasks
                                .get(rep.task.index as usize)
                                .is_some_and(|t| t.input.is_some_and(|i| i.id == blob))
                    })
                })
            })
        });
        if !needs {
            return false;
        }
        let accusers = self.accusations.entry((blob, peer)).or_default();
        accusers.insert(accuser);
        if accusers.len() < self.cfg.bad_peer_accusers.max(1) {
            return true;
        }
        self.accusations.remove(&(blob, peer));
        if let Some(h) = self.holders.get_mut(&blob) {
            if let Some(pos) = h.iter().position(|n| *n == peer) {
                h.swap_remove(pos);
                if let Some(w) = self.workers.get_mut(&peer) {
                    w.holding = w.holding.saturating_sub(1);
                }
                self.mutations.push(Mutation::BlobLocation {
                    blob,
                    worker: peer,
                    present: false,
                });
            }
        }
        true
    }

    /// The worker's session ended. Its replicas stay assigned for the grace period.
    pub fn disconnect(&mut self, worker: NodeId, now: u64) {
        if let Some(w) = self.workers.get_mut(&worker) {
            if w.connected {
                self.connected_slots = self.connected_slots.saturating_sub(u64::from(w.slots));
                self.roster.swap_remove(&worker);
            }
            w.connected = false;
            w.reachable = false;
            w.disconnected_ms = Some(now);
            w.last_seen_ms = now;
        }
        self.sync_anchor(worker);
    }

    /// Whether a worker has an open session.
    pub fn is_connected(&self, worker: &NodeId) -> bool {
        self.workers.get(worker).is_some_and(|w| w.connected)
    }

    /// Replicas this worker holds in flight.
    pub fn in_flight_of(&self, worker: &NodeId) -> Vec<ReplicaId> {
        self.workers
            .get(worker)
            .map(|w| w.in_flight.iter().copied().collect())
            .unwrap_or_default()
    }

    /// End the cold-start holds due by `now`, and decide what they held.
    pub(crate) fn end_holds(&mut self, now: u64) {
        let due: Vec<JobId> = self
            .running
            .iter()
            .copied()
            .filter(|j| {
                matches!(self.jobs[j].hold, ColdHold::Until(t) | ColdHold::Failing(t) if t <= now)
            })
            .collect();
        let window = self.cfg.retry_after_ms.saturating_mul(2);
        for job in due {
            let j = self.jobs.get_mut(&job).expect("running");
            j.hold = match j.hold {
                ColdHold::Until(_) => ColdHold::Failing(now.saturating_add(window)),
                _ => ColdHold::Over,
            };
            let pending: Vec<TaskId> = (0..j.next_fresh)
                .filter(|&i| j.tasks[i as usize].phase == TaskPhase::Pending)
                .map(|index| TaskId { job, index })
                .collect();
            for t in self.hold_order(pending) {
                self.reevaluate(t, now);
                // Liars caught by this decision lose their votes before the next one.
                self.settle_bans(now);
            }
        }
        self.settle_bans(now);
    }

    /// The order a hold's tasks are decided in: contested acceptances, then uncontested
    /// ones, then failures; within each, first those whose leading workers were least often
    /// outvoted on the job's other held tasks. Nobody has a record yet, but in a
    /// pool where most workers are honest, a liar is in the minority of most disputes it is
    /// part of: deciding its losing disputes first bans it before its votes can decide
    /// anything. Ties by task index.
    fn hold_order(&self, tasks: Vec<TaskId>) -> Vec<TaskId> {
        let tallies: Vec<(TaskId, validator::Tally)> =
            tasks.into_iter().map(|t| (t, self.tally(t))).collect();
        let worker = |r: &tasks::wire::ReplicaId| self.replicas.get(r).map(|x| x.worker);
        let mut record: HashMap<NodeId, (u32, u32)> = HashMap::new();
        for (_, t) in &tallies {
            let Some(lead) = t.groups.iter().max_by_key(|g| g.replicas.len()) else {
                continue;
            };
            let rivals: Vec<&validator::Group> = t
                .groups
                .iter()
                .filter(|g| g.key.0 == lead.key.0 && g.key != lead.key)
                .collect();
            // Undisputed, or a tie: nobody was outvoted.
            if rivals.is_empty()
                || rivals
                    .iter()
                    .any(|g| g.replicas.len() == lead.replicas.len())
            {
                continue;
            }
            for g in rivals.into_iter().chain(std::iter::once(lead)) {
                let outvoted = g.key != lead.key;
                for w in g.replicas.iter().filter_map(worker) {
                    let e = record.entry(w).or_default();
                    if outvoted {
                        e.1 += 1;
                    } else {
                        e.0 += 1;
                    }
                }
            }
        }
        let outvoted_rate = |t: &validator::Tally| -> f64 {
            let Some(lead) = t.groups.iter().max_by_key(|g| g.replicas.len()) else {
                return 0.0;
            };
            let rates: Vec<f64> = lead
                .replicas
                .iter()
                .filter_map(worker)
                .map(|w| {
                    let (won, lost) = record.get(&w).copied().unwrap_or_default();
                    f64::from(lost) / f64::from((won + lost).max(1))
                })
                .collect();
            rates.iter().sum::<f64>() / rates.len().max(1) as f64
        };
        // Accepted disputes first: deciding them is what catches liars; then what nobody
        // contradicted; failures last (a liar's vote voided meanwhile may save the task).
        let kind = |task: TaskId, t: &validator::Tally| -> u8 {
            match self.need(task) {
                validator::Need::Accept { .. } if t.contested() => 0,
                validator::Need::Accept { .. } => 1,
                validator::Need::More { .. } => 2,
                validator::Need::Fail(_) => 3,
            }
        };
        let mut keyed: Vec<(u8, f64, TaskId)> = tallies
            .iter()
            .map(|(task, t)| (kind(*task, t), outvoted_rate(t), *task))
            .collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)));
        keyed.into_iter().map(|(_, _, t)| t).collect()
    }

    /// Deadlines and disconnect grace periods: reissue what has expired.
    pub fn tick(&mut self, now: u64) {
        self.end_holds(now);
        // A deal that lapsed since the last tick left its replica to anyone: wake the idle.
        // So does a new job whose super-peers took nothing within a tick (another engine
        // class, say): the rest are not left to their retry hint.
        let new_job_unserved = std::mem::take(&mut self.wake_rest_on_assign);
        if new_job_unserved || self.deals.lapses_between(self.last_tick_ms, now) {
            self.wake_idle();
        }
        self.last_tick_ms = self.last_tick_ms.max(now);
        let expired: Vec<ReplicaId> = self.deadlines.range(..(now, 0)).map(|&(_, r)| r).collect();
        for r in expired {
            self.lose(r, now);
        }
        let gone: Vec<NodeId> = self
            .workers
            .values()
            .filter(|w| !w.connected && !w.in_flight.is_empty())
            .filter(|w| {
                w.disconnected_ms
                    .is_some_and(|t| now.saturating_sub(t) >= self.cfg.disconnect_grace_ms)
            })
            .map(|w| w.id)
            .collect();
        for id in gone {
            for r in self.in_flight_of(&id) {
                self.lose(r, now);
            }
        }
        self.settle_bans(now);
    }

    /// The worker will not finish these replicas: reissue them at once. Replicas not in flight
    /// on this worker are ignored.
    pub fn abandon(&mut self, worker: NodeId, replicas: &[ReplicaId], now: u64) {
        for r in replicas {
            if self
                .replicas
                .get(r)
                .is_some_and(|x| x.worker == worker && x.phase == ReplicaPhase::InFlight)
            {
                self.lose(*r, now);
            }
        }
        self.settle_bans(now);
    }

    /// `worker` says it still has exactly `held` (sent once, right after it connects): every
    /// replica in flight on it that is not listed is lost now, as if abandoned, instead of
    /// at its deadline. Those are assignments committed here whose `Assign` never reached
    /// the worker (this coordinator or the connection died in between), or replicas a
    /// restarted worker no longer has. Returns how many were taken back.
    pub fn reconcile(&mut self, worker: NodeId, held: &[ReplicaId], now: u64) -> usize {
        let Some(w) = self.workers.get(&worker) else {
            return 0;
        };
        let held: HashSet<ReplicaId> = held.iter().copied().collect();
        let gone: Vec<ReplicaId> = w
            .in_flight
            .iter()
            .copied()
            .filter(|r| !held.contains(r))
            .collect();
        self.abandon(worker, &gone, now);
        gone.len()
    }

    /// `worker` says how far replicas it holds have come ([`tasks::wire::WorkerMsg::Progress`]).
    /// Updates for replicas not in flight on it, or with a fraction outside 0..=1, are
    /// ignored. A replica whose fraction advanced, or that is paused, has its deadline pushed
    /// to `now` + its job's deadline, never beyond [`MAX_DEADLINE_STRETCH`] job deadlines
    /// after it was issued. Returns how many deadlines moved. Not persisted: after a restart
    /// the replica's last committed deadline applies again.
    ///
    /// [`MAX_DEADLINE_STRETCH`]: tasks::limits::MAX_DEADLINE_STRETCH
    pub fn progress(&mut self, worker: NodeId, updates: &[ProgressUpdate], now: u64) -> usize {
        let mut moved = 0;
        for u in updates.iter().take(tasks::limits::MAX_PROGRESS_PER_MSG) {
            if !(0.0..=1.0).contains(&u.fraction) {
                continue;
            }
            let Some(rep) = self.replicas.get_mut(&u.replica) else {
                continue;
            };
            if rep.worker != worker || rep.phase != ReplicaPhase::InFlight {
                continue;
            }
            let advanced = rep.progress.is_none_or(|p| u.fraction > p);
            if advanced {
                rep.progress = Some(u.fraction);
            }
            if !(advanced || u.paused) {
                continue;
            }
            let Some(job) = self.jobs.get(&rep.task.job) else {
                continue;
            };
            let window = job.manifest.limits.deadline_secs.saturating_mul(1000);
            let issued = rep.first_deadline_ms.saturating_sub(window);
            let limit =
                issued.saturating_add(window.saturating_mul(tasks::limits::MAX_DEADLINE_STRETCH));
            let new = now.saturating_add(window).min(limit);
            if new > rep.deadline_ms {
                self.deadlines.remove(&(rep.deadline_ms, u.replica));
                rep.deadline_ms = new;
                self.deadlines.insert((new, u.replica));
                moved += 1;
            }
        }
        moved
    }

    /// How far `job`'s running tasks are: each task whose in-flight replicas reported
    /// progress, at its furthest one. Walks the replicas in flight (not the job's tasks), so
    /// it stays cheap for a job of millions of tasks.
    pub fn job_progress(&self, job: JobId) -> Option<tasks::wire::JobProgress> {
        self.jobs.get(&job)?;
        let mut by_task: BTreeMap<u32, f64> = BTreeMap::new();
        for (_, r) in &self.deadlines {
            let Some(rep) = self.replicas.get(r) else {
                continue;
            };
            if rep.task.job != job {
                continue;
            }
            if let Some(p) = rep.progress {
                let e = by_task.entry(rep.task.index).or_insert(p);
                *e = e.max(p);
            }
        }
        Some(tasks::wire::JobProgress {
            job,
            reporting: by_task.len() as u32,
            tasks: by_task
                .into_iter()
                .take(tasks::wire::MAX_PROGRESS_TASKS)
                .map(|(index, fraction)| tasks::wire::TaskProgress { index, fraction })
                .collect(),
        })
    }

    /// Take an in-flight replica away from its worker (it was not reported in time). The loss
    /// counts against the worker's capacity, and the task is never reissued to it.
    fn lose(&mut self, r: ReplicaId, now: u64) {
        let Some(rep) = self.replicas.get_mut(&r) else {
            return;
        };
        if rep.phase != ReplicaPhase::InFlight {
            return;
        }
        rep.phase = ReplicaPhase::Lost;
        rep.lost_mark = self.next_replica;
        let (task, worker, deadline) = (rep.task, rep.worker, rep.deadline_ms);
        self.deadlines.remove(&(deadline, r));
        if let Some(w) = self.workers.get_mut(&worker) {
            w.in_flight.remove(&r);
            // Losing work is not free: it costs capacity until valid results make up for it.
            w.lost = w.lost.saturating_add(1);
        }
        self.persist_worker(worker);
        self.mutations.push(Mutation::Phase {
            replica: r,
            phase: ReplicaPhase::Lost,
        });
        if let Some(job) = self.jobs.get_mut(&task.job) {
            job.in_flight -= 1;
        }
        self.reevaluate(task, now);
    }

    /// Register a `portable` job (what every job was before determinism classes); its tasks
    /// become schedulable at once.
    pub fn add_job(&mut self, manifest: JobManifest, now: u64) -> (JobId, u32) {
        self.add_job_in(manifest, Determinism::Portable, now)
    }

    /// Register a job of determinism class `determinism`: its replicas go only to workers
    /// with an engine of that class, and are compared within it.
    pub fn add_job_in(
        &mut self,
        manifest: JobManifest,
        determinism: Determinism,
        now: u64,
    ) -> (JobId, u32) {
        let id = JobId(self.next_job);
        self.next_job += 1;
        let manifest = Arc::new(manifest);
        let n = manifest.tasks.len() as u32;
        self.mutations.push(Mutation::PutJob {
            job: id,
            manifest: manifest.clone(),
            determinism,
            created_ms: now,
        });
        let module = manifest.module.id;
        self.insert_job(id, manifest, determinism, JobState::Running);
        self.wake_for_new_job(module, now);
        (id, n)
    }

    /// A job's determinism class.
    pub fn job_determinism(&self, job: JobId) -> Option<Determinism> {
        self.jobs.get(&job).map(|j| j.determinism)
    }

    /// The class of `job` (none if unknown), or of every job when `None`, in id order.
    pub fn job_classes(&self, job: Option<JobId>) -> Vec<(JobId, Determinism)> {
        match job {
            Some(id) => self
                .jobs
                .get(&id)
                .map(|j| (id, j.determinism))
                .into_iter()
                .collect(),
            None => self.jobs.values().map(|j| (j.id, j.determinism)).collect(),
        }
    }

    fn insert_job(
        &mut self,
        id: JobId,
        manifest: Arc<JobManifest>,
        determinism: Determinism,
        state: JobState,
    ) {
        let n = manifest.tasks.len();
        let checkpoints = self
            .cfg
            .checkpoint_probe
            .0
            .as_ref()
            .is_some_and(|probe| probe(&manifest.module.id));
        self.jobs.insert(
            id,
            Job {
                id,
                manifest,
                state,
                tasks: vec![TaskSlot::new(); n],
                next_fresh: 0,
                open: VecDeque::new(),
                done: 0,
                failed: 0,
                in_flight: 0,
                reported: 0,
                checkpoints,
                determinism,
                hold: if self.cfg.policy.deal_partners {
                    ColdHold::Unstarted
                } else {
                    ColdHold::Over
                },
            },
        );
        if state == JobState::Running {
            self.running.push(id);
        }
        self.next_job = self.next_job.max(id.0 + 1);
    }

    /// Cancel a job: its in-flight replicas are cancelled, nothing more is scheduled.
    /// Returns false for an unknown job.
    pub fn cancel_job(&mut self, job: JobId, _now: u64) -> bool {
        let Some(j) = self.jobs.get_mut(&job) else {
            return false;
        };
        if j.state != JobState::Running {
            return true;
        }
        j.state = JobState::Cancelled;
        j.open.clear();
        self.running.retain(|x| *x != job);
        self.deals.remove_job(job);
        self.mutations.push(Mutation::JobState {
            job,
            state: JobState::Cancelled,
        });
        let pending: Vec<TaskId> = (0..j.next_fresh)
            .filter(|&i| j.tasks[i as usize].phase == TaskPhase::Pending)
            .map(|index| TaskId { job, index })
            .collect();
        for t in pending {
            self.release_votes(t);
        }
        let in_flight: Vec<ReplicaId> = self
            .replicas
            .iter()
            .filter(|(_, r)| r.task.job == job && r.phase == ReplicaPhase::InFlight)
            .map(|(id, _)| id)
            .collect();
        self.cancel_replicas(&in_flight);
        self.notices.push(Notice::JobEnded {
            job,
            state: JobState::Cancelled,
        });
        true
    }

    /// Send a job's failed tasks back to pending with a fresh replica budget: their earlier
    /// replicas (all ended: a task fails only with none in flight) stop counting and are
    /// forgotten, so a late report of one is refused as unknown. Accepted tasks are never
    /// touched. A job that had ended runs again. Returns how many tasks went back (0: the job
    /// had no failed task, and nothing changes).
    pub fn retry_failed(&mut self, job: JobId, now: u64) -> Result<u32, RetryError> {
        let Some(j) = self.jobs.get_mut(&job) else {
            return Err(RetryError::UnknownJob);
        };
        if j.state == JobState::Cancelled {
            return Err(RetryError::Cancelled);
        }
        let failed: Vec<u32> = (0..j.tasks.len() as u32)
            .filter(|&i| j.tasks[i as usize].phase == TaskPhase::Failed)
            .collect();
        if failed.is_empty() {
            return Ok(0);
        }
        // Replicas allocated from here on belong to the new attempt: the store keeps the
        // mark, so a restart attaches only those (see `restore`).
        let replicas_from = self.next_replica;
        let mut forget = Vec::new();
        for &index in &failed {
            let slot = &mut j.tasks[index as usize];
            slot.phase = TaskPhase::Pending;
            slot.accepted = None;
            slot.queued = false;
            slot.ready_at = 0;
            forget.append(&mut slot.replicas);
            self.mutations.push(Mutation::Retried {
                task: TaskId { job, index },
                replicas_from,
            });
        }
        j.failed -= failed.len() as u32;
        if j.state != JobState::Running {
            j.state = JobState::Running;
            self.running.push(job);
            self.mutations.push(Mutation::JobState {
                job,
                state: JobState::Running,
            });
        }
        for r in forget {
            if let Some(rep) = self.replicas.remove(&r) {
                // Failing cancelled every in-flight replica; this is a guard, not a path.
                if rep.phase == ReplicaPhase::InFlight {
                    self.deadlines.remove(&(rep.deadline_ms, r));
                    if let Some(w) = self.workers.get_mut(&rep.worker) {
                        w.in_flight.remove(&r);
                    }
                    if let Some(j) = self.jobs.get_mut(&job) {
                        j.in_flight -= 1;
                    }
                }
            }
        }
        for index in &failed {
            self.reevaluate(TaskId { job, index: *index }, now);
        }
        Ok(failed.len() as u32)
    }

    pub(crate) fn cancel_replicas(&mut self, ids: &[ReplicaId]) {
        let mut by_worker: BTreeMap<NodeId, Vec<ReplicaId>> = BTreeMap::new();
        for &r in ids {
            let Some(rep) = self.replicas.get_mut(&r) else {
                continue;
            };
            if rep.phase != ReplicaPhase::InFlight {
                continue;
            }
            rep.phase = ReplicaPhase::Cancelled;
            let (worker, deadline, job) = (rep.worker, rep.deadline_ms, rep.task.job);
            self.deadlines.remove(&(deadline, r));
            if let Some(w) = self.workers.get_mut(&worker) {
                w.in_flight.remove(&r);
            }
            if let Some(j) = self.jobs.get_mut(&job) {
                j.in_flight -= 1;
            }
            self.mutations.push(Mutation::Phase {
                replica: r,
                phase: ReplicaPhase::Cancelled,
            });
            by_worker.entry(worker).or_default().push(r);
        }
        for (worker, replicas) in by_worker {
            self.notices.push(Notice::Cancel { worker, replicas });
        }
    }

    pub(crate) fn alloc_replica(&mut self) -> ReplicaId {
        let r = self.next_replica;
        self.next_replica += 1;
        r
    }

    /// Counters for `status`.
    pub fn status(&self, job: Option<JobId>) -> Option<StatusReport> {
        let jobs: Vec<JobStatus> = match job {
            Some(id) => vec![self.job_status(self.jobs.get(&id)?)],
            None => self.jobs.values().map(|j| self.job_status(j)).collect(),
        };
        let mut workers: Vec<WorkerStatus> = self
            .workers
            .values()
            .map(|w| WorkerStatus {
                node_id: w.id,
                connected: w.connected,
                credit: w.credit_fuel as f64 / 1e9,
                valid: w.rep.valid,
                invalid: w.rep.invalid,
            })
            .collect();
        workers.sort_by_key(|w| w.node_id);
        Some(StatusReport {
            jobs,
            workers,
            coordinator_bytes_sent: 0,
        })
    }

    fn job_status(&self, j: &Job) -> JobStatus {
        JobStatus {
            id: j.id,
            name: j.manifest.name.clone(),
            state: j.state,
            tasks_total: j.tasks.len() as u32,
            tasks_done: j.done,
            tasks_failed: j.failed,
            replicas_in_flight: j.in_flight,
            replicas_reported: j.reported,
            // Known to the engine, which runs the fetches (see `Engine::status`).
            outputs_collecting: 0,
        }
    }

    pub fn job_state(&self, job: JobId) -> Option<JobState> {
        self.jobs.get(&job).map(|j| j.state)
    }

    pub fn job_manifest(&self, job: JobId) -> Option<Arc<JobManifest>> {
        self.jobs.get(&job).map(|j| j.manifest.clone())
    }

    /// Blob servers of the workers whose replicas agreed with a task's accepted result,
    /// connected ones first: where to fetch an output that was not inline.
    pub fn agreeing_peers(&self, task: TaskId) -> Vec<PeerAddr> {
        let Some(slot) = self
            .jobs
            .get(&task.job)
            .and_then(|j| j.tasks.get(task.index as usize))
        else {
            return Vec::new();
        };
        let mut peers: Vec<(bool, PeerAddr)> = slot
            .replicas
            .iter()
            .filter_map(|r| self.replicas.get(r))
            .filter(|r| r.verdict == Some(Verdict::Valid))
            .filter_map(|r| {
                let w = self.workers.get(&r.worker)?;
                Some((
                    !w.connected,
                    PeerAddr {
                        node_id: w.id,
                        addr: w.peer_addr?,
                    },
                ))
            })
            .collect();
        peers.sort_by_key(|(offline, _)| *offline);
        peers.into_iter().map(|(_, p)| p).collect()
    }

    /// Remember that `worker` is (probably) fetching `blob` now, unless it announced it.
    pub(crate) fn note_fetching(&mut self, blob: BlobId, worker: NodeId, now: u64) {
        if self.holders.get(&blob).is_some_and(|h| h.contains(&worker)) {
            return;
        }
        let f = self.fetching.entry(blob).or_default();
        f.retain(|(w, at)| *w != worker && now.saturating_sub(*at) < FETCHING_FOR_MS);
        f.push_back((worker, now));
        while f.len() > FETCHING_KEPT {
            f.pop_front();
        }
    }

    /// Connected workers that started fetching `blob` recently, newest first.
    pub(crate) fn fetchers_of(
        &self,
        blob: &BlobId,
        exclude: &NodeId,
        limit: usize,
        now: u64,
    ) -> Vec<PeerAddr> {
        let Some(f) = self.fetching.get(blob) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (id, at) in f.iter().rev() {
            if now.saturating_sub(*at) >= FETCHING_FOR_MS {
                break;
            }
            if id == exclude || self.holders.get(blob).is_some_and(|h| h.contains(id)) {
                continue;
            }
            if let Some(w) = self.workers.get(id) {
                if let (true, Some(addr)) = (w.connected, w.peer_addr) {
                    out.push(PeerAddr { node_id: *id, addr });
                }
            }
        }
        self.super_peers_first(&mut out);
        out.truncate(limit);
        out
    }

    /// Reorder `peers` so directly reachable workers come first (stable otherwise): workers
    /// behind NATs then fetch from super-peers before anyone else.
    fn super_peers_first(&self, peers: &mut [PeerAddr]) {
        peers.sort_by_key(|p| !self.workers.get(&p.node_id).is_some_and(|w| w.reachable));
    }

    /// Where to find a blob: connected workers that announced it, best first (not the
    /// coordinator itself).
    pub fn holders_of(
        &self,
        blob: &BlobId,
        exclude: Option<&NodeId>,
        limit: usize,
        rotate: u64,
    ) -> Vec<PeerAddr> {
        let Some(h) = self.holders.get(blob) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let n = h.len();
        if n == 0 {
            return out;
        }
        // Start at a rotating offset so load spreads over holders, and look at a bounded
        // number of them so popular blobs stay cheap.
        let start = (rotate as usize) % n;
        for k in 0..n.min(64) {
            let id = h[(start + k) % n];
            if Some(&id) == exclude {
                continue;
            }
            if let Some(w) = self.workers.get(&id) {
                if let (true, Some(addr)) = (w.connected, w.peer_addr) {
                    out.push(PeerAddr { node_id: id, addr });
                }
            }
        }
        // Super-peers first, then cut: a worker behind a NAT always hears of the holders it
        // can reach without help.
        self.super_peers_first(&mut out);
        out.truncate(limit);
        out
    }

    /// Rebuild from durable state. In-flight replicas keep their deadlines; every worker
    /// starts disconnected (as of `now`) and may reconnect within the grace period.
    pub fn restore(cfg: CoreConfig, snap: Snapshot, now: u64) -> Core {
        let mut core = Core::new(cfg);
        for (short, fp) in snap.fingerprints {
            let i = core.fingerprints.len() as u32;
            core.fp_index.insert(short.clone(), i);
            core.fingerprints.push((short, fp));
        }
        let peer_addrs: HashMap<NodeId, SocketAddr> = snap.peer_addrs.into_iter().collect();
        for w in snap.workers {
            let fp = w
                .fingerprint
                .as_ref()
                .and_then(|s| core.fp_index.get(s).copied());
            core.workers.insert(
                w.node,
                Worker {
                    id: w.node,
                    fp,
                    native_fp: None,
                    slots: 1,
                    connected: false,
                    disconnected_ms: Some(now),
                    peer_addr: peer_addrs.get(&w.node).copied(),
                    observed_addr: None,
                    reachable: false,
                    credit_fuel: w.credit_fuel,
                    rep: w.reputation,
                    in_flight: BTreeSet::new(),
                    last_seen_ms: w.last_seen_ms,
                    anchor: None,
                    undecided: 0,
                    waiting_for_room: false,
                    waiting_for_work: false,
                    lost: w.lost,
                    holding: 0,
                    junior: w.junior,
                },
            );
        }
        for (blob, worker) in snap.blob_locations {
            core.holders.entry(blob).or_default().push(worker);
            if let Some(w) = core.workers.get_mut(&worker) {
                w.holding += 1;
            }
        }
        for j in snap.jobs {
            core.insert_job(j.job, Arc::new(j.manifest), j.determinism, j.state);
        }
        let mut retried: HashMap<TaskId, ReplicaId> = HashMap::new();
        for t in snap.tasks {
            if let Some(from) = t.replicas_from {
                retried.insert(t.task, from);
            }
            let Some(job) = core.jobs.get_mut(&t.task.job) else {
                continue;
            };
            let Some(slot) = job.tasks.get_mut(t.task.index as usize) else {
                continue;
            };
            if let Some(q) = t.quorum {
                slot.quorum = q;
            }
            match t.decision {
                Some(Decision::Accepted {
                    digest,
                    fingerprint,
                    ..
                }) => {
                    slot.phase = TaskPhase::Accepted;
                    let fp = core.fp_index.get(&fingerprint).copied().unwrap_or(u32::MAX);
                    slot.accepted = Some((fp, digest));
                    job.done += 1;
                }
                Some(Decision::Failed { .. }) => {
                    slot.phase = TaskPhase::Failed;
                    job.failed += 1;
                }
                None => {}
            }
        }
        let mut max_replica = 0;
        for r in snap.replicas {
            max_replica = max_replica.max(r.replica);
            let fp = *core.fp_index.get(&r.fingerprint).unwrap_or(&u32::MAX);
            let Some(job) = core.jobs.get_mut(&r.task.job) else {
                continue;
            };
            let Some(slot) = job.tasks.get_mut(r.task.index as usize) else {
                continue;
            };
            job.next_fresh = job.next_fresh.max(r.task.index + 1);
            if retried.get(&r.task).is_some_and(|&from| r.replica < from) {
                // An earlier attempt of a retried task: forgotten, as `retry_failed` does;
                // its report still counts in the job's reported replicas.
                if r.phase == ReplicaPhase::Reported {
                    job.reported += 1;
                }
                continue;
            }
            slot.replicas.push(r.replica);
            match r.phase {
                ReplicaPhase::InFlight => {
                    job.in_flight += 1;
                    core.deadlines.insert((r.deadline_ms, r.replica));
                    if let Some(w) = core.workers.get_mut(&r.worker) {
                        w.in_flight.insert(r.replica);
                    }
                }
                ReplicaPhase::Reported => {
                    job.reported += 1;
                    if job.state == JobState::Running && slot.phase == TaskPhase::Pending {
                        if let Some(w) = core.workers.get_mut(&r.worker) {
                            w.undecided += 1;
                        }
                    }
                }
                _ => {}
            }
            let checkpoints = core.jobs.get(&r.task.job).is_some_and(|j| j.checkpoints);
            let result = r
                .result
                .map(|res| (Core::digest_of(&res, checkpoints), res));
            let w = core.workers.get(&r.worker);
            let anchor = w.is_some_and(|w| core.cfg.policy.is_trusted(&w.rep));
            let block = w.and_then(|w| w.block());
            core.replicas.insert(
                r.replica,
                Replica {
                    task: r.task,
                    worker: r.worker,
                    fp,
                    deadline_ms: r.deadline_ms,
                    phase: r.phase,
                    result,
                    verdict: r.verdict,
                    anchor,
                    block,
                    lost_mark: r.replica + 1,
                    first_deadline_ms: r.deadline_ms,
                    progress: None,
                },
            );
        }
        core.next_replica = max_replica + 1;
        for job in core.jobs.values_mut() {
            for slot in &mut job.tasks {
                slot.replicas.sort_unstable();
            }
        }
        // Re-queue issued, undecided tasks that still need replicas; decide what became
        // decidable (e.g. a crash between commit and a later event cannot happen, but a
        // policy change between versions can).
        let pending: Vec<TaskId> = core
            .jobs
            .values()
            .filter(|j| j.state == JobState::Running)
            .flat_map(|j| {
                let id = j.id;
                (0..j.next_fresh)
                    .filter(move |&i| j.tasks[i as usize].phase == TaskPhase::Pending)
                    .map(move |index| TaskId { job: id, index })
            })
            .collect();
        for t in pending {
            core.reevaluate(t, now);
        }
        core.settle_bans(now);
        // Restoring re-derives state that is already durable.
        core.mutations
            .retain(|m| !matches!(m, Mutation::Fingerprint { .. }));
        core
    }

    /// Whether `job` is running and has no more work to hand out or wait for.
    pub(crate) fn maybe_finish_job(&mut self, job: JobId) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        if j.state != JobState::Running || (j.done + j.failed) as usize != j.tasks.len() {
            return;
        }
        j.state = if j.failed == 0 {
            JobState::Done
        } else {
            JobState::Failed
        };
        let state = j.state;
        self.running.retain(|x| *x != job);
        self.mutations.push(Mutation::JobState { job, state });
        self.notices.push(Notice::JobEnded { job, state });
    }

    /// Reports credited so far to a worker, in fuel.
    pub fn credit_fuel(&self, worker: &NodeId) -> u64 {
        self.workers.get(worker).map_or(0, |w| w.credit_fuel)
    }

    pub fn reputation(&self, worker: &NodeId) -> Option<Reputation> {
        self.workers.get(worker).map(|w| w.rep)
    }

    /// The task's phase.
    pub fn task_phase(&self, task: TaskId) -> Option<TaskPhase> {
        self.jobs
            .get(&task.job)?
            .tasks
            .get(task.index as usize)
            .map(|t| t.phase)
    }

    /// The replica's owner and phase.
    pub fn replica(&self, r: ReplicaId) -> Option<(NodeId, TaskId, ReplicaPhase)> {
        self.replicas.get(&r).map(|x| (x.worker, x.task, x.phase))
    }

    /// The replica's owner, task and reported result (if any).
    pub fn replica_result(&self, r: ReplicaId) -> Option<(NodeId, TaskId, Option<&RunResult>)> {
        self.replicas
            .get(&r)
            .map(|x| (x.worker, x.task, x.result.as_ref().map(|(_, res)| res)))
    }

    /// The engine fingerprint a worker reported in its hello.
    pub fn worker_fingerprint(&self, worker: &NodeId) -> Option<&EngineFingerprint> {
        let fp = self.workers.get(worker)?.fp?;
        Some(&self.fingerprints[fp as usize].1)
    }

    /// The digest replicas are compared by: without fuel for a checkpointing job.
    pub(crate) fn digest_of(result: &RunResult, checkpoints: bool) -> ResultDigest {
        if checkpoints {
            result.digest_without_fuel()
        } else {
            result.digest()
        }
    }
}
