//! Every resource limit that protects a node from its peers, in one place, each with the
//! reason for its number. Joining as a worker is open, so whatever a peer sends is hostile
//! input: these bound what one connection, one address or one identity can make a node hold
//! or do. (What a *job* may ask for is bounded by [`crate::job::limits`]; frame size by
//! [`crate::wire::MAX_FRAME`].)

use std::time::Duration;

/// Per-stream QUIC receive window: how many unread bytes a peer may push on one stream.
/// 4 MiB keeps a blob stream near 50 MB/s over an 80 ms round trip (window / RTT), while
/// one stream cannot make us buffer more than that.
pub const STREAM_RECEIVE_WINDOW: u32 = 4 << 20;

/// Per-connection QUIC receive window over all its streams: what one connection can make a
/// node buffer, whatever it does. 8 MiB: two streams at full window. With
/// [`MAX_CONNECTIONS_PER_IP`], one address can pin at most 256 MiB of the coordinator.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 8 << 20;

/// Bi-streams a peer may have open at once on one connection. The session protocol uses
/// one; blob transfers open one per chunk request and keep a few dozen in flight. 256
/// leaves room and bounds the per-stream state a peer can make us keep.
pub const MAX_BIDI_STREAMS: u32 = 256;

/// Uni-streams a peer may open: none. No peergrid protocol uses them, so a peer opening one
/// only costs us buffers.
pub const MAX_UNI_STREAMS: u32 = 0;

/// QUIC connections the coordinator keeps from one IP address at once. A worker holds one
/// session, plus a blob connection to the seed and the odd submitter; a NAT with a few
/// volunteers behind it needs some more. 32 keeps one address from taking the endpoint's
/// memory with thousands of connections. The coordinator's own host (127.0.0.1, ::1: the
/// demo, tests and benchmarks) is exempt.
pub const MAX_CONNECTIONS_PER_IP: usize = 32;

/// A worker connection that sends no `Hello` within this long is closed: an idle handshake
/// must not hold a session slot. 10 s is ten times a slow link's handshake round trips.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of a `Hello`'s `agent` and of each engine fingerprint field (engine, arch,
/// settings). Real ones are a few dozen, and this release's settings string about 270
/// (`tasks::release::settings`; a test keeps it under half of this); the coordinator keeps
/// them (in memory and in its store), so a longer one is refused rather than stored.
pub const MAX_HELLO_TEXT: usize = 1024;

/// Distinct engine fingerprints the coordinator keeps. Results are compared only within one
/// fingerprint, and every fingerprint ever seen is kept, so a client inventing one per
/// `Hello` would grow that table without bound: beyond this many, a worker with a new
/// fingerprint is refused (workers of the engines already known are not affected). A pool
/// runs a handful (releases × architectures × settings).
pub const MAX_ENGINE_FINGERPRINTS: usize = 256;

/// Task slots a worker may claim in `Hello`. It is a claim, not a fact: capacity follows
/// delivered results (the coordinator's trust policy), and this caps what a claim can ask
/// for. 256 covers the largest single machine volunteers run.
pub const MAX_WORKER_SLOTS: u32 = 256;

/// Blob ids in one `Hello` or `HaveBlobs` message (32 bytes each: 128 KiB). A worker that
/// holds more announces them in several messages.
pub const MAX_HAVE_BLOBS_PER_MSG: usize = 4096;

/// Blobs the coordinator lists one worker as a holder of. Beyond it, further announcements
/// are ignored: one identity cannot grow the coordinator's tracker without bound (nor
/// become the listed holder of every blob in the system). A worker needs the blobs of the
/// tasks it runs, a few per task.
pub const MAX_HAVE_BLOBS_PER_WORKER: usize = 65_536;

/// Distinct accusers (workers that were handed that peer for that blob) whose `BadPeer`
/// reports it takes before a peer stops being listed as a holder of a blob: one worker
/// alone can never delist an honest holder.
pub const BAD_PEER_ACCUSERS: usize = 2;

/// Bytes of a failed replica's stderr a worker sends ([`crate::wire::WorkerMsg::Stderr`]):
/// the tail, where a panic message or an error usually is. The coordinator keeps at most
/// this much per replica (a longer one is cut to its last bytes), and only for replicas
/// whose reported status is not `ok`: what one identity can make it store is bounded by the
/// replicas it was assigned.
pub const MAX_STDERR_TAIL: usize = 4096;

/// Replicas one [`crate::wire::WorkerMsg::Holding`] may list (a worker holding more sends
/// none: the coordinator then waits for deadlines, as before the message existed). A
/// worker has at most a few dozen in hand per slot plus its unacknowledged reports; the
/// list's frame stays under a megabyte.
pub const MAX_HOLDING_PER_MSG: usize = 65_536;

/// Largest state a guest may hand `peergrid.checkpoint` (docs/guest-abi.md). A larger one
/// gets an error code and nothing is stored. The worker keeps one checkpoint per replica it
/// holds, so this bounds its disk use per replica; a scientific state that needs more should
/// be cut down (checkpoint the data, not the caches). It can never exceed the task's
/// `memory_mb` either: the state is read from the guest's memory.
pub const MAX_CHECKPOINT_BYTES: usize = 64 << 20;

/// Updates one [`crate::wire::WorkerMsg::Progress`] may carry (more are ignored): a worker
/// holds at most a few dozen replicas per slot.
pub const MAX_PROGRESS_PER_MSG: usize = 4096;

/// A replica that keeps reporting progress (or is paused) has its deadline pushed back, but
/// never past this many times its job's deadline after it was issued: a replica held for
/// ever (a laptop that never comes back from a pause) is reissued in the end.
pub const MAX_DEADLINE_STRETCH: u64 = 10;
