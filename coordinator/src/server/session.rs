//! Worker sessions (`peergrid/coord/1`): one long-lived bi-stream per worker connection.
//!
//! A reader task turns frames into [`WorkerMsg`]s (reading a frame is not cancel-safe, so it
//! never sits in a `select!`); the session loop forwards them to the engine and writes the
//! answers back **in request order**, pipelined: a worker may send many reports before the
//! first is acknowledged, and they are committed together with other sessions' reports.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use blobs::swarm::{BlobServer, Fetcher};
use tasks::net::{self, FrameError};
use tasks::wire::{ClassedAssignment, CloseCode, CoordMsg, WorkerMsg};
use tasks::NodeId;

use super::engine::{Cmd, EngineHandle, HelloInfo};

/// Most requests of one session waiting for the engine; beyond it the session stops reading
/// (back-pressure on the worker).
const MAX_PIPELINE: usize = 64;
/// Most assignments per request.
pub const MAX_BATCH_ASSIGN: u32 = 256;
/// Most reports in one `Reports` frame that the engine takes at once.
const MAX_REPORTS_PER_FRAME: usize = 4096;

static SESSIONS: AtomicU64 = AtomicU64::new(1);

type Pending = Pin<Box<dyn Future<Output = Vec<CoordMsg>> + Send>>;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("worker did not open its session stream: {0}")]
    Accept(quinn::ConnectionError),
    #[error("first message was not Hello")]
    NoHello,
    #[error("no Hello within {0:?}")]
    HelloTimeout(Duration),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("coordinator is shutting down")]
    EngineGone,
    #[error("worker stopped reading: no write progress in {0:?}")]
    WriteTimeout(Duration),
    #[error("Hello refused: {0}")]
    HelloRefused(String),
}

/// What every session shares besides the engine.
#[derive(Clone)]
pub struct SessionCtx {
    pub engine: EngineHandle,
    /// The coordinator's blob fetcher: a session's connection is lent to it, so accepted
    /// outputs are collected over the connection the worker holds (works behind NATs).
    pub fetcher: Fetcher,
    /// A second, client-only endpoint (another UDP port): a dial-back from it to a worker's
    /// observed address tells whether the worker is directly reachable. `None`: no probing.
    pub probe: Option<quinn::Endpoint>,
    /// The coordinator's seed: serves reachable workers (super-peers) first.
    pub seed: BlobServer,
}

/// How long the dial-back to a worker may take before it counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one message to a worker may take to leave: a worker that stops reading its
/// session stream (the QUIC window full) is closed after this, so neither the session nor the
/// queue of messages for it (cancels, punch orders) waits on it for ever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Write one message to the worker within [`WRITE_TIMEOUT`], or close the connection.
async fn send_to(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    msg: &CoordMsg,
) -> Result<(), SessionError> {
    match tokio::time::timeout(WRITE_TIMEOUT, net::write_frame(send, msg)).await {
        Ok(r) => Ok(r?),
        Err(_) => {
            tracing::warn!("closing worker connection: it has not read its session stream for {WRITE_TIMEOUT:?}");
            net::close(conn, CloseCode::Overloaded, "not reading");
            Err(SessionError::WriteTimeout(WRITE_TIMEOUT))
        }
    }
}

/// The address a connection comes from, with IPv4-mapped IPv6 written as IPv4 (a dual-stack
/// socket reports those), so address blocks and peers compare equal across families.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Serve one worker connection until it closes or `cancel` fires.
pub async fn run(
    conn: quinn::Connection,
    worker: NodeId,
    ctx: SessionCtx,
    cancel: CancellationToken,
) -> Result<(), SessionError> {
    let engine = ctx.engine.clone();
    // The session stream and its Hello must come within HELLO_TIMEOUT: a connection that
    // never says Hello must not hold a session slot (and its buffers) for ever.
    let opened = tokio::select! {
        biased;
        _ = cancel.cancelled() => return Ok(()),
        s = tokio::time::timeout(tasks::limits::HELLO_TIMEOUT, async {
            let (send, mut recv) = conn.accept_bi().await.map_err(SessionError::Accept)?;
            let first = net::read_frame::<WorkerMsg>(&mut recv).await;
            Ok::<_, SessionError>((send, recv, first))
        }) => s,
    };
    let Ok(opened) = opened else {
        tracing::warn!(
            "closing worker connection: no Hello within {:?}",
            tasks::limits::HELLO_TIMEOUT
        );
        net::close(&conn, CloseCode::Protocol, "no Hello in time");
        return Err(SessionError::HelloTimeout(tasks::limits::HELLO_TIMEOUT));
    };
    let (mut send, mut recv, first) = opened?;
    let hello = match first {
        Ok(Some(WorkerMsg::Hello {
            agent,
            fingerprint,
            slots,
            peer_addr,
            blobs,
        })) => {
            let long = |t: &str| t.len() > tasks::limits::MAX_HELLO_TEXT;
            if long(&agent)
                || long(&fingerprint.engine)
                || long(&fingerprint.arch)
                || long(&fingerprint.settings)
            {
                let why = format!(
                    "agent or engine fingerprint longer than {} bytes",
                    tasks::limits::MAX_HELLO_TEXT
                );
                tracing::warn!(remote = %conn.remote_address(), "closing worker connection: {why}");
                net::close(&conn, CloseCode::Rejected, &why);
                return Err(SessionError::HelloRefused(why));
            }
            let observed_addr = canonical(conn.remote_address());
            tracing::info!(%agent, fingerprint = %fingerprint, slots, %observed_addr, announced = ?peer_addr, "worker joined");
            HelloInfo {
                fingerprint,
                slots,
                observed_addr,
                blobs: bounded_blobs(blobs),
            }
        }
        Ok(_) => {
            net::close(&conn, CloseCode::Protocol, "first message must be Hello");
            return Err(SessionError::NoHello);
        }
        Err(e) => {
            if let Some(code) = e.close_code() {
                net::close(&conn, code, "bad frame");
            }
            return Err(e.into());
        }
    };
    let session = SESSIONS.fetch_add(1, Ordering::Relaxed);
    let observed_addr = hello.observed_addr;
    let (out_tx, mut out_rx) = mpsc::unbounded_channel();
    let probe_tx = out_tx.clone();
    let refusal = engine
        .call(|reply| Cmd::Hello {
            worker,
            session,
            info: hello,
            tx: out_tx,
            reply,
        })
        .await
        .ok_or(SessionError::EngineGone)?;
    if let Some(why) = refusal {
        net::close(&conn, CloseCode::Rejected, &why);
        return Err(SessionError::HelloRefused(why));
    }
    let result = async {
        send_to(
            &conn,
            &mut send,
            &CoordMsg::Welcome {
                agent: super::AGENT.into(),
                observed_addr,
            },
        )
        .await?;
        // Outputs are collected over this connection: the worker serves blob requests on
        // streams we open on it, wherever it is.
        ctx.fetcher.adopt(worker, conn.clone());
        if let Some(probe) = ctx.probe.clone() {
            let (engine, cancel, seed) = (engine.clone(), cancel.clone(), ctx.seed.clone());
            let session_conn = conn.clone();
            tokio::spawn(async move {
                let reachable = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = dial_back(&probe, observed_addr, worker) => r,
                };
                tracing::info!(%observed_addr, reachable, "dial-back to the worker's observed address");
                if session_conn.close_reason().is_some() {
                    return; // the session ended meanwhile
                }
                seed.set_super_peer(worker, reachable);
                let _ = probe_tx.send(CoordMsg::Reachability {
                    observed_addr,
                    reachable,
                });
                engine
                    .send(Cmd::Reachable {
                        worker,
                        session,
                        reachable,
                    })
                    .await;
            });
        }
        // Reader task: frames in, messages out (bounded: back-pressure).
        let (in_tx, mut in_rx) = mpsc::channel::<Result<WorkerMsg, FrameError>>(MAX_PIPELINE);
        let reader = tokio::spawn(async move {
            loop {
                match net::read_frame::<WorkerMsg>(&mut recv).await {
                    Ok(Some(m)) => {
                        if in_tx.send(Ok(m)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = in_tx.send(Err(e)).await;
                        break;
                    }
                }
            }
        });
        let mut pending: FuturesOrdered<Pending> = FuturesOrdered::new();
        // The worker named its native engine (`Engines`) and it was admitted: assignments say
        // their class. `named`: it sent `Engines` (once per session).
        let (mut classes, mut named) = (false, false);
        let outcome = loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break Ok(()),
                Some(msg) = out_rx.recv() => send_to(&conn, &mut send, &msg).await?,
                Some(msgs) = pending.next(), if !pending.is_empty() => {
                    for m in msgs {
                        send_to(&conn, &mut send, &m).await?;
                    }
                }
                msg = in_rx.recv(), if pending.len() < MAX_PIPELINE => match msg {
                    None => {
                        // The worker finished its side: answer what is pending, then end.
                        while let Some(msgs) = pending.next().await {
                            for m in msgs {
                                send_to(&conn, &mut send, &m).await?;
                            }
                        }
                        break Ok(());
                    }
                    Some(Err(e)) => {
                        if let Some(code) = e.close_code() {
                            tracing::warn!(error = %e, "closing worker connection: bad frame");
                            net::close(&conn, code, "bad frame");
                        }
                        break Err(e.into());
                    }
                    Some(Ok(WorkerMsg::Engines { native })) => {
                        if named {
                            tracing::warn!("closing worker connection: protocol violation: second Engines");
                            net::close(&conn, CloseCode::Protocol, "second Engines");
                            break Err(SessionError::NoHello);
                        }
                        let Some(refusal) = engine
                            .call(|reply| Cmd::Engines { worker, native, reply })
                            .await
                        else {
                            break Err(SessionError::EngineGone);
                        };
                        named = true;
                        // Refused (logged by the engine): the worker keeps its session and
                        // runs portable jobs, as a worker without a native engine does.
                        classes = refusal.is_none();
                    }
                    Some(Ok(m)) => match dispatch(&engine, worker, m, classes).await {
                        Dispatch::Reply(p) => pending.push_back(p),
                        Dispatch::None => {}
                        Dispatch::Violation(why) => {
                            tracing::warn!(%why, "closing worker connection: protocol violation");
                            net::close(&conn, CloseCode::Protocol, why);
                            break Err(SessionError::NoHello);
                        }
                        Dispatch::Gone => break Err(SessionError::EngineGone),
                    },
                }
            }
        };
        reader.abort();
        outcome
    }
    .await;
    ctx.seed.set_super_peer(worker, false);
    engine.send(Cmd::Disconnected { worker, session }).await;
    result
}

enum Dispatch {
    Reply(Pending),
    None,
    Violation(&'static str),
    Gone,
}

/// Forward one message of the worker's to the engine. `classes`: the worker named its
/// native engine, so its assignments go out as [`CoordMsg::AssignClass`].
async fn dispatch(
    engine: &EngineHandle,
    worker: NodeId,
    msg: WorkerMsg,
    classes: bool,
) -> Dispatch {
    fn reply<T: Send + 'static>(
        rx: oneshot::Receiver<T>,
        f: impl FnOnce(T) -> Vec<CoordMsg> + Send + 'static,
    ) -> Dispatch {
        Dispatch::Reply(Box::pin(async move { rx.await.map(f).unwrap_or_default() }))
    }
    let sent = match msg {
        WorkerMsg::Hello { .. } => return Dispatch::Violation("second Hello"),
        // Handled by the session loop.
        WorkerMsg::Engines { .. } => return Dispatch::Violation("second Engines"),
        WorkerMsg::RequestWork { max } => {
            let (tx, rx) = oneshot::channel();
            if !engine
                .send(Cmd::RequestWork {
                    worker,
                    max: max.min(MAX_BATCH_ASSIGN),
                    reply: tx,
                })
                .await
            {
                return Dispatch::Gone;
            }
            return reply(rx, move |w| {
                vec![if classes {
                    CoordMsg::AssignClass {
                        assignments: w
                            .assignments
                            .into_iter()
                            .zip(w.classes)
                            .map(|(assignment, determinism)| ClassedAssignment {
                                assignment,
                                determinism,
                            })
                            .collect(),
                        retry_after_ms: w.retry_after_ms,
                    }
                } else {
                    CoordMsg::Assign {
                        assignments: w.assignments,
                        retry_after_ms: w.retry_after_ms,
                    }
                }]
            });
        }
        WorkerMsg::Report(r) => return reports(engine, worker, vec![r]).await,
        WorkerMsg::Reports(rs) => {
            if rs.len() > MAX_REPORTS_PER_FRAME {
                return Dispatch::Violation("too many reports in one frame");
            }
            return reports(engine, worker, rs).await;
        }
        WorkerMsg::HaveBlobs { blobs } => {
            let blobs = bounded_blobs(blobs);
            engine.send(Cmd::HaveBlobs { worker, blobs }).await
        }
        WorkerMsg::Abandon { replicas } => engine.send(Cmd::Abandon { worker, replicas }).await,
        WorkerMsg::Progress { mut updates } => {
            updates.truncate(tasks::limits::MAX_PROGRESS_PER_MSG);
            engine.send(Cmd::Progress { worker, updates }).await
        }
        WorkerMsg::Holding { replicas } => {
            if replicas.len() > tasks::limits::MAX_HOLDING_PER_MSG {
                return Dispatch::Violation("too many replicas in one Holding");
            }
            engine.send(Cmd::Holding { worker, replicas }).await
        }
        WorkerMsg::Punch { peer } => engine.send(Cmd::Punch { from: worker, peer }).await,
        WorkerMsg::Stderr {
            replica,
            mut stderr,
        } => {
            // Only the tail is kept: cut here, so a long one never reaches the engine.
            let cut = stderr.len().saturating_sub(tasks::limits::MAX_STDERR_TAIL);
            stderr.drain(..cut);
            engine
                .send(Cmd::Stderr {
                    worker,
                    replica,
                    stderr,
                })
                .await
        }
        WorkerMsg::BadPeer { peer, blob } => {
            tracing::warn!(peer = %peer.short(), blob = %blob.short(), "worker reports a peer serving bad data");
            engine
                .send(Cmd::BadPeer {
                    from: worker,
                    peer,
                    blob,
                })
                .await
        }
    };
    if sent {
        Dispatch::None
    } else {
        Dispatch::Gone
    }
}

/// A blob list from a worker, cut to [`tasks::limits::MAX_HAVE_BLOBS_PER_MSG`] (the rest is
/// ignored, with a warning): one message cannot make the engine do unbounded work.
fn bounded_blobs(mut blobs: Vec<tasks::BlobId>) -> Vec<tasks::BlobId> {
    if blobs.len() > tasks::limits::MAX_HAVE_BLOBS_PER_MSG {
        tracing::warn!(
            announced = blobs.len(),
            kept = tasks::limits::MAX_HAVE_BLOBS_PER_MSG,
            "worker announced too many blobs in one message; the rest are ignored"
        );
        blobs.truncate(tasks::limits::MAX_HAVE_BLOBS_PER_MSG);
    }
    blobs
}

async fn reports(
    engine: &EngineHandle,
    worker: NodeId,
    reports: Vec<tasks::wire::Report>,
) -> Dispatch {
    let (tx, rx) = oneshot::channel();
    if !engine
        .send(Cmd::Reports {
            worker,
            reports,
            reply: tx,
        })
        .await
    {
        return Dispatch::Gone;
    }
    Dispatch::Reply(Box::pin(async move { rx.await.unwrap_or_default() }))
}

/// Whether `worker` answers at `addr` from a socket it never sent to: true for a public
/// address (or a NAT with a forwarded port), false behind a NAT that filters by sender.
async fn dial_back(probe: &quinn::Endpoint, addr: SocketAddr, worker: NodeId) -> bool {
    match net::connect_timeout(probe, addr, worker, tasks::wire::ALPN_BLOB, PROBE_TIMEOUT).await {
        Ok(c) => {
            net::close(&c, CloseCode::Done, "reachability probe");
            true
        }
        Err(e) => {
            tracing::debug!(%addr, error = %e, "dial-back failed");
            false
        }
    }
}
