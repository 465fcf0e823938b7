//! The read-only HTTP status API (`coordinator serve --http`): a coordinator started
//! in-process with HTTP on loopback, a job submitted with the real `Client`, two simulated
//! workers agreeing on it over real QUIC, and plain HTTP/1.1 requests over a TcpStream.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use common::simworker::{fuel_for, output_for, Options, Peer, SimWorker};
use coordinator::client::Client;
use coordinator::server::{Coordinator, RunningCoordinator, ServeConfig};
use serde_json::Value;
use tasks::wire;
use tasks::{BlobId, JobSpec, Ticket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start(dir: &std::path::Path, http: SocketAddr) -> anyhow::Result<RunningCoordinator> {
    let mut cfg = ServeConfig::new(dir, "127.0.0.1:0".parse()?);
    cfg.http = Some(http);
    Coordinator::start(cfg).await
}

/// A job directory with a (never executed) module and `n` tasks, quorum 2.
fn job_file(dir: &std::path::Path, n: usize) -> anyhow::Result<JobSpec> {
    std::fs::write(dir.join("m.wasm"), b"\0asm\x01\0\0\0 not really run")?;
    let mut toml = String::from("name = \"httpjob\"\nmodule = \"m.wasm\"\nquorum = 2\nmax_replicas = 4\ndeadline_secs = 600\n");
    for i in 0..n {
        toml += &format!("[[task]]\nargs = [\"t{i}\"]\n");
    }
    std::fs::write(dir.join("job.toml"), toml)?;
    Ok(JobSpec::from_file(&dir.join("job.toml"))?)
}

/// A simulated worker without a peer side (no address announced, nothing served); it
/// reports small outputs inline.
async fn join(ticket: &Ticket) -> anyhow::Result<SimWorker> {
    let opts = Options {
        peer: Peer::None,
        ..Options::default()
    };
    SimWorker::join_with(ticket, opts).await
}

/// One `GET` over a fresh connection: (status code, content type, body).
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String, String)> {
    get_as(addr, path, None).await
}

/// `GET path`, with `Authorization: Bearer TOKEN` when a token is given.
async fn get_as(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String, String)> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut raw))
        .await
        .context("HTTP response timed out")??;
    let raw = String::from_utf8(raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head.split(' ').nth(1).context("no status code")?.parse()?;
    let ctype = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    anyhow::ensure!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "unexpected chunked body"
    );
    Ok((status, ctype, body.to_string()))
}

async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Value)> {
    get_json_as(addr, path, None).await
}

async fn get_json_as(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    let (code, ctype, body) = get_as(addr, path, token).await?;
    anyhow::ensure!(
        ctype.starts_with("application/json"),
        "{path}: content type {ctype:?}"
    );
    Ok((
        code,
        serde_json::from_str(&body).with_context(|| format!("{path}: not JSON: {body}"))?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_status_api_mirrors_status_json_and_results_without_outputs() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let jobdir = tempfile::tempdir()?;
    let coord = start(data.path(), "127.0.0.1:0".parse()?).await?;
    let http = coord
        .http_addr
        .context("http_addr is set when http was asked for")?;
    assert_ne!(http.port(), 0);

    let (code, _, body) = get(http, "/health").await?;
    assert_eq!((code, body.as_str()), (200, "ok"));

    let client = Client::connect(&coord.ticket, &coord.token).await?;
    let (job, n) = client.submit(&job_file(jobdir.path(), 3)?).await?;
    assert_eq!(n, 3);
    let mut a = join(&coord.ticket).await?;
    let mut b = join(&coord.ticket).await?;
    let wa = a.work(8).await?;
    let wb = b.work(8).await?;
    assert_eq!(wa.len() + wb.len(), 6, "quorum 2 × 3 tasks");

    // /status: the same JSON as `coordinator status --json`.
    let (code, st) = get_json(http, "/status").await?;
    assert_eq!(code, 200);
    let via_quic = client.status(None).await?;
    assert_eq!(
        serde_json::from_value::<wire::StatusReport>(st.clone())?.jobs,
        via_quic.jobs
    );
    assert!(st["coordinator_bytes_sent"].is_u64());
    let jobs = st["jobs"].as_array().context("jobs")?;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["id"], job.0);
    assert_eq!(jobs[0]["name"], "httpjob");
    assert_eq!(jobs[0]["state"], "done");
    assert_eq!(
        (
            jobs[0]["tasks_total"].as_u64(),
            jobs[0]["tasks_done"].as_u64(),
            jobs[0]["tasks_failed"].as_u64()
        ),
        (Some(3), Some(3), Some(0))
    );
    let workers = st["workers"].as_array().context("workers")?;
    assert_eq!(workers.len(), 2);
    let fuel: u64 = wa.iter().map(fuel_for).sum();
    for w in workers {
        assert_eq!(w["connected"], true);
        assert_eq!(
            (w["valid"].as_u64(), w["invalid"].as_u64()),
            (Some(3), Some(0))
        );
        assert!((w["credit"].as_f64().context("credit")? - fuel as f64 / 1e9).abs() < 1e-12);
        assert!(w["node_id"].is_string());
    }

    // /jobs/ID: that job's status object.
    let (code, mut j) = get_json(http, &format!("/jobs/{job}")).await?;
    assert_eq!(code, 200);
    // ... with its determinism class (the job file names none: the default).
    assert_eq!(
        j.as_object_mut().and_then(|o| o.remove("determinism")),
        Some(serde_json::json!("native"))
    );
    assert_eq!(&j, &jobs[0]);

    // /jobs/ID/results needs the submit token: 401 without it or with a wrong one.
    let path = format!("/jobs/{job}/results");
    for token in [None, Some("not-the-token")] {
        let (code, e) = get_json_as(http, &path, token).await?;
        assert_eq!(code, 401, "{token:?}");
        assert!(
            e["error"]
                .as_str()
                .is_some_and(|m| m.contains("submit token")),
            "{e}"
        );
    }
    // With it: the results.json shape, with hashes and no output bytes.
    let (code, r) = get_json_as(http, &path, Some(&coord.token)).await?;
    assert_eq!(code, 200);
    assert_eq!(r["job"], job.0);
    assert_eq!(r["state"], "done");
    let tasks = r["tasks"].as_array().context("tasks")?;
    assert_eq!(tasks.len(), 3);
    for t in tasks {
        let idx = t["index"].as_u64().context("index")? as u32;
        let a = wa
            .iter()
            .find(|x| x.task.id.index == idx)
            .context("task was assigned")?;
        assert_eq!(t["status"], "accepted");
        assert_eq!(t["output_hash"], BlobId::of(&output_for(a)).to_string());
        assert_eq!(t["fuel_used"].as_u64(), Some(fuel_for(a)));
        assert_eq!(t["agreeing_workers"].as_array().map(Vec::len), Some(2));
        assert!(t.get("output").is_none(), "no output bytes over HTTP: {t}");
    }

    // Unknown and malformed ids, unknown routes: JSON error one-liners.
    let (code, e) = get_json(http, "/jobs/999999").await?;
    assert_eq!(code, 404);
    assert!(
        e["error"].as_str().is_some_and(|m| m.contains("999999")),
        "{e}"
    );
    let (code, _) = get_json_as(http, "/jobs/999999/results", Some(&coord.token)).await?;
    assert_eq!(code, 404);
    let (code, e) = get_json(http, "/jobs/abc").await?;
    assert_eq!(code, 400);
    assert!(e["error"].is_string(), "{e}");
    let (code, _) = get_json_as(http, "/jobs/abc/results", Some(&coord.token)).await?;
    assert_eq!(code, 400);
    let (code, _) = get_json(http, "/nope").await?;
    assert_eq!(code, 404);

    // The page: the dashboard, whose script (from this server) fills it in from the JSON
    // routes (tests/dashboard.rs runs it in a browser).
    let (code, ctype, page) = get(http, "/").await?;
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/html"), "{ctype}");
    assert!(
        page.contains("<script src=\"/dashboard.js\"></script>")
            && page.contains("/jobs/ID/results")
            && page.contains("/status")
            && page.contains("/metrics"),
        "{page}"
    );
    let (code, ctype, js) = get(http, "/dashboard.js").await?;
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/javascript"), "{ctype}");
    assert!(js.contains("/overview") && js.contains("/tasks"));
    // The overview it polls: the same jobs and workers as /status.
    let (code, o) = get_json(http, "/overview").await?;
    assert_eq!(code, 200);
    assert_eq!(o["jobs"][0]["id"], job.0);
    assert_eq!(o["jobs"][0]["tasks_done"], 3);
    assert_eq!(o["jobs"][0]["tasks_pending"], 0);
    assert_eq!(o["verdicts_valid"], 6);
    assert!(via_quic
        .workers
        .iter()
        .all(|w| o["workers"].as_array().is_some_and(|l| l
            .iter()
            .any(|x| x["node_id"] == w.node_id.to_string()
                && x["standing"] == "newcomer"
                && x["valid"] == 3))));
    // A job's tasks: state, agreement and fuel, no digests.
    let (code, t) = get_json(http, &format!("/jobs/{job}/tasks")).await?;
    assert_eq!(code, 200);
    let rows = t["tasks"].as_array().context("tasks")?;
    assert_eq!(rows.len(), 3);
    for r in rows {
        let idx = r["index"].as_u64().context("index")? as u32;
        let a = wa
            .iter()
            .find(|x| x.task.id.index == idx)
            .context("task was assigned")?;
        assert_eq!(r["state"], "accepted");
        assert_eq!(
            (r["agreeing"].as_u64(), r["quorum"].as_u64()),
            (Some(2), Some(2))
        );
        assert_eq!(r["fuel_used"].as_u64(), Some(fuel_for(a)));
        assert!(r.get("output_hash").is_none(), "{r}");
    }

    // It stops with the coordinator.
    client.close().await;
    coord.shutdown().await?;
    assert!(
        tokio::net::TcpStream::connect(http).await.is_err(),
        "HTTP still accepting after shutdown"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_address_in_use_fails_start_with_one_line() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?;
    let data = tempfile::tempdir()?;
    let err = start(data.path(), addr)
        .await
        .expect_err("the port is taken");
    let msg = format!("{err:#}");
    assert!(
        msg.starts_with(&format!(
            "cannot bind --http {addr}: address already in use"
        )),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_http_server_without_the_flag() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let coord = Coordinator::start(ServeConfig::new(data.path(), "127.0.0.1:0".parse()?)).await?;
    assert_eq!(coord.http_addr, None);
    coord.shutdown().await?;
    Ok(())
}
