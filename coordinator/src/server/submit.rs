//! Submitter requests (`peergrid/submit/1`): one bi-stream per request, guarded by the
//! submit token.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use tasks::job::limits;
use tasks::net;
use tasks::wire::{self, CloseCode, ErrorCode, SubmitBody, SubmitRequest, SubmitResponse};
use tasks::{BlobRef, JobManifest};

use super::engine::{Cmd, EngineHandle};
use crate::core::RetryError;

/// Largest blob a submitter may upload in one `PutBlob` (held in memory while verified).
pub const MAX_PUT_BLOB: u64 = 1 << 30;

/// What submit requests need.
#[derive(Clone)]
pub struct SubmitCtx {
    pub engine: EngineHandle,
    /// With standby coordinators: uploads are copied to the database before they are
    /// acknowledged ([`crate::ha::BlobMirror`]).
    pub mirror: Option<Arc<crate::ha::BlobMirror>>,
    pub blobs: blobs::BlobStore,
    pub token_hash: blake3::Hash,
    pub bytes_sent: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl SubmitCtx {
    /// Constant-time token check: compare blake3 hashes (whose `==` is constant-time), so
    /// neither the content nor the length of the real token leaks through timing.
    pub fn authorized(&self, token: &str) -> bool {
        blake3::hash(token.as_bytes()) == self.token_hash
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> SubmitResponse {
    SubmitResponse::Error {
        code,
        message: message.into(),
    }
}

/// Serve one submitter connection until it closes.
pub async fn serve(conn: quinn::Connection, ctx: SubmitCtx, cancel: CancellationToken) {
    let mut streams = tokio::task::JoinSet::new();
    loop {
        let (send, recv) = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "submit connection ended");
                    break;
                }
            },
        };
        let (ctx, conn) = (ctx.clone(), conn.clone());
        streams.spawn(async move { handle(conn, send, recv, ctx).await });
        while streams.try_join_next().is_some() {}
    }
    streams.abort_all();
}

async fn handle(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    ctx: SubmitCtx,
) {
    let req = match net::read_frame::<SubmitRequest>(&mut recv).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            if let Some(code) = e.close_code() {
                tracing::warn!(error = %e, "closing submit connection: bad frame");
                net::close(&conn, code, "bad frame");
            }
            return;
        }
    };
    let resp = if !ctx.authorized(&req.token) {
        tracing::warn!(addr = %conn.remote_address(), "submit request with a wrong token");
        error(
            ErrorCode::Unauthorized,
            "wrong submit token: use the one in the coordinator's <data-dir>/submit-token",
        )
    } else {
        match respond(&conn, &mut recv, req.body, &ctx).await {
            Ok(r) => r,
            Err(close) => {
                net::close(&conn, close, "bad request body");
                return;
            }
        }
    };
    if let Err(e) = net::write_frame(&mut send, &resp).await {
        tracing::debug!(error = %e, "cannot answer submitter");
        return;
    }
    let _ = send.finish();
    // Let the response drain before the stream is dropped.
    let _ = send.stopped().await;
}

async fn respond(
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    body: SubmitBody,
    ctx: &SubmitCtx,
) -> Result<SubmitResponse, CloseCode> {
    let gone = || error(ErrorCode::Internal, "coordinator is shutting down");
    Ok(match body {
        SubmitBody::MissingBlobs { blobs } => {
            let missing: Vec<BlobRef> = blobs
                .into_iter()
                .filter(|b| !ctx.blobs.has(&b.id))
                .collect();
            SubmitResponse::Missing { blobs: missing }
        }
        SubmitBody::PutBlob { blob } => {
            if blob.size > MAX_PUT_BLOB {
                return Ok(error(
                    ErrorCode::BadRequest,
                    format!(
                        "blob of {} bytes is over the upload limit of {MAX_PUT_BLOB}",
                        blob.size
                    ),
                ));
            }
            let mut bytes = Vec::with_capacity(blob.size.min(16 << 20) as usize);
            while (bytes.len() as u64) < blob.size {
                let want = (blob.size - bytes.len() as u64) as usize;
                match recv.read_chunk(want, true).await {
                    Ok(Some(c)) => bytes.extend_from_slice(&c.bytes),
                    Ok(None) => {
                        return Ok(error(
                            ErrorCode::BadRequest,
                            format!(
                                "blob {} ended after {} of {} bytes",
                                blob.id,
                                bytes.len(),
                                blob.size
                            ),
                        ))
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "blob upload aborted");
                        return Err(CloseCode::Protocol);
                    }
                }
            }
            let (blobs, mirror) = (ctx.blobs.clone(), ctx.mirror.clone());
            // Hashing a big blob is CPU work: off the async threads.
            let stored = tokio::task::spawn_blocking(move || {
                blobs
                    .put_verified(blob, &bytes)
                    .map_err(|e| (ErrorCode::BadRequest, e.to_string()))?;
                match mirror {
                    Some(m) => m
                        .put(&blob.id, &bytes)
                        .map_err(|e| (ErrorCode::Internal, format!("{e:#}"))),
                    None => Ok(()),
                }
            })
            .await;
            match stored {
                Ok(Ok(())) => {
                    tracing::info!(blob = %blob.id.short(), size = blob.size, addr = %conn.remote_address(), "blob uploaded");
                    SubmitResponse::Ok
                }
                Ok(Err((code, e))) => error(code, e),
                Err(e) => error(ErrorCode::Internal, e.to_string()),
            }
        }
        SubmitBody::CreateJob { manifest } => {
            create_job(ctx, manifest, tasks::Determinism::Portable).await
        }
        SubmitBody::CreateJobIn {
            manifest,
            determinism,
        } => create_job(ctx, manifest, determinism).await,
        SubmitBody::CreateJobFromBlob {
            manifest,
            determinism,
        } => {
            if manifest.size > wire::MAX_MANIFEST_BLOB {
                return Ok(error(
                    ErrorCode::BadRequest,
                    format!(
                        "a manifest of {} bytes is over the limit of {}",
                        manifest.size,
                        wire::MAX_MANIFEST_BLOB
                    ),
                ));
            }
            // The upload verified the bytes against the id; decoding a large manifest is CPU
            // work, off the async threads.
            let blobs = ctx.blobs.clone();
            let decoded = tokio::task::spawn_blocking(move || {
                let bytes = blobs.read(&manifest.id).map_err(|e| {
                    (
                        ErrorCode::MissingBlob,
                        format!("upload the manifest first (PutBlob {}): {e}", manifest.id),
                    )
                })?;
                postcard::from_bytes::<JobManifest>(&bytes).map_err(|e| {
                    (
                        ErrorCode::BadRequest,
                        format!("blob {} is not a job manifest: {e}", manifest.id),
                    )
                })
            })
            .await;
            match decoded {
                Ok(Ok(m)) => {
                    tracing::info!(blob = %manifest.id.short(), size = manifest.size, tasks = m.tasks.len(), "job manifest uploaded as a blob");
                    create_job(ctx, m, determinism).await
                }
                Ok(Err((code, why))) => error(code, why),
                Err(e) => error(ErrorCode::Internal, e.to_string()),
            }
        }
        SubmitBody::Classes { job } => {
            match ctx.engine.call(|reply| Cmd::Classes { job, reply }).await {
                Some(v) if v.is_empty() && job.is_some() => error(
                    ErrorCode::NotFound,
                    format!("no job {}", job.map(|j| j.to_string()).unwrap_or_default()),
                ),
                Some(v) => SubmitResponse::Classes(v),
                None => gone(),
            }
        }
        SubmitBody::Status { job } => {
            match ctx.engine.call(|reply| Cmd::Status { job, reply }).await {
                Some(Some(mut st)) => {
                    st.coordinator_bytes_sent = (ctx.bytes_sent)();
                    SubmitResponse::Status(st)
                }
                Some(None) => error(
                    ErrorCode::NotFound,
                    format!("no job {}", job.map(|j| j.to_string()).unwrap_or_default()),
                ),
                None => gone(),
            }
        }
        SubmitBody::Results { job } => {
            match ctx.engine.call(|reply| Cmd::Results { job, reply }).await {
                Some(Ok(Some(r))) => SubmitResponse::Results(r),
                Some(Ok(None)) => error(ErrorCode::NotFound, format!("no job {job}")),
                Some(Err(e)) => error(ErrorCode::Internal, e),
                None => gone(),
            }
        }
        SubmitBody::Failures { job, after, max } => {
            match ctx
                .engine
                .call(|reply| Cmd::Failures {
                    job,
                    after,
                    max,
                    reply,
                })
                .await
            {
                Some(Ok(Some(page))) => SubmitResponse::Failures(page),
                Some(Ok(None)) => error(ErrorCode::NotFound, format!("no job {job}")),
                Some(Err(e)) => error(ErrorCode::Internal, e),
                None => gone(),
            }
        }
        SubmitBody::Progress { job } => {
            match ctx
                .engine
                .call(|reply| Cmd::JobProgress { job, reply })
                .await
            {
                Some(Some(p)) => SubmitResponse::Progress(p),
                Some(None) => error(ErrorCode::NotFound, format!("no job {job}")),
                None => gone(),
            }
        }
        SubmitBody::Cancel { job } => {
            match ctx.engine.call(|reply| Cmd::Cancel { job, reply }).await {
                Some(true) => SubmitResponse::Ok,
                Some(false) => error(ErrorCode::NotFound, format!("no job {job}")),
                None => gone(),
            }
        }
        SubmitBody::Retry { job } => {
            match ctx.engine.call(|reply| Cmd::Retry { job, reply }).await {
                Some(Ok(tasks)) => SubmitResponse::Retried { job, tasks },
                Some(Err(RetryError::UnknownJob)) => {
                    error(ErrorCode::NotFound, format!("no job {job}"))
                }
                Some(Err(e @ RetryError::Cancelled)) => {
                    error(ErrorCode::BadRequest, format!("job {job}: {e}"))
                }
                None => gone(),
            }
        }
        SubmitBody::ResultsPage { job, first, max } => {
            match ctx
                .engine
                .call(|reply| Cmd::ResultsPage {
                    job,
                    first,
                    max,
                    reply,
                })
                .await
            {
                Some(Ok(Some(p))) => SubmitResponse::ResultsPage(p),
                Some(Ok(None)) => error(ErrorCode::NotFound, format!("no job {job}")),
                Some(Err(e)) => error(ErrorCode::Internal, e),
                None => gone(),
            }
        }
    })
}

/// The same rules a job file is checked against, for manifests from the network: every
/// number within [`limits`] (see [`tasks::job::JobLimits::check`]), so nothing absurd ever
/// reaches the scheduling core.
pub fn validate(m: &JobManifest) -> Result<(), String> {
    let l = &m.limits;
    tasks::job::check_name(&m.name).map_err(|e| format!("job name: {e}"))?;
    l.check()?;
    if m.tasks.is_empty() || m.tasks.len() as u64 > limits::MAX_TASKS {
        return Err(format!("a job needs 1..={} tasks", limits::MAX_TASKS));
    }
    if m.tasks.iter().any(|t| {
        t.args.len() > limits::MAX_ARGS || t.args.iter().any(|a| a.len() > limits::MAX_ARG_LEN)
    }) {
        return Err("a task has too many or too long args".into());
    }
    Ok(())
}

/// Create a job (after checking its manifest and that every blob it names was uploaded).
async fn create_job(
    ctx: &SubmitCtx,
    manifest: tasks::JobManifest,
    determinism: tasks::Determinism,
) -> SubmitResponse {
    if let Err(why) = validate(&manifest) {
        return error(ErrorCode::BadRequest, why);
    }
    let missing: Vec<String> = manifest
        .blobs()
        .iter()
        .filter(|b| !ctx.blobs.has(&b.id))
        .map(|b| b.id.to_string())
        .collect();
    if !missing.is_empty() {
        return error(
            ErrorCode::MissingBlob,
            format!("upload these blobs first (PutBlob): {}", missing.join(", ")),
        );
    }
    match ctx
        .engine
        .call(|reply| Cmd::CreateJob {
            manifest,
            determinism,
            reply,
        })
        .await
    {
        Some((job, tasks)) => SubmitResponse::JobCreated { job, tasks },
        None => error(ErrorCode::Internal, "coordinator is shutting down"),
    }
}
