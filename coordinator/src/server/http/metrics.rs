//! `GET /metrics`: the coordinator's state in the Prometheus text exposition format
//! (version 0.0.4), for scraping. Every value is read from the running engine and blob
//! server at request time; nothing is cached or estimated except where a metric's HELP says
//! so. Public like `/status`: counts only, no job names or worker ids (so no label grows
//! with the number of jobs or workers).

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::super::engine::overview::{CommitHistogram, JobOverview, Standing};
use super::{gather, gone, Gathered, HttpCtx};
use tasks::wire::JobState;

/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(super) async fn page(State(ctx): State<HttpCtx>) -> Response {
    let Some(g) = gather(&ctx).await else {
        return gone();
    };
    let engine = Engine {
        queue_depth: ctx.engine.queue_depth() as u64,
        queue_capacity: ctx.engine.tx.max_capacity() as u64,
        batches: ctx.engine.stats.batches(),
        commands: ctx.engine.stats.commands(),
        reports_rejected: ctx.engine.stats.reports_rejected(),
        commits: ctx.engine.stats.commit_histogram(),
    };
    (
        [
            (header::CONTENT_TYPE, CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-store"),
        ],
        render(&g, &engine),
    )
        .into_response()
}

/// What the engine handle knows without a round trip.
pub struct Engine {
    pub queue_depth: u64,
    pub queue_capacity: u64,
    pub batches: u64,
    pub commands: u64,
    pub reports_rejected: u64,
    pub commits: CommitHistogram,
}

/// One metric family's `# HELP` and `# TYPE` lines. HELP text escapes `\` and newlines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A sample; label values here are fixed words, never remote input.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{v}\"");
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// The exposition text.
pub fn render(g: &Gathered, e: &Engine) -> String {
    let o = &g.overview;
    let mut out = String::with_capacity(4096);

    family(&mut out, "peergrid_jobs", "gauge", "Jobs by state.");
    for (state, name) in [
        (JobState::Running, "running"),
        (JobState::Done, "done"),
        (JobState::Failed, "failed"),
        (JobState::Cancelled, "cancelled"),
    ] {
        let n = o.jobs.iter().filter(|j| j.status.state == state).count();
        sample(&mut out, "peergrid_jobs", &[("state", name)], n);
    }

    family(
        &mut out,
        "peergrid_tasks",
        "gauge",
        "Tasks of all jobs by state: pending (not decided yet), accepted (a quorum agreed), failed (ended without consensus).",
    );
    let sum = |f: fn(&JobOverview) -> u32| -> u64 { o.jobs.iter().map(|j| f(j) as u64).sum() };
    sample(
        &mut out,
        "peergrid_tasks",
        &[("state", "pending")],
        sum(|j| j.tasks_pending),
    );
    sample(
        &mut out,
        "peergrid_tasks",
        &[("state", "accepted")],
        sum(|j| j.status.tasks_done),
    );
    sample(
        &mut out,
        "peergrid_tasks",
        &[("state", "failed")],
        sum(|j| j.status.tasks_failed),
    );

    family(
        &mut out,
        "peergrid_replicas_in_flight",
        "gauge",
        "Replicas assigned to workers and not reported yet.",
    );
    sample(
        &mut out,
        "peergrid_replicas_in_flight",
        &[],
        sum(|j| j.status.replicas_in_flight),
    );

    family(
        &mut out,
        "peergrid_replicas_reported_total",
        "counter",
        "Replicas reported by workers, all jobs.",
    );
    sample(
        &mut out,
        "peergrid_replicas_reported_total",
        &[],
        sum(|j| j.status.replicas_reported),
    );

    family(
        &mut out,
        "peergrid_reports_judged_total",
        "counter",
        "Reported results judged against their task's accepted result: valid (agreed, credited) or invalid (contradicted it).",
    );
    sample(
        &mut out,
        "peergrid_reports_judged_total",
        &[("verdict", "valid")],
        o.verdicts_valid,
    );
    sample(
        &mut out,
        "peergrid_reports_judged_total",
        &[("verdict", "invalid")],
        o.verdicts_invalid,
    );

    family(
        &mut out,
        "peergrid_reports_rejected_total",
        "counter",
        "Reports refused before judgement since the coordinator started (a replica not the worker's, a changed result, an inline output not matching its hash).",
    );
    sample(
        &mut out,
        "peergrid_reports_rejected_total",
        &[],
        e.reports_rejected,
    );

    family(
        &mut out,
        "peergrid_tasks_contested",
        "gauge",
        "Tasks whose reports disagree (two different results from the same engine class): validation disputes.",
    );
    sample(
        &mut out,
        "peergrid_tasks_contested",
        &[],
        sum(|j| j.tasks_contested),
    );

    family(
        &mut out,
        "peergrid_workers_connected",
        "gauge",
        "Connected workers by standing: newcomer, anchor (trusted by a run of agreeing results), probation, banned.",
    );
    for s in Standing::ALL {
        let n = o
            .workers
            .iter()
            .filter(|w| w.connected && w.standing == s)
            .count();
        sample(
            &mut out,
            "peergrid_workers_connected",
            &[("standing", s.name())],
            n,
        );
    }
    family(
        &mut out,
        "peergrid_workers_known",
        "gauge",
        "Workers the coordinator has a record of, connected or not.",
    );
    sample(&mut out, "peergrid_workers_known", &[], o.workers.len());

    family(
        &mut out,
        "peergrid_coordinator_blob_bytes_sent_total",
        "counter",
        "Blob chunk bytes the coordinator uploaded since it started (status's coordinator_bytes_sent).",
    );
    sample(
        &mut out,
        "peergrid_coordinator_blob_bytes_sent_total",
        &[],
        g.coordinator_bytes_sent,
    );
    family(
        &mut out,
        "peergrid_peer_blob_bytes_estimate",
        "gauge",
        "Estimated blob bytes workers got from peers: per worker, the size of the job blobs (modules, inputs) it announces holding minus the bytes the coordinator uploaded to it, floored at 0. An estimate: workers do not report their transfers to the coordinator; a blob kept from an earlier session counts here too.",
    );
    sample(
        &mut out,
        "peergrid_peer_blob_bytes_estimate",
        &[],
        g.from_peers_estimate.iter().sum::<u64>(),
    );

    family(
        &mut out,
        "peergrid_engine_queue_depth",
        "gauge",
        "Commands waiting in the engine's inbox.",
    );
    sample(&mut out, "peergrid_engine_queue_depth", &[], e.queue_depth);
    family(
        &mut out,
        "peergrid_engine_queue_capacity",
        "gauge",
        "Size of the engine's inbox; senders wait when it is full.",
    );
    sample(
        &mut out,
        "peergrid_engine_queue_capacity",
        &[],
        e.queue_capacity,
    );
    family(
        &mut out,
        "peergrid_engine_batches_total",
        "counter",
        "Batches the engine applied and committed since it started.",
    );
    sample(&mut out, "peergrid_engine_batches_total", &[], e.batches);
    family(
        &mut out,
        "peergrid_engine_commands_total",
        "counter",
        "Commands the engine applied since it started (as of its last commit).",
    );
    sample(&mut out, "peergrid_engine_commands_total", &[], e.commands);

    family(
        &mut out,
        "peergrid_store_commit_seconds",
        "histogram",
        "Time the engine took to commit one batch of mutations to the store (one transaction).",
    );
    for (le, n) in e.commits.cumulative() {
        let le = format!("{le}");
        sample(
            &mut out,
            "peergrid_store_commit_seconds_bucket",
            &[("le", &le)],
            n,
        );
    }
    sample(
        &mut out,
        "peergrid_store_commit_seconds_bucket",
        &[("le", "+Inf")],
        e.commits.count,
    );
    sample(
        &mut out,
        "peergrid_store_commit_seconds_sum",
        &[],
        e.commits.sum_seconds,
    );
    sample(
        &mut out,
        "peergrid_store_commit_seconds_count",
        &[],
        e.commits.count,
    );
    out
}
