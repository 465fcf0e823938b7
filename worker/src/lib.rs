//! The Peergrid worker: runs untrusted WebAssembly tasks for a coordinator, fetching their
//! modules and inputs from peers.
//!
//! # Layout
//! - [`sandbox`]: the deterministic wasmtime sandbox (guest ABI, fuel, limits, compile cache).
//! - [`blobs`]: the content-addressed blob store in the data dir (re-exported from the
//!   `peergrid-blobs` crate, [`::blobs::store`]).
//! - [`swarm`]: the blob protocol: serving chunks to peers, verified multi-source download
//!   (re-exported from `peergrid-blobs`, [`::blobs::swarm`]).
//! - [`daemon`]: `worker join`: the session with the coordinator, the work loop, politeness.
//! - [`priority`]: the scheduling priority of the computing threads (idle by default).

pub mod daemon;
pub mod priority;
pub mod sandbox;

/// The blob store, from the `peergrid-blobs` crate (kept at its old path).
pub use ::blobs::store as blobs;
/// The blob protocol, from the `peergrid-blobs` crate (kept at its old path).
pub use ::blobs::swarm;
