//! Worker sessions (`peergrid/coord/1`): one long-lived bi-stream per worker connection.
//!
//! A reader task turns frames into [`WorkerMsg`]s (reading a frame is not cancel-safe, so it
//! never sits in a `select!`); the session loop forwards them to the engine and writes the
//! answers back **in request order**, pipelined: a worker may send many reports before the
//! first is acknowledged, and they are committed together with other sessions' reports.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use tasks::net::{self, FrameError};
use tasks::wire::{CloseCode, CoordMsg, WorkerMsg};
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
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("coordinator is shutting down")]
    EngineGone,
}

/// Serve one worker connection until it closes or `cancel` fires.
pub async fn run(
    conn: quinn::Connection,
    worker: NodeId,
    engine: EngineHandle,
    cancel: CancellationToken,
) -> Result<(), SessionError> {
    let (mut send, mut recv) = tokio::select! {
        biased;
        _ = cancel.cancelled() => return Ok(()),
        s = conn.accept_bi() => s.map_err(SessionError::Accept)?,
    };
    let hello = match net::read_frame::<WorkerMsg>(&mut recv).await {
        Ok(Some(WorkerMsg::Hello {
            agent,
            fingerprint,
            slots,
            peer_addr,
            blobs,
        })) => {
            tracing::info!(%agent, fingerprint = %fingerprint, slots, "worker joined");
            HelloInfo {
                fingerprint,
                slots,
                peer_addr,
                blobs,
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
    let (out_tx, mut out_rx) = mpsc::unbounded_channel();
    engine
        .call(|reply| Cmd::Hello {
            worker,
            session,
            info: hello,
            tx: out_tx,
            reply,
        })
        .await
        .ok_or(SessionError::EngineGone)?;
    let result = async {
        net::write_frame(
            &mut send,
            &CoordMsg::Welcome {
                agent: super::AGENT.into(),
                observed_addr: conn.remote_address(),
            },
        )
        .await?;
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
        let outcome = loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break Ok(()),
                Some(msg) = out_rx.recv() => net::write_frame(&mut send, &msg).await?,
                Some(msgs) = pending.next(), if !pending.is_empty() => {
                    for m in msgs {
                        net::write_frame(&mut send, &m).await?;
                    }
                }
                msg = in_rx.recv(), if pending.len() < MAX_PIPELINE => match msg {
                    None => {
                        // The worker finished its side: answer what is pending, then end.
                        while let Some(msgs) = pending.next().await {
                            for m in msgs {
                                net::write_frame(&mut send, &m).await?;
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
                    Some(Ok(m)) => match dispatch(&engine, worker, m).await {
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
    engine.send(Cmd::Disconnected { worker, session }).await;
    result
}

enum Dispatch {
    Reply(Pending),
    None,
    Violation(&'static str),
    Gone,
}

async fn dispatch(engine: &EngineHandle, worker: NodeId, msg: WorkerMsg) -> Dispatch {
    fn reply<T: Send + 'static>(
        rx: oneshot::Receiver<T>,
        f: impl FnOnce(T) -> Vec<CoordMsg> + Send + 'static,
    ) -> Dispatch {
        Dispatch::Reply(Box::pin(async move { rx.await.map(f).unwrap_or_default() }))
    }
    let sent = match msg {
        WorkerMsg::Hello { .. } => return Dispatch::Violation("second Hello"),
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
            return reply(rx, |w| {
                vec![CoordMsg::Assign {
                    assignments: w.assignments,
                    retry_after_ms: w.retry_after_ms,
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
        WorkerMsg::HaveBlobs { blobs } => engine.send(Cmd::HaveBlobs { worker, blobs }).await,
        WorkerMsg::Abandon { replicas } => engine.send(Cmd::Abandon { worker, replicas }).await,
        WorkerMsg::BadPeer { peer, blob } => {
            tracing::warn!(peer = %peer.short(), blob = %blob.short(), "worker reports a peer serving bad data");
            engine.send(Cmd::BadPeer { peer, blob }).await
        }
    };
    if sent {
        Dispatch::None
    } else {
        Dispatch::Gone
    }
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
