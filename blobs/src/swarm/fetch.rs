//! Verified multi-source download.
//!
//! 1. The outboard comes from the first peer that has it (non-seed peers first), checked
//!    against the root we already know; a peer whose outboard does not fold to the root is
//!    bad. An interrupted download resumes from the outboard and chunks kept on disk.
//! 2. Every live peer is polled with `Have` (again every [`FetchOptions::have_interval`]
//!    while it lacks chunks we need), and [`Sched`] hands out runs of chunks to request.
//! 3. Chunk bytes are read one chunk at a time and verified with `Outboard::verify_chunk`
//!    before they are written; a bad chunk drops its peer (listed in `bad_peers`) and the
//!    chunk goes back to be fetched elsewhere. Verified chunks are at once visible to the
//!    local [`BlobServer`](super::BlobServer) through the store.
//! 4. Every network wait has a timeout; a download that cannot progress for
//!    [`FetchOptions::stall_timeout`] (nobody live has what is missing) fails.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::SeedableRng as _;
use tasks::blob::Outboard;
use tasks::net;
use tasks::wire::{BlobRequest, BlobResponse, PeerAddr, ALPN_BLOB};
use tasks::{BlobId, BlobRef, NodeId};
use tokio::task::JoinSet;

use super::sched::{PeerState, Sched, SchedLimits};
use super::BlobServer;
use crate::store::{BlobStore, PartialBlob, StoreError};

/// Timeouts and limits of downloads.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Handshake timeout for a new connection to a peer.
    pub connect_timeout: Duration,
    /// Longest wait for any one answer or chunk from a peer.
    pub request_timeout: Duration,
    /// How often to ask a peer which chunks it holds, while it lacks some we need.
    pub have_interval: Duration,
    /// Give up when no live peer has anything missing for this long.
    pub stall_timeout: Duration,
    /// Before asking the seed (the last peer) again, wait at most this long for every other
    /// peer to answer a fresh `Have`.
    pub seed_gate_max: Duration,
    pub sched: SchedLimits,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            have_interval: Duration::from_millis(250),
            stall_timeout: Duration::from_secs(20),
            seed_gate_max: Duration::from_millis(500),
            sched: SchedLimits::default(),
        }
    }
}

/// Who served what in one download.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchReport {
    /// Verified chunk bytes received from each peer.
    pub bytes_by_peer: HashMap<NodeId, u64>,
    /// Peers that sent an outboard or chunk that failed verification (report them to the
    /// coordinator with `WorkerMsg::BadPeer`).
    pub bad_peers: Vec<NodeId>,
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot fetch blob {blob}: no peers were given")]
    NoPeers { blob: BlobId },
    #[error("cannot fetch blob {blob}: none of the {tried} peers tried has it ({not_found} do not have it, {unreachable} unreachable or failing, {bad} sent bad data)")]
    Unavailable {
        blob: BlobId,
        tried: usize,
        not_found: usize,
        unreachable: usize,
        bad: usize,
    },
    #[error("cannot fetch blob {blob}: stalled with {missing} of {chunks} chunks missing after trying {tried} peers ({live} still reachable, {bad} sent bad data)")]
    Stalled {
        blob: BlobId,
        missing: u64,
        chunks: u64,
        tried: usize,
        live: usize,
        bad: usize,
    },
    #[error("cannot fetch blob {blob}: {source}")]
    Store { blob: BlobId, source: StoreError },
}

/// Downloads blobs from peers into a store. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<FetcherInner>,
}

struct FetcherInner {
    endpoint: quinn::Endpoint,
    store: BlobStore,
    server: Option<BlobServer>,
    opts: FetchOptions,
    conns: Mutex<Conns>,
    /// One download per blob at a time; others wait for it.
    active: Mutex<HashMap<BlobId, Arc<tokio::sync::Mutex<()>>>>,
    /// Told the node id of every peer we are about to dial (the daemon forwards it to the
    /// coordinator as [`tasks::wire::WorkerMsg::Punch`]): bounded, dropped when full.
    rendezvous: Mutex<Option<tokio::sync::mpsc::Sender<NodeId>>>,
}

/// The connections requests use, one per peer. Closed ones are swept out once the map has
/// doubled since the last sweep: amortized O(1) per adoption, and at most about twice the
/// live set. (A sweep on every adoption cost the coordinator, which lends every worker's
/// session here, a lock per connected worker per Hello: half its CPU at 40,000 workers.)
#[derive(Default)]
struct Conns {
    map: HashMap<NodeId, quinn::Connection>,
    /// Sweep when the map grows past this.
    sweep_at: usize,
    /// Sweeps so far (for tests).
    sweeps: u64,
}

impl Conns {
    /// Below this many entries the map is never swept.
    const MIN_SWEEP: usize = 64;

    fn adopt(&mut self, node: NodeId, conn: quinn::Connection) {
        match self.map.get(&node) {
            Some(c) if c.close_reason().is_none() => {}
            _ => {
                self.map.insert(node, conn);
            }
        }
        if self.map.len() > self.sweep_at.max(Self::MIN_SWEEP) {
            self.map.retain(|_, c| c.close_reason().is_none());
            self.sweep_at = 2 * self.map.len();
            self.sweeps += 1;
        }
    }
}

impl Fetcher {
    /// `server`, when given, is the server on the same store: chunks of downloads in
    /// progress are served through the store as soon as they are verified.
    pub fn new(endpoint: quinn::Endpoint, store: BlobStore, server: Option<BlobServer>) -> Fetcher {
        Fetcher::with_options(endpoint, store, server, FetchOptions::default())
    }

    pub fn with_options(
        endpoint: quinn::Endpoint,
        store: BlobStore,
        server: Option<BlobServer>,
        opts: FetchOptions,
    ) -> Fetcher {
        Fetcher {
            inner: Arc::new(FetcherInner {
                endpoint,
                store,
                server,
                opts,
                conns: Mutex::new(Conns::default()),
                active: Mutex::new(HashMap::new()),
                rendezvous: Mutex::new(None),
            }),
        }
    }

    pub fn store(&self) -> &BlobStore {
        &self.inner.store
    }

    pub fn server(&self) -> Option<&BlobServer> {
        self.inner.server.as_ref()
    }

    /// Fetch `blob` from `peers` (best first; the last is the seed of last resort); a no-op
    /// when the store already holds it.
    pub async fn fetch(
        &self,
        blob: BlobRef,
        peers: &[PeerAddr],
    ) -> Result<FetchReport, FetchError> {
        if self.inner.store.has(&blob.id) {
            return Ok(FetchReport::default());
        }
        let lock = self
            .inner
            .active
            .lock()
            .unwrap()
            .entry(blob.id)
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let result = if self.inner.store.has(&blob.id) {
            Ok(FetchReport::default())
        } else {
            let mut seen = std::collections::HashSet::new();
            let peers: Vec<PeerAddr> = peers
                .iter()
                .filter(|p| seen.insert(p.node_id))
                .cloned()
                .collect();
            let span = tracing::debug_span!("fetch", blob = %blob.id.short(), peers = peers.len());
            tracing::Instrument::instrument(Download::new(self.clone(), blob, peers).run(), span)
                .await
        };
        self.inner.active.lock().unwrap().remove(&blob.id);
        result
    }

    /// Before each new dial, send the peer's node id to `tx` (see
    /// [`tasks::wire::WorkerMsg::Punch`]): the coordinator then has a peer behind a NAT dial
    /// us at the same moment.
    pub fn set_rendezvous(&self, tx: tokio::sync::mpsc::Sender<NodeId>) {
        *self.inner.rendezvous.lock().unwrap() = Some(tx);
    }

    /// Use `conn` (to `node`, dialled by either side) for requests to `node`, unless a live
    /// connection to it is already in use. Requests may go both ways on a blob connection;
    /// the coordinator also lends its session connections here to collect outputs.
    pub fn adopt(&self, node: NodeId, conn: quinn::Connection) {
        self.inner.conns.lock().unwrap().adopt(node, conn);
    }

    /// Dial `peer` at `addr` because the coordinator asked (it is dialling us at the same
    /// moment: a simultaneous open through both NATs). The connection, if any, serves both
    /// ways and is adopted for our own requests.
    pub async fn punch(&self, peer: NodeId, addr: std::net::SocketAddr) {
        match net::connect_timeout(
            &self.inner.endpoint,
            addr,
            peer,
            ALPN_BLOB,
            self.inner.opts.connect_timeout,
        )
        .await
        {
            Ok(c) => {
                tracing::debug!(peer = %peer.short(), %addr, "punched through");
                self.adopt(peer, c.clone());
                self.serve_on(c);
            }
            Err(e) => tracing::debug!(peer = %peer.short(), %addr, error = %e, "punch failed"),
        }
    }

    /// Answer the peer's requests on a connection we dialled (blob connections serve both
    /// ways), for as long as it lives.
    fn serve_on(&self, conn: quinn::Connection) {
        if let Some(server) = self.inner.server.clone() {
            tokio::spawn(async move { server.serve_connection(conn).await });
        }
    }

    fn live(&self, node: &NodeId) -> Option<quinn::Connection> {
        let conns = self.inner.conns.lock().unwrap();
        conns
            .map
            .get(node)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    async fn conn(&self, peer: &PeerAddr) -> Result<quinn::Connection, String> {
        if let Some(c) = self.live(&peer.node_id) {
            return Ok(c);
        }
        let rendezvous = self.inner.rendezvous.lock().unwrap().clone();
        if let Some(tx) = rendezvous {
            let _ = tx.try_send(peer.node_id);
        }
        let dialled = net::connect_timeout(
            &self.inner.endpoint,
            peer.addr,
            peer.node_id,
            ALPN_BLOB,
            self.inner.opts.connect_timeout,
        )
        .await;
        match dialled {
            Ok(c) => {
                // A punched connection may have arrived meanwhile: keep the first.
                self.adopt(peer.node_id, c.clone());
                self.serve_on(c);
                self.live(&peer.node_id)
                    .ok_or_else(|| "connection closed at once".to_string())
            }
            // The peer's own dial (a punch) may have got through where ours did not.
            Err(e) => self.live(&peer.node_id).ok_or_else(|| e.to_string()),
        }
    }
}

/// What one network exchange with a peer came to.
enum Event {
    Have {
        p: usize,
        result: Result<Option<Vec<bool>>, Failure>,
    },
    Chunks {
        p: usize,
        run: Range<u64>,
        got: Vec<u64>,
        outcome: Result<Reply, Failure>,
    },
}

enum Reply {
    Done,
    Busy(Duration),
    NotHeld,
}

enum Failure {
    /// Timeout or broken stream: may be transient.
    Transient(String),
    /// The connection is gone.
    Gone(String),
    /// Data failed verification or broke the protocol.
    Bad(String),
}

struct Download {
    f: Fetcher,
    blob: BlobRef,
    /// The sources: those given, then those learnt (the seed stays at the index it had).
    peers: Vec<PeerAddr>,
    report: FetchReport,
    /// Nodes asking our server for this blob meanwhile ([`BlobServer::learn`]).
    learning: Option<super::Learning>,
}

impl Download {
    fn new(f: Fetcher, blob: BlobRef, peers: Vec<PeerAddr>) -> Download {
        let learning = f.inner.server.as_ref().map(|s| s.learn(blob.id));
        Download {
            f,
            blob,
            peers,
            report: FetchReport::default(),
            learning,
        }
    }

    fn opts(&self) -> &FetchOptions {
        &self.f.inner.opts
    }

    fn store_err(&self, source: StoreError) -> FetchError {
        FetchError::Store {
            blob: self.blob.id,
            source,
        }
    }

    fn flag_bad(&mut self, p: usize, why: &str) {
        let id = self.peers[p].node_id;
        tracing::warn!(peer = %id.short(), blob = %self.blob.id.short(), reason = why, "peer sent bad data; dropping it for this download");
        if !self.report.bad_peers.contains(&id) {
            self.report.bad_peers.push(id);
        }
    }

    /// The outboard from the first peer that has it, peers in list order (the seed last),
    /// "happy eyeballs" style: the next peer is asked as soon as the previous one failed or
    /// has not answered within [`OUTBOARD_STAGGER`] (a peer behind a NAT may take a punch or
    /// a whole connect timeout; the others need not wait for it).
    async fn outboard(&mut self) -> Result<(Outboard, Vec<PeerState>), FetchError> {
        let n = self.peers.len();
        let mut states = vec![PeerState::Live; n];
        let (mut not_found, mut unreachable, mut bad) = (0, 0, 0);
        let seed = (n > 1).then(|| n - 1);
        let groups: [Vec<usize>; 2] = [
            (0..n).filter(|p| Some(*p) != seed).collect(),
            seed.into_iter().collect(),
        ];
        for group in groups {
            let mut asks = JoinSet::new();
            let mut queue = group.into_iter();
            loop {
                if asks.is_empty() {
                    let Some(p) = queue.next() else { break };
                    let (f, peer, id) = (self.f.clone(), self.peers[p].clone(), self.blob.id);
                    asks.spawn(async move { (p, ask_outboard(&f, &peer, id).await) });
                }
                let joined = tokio::select! {
                    j = asks.join_next() => j,
                    _ = tokio::time::sleep(OUTBOARD_STAGGER) => {
                        if let Some(p) = queue.next() {
                            let (f, peer, id) =
                                (self.f.clone(), self.peers[p].clone(), self.blob.id);
                            asks.spawn(async move { (p, ask_outboard(&f, &peer, id).await) });
                        }
                        continue;
                    }
                };
                let Some(Ok((p, answer))) = joined else {
                    continue;
                };
                match answer {
                    Ok(Some((size, cvs))) => {
                        if size != self.blob.size {
                            states[p] = PeerState::Bad;
                            bad += 1;
                            self.flag_bad(p, "outboard for a different size");
                            continue;
                        }
                        match Outboard::verify(self.blob, cvs) {
                            // The others may still be connecting: they stay live for chunks.
                            Ok(ob) => return Ok((ob, states)),
                            Err(e) => {
                                states[p] = PeerState::Bad;
                                bad += 1;
                                self.flag_bad(p, &e.to_string());
                            }
                        }
                    }
                    Ok(None) => not_found += 1,
                    Err(Failure::Gone(e)) => {
                        tracing::debug!(peer = %self.peers[p].node_id.short(), error = %e, "peer unreachable");
                        states[p] = PeerState::Gone;
                        unreachable += 1;
                    }
                    Err(Failure::Transient(e)) => {
                        tracing::debug!(peer = %self.peers[p].node_id.short(), error = %e, "Outboard request failed");
                        unreachable += 1;
                    }
                    Err(Failure::Bad(e)) => {
                        states[p] = PeerState::Bad;
                        bad += 1;
                        self.flag_bad(p, &e);
                    }
                }
            }
        }
        Err(FetchError::Unavailable {
            blob: self.blob.id,
            tried: n,
            not_found,
            unreachable,
            bad,
        })
    }

    async fn run(mut self) -> Result<FetchReport, FetchError> {
        if self.peers.is_empty() {
            return Err(FetchError::NoPeers { blob: self.blob.id });
        }
        let store = self.f.inner.store.clone();
        let (outboard, states) = match store.partial_outboard(self.blob) {
            Some(ob) => (ob, vec![PeerState::Live; self.peers.len()]),
            None => self.outboard().await?,
        };
        let partial = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.partial(outboard))
                .await
                .map_err(|e| {
                    self.store_err(StoreError::Io {
                        path: Default::default(),
                        source: std::io::Error::other(e.to_string()),
                    })
                })?
                .map_err(|e| self.store_err(e))?
        };
        let started = Instant::now();
        let result = self.chunks(&partial, states).await;
        match result {
            Ok(()) => {
                tracing::debug!(
                    ms = started.elapsed().as_millis() as u64,
                    from = %self
                        .report
                        .bytes_by_peer
                        .iter()
                        .map(|(n, b)| format!("{}:{}", n.short(), b))
                        .collect::<Vec<_>>()
                        .join(","),
                    "downloaded"
                );
                let store2 = store.clone();
                let p2 = partial.clone();
                let done = tokio::task::spawn_blocking(move || store2.finish(&p2)).await;
                match done {
                    Ok(Ok(())) => Ok(self.report),
                    Ok(Err(e)) => Err(self.store_err(e)),
                    Err(e) => Err(self.store_err(StoreError::Io {
                        path: Default::default(),
                        source: std::io::Error::other(e.to_string()),
                    })),
                }
            }
            Err(e) => {
                // Keep the verified chunks on disk for a later attempt.
                store.release_partial(&self.blob.id);
                Err(e)
            }
        }
    }

    async fn chunks(
        &mut self,
        partial: &Arc<PartialBlob>,
        states: Vec<PeerState>,
    ) -> Result<(), FetchError> {
        let opts = self.opts().clone();
        let mut sched = Sched::new(partial.have(), self.peers.len(), opts.sched.clone());
        for (p, s) in states.into_iter().enumerate() {
            match s {
                PeerState::Live => {}
                PeerState::Gone => sched.gone(p),
                PeerState::Bad => sched.bad(p),
            }
        }
        let mut rng = rand::rngs::StdRng::from_entropy();
        let mut tasks: JoinSet<Event> = JoinSet::new();
        let mut have_inflight = vec![false; self.peers.len()];
        let mut next_have = vec![Instant::now(); self.peers.len()];
        let mut last_progress = Instant::now();
        let seed = (self.peers.len() > 1).then(|| self.peers.len() - 1);
        let mut last_seed_done = Instant::now();
        let mut have_at: Vec<Option<Instant>> = vec![None; self.peers.len()];
        while sched.remaining() > 0 {
            let now = Instant::now();
            // Nodes that asked us for this blob are fetching it too: sources from now on.
            while let Some(Ok((node, conn))) = self.learning.as_mut().map(|l| l.rx.try_recv()) {
                if self.peers.iter().any(|p| p.node_id == node) {
                    continue;
                }
                tracing::debug!(peer = %node.short(), addr = %conn.remote_address(), "learnt a source");
                self.f.adopt(node, conn.clone());
                self.peers.push(PeerAddr {
                    node_id: node,
                    addr: conn.remote_address(),
                });
                sched.add_peer();
                have_inflight.push(false);
                next_have.push(now);
                have_at.push(None);
            }
            // Ask peers what they hold.
            for p in 0..self.peers.len() {
                let complete = sched.peers[p]
                    .have
                    .as_ref()
                    .is_some_and(|h| h.iter().all(|b| *b));
                // While enough requests are in flight, news of more chunks would not be used.
                let saturated =
                    sched.inflight() >= opts.sched.max_inflight_total / 4 && have_at[p].is_some();
                if sched.is_live(p)
                    && !have_inflight[p]
                    && !complete
                    && !saturated
                    && next_have[p] <= now
                {
                    have_inflight[p] = true;
                    let jitter = Duration::from_millis(rand::Rng::gen_range(
                        &mut rng,
                        0..=opts.have_interval.as_millis() as u64 / 2,
                    ));
                    next_have[p] = now + opts.have_interval + jitter;
                    let f = self.f.clone();
                    let peer = self.peers[p].clone();
                    let id = self.blob.id;
                    tasks.spawn(async move {
                        Event::Have {
                            p,
                            result: ask_have(&f, &peer, id).await,
                        }
                    });
                }
            }
            // The seed is asked only when no other peer has anything we need, and only once
            // every other live peer has answered `Have` since the seed's last answer (or is
            // slow to), so chunks the crowd already pulled out of it come from the crowd.
            let seed_gate = seed.is_none_or(|s| {
                let fresh = now.duration_since(last_seed_done) > opts.seed_gate_max
                    || (0..self.peers.len()).all(|q| {
                        q == s
                            || !sched.is_live(q)
                            || have_at[q].is_some_and(|t| t >= last_seed_done)
                    });
                fresh && sched.starving()
            });
            // Hand out chunk runs, everyone before the seed.
            for p in sched.order().collect::<Vec<_>>() {
                if Some(p) == seed && !seed_gate {
                    continue;
                }
                while let Some(run) = sched.next(p, now, &mut rng) {
                    let f = self.f.clone();
                    let peer = self.peers[p].clone();
                    let partial = partial.clone();
                    tasks.spawn(async move {
                        let mut got = Vec::new();
                        let outcome = get_chunks(&f, &peer, &partial, run.clone(), &mut got).await;
                        Event::Chunks {
                            p,
                            run,
                            got,
                            outcome,
                        }
                    });
                }
            }
            if !sched.any_live() {
                return Err(self.stalled(&sched));
            }
            if sched.inflight() > 0 || sched.can_progress() {
                last_progress = now;
            }
            if now.duration_since(last_progress) > opts.stall_timeout {
                return Err(self.stalled(&sched));
            }
            let tick = tokio::time::sleep(Duration::from_millis(20).min(opts.have_interval));
            let event = tokio::select! {
                ev = tasks.join_next(), if !tasks.is_empty() => ev,
                _ = tick => None,
            };
            let Some(event) = event else { continue };
            let Ok(event) = event else { continue };
            let now = Instant::now();
            match event {
                Event::Have { p, result } => {
                    have_inflight[p] = false;
                    have_at[p] = Some(now);
                    match result {
                        Ok(Some(have)) => sched.set_have(p, have),
                        Ok(None) => {
                            sched.set_have(p, vec![false; self.blob.chunk_count() as usize])
                        }
                        Err(Failure::Gone(e)) => {
                            tracing::debug!(peer = %self.peers[p].node_id.short(), error = %e, "peer gone");
                            sched.gone(p)
                        }
                        Err(Failure::Transient(_)) => sched.failed(p),
                        Err(Failure::Bad(e)) => {
                            sched.bad(p);
                            self.flag_bad(p, &e);
                        }
                    }
                }
                Event::Chunks {
                    p,
                    run,
                    got,
                    outcome,
                } => {
                    if !got.is_empty() {
                        last_progress = now;
                        let bytes: u64 = got
                            .iter()
                            .map(|i| {
                                let r = self.blob.chunk_range(*i);
                                r.end - r.start
                            })
                            .sum();
                        *self
                            .report
                            .bytes_by_peer
                            .entry(self.peers[p].node_id)
                            .or_insert(0) += bytes;
                    }
                    // What the store holds of the run counts as done whoever brought it (a
                    // racing peer, or a write settled after a failed read): the scheduler
                    // must never hand out a chunk that is already here.
                    let held: Vec<u64> = run.clone().filter(|j| partial.has_chunk(*j)).collect();
                    sched.finish(p, run.clone(), &held);
                    if Some(p) == seed {
                        last_seed_done = now;
                        // Look again at what the crowd holds before going back to the seed.
                        for (q, next) in next_have.iter_mut().enumerate() {
                            if q != p {
                                *next = now;
                            }
                        }
                    }
                    match outcome {
                        Ok(Reply::Done) => sched.succeeded(p),
                        Ok(Reply::Busy(d)) => {
                            tracing::debug!(peer = %self.peers[p].node_id.short(), ?run, seed = Some(p) == seed, "busy");
                            sched.busy(p, now, d)
                        }
                        Ok(Reply::NotHeld) => sched.not_held(p, run),
                        Err(Failure::Transient(e)) => {
                            tracing::debug!(peer = %self.peers[p].node_id.short(), error = %e, "chunk request failed");
                            sched.failed(p)
                        }
                        Err(Failure::Gone(e)) => {
                            tracing::debug!(peer = %self.peers[p].node_id.short(), error = %e, "peer gone");
                            sched.gone(p)
                        }
                        Err(Failure::Bad(e)) => {
                            sched.bad(p);
                            self.flag_bad(p, &e);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn stalled(&self, sched: &Sched) -> FetchError {
        let live = (0..self.peers.len()).filter(|p| sched.is_live(*p)).count();
        FetchError::Stalled {
            blob: self.blob.id,
            missing: sched.remaining(),
            chunks: self.blob.chunk_count(),
            tried: self.peers.len(),
            live,
            bad: self.report.bad_peers.len(),
        }
    }
}

fn classify(conn: &quinn::Connection, e: impl std::fmt::Display) -> Failure {
    if conn.close_reason().is_some() {
        Failure::Gone(e.to_string())
    } else {
        Failure::Transient(e.to_string())
    }
}

/// How long the outboard phase waits for one peer before asking the next one as well.
const OUTBOARD_STAGGER: Duration = Duration::from_millis(300);

/// A peer's answer to `Outboard`: `Some((size, cvs))`, or `None` when it has none (or is
/// busy).
async fn ask_outboard(
    f: &Fetcher,
    peer: &PeerAddr,
    id: BlobId,
) -> Result<Option<(u64, Vec<[u8; 32]>)>, Failure> {
    let conn = f.conn(peer).await.map_err(Failure::Gone)?;
    let t = f.inner.opts.request_timeout;
    match tokio::time::timeout(
        t,
        net::request::<_, BlobResponse>(&conn, &BlobRequest::Outboard { id }),
    )
    .await
    {
        Err(_) => Err(Failure::Transient("Outboard timed out".into())),
        Ok(Err(e)) => Err(classify(&conn, e)),
        Ok(Ok((BlobResponse::Outboard { size, cvs }, _))) => Ok(Some((size, cvs))),
        Ok(Ok((BlobResponse::NotFound, _))) | Ok(Ok((BlobResponse::Busy { .. }, _))) => Ok(None),
        Ok(Ok((other, _))) => {
            tracing::debug!(peer = %peer.node_id.short(), answer = ?other, "unexpected answer to Outboard");
            Ok(None)
        }
    }
}

async fn ask_have(f: &Fetcher, peer: &PeerAddr, id: BlobId) -> Result<Option<Vec<bool>>, Failure> {
    let conn = f.conn(peer).await.map_err(Failure::Gone)?;
    let t = f.inner.opts.request_timeout;
    match tokio::time::timeout(
        t,
        net::request::<_, BlobResponse>(&conn, &BlobRequest::Have { id }),
    )
    .await
    {
        Err(_) => Err(Failure::Transient("Have timed out".into())),
        Ok(Err(e)) => Err(match e.close_code() {
            Some(_) => Failure::Bad(e.to_string()),
            None => classify(&conn, e),
        }),
        Ok(Ok((BlobResponse::Have { chunks, .. }, _))) => Ok(Some(chunks)),
        Ok(Ok((BlobResponse::NotFound, _))) | Ok(Ok((BlobResponse::Busy { .. }, _))) => Ok(None),
        Ok(Ok((other, _))) => Err(Failure::Bad(format!(
            "unexpected answer to Have: {other:?}"
        ))),
    }
}

/// Request `run` from `peer`, verifying and writing each chunk as it arrives; the indices
/// written go to `got`.
async fn get_chunks(
    f: &Fetcher,
    peer: &PeerAddr,
    partial: &Arc<PartialBlob>,
    run: Range<u64>,
    got: &mut Vec<u64>,
) -> Result<Reply, Failure> {
    if run.clone().all(|j| partial.has_chunk(j)) {
        return Ok(Reply::Done); // another peer's answer covered it meanwhile
    }
    let conn = f.conn(peer).await.map_err(Failure::Gone)?;
    let blob = partial.blob();
    let t = f.inner.opts.request_timeout;
    let count = (run.end - run.start) as u32;
    let req = BlobRequest::Chunks {
        id: blob.id,
        start: run.start,
        count,
    };
    let (resp, mut recv) =
        match tokio::time::timeout(t, net::request::<_, BlobResponse>(&conn, &req)).await {
            Err(_) => return Err(Failure::Transient("Chunks timed out".into())),
            Ok(Err(e)) => {
                return Err(match e.close_code() {
                    Some(_) => Failure::Bad(e.to_string()),
                    None => classify(&conn, e),
                })
            }
            Ok(Ok(r)) => r,
        };
    let want_len = blob.chunk_range(run.end - 1).end - blob.chunk_range(run.start).start;
    match resp {
        BlobResponse::Chunks {
            start,
            count: c,
            len,
        } if start == run.start && c == count && len == want_len => {}
        BlobResponse::Busy { retry_after_ms } => {
            return Ok(Reply::Busy(Duration::from_millis(
                retry_after_ms.clamp(10, 2_000),
            )))
        }
        BlobResponse::NotFound => return Ok(Reply::NotHeld),
        other => {
            return Err(Failure::Bad(format!(
                "unexpected answer to Chunks {run:?}: {other:?}"
            )))
        }
    }
    // Verify and write chunk i on the blocking pool while chunk i + 1 arrives: at most two
    // chunks of this request in memory.
    let mut pending: Option<(u64, tokio::task::JoinHandle<Result<bool, StoreError>>)> = None;
    let mut spare: Option<Vec<u8>> = None;
    for i in run.clone() {
        if (i..run.end).all(|j| partial.has_chunk(j)) {
            // Someone else won the race for the rest (end game): stop the transfer.
            let _ = recv.stop(quinn::VarInt::from_u32(0));
            break;
        }
        let r = blob.chunk_range(i);
        let mut buf = spare.take().unwrap_or_default();
        buf.resize((r.end - r.start) as usize, 0);
        let read = match tokio::time::timeout(t, recv.read_exact(&mut buf)).await {
            Err(_) => Err(Failure::Transient(format!("chunk {i} timed out"))),
            Ok(Err(e)) => Err(classify(&conn, e)),
            Ok(Ok(())) => Ok(()),
        };
        // The chunk before this one is settled on every path, so what was written is
        // counted as received even when this read failed.
        if let Some((j, handle)) = pending.take() {
            settle(j, handle.await, got)?;
        }
        read?;
        let p = partial.clone();
        pending = Some((
            i,
            tokio::task::spawn_blocking(move || p.write_chunk(i, &buf)),
        ));
        spare = Some(Vec::with_capacity(tasks::blob::CHUNK_SIZE));
    }
    if let Some((j, handle)) = pending.take() {
        settle(j, handle.await, got)?;
    }
    Ok(Reply::Done)
}

/// The outcome of verifying and writing chunk `i`.
fn settle(
    i: u64,
    joined: Result<Result<bool, StoreError>, tokio::task::JoinError>,
    got: &mut Vec<u64>,
) -> Result<(), Failure> {
    match joined {
        Ok(Ok(_)) => {
            got.push(i);
            Ok(())
        }
        Ok(Err(StoreError::Verify(_, e))) => Err(Failure::Bad(e.to_string())),
        Ok(Err(e)) => Err(Failure::Transient(e.to_string())),
        Err(e) => Err(Failure::Transient(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tasks::wire::ALPN_BLOB;
    use tasks::NodeKey;

    /// `n` live connections from one endpoint to another on loopback (the server keeps them).
    async fn connections(n: usize) -> (quinn::Endpoint, quinn::Endpoint, Vec<quinn::Connection>) {
        let server_key = NodeKey::generate();
        let server =
            net::endpoint(&server_key, "127.0.0.1:0".parse().unwrap(), &[ALPN_BLOB]).unwrap();
        let accepting = server.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(incoming) = accepting.accept().await {
                if let Ok(c) = incoming.await {
                    held.push(c);
                }
            }
        });
        let client =
            net::endpoint(&NodeKey::generate(), "127.0.0.1:0".parse().unwrap(), &[]).unwrap();
        let addr = server.local_addr().unwrap();
        let mut conns = Vec::new();
        for _ in 0..n {
            conns.push(
                net::connect(&client, addr, server_key.node_id(), ALPN_BLOB)
                    .await
                    .unwrap(),
            );
        }
        (server, client, conns)
    }

    /// A coordinator lends every worker's session connection: adopting the n-th must not
    /// look at the other n-1 (that was a lock per connected worker per Hello), and closed
    /// connections still go.
    #[tokio::test]
    async fn adopting_sweeps_closed_connections_amortized() {
        let (_server, _client, real) = connections(4).await;
        let mut conns = Conns::default();
        let peers: Vec<NodeId> = (0..1000).map(|_| NodeKey::generate().node_id()).collect();
        for (i, p) in peers.iter().enumerate() {
            conns.adopt(*p, real[i % 4].clone());
        }
        assert_eq!(conns.map.len(), 1000, "all live: none swept");
        // Sweeps at 65, 131, 263 and 527 entries: a handful, not one per adoption.
        assert!(
            conns.sweeps <= 5,
            "{} sweeps for 1000 adoptions",
            conns.sweeps
        );
        // Half the peers' connections close; later adoptions sweep them out.
        real[0].close(0u32.into(), b"gone");
        real[1].close(0u32.into(), b"gone");
        let more: Vec<NodeId> = (0..1100).map(|_| NodeKey::generate().node_id()).collect();
        for p in &more {
            conns.adopt(*p, real[2].clone());
        }
        let closed = conns
            .map
            .values()
            .filter(|c| c.close_reason().is_some())
            .count();
        assert!(
            closed < 500,
            "{closed} closed connections still held after a sweep"
        );
        let live = conns.map.len() - closed;
        assert!(
            conns.map.len() <= 2 * live.max(Conns::MIN_SWEEP),
            "{} entries for {live} live connections",
            conns.map.len()
        );
        // A peer whose connection closed gets the new one.
        conns.adopt(peers[0], real[3].clone());
        assert_eq!(conns.map[&peers[0]].stable_id(), real[3].stable_id());
    }
}
