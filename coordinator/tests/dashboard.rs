//! What scientists and operators see on day one, checked end to end: a real `coordinator
//! serve --http 127.0.0.1:0` process, two real `worker join` processes running the primes
//! job in wasmtime, then
//! - `/metrics` scraped and parsed by the Prometheus project's own Python parser (Debian's
//!   `python3-prometheus-client`), its values checked against the job;
//! - the dashboard at `/` loaded in headless Chromium, and the DOM its script built checked
//!   for the job, its progress, its tasks and the workers (a screenshot is kept for a look).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::{coordinator_bin, free_udp_port, log_file, worker_bin, Proc, PRIMES_WASM};
use serde_json::Value;

/// Hang guard for waits on observable states (not a speed claim).
const PATIENCE: Duration = Duration::from_secs(300);

/// A coordinator with the HTTP API and its workers, as separate processes (killed on drop).
struct Grid {
    dir: tempfile::TempDir,
    _coord: Proc,
    _workers: Vec<Proc>,
    ticket: String,
    token: String,
    http: SocketAddr,
}

impl Grid {
    /// `coordinator serve --policy trusting --http 127.0.0.1:0` and `workers` workers; the
    /// HTTP address is the one serve prints (`status page: http://ADDR/`).
    fn start(workers: usize) -> Result<Grid> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("coord");
        let out = dir.path().join("coordinator.out");
        let child = Command::new(coordinator_bin())
            .args(["serve", "--data-dir"])
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{}", free_udp_port())])
            .args(["--http", "127.0.0.1:0", "--policy", "trusting"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(std::fs::File::create(&out)?))
            .stderr(log_file(dir.path(), "coordinator"))
            .spawn()
            .context("spawning coordinator serve")?;
        let coord = Proc {
            child,
            name: "coordinator".into(),
        };
        let t0 = Instant::now();
        let (ticket, token, http) = loop {
            let printed = std::fs::read_to_string(&out).unwrap_or_default();
            let http = printed.lines().find_map(|l| {
                l.strip_prefix("status page: http://")?
                    .split('/')
                    .next()?
                    .parse::<SocketAddr>()
                    .ok()
            });
            if let (Some(http), Ok(t), Ok(k)) = (
                http,
                std::fs::read_to_string(data.join("ticket")),
                std::fs::read_to_string(data.join("submit-token")),
            ) {
                if !t.trim().is_empty() && !k.trim().is_empty() {
                    break (t.trim().to_string(), k.trim().to_string(), http);
                }
            }
            ensure!(
                t0.elapsed() < PATIENCE,
                "coordinator printed no status page address: {printed}{}",
                std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut procs = Vec::new();
        for i in 0..workers {
            let child = Command::new(worker_bin())
                .args(["join", &ticket, "--slots", "1", "--listen", "127.0.0.1:0"])
                // Normal priority: a busy test machine must not starve the tasks.
                .args(["--priority", "normal", "--data-dir"])
                .arg(dir.path().join(format!("worker-{i}")))
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log_file(dir.path(), &format!("worker-{i}")))
                .spawn()
                .context("spawning worker join")?;
            procs.push(Proc {
                child,
                name: format!("worker-{i}"),
            });
        }
        Ok(Grid {
            dir,
            _coord: coord,
            _workers: procs,
            ticket,
            token,
            http,
        })
    }

    /// Submit a primes job of `tasks` tasks (quorum 2); its id.
    fn submit_primes(&self, tasks: u32) -> Result<u64> {
        let module = std::fs::read(PRIMES_WASM)?;
        self.submit(
            &module,
            &format!(
                "name = \"primes-dashboard\"\nmodule = \"primes.wasm\"\nquorum = 2\nmax_replicas = 4\n\
                 fuel = 20_000_000_000\nmemory_mb = 32\nmax_output = 64\ndeadline_secs = 600\n\
                 [tasks]\ncount = {tasks}\nargs = [\"block\", \"{{i}}\", \"20000\"]\n"
            ),
        )
    }

    /// Submit a job file (`module = "primes.wasm"` names `module`'s bytes); its id.
    fn submit(&self, module: &[u8], job_toml: &str) -> Result<u64> {
        let jd = self.dir.path().join("job");
        std::fs::create_dir_all(&jd)?;
        std::fs::write(jd.join("primes.wasm"), module)?;
        std::fs::write(jd.join("job.toml"), job_toml)?;
        let out = Command::new(coordinator_bin())
            .args([
                "submit",
                "--to",
                &self.ticket,
                "--token",
                &self.token,
                "--json",
            ])
            .arg(jd.join("job.toml"))
            .env("RUST_LOG", "warn")
            .output()?;
        ensure!(
            out.status.success(),
            "submit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout)?;
        v["id"].as_u64().context("submit --json prints the job id")
    }

    /// Poll `/status` until the job is done and both workers are connected.
    fn wait_done(&self, job: u64, workers: usize) -> Result<Value> {
        let t0 = Instant::now();
        loop {
            let (code, _, body) = get(self.http, "/status")?;
            ensure!(code == 200, "/status answered {code}: {body}");
            let st: Value = serde_json::from_str(&body)?;
            let done = st["jobs"]
                .as_array()
                .and_then(|j| j.iter().find(|j| j["id"] == job))
                .is_some_and(|j| j["state"] == "done");
            let connected = st["workers"]
                .as_array()
                .map_or(0, |w| w.iter().filter(|w| w["connected"] == true).count());
            if done && connected == workers {
                return Ok(st);
            }
            if t0.elapsed() > PATIENCE {
                self.dump_logs();
                bail!("job {job} not done within {PATIENCE:?}: {st}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn dump_logs(&self) {
        for e in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!("--- {} (last lines)", p.display());
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// One `GET` over a fresh HTTP/1.1 connection: (status, content type, body).
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no end of headers")?;
    ensure!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "unexpected chunked body"
    );
    let code = head.split(' ').nth(1).context("no status code")?.parse()?;
    let ctype = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    Ok((code, ctype, body.to_string()))
}

/// Parses the exposition text with `prometheus_client.parser` and checks what the parser
/// lets pass but Prometheus conventions forbid: a family without HELP or TYPE (the parser
/// calls it `unknown`), a family twice, a counter sample not ending in `_total`, a histogram
/// whose buckets are not cumulative or whose `+Inf` bucket is not its count. Prints
/// `{family: {"type", "help", "samples": [[name, labels, value]]}}` as JSON; any problem is
/// an exception (exit status 1).
const PARSE_PY: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
text = open(sys.argv[1]).read()
out = {}
for f in text_string_to_metric_families(text):
    if f.name in out:
        raise SystemExit("family %s appears twice" % f.name)
    if f.type not in ("counter", "gauge", "histogram"):
        raise SystemExit("family %s has type %s (no # TYPE line?)" % (f.name, f.type))
    if not f.documentation:
        raise SystemExit("family %s has no # HELP" % f.name)
    if not f.samples:
        raise SystemExit("family %s has no samples" % f.name)
    for s in f.samples:
        if f.type == "counter" and not s.name.endswith("_total"):
            raise SystemExit("counter sample %s does not end in _total" % s.name)
    if f.type == "histogram":
        buckets = [(s.labels["le"], s.value) for s in f.samples if s.name.endswith("_bucket")]
        values = [v for _, v in buckets]
        if values != sorted(values) or buckets[-1][0] != "+Inf":
            raise SystemExit("histogram %s: buckets not cumulative or no +Inf: %r" % (f.name, buckets))
        count = [s.value for s in f.samples if s.name.endswith("_count")]
        if count != [buckets[-1][1]]:
            raise SystemExit("histogram %s: +Inf bucket %r is not the count %r" % (f.name, buckets[-1], count))
    out[f.name] = {"type": f.type, "help": f.documentation,
                   "samples": [[s.name, s.labels, s.value] for s in f.samples]}
json.dump(out, sys.stdout)
"#;

/// The Python with Debian's `python3-prometheus-client` (a pyenv shim on PATH may not see
/// Debian's dist-packages).
fn python() -> PathBuf {
    ["/usr/bin/python3", "/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// Families parsed by the real parser, or the parser's complaint.
fn parse_metrics(text: &str, dir: &Path) -> Result<BTreeMap<String, Value>> {
    let file = dir.join("metrics.txt");
    std::fs::write(&file, text)?;
    let out = Command::new(python())
        .args(["-c", PARSE_PY])
        .arg(&file)
        .output()
        .context("running python3 (install python3-prometheus-client)")?;
    ensure!(
        out.status.success(),
        "the Prometheus parser rejected /metrics: {}\n--- the text:\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The value of the sample `name` with exactly `labels`.
fn value(families: &BTreeMap<String, Value>, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    for f in families.values() {
        for s in f["samples"].as_array().into_iter().flatten() {
            let l = s[1].as_object().context("labels")?;
            if s[0] == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).and_then(Value::as_str) == Some(v))
            {
                return s[2].as_f64().context("value");
            }
        }
    }
    bail!("no sample {name}{labels:?}")
}

#[test]
fn metrics_parse_with_the_prometheus_parser_and_count_the_real_job() -> Result<()> {
    const TASKS: u32 = 4;
    let grid = Grid::start(2)?;
    let job = grid.submit_primes(TASKS)?;
    let status = grid.wait_done(job, 2)?;

    let (code, ctype, text) = get(grid.http, "/metrics")?;
    assert_eq!(code, 200, "{text}");
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    let m = parse_metrics(&text, grid.dir.path())?;
    eprintln!("parsed {} metric families", m.len());

    // Families and their types, as declared.
    for (family, kind) in [
        ("peergrid_jobs", "gauge"),
        ("peergrid_tasks", "gauge"),
        ("peergrid_replicas_in_flight", "gauge"),
        ("peergrid_replicas_reported", "counter"),
        ("peergrid_reports_judged", "counter"),
        ("peergrid_reports_rejected", "counter"),
        ("peergrid_tasks_contested", "gauge"),
        ("peergrid_workers_connected", "gauge"),
        ("peergrid_workers_known", "gauge"),
        ("peergrid_coordinator_blob_bytes_sent", "counter"),
        ("peergrid_peer_blob_bytes_estimate", "gauge"),
        ("peergrid_engine_queue_depth", "gauge"),
        ("peergrid_engine_queue_capacity", "gauge"),
        ("peergrid_engine_batches", "counter"),
        ("peergrid_engine_commands", "counter"),
        ("peergrid_store_commit_seconds", "histogram"),
    ] {
        let f = m
            .get(family)
            .with_context(|| format!("no family {family}"))?;
        assert_eq!(f["type"], kind, "{family}");
    }

    // The job: every task accepted by a quorum of 2, nothing pending or failed.
    let tasks = f64::from(TASKS);
    assert_eq!(value(&m, "peergrid_jobs", &[("state", "done")])?, 1.0);
    assert_eq!(value(&m, "peergrid_jobs", &[("state", "running")])?, 0.0);
    assert_eq!(
        value(&m, "peergrid_tasks", &[("state", "accepted")])?,
        tasks
    );
    assert_eq!(value(&m, "peergrid_tasks", &[("state", "pending")])?, 0.0);
    assert_eq!(value(&m, "peergrid_tasks", &[("state", "failed")])?, 0.0);
    assert_eq!(value(&m, "peergrid_replicas_in_flight", &[])?, 0.0);
    // Two workers agreed on every task: each agreeing report was judged valid.
    let valid = value(&m, "peergrid_reports_judged_total", &[("verdict", "valid")])?;
    assert_eq!(valid, 2.0 * tasks);
    assert_eq!(
        value(
            &m,
            "peergrid_reports_judged_total",
            &[("verdict", "invalid")]
        )?,
        0.0
    );
    let worker_valid: u64 = status["workers"]
        .as_array()
        .context("workers")?
        .iter()
        .map(|w| w["valid"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(valid, worker_valid as f64, "the same count as status");
    assert_eq!(
        value(&m, "peergrid_replicas_reported_total", &[])?,
        2.0 * tasks
    );
    assert_eq!(value(&m, "peergrid_reports_rejected_total", &[])?, 0.0);
    assert_eq!(value(&m, "peergrid_tasks_contested", &[])?, 0.0);

    // Both workers connected, in good standing (newcomers: no anchor before 10 results).
    let mut connected = 0.0;
    for s in ["newcomer", "anchor", "probation", "banned"] {
        connected += value(&m, "peergrid_workers_connected", &[("standing", s)])?;
    }
    assert_eq!(connected, 2.0);
    assert_eq!(
        value(&m, "peergrid_workers_connected", &[("standing", "banned")])?,
        0.0
    );
    assert_eq!(value(&m, "peergrid_workers_known", &[])?, 2.0);

    // The workers fetched the module from the coordinator: at least one copy of it.
    let module = std::fs::metadata(PRIMES_WASM)?.len() as f64;
    let coord_bytes = value(&m, "peergrid_coordinator_blob_bytes_sent_total", &[])?;
    assert!(
        coord_bytes >= module,
        "coordinator sent {coord_bytes} bytes, the module is {module}"
    );
    // The blob server counted every upload against the worker that took it.
    let (code, _, body) = get(grid.http, "/overview")?;
    assert_eq!(code, 200);
    let o: Value = serde_json::from_str(&body)?;
    let per_worker: u64 = o["workers"]
        .as_array()
        .context("workers")?
        .iter()
        .map(|w| w["blob_bytes_from_coordinator"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(per_worker as f64, coord_bytes, "{o}");
    // Whatever a worker holds of the module and did not get from the coordinator, a peer
    // gave it: at most one module's worth with two workers.
    let peers = value(&m, "peergrid_peer_blob_bytes_estimate", &[])?;
    assert!(peers <= module, "{peers}");

    // The engine committed batches, each timed; its inbox is idle now.
    let batches = value(&m, "peergrid_engine_batches_total", &[])?;
    assert!(batches >= 1.0);
    let commits = value(&m, "peergrid_store_commit_seconds_count", &[])?;
    assert!(
        commits >= batches,
        "{commits} commits timed, {batches} batches"
    );
    assert!(value(&m, "peergrid_store_commit_seconds_sum", &[])? > 0.0);
    assert!(value(&m, "peergrid_engine_commands_total", &[])? >= batches);
    assert!(value(&m, "peergrid_engine_queue_capacity", &[])? > 0.0);
    assert!(value(&m, "peergrid_engine_queue_depth", &[])? >= 0.0);

    // A broken exposition fails the same check loudly (the parser is really in the loop).
    let broken = text.replacen(
        "peergrid_jobs{state=\"done\"}",
        "peergrid_jobs{state=done}",
        1,
    );
    assert!(parse_metrics(&broken, grid.dir.path()).is_err());
    Ok(())
}

/// Headless Chromium, or `None` (with why) when it is not installed.
fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(name))
                    .find(|p| p.is_file())
            })
        });
    if found.is_none() {
        eprintln!("skipped: no chromium binary on PATH (apt-get install chromium)");
    }
    found
}

/// Run headless Chromium with `args` (plus a fresh profile), killed after `PATIENCE`.
fn run_chromium(bin: &Path, profile: &Path, args: &[String]) -> Result<String> {
    let mut child = Command::new(bin)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting chromium")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if t0.elapsed() > PATIENCE {
            let _ = child.kill();
            let _ = child.wait();
            bail!("chromium did not finish within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    ensure!(status.success(), "chromium failed ({status}): {err}");
    Ok(out)
}

#[test]
fn dashboard_in_headless_chromium_shows_the_job_its_progress_tasks_and_workers() -> Result<()> {
    let Some(bin) = chromium() else {
        return Ok(());
    };
    const TASKS: u32 = 4;
    let grid = Grid::start(2)?;
    let job = grid.submit_primes(TASKS)?;
    let status = grid.wait_done(job, 2)?;
    let url = format!("http://{}/", grid.http);

    // What the server sends holds none of it: the page's script fills everything in.
    let (code, ctype, page) = get(grid.http, "/")?;
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/html"), "{ctype}");
    assert!(!page.contains("primes-dashboard"));

    let profile = tempfile::tempdir()?;
    let dom = run_chromium(
        &bin,
        profile.path(),
        &[
            "--virtual-time-budget=5000".into(),
            "--dump-dom".into(),
            url.clone(),
        ],
    )?;
    std::fs::write(grid.dir.path().join("dom.html"), &dom)?;
    let row = |attr: &str| -> Option<&str> {
        let start = dom.find(attr)?;
        let end = dom[start..].find("</tr>")? + start;
        Some(&dom[start..end])
    };

    // The job's row: its name, state, progress bar full, all tasks accepted.
    let job_row = row(&format!("data-job=\"{job}\""))
        .with_context(|| format!("no row for job {job} in the rendered page:\n{dom}"))?;
    assert!(job_row.contains("primes-dashboard"), "{job_row}");
    assert!(job_row.contains(">done<"), "{job_row}");
    assert!(
        job_row.contains(&format!("aria-valuenow=\"{TASKS}\""))
            && job_row.contains(&format!("aria-valuemax=\"{TASKS}\"")),
        "{job_row}"
    );
    assert!(job_row.contains("100%"), "{job_row}");
    assert!(job_row.contains(&format!("{TASKS} / {TASKS}")), "{job_row}");
    // Its tasks (selected by default): each accepted with 2 of 2 agreeing, with its fuel.
    assert!(
        dom.contains(&format!("job {job} · primes-dashboard")),
        "tasks title"
    );
    for i in 0..TASKS {
        let t = row(&format!("data-task=\"{i}\""))
            .with_context(|| format!("no row for task {i}:\n{dom}"))?;
        assert!(t.contains(">accepted<") && t.contains("2 / 2"), "{t}");
        assert!(!t.contains(">–<"), "task {i} shows its fuel: {t}");
    }
    // The workers, by node id, connected, in good standing, credited.
    let workers = status["workers"].as_array().context("workers")?;
    assert_eq!(workers.len(), 2);
    for w in workers {
        let id = w["node_id"].as_str().context("node_id")?;
        let r = row(&format!("data-worker=\"{id}\""))
            .with_context(|| format!("no row for worker {id}:\n{dom}"))?;
        assert!(r.contains(">yes<") && r.contains(">newcomer<"), "{r}");
        assert!(
            r.contains(&format!("{:.3}", w["credit"].as_f64().unwrap_or(0.0))),
            "{r}"
        );
    }
    // The bytes chart drew both series from polled samples; the page says it is live.
    assert!(dom.contains("data-series=\"coord\"") && dom.contains("data-series=\"peer\""));
    assert!(dom.contains("live · updated"), "the poll succeeded");
    assert!(!dom.contains("not reachable"));

    // A screenshot, to look at.
    let shot = grid.dir.path().join("dashboard.png");
    run_chromium(
        &bin,
        profile.path(),
        &[
            "--virtual-time-budget=5000".into(),
            "--window-size=1280,900".into(),
            format!("--screenshot={}", shot.display()),
            url,
        ],
    )?;
    let png = std::fs::read(&shot).context("chromium wrote no screenshot")?;
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&keep, &png)?;
    eprintln!("dashboard screenshot: {}", keep.display());
    Ok(())
}

/// [`get`] off the async runtime's threads.
async fn aget(addr: SocketAddr, path: &str) -> Result<(u16, String, String)> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || get(addr, &path)).await?
}

async fn aget_json(addr: SocketAddr, path: &str) -> Result<(u16, Value)> {
    let (code, ctype, body) = aget(addr, path).await?;
    ensure!(
        ctype.starts_with("application/json"),
        "{path}: content type {ctype:?}"
    );
    Ok((code, serde_json::from_str(&body)?))
}

/// A disagreement, step by step over real QUIC with simulated workers: one of three reports
/// a different output for the only task. The task view, the overview and `/metrics` show the
/// contested task, the invalid verdict and the liar on probation; no view shows a digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contested_task_shows_in_tasks_overview_and_metrics() -> Result<()> {
    use common::simworker::{fuel_for, Options, Peer, SimWorker};
    use coordinator::client::Client;
    use coordinator::server::{Coordinator, ServeConfig};
    use tasks::wire::CoordMsg;

    let data = tempfile::tempdir()?;
    let jobdir = tempfile::tempdir()?;
    let mut cfg = ServeConfig::new(data.path(), "127.0.0.1:0".parse()?);
    cfg.http = Some("127.0.0.1:0".parse()?);
    // Partner replicas at once: the test decides who gets which replica.
    cfg.core.policy.partner_spread = 0;
    let coord = Coordinator::start(cfg).await?;
    let http = coord.http_addr.context("http_addr")?;

    std::fs::write(
        jobdir.path().join("m.wasm"),
        b"\0asm\x01\0\0\0 not really run",
    )?;
    std::fs::write(
        jobdir.path().join("job.toml"),
        "name = \"disputed\"\nmodule = \"m.wasm\"\nquorum = 2\nmax_replicas = 4\ndeadline_secs = 600\n[[task]]\nargs = [\"t0\"]\n",
    )?;
    let client = Client::connect(&coord.ticket, &coord.token).await?;
    let (job, _) = client
        .submit(&tasks::JobSpec::from_file(&jobdir.path().join("job.toml"))?)
        .await?;
    let opts = || Options {
        peer: Peer::None,
        ..Options::default()
    };
    let mut honest = SimWorker::join_with(&coord.ticket, opts()).await?;
    let mut liar = SimWorker::join_with(&coord.ticket, opts()).await?;
    let mut third = SimWorker::join_with(&coord.ticket, opts()).await?;

    let first = honest.work(4).await?;
    assert_eq!(first.len(), 1);
    let lie = liar.request(4).await?;
    assert_eq!(lie.len(), 1, "the partner replica");
    let ack = liar
        .report_output(
            lie[0].replica,
            b"a different answer\n".to_vec(),
            fuel_for(&lie[0]),
        )
        .await?;
    assert!(matches!(ack, CoordMsg::Ack { .. }), "{ack:?}");

    // Undecided and contested: one report each way.
    let (code, page) = aget_json(http, &format!("/jobs/{job}/tasks")).await?;
    assert_eq!(code, 200);
    let t = &page["tasks"][0];
    assert_eq!(
        (
            &t["state"],
            &t["reported"],
            &t["agreeing"],
            &t["disagreeing"],
            &t["contested"]
        ),
        (
            &Value::from("pending"),
            &Value::from(2),
            &Value::from(1),
            &Value::from(1),
            &Value::Bool(true)
        ),
        "{page}"
    );
    assert_eq!(t["fuel_used"], Value::Null, "no accepted result yet");

    // A third report settles it.
    let settle = third.work(4).await?;
    assert_eq!(settle.len(), 1, "a third replica for the contested task");
    let (_, page) = aget_json(http, &format!("/jobs/{job}/tasks")).await?;
    let t = &page["tasks"][0];
    assert_eq!(t["state"], "accepted", "{page}");
    assert_eq!(
        (
            &t["replicas"],
            &t["agreeing"],
            &t["disagreeing"],
            &t["quorum"]
        ),
        (
            &Value::from(3),
            &Value::from(2),
            &Value::from(1),
            &Value::from(2)
        )
    );
    assert_eq!(t["contested"], true);
    assert_eq!(t["fuel_used"].as_u64(), Some(fuel_for(&first[0])));
    let text = page.to_string();
    assert!(
        !text.contains("hash") && !text.contains("digest") && !text.contains("output"),
        "public task view leaks results: {text}"
    );

    let (code, o) = aget_json(http, "/overview").await?;
    assert_eq!(code, 200);
    assert_eq!(
        (o["verdicts_valid"].as_u64(), o["verdicts_invalid"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(o["jobs"][0]["tasks_contested"], 1);
    assert_eq!(o["jobs"][0]["tasks_pending"], 0);
    assert_eq!(o["jobs"][0]["name"], "disputed");
    let standing = |id: tasks::NodeId| -> Option<String> {
        o["workers"].as_array()?.iter().find_map(|w| {
            (w["node_id"] == id.to_string()).then(|| w["standing"].as_str().map(String::from))?
        })
    };
    assert_eq!(standing(liar.id()).as_deref(), Some("probation"));
    assert_eq!(standing(honest.id()).as_deref(), Some("newcomer"));
    assert_eq!(standing(third.id()).as_deref(), Some("newcomer"));

    let (code, _, metrics) = aget(http, "/metrics").await?;
    assert_eq!(code, 200);
    let dir = tempfile::tempdir()?;
    let m = parse_metrics(&metrics, dir.path())?;
    assert_eq!(value(&m, "peergrid_tasks_contested", &[])?, 1.0);
    assert_eq!(
        value(
            &m,
            "peergrid_reports_judged_total",
            &[("verdict", "invalid")]
        )?,
        1.0
    );
    assert_eq!(
        value(&m, "peergrid_reports_judged_total", &[("verdict", "valid")])?,
        2.0
    );
    assert_eq!(
        value(
            &m,
            "peergrid_workers_connected",
            &[("standing", "probation")]
        )?,
        1.0
    );
    assert_eq!(
        value(
            &m,
            "peergrid_workers_connected",
            &[("standing", "newcomer")]
        )?,
        2.0
    );
    assert_eq!(value(&m, "peergrid_tasks", &[("state", "accepted")])?, 1.0);

    // Tasks pages: a slice, a bad query, an unknown job.
    let (code, _) = aget_json(http, &format!("/jobs/{job}/tasks?offset=1&limit=5")).await?;
    assert_eq!(code, 200);
    let (code, e) = aget_json(http, &format!("/jobs/{job}/tasks?limit=lots")).await?;
    assert_eq!(code, 400, "{e}");
    let (code, _) = aget_json(http, "/jobs/999/tasks").await?;
    assert_eq!(code, 404);

    client.close().await;
    coord.shutdown().await?;
    Ok(())
}

/// Why a task failed reaches the dashboard: `/jobs/ID/tasks` carries the outcome and the
/// stderr tail the workers sent, and the page shows them in the task's row (Chromium).
#[test]
fn a_failed_tasks_outcome_and_stderr_show_on_the_dashboard() -> Result<()> {
    let grid = Grid::start(2)?;
    // Task 0 ends ok; task 1 writes two lines to stderr and exits 2.
    let module = wat::parse_str(common::FAILING_WAT)?;
    let job = grid.submit(
        &module,
        "name = \"failing\"\nmodule = \"primes.wasm\"\nquorum = 2\nmax_replicas = 4\n\
         fuel = 10_000_000\nmemory_mb = 16\nmax_output = 64\ndeadline_secs = 600\n\
         [[task]]\nargs = []\n[[task]]\nargs = [\"a\"]\n",
    )?;
    grid.wait_done(job, 2)?;
    // The stderr follows its report: wait for it to be stored.
    let t0 = Instant::now();
    let tasks = loop {
        let (code, _, body) = get(grid.http, &format!("/jobs/{job}/tasks"))?;
        ensure!(code == 200, "/jobs/{job}/tasks answered {code}: {body}");
        let v: Value = serde_json::from_str(&body)?;
        let tasks = v["tasks"].as_array().context("tasks")?.clone();
        if tasks.get(1).is_some_and(|t| t.get("stderr").is_some()) {
            break tasks;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "no stderr for task 1: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(tasks[0].get("failure").is_none(), "{tasks:?}");
    assert_eq!(tasks[1]["failure"], "exit 2", "{tasks:?}");
    assert_eq!(
        tasks[1]["stderr"], "reading input\nerror: bad input, giving up\n",
        "{tasks:?}"
    );
    let Some(bin) = chromium() else {
        return Ok(());
    };
    let profile = tempfile::tempdir()?;
    let dom = run_chromium(
        &bin,
        profile.path(),
        &[
            "--virtual-time-budget=5000".into(),
            "--dump-dom".into(),
            format!("http://{}/", grid.http),
        ],
    )?;
    let start = dom
        .find("data-task=\"1\"")
        .with_context(|| format!("no row for task 1:\n{dom}"))?;
    let end = dom[start..].find("</tr>").context("row end")? + start;
    let row = &dom[start..end];
    assert!(row.contains("exit 2"), "{row}");
    assert!(row.contains("error: bad input, giving up"), "{row}");
    Ok(())
}
