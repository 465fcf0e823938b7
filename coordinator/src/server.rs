//! The coordinator's QUIC service: one endpoint, three ALPNs.
//!
//! - `peergrid/coord/1` → [`session`] (worker sessions),
//! - `peergrid/submit/1` → [`submit`] (submitter requests, token-guarded),
//! - `peergrid/blob/1` → [`blobs::swarm::BlobServer`] on the coordinator's blob store (the
//!   coordinator is the first seed of every blob).
//!
//! Optionally, [`http`] serves a read-only status API over HTTP (`--http ADDR`).
//!
//! All state changes go through the [`engine`] (core + store, group commit). Start one with
//! [`Coordinator::start`] (in-process: tests, `coordinator demo`) or [`serve`] (until a
//! shutdown future resolves: `coordinator serve`).

pub mod engine;
pub mod http;
pub mod session;
pub mod submit;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use blobs::swarm::{BlobServer, Fetcher, ServeLimits};
use blobs::BlobStore;
use tasks::net;
use tasks::wire::{CloseCode, PeerAddr, ALPN_BLOB, ALPN_COORD, ALPN_SUBMIT};
use tasks::{BlobRef, NodeId, NodeKey, Ticket};

use crate::core::{Core, CoreConfig};
use crate::store::{Output, StoreUrl};
use engine::{Cmd, EngineHandle, FetchJob};

/// This coordinator's software version, sent in `Welcome`.
/// (Then the optional messages it takes, as capability words: see `tasks::wire`, step 8.)
pub const AGENT: &str = concat!(
    "peergrid-coordinator/",
    env!("CARGO_PKG_VERSION"),
    " stderr holding progress classes"
);
/// File names inside the data dir.
pub const TICKET_FILE: &str = "ticket";
pub const TOKEN_FILE: &str = "submit-token";
pub const BLOB_DIR: &str = "blobs";
/// Default listen address of `coordinator serve`.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7100";

/// How to run a coordinator.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Host (name or IP) written into the ticket. Default: the listen IP, or 127.0.0.1 when
    /// listening on all interfaces.
    pub advertise: Option<String>,
    pub core: CoreConfig,
    /// How often deadlines and grace periods are checked.
    pub tick: Duration,
    /// TCP address of the read-only HTTP status API ([`http`]); `None` (the default): no
    /// HTTP server. Only results need the submit token: bind it to localhost or a trusted network.
    pub http: Option<SocketAddr>,
    /// Where the durable state lives (`--store`): SQLite in the data dir (the default) or a
    /// PostgreSQL server. The data dir still holds the key, token, ticket and blobs.
    pub store: StoreUrl,
    /// With PostgreSQL, several coordinators may share the database: one leads, the others
    /// stand by ([`crate::ha`]). The lease's timing.
    pub ha: crate::ha::LeaseConfig,
}

impl ServeConfig {
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> ServeConfig {
        ServeConfig {
            data_dir: data_dir.into(),
            listen,
            advertise: None,
            core: CoreConfig::default(),
            tick: Duration::from_secs(1),
            http: None,
            store: StoreUrl::Sqlite,
            ha: crate::ha::LeaseConfig::default(),
        }
    }
}

/// A coordinator running in this process.
pub struct RunningCoordinator {
    pub ticket: Ticket,
    pub token: String,
    /// The address the endpoint is bound to.
    pub addr: SocketAddr,
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    /// True when the ticket's host was guessed (listening on all interfaces).
    pub ticket_host_guessed: bool,
    /// The address the HTTP status API is bound to, when [`ServeConfig::http`] was set.
    pub http_addr: Option<SocketAddr>,
    endpoint: quinn::Endpoint,
    blob_server: BlobServer,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    engine: Option<EngineHandle>,
    engine_thread: Option<engine::EngineThread>,
    /// Cancelled when the engine stopped abnormally (store error, panic) or the leader
    /// lease was lost.
    died: CancellationToken,
    /// With PostgreSQL: the leader lease, released after the last commit.
    lease: Option<crate::ha::Lease>,
}

impl std::fmt::Debug for RunningCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningCoordinator")
            .field("ticket", &self.ticket.to_string())
            .field("addr", &self.addr)
            .finish()
    }
}

/// Namespace for starting a coordinator.
pub struct Coordinator;

impl Coordinator {
    /// Open (or create) the data dir, restore state, bind the endpoint and start serving.
    /// Must be called inside a tokio runtime.
    pub async fn start(cfg: ServeConfig) -> anyhow::Result<RunningCoordinator> {
        let dir = &cfg.data_dir;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating data dir {}", dir.display()))?;
        let key = NodeKey::load_or_create(dir)?;
        let mut token = load_or_create_token(dir)?;
        let blobs = BlobStore::open(&dir.join(BLOB_DIR), None).context("opening the blob store")?;
        let endpoint = net::endpoint(&key, cfg.listen, &[ALPN_COORD, ALPN_SUBMIT, ALPN_BLOB])?;
        let addr = endpoint.local_addr().context("reading the bound address")?;
        let (host, guessed) = match &cfg.advertise {
            Some(h) => (h.clone(), false),
            None if addr.ip().is_unspecified() => (
                if addr.is_ipv4() {
                    Ipv4Addr::LOCALHOST.to_string()
                } else {
                    "[::1]".into()
                },
                true,
            ),
            None => (
                match addr.ip() {
                    IpAddr::V6(ip) => format!("[{ip}]"),
                    ip => ip.to_string(),
                },
                false,
            ),
        };
        let own = (key.node_id(), format!("{host}:{}", addr.port()));
        let mut ticket = Ticket::new(own.0, own.1.clone());
        let write_ticket = |t: &Ticket| {
            tasks::identity::write_private(&dir.join(TICKET_FILE), format!("{t}\n").as_bytes())
                .context("writing the ticket file")
        };
        // Bound before anything is spawned (or a standby waits), so a bad --http fails the
        // start cleanly.
        let mut http_listener = match cfg.http {
            Some(a) => Some(http::bind(a).await?),
            None => None,
        };
        let http_addr = match &http_listener {
            Some(l) => Some(l.local_addr().context("reading the bound HTTP address")?),
            None => None,
        };

        // With PostgreSQL: open (and migrate) the store, join the deployment, and stand by
        // until this coordinator holds the leader lease.
        let (lease, epoch, mirror) = match &cfg.store {
            StoreUrl::Sqlite => {
                write_ticket(&ticket)?;
                (None, None, None)
            }
            StoreUrl::Postgres(url) => {
                let instance = crate::ha::instance_id(dir)?;
                let (u, local, i, o) = (url.clone(), token.clone(), instance.clone(), own.clone());
                let (shared_token, deployment) = tokio::task::spawn_blocking(move || {
                    // Creates or migrates the tables (the lease's among them); the engine's
                    // own connection is opened once this coordinator leads.
                    drop(crate::store::PostgresStore::open(&u)?);
                    let shared = crate::ha::deployment_token(&u, &local)?;
                    let ticket = crate::ha::ticket_of(&u, &i, &o)?;
                    anyhow::Ok((shared, ticket))
                })
                .await
                .context("opening the store")??;
                if shared_token != token {
                    tracing::warn!(file = %dir.join(TOKEN_FILE).display(), "this data dir's submit token differs from the deployment's (the first coordinator's); using the deployment's and rewriting the file");
                    tasks::identity::write_private(
                        &dir.join(TOKEN_FILE),
                        format!("{shared_token}\n").as_bytes(),
                    )
                    .context("writing the submit token file")?;
                    token = shared_token;
                }
                ticket = deployment;
                write_ticket(&ticket)?;
                let ctx = crate::ha::LeaseCtx {
                    url: url.clone(),
                    instance,
                    entry: own.clone(),
                    ticket_file: dir.join(TICKET_FILE),
                    blobs: blobs.clone(),
                    config: cfg.ha,
                };
                let mut lease = tokio::task::spawn_blocking(move || crate::ha::Lease::start(ctx))
                    .await
                    .context("joining the deployment")??;
                let epoch = stand_by(&mut lease, &endpoint, &mut http_listener).await?;
                let mirror = Arc::new(crate::ha::BlobMirror::new(url));
                (Some(lease), Some(epoch), Some(mirror))
            }
        };
        let mut core_cfg = cfg.core.clone();
        let seed_addr = ticket
            .socket_addrs()
            .ok()
            .and_then(|v| v.into_iter().next())
            .unwrap_or(addr);
        core_cfg.seed = Some(PeerAddr {
            node_id: key.node_id(),
            addr: seed_addr,
        });
        // A job whose module imports the checkpoint API is compared without fuel.
        let probe_blobs = blobs.clone();
        core_cfg.checkpoint_probe = crate::core::CheckpointProbe(Some(Arc::new(move |id| {
            probe_blobs
                .read(id)
                .is_ok_and(|b| tasks::module::imports_module(&b, tasks::module::CHECKPOINT_MODULE))
        })));
        let died = CancellationToken::new();
        // Opening, loading and the engine's first reads block (and the PostgreSQL client runs
        // its own runtime, which must not be entered from this one): on a blocking thread.
        // The store never comes back here: it lives and dies on the engine's thread.
        let (store_url, store_dir, engine_blobs, engine_died, hold) = (
            cfg.store.clone(),
            dir.clone(),
            blobs.clone(),
            died.clone(),
            cfg.ha.ttl,
        );
        let (engine, fetches, engine_thread) = tokio::task::spawn_blocking(move || {
            let mut store: Box<dyn crate::store::Store> = match (&store_url, epoch) {
                (StoreUrl::Postgres(url), Some(epoch)) => {
                    let mut pg = crate::store::PostgresStore::open(url)?;
                    pg.fence(epoch, hold)?;
                    Box::new(pg)
                }
                _ => crate::store::open(&store_url, &store_dir)?,
            };
            let snapshot = store.load()?;
            let core = Core::restore(core_cfg, snapshot, engine::now_ms());
            engine::spawn(core, store, engine_blobs, 4096, engine_died)
        })
        .await
        .context("opening the store")??;
        if let StoreUrl::Postgres(_) = &cfg.store {
            tracing::info!(store = %cfg.store, "state kept in PostgreSQL");
        }

        let blob_server = BlobServer::new(
            blobs.clone(),
            if cfg.core.central_only {
                // Every worker fetches everything from here: nothing to super-seed.
                ServeLimits {
                    seed_window: None,
                    ..ServeLimits::seed()
                }
            } else {
                ServeLimits::seed()
            },
        );
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        // A dead engine ends everything: no session, submitter or blob request is served
        // by a coordinator that can no longer record anything.
        {
            let (died, cancel) = (died.clone(), cancel.clone());
            tasks.spawn(async move {
                tokio::select! {
                    _ = died.cancelled() => cancel.cancel(),
                    _ = cancel.cancelled() => {}
                }
            });
        }
        let bs = blob_server.clone();
        let bytes_sent: Arc<dyn Fn() -> u64 + Send + Sync> = Arc::new(move || bs.bytes_sent());
        // A lost lease ends this coordinator like a dead engine.
        if let Some(lease) = &lease {
            let (lost, died, cancel) = (lease.lost(), died.clone(), cancel.clone());
            tasks.spawn(async move {
                tokio::select! {
                    why = lost => {
                        tracing::error!("{why}");
                        died.cancel();
                    }
                    _ = cancel.cancelled() => {}
                }
            });
        }
        let ctx = submit::SubmitCtx {
            engine: engine.clone(),
            mirror: mirror.clone(),
            blobs: blobs.clone(),
            token_hash: blake3::hash(token.as_bytes()),
            bytes_sent: bytes_sent.clone(),
        };
        if let Some(listener) = http_listener {
            let bs = blob_server.clone();
            let hctx = http::HttpCtx {
                engine: engine.clone(),
                token_hash: blake3::hash(token.as_bytes()),
                bytes_sent,
                bytes_sent_to: Arc::new(move || bs.bytes_sent_to()),
            };
            tasks.spawn(http::run(listener, hctx, cancel.clone()));
        }
        let fetcher = Fetcher::new(endpoint.clone(), blobs.clone(), Some(blob_server.clone()));
        // Dial-backs come from another UDP port of this host, so a NAT that only lets in
        // what answers the worker's own traffic to us refuses them.
        let probe = net::endpoint(&key, SocketAddr::new(addr.ip(), 0), &[])
            .map_err(|e| tracing::warn!("no reachability probes: {e}"))
            .ok();
        let sessions = session::SessionCtx {
            engine: engine.clone(),
            fetcher: fetcher.clone(),
            probe,
            seed: blob_server.clone(),
        };
        tasks.spawn(accept_loop(
            endpoint.clone(),
            sessions,
            ctx,
            blob_server.clone(),
            cancel.clone(),
        ));
        tasks.spawn(ticker(engine.clone(), cfg.tick, cancel.clone()));
        tasks.spawn(output_fetcher(
            fetcher,
            blobs.clone(),
            mirror,
            engine.clone(),
            fetches,
            cancel.clone(),
        ));
        tracing::info!(%ticket, %addr, "coordinator listening");
        if let Some(h) = http_addr {
            tracing::info!(http = %h, "HTTP status API listening (read-only; results need the submit token)");
            if !h.ip().is_loopback() {
                tracing::warn!(http = %h, "the HTTP status API is public but for results: anyone who can reach it sees job names, worker ids and credit");
            }
        }
        Ok(RunningCoordinator {
            ticket,
            token,
            addr,
            node_id: key.node_id(),
            data_dir: dir.clone(),
            ticket_host_guessed: guessed,
            http_addr,
            endpoint,
            blob_server,
            cancel,
            tasks,
            engine: Some(engine),
            engine_thread: Some(engine_thread),
            died,
            lease,
        })
    }
}

impl RunningCoordinator {
    /// Blob payload bytes this coordinator uploaded so far.
    pub fn bytes_sent(&self) -> u64 {
        self.blob_server.bytes_sent()
    }

    /// Resolves when the engine stopped abnormally (a store error or a panic): the
    /// coordinator has stopped serving and must be shut down (and, by a supervisor,
    /// restarted from its committed state).
    pub async fn engine_died(&self) {
        self.died.cancelled().await
    }

    /// The engine, for in-process callers (tests, benchmarks).
    pub fn engine(&self) -> Option<&EngineHandle> {
        self.engine.as_ref()
    }

    /// Graceful stop: stop accepting, end sessions, let the engine commit its last batch,
    /// close the endpoint with [`CloseCode::Shutdown`] and wait for the peers to be told.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.engine.take();
        let thread = self.engine_thread.take();
        let lease = self.lease.take();
        let stopped = tokio::task::spawn_blocking(move || {
            let stopped = thread.map(|t| t.join());
            // After the last commit: a standby takes over at once.
            if let Some(l) = lease {
                l.release();
            }
            stopped
        })
        .await?;
        self.endpoint.close(
            CloseCode::Shutdown.code().into(),
            b"coordinator shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(3), self.endpoint.wait_idle()).await;
        match stopped {
            Some(Ok(Err(e))) => Err(e).context("the store failed"),
            Some(Err(_)) => anyhow::bail!("the engine thread panicked"),
            _ => Ok(()),
        }
    }

    /// Stop without any goodbye, as a crash would (tests): tasks are aborted, the endpoint
    /// dropped. The store keeps exactly what was committed.
    pub async fn kill(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.endpoint.close(0u32.into(), b"");
        self.engine.take();
        if let Some(t) = self.engine_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Run a coordinator until `shutdown` resolves, then stop it gracefully. If the engine dies
/// first (store error, panic), stop at once and return that error.
pub async fn serve(cfg: ServeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let running = Coordinator::start(cfg).await?;
    run_until(running, shutdown).await
}

/// Serve until `shutdown` resolves (graceful stop, `Ok`) or the engine dies (an `Err`
/// naming why, so `coordinator serve` exits non-zero and a supervisor restarts it).
pub async fn run_until(
    running: RunningCoordinator,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let died = tokio::select! {
        _ = shutdown => false,
        _ = running.engine_died() => true,
    };
    if died {
        tracing::error!("the engine stopped; shutting down");
        running.shutdown().await?;
        anyhow::bail!("the coordinator's engine stopped (see the log above); restart it to resume from its committed state");
    }
    tracing::info!("shutting down");
    running.shutdown().await
}

/// Stand by until this coordinator holds the leader lease; returns its epoch. Meanwhile every
/// QUIC connection is refused at once (clients dialling the whole ticket reach the leader
/// without waiting for a timeout) and the HTTP address, if any, answers 503 with who leads.
async fn stand_by(
    lease: &mut crate::ha::Lease,
    endpoint: &quinn::Endpoint,
    http_listener: &mut Option<tokio::net::TcpListener>,
) -> anyhow::Result<i64> {
    let standby_http = match http_listener.take() {
        Some(l) => {
            // Two handles on the one socket: the standby page now, the status API once this
            // coordinator leads.
            let std = l.into_std().context("HTTP listener")?;
            let clone = tokio::net::TcpListener::from_std(std.try_clone()?)?;
            *http_listener = Some(tokio::net::TcpListener::from_std(std)?);
            let stop = CancellationToken::new();
            let task = tokio::spawn(http::standby(clone, lease.leader(), stop.clone()));
            Some((stop, task))
        }
        None => None,
    };
    let epoch = tokio::select! {
        e = lease.leading() => e?,
        _ = refuse_all(endpoint) => anyhow::bail!("the endpoint closed while standing by"),
    };
    if let Some((stop, task)) = standby_http {
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    Ok(epoch)
}

/// Refuse every incoming connection (a standby coordinator); returns when the endpoint
/// closes.
async fn refuse_all(endpoint: &quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        incoming.refuse();
    }
}

fn load_or_create_token(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join(TOKEN_FILE);
    let create = || -> anyhow::Result<String> {
        let token = hex::encode(rand::random::<[u8; 32]>());
        tasks::identity::write_private(&path, format!("{token}\n").as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(token)
    };
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => create(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    sessions: session::SessionCtx,
    ctx: submit::SubmitCtx,
    blobs: BlobServer,
    cancel: CancellationToken,
) {
    let mut conns = JoinSet::new();
    // Open connections per remote IP, bounded by `limits::MAX_CONNECTIONS_PER_IP`.
    let per_ip = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        IpAddr,
        usize,
    >::new()));
    loop {
        let incoming = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let Some(slot) = IpSlot::take(&per_ip, incoming.remote_address().ip()) else {
            tracing::warn!(remote = %incoming.remote_address(), "refusing connection: too many from this address");
            incoming.refuse();
            continue;
        };
        let (sessions, ctx, blobs, cancel) = (
            sessions.clone(),
            ctx.clone(),
            blobs.clone(),
            cancel.child_token(),
        );
        conns.spawn(async move {
            let _slot = slot;
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "handshake failed");
                    return;
                }
            };
            let Some(node) = net::remote_node_id(&conn) else {
                net::close(&conn, CloseCode::Rejected, "no node identity");
                return;
            };
            let alpn = net::alpn(&conn).unwrap_or_default();
            let span = tracing::info_span!("conn", node = %node.short(), %remote, alpn = %String::from_utf8_lossy(&alpn));
            async move {
                if alpn == ALPN_COORD {
                    match session::run(conn.clone(), node, sessions, cancel).await {
                        Ok(()) => tracing::info!("worker session ended"),
                        Err(e) => tracing::info!(error = %e, "worker session ended"),
                    }
                } else if alpn == ALPN_SUBMIT {
                    submit::serve(conn, ctx, cancel).await;
                } else if alpn == ALPN_BLOB {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = blobs.serve_connection(conn) => {}
                    }
                } else {
                    net::close(&conn, CloseCode::Protocol, "unknown ALPN");
                }
            }
            .instrument(span)
            .await
        });
        while conns.try_join_next().is_some() {}
    }
    // Sessions notice the cancelled token and end; give them a moment.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}

/// One connection's place in the per-IP count; given back when dropped.
struct IpSlot {
    map: Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
    /// `None`: not counted (this host).
    ip: Option<IpAddr>,
}

impl IpSlot {
    fn take(
        map: &Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
        ip: IpAddr,
    ) -> Option<IpSlot> {
        let ip = ip.to_canonical();
        // This host itself (the demo, tests and benchmarks run their workers beside the
        // coordinator, on 127.0.0.1) is not limited; nobody else can come from there.
        if ip == IpAddr::V4(Ipv4Addr::LOCALHOST) || ip == IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        {
            return Some(IpSlot {
                map: map.clone(),
                ip: None,
            });
        }
        let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= tasks::limits::MAX_CONNECTIONS_PER_IP {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            map: map.clone(),
            ip: Some(ip),
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let Some(ip) = self.ip else { return };
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

async fn ticker(engine: EngineHandle, every: Duration, cancel: CancellationToken) {
    let mut t = tokio::time::interval(every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = t.tick() => if !engine.send(Cmd::Tick).await { break },
        }
    }
}

/// Pull accepted outputs that did not travel inline from agreeing workers, verified against
/// their `output_hash`, and record them. Retries with back-off while the workers are away.
async fn output_fetcher(
    fetcher: Fetcher,
    blobs: BlobStore,
    mirror: Option<Arc<crate::ha::BlobMirror>>,
    engine: EngineHandle,
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<FetchJob>,
    cancel: CancellationToken,
) {
    let mut running = JoinSet::new();
    loop {
        let job = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            j = jobs.recv() => match j { Some(j) => j, None => break },
        };
        let (fetcher, engine, cancel) = (fetcher.clone(), engine.clone(), cancel.clone());
        let (blobs, mirror) = (blobs.clone(), mirror.clone());
        running.spawn(async move {
            let blob = BlobRef {
                id: job.result.output_hash,
                size: job.result.output_len,
            };
            let span = tracing::info_span!("output", task = %job.task, blob = %blob.id.short());
            async move {
                // Retried for as long as the coordinator runs (the workers that hold it may be
                // away for a while); `results` says meanwhile that outputs are being collected.
                let mut delay = Duration::from_secs(1);
                for attempt in 1u64.. {
                    if job.peers.is_empty() {
                        tracing::warn!(
                            "no agreeing worker announced a blob address; cannot fetch the output"
                        );
                        return;
                    }
                    let fetched = match fetcher.fetch(blob, &job.peers).await {
                        // With standbys, the database keeps a copy before it is recorded.
                        Ok(_) => match &mirror {
                            Some(m) => {
                                let (m, blobs) = (m.clone(), blobs.clone());
                                tokio::task::spawn_blocking(move || {
                                    m.put(&blob.id, &blobs.read(&blob.id)?)
                                })
                                .await
                                .map_err(anyhow::Error::from)
                                .and_then(|r| r)
                            }
                            None => Ok(()),
                        },
                        Err(e) => Err(e.into()),
                    };
                    match fetched {
                        Ok(()) => {
                            engine
                                .send(Cmd::OutputStored {
                                    task: job.task,
                                    output: Output::Blob(blob.id),
                                })
                                .await;
                            tracing::info!(
                                bytes = blob.size,
                                "accepted output fetched and verified"
                            );
                            return;
                        }
                        Err(e) if attempt == 1 || attempt % 10 == 0 => {
                            tracing::warn!(attempt, error = %format!("{e:#}"), "cannot fetch accepted output yet; retrying")
                        }
                        Err(e) => tracing::debug!(attempt, error = %format!("{e:#}"), "cannot fetch accepted output yet"),
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            }
            .instrument(span)
            .await
        });
        while running.try_join_next().is_some() {}
    }
    running.abort_all();
}
