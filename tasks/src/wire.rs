//! # The Peergrid wire protocol, version 1
//!
//! ## Transport
//! Every node runs one QUIC endpoint (quinn). TLS 1.3 with self-signed ed25519 certificates;
//! both sides present one, and a node's identity is its certificate's public key
//! ([`crate::NodeId`]). A connecting side pins the node id it expects (from a ticket or an
//! assignment's peer list); the accepting side learns the client's node id from its
//! certificate. The ALPN names protocol and version:
//!
//! | ALPN | participants | shape |
//! |---|---|---|
//! | [`ALPN_COORD`] `peergrid/coord/1` | worker → coordinator | one long-lived bi-stream opened by the worker: [`WorkerMsg`] frames up, [`CoordMsg`] frames down |
//! | [`ALPN_SUBMIT`] `peergrid/submit/1` | submitter → coordinator | one bi-stream per request: a [`SubmitRequest`] frame (then, for `PutBlob`, the raw blob bytes), one [`SubmitResponse`] frame back |
//! | [`ALPN_BLOB`] `peergrid/blob/1` | any node → any node (workers, and the coordinator as first seed) | one bi-stream per request: a [`BlobRequest`] frame, a [`BlobResponse`] frame back, then for `Chunks` the raw chunk bytes |
//!
//! ## Framing
//! A frame is a 4-byte big-endian length followed by that many bytes of a postcard-encoded
//! message. The length must be at most [`MAX_FRAME`]; a larger length, a body that does not
//! decode, or trailing bytes after the message is a protocol violation: the receiver closes
//! *that connection* with [`CloseCode::Protocol`] (or [`CloseCode::FrameTooLarge`]) and
//! carries on with all others. Raw blob bytes that follow a frame are not framed; their
//! length is given by the frame before them and they are verified against the blob's root
//! ([`crate::blob`]) before use.
//!
//! ## Worker session (`peergrid/coord/1`)
//! 1. Worker opens a bi-stream and sends [`WorkerMsg::Hello`] first; the coordinator answers
//!    [`CoordMsg::Welcome`] (or closes with [`CloseCode::Rejected`]). The worker's identity is
//!    its TLS key, never a field of a message.
//! 2. The worker pulls work: [`WorkerMsg::RequestWork`] → [`CoordMsg::Assign`] (a batch,
//!    possibly empty with a `retry_after_ms` hint). Each assignment carries the task
//!    manifest, the replica id and peers that hold its blobs.
//! 3. For each replica the worker sends [`WorkerMsg::Report`]; the coordinator commits it and
//!    answers [`CoordMsg::Ack`]. Reports are idempotent: a worker resends unacknowledged
//!    reports after a reconnect. A report for a replica not assigned to this worker's
//!    identity is refused with [`CoordMsg::Rejected`] and changes nothing.
//! 4. Either side may send at any time: [`WorkerMsg::HaveBlobs`] (blobs now held and
//!    servable), [`WorkerMsg::Abandon`] (replicas it will not finish, e.g. on Ctrl-C: they
//!    are reissued at once), [`WorkerMsg::BadPeer`] (a peer served a chunk that failed
//!    verification), [`CoordMsg::Cancel`] (stop these replicas: the task is decided).
//! 5. Addresses are what the network shows: the coordinator hands peers the address a
//!    worker's session *comes from* (the QUIC remote address, also in `Welcome`), never the
//!    `peer_addr` a worker announces (kept for logs). After `Welcome` the coordinator dials
//!    that address back from another socket and tells the worker the outcome in
//!    [`CoordMsg::Reachability`]; reachable workers are listed first as peers
//!    (super-peers). Before dialling a peer, a worker sends [`WorkerMsg::Punch`]; if the
//!    peer is not reachable, the coordinator sends it [`CoordMsg::Punch`] with the
//!    requester's observed address and both dial each other at once (simultaneous open
//!    through both NATs).
//! 6. **The coordinator opens streams too.** A worker serves `peergrid/blob/1` requests on
//!    bi-streams the coordinator opens on the session connection (the worker's session
//!    stream is the one the worker opened): that is how the coordinator collects outputs
//!    from workers it could not dial, e.g. behind a NAT.
//!
//! 7. **Every worker message is a claim the coordinator checks** (joining is open). `slots`
//!    is clamped to [`crate::limits::MAX_WORKER_SLOTS`], and how many replicas a worker may
//!    hold follows the results it delivered, not what it claims. A report whose `fuel_used`
//!    exceeds the task's `fuel` or whose `output_len` exceeds its `max_output` is
//!    [`CoordMsg::Rejected`]; so is a late report for a replica that was lost (deadline,
//!    abandon, disconnect) and has since been reissued. Losing replicas costs the worker
//!    capacity, and a lost replica goes to any other worker before (as a last resort) the
//!    one that lost it; one worker's losses count once towards failing a task. A
//!    `BadPeer` accusation counts only from a worker that was handed that peer for that
//!    blob, and a peer is delisted only after [`crate::limits::BAD_PEER_ACCUSERS`] distinct
//!    accusers. Blob lists (`Hello`, `HaveBlobs`) beyond
//!    [`crate::limits::MAX_HAVE_BLOBS_PER_MSG`] per message or
//!    [`crate::limits::MAX_HAVE_BLOBS_PER_WORKER`] per worker are ignored. A connection that
//!    sends no `Hello` within [`crate::limits::HELLO_TIMEOUT`] is closed. Transport limits
//!    (receive windows, stream counts, connections per address) are in [`crate::limits`].
//!
//! 8. **Capabilities.** Optional messages added within version 1 are sent only to a peer
//!    that said it understands them, since an unknown variant is a protocol violation: a
//!    coordinator lists them as words after its version in `Welcome.agent`
//!    (`peergrid-coordinator/0.1.0 stderr`). [`CAP_STDERR`]: after the report of a replica
//!    whose status is not `ok`, the worker may send [`WorkerMsg::Stderr`] with the tail of
//!    the guest's stderr (at most [`crate::limits::MAX_STDERR_TAIL`] bytes); it is
//!    diagnostics for the scientist, never part of the digest. [`CAP_HOLDING`]: right after
//!    `Welcome`, before anything else, the worker sends [`WorkerMsg::Holding`] with every
//!    replica it still has; the coordinator takes back the ones it counts as in flight there
//!    that are not listed (an `Assign` lost when the coordinator or the connection died).
//!    [`CAP_PROGRESS`]: the worker sends [`WorkerMsg::Progress`] every few seconds for the
//!    replicas whose guests report progress (and while paused); they are not reissued at
//!    their deadline while they advance or are paused (bounded).
//!
//! Small outputs (at most [`INLINE_OUTPUT_MAX`] bytes) travel inline in the report; larger
//! ones stay in the worker's blob store, named by `output_hash`, and the coordinator fetches
//! the accepted one over `peergrid/blob/1` framing, on the session connection (6.) or by
//! dialling the worker.
//!
//! Every blob connection serves both ways: whichever side dialled, each side may open
//! request streams and the other answers them (so one punched connection serves both).
//!
//! ## Submitter requests (`peergrid/submit/1`)
//! Every request carries the coordinator's submit token; a wrong token gets
//! [`SubmitResponse::Error`] with [`ErrorCode::Unauthorized`]. A job is uploaded as:
//! `MissingBlobs` (which blobs the coordinator lacks) → `PutBlob` for each missing one →
//! `CreateJob`. `Status`, `Results` and `Cancel` read or end jobs; `Retry` sends a job's
//! failed tasks back to pending. `Results` answers in one frame, which a job of some ten
//! thousand tasks overflows: `ResultsPage` reads a job's results page by page instead.
//! Outputs that are not inline are fetched over `peergrid/blob/1`.
//!
//! ## Blob exchange (`peergrid/blob/1`)
//! `Outboard` returns a blob's size and chunk chaining values (verified by the requester
//! against the root it already knows); `Chunks` returns a header and then the raw bytes of a
//! run of chunks, each verified by the requester on its own; `Have` returns which chunks a
//! node holds (a node still downloading serves what it has). A node that is at its upload
//! limit answers `Busy` so the requester tries another peer.
//!
//! ## Errors and close codes
//! Application errors inside a valid exchange are messages ([`SubmitResponse::Error`],
//! [`CoordMsg::Rejected`], [`BlobResponse::NotFound`]). Violations close the connection with
//! a [`CloseCode`].
//!
//! ## Versioning
//! The ALPN carries the major version; a node offers the versions it speaks and TLS picks one.
//! Within a version, enums only grow: new variants are added at the end (postcard encodes
//! the variant index), never reordered or removed. A receiver that gets a variant it does not
//! know treats it as a protocol violation. The golden-byte tests freeze the encoding.

use std::net::SocketAddr;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::blob::{BlobId, BlobRef};
use crate::identity::NodeId;
use crate::job::{Determinism, JobId, JobManifest, TaskManifest};
use crate::outcome::{EngineFingerprint, RunResult, Status};

/// Worker ↔ coordinator sessions.
pub const ALPN_COORD: &[u8] = b"peergrid/coord/1";
/// Submitter → coordinator requests.
pub const ALPN_SUBMIT: &[u8] = b"peergrid/submit/1";
/// Blob chunk exchange between any two nodes.
pub const ALPN_BLOB: &[u8] = b"peergrid/blob/1";

/// Largest frame body in bytes (control messages; blob bytes are not framed).
pub const MAX_FRAME: usize = 8 << 20;
/// Outputs up to this size travel inline in reports and results.
pub const INLINE_OUTPUT_MAX: u64 = 64 << 10;
/// Most chunks one `Chunks` request may ask for.
pub const MAX_CHUNKS_PER_REQUEST: u32 = 16;
/// Most tasks in one [`SubmitResponse::Failures`] page: with a stderr tail of at most
/// [`crate::limits::MAX_STDERR_TAIL`] bytes each, a page stays well under [`MAX_FRAME`].
pub const MAX_FAILURES_PER_PAGE: u32 = 512;

/// Capability word in `Welcome.agent`: the coordinator takes [`WorkerMsg::Stderr`].
pub const CAP_STDERR: &str = "stderr";
/// Capability word in `Welcome.agent`: the coordinator takes [`WorkerMsg::Holding`].
pub const CAP_HOLDING: &str = "holding";
/// Capability word in `Welcome.agent`: the coordinator takes [`WorkerMsg::Progress`].
pub const CAP_PROGRESS: &str = "progress";
/// Capability word in `Welcome.agent`: the coordinator runs jobs of both determinism classes
/// ([`Determinism`]): it takes [`WorkerMsg::Engines`] and answers a worker that sent it with
/// [`CoordMsg::AssignClass`].
pub const CAP_CLASSES: &str = "classes";

/// Whether a `Welcome.agent` lists capability `cap` (a word after the version).
pub fn has_capability(agent: &str, cap: &str) -> bool {
    agent.split_whitespace().skip(1).any(|w| w == cap)
}

/// QUIC application close codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Normal shutdown.
    Done = 0,
    /// A frame that does not decode, or a message out of order.
    Protocol = 1,
    /// A frame longer than [`MAX_FRAME`].
    FrameTooLarge = 2,
    /// The peer is not allowed (banned, wrong key, bad hello).
    Rejected = 3,
    /// The node is shutting down.
    Shutdown = 4,
    /// Too many connections or streams.
    Overloaded = 5,
}

impl CloseCode {
    pub fn code(self) -> u32 {
        self as u32
    }

    pub fn from_code(code: u64) -> Option<CloseCode> {
        Some(match code {
            0 => CloseCode::Done,
            1 => CloseCode::Protocol,
            2 => CloseCode::FrameTooLarge,
            3 => CloseCode::Rejected,
            4 => CloseCode::Shutdown,
            5 => CloseCode::Overloaded,
            _ => return None,
        })
    }
}

/// A replica: one run of one task on one worker. Assigned by the coordinator.
pub type ReplicaId = u64;

/// A node that can serve blobs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerAddr {
    pub node_id: NodeId,
    pub addr: SocketAddr,
}

/// Worker → coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerMsg {
    Hello {
        /// Worker software version, for logs.
        agent: String,
        fingerprint: EngineFingerprint,
        /// Tasks it runs at once: a claim, clamped to
        /// [`crate::limits::MAX_WORKER_SLOTS`]; capacity follows delivered results.
        slots: u32,
        /// Where peers can reach its blob server, if anywhere.
        peer_addr: Option<SocketAddr>,
        /// Blobs it holds and serves (at most [`crate::limits::MAX_HAVE_BLOBS_PER_MSG`]
        /// are taken).
        blobs: Vec<BlobId>,
    },
    /// Ask for up to `max` assignments.
    RequestWork {
        max: u32,
    },
    Report(Report),
    /// Blobs now held and servable (at most [`crate::limits::MAX_HAVE_BLOBS_PER_MSG`] per
    /// message are taken).
    HaveBlobs {
        blobs: Vec<BlobId>,
    },
    /// Replicas the worker will not finish: reissued to other workers at once; they count
    /// against the worker's capacity like missed deadlines.
    Abandon {
        replicas: Vec<ReplicaId>,
    },
    /// `peer` served data for `blob` that failed verification. Counts only if this worker
    /// was handed `peer` for `blob`; see step 7 of the session.
    BadPeer {
        peer: NodeId,
        blob: BlobId,
    },
    /// Several reports in one frame (a worker flushing its queue).
    Reports(Vec<Report>),
    /// "I am about to dial `peer` for blobs": if `peer` is not directly reachable, the
    /// coordinator asks it ([`CoordMsg::Punch`]) to dial this worker at the same moment, so
    /// both NATs open a mapping (a simultaneous open). Rate-limited by the coordinator.
    Punch {
        peer: NodeId,
    },
    /// The tail of the guest's stderr for `replica`, whose report (sent before) has a status
    /// other than `ok`: what the scientist reads to see why a task failed. At most
    /// [`crate::limits::MAX_STDERR_TAIL`] bytes (the coordinator keeps no more); not part of
    /// the digest, untrusted text. Only to a coordinator listing [`CAP_STDERR`].
    Stderr {
        replica: ReplicaId,
        stderr: Vec<u8>,
    },
    /// Every replica this worker still has (being prepared, queued, running, or finished
    /// with its report not yet acknowledged), sent once right after `Welcome`, before any
    /// other message of the session. The coordinator takes back at once every replica it
    /// counts as in flight on this worker that is not listed: an assignment it committed
    /// but never delivered (it died, or the connection did, before the `Assign` arrived),
    /// or one a restarted worker lost. Each costs the worker as an abandoned one would. At
    /// most [`crate::limits::MAX_HOLDING_PER_MSG`] are read. Only to a coordinator
    /// listing [`CAP_HOLDING`].
    Holding {
        replicas: Vec<ReplicaId>,
    },
    /// How far replicas this worker holds have come (their guests call `peergrid.progress`,
    /// docs/guest-abi.md), and whether the worker is paused. A replica whose progress
    /// advanced, or that is held by a pause, gets its deadline pushed back by its job's
    /// deadline (at most to [`crate::limits::MAX_DEADLINE_STRETCH`] times the job's deadline
    /// after it was issued): a long task that keeps working is not reissued for being slow;
    /// one whose progress stalls is. At most [`crate::limits::MAX_PROGRESS_PER_MSG`] are
    /// read. Only to a coordinator listing [`CAP_PROGRESS`].
    Progress {
        updates: Vec<ProgressUpdate>,
    },
    /// The worker also runs the `native` determinism class, with this engine fingerprint
    /// (its `Hello` fingerprint is its `portable` one). Sent once right after `Welcome`
    /// (after `Holding`), only to a coordinator listing [`CAP_CLASSES`]; from then on the
    /// coordinator assigns with [`CoordMsg::AssignClass`]. The fingerprint is checked like
    /// the hello's: an engine the coordinator accepts, the same engine and architecture as
    /// the hello's, with this release's native settings — otherwise the session is closed.
    Engines {
        native: EngineFingerprint,
    },
}

/// One replica's progress in [`WorkerMsg::Progress`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressUpdate {
    pub replica: ReplicaId,
    /// 0..=1, what the guest last reported.
    pub fraction: f64,
    /// The worker holds the replica paused (`worker pause` or its idle policy).
    pub paused: bool,
}

/// One replica's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub replica: ReplicaId,
    pub result: RunResult,
    /// The output, when at most [`INLINE_OUTPUT_MAX`] bytes; otherwise served as a blob.
    pub output: Option<Vec<u8>>,
    /// Wall time the run took, for scheduling hints (not part of the digest).
    pub wall_ms: u64,
}

/// Coordinator → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CoordMsg {
    Welcome {
        /// The coordinator's software version, for logs.
        agent: String,
        /// The address the coordinator saw the worker come from.
        observed_addr: SocketAddr,
    },
    Assign {
        assignments: Vec<Assignment>,
        /// When the batch is empty: ask again after this long.
        retry_after_ms: u64,
    },
    /// These reports are committed; the worker may forget them.
    Ack { replicas: Vec<ReplicaId> },
    /// A report or request was refused; nothing changed.
    Rejected {
        replica: Option<ReplicaId>,
        reason: String,
    },
    /// Stop working on these replicas (the task is decided or the job cancelled).
    Cancel { replicas: Vec<ReplicaId> },
    /// What the coordinator learnt of the worker's address: `reachable` when a dial-back to
    /// `observed_addr` from another socket of the coordinator succeeded (the worker is a
    /// super-peer: it serves workers behind NATs).
    Reachability {
        observed_addr: SocketAddr,
        reachable: bool,
    },
    /// Dial `peer` at `addr` now (over `peergrid/blob/1`, from the same socket as this
    /// session): it is dialling you at the same moment, so both NATs open a mapping.
    Punch { peer: NodeId, addr: SocketAddr },
    /// Your hand has room again: a request refused because your replicas and votes awaiting
    /// a decision filled your allowance may be repeated now (sent once per such refusal,
    /// when one of those votes is decided), rather than after `retry_after_ms`.
    Room,
    /// [`CoordMsg::Assign`] for a worker that sent [`WorkerMsg::Engines`]: each replica says
    /// which determinism class (which of its engines) it runs in.
    AssignClass {
        assignments: Vec<ClassedAssignment>,
        /// When the batch is empty: ask again after this long.
        retry_after_ms: u64,
    },
}

/// One replica to run, and the determinism class to run it in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassedAssignment {
    pub assignment: Assignment,
    pub determinism: Determinism,
}

/// One replica to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub replica: ReplicaId,
    pub task: TaskManifest,
    /// Report by this many seconds after assignment or the replica is reissued.
    pub deadline_secs: u64,
    /// Nodes that hold (some of) the task's blobs, best first. The coordinator lists itself
    /// last, as the seed of last resort.
    pub peers: Vec<PeerAddr>,
}

/// Submitter → coordinator, one per bi-stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitRequest {
    /// The coordinator's submit token (from `<data-dir>/submit-token`).
    pub token: String,
    pub body: SubmitBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SubmitBody {
    /// Which of these blobs does the coordinator lack?
    MissingBlobs {
        blobs: Vec<BlobRef>,
    },
    /// Followed on the same stream by exactly `blob.size` raw bytes.
    PutBlob {
        blob: BlobRef,
    },
    CreateJob {
        manifest: JobManifest,
    },
    /// One job, or all when `None`.
    Status {
        job: Option<JobId>,
    },
    Results {
        job: JobId,
    },
    Cancel {
        job: JobId,
    },
    /// Reissue the job's failed tasks with a fresh replica budget (accepted tasks are never
    /// touched); answered with [`SubmitResponse::Retried`].
    Retry {
        job: JobId,
    },
    /// Up to `max` task results from index `first` on, answered with
    /// [`SubmitResponse::ResultsPage`]: how a job of any size is downloaded in bounded
    /// frames (`Results` answers in one frame, which a large job overflows).
    ResultsPage {
        job: JobId,
        first: u32,
        max: u32,
    },
    /// The job's tasks that did not end `ok` (no quorum, or an accepted `trap`, `exit`, ...)
    /// with their stderr, in index order after `after`, at most `max` (capped at
    /// [`MAX_FAILURES_PER_PAGE`]).
    Failures {
        job: JobId,
        after: Option<u32>,
        max: u32,
    },
    /// How far the job's running tasks are, answered with [`SubmitResponse::Progress`]
    /// (tasks whose guests call `peergrid.progress`; docs/guest-abi.md).
    Progress {
        job: JobId,
    },
    /// [`SubmitBody::CreateJob`] in a chosen determinism class (`CreateJob` creates a
    /// `portable` job, what every job was before classes existed).
    CreateJobIn {
        manifest: JobManifest,
        determinism: Determinism,
    },
    /// The determinism class of one job, or of every job when `None`, answered with
    /// [`SubmitResponse::Classes`].
    Classes {
        job: Option<JobId>,
    },
    /// [`SubmitBody::CreateJobIn`] for a manifest too large for one frame (a job of a
    /// million tasks): its postcard encoding was uploaded with `PutBlob` as blob `manifest`
    /// (at most [`MAX_MANIFEST_BLOB`] bytes). Answered like `CreateJob`.
    CreateJobFromBlob {
        manifest: BlobRef,
        determinism: Determinism,
    },
}

/// Largest manifest [`SubmitBody::CreateJobFromBlob`] takes: a job of
/// [`crate::job::limits::MAX_TASKS`] tasks with short arguments fits.
pub const MAX_MANIFEST_BLOB: u64 = 256 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SubmitResponse {
    Ok,
    Missing {
        blobs: Vec<BlobRef>,
    },
    JobCreated {
        job: JobId,
        tasks: u32,
    },
    Status(StatusReport),
    Results(JobResults),
    Error {
        code: ErrorCode,
        message: String,
    },
    /// `tasks` failed tasks went back to pending (0: the job had none).
    Retried {
        job: JobId,
        tasks: u32,
    },
    ResultsPage(ResultsPage),
    Failures(FailurePage),
    Progress(JobProgress),
    /// Jobs and their determinism class, in job id order.
    Classes(Vec<(JobId, Determinism)>),
}

/// Most tasks one [`JobProgress`] lists.
pub const MAX_PROGRESS_TASKS: usize = 1000;

/// The progress of a job's running tasks (the answer to [`SubmitBody::Progress`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobProgress {
    pub job: JobId,
    /// Running tasks whose workers reported progress, in index order, each at its furthest
    /// in-flight replica (at most [`MAX_PROGRESS_TASKS`]).
    pub tasks: Vec<TaskProgress>,
    /// Running tasks with progress in all (`tasks` may list fewer).
    pub reporting: u32,
}

/// One running task's progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskProgress {
    pub index: u32,
    /// 0..=1.
    pub fraction: f64,
}

/// Most task results one [`SubmitBody::ResultsPage`] answer carries.
pub const MAX_RESULTS_PAGE: u32 = 4096;

/// One page of a job's results: consecutive tasks from `first` on (pending ones included).
/// It may hold fewer than asked for (the coordinator keeps every page well inside
/// [`MAX_FRAME`]), but at least one task unless `first` is past the last task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultsPage {
    pub job: JobId,
    pub name: String,
    pub state: JobState,
    pub tasks_total: u32,
    pub first: u32,
    pub tasks: Vec<TaskResult>,
}

/// A page of a job's failed tasks (the answer to [`SubmitBody::Failures`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailurePage {
    pub job: JobId,
    /// Decided tasks of the job that did not end `ok`, in all pages.
    pub total: u32,
    pub failures: Vec<TaskFailure>,
    /// Whether more follow: ask again with `after` = the last index here.
    pub more: bool,
}

/// A task that did not end `ok`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskFailure {
    pub index: u32,
    /// `accepted` (replicas agreed on a non-ok outcome) or `failed` (no quorum).
    pub status: TaskState,
    /// The accepted outcome's kind (`exit`, `trap`, ...).
    pub outcome: Option<Status>,
    /// For `exit`: the guest's exit code.
    pub exit_code: i32,
    /// For `trap`: the trap kind.
    pub trap: String,
    /// Why a task failed.
    pub reason: Option<String>,
    /// The stderr tail of one replica of the accepted result (for a failed task: of one
    /// replica with a non-ok status), when a worker sent it. Untrusted bytes from a worker.
    pub stderr: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    Unauthorized,
    NotFound,
    BadRequest,
    MissingBlob,
    Internal,
    Overloaded,
}

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Tasks are still being worked on.
    Running,
    /// Every task has ended; all were accepted.
    Done,
    /// Every task has ended; some failed to reach consensus.
    Failed,
    Cancelled,
}

/// `coordinator status --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub jobs: Vec<JobStatus>,
    pub workers: Vec<WorkerStatus>,
    pub coordinator_bytes_sent: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: JobId,
    pub name: String,
    pub state: JobState,
    pub tasks_total: u32,
    /// Tasks with an accepted result.
    pub tasks_done: u32,
    /// Tasks that ended without consensus.
    pub tasks_failed: u32,
    /// Replicas assigned and not yet reported.
    pub replicas_in_flight: u32,
    /// Replicas reported so far.
    pub replicas_reported: u32,
    /// Accepted tasks whose output the coordinator is still pulling from the agreeing
    /// workers (they may be offline): `results` leaves those `.out` files out until it has them.
    pub outputs_collecting: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub node_id: NodeId,
    pub connected: bool,
    pub credit: f64,
    /// Replicas that agreed with an accepted result.
    pub valid: u64,
    /// Replicas that disagreed with an accepted result.
    pub invalid: u64,
}

/// `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResults {
    pub job: JobId,
    pub name: String,
    pub state: JobState,
    pub tasks: Vec<TaskResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub index: u32,
    /// `accepted`, `failed` or `pending`.
    pub status: TaskState,
    /// The accepted outcome's kind (ok, exit, trap, ...).
    pub outcome: Option<Status>,
    pub output_hash: Option<BlobId>,
    pub output_len: Option<u64>,
    pub fuel_used: Option<u64>,
    pub agreeing_workers: Vec<NodeId>,
    /// Why a task failed.
    pub reason: Option<String>,
    /// The accepted output inline when small; otherwise fetch `output_hash` as a blob.
    /// (Never `skip_serializing_if`: postcard is positional, so a skipped field breaks decoding.)
    #[serde(default)]
    pub output: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Pending,
    Accepted,
    Failed,
}

/// Any node → any node, one per bi-stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BlobRequest {
    /// Size and chunk chaining values of a blob.
    Outboard { id: BlobId },
    /// Chunks `start .. start + count` (count at most [`MAX_CHUNKS_PER_REQUEST`]).
    Chunks { id: BlobId, start: u64, count: u32 },
    /// Which chunks the node holds.
    Have { id: BlobId },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BlobResponse {
    Outboard {
        size: u64,
        cvs: Vec<[u8; 32]>,
    },
    /// Followed by `len` raw bytes: the requested chunks, concatenated.
    Chunks {
        start: u64,
        count: u32,
        len: u64,
    },
    /// One bool per chunk.
    Have {
        size: u64,
        chunks: Vec<bool>,
    },
    NotFound,
    /// At the upload limit: try another peer, or this one later.
    Busy {
        retry_after_ms: u64,
    },
    /// The request was malformed (e.g. a chunk range outside the blob).
    BadRequest {
        reason: String,
    },
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame is truncated: {have} of {need} bytes")]
    Truncated { have: usize, need: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{extra} trailing bytes after the message")]
    TrailingBytes { extra: usize },
}

impl DecodeError {
    /// The close code a receiver uses when this error comes from a peer.
    pub fn close_code(&self) -> CloseCode {
        match self {
            DecodeError::FrameTooLarge { .. } => CloseCode::FrameTooLarge,
            _ => CloseCode::Protocol,
        }
    }
}

/// Encode a message as a frame body (no length prefix).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    postcard::to_stdvec(msg).expect("wire messages always serialize")
}

/// Encode a message as a complete frame: length prefix + body.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, DecodeError> {
    let body = encode(msg);
    if body.len() > MAX_FRAME {
        return Err(DecodeError::FrameTooLarge {
            len: body.len(),
            max: MAX_FRAME,
        });
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decode a frame body; the whole body must be one message.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    if body.len() > MAX_FRAME {
        return Err(DecodeError::FrameTooLarge {
            len: body.len(),
            max: MAX_FRAME,
        });
    }
    let (msg, rest) =
        postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { extra: rest.len() });
    }
    Ok(msg)
}

/// Check a frame's length prefix before reading its body.
pub fn check_frame_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(DecodeError::FrameTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(len)
}

/// Decode one complete frame (prefix + body) from the start of `buf`; returns the message and
/// the bytes consumed.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<(T, usize), DecodeError> {
    if buf.len() < 4 {
        return Err(DecodeError::Truncated {
            have: buf.len(),
            need: 4,
        });
    }
    let len = check_frame_len([buf[0], buf[1], buf[2], buf[3]])?;
    if buf.len() < 4 + len {
        return Err(DecodeError::Truncated {
            have: buf.len(),
            need: 4 + len,
        });
    }
    Ok((decode(&buf[4..4 + len])?, 4 + len))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

    use proptest::prelude::*;

    use super::*;
    use crate::job::{JobLimits, TaskEntry, TaskId};

    // ---- strategies for every message and everything inside them ----

    fn text() -> impl Strategy<Value = String> {
        "\\PC{0,12}"
    }

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..40)
    }

    fn blob_id() -> impl Strategy<Value = BlobId> {
        any::<[u8; 32]>().prop_map(BlobId)
    }

    fn node_id() -> impl Strategy<Value = NodeId> {
        any::<[u8; 32]>().prop_map(NodeId)
    }

    fn blob_ref() -> impl Strategy<Value = BlobRef> {
        (blob_id(), any::<u64>()).prop_map(|(id, size)| BlobRef { id, size })
    }

    /// serde encodes a v6 address as ip + port only (flow info and scope id are dropped).
    fn socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddrV4::new(
                Ipv4Addr::from(ip),
                port
            )
            .into()),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                0,
                0
            )
            .into()),
        ]
    }

    fn list<T: std::fmt::Debug>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Vec<T>> {
        prop::collection::vec(s, 0..4)
    }

    fn status() -> impl Strategy<Value = Status> {
        prop::sample::select(vec![
            Status::Ok,
            Status::Exit,
            Status::Trap,
            Status::OutOfFuel,
            Status::MemoryLimit,
            Status::OutputLimit,
            Status::InvalidModule,
        ])
    }

    fn fingerprint() -> impl Strategy<Value = EngineFingerprint> {
        (text(), text(), text()).prop_map(|(engine, arch, settings)| EngineFingerprint {
            engine,
            arch,
            settings,
        })
    }

    fn run_result() -> impl Strategy<Value = RunResult> {
        (
            status(),
            any::<i32>(),
            text(),
            any::<u64>(),
            blob_id(),
            any::<u64>(),
        )
            .prop_map(
                |(status, exit_code, trap, fuel_used, output_hash, output_len)| RunResult {
                    status,
                    exit_code,
                    trap,
                    fuel_used,
                    output_hash,
                    output_len,
                },
            )
    }

    fn report() -> impl Strategy<Value = Report> {
        (
            any::<u64>(),
            run_result(),
            prop::option::of(bytes()),
            any::<u64>(),
        )
            .prop_map(|(replica, result, output, wall_ms)| Report {
                replica,
                result,
                output,
                wall_ms,
            })
    }

    fn worker_msg() -> impl Strategy<Value = WorkerMsg> {
        prop_oneof![
            (
                text(),
                fingerprint(),
                any::<u32>(),
                prop::option::of(socket_addr()),
                list(blob_id())
            )
                .prop_map(|(agent, fingerprint, slots, peer_addr, blobs)| {
                    WorkerMsg::Hello {
                        agent,
                        fingerprint,
                        slots,
                        peer_addr,
                        blobs,
                    }
                }),
            any::<u32>().prop_map(|max| WorkerMsg::RequestWork { max }),
            report().prop_map(WorkerMsg::Report),
            list(blob_id()).prop_map(|blobs| WorkerMsg::HaveBlobs { blobs }),
            list(any::<u64>()).prop_map(|replicas| WorkerMsg::Abandon { replicas }),
            (node_id(), blob_id()).prop_map(|(peer, blob)| WorkerMsg::BadPeer { peer, blob }),
            list(report()).prop_map(WorkerMsg::Reports),
            node_id().prop_map(|peer| WorkerMsg::Punch { peer }),
            (any::<u64>(), bytes())
                .prop_map(|(replica, stderr)| WorkerMsg::Stderr { replica, stderr }),
            list(any::<u64>()).prop_map(|replicas| WorkerMsg::Holding { replicas }),
            // (Finite fractions: NaN is never equal to itself, so it cannot round-trip by `==`.)
            list((any::<u64>(), -1e9..1e9f64, any::<bool>()).prop_map(
                |(replica, fraction, paused)| ProgressUpdate {
                    replica,
                    fraction,
                    paused,
                }
            ))
            .prop_map(|updates| WorkerMsg::Progress { updates }),
            fingerprint().prop_map(|native| WorkerMsg::Engines { native }),
        ]
    }

    fn determinism() -> impl Strategy<Value = Determinism> {
        prop::sample::select(vec![Determinism::Native, Determinism::Portable])
    }

    fn task_manifest() -> impl Strategy<Value = TaskManifest> {
        (
            (any::<u64>(), any::<u32>()),
            text(),
            blob_ref(),
            prop::option::of(blob_ref()),
            list(text()),
            (any::<u64>(), any::<u32>(), any::<u64>()),
        )
            .prop_map(
                |((job, index), name, module, input, args, (fuel, memory_mb, max_output))| {
                    TaskManifest {
                        id: TaskId {
                            job: JobId(job),
                            index,
                        },
                        name,
                        module,
                        input,
                        args,
                        fuel,
                        memory_mb,
                        max_output,
                    }
                },
            )
    }

    fn assignment() -> impl Strategy<Value = Assignment> {
        (
            any::<u64>(),
            task_manifest(),
            any::<u64>(),
            list((node_id(), socket_addr())),
        )
            .prop_map(|(replica, task, deadline_secs, peers)| Assignment {
                replica,
                task,
                deadline_secs,
                peers: peers
                    .into_iter()
                    .map(|(node_id, addr)| PeerAddr { node_id, addr })
                    .collect(),
            })
    }

    fn coord_msg() -> impl Strategy<Value = CoordMsg> {
        prop_oneof![
            (text(), socket_addr()).prop_map(|(agent, observed_addr)| CoordMsg::Welcome {
                agent,
                observed_addr
            }),
            (list(assignment()), any::<u64>()).prop_map(|(assignments, retry_after_ms)| {
                CoordMsg::Assign {
                    assignments,
                    retry_after_ms,
                }
            }),
            list(any::<u64>()).prop_map(|replicas| CoordMsg::Ack { replicas }),
            (prop::option::of(any::<u64>()), text())
                .prop_map(|(replica, reason)| CoordMsg::Rejected { replica, reason }),
            list(any::<u64>()).prop_map(|replicas| CoordMsg::Cancel { replicas }),
            (socket_addr(), any::<bool>()).prop_map(|(observed_addr, reachable)| {
                CoordMsg::Reachability {
                    observed_addr,
                    reachable,
                }
            }),
            (node_id(), socket_addr()).prop_map(|(peer, addr)| CoordMsg::Punch { peer, addr }),
            Just(CoordMsg::Room),
            (list((assignment(), determinism())), any::<u64>()).prop_map(
                |(assignments, retry_after_ms)| CoordMsg::AssignClass {
                    assignments: assignments
                        .into_iter()
                        .map(|(assignment, determinism)| ClassedAssignment {
                            assignment,
                            determinism,
                        })
                        .collect(),
                    retry_after_ms,
                }
            ),
        ]
    }

    fn job_manifest() -> impl Strategy<Value = JobManifest> {
        let limits = (
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(quorum, max_replicas, fuel, memory_mb, max_output, deadline_secs)| JobLimits {
                    quorum,
                    max_replicas,
                    fuel,
                    memory_mb,
                    max_output,
                    deadline_secs,
                },
            );
        let entry = (list(text()), prop::option::of(blob_ref()))
            .prop_map(|(args, input)| TaskEntry { args, input });
        (text(), blob_ref(), limits, list(entry)).prop_map(|(name, module, limits, tasks)| {
            JobManifest {
                name,
                module,
                limits,
                tasks,
            }
        })
    }

    fn job_id() -> impl Strategy<Value = JobId> {
        any::<u64>().prop_map(JobId)
    }

    fn submit_request() -> impl Strategy<Value = SubmitRequest> {
        let body = prop_oneof![
            list(blob_ref()).prop_map(|blobs| SubmitBody::MissingBlobs { blobs }),
            blob_ref().prop_map(|blob| SubmitBody::PutBlob { blob }),
            job_manifest().prop_map(|manifest| SubmitBody::CreateJob { manifest }),
            prop::option::of(job_id()).prop_map(|job| SubmitBody::Status { job }),
            job_id().prop_map(|job| SubmitBody::Results { job }),
            job_id().prop_map(|job| SubmitBody::Cancel { job }),
            job_id().prop_map(|job| SubmitBody::Retry { job }),
            (job_id(), any::<u32>(), any::<u32>())
                .prop_map(|(job, first, max)| SubmitBody::ResultsPage { job, first, max }),
            (job_id(), prop::option::of(any::<u32>()), any::<u32>())
                .prop_map(|(job, after, max)| SubmitBody::Failures { job, after, max }),
            job_id().prop_map(|job| SubmitBody::Progress { job }),
            (job_manifest(), determinism()).prop_map(|(manifest, determinism)| {
                SubmitBody::CreateJobIn {
                    manifest,
                    determinism,
                }
            }),
            prop::option::of(job_id()).prop_map(|job| SubmitBody::Classes { job }),
            (blob_ref(), determinism()).prop_map(|(manifest, determinism)| {
                SubmitBody::CreateJobFromBlob {
                    manifest,
                    determinism,
                }
            }),
        ];
        (text(), body).prop_map(|(token, body)| SubmitRequest { token, body })
    }

    fn job_state() -> impl Strategy<Value = JobState> {
        prop::sample::select(vec![
            JobState::Running,
            JobState::Done,
            JobState::Failed,
            JobState::Cancelled,
        ])
    }

    fn status_report() -> impl Strategy<Value = StatusReport> {
        let job =
            (job_id(), text(), job_state(), any::<[u32; 6]>()).prop_map(|(id, name, state, n)| {
                JobStatus {
                    id,
                    name,
                    state,
                    tasks_total: n[0],
                    tasks_done: n[1],
                    tasks_failed: n[2],
                    replicas_in_flight: n[3],
                    replicas_reported: n[4],
                    outputs_collecting: n[5],
                }
            });
        // Any finite credit (NaN would not compare equal to itself).
        let worker = (
            node_id(),
            any::<bool>(),
            -1e18f64..1e18,
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(node_id, connected, credit, valid, invalid)| WorkerStatus {
                    node_id,
                    connected,
                    credit,
                    valid,
                    invalid,
                },
            );
        (list(job), list(worker), any::<u64>()).prop_map(
            |(jobs, workers, coordinator_bytes_sent)| StatusReport {
                jobs,
                workers,
                coordinator_bytes_sent,
            },
        )
    }

    fn task_result() -> impl Strategy<Value = TaskResult> {
        (
            any::<u32>(),
            prop::sample::select(vec![
                TaskState::Pending,
                TaskState::Accepted,
                TaskState::Failed,
            ]),
            prop::option::of(status()),
            prop::option::of(blob_id()),
            (
                prop::option::of(any::<u64>()),
                prop::option::of(any::<u64>()),
            ),
            list(node_id()),
            prop::option::of(text()),
            prop::option::of(bytes()),
        )
            .prop_map(
                |(
                    index,
                    status,
                    outcome,
                    output_hash,
                    (output_len, fuel_used),
                    agreeing_workers,
                    reason,
                    output,
                )| {
                    TaskResult {
                        index,
                        status,
                        outcome,
                        output_hash,
                        output_len,
                        fuel_used,
                        agreeing_workers,
                        reason,
                        output,
                    }
                },
            )
    }

    fn task_failure() -> impl Strategy<Value = TaskFailure> {
        (
            any::<u32>(),
            prop::sample::select(vec![TaskState::Accepted, TaskState::Failed]),
            prop::option::of(status()),
            any::<i32>(),
            text(),
            prop::option::of(text()),
            prop::option::of(bytes()),
        )
            .prop_map(
                |(index, status, outcome, exit_code, trap, reason, stderr)| TaskFailure {
                    index,
                    status,
                    outcome,
                    exit_code,
                    trap,
                    reason,
                    stderr,
                },
            )
    }

    fn submit_response() -> impl Strategy<Value = SubmitResponse> {
        let code = prop::sample::select(vec![
            ErrorCode::Unauthorized,
            ErrorCode::NotFound,
            ErrorCode::BadRequest,
            ErrorCode::MissingBlob,
            ErrorCode::Internal,
            ErrorCode::Overloaded,
        ]);
        let results = (job_id(), text(), job_state(), list(task_result())).prop_map(
            |(job, name, state, tasks)| JobResults {
                job,
                name,
                state,
                tasks,
            },
        );
        let page = (
            job_id(),
            text(),
            job_state(),
            any::<u32>(),
            any::<u32>(),
            list(task_result()),
        )
            .prop_map(
                |(job, name, state, tasks_total, first, tasks)| ResultsPage {
                    job,
                    name,
                    state,
                    tasks_total,
                    first,
                    tasks,
                },
            );
        prop_oneof![
            Just(SubmitResponse::Ok),
            list(blob_ref()).prop_map(|blobs| SubmitResponse::Missing { blobs }),
            (job_id(), any::<u32>())
                .prop_map(|(job, tasks)| SubmitResponse::JobCreated { job, tasks }),
            status_report().prop_map(SubmitResponse::Status),
            results.prop_map(SubmitResponse::Results),
            (code, text()).prop_map(|(code, message)| SubmitResponse::Error { code, message }),
            (job_id(), any::<u32>())
                .prop_map(|(job, tasks)| SubmitResponse::Retried { job, tasks }),
            page.prop_map(SubmitResponse::ResultsPage),
            (job_id(), any::<u32>(), list(task_failure()), any::<bool>()).prop_map(
                |(job, total, failures, more)| SubmitResponse::Failures(FailurePage {
                    job,
                    total,
                    failures,
                    more,
                })
            ),
            (job_id(), list((any::<u32>(), 0.0..=1.0f64)), any::<u32>()).prop_map(
                |(job, tasks, reporting)| SubmitResponse::Progress(JobProgress {
                    job,
                    tasks: tasks
                        .into_iter()
                        .map(|(index, fraction)| TaskProgress { index, fraction })
                        .collect(),
                    reporting,
                })
            ),
            list((job_id(), determinism())).prop_map(SubmitResponse::Classes),
        ]
    }

    fn blob_request() -> impl Strategy<Value = BlobRequest> {
        prop_oneof![
            blob_id().prop_map(|id| BlobRequest::Outboard { id }),
            (blob_id(), any::<u64>(), any::<u32>())
                .prop_map(|(id, start, count)| BlobRequest::Chunks { id, start, count }),
            blob_id().prop_map(|id| BlobRequest::Have { id }),
        ]
    }

    fn blob_response() -> impl Strategy<Value = BlobResponse> {
        prop_oneof![
            (any::<u64>(), list(any::<[u8; 32]>()))
                .prop_map(|(size, cvs)| BlobResponse::Outboard { size, cvs }),
            (any::<u64>(), any::<u32>(), any::<u64>())
                .prop_map(|(start, count, len)| BlobResponse::Chunks { start, count, len }),
            (any::<u64>(), list(any::<bool>()))
                .prop_map(|(size, chunks)| BlobResponse::Have { size, chunks }),
            Just(BlobResponse::NotFound),
            any::<u64>().prop_map(|retry_after_ms| BlobResponse::Busy { retry_after_ms }),
            text().prop_map(|reason| BlobResponse::BadRequest { reason }),
        ]
    }

    /// encode_frame → decode_frame gives back the message and consumes the whole frame;
    /// every proper prefix of the frame is refused as truncated.
    fn assert_round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: &T) {
        let frame = encode_frame(msg).unwrap();
        assert_eq!(
            decode_frame::<T>(&frame).unwrap(),
            (msg_clone(msg), frame.len())
        );
        assert_eq!(&decode::<T>(&frame[4..]).unwrap(), msg);
        for cut in [0, 1, 3, 4, frame.len() / 2, frame.len() - 1] {
            if cut < frame.len() {
                assert!(
                    matches!(
                        decode_frame::<T>(&frame[..cut]),
                        Err(DecodeError::Truncated { .. })
                    ),
                    "cut at {cut}"
                );
            }
        }
        let mut longer = frame[4..].to_vec();
        longer.push(0);
        assert_eq!(
            decode::<T>(&longer),
            Err(DecodeError::TrailingBytes { extra: 1 })
        );
    }

    fn msg_clone<T: Serialize + DeserializeOwned>(msg: &T) -> T {
        postcard::from_bytes(&postcard::to_stdvec(msg).unwrap()).unwrap()
    }

    proptest! {
        #[test]
        fn worker_msg_round_trips(msg in worker_msg()) { assert_round_trip(&msg); }

        #[test]
        fn coord_msg_round_trips(msg in coord_msg()) { assert_round_trip(&msg); }

        #[test]
        fn submit_request_round_trips(msg in submit_request()) { assert_round_trip(&msg); }

        #[test]
        fn submit_response_round_trips(msg in submit_response()) { assert_round_trip(&msg); }

        #[test]
        fn blob_request_round_trips(msg in blob_request()) { assert_round_trip(&msg); }

        #[test]
        fn blob_response_round_trips(msg in blob_response()) { assert_round_trip(&msg); }

        /// Random bytes never panic any decoder: each returns a message or an error.
        #[test]
        fn random_bytes_never_panic_any_decoder(buf in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode::<WorkerMsg>(&buf);
            let _ = decode::<CoordMsg>(&buf);
            let _ = decode::<SubmitRequest>(&buf);
            let _ = decode::<SubmitResponse>(&buf);
            let _ = decode::<BlobRequest>(&buf);
            let _ = decode::<BlobResponse>(&buf);
            let _ = decode_frame::<WorkerMsg>(&buf);
            let _ = decode_frame::<CoordMsg>(&buf);
            let _ = decode_frame::<SubmitRequest>(&buf);
            let _ = decode_frame::<SubmitResponse>(&buf);
            let _ = decode_frame::<BlobRequest>(&buf);
            let _ = decode_frame::<BlobResponse>(&buf);
        }

        /// A valid frame with random bytes flipped decodes to something or fails; it never
        /// panics, and whatever it decodes to re-encodes within the frame limit.
        #[test]
        fn corrupted_frames_never_panic(msg in coord_msg(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
            let mut frame = encode_frame(&msg).unwrap();
            for (at, x) in flips {
                let i = at.index(frame.len());
                frame[i] ^= x;
            }
            if let Ok((m, used)) = decode_frame::<CoordMsg>(&frame) {
                prop_assert!(used <= frame.len());
                prop_assert!(encode_frame(&m).is_ok());
            }
        }
    }

    /// A Hello naming as many blobs as a coordinator takes is far inside a frame, and one
    /// naming every blob of a worker that ran a million tiny tasks (a copy of each output)
    /// is not: why workers announce at most `MAX_HAVE_BLOBS_PER_MSG`.
    #[test]
    fn a_hello_of_the_announced_blobs_fits_a_frame() {
        let hello = |n: usize| WorkerMsg::Hello {
            agent: "peergrid-worker/0".into(),
            fingerprint: EngineFingerprint {
                engine: "e".repeat(64),
                arch: "a".repeat(64),
                settings: "s".repeat(512),
            },
            slots: 64,
            peer_addr: Some("[2001:db8::1]:4433".parse().unwrap()),
            blobs: vec![BlobId([0xab; 32]); n],
        };
        let frame = encode_frame(&hello(crate::limits::MAX_HAVE_BLOBS_PER_MSG)).unwrap();
        assert!(frame.len() < MAX_FRAME / 32, "{} bytes", frame.len());
        assert!(matches!(
            encode_frame(&hello(1_000_000)),
            Err(DecodeError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn oversized_frames_are_refused_before_the_body() {
        let prefix = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let err = decode_frame::<WorkerMsg>(&prefix).unwrap_err();
        assert_eq!(
            err,
            DecodeError::FrameTooLarge {
                len: MAX_FRAME + 1,
                max: MAX_FRAME
            }
        );
        assert_eq!(err.close_code(), CloseCode::FrameTooLarge);
        assert_eq!(
            check_frame_len(u32::MAX.to_be_bytes())
                .unwrap_err()
                .close_code(),
            CloseCode::FrameTooLarge
        );
        assert_eq!(
            check_frame_len((MAX_FRAME as u32).to_be_bytes()),
            Ok(MAX_FRAME)
        );
        let body = vec![0u8; MAX_FRAME + 1];
        assert!(matches!(
            decode::<WorkerMsg>(&body),
            Err(DecodeError::FrameTooLarge { .. })
        ));
        let huge = WorkerMsg::HaveBlobs {
            blobs: vec![BlobId([0; 32]); MAX_FRAME / 32 + 1],
        };
        assert!(matches!(
            encode_frame(&huge),
            Err(DecodeError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn garbage_is_malformed_with_the_protocol_close_code() {
        // Variant 200 of WorkerMsg does not exist (unknown variants are violations).
        let err = decode::<WorkerMsg>(&[200, 0]).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)));
        assert_eq!(err.close_code(), CloseCode::Protocol);
        assert!(matches!(
            decode::<WorkerMsg>(&[]),
            Err(DecodeError::Malformed(_))
        ));
        // A vec claiming 2^32 - 1 elements in a 6-byte body fails fast without allocating.
        let lie = [3, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(matches!(
            decode::<WorkerMsg>(&lie),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(
            decode::<WorkerMsg>(&[1, 4, 9]),
            Err(DecodeError::TrailingBytes { extra: 1 })
        );
        assert_eq!(
            DecodeError::Truncated { have: 1, need: 4 }.close_code(),
            CloseCode::Protocol
        );
    }

    #[test]
    fn close_codes_round_trip_and_are_frozen() {
        let all = [
            (CloseCode::Done, 0),
            (CloseCode::Protocol, 1),
            (CloseCode::FrameTooLarge, 2),
            (CloseCode::Rejected, 3),
            (CloseCode::Shutdown, 4),
            (CloseCode::Overloaded, 5),
        ];
        for (c, n) in all {
            assert_eq!(c.code(), n);
            assert_eq!(CloseCode::from_code(u64::from(n)), Some(c));
        }
        assert_eq!(CloseCode::from_code(6), None);
    }

    // ---- golden bytes: these freeze the version-1 encoding. If one fails, a variant or a
    // field was reordered, removed or retyped: that breaks every deployed node. Add new
    // variants at the end instead (and a new golden test for them). ----

    const GOLDEN_CHUNKS_REQ: &str =
        "0000002301abababababababababababababababababababababababababababababababab0210";
    const GOLDEN_OUTBOARD: &str =
        "000000230005010101010101010101010101010101010101010101010101010101010101010101";
    const GOLDEN_WELCOME: &str = "0000000a000163007f000001d122";
    const GOLDEN_ASSIGN: &str = "000000670101050102017033333333333333333333333333333333333333333333333333333333333333330a00010178e807408001d80401444444444444444444444444444444444444444444444444444444444444444401000000000000000000000000000000010700";
    const GOLDEN_PUT_BLOB: &str =
        "0000002703746f6b011111111111111111111111111111111111111111111111111111111111111111e807";
    const GOLDEN_RESULTS: &str = "0000005f0407016a01020001010001555555555555555555555555555555555555555555555555555555555555555501020163016666666666666666666666666666666666666666666666666666666666666666000001020000000000010172010101";
    const GOLDEN_HELLO: &str = "000000350003772f310165016101730201000a000001d122010101010101010101010101010101010101010101010101010101010101010101";
    const GOLDEN_REPORT: &str = "0000002f0209010100ac02222222222222222222222222222222222222222222222222222222222222222203010368690ae807";
    const GOLDEN_BAD_PEER: &str = "00000041050a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b";

    /// `frame_hex` may contain spaces between fields, for reading.
    fn golden<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
        msg: T,
        frame_hex: &str,
    ) {
        let frame_hex: String = frame_hex.split_whitespace().collect();
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(
            hex::encode(&frame),
            frame_hex,
            "encoding of {msg:?} changed"
        );
        let (back, used) = decode_frame::<T>(&hex::decode(&frame_hex).unwrap()).unwrap();
        assert_eq!((back, used), (msg, frame.len()));
    }

    fn sample_result() -> RunResult {
        RunResult {
            status: Status::Exit,
            exit_code: -1,
            trap: String::new(),
            fuel_used: 300,
            output_hash: BlobId([0x22; 32]),
            output_len: 3,
        }
    }

    #[test]
    fn golden_worker_msgs() {
        golden(WorkerMsg::RequestWork { max: 4 }, "000000020104");
        golden(
            WorkerMsg::Hello {
                agent: "w/1".into(),
                fingerprint: EngineFingerprint {
                    engine: "e".into(),
                    arch: "a".into(),
                    settings: "s".into(),
                },
                slots: 2,
                peer_addr: Some("10.0.0.1:4433".parse().unwrap()),
                blobs: vec![BlobId([0x01; 32])],
            },
            GOLDEN_HELLO,
        );
        golden(
            WorkerMsg::Report(Report {
                replica: 9,
                result: sample_result(),
                output: Some(b"hi\n".to_vec()),
                wall_ms: 1000,
            }),
            GOLDEN_REPORT,
        );
        golden(
            WorkerMsg::BadPeer {
                peer: NodeId([0x0a; 32]),
                blob: BlobId([0x0b; 32]),
            },
            GOLDEN_BAD_PEER,
        );
        // Variant 8 (after Punch = 7): replica 3, stderr "e".
        golden(
            WorkerMsg::Stderr {
                replica: 3,
                stderr: b"e".to_vec(),
            },
            "00000004 08 03 01 65",
        );
        // Variant 9: replicas [1, 300].
        golden(
            WorkerMsg::Holding {
                replicas: vec![1, 300],
            },
            "00000005 09 02 01 ac02",
        );
        // Variant 10: replica 2, fraction 0.5 (f64 little-endian), paused.
        golden(
            WorkerMsg::Progress {
                updates: vec![ProgressUpdate {
                    replica: 2,
                    fraction: 0.5,
                    paused: true,
                }],
            },
            "0000000c 0a 01 02 000000000000e03f 01",
        );
        // Variant 11: the native engine's fingerprint (three strings).
        golden(
            WorkerMsg::Engines {
                native: EngineFingerprint {
                    engine: "e".into(),
                    arch: "a".into(),
                    settings: "s".into(),
                },
            },
            "00000007 0b 0165 0161 0173",
        );
    }

    #[test]
    fn capabilities_are_words_after_the_version() {
        assert!(has_capability(
            "peergrid-coordinator/0.1.0 stderr",
            CAP_STDERR
        ));
        assert!(has_capability("c/1 x stderr", CAP_STDERR));
        assert!(!has_capability("peergrid-coordinator/0.1.0", CAP_STDERR));
        assert!(
            !has_capability("stderr", CAP_STDERR),
            "the version is no capability"
        );
        assert!(!has_capability("c/1 stderrx", CAP_STDERR));
    }

    #[test]
    fn golden_coord_msgs() {
        golden(
            CoordMsg::Ack {
                replicas: vec![1, 300],
            },
            "00000005 02 02 01 ac02",
        );
        golden(
            CoordMsg::Welcome {
                agent: "c".into(),
                observed_addr: "127.0.0.1:4433".parse().unwrap(),
            },
            GOLDEN_WELCOME,
        );
        golden(
            CoordMsg::Assign {
                assignments: vec![Assignment {
                    replica: 5,
                    task: TaskManifest {
                        id: TaskId {
                            job: JobId(1),
                            index: 2,
                        },
                        name: "p".into(),
                        module: BlobRef {
                            id: BlobId([0x33; 32]),
                            size: 10,
                        },
                        input: None,
                        args: vec!["x".into()],
                        fuel: 1000,
                        memory_mb: 64,
                        max_output: 128,
                    },
                    deadline_secs: 600,
                    peers: vec![PeerAddr {
                        node_id: NodeId([0x44; 32]),
                        addr: "[::1]:7".parse().unwrap(),
                    }],
                }],
                retry_after_ms: 0,
            },
            GOLDEN_ASSIGN,
        );
        // Variant 8, an empty batch: retry after 100 ms. A class is one byte, native 0 and
        // portable 1 (see `golden_submit_messages`).
        golden(
            CoordMsg::AssignClass {
                assignments: vec![],
                retry_after_ms: 100,
            },
            "00000003 08 00 64",
        );
    }

    #[test]
    fn golden_submit_messages() {
        golden(
            SubmitRequest {
                token: "tok".into(),
                body: SubmitBody::PutBlob {
                    blob: BlobRef {
                        id: BlobId([0x11; 32]),
                        size: 1000,
                    },
                },
            },
            GOLDEN_PUT_BLOB,
        );
        golden(
            SubmitRequest {
                token: "t".into(),
                body: SubmitBody::Status {
                    job: Some(JobId(3)),
                },
            },
            "00000005 0174 03 01 03",
        );
        // SubmitBody variant 8 (after Retry = 6 and ResultsPage = 7): job 3, after index 7,
        // max 2.
        golden(
            SubmitRequest {
                token: "t".into(),
                body: SubmitBody::Failures {
                    job: JobId(3),
                    after: Some(7),
                    max: 2,
                },
            },
            "00000007 0174 08 03 0107 02",
        );
        // SubmitResponse variant 8 (after Retried = 6 and ResultsPage = 7).
        golden(
            SubmitResponse::Failures(FailurePage {
                job: JobId(3),
                total: 1,
                failures: vec![TaskFailure {
                    index: 4,
                    status: TaskState::Accepted,
                    outcome: Some(Status::Exit),
                    exit_code: 2,
                    trap: String::new(),
                    reason: None,
                    stderr: Some(b"x".to_vec()),
                }],
                more: false,
            }),
            "0000000f 08 03 01 01 04 01 01 01 04 00 00 01 01 78 00",
        );
        golden(
            SubmitResponse::Error {
                code: ErrorCode::Unauthorized,
                message: "no".into(),
            },
            "00000005 05 00 026e6f",
        );
        // Appended variants keep every earlier index: Retry is 6, ResultsPage 7.
        golden(
            SubmitRequest {
                token: "t".into(),
                body: SubmitBody::Retry { job: JobId(3) },
            },
            "00000004 0174 06 03",
        );
        // Variant 11: all jobs' classes; SubmitResponse variant 10: job 3 native, job 4
        // portable.
        golden(
            SubmitRequest {
                token: "t".into(),
                body: SubmitBody::Classes { job: None },
            },
            "00000004 0174 0b 00",
        );
        golden(
            SubmitResponse::Classes(vec![
                (JobId(3), Determinism::Native),
                (JobId(4), Determinism::Portable),
            ]),
            "00000006 0a 02 03 00 04 01",
        );
        golden(
            SubmitRequest {
                token: "t".into(),
                body: SubmitBody::ResultsPage {
                    job: JobId(3),
                    first: 2,
                    max: 100,
                },
            },
            "00000006 0174 07 03 02 64",
        );
        golden(
            SubmitResponse::Retried {
                job: JobId(3),
                tasks: 2,
            },
            "00000003 06 03 02",
        );
        golden(
            SubmitResponse::ResultsPage(ResultsPage {
                job: JobId(3),
                name: "j".into(),
                state: JobState::Running,
                tasks_total: 9,
                first: 8,
                tasks: vec![],
            }),
            "00000008 07 03 016a 00 09 08 00",
        );
        golden(
            SubmitResponse::Results(JobResults {
                job: JobId(7),
                name: "j".into(),
                state: JobState::Done,
                tasks: vec![
                    TaskResult {
                        index: 0,
                        status: TaskState::Accepted,
                        outcome: Some(Status::Ok),
                        output_hash: Some(BlobId([0x55; 32])),
                        output_len: Some(2),
                        fuel_used: Some(99),
                        agreeing_workers: vec![NodeId([0x66; 32])],
                        reason: None,
                        output: None,
                    },
                    TaskResult {
                        index: 1,
                        status: TaskState::Failed,
                        outcome: None,
                        output_hash: None,
                        output_len: None,
                        fuel_used: None,
                        agreeing_workers: vec![],
                        reason: Some("r".into()),
                        output: Some(vec![1]),
                    },
                ],
            }),
            GOLDEN_RESULTS,
        );
    }

    #[test]
    fn golden_blob_messages() {
        golden(
            BlobRequest::Chunks {
                id: BlobId([0xab; 32]),
                start: 2,
                count: 16,
            },
            GOLDEN_CHUNKS_REQ,
        );
        golden(
            BlobResponse::Chunks {
                start: 2,
                count: 16,
                len: 4_194_304,
            },
            "00000007 01 02 10 80808002",
        );
        golden(
            BlobResponse::Outboard {
                size: 5,
                cvs: vec![[0x01; 32]],
            },
            GOLDEN_OUTBOARD,
        );
        golden(
            BlobResponse::Have {
                size: 1,
                chunks: vec![true, false],
            },
            "00000005 02 01 02 01 00",
        );
        golden(BlobResponse::NotFound, "0000000103");
        golden(
            BlobResponse::Busy {
                retry_after_ms: 250,
            },
            "0000000304fa01",
        );
    }
}
