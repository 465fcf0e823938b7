//! Peergrid's blob layer: content-addressed storage of modules, inputs and outputs, and the
//! blob protocol (`peergrid/blob/1`) that moves them between peers. Both the coordinator (the
//! first seed of every blob) and the workers (which fetch from each other and serve what they
//! hold) use it; it has no sandbox and no knowledge of jobs, so the coordinator does not
//! compile wasmtime to share it (as iroh-blobs beside iroh).
//!
//! A blob is named by its BLAKE3 root ([`tasks::BlobId`]) and split into chunks of
//! [`tasks::blob::CHUNK_SIZE`]; its *outboard* (the chaining values of its chunks,
//! [`tasks::blob::Outboard`]) lets a receiver verify every chunk on its own, before the whole
//! blob is there.
//!
//! # Layout
//! - [`store`]: the content-addressed [`BlobStore`] in a directory: complete blobs with their
//!   outboards (small ones appended to packs, not a file each), partial downloads that hold
//!   verified chunks at their offsets (resumable), an optional size cap with LRU eviction and
//!   pins for blobs in use.
//! - [`swarm`]: the protocol. [`BlobServer`] answers `Outboard`, `Have` and `Chunks` requests
//!   from a store (also for downloads still in progress) within [`ServeLimits`] (upload slots,
//!   streams per peer, the seed mode of the coordinator); [`Fetcher`] downloads a blob from
//!   several peers at once ([`FetchOptions`]), verifying every chunk before it is written, with
//!   chunk scheduling in the I/O-free [`swarm::sched`].
//!
//! # Protocol in brief
//! QUIC connections with the ALPN [`tasks::wire::ALPN_BLOB`], from any node to any node
//! (workers, and the coordinator as first seed); one bidirectional stream per request: a
//! [`tasks::wire::BlobRequest`] frame, a [`tasks::wire::BlobResponse`] frame back, then for
//! `Chunks` the raw chunk bytes.
//! - `Outboard`: the blob's size and chunk chaining values, which the fetcher checks against
//!   the root it already knows;
//! - `Have`: which chunks the peer holds (a partial download shares its verified chunks);
//! - `Chunks`: a header, then the raw bytes of a run of at most
//!   [`tasks::wire::MAX_CHUNKS_PER_REQUEST`] chunks, each verified by the requester on its own;
//!   or `Busy` with a retry hint when the server's upload slots are taken (the requester tries
//!   another peer).
//!
//! A malformed frame closes that connection only, with the wire close code.

pub mod store;
pub mod swarm;

pub use store::{BlobStore, PartialBlob, PinGuard, StoreError};
pub use swarm::{BlobServer, FetchError, FetchOptions, FetchReport, Fetcher, ServeLimits};
