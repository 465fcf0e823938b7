//! Blob protocol (`peergrid/blob/1`): serve chunks, verified multi-source download.
//!
//! - [`BlobServer`]: answers `Outboard`, `Have` and `Chunks` requests from a [`BlobStore`],
//!   including for downloads still in progress (the store shares their verified chunks), and
//!   limits concurrent uploads (`Busy` beyond [`ServeLimits::max_concurrent_uploads`]) and
//!   streams per peer.
//! - [`Fetcher`] (in [`fetch`]): downloads a blob from several peers at once, verifying every
//!   chunk before it is written; chunk scheduling lives in the I/O-free [`sched`].

pub mod fetch;
pub mod sched;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tasks::blob::chunk_count;
use tasks::net::{self, FrameError};
use tasks::wire::{BlobRequest, BlobResponse, CloseCode, MAX_CHUNKS_PER_REQUEST};
use tasks::{BlobId, NodeId};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::store::{BlobStore, StoreError};

pub use fetch::{FetchError, FetchOptions, FetchReport, Fetcher};

/// Upload limits of one node.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// `Chunks` requests served at once, over all peers; beyond it requesters get `Busy`.
    pub max_concurrent_uploads: usize,
    /// Requests of one connection handled at once; further streams wait their turn.
    pub max_streams_per_peer: usize,
    /// The `retry_after_ms` hint sent with `Busy`.
    pub busy_retry_ms: u64,
    /// Seed mode: a chunk uploaded to one node is not uploaded to another within this window
    /// (they get `Busy` and take it from the first one, who by then announces it in `Have`).
    /// Like BitTorrent's super-seeding: it keeps the seed's upload near one copy when many
    /// requesters start at once. `None` for ordinary peers. 3 s: with 1 s the coordinator
    /// uploaded a median 1.22 copies to 16 public workers (chunks handed out early were
    /// handed out again before the crowd had passed them on); with 3 s, 1.00, and the module
    /// reached every worker as fast (`cargo bench --bench netswarm`).
    pub seed_window: Option<Duration>,
}

/// Seed mode: a node held out of a blob for this long is served all the same. It may know
/// no other holder: the first requesters of a new blob are told only of the seed and of
/// the requesters before them, so the one whose chunk went to a later requester would
/// otherwise wait out the whole window (3 s; seen as a stalled start of a tiny-task job).
/// A node that does know a holder sees its chunks within a `Have` interval (250 ms plus
/// jitter) and has them before this. Only for blobs of at most [`SEED_PATIENCE_MAX_CHUNKS`]:
/// on a big blob a crowd starting at once is held out far longer than this while it passes
/// chunks around, and serving it would undo the window (an 8 MiB module went from 1.00 to
/// 2.5-5.4 copies in `cargo bench --bench netswarm`).
pub const SEED_PATIENCE: Duration = Duration::from_millis(500);

/// The largest blob, in chunks, that [`SEED_PATIENCE`] applies to (1 MiB: a typical module
/// of small tasks). Each node held out of it costs the seed at most this much.
pub const SEED_PATIENCE_MAX_CHUNKS: u64 = 4;

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_concurrent_uploads: 8,
            max_streams_per_peer: 16,
            busy_retry_ms: 50,
            seed_window: None,
        }
    }
}

impl ServeLimits {
    /// Limits for a first seed (the coordinator): few upload slots, seed mode on.
    pub fn seed() -> ServeLimits {
        ServeLimits {
            max_concurrent_uploads: 4,
            busy_retry_ms: 20,
            seed_window: Some(Duration::from_secs(3)),
            ..ServeLimits::default()
        }
    }
}

/// Serves blob chunks to peers. Cheap to clone; clones share limits and counters.
#[derive(Clone)]
pub struct BlobServer {
    inner: Arc<ServerInner>,
}

struct ServerInner {
    store: BlobStore,
    limits: ServeLimits,
    uploads: Arc<Semaphore>,
    bytes_sent: AtomicU64,
    /// Chunk payload bytes uploaded per requesting node, for the first
    /// [`MAX_TRACKED_PEERS`] nodes (node ids are free to make: the map must stay bounded).
    sent_to: Mutex<HashMap<NodeId, u64>>,
    busy_answers: AtomicU64,
    /// Seed mode: who got each chunk last, and when.
    recent: Mutex<HashMap<(BlobId, u64), (NodeId, Instant)>>,
    /// Seed mode: when each node was first and last held out of each blob, in its current
    /// run of refusals (see [`SEED_PATIENCE`]).
    held_out: Mutex<HashMap<(NodeId, BlobId), (Instant, Instant)>>,
    /// Seed mode: directly reachable nodes (super-peers), served before the others.
    super_peers: Mutex<std::collections::HashSet<NodeId>>,
    /// Seed mode: per blob, when super-peers began and last took a chunk of it.
    super_fetch: Mutex<HashMap<BlobId, (Instant, Instant)>>,
    /// This node's downloads in progress, told of the nodes asking it for the same blob
    /// ([`BlobServer::learn`]). Only local downloads add entries.
    learners: Mutex<HashMap<BlobId, Learner>>,
}

/// A download in progress, listening for other nodes that ask this node for its blob.
struct Learner {
    /// Tells the download; it adds the node as a source.
    tx: tokio::sync::mpsc::Sender<(NodeId, quinn::Connection)>,
    /// The nodes told so far (at most [`MAX_LEARNED_PEERS`]).
    told: std::collections::HashSet<NodeId>,
    /// Which registration this is (a later download of the same blob replaces it).
    serial: u64,
}

/// Most requesters one download learns as sources (node ids are free to make).
pub const MAX_LEARNED_PEERS: usize = 16;

/// A download's registration with [`BlobServer::learn`]: receives the nodes that ask this
/// node for the blob; unregisters when dropped.
pub struct Learning {
    server: BlobServer,
    id: BlobId,
    serial: u64,
    pub rx: tokio::sync::mpsc::Receiver<(NodeId, quinn::Connection)>,
}

impl Drop for Learning {
    fn drop(&mut self) {
        let mut map = self.server.inner.learners.lock().unwrap();
        if map.get(&self.id).is_some_and(|l| l.serial == self.serial) {
            map.remove(&self.id);
        }
    }
}

/// Seed mode: how long super-peers fetching a blob keep the others waiting for them, at most
/// (a super-peer that never finishes must not starve anyone).
const SUPER_PRIORITY_MAX: Duration = Duration::from_secs(30);

/// Most requesting nodes [`BlobServer::bytes_sent_to`] keeps a count for; bytes to further
/// nodes are only in the total.
pub const MAX_TRACKED_PEERS: usize = 16_384;

impl BlobServer {
    pub fn new(store: BlobStore, limits: ServeLimits) -> BlobServer {
        let uploads = Arc::new(Semaphore::new(limits.max_concurrent_uploads.max(1)));
        BlobServer {
            inner: Arc::new(ServerInner {
                store,
                limits,
                uploads,
                bytes_sent: AtomicU64::new(0),
                sent_to: Mutex::new(HashMap::new()),
                busy_answers: AtomicU64::new(0),
                recent: Mutex::new(HashMap::new()),
                held_out: Mutex::new(HashMap::new()),
                super_peers: Mutex::new(Default::default()),
                super_fetch: Mutex::new(HashMap::new()),
                learners: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// While the returned registration lives, every node that asks this node for `id` (a
    /// `Have`, `Outboard` or `Chunks` request: it is fetching the blob too) is passed on
    /// once, with the connection it asked on, up to [`MAX_LEARNED_PEERS`] nodes. A download
    /// adds them as sources: the coordinator tells each worker only of the fetchers *before*
    /// it, so without this the earlier ones never hear of the later ones, and chunks the
    /// seed handed to a late fetcher reach nobody until the seed hands them out again
    /// (BitTorrent's peers likewise learn of each other from incoming connections).
    pub fn learn(&self, id: BlobId) -> Learning {
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::mpsc::channel(MAX_LEARNED_PEERS);
        self.inner.learners.lock().unwrap().insert(
            id,
            Learner {
                tx,
                told: Default::default(),
                serial,
            },
        );
        Learning {
            server: self.clone(),
            id,
            serial,
            rx,
        }
    }

    /// `peer` asked for `id` on `conn`: tell the download of `id` in progress here, if any.
    fn heard_from(&self, peer: NodeId, id: BlobId, conn: &quinn::Connection) {
        let mut map = self.inner.learners.lock().unwrap();
        let Some(l) = map.get_mut(&id) else { return };
        if l.told.len() < MAX_LEARNED_PEERS && l.told.insert(peer) {
            let _ = l.tx.try_send((peer, conn.clone()));
        }
    }

    pub fn store(&self) -> &BlobStore {
        &self.inner.store
    }

    /// Seed mode: `node` is (or no longer is) a directly reachable worker. While super-peers
    /// are fetching a blob from this seed, other nodes get `Busy` for it and take its chunks
    /// from the super-peers (for at most [`SUPER_PRIORITY_MAX`] per blob): workers behind
    /// NATs then cost the seed nothing, as in the classic hybrid P2P systems.
    pub fn set_super_peer(&self, node: NodeId, reachable: bool) {
        let mut set = self.inner.super_peers.lock().unwrap();
        if reachable {
            set.insert(node);
        } else {
            set.remove(&node);
        }
    }

    /// Chunk payload bytes uploaded so far (the coordinator's `coordinator_bytes_sent`).
    pub fn bytes_sent(&self) -> u64 {
        self.inner.bytes_sent.load(Ordering::Relaxed)
    }

    /// Chunk payload bytes uploaded so far to each requesting node (the first
    /// [`MAX_TRACKED_PEERS`] nodes that took any).
    pub fn bytes_sent_to(&self) -> HashMap<NodeId, u64> {
        self.inner.sent_to.lock().unwrap().clone()
    }

    /// `Busy` answers given so far.
    pub fn busy_answers(&self) -> u64 {
        self.inner.busy_answers.load(Ordering::Relaxed)
    }

    /// Serve one accepted `peergrid/blob/1` connection until it closes. A malformed frame
    /// closes this connection only, with the wire close code.
    pub async fn serve_connection(&self, conn: quinn::Connection) {
        let peer = net::remote_node_id(&conn);
        let span = tracing::debug_span!(
            "blob_conn",
            node = %peer.map(|n| n.short()).unwrap_or_default(),
            addr = %conn.remote_address()
        );
        async {
            let streams = Arc::new(Semaphore::new(
                self.inner.limits.max_streams_per_peer.max(1),
            ));
            let mut tasks = tokio::task::JoinSet::new();
            loop {
                let Ok(permit) = streams.clone().acquire_owned().await else {
                    break;
                };
                let (send, recv) = match conn.accept_bi().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "blob connection ended");
                        break;
                    }
                };
                let this = self.clone();
                let conn = conn.clone();
                tasks.spawn(async move {
                    this.serve_stream(&conn, peer, send, recv).await;
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            // The connection is gone: its streams cannot make progress either.
            tasks.abort_all();
        }
        .instrument(span)
        .await
    }

    async fn serve_stream(
        &self,
        conn: &quinn::Connection,
        peer: Option<NodeId>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let req = match net::read_frame::<BlobRequest>(&mut recv).await {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(e) => {
                if let Some(code) = e.close_code() {
                    tracing::debug!(error = %e, "closing blob connection: bad frame");
                    net::close(conn, code, "bad frame");
                }
                return;
            }
        };
        if let Some(peer) = peer {
            let (BlobRequest::Outboard { id }
            | BlobRequest::Have { id }
            | BlobRequest::Chunks { id, .. }) = &req;
            self.heard_from(peer, *id, conn);
        }
        if let Err(e) = self.answer(&mut send, peer, req).await {
            tracing::debug!(error = %e, "blob request failed");
        }
    }

    async fn answer(
        &self,
        send: &mut quinn::SendStream,
        peer: Option<NodeId>,
        req: BlobRequest,
    ) -> Result<(), FrameError> {
        let store = &self.inner.store;
        match req {
            BlobRequest::Outboard { id } => {
                let resp = match blocking(store.clone(), move |s| s.outboard(&id)).await {
                    Ok(ob) => BlobResponse::Outboard {
                        size: ob.blob().size,
                        cvs: ob.cvs().to_vec(),
                    },
                    Err(_) => BlobResponse::NotFound,
                };
                net::write_frame(send, &resp).await?;
            }
            BlobRequest::Have { id } => {
                let resp = match store.have(&id) {
                    Some((size, chunks)) => BlobResponse::Have { size, chunks },
                    None => BlobResponse::NotFound,
                };
                net::write_frame(send, &resp).await?;
            }
            BlobRequest::Chunks { id, start, count } => {
                return self.send_chunks(send, peer, id, start, count).await
            }
        }
        send.finish()?;
        Ok(())
    }

    async fn send_chunks(
        &self,
        send: &mut quinn::SendStream,
        peer: Option<NodeId>,
        id: BlobId,
        start: u64,
        count: u32,
    ) -> Result<(), FrameError> {
        let store = &self.inner.store;
        let Some((size, have)) = store.have(&id) else {
            net::write_frame(send, &BlobResponse::NotFound).await?;
            return Ok(send.finish()?);
        };
        let chunks = chunk_count(size);
        let end = start.saturating_add(count as u64);
        if count == 0 || count > MAX_CHUNKS_PER_REQUEST || end > chunks {
            let reason = format!("chunks {start}..{end} of a {chunks}-chunk blob (at most {MAX_CHUNKS_PER_REQUEST} per request)");
            net::write_frame(send, &BlobResponse::BadRequest { reason }).await?;
            return Ok(send.finish()?);
        }
        if !have[start as usize..end as usize].iter().all(|h| *h) {
            net::write_frame(send, &BlobResponse::NotFound).await?;
            return Ok(send.finish()?);
        }
        let upload = match self.inner.uploads.clone().try_acquire_owned() {
            Ok(permit) if self.seed_claim(peer, id, chunks, start..end) => Some(permit),
            _ => None,
        };
        let Some(_upload) = upload else {
            self.inner.busy_answers.fetch_add(1, Ordering::Relaxed);
            let retry_after_ms = self.inner.limits.busy_retry_ms;
            net::write_frame(send, &BlobResponse::Busy { retry_after_ms }).await?;
            return Ok(send.finish()?);
        };
        let cs = tasks::blob::CHUNK_SIZE as u64;
        let len = (end * cs).min(size) - start * cs;
        tracing::trace!(blob = %id.short(), start, count, "uploading chunks");
        net::write_frame(send, &BlobResponse::Chunks { start, count, len }).await?;
        // Counted per requester once the upload ends, however it ends.
        let mut sent = SentTo {
            server: &self.inner,
            peer,
            bytes: 0,
        };
        // One chunk at a time: an upload holds at most one chunk in memory.
        for i in start..end {
            // A page-cache read of one chunk: cheaper inline than a hop to the blocking pool.
            let data = match store.read_chunks(&id, i, 1) {
                Ok(d) => d,
                Err(e) => {
                    // Evicted mid-upload, or a disk error: the requester sees a reset stream.
                    tracing::warn!(blob = %id.short(), chunk = i, error = %e, "cannot read chunk to upload");
                    let _ = send.reset(quinn::VarInt::from_u32(CloseCode::Done.code()));
                    return Ok(());
                }
            };
            send.write_all(&data).await.map_err(FrameError::Write)?;
            self.inner
                .bytes_sent
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            sent.bytes += data.len() as u64;
        }
        Ok(send.finish()?)
    }
}

/// Adds an upload's bytes to its requester's count when dropped.
struct SentTo<'a> {
    server: &'a ServerInner,
    peer: Option<NodeId>,
    bytes: u64,
}

impl Drop for SentTo<'_> {
    fn drop(&mut self) {
        let (Some(peer), true) = (self.peer, self.bytes > 0) else {
            return;
        };
        let mut map = self
            .server
            .sent_to
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&peer) {
            *n += self.bytes;
        } else if map.len() < MAX_TRACKED_PEERS {
            map.insert(peer, self.bytes);
        }
    }
}

impl BlobServer {
    /// Seed mode: claim chunks `run` of `id` (`chunks` in all) for `peer`, unless another
    /// node got one of them within the window (and `peer` has not waited out
    /// [`SEED_PATIENCE`]).
    fn seed_claim(
        &self,
        peer: Option<NodeId>,
        id: BlobId,
        chunks: u64,
        run: std::ops::Range<u64>,
    ) -> bool {
        let (Some(window), Some(peer)) = (self.inner.limits.seed_window, peer) else {
            return true;
        };
        let now = Instant::now();
        if !self.super_first(peer, id, now, window) {
            return false;
        }
        let mut recent = self.inner.recent.lock().unwrap();
        let taken = run.clone().any(|i| {
            recent
                .get(&(id, i))
                .is_some_and(|(who, at)| *who != peer && now.duration_since(*at) < window)
        });
        let small = chunks <= SEED_PATIENCE_MAX_CHUNKS;
        if taken && !(small && self.waited_enough(peer, id, now, window)) {
            return false;
        }
        if recent.len() > 100_000 {
            recent.retain(|_, (_, at)| now.duration_since(*at) < window);
        }
        for i in run {
            recent.insert((id, i), (peer, now));
        }
        true
    }
}

impl BlobServer {
    /// Seed mode: whether `peer`, refused chunks of `id` because another node took them,
    /// has been held out of it for [`SEED_PATIENCE`]: asking again and again (gaps under a
    /// second) since its first refusal. A node that stopped asking (it found the chunks
    /// elsewhere) starts over.
    fn waited_enough(&self, peer: NodeId, id: BlobId, now: Instant, window: Duration) -> bool {
        const GAP: Duration = Duration::from_secs(1);
        let mut held = self.inner.held_out.lock().unwrap();
        if held.len() > 100_000 {
            held.retain(|_, (_, last)| now.duration_since(*last) < window);
        }
        let (first, last) = held.entry((peer, id)).or_insert((now, now));
        if now.duration_since(*last) >= GAP {
            *first = now;
        }
        *last = now;
        now.duration_since(*first) >= SEED_PATIENCE
    }

    /// Seed mode: whether `peer` may take chunks of `id` now as far as super-peers go:
    /// super-peers always; others unless a super-peer took a chunk of it within `window`
    /// (and super-peers began on it less than [`SUPER_PRIORITY_MAX`] ago).
    fn super_first(&self, peer: NodeId, id: BlobId, now: Instant, window: Duration) -> bool {
        let is_super = self.inner.super_peers.lock().unwrap().contains(&peer);
        let mut fetch = self.inner.super_fetch.lock().unwrap();
        if is_super {
            let e = fetch.entry(id).or_insert((now, now));
            if now.duration_since(e.1) >= window {
                *e = (now, now); // a new round of distribution
            }
            e.1 = now;
            if fetch.len() > 4096 {
                fetch.retain(|_, (_, last)| now.duration_since(*last) < window);
            }
            return true;
        }
        !fetch.get(&id).is_some_and(|(first, last)| {
            now.duration_since(*last) < window && now.duration_since(*first) < SUPER_PRIORITY_MAX
        })
    }
}

/// Run a store operation off the async threads.
async fn blocking<T: Send + 'static>(
    store: BlobStore,
    f: impl FnOnce(&BlobStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::Io {
            path: Default::default(),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}
