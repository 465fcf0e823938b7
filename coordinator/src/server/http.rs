//! The read-only HTTP status API (`coordinator serve --http ADDR`), served with axum beside
//! the QUIC endpoint and answered by the same [`engine`](super::engine) the submit protocol
//! asks.
//!
//! | route                     | answer                                                        |
//! |---------------------------|---------------------------------------------------------------|
//! | `GET /`                   | the live dashboard ([`dashboard`]): jobs with progress bars, a job's tasks, workers and their standing, coordinator-vs-peer blob bytes over time; its script polls `/overview` and `/jobs/{id}/tasks` |
//! | `GET /dashboard.js`       | the dashboard's script (served from the binary; no CDN)       |
//! | `GET /metrics`            | Prometheus text format ([`metrics`]): tasks by state, replicas in flight, verdicts, rejected reports, contested tasks, workers by standing, blob bytes, engine queue depth, store commit latency |
//! | `GET /status`             | the JSON of `coordinator status --json`                       |
//! | `GET /overview`           | `{"now_ms", "jobs": [status fields + "tasks_pending", "tasks_contested"], "workers": [{"node_id", "connected", "credit", "valid", "invalid", "standing", "in_flight", "slots", "last_seen_ms", "reachable", "blob_bytes_held", "blob_bytes_from_coordinator", "blob_bytes_from_peers_estimate"}], "verdicts_valid", "verdicts_invalid", "coordinator_bytes_sent", "peer_bytes_estimate", "engine": {"queue_depth", "queue_capacity", "batches", "commands"}}` |
//! | `GET /jobs/{id}`          | one job's status object (`{"id", "name", "state", ..., "determinism"}`) |
//! | `GET /jobs/{id}/tasks?offset=N&limit=M` | `{"job", "name", "state", "tasks_total", "offset", "tasks": [{"index", "state", "quorum", "replicas", "in_flight", "reported", "agreeing", "disagreeing", "contested", "lost", "fuel_used"}]}`, at most 1000 tasks (default 200) from `offset`; no digests |
//! | `GET /jobs/{id}/results`  | the `results.json` shape, without output bytes; **needs the submit token** (`Authorization: Bearer TOKEN`) |
//! | `GET /health`             | `200 ok`                                                      |
//!
//! Errors are `{"error": "..."}` with 400 (malformed job id or query), 404 (unknown job or
//! route) or 503 (the engine has stopped).
//!
//! **Public except results.** Anyone who can reach the address can read job names, job and
//! task progress (replica counts, agreement, fuel), worker node ids, their credit and
//! standing, and the metrics (never digests, outputs, blobs or the submit token, and nothing
//! can be changed). A job's results (accepted digests, agreeing workers: what a colluder would
//! need to copy an accepted answer) need the submit token, as over QUIC:
//! `curl -H "Authorization: Bearer $(cat DATA/submit-token)" http://ADDR/jobs/1/results`;
//! without it the answer is 401. Bind it to localhost or a trusted network; without `--http`
//! no HTTP server runs.

pub mod dashboard;
pub mod metrics;

use std::collections::HashMap;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use tasks::wire::StatusReport;
use tasks::{JobId, NodeId};

use super::engine::{Cmd, EngineHandle, Overview};

/// How long in-flight HTTP requests may take to finish once the coordinator stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What the HTTP handlers need.
#[derive(Clone)]
pub struct HttpCtx {
    pub engine: EngineHandle,
    /// blake3 of the submit token: `/jobs/ID/results` needs it (compared in constant time).
    pub token_hash: blake3::Hash,
    /// Blob payload bytes the coordinator uploaded so far (`coordinator_bytes_sent`).
    pub bytes_sent: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Blob payload bytes the coordinator uploaded to each node so far.
    pub bytes_sent_to: Arc<dyn Fn() -> HashMap<NodeId, u64> + Send + Sync>,
}

/// Bind the HTTP listener. The error is one line naming the flag, the address and the cause,
/// e.g. `cannot bind --http 127.0.0.1:80: permission denied (...)`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        use std::io::ErrorKind;
        let why = match e.kind() {
            ErrorKind::PermissionDenied => {
                "permission denied (ports below 1024 need privileges; pick e.g. 127.0.0.1:8080)"
                    .to_string()
            }
            ErrorKind::AddrInUse => {
                "address already in use (another process listens there; pick another port)"
                    .to_string()
            }
            ErrorKind::AddrNotAvailable => {
                "address not available (no interface on this machine has that IP)".to_string()
            }
            _ => e.to_string(),
        };
        anyhow::anyhow!("cannot bind --http {addr}: {why}")
    })
}

/// The routes, for embedding or for tests that drive the router directly.
pub fn router(ctx: HttpCtx) -> Router {
    Router::new()
        .route("/", get(dashboard::page))
        .route("/dashboard.js", get(dashboard::script))
        .route("/metrics", get(metrics::page))
        .route("/health", get(|| async { "ok" }))
        .route("/status", get(status))
        .route("/overview", get(overview))
        .route("/jobs/:id", get(job))
        .route("/jobs/:id/tasks", get(tasks))
        .route("/jobs/:id/results", get(results))
        .fallback(not_found)
        .with_state(ctx)
}

/// Serve `listener` until `cancel` fires: then stop accepting, let in-flight requests finish
/// for up to [`SHUTDOWN_GRACE`], and return (dropping the engine handle with the router).
pub async fn run(listener: tokio::net::TcpListener, ctx: HttpCtx, cancel: CancellationToken) {
    let server = axum::serve(listener, router(ctx))
        .with_graceful_shutdown(cancel.clone().cancelled_owned())
        .into_future();
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => {
            if let Err(e) = r {
                tracing::warn!(error = %e, "HTTP status server stopped");
            }
            return;
        }
        _ = cancel.cancelled() => {}
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, server).await.is_err() {
        tracing::debug!("HTTP requests still open at shutdown; dropped");
    }
}

/// While this coordinator stands by (`crate::ha`): every path answers `503 Service
/// Unavailable` with `{"state": "standby", "leader": <its ticket entry or null>}`, so a
/// health check or load balancer can tell the standby from the leader. `leader()` says who
/// leads now. Serves `listener` until `cancel` fires.
pub async fn standby(
    listener: tokio::net::TcpListener,
    leader: Arc<dyn Fn() -> Option<String> + Send + Sync>,
    cancel: CancellationToken,
) {
    let app = Router::new().fallback(move || {
        let leader = leader();
        async move {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "state": "standby", "leader": leader })),
            )
                .into_response()
        }
    });
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .into_future();
    if let Err(e) = server.await {
        tracing::warn!(error = %e, "standby HTTP server stopped");
    }
}

/// A JSON `{"error": ...}` answer.
fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn gone() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "coordinator is shutting down",
    )
}

async fn report(ctx: &HttpCtx, job: Option<JobId>) -> Option<Option<StatusReport>> {
    let mut r = ctx.engine.call(|reply| Cmd::Status { job, reply }).await?;
    if let Some(r) = &mut r {
        r.coordinator_bytes_sent = (ctx.bytes_sent)();
    }
    Some(r)
}

async fn status(State(ctx): State<HttpCtx>) -> Response {
    match report(&ctx, None).await {
        Some(Some(r)) => Json(r).into_response(),
        Some(None) => error(StatusCode::INTERNAL_SERVER_ERROR, "no status"),
        None => gone(),
    }
}

async fn job(State(ctx): State<HttpCtx>, Path(id): Path<String>) -> Response {
    let job = match id.parse::<JobId>() {
        Ok(j) => j,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match report(&ctx, Some(job)).await {
        Some(Some(r)) => match r.jobs.into_iter().find(|j| j.id == job) {
            Some(j) => {
                let mut v = serde_json::to_value(&j).unwrap_or_default();
                let class = ctx
                    .engine
                    .call(|reply| Cmd::Classes {
                        job: Some(job),
                        reply,
                    })
                    .await
                    .and_then(|c| c.first().map(|(_, d)| *d));
                if let Some(d) = class {
                    v["determinism"] = serde_json::json!(d);
                }
                Json(v).into_response()
            }
            None => error(StatusCode::NOT_FOUND, format!("no job {job}")),
        },
        Some(None) => error(StatusCode::NOT_FOUND, format!("no job {job}")),
        None => gone(),
    }
}

/// Whether the request carries `Authorization: Bearer <submit token>`.
fn authorized(ctx: &HttpCtx, headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| blake3::hash(t.trim().as_bytes()) == ctx.token_hash)
}

async fn results(
    State(ctx): State<HttpCtx>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&ctx, &headers) {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "results need the submit token: send Authorization: Bearer <the coordinator's DATA/submit-token>",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let job = match id.parse::<JobId>() {
        Ok(j) => j,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match ctx.engine.call(|reply| Cmd::Results { job, reply }).await {
        Some(Ok(Some(mut res))) => {
            // Outputs are blobs named by `output_hash`; this page is metadata only, as
            // results.json is.
            for t in &mut res.tasks {
                t.output = None;
            }
            let mut value = match serde_json::to_value(&res) {
                Ok(v) => v,
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            };
            if let Some(list) = value.get_mut("tasks").and_then(|t| t.as_array_mut()) {
                for t in list.iter_mut().filter_map(|t| t.as_object_mut()) {
                    t.remove("output");
                }
            }
            Json(value).into_response()
        }
        Some(Ok(None)) => error(StatusCode::NOT_FOUND, format!("no job {job}")),
        Some(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        None => gone(),
    }
}

async fn not_found(uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no page {}; try /, /metrics, /status, /overview, /jobs/ID, /jobs/ID/tasks, /jobs/ID/results or /health",
            uri.path()
        ),
    )
}

/// The engine's [`Overview`] with the blob server's per-worker counters joined in.
pub struct Gathered {
    pub overview: Overview,
    /// Per worker of `overview.workers`, in order: blob bytes the coordinator uploaded to it.
    pub from_coordinator: Vec<u64>,
    /// Per worker: job blob bytes it holds that it did not get from the coordinator (from
    /// peers, or kept from an earlier session). An estimate: workers do not report transfers.
    pub from_peers_estimate: Vec<u64>,
    pub coordinator_bytes_sent: u64,
}

/// `None`: the engine has stopped.
async fn gather(ctx: &HttpCtx) -> Option<Gathered> {
    let overview = ctx.engine.call(|reply| Cmd::Overview { reply }).await?;
    let sent_to = (ctx.bytes_sent_to)();
    let from_coordinator: Vec<u64> = overview
        .workers
        .iter()
        .map(|w| sent_to.get(&w.node_id).copied().unwrap_or(0))
        .collect();
    let from_peers_estimate = overview
        .workers
        .iter()
        .zip(&from_coordinator)
        .map(|(w, c)| w.blob_bytes_held.saturating_sub(*c))
        .collect();
    Some(Gathered {
        overview,
        from_coordinator,
        from_peers_estimate,
        coordinator_bytes_sent: (ctx.bytes_sent)(),
    })
}

/// `/overview`'s JSON. `None`: the engine has stopped.
async fn overview_value(ctx: &HttpCtx) -> Option<serde_json::Value> {
    let g = gather(ctx).await?;
    let mut value = serde_json::to_value(&g.overview).ok()?;
    if let Some(list) = value.get_mut("workers").and_then(|w| w.as_array_mut()) {
        for (i, json) in list.iter_mut().enumerate() {
            if let Some(obj) = json.as_object_mut() {
                obj.insert(
                    "blob_bytes_from_coordinator".into(),
                    g.from_coordinator[i].into(),
                );
                obj.insert(
                    "blob_bytes_from_peers_estimate".into(),
                    g.from_peers_estimate[i].into(),
                );
            }
        }
    }
    let obj = value.as_object_mut()?;
    obj.insert(
        "coordinator_bytes_sent".into(),
        g.coordinator_bytes_sent.into(),
    );
    obj.insert(
        "peer_bytes_estimate".into(),
        g.from_peers_estimate.iter().sum::<u64>().into(),
    );
    obj.insert(
        "engine".into(),
        serde_json::json!({
            "queue_depth": ctx.engine.queue_depth(),
            "queue_capacity": ctx.engine.tx.max_capacity(),
            "batches": ctx.engine.stats.batches(),
            "commands": ctx.engine.stats.commands(),
        }),
    );
    Some(value)
}

async fn overview(State(ctx): State<HttpCtx>) -> Response {
    match overview_value(&ctx).await {
        Some(v) => ([(header::CACHE_CONTROL, "no-store")], Json(v)).into_response(),
        None => gone(),
    }
}

/// `?offset=N&limit=M` of `/jobs/{id}/tasks`.
#[derive(Debug, serde::Deserialize)]
struct TasksQuery {
    #[serde(default)]
    offset: u32,
    #[serde(default = "default_tasks_limit")]
    limit: u32,
}

fn default_tasks_limit() -> u32 {
    200
}

async fn tasks(
    State(ctx): State<HttpCtx>,
    Path(id): Path<String>,
    query: Result<Query<TasksQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let job = match id.parse::<JobId>() {
        Ok(j) => j,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let Ok(Query(q)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "offset and limit must be whole numbers, e.g. ?offset=0&limit=200",
        );
    };
    let (offset, limit) = (q.offset, q.limit);
    match ctx
        .engine
        .call(|reply| Cmd::Tasks {
            job,
            offset,
            limit,
            reply,
        })
        .await
    {
        Some(Some(page)) => {
            let mut value = match serde_json::to_value(&page) {
                Ok(v) => v,
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            };
            let end = page.offset.saturating_add(page.tasks.len() as u32);
            if let Some(tasks) = value.get_mut("tasks").and_then(|t| t.as_array_mut()) {
                annotate_failures(&ctx, job, page.offset, end, tasks).await;
            }
            ([(header::CACHE_CONTROL, "no-store")], Json(value)).into_response()
        }
        Some(None) => error(StatusCode::NOT_FOUND, format!("no job {job}")),
        None => gone(),
    }
}

/// Add `failure` (what became of it: `exit 2`, `trap (unreachable)`, the reason it failed)
/// and `stderr` (the tail a worker sent, control characters removed) to the tasks of
/// `offset..end` that did not end `ok`: why a task failed, for the dashboard. Diagnostics,
/// not results: no digest or output is shown. Missing if the store cannot answer.
async fn annotate_failures(
    ctx: &HttpCtx,
    job: JobId,
    offset: u32,
    end: u32,
    tasks: &mut [serde_json::Value],
) {
    let Some(Ok(Some(page))) = ctx
        .engine
        .call(|reply| Cmd::Failures {
            job,
            after: offset.checked_sub(1),
            max: end.saturating_sub(offset),
            reply,
        })
        .await
    else {
        return;
    };
    for f in page.failures.iter().filter(|f| f.index < end) {
        let Some(obj) = tasks
            .get_mut((f.index - offset) as usize)
            .and_then(|t| t.as_object_mut())
        else {
            continue;
        };
        let what = match (f.outcome, &f.reason) {
            (Some(tasks::Status::Exit), _) => format!("exit {}", f.exit_code),
            (Some(tasks::Status::Trap), _) => {
                format!("trap ({})", crate::cli::failures::clean(f.trap.as_bytes()))
            }
            (Some(s), _) => s.as_str().to_string(),
            (None, Some(r)) => crate::cli::failures::clean(r.as_bytes()),
            (None, None) => "failed".to_string(),
        };
        obj.insert("failure".into(), what.into());
        if let Some(e) = &f.stderr {
            obj.insert("stderr".into(), crate::cli::failures::clean(e).into());
        }
    }
}
