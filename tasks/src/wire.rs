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
//!
//! Small outputs (at most [`INLINE_OUTPUT_MAX`] bytes) travel inline in the report; larger
//! ones stay in the worker's blob store, named by `output_hash`, and the coordinator fetches
//! the accepted one over `peergrid/blob/1`.
//!
//! ## Submitter requests (`peergrid/submit/1`)
//! Every request carries the coordinator's submit token; a wrong token gets
//! [`SubmitResponse::Error`] with [`ErrorCode::Unauthorized`]. A job is uploaded as:
//! `MissingBlobs` (which blobs the coordinator lacks) → `PutBlob` for each missing one →
//! `CreateJob`. `Status`, `Results` and `Cancel` read or end jobs; outputs that are not
//! inline are fetched over `peergrid/blob/1`.
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
use crate::job::{JobId, JobManifest, TaskManifest};
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
        /// Tasks it runs at once.
        slots: u32,
        /// Where peers can reach its blob server, if anywhere.
        peer_addr: Option<SocketAddr>,
        /// Blobs it holds and serves.
        blobs: Vec<BlobId>,
    },
    /// Ask for up to `max` assignments.
    RequestWork { max: u32 },
    Report(Report),
    HaveBlobs { blobs: Vec<BlobId> },
    Abandon { replicas: Vec<ReplicaId> },
    BadPeer { peer: NodeId, blob: BlobId },
    /// Several reports in one frame (a worker flushing its queue).
    Reports(Vec<Report>),
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
    Rejected { replica: Option<ReplicaId>, reason: String },
    /// Stop working on these replicas (the task is decided or the job cancelled).
    Cancel { replicas: Vec<ReplicaId> },
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
    MissingBlobs { blobs: Vec<BlobRef> },
    /// Followed on the same stream by exactly `blob.size` raw bytes.
    PutBlob { blob: BlobRef },
    CreateJob { manifest: JobManifest },
    /// One job, or all when `None`.
    Status { job: Option<JobId> },
    Results { job: JobId },
    Cancel { job: JobId },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SubmitResponse {
    Ok,
    Missing { blobs: Vec<BlobRef> },
    JobCreated { job: JobId, tasks: u32 },
    Status(StatusReport),
    Results(JobResults),
    Error { code: ErrorCode, message: String },
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
    #[serde(skip_serializing_if = "Option::is_none", default)]
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
    Outboard { size: u64, cvs: Vec<[u8; 32]> },
    /// Followed by `len` raw bytes: the requested chunks, concatenated.
    Chunks { start: u64, count: u32, len: u64 },
    /// One bool per chunk.
    Have { size: u64, chunks: Vec<bool> },
    NotFound,
    /// At the upload limit: try another peer, or this one later.
    Busy { retry_after_ms: u64 },
    /// The request was malformed (e.g. a chunk range outside the blob).
    BadRequest { reason: String },
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
        return Err(DecodeError::FrameTooLarge { len: body.len(), max: MAX_FRAME });
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decode a frame body; the whole body must be one message.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    if body.len() > MAX_FRAME {
        return Err(DecodeError::FrameTooLarge { len: body.len(), max: MAX_FRAME });
    }
    let (msg, rest) = postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { extra: rest.len() });
    }
    Ok(msg)
}

/// Check a frame's length prefix before reading its body.
pub fn check_frame_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(DecodeError::FrameTooLarge { len, max: MAX_FRAME });
    }
    Ok(len)
}

/// Decode one complete frame (prefix + body) from the start of `buf`; returns the message and
/// the bytes consumed.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<(T, usize), DecodeError> {
    if buf.len() < 4 {
        return Err(DecodeError::Truncated { have: buf.len(), need: 4 });
    }
    let len = check_frame_len([buf[0], buf[1], buf[2], buf[3]])?;
    if buf.len() < 4 + len {
        return Err(DecodeError::Truncated { have: buf.len(), need: 4 + len });
    }
    Ok((decode(&buf[4..4 + len])?, 4 + len))
}
