//! The read-only HTTP status API (`coordinator serve --http ADDR`), served with axum beside
//! the QUIC endpoint and answered by the same [`engine`](super::engine) the submit protocol
//! asks.
//!
//! | route                     | answer                                                        |
//! |---------------------------|---------------------------------------------------------------|
//! | `GET /`                   | a small HTML page: jobs, workers and credit, links to the JSON |
//! | `GET /status`             | the JSON of `coordinator status --json`                       |
//! | `GET /jobs/{id}`          | one job's status object (`{"id", "name", "state", ...}`)      |
//! | `GET /jobs/{id}/results`  | the `results.json` shape, without output bytes; **needs the submit token** (`Authorization: Bearer TOKEN`) |
//! | `GET /health`             | `200 ok`                                                      |
//!
//! Errors are `{"error": "..."}` with 400 (malformed job id), 404 (unknown job or route) or
//! 503 (the engine has stopped).
//!
//! **Public except results.** Anyone who can reach the address can read job names, job
//! progress, worker node ids and their credit (never outputs, blobs or the submit token, and
//! nothing can be changed). A job's results (accepted digests, fuel, agreeing workers: what a
//! colluder would need to copy an accepted answer) need the submit token, as over QUIC:
//! `curl -H "Authorization: Bearer $(cat DATA/submit-token)" http://ADDR/jobs/1/results`;
//! without it the answer is 401. Bind it to localhost or a trusted network; without `--http`
//! no HTTP server runs.

use std::fmt::Write as _;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use tasks::wire::{JobState, StatusReport};
use tasks::JobId;

use super::engine::{Cmd, EngineHandle};

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
        .route("/", get(index))
        .route("/health", get(|| async { "ok" }))
        .route("/status", get(status))
        .route("/jobs/:id", get(job))
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
            Some(j) => Json(j).into_response(),
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
            "no page {}; try /, /status, /jobs/ID, /jobs/ID/results or /health",
            uri.path()
        ),
    )
}

async fn index(State(ctx): State<HttpCtx>) -> Response {
    match report(&ctx, None).await {
        Some(Some(r)) => ([(header::CACHE_CONTROL, "no-store")], Html(render(&r))).into_response(),
        Some(None) => error(StatusCode::INTERNAL_SERVER_ERROR, "no status"),
        None => gone(),
    }
}

fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Running => "running",
        JobState::Done => "done",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

/// Job names come from submitters: escape everything that lands in the page.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The human-readable page: what `coordinator status` prints, as two tables.
fn render(r: &StatusReport) -> String {
    let mut h = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"10\">\
         <title>Peergrid coordinator</title>\
         <style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}\
         td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:right}\
         td.l,th.l{text-align:left}code{font-size:90%}</style></head><body>\n\
         <h1>Peergrid coordinator</h1>\n",
    );
    let _ = writeln!(h, "<h2>Jobs</h2>");
    if r.jobs.is_empty() {
        h.push_str("<p>no jobs</p>\n");
    } else {
        h.push_str(
            "<table><tr><th>job</th><th class=\"l\">name</th><th class=\"l\">state</th><th>tasks</th><th>done</th>\
             <th>failed</th><th>in flight</th><th class=\"l\">json</th></tr>\n",
        );
        for j in &r.jobs {
            let _ = writeln!(
                h,
                "<tr><td>{id}</td><td class=\"l\">{name}</td><td class=\"l\">{state}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td class=\"l\"><a href=\"/jobs/{id}\">status</a> <a href=\"/jobs/{id}/results\">results</a></td></tr>",
                j.tasks_total,
                j.tasks_done,
                j.tasks_failed,
                j.replicas_in_flight,
                id = j.id,
                name = esc(&j.name),
                state = state_name(j.state),
            );
        }
        h.push_str("</table>\n");
    }
    h.push_str("<h2>Workers</h2>\n");
    if r.workers.is_empty() {
        h.push_str("<p>no workers have joined yet</p>\n");
    } else {
        h.push_str("<table><tr><th class=\"l\">worker</th><th class=\"l\">connected</th><th>credit</th><th>valid</th><th>invalid</th></tr>\n");
        for w in &r.workers {
            let _ = writeln!(
                h,
                "<tr><td class=\"l\"><code>{}</code></td><td class=\"l\">{}</td><td>{:.3}</td><td>{}</td><td>{}</td></tr>",
                esc(&w.node_id.to_string()),
                if w.connected { "yes" } else { "no" },
                w.credit,
                w.valid,
                w.invalid
            );
        }
        h.push_str("</table>\n");
    }
    let _ = writeln!(
        h,
        "<p>coordinator has served {} bytes of blob data</p>\n\
         <p>JSON: <a href=\"/status\">/status</a> · <code>/jobs/ID</code> · <code>/jobs/ID/results</code> (needs the submit token: <code>Authorization: Bearer TOKEN</code>) · <a href=\"/health\">/health</a></p>\n\
         </body></html>",
        r.coordinator_bytes_sent
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use tasks::wire::{JobStatus, WorkerStatus};

    #[test]
    fn page_escapes_job_names_and_links_each_job() {
        let r = StatusReport {
            jobs: vec![JobStatus {
                id: JobId(7),
                name: "<script>x</script>".into(),
                state: JobState::Running,
                tasks_total: 3,
                tasks_done: 1,
                tasks_failed: 0,
                replicas_in_flight: 2,
                replicas_reported: 2,
                outputs_collecting: 1,
            }],
            workers: vec![WorkerStatus {
                node_id: tasks::NodeKey::generate().node_id(),
                connected: true,
                credit: 1.5,
                valid: 3,
                invalid: 0,
            }],
            coordinator_bytes_sent: 42,
        };
        let page = render(&r);
        assert!(!page.contains("<script>"));
        assert!(page.contains("&lt;script&gt;x&lt;/script&gt;"));
        assert!(page.contains("href=\"/jobs/7/results\""));
        assert!(page.contains("1.500"));
    }
}
