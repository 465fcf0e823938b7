//! The coordinator's durable state behind a [`Store`] trait, with SQLite as the default
//! backend ([`SqliteStore`], `DATA_DIR/coordinator.db`) and PostgreSQL as the other
//! ([`PostgresStore`], `coordinator serve --store postgres://...`). Both keep the same tables
//! with the same meaning; [`open`] picks one from a [`StoreUrl`].
//!
//! The scheduling core never touches the store: it emits [`Mutation`]s, and the server's
//! store actor commits every mutation produced by a batch of events in **one transaction**
//! (group commit) before it answers any of those events. A crash therefore loses only
//! events nobody was told about, and a transaction is never half-applied. On startup the
//! core is rebuilt from a [`Snapshot`].
//!
//! Pending tasks have no `tasks` row (a job of ten million tasks is one manifest row); a row
//! appears when a task is decided or its replication policy changes.

mod codec;
pub mod postgres;
pub mod schema;
pub mod sqlite;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use tasks::wire::{FailurePage, JobState, ReplicaId, TaskResult};
use tasks::{
    BlobId, EngineFingerprint, JobId, JobManifest, NodeId, ResultDigest, RunResult, TaskId,
};

use crate::core::trust::Reputation;

pub use postgres::{PostgresStore, StoreUrl};
pub use sqlite::SqliteStore;

/// Why the store failed. Store failures are fatal to the coordinator: committed state stays
/// consistent, and a restart resumes from it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database {path} has schema version {found}, newer than this coordinator understands ({supported}); upgrade the coordinator")]
    TooNew {
        path: String,
        found: i64,
        supported: i64,
    },
    #[error("corrupt record in the database: {0}")]
    Corrupt(String),
    #[error("cannot open the database at {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("PostgreSQL store: {}", postgres::describe(.0))]
    Postgres(#[from] ::postgres::Error),
    /// Another coordinator took the leader lease (`crate::ha`): this one must not commit.
    #[error("another coordinator leads now (leader lease epoch {now:?}, ours was {ours}): this one stops committing; restarted, it stands by")]
    Fenced { ours: i64, now: Option<i64> },
    /// `url` is shown without its password.
    #[error("cannot connect to the PostgreSQL store at {url}: {reason}")]
    Connect { url: String, reason: String },
}

/// Open the store `url` names: SQLite in `data_dir` ([`SqliteStore::FILE`]) or a
/// PostgreSQL server. Blocks (connects, migrates): call it from a plain thread or
/// `tokio::task::spawn_blocking`, not from an async task.
pub fn open(url: &StoreUrl, data_dir: &std::path::Path) -> Result<Box<dyn Store>, StoreError> {
    Ok(match url {
        StoreUrl::Sqlite => Box::new(SqliteStore::open(&data_dir.join(SqliteStore::FILE))?),
        StoreUrl::Postgres(u) => Box::new(PostgresStore::open(u)?),
    })
}

/// What became of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaPhase {
    /// Assigned, no report yet.
    InFlight,
    /// Reported (see the result).
    Reported,
    /// Deadline passed, worker gone, or abandoned without a report: it was reissued. A late
    /// report still counts.
    Lost,
    /// The task was decided (or the job cancelled) while this replica was in flight.
    Cancelled,
}

/// The validator's judgement of a reported replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Agreed with the accepted result: credited.
    Valid,
    /// Disagreed with an accepted result from a compatible engine.
    Invalid,
}

/// How a task was decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Accepted {
        digest: ResultDigest,
        result: RunResult,
        /// Fingerprint (short id) of the agreeing replicas.
        fingerprint: String,
        agreeing: Vec<NodeId>,
    },
    Failed {
        reason: String,
    },
}

/// An accepted task's output bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Inline(Vec<u8>),
    /// Stored in the coordinator's blob store.
    Blob(BlobId),
}

/// The persisted record of a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    pub node: NodeId,
    /// Short id of its latest fingerprint (see [`Mutation::Fingerprint`]).
    pub fingerprint: Option<String>,
    /// Sum of `fuel_used` over its valid replicas: credit = fuel / 10^9, kept exact.
    pub credit_fuel: u64,
    pub reputation: Reputation,
    pub last_seen_ms: u64,
    /// Replicas it lost (deadline passed, abandoned, gone) not yet made up for by valid
    /// results: each costs it capacity.
    pub lost: u64,
    /// It first joined an established pool (anchors connected): a newcomer, whose results
    /// anchors decide on (see `TrustPolicy::anchors_decide_for_newcomers`).
    pub junior: bool,
}

impl WorkerRecord {
    pub fn credit(&self) -> f64 {
        self.credit_fuel as f64 / 1e9
    }
}

/// One change to durable state, produced by the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Mutation {
    PutJob {
        job: JobId,
        manifest: std::sync::Arc<JobManifest>,
        determinism: tasks::Determinism,
        created_ms: u64,
    },
    JobState {
        job: JobId,
        state: JobState,
    },
    Fingerprint {
        short: String,
        fingerprint: EngineFingerprint,
    },
    Assign {
        replica: ReplicaId,
        task: TaskId,
        worker: NodeId,
        fingerprint: String,
        assigned_ms: u64,
        deadline_ms: u64,
    },
    /// `verdict` is set when the replica was judged in the same batch (see [`fold`]).
    Reported {
        replica: ReplicaId,
        result: RunResult,
        reported_ms: u64,
        verdict: Option<Verdict>,
    },
    Phase {
        replica: ReplicaId,
        phase: ReplicaPhase,
    },
    Verdict {
        replica: ReplicaId,
        verdict: Verdict,
    },
    /// A report judged valid after its task was accepted (late, or from a replica the
    /// acceptance cancelled that ran to the end anyway): its worker is credited, so it joins
    /// the task's agreeing workers and `results` names everyone credited for the task.
    LateAgreement {
        task: TaskId,
        worker: NodeId,
    },
    /// Adaptive replication chose a quorum other than the job's for this task.
    TaskQuorum {
        task: TaskId,
        quorum: u32,
    },
    /// `output` is set when the output arrived in the same batch (see [`fold`]).
    Decided {
        task: TaskId,
        decision: Decision,
        decided_ms: u64,
        output: Option<Output>,
    },
    TaskOutput {
        task: TaskId,
        output: Output,
    },
    /// A failed task went back to pending (`coordinator retry`): replicas of it with ids
    /// below `replicas_from` belong to earlier attempts and no longer count.
    Retried {
        task: TaskId,
        replicas_from: ReplicaId,
    },
    Worker(WorkerRecord),
    BlobLocation {
        blob: BlobId,
        worker: NodeId,
        present: bool,
    },
    PeerAddr {
        worker: NodeId,
        addr: Option<SocketAddr>,
    },
    /// The stderr tail a worker sent for its replica with a non-ok result (at most
    /// [`tasks::limits::MAX_STDERR_TAIL`] bytes); the first one sent is kept.
    ReplicaStderr {
        replica: ReplicaId,
        task: TaskId,
        stderr: Vec<u8>,
    },
}

/// Shrink a batch without changing its meaning, so a commit runs fewer statements: keep only
/// the last record of each worker (a busy worker's credit changes many times per batch),
/// fold a verdict into the same batch's report of that replica, and an output into the same
/// batch's decision of that task.
pub fn fold(muts: &mut Vec<Mutation>) {
    use std::collections::HashMap;
    let mut last_worker: HashMap<NodeId, usize> = HashMap::new();
    let mut reported: HashMap<ReplicaId, usize> = HashMap::new();
    let mut decided: HashMap<TaskId, usize> = HashMap::new();
    let mut drop = vec![false; muts.len()];
    for i in 0..muts.len() {
        match &muts[i] {
            Mutation::Worker(w) => {
                if let Some(prev) = last_worker.insert(w.node, i) {
                    drop[prev] = true;
                }
            }
            Mutation::Reported { replica, .. } => {
                reported.insert(*replica, i);
            }
            Mutation::Decided { task, .. } => {
                decided.insert(*task, i);
            }
            Mutation::Verdict { replica, verdict } => {
                if let Some(&j) = reported.get(replica) {
                    let v = *verdict;
                    if let Mutation::Reported { verdict, .. } = &mut muts[j] {
                        *verdict = Some(v);
                        drop[i] = true;
                    }
                }
            }
            Mutation::TaskOutput { task, output } => {
                if let Some(&j) = decided.get(task) {
                    let o = output.clone();
                    if let Mutation::Decided { output, .. } = &mut muts[j] {
                        *output = Some(o);
                        drop[i] = true;
                    }
                }
            }
            _ => {}
        }
    }
    let mut i = 0;
    muts.retain(|_| {
        let keep = !drop[i];
        i += 1;
        keep
    });
}

/// A job as stored.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub job: JobId,
    pub manifest: JobManifest,
    pub state: JobState,
    pub created_ms: u64,
    pub determinism: tasks::Determinism,
}

/// A task that has a row: decided, or with a policy quorum.
#[derive(Debug, Clone)]
pub struct TaskRow {
    pub task: TaskId,
    pub quorum: Option<u32>,
    pub decision: Option<Decision>,
    /// Set once the task was retried: its replicas below this id are of earlier attempts.
    pub replicas_from: Option<ReplicaId>,
}

#[derive(Debug, Clone)]
pub struct ReplicaRow {
    pub replica: ReplicaId,
    pub task: TaskId,
    pub worker: NodeId,
    pub fingerprint: String,
    pub assigned_ms: u64,
    pub deadline_ms: u64,
    pub phase: ReplicaPhase,
    pub result: Option<RunResult>,
    pub verdict: Option<Verdict>,
}

/// Everything the core needs to resume.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub jobs: Vec<JobRow>,
    pub tasks: Vec<TaskRow>,
    pub replicas: Vec<ReplicaRow>,
    pub workers: Vec<WorkerRecord>,
    pub fingerprints: Vec<(String, EngineFingerprint)>,
    pub blob_locations: Vec<(BlobId, NodeId)>,
    pub peer_addrs: Vec<(NodeId, SocketAddr)>,
}

/// Durable state. Implementations must apply each `commit` atomically and durably.
pub trait Store: Send {
    /// Read everything needed to rebuild the core.
    fn load(&mut self) -> Result<Snapshot, StoreError>;
    /// Apply a batch of mutations in one transaction.
    fn commit(&mut self, batch: &[Mutation]) -> Result<(), StoreError>;
    /// The results of a job's decided tasks (pending tasks are absent), with inline outputs.
    fn task_results(
        &mut self,
        job: JobId,
    ) -> Result<Vec<(TaskResult, Option<Output>)>, StoreError> {
        self.task_results_range(job, 0, u32::MAX)
    }
    /// Like [`Store::task_results`], for the tasks with `first <= index < end` only: what a
    /// page of results reads, so no request ever loads a whole large job.
    fn task_results_range(
        &mut self,
        job: JobId,
        first: u32,
        end: u32,
    ) -> Result<Vec<(TaskResult, Option<Output>)>, StoreError>;
    /// A page of the job's decided tasks that did not end `ok` (failed, or accepted with a
    /// non-ok outcome), in index order after `after`, at most `max`, each with the stderr of
    /// one replica of the accepted result (for a failed task: of any replica that sent one).
    fn task_failures(
        &mut self,
        job: JobId,
        after: Option<u32>,
        max: u32,
    ) -> Result<FailurePage, StoreError>;
    /// Accepted tasks whose output is neither inline nor in the blob store yet.
    fn outputs_missing(&mut self) -> Result<Vec<(TaskId, RunResult, Vec<NodeId>)>, StoreError>;
}

/// A store chosen at run time ([`open`]).
impl Store for Box<dyn Store> {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        (**self).load()
    }
    fn commit(&mut self, batch: &[Mutation]) -> Result<(), StoreError> {
        (**self).commit(batch)
    }
    fn task_results_range(
        &mut self,
        job: JobId,
        first: u32,
        end: u32,
    ) -> Result<Vec<(TaskResult, Option<Output>)>, StoreError> {
        (**self).task_results_range(job, first, end)
    }
    fn task_failures(
        &mut self,
        job: JobId,
        after: Option<u32>,
        max: u32,
    ) -> Result<FailurePage, StoreError> {
        (**self).task_failures(job, after, max)
    }
    fn outputs_missing(&mut self) -> Result<Vec<(TaskId, RunResult, Vec<NodeId>)>, StoreError> {
        (**self).outputs_missing()
    }
}
