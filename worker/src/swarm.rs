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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tasks::blob::chunk_count;
use tasks::net::{self, FrameError};
use tasks::wire::{BlobRequest, BlobResponse, CloseCode, MAX_CHUNKS_PER_REQUEST};
use tasks::BlobId;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::blobs::{BlobStore, StoreError};

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
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits { max_concurrent_uploads: 8, max_streams_per_peer: 16, busy_retry_ms: 50 }
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
    busy_answers: AtomicU64,
}

impl BlobServer {
    pub fn new(store: BlobStore, limits: ServeLimits) -> BlobServer {
        let uploads = Arc::new(Semaphore::new(limits.max_concurrent_uploads.max(1)));
        BlobServer {
            inner: Arc::new(ServerInner { store, limits, uploads, bytes_sent: AtomicU64::new(0), busy_answers: AtomicU64::new(0) }),
        }
    }

    pub fn store(&self) -> &BlobStore {
        &self.inner.store
    }

    /// Chunk payload bytes uploaded so far (the coordinator's `coordinator_bytes_sent`).
    pub fn bytes_sent(&self) -> u64 {
        self.inner.bytes_sent.load(Ordering::Relaxed)
    }

    /// `Busy` answers given so far.
    pub fn busy_answers(&self) -> u64 {
        self.inner.busy_answers.load(Ordering::Relaxed)
    }

    /// Serve one accepted `peergrid/blob/1` connection until it closes. A malformed frame
    /// closes this connection only, with the wire close code.
    pub async fn serve_connection(&self, conn: quinn::Connection) {
        let peer = net::remote_node_id(&conn).map(|n| n.short()).unwrap_or_default();
        let span = tracing::debug_span!("blob_conn", node = %peer, addr = %conn.remote_address());
        async {
            let streams = Arc::new(Semaphore::new(self.inner.limits.max_streams_per_peer.max(1)));
            let mut tasks = tokio::task::JoinSet::new();
            loop {
                let Ok(permit) = streams.clone().acquire_owned().await else { break };
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
                    this.serve_stream(&conn, send, recv).await;
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

    async fn serve_stream(&self, conn: &quinn::Connection, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
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
        if let Err(e) = self.answer(&mut send, req).await {
            tracing::debug!(error = %e, "blob request failed");
        }
    }

    async fn answer(&self, send: &mut quinn::SendStream, req: BlobRequest) -> Result<(), FrameError> {
        let store = &self.inner.store;
        match req {
            BlobRequest::Outboard { id } => {
                let resp = match blocking(store.clone(), move |s| s.outboard(&id)).await {
                    Ok(ob) => BlobResponse::Outboard { size: ob.blob().size, cvs: ob.cvs().to_vec() },
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
            BlobRequest::Chunks { id, start, count } => return self.send_chunks(send, id, start, count).await,
        }
        send.finish()?;
        Ok(())
    }

    async fn send_chunks(&self, send: &mut quinn::SendStream, id: BlobId, start: u64, count: u32) -> Result<(), FrameError> {
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
        let Ok(_upload) = self.inner.uploads.clone().try_acquire_owned() else {
            self.inner.busy_answers.fetch_add(1, Ordering::Relaxed);
            let retry_after_ms = self.inner.limits.busy_retry_ms;
            net::write_frame(send, &BlobResponse::Busy { retry_after_ms }).await?;
            return Ok(send.finish()?);
        };
        let cs = tasks::blob::CHUNK_SIZE as u64;
        let len = (end * cs).min(size) - start * cs;
        tracing::trace!(blob = %id.short(), start, count, "uploading chunks");
        net::write_frame(send, &BlobResponse::Chunks { start, count, len }).await?;
        // One chunk at a time: an upload holds at most one chunk in memory.
        for i in start..end {
            let data = match blocking(store.clone(), move |s| s.read_chunks(&id, i, 1)).await {
                Ok(d) => d,
                Err(e) => {
                    // Evicted mid-upload, or a disk error: the requester sees a reset stream.
                    tracing::warn!(blob = %id.short(), chunk = i, error = %e, "cannot read chunk to upload");
                    let _ = send.reset(quinn::VarInt::from_u32(CloseCode::Done.code()));
                    return Ok(());
                }
            };
            send.write_all(&data).await.map_err(FrameError::Write)?;
            self.inner.bytes_sent.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        Ok(send.finish()?)
    }
}

/// Run a store operation off the async threads.
async fn blocking<T: Send + 'static>(
    store: BlobStore,
    f: impl FnOnce(&BlobStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::Io { path: Default::default(), source: std::io::Error::other(e.to_string()) }),
    }
}
