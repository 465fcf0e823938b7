//! `GET /` and `GET /dashboard.js`: the live dashboard, a static page and script built into
//! the binary (`dashboard.html`, `dashboard.js` beside this file; nothing comes from a CDN).
//! The script polls `/overview` every 2 s and the selected job's `/jobs/{id}/tasks`, and
//! draws everything with DOM text nodes (job names come from submitters: never parsed as
//! HTML) and an inline SVG chart of coordinator-vs-peer blob bytes from the samples it
//! polled since the page was opened.
//!
//! The page shows public data only (what `/overview` and `/jobs/{id}/tasks` answer): no
//! digests, no outputs. It says so, and where results are (`/jobs/{id}/results`, with the
//! submit token).

use axum::http::header;
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("dashboard.html");
const SCRIPT: &str = include_str!("dashboard.js");

/// Scripts only from this server, data only from this server: a job name that slipped
/// through as markup still could not run anything.
const CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub(super) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CSP),
        ],
        PAGE,
    )
        .into_response()
}

pub(super) async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
        .into_response()
}
