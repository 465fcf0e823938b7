//! The Peergrid worker: runs untrusted WebAssembly tasks for a coordinator, fetching their
//! modules and inputs from peers.
//!
//! # Layout
//! - [`sandbox`]: the deterministic wasmtime sandbox (guest ABI, fuel, limits, compile cache).
//! - [`blobs`]: the content-addressed blob store in the data dir.
//! - [`swarm`]: the blob protocol: serving chunks to peers, verified multi-source download.
//! - [`daemon`]: `worker join`: the session with the coordinator, the work loop, politeness.
//! - [`priority`]: the scheduling priority of the computing threads (idle by default).

pub mod blobs;
pub mod daemon;
pub mod priority;
pub mod sandbox;
pub mod swarm;
