//! Peergrid's shared vocabulary. No async runtime, no sockets, no clock: everything here is
//! plain data and pure functions, so every other part (and every test) can rely on it.
//!
//! # Layout
//! - [`blob`]: [`BlobId`] (plain blake3 root) and the chunked verification scheme.
//! - [`job`]: the TOML job file ([`JobSpec`]), its validation, and the [`JobManifest`] it becomes.
//! - [`outcome`]: what running a task produced ([`RunResult`]), the result digest, the engine fingerprint.
//! - [`identity`]: ed25519 node keys, [`NodeId`], tickets, and the pinned-key TLS configs.
//! - [`wire`]: the protocol spec: messages, framing, ALPNs, close codes.
//! - [`module`]: whether a task module imports the checkpoint API (a checkpointing job).
//! - [`limits`]: every resource limit a node enforces on its peers, with the reasons.
//! - `net` (feature `net`): async QUIC helpers: endpoints with pinned keys, frame I/O.

pub mod blob;
pub mod identity;
pub mod job;
pub mod limits;
pub mod module;
pub mod outcome;
pub mod release;
pub mod wire;

pub use blob::{BlobId, BlobRef};
pub use identity::{NodeId, NodeKey, Ticket};
pub use job::{Determinism, JobId, JobManifest, JobSpec, TaskId, TaskManifest};
pub use outcome::{EngineFingerprint, ResultDigest, RunResult, Status};
#[cfg(feature = "net")]
pub mod net;
