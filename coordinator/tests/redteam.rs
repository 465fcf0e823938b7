//! Red team (issue 17, "an open pool"): joining as a worker is open, so every worker message
//! is hostile input. Each test is one attack by a hostile client speaking the real protocol
//! over real QUIC against a real coordinator (in-process, or the `coordinator serve` binary),
//! and asserts the grid holds.
//!
//! Prints one `FAULT|redteam|<attack>|<what happened>|<target>|<met yes/no>` line per attack
//! for FAULTS.md. No test depends on machine speed: waits are for observable states, with
//! generous hang guards.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use common::simworker::{fingerprint, output_for, result_of, Options, SimWorker, PATIENCE};
use coordinator::client::{Client, ClientError};
use coordinator::server::{Coordinator, RunningCoordinator, ServeConfig};
use tasks::net;
use tasks::wire::{self, Assignment, CoordMsg, ErrorCode, WorkerMsg, ALPN_BLOB, ALPN_COORD};
use tasks::{BlobId, JobSpec, NodeKey, Ticket};

fn fault(attack: &str, happened: &str, target: &str, met: bool) {
    println!(
        "FAULT|redteam|{attack}|{happened}|{target}|{}",
        if met { "yes" } else { "no" }
    );
}

/// A red-team worker claiming `slots`, serving blobs: the shared [`SimWorker`] introducing
/// itself as `redteam`, claiming 1 000 000 fuel per task.
async fn join(ticket: &Ticket, slots: u32) -> anyhow::Result<SimWorker> {
    join_holding(ticket, slots, vec![]).await
}

/// [`join`], announcing it holds `blobs`.
async fn join_holding(
    ticket: &Ticket,
    slots: u32,
    blobs: Vec<BlobId>,
) -> anyhow::Result<SimWorker> {
    let opts = Options {
        agent: "redteam".into(),
        fingerprint: fingerprint("redteam"),
        slots,
        blobs,
        fuel: |_| 1_000_000,
        ..Options::default()
    };
    SimWorker::join_with(ticket, opts).await
}

async fn start_with(
    dir: &std::path::Path,
    f: impl FnOnce(&mut ServeConfig),
) -> anyhow::Result<RunningCoordinator> {
    let listen: SocketAddr = "127.0.0.1:0".parse()?;
    let mut cfg = ServeConfig::new(dir, listen);
    f(&mut cfg);
    Coordinator::start(cfg).await
}

/// A job directory with a (never executed) module and `n` tasks.
fn job_file(dir: &std::path::Path, n: usize, extra: &str) -> anyhow::Result<JobSpec> {
    std::fs::write(dir.join("m.wasm"), b"\0asm\x01\0\0\0 redteam")?;
    let toml = format!(
        "name = \"redteam\"\nmodule = \"m.wasm\"\nquorum = 2\nmax_replicas = 6\ndeadline_secs = 600\n{extra}[tasks]\ncount = {n}\nargs = [\"t{{i}}\"]\n"
    );
    std::fs::write(dir.join("job.toml"), toml)?;
    Ok(JobSpec::from_file(&dir.join("job.toml"))?)
}

async fn wait_for<T, F, Fut>(mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(t) = f().await? {
            return Ok(t);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 1a. A job with absurd numbers (`deadline_secs = i64::MAX` and friends) or an absurd name
/// (a control character, 100 KB) is refused at submission with a one-line error naming the
/// key and its limit; the coordinator keeps
/// serving (it used to accept it, then its engine overflowed on the first work request and
/// the process lingered answering "coordinator is shutting down").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_job_numbers_are_refused_at_submit_and_the_coordinator_keeps_serving(
) -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let jobdir = tempfile::tempdir()?;
    let coord = start_with(data.path(), |_| {}).await?;
    let client = Client::connect(&coord.ticket, &coord.token).await?;
    let spec = job_file(jobdir.path(), 2, "")?;
    let (manifest, blobs) = spec.load_blobs()?;
    let big = 9_223_372_036_854_775_807u64;
    type Edit = fn(&mut tasks::JobManifest, u64);
    let cases: [(&str, Edit); 4] = [
        ("deadline_secs", |m, v| m.limits.deadline_secs = v),
        ("fuel", |m, v| m.limits.fuel = v),
        ("max_output", |m, v| m.limits.max_output = v),
        ("memory_mb", |m, v| m.limits.memory_mb = v as u32),
    ];
    let mut refused = 0;
    for (key, edit) in cases {
        let mut m = manifest.clone();
        edit(
            &mut m,
            if key == "memory_mb" {
                u32::MAX as u64
            } else {
                big
            },
        );
        match client.submit_manifest(m, &blobs).await {
            Err(ClientError::Server {
                code: ErrorCode::BadRequest,
                message,
            }) if message.contains(key)
                && ["limit", "between", "at most"]
                    .iter()
                    .any(|s| message.contains(s))
                && !message.contains('\n') =>
            {
                refused += 1
            }
            other => anyhow::bail!("{key} = absurd: {other:?}"),
        }
    }
    // Names: argv[0] of every task and a column of `status`. A newline would forge a log or
    // status line; 100 KB would ride along with every task.
    let names = [
        (
            "control character",
            "redteam\n2026-12-04T00:00:00Z INFO forged".to_string(),
        ),
        ("above the limit", "n".repeat(100_000)),
    ];
    for (why, name) in names {
        let mut m = manifest.clone();
        m.name = name;
        match client.submit_manifest(m, &blobs).await {
            Err(ClientError::Server {
                code: ErrorCode::BadRequest,
                message,
            }) if message.contains("name") && message.contains(why) && !message.contains('\n') => {
                refused += 1
            }
            other => anyhow::bail!("name with a {why}: {other:?}"),
        }
    }
    // Still alive: a worker gets work from a sane job, the submitter gets status.
    let (job, _) = client.submit(&spec).await?;
    let mut w = join(&coord.ticket, 1).await?;
    let got = w.request(1).await?;
    let alive = got.len() == 1 && client.status(Some(job)).await.is_ok();
    fault(
        "absurd job numbers (deadline_secs=i64::MAX, fuel, max_output, memory_mb) and names (a newline, 100 KB)",
        &format!("{refused}/6 refused at submit with a one-line error; coordinator still serving: {alive}"),
        "all refused, engine alive",
        refused == 6 && alive,
    );
    assert_eq!(refused, 6);
    assert!(alive);
    client.close().await;
    coord.shutdown().await?;
    Ok(())
}

/// 1b. A dead engine (here: its store fails, because another process holds the database's
/// write lock past the busy timeout) ends `coordinator serve` with a clear error and a
/// non-zero exit, so a supervisor restarts it, instead of a zombie that keeps its port.
#[test]
fn a_dead_engine_ends_coordinator_serve_with_an_error_and_nonzero_exit() -> anyhow::Result<()> {
    let mut c = common::Cluster::start(0);
    let db = c.data().join(coordinator::store::SqliteStore::FILE);
    let lock = rusqlite::Connection::open(&db)?;
    lock.busy_timeout(PATIENCE)?;
    lock.execute_batch("BEGIN EXCLUSIVE")?;
    let jobdir = tempfile::tempdir()?;
    let spec = job_file(jobdir.path(), 2, "")?;
    let ticket: Ticket = c.ticket.parse()?;
    let rt = tokio::runtime::Runtime::new()?;
    // Creating a job must commit: the engine's transaction times out on the lock.
    let submitted = rt.block_on(async {
        let client = Client::connect(&ticket, &c.token).await?;
        let r = client.submit(&spec).await;
        client.close().await;
        anyhow::Ok(r)
    })?;
    anyhow::ensure!(submitted.is_err(), "a job was created without a commit");
    let proc = c.coord.as_mut().expect("started");
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = proc.child.try_wait()? {
            break Some(s);
        }
        if t0.elapsed() > PATIENCE {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    lock.execute_batch("ROLLBACK")?;
    let logs = c.coordinator_logs();
    let err_line = logs
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or("")
        .to_string();
    let exited_nonzero = status.is_some_and(|s| !s.success());
    fault(
        "engine dies (store error) under `coordinator serve`",
        &format!("process exited: {status:?}; last words: {err_line:?}"),
        "exits non-zero with a clear error",
        exited_nonzero && err_line.contains("store"),
    );
    assert!(exited_nonzero, "serve did not exit: {status:?}\n{logs}");
    assert!(err_line.contains("store"), "no clear error line:\n{logs}");
    Ok(())
}

/// Job counters from `status`.
async fn job_status(client: &Client, job: tasks::JobId) -> anyhow::Result<wire::JobStatus> {
    let s = client.status(Some(job)).await?;
    s.jobs.into_iter().next().context("no job in status")
}

async fn credit_of(client: &Client, node: tasks::NodeId) -> anyhow::Result<(f64, u64)> {
    let s = client.status(None).await?;
    Ok(s.workers
        .iter()
        .find(|w| w.node_id == node)
        .map_or((0.0, 0), |w| (w.credit, w.valid)))
}

/// 4. Unchecked claims: a report claiming more fuel than the job allows or a longer output
/// than `max_output` is rejected with a clear reason; a late report for a replica that was
/// abandoned and reissued earns no credit or trust.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inflated_claims_and_late_reports_after_reissue_earn_nothing() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let jobdir = tempfile::tempdir()?;
    let coord = start_with(data.path(), |_| {}).await?;
    let client = Client::connect(&coord.ticket, &coord.token).await?;
    let (job, _) = client
        .submit(&job_file(jobdir.path(), 1, "fuel = 5000000\n")?)
        .await?;
    let mut liar = join(&coord.ticket, 1).await?;
    let a = liar.request(1).await?.remove(0);
    let out = output_for(&a);
    let mut refused = Vec::new();
    // Fuel beyond the job's budget (credit is fuel: this is a credit theft).
    let m = liar
        .report_raw(a.replica, result_of(&out, u64::MAX), Some(out.clone()))
        .await?;
    refused.push(matches!(&m, CoordMsg::Rejected { reason, .. } if reason.contains("fuel_used")));
    // An output longer than max_output (the coordinator would fetch it).
    let mut r = result_of(&out, 1_000_000);
    r.output_len = u64::MAX;
    let m = liar.report_raw(a.replica, r, None).await?;
    refused.push(matches!(&m, CoordMsg::Rejected { reason, .. } if reason.contains("output_len")));
    // Abandon it, let an honest worker take it over, then report late.
    liar.send(&WorkerMsg::Abandon {
        replicas: vec![a.replica],
    })
    .await?;
    liar.request(0).await?; // answered after the abandon was committed
    let mut honest = join(&coord.ticket, 1).await?;
    let b = honest.request(1).await?;
    anyhow::ensure!(b.len() == 1 && b[0].task.id == a.task.id, "reissued: {b:?}");
    let m = liar.report(&a).await?;
    refused.push(matches!(&m, CoordMsg::Rejected { reason, .. } if reason.contains("reissued")));
    let (credit, valid) = credit_of(&client, liar.id()).await?;
    let st = job_status(&client, job).await?;
    let met = refused.iter().all(|x| *x) && credit == 0.0 && valid == 0;
    fault(
        "inflated fuel_used / output_len, late report after abandon+reissue",
        &format!(
            "refused {}/3 ({refused:?}); liar credit {credit}, valid {valid}; task still pending: {}",
            refused.iter().filter(|x| **x).count(),
            st.tasks_done == 0
        ),
        "all refused, no credit or trust",
        met,
    );
    assert!(met, "{refused:?} credit {credit} valid {valid}");
    client.close().await;
    coord.shutdown().await?;
    Ok(())
}

/// 2. Self-declared capacity: a worker claiming `u32::MAX` slots gets a newcomer's small
/// allowance, which grows only with valid results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_slots_do_not_buy_capacity_delivered_results_do() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let jobdir = tempfile::tempdir()?;
    let coord = start_with(data.path(), |_| {}).await?;
    let client = Client::connect(&coord.ticket, &coord.token).await?;
    let policy = coordinator::core::trust::TrustPolicy::default();
    let n = policy.new_in_flight as usize;
    client.submit(&job_file(jobdir.path(), n, "")?).await?;
    let mut greedy = join(&coord.ticket, u32::MAX).await?;
    let first = greedy.request(u32::MAX).await?;
    // An honest partner completes the quorums; both deliver.
    let mut partner = join(&coord.ticket, 4).await?;
    let mut partner_work = Vec::new();
    while partner_work.len() < first.len() {
        let got = partner.request(64).await?;
        anyhow::ensure!(!got.is_empty(), "the partner got no work");
        partner_work.extend(got);
    }
    for a in &first {
        anyhow::ensure!(matches!(greedy.report(a).await?, CoordMsg::Ack { .. }));
    }
    for a in &partner_work {
        anyhow::ensure!(matches!(partner.report(a).await?, CoordMsg::Ack { .. }));
    }
    let jobdir2 = tempfile::tempdir()?;
    client.submit(&job_file(jobdir2.path(), 500, "")?).await?;
    let second = greedy.request(u32::MAX).await?;
    let grown = policy.new_in_flight as usize + first.len() * policy.in_flight_per_valid as usize;
    let met = first.len() == n && second.len() == grown;
    fault(
        "Hello with slots = u32::MAX, then asks for 256 at a time",
        &format!(
            "got {} as a newcomer, {} after {} valid results",
            first.len(),
            second.len(),
            first.len()
        ),
        &format!("newcomer {n}, then {grown} (grows with results)"),
        met,
    );
    assert!(met, "first {} second {}", first.len(), second.len());
    client.close().await;
    coord.shutdown().await?;
    Ok(())
}

/// 3. Free losses: one worker taking a task and abandoning it over and over (it used to get
/// it back each time, and six losses failed the task) cannot fail it: its losses count once.
/// Every loss costs it capacity; honest workers then finish everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoning_over_and_over_fails_no_task_and_costs_the_worker_capacity() -> anyhow::Result<()>
{
    let data = tempfile::tempdir()?;
    let coord = start_with(data.path(), |_| {}).await?;
    let client = Client::connect(&coord.ticket, &coord.token).await?;
    // quorum 2, max_replicas 6: before the fix, six abandonments by one worker failed it.
    let dir_a = tempfile::tempdir()?;
    let (job_a, _) = client.submit(&job_file(dir_a.path(), 1, "")?).await?;
    let mut saboteur = join(&coord.ticket, 64).await?;
    let mut taken = 0;
    for _ in 0..12 {
        let got = saboteur.request(256).await?;
        taken += got.len();
        if got.is_empty() {
            continue;
        }
        saboteur
            .send(&WorkerMsg::Abandon {
                replicas: got.iter().map(|a| a.replica).collect(),
            })
            .await?;
    }
    let failed_after_attack = job_status(&client, job_a).await?.tasks_failed;
    // Its capacity after the losses, on a fresh job with plenty of work.
    let dir_b = tempfile::tempdir()?;
    let (job_b, _) = client.submit(&job_file(dir_b.path(), 12, "")?).await?;
    let grant = saboteur.request(256).await?;
    saboteur
        .send(&WorkerMsg::Abandon {
            replicas: grant.iter().map(|a| a.replica).collect(),
        })
        .await?;
    saboteur.request(0).await?;
    // Two honest workers finish both jobs.
    let mut h1 = join(&coord.ticket, 4).await?;
    let mut h2 = join(&coord.ticket, 4).await?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let (a, b) = loop {
        for h in [&mut h1, &mut h2] {
            for x in h.request(8).await? {
                h.report(&x).await?;
            }
        }
        let (a, b) = (
            job_status(&client, job_a).await?,
            job_status(&client, job_b).await?,
        );
        if a.state != wire::JobState::Running && b.state != wire::JobState::Running {
            break (a, b);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "jobs never ended: {a:?} {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let met = failed_after_attack == 0
        && grant.len() <= 1
        && a.state == wire::JobState::Done
        && b.state == wire::JobState::Done;
    fault(
        "take-and-abandon one task 12 times (quorum 2, max_replicas 6), one identity",
        &format!(
            "took it {taken} times; failed by the attack: {failed_after_attack}; then granted {} of 12 fresh tasks; jobs then {:?}/{:?}",
            grant.len(),
            a.state,
            b.state
        ),
        "no task failed; capacity shrinks to 1",
        met,
    );
    assert!(met);
    client.close().await;
    coord.shutdown().await?;
    Ok(())
}

/// 7. Resource limits on the QUIC layer: a connection that never says Hello is closed; no
/// uni-stream can be opened; one address gets at most `MAX_CONNECTIONS_PER_IP` connections
/// at once (and a new one once it closes one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_uni_streams_and_connection_floods_are_bounded() -> anyhow::Result<()> {
    use tasks::limits;
    let data = tempfile::tempdir()?;
    let coord = start_with(data.path(), |_| {}).await?;
    let addr = coord.ticket.socket_addrs()?[0];
    let id = coord.ticket.node_id;
    // a. Connect on the worker ALPN and say nothing.
    let ep = net::endpoint(&NodeKey::generate(), "127.0.0.1:0".parse()?, &[])?;
    let silent = net::connect(&ep, addr, id, ALPN_COORD).await?;
    let t0 = std::time::Instant::now();
    let closed = tokio::time::timeout(PATIENCE, silent.closed()).await;
    let silent_closed = closed.is_ok();
    let after = t0.elapsed();
    // b. A uni-stream is never granted (the coordinator allows none).
    let conn = net::connect(&ep, addr, id, ALPN_BLOB).await?;
    let uni = tokio::time::timeout(Duration::from_secs(2), conn.open_uni()).await;
    let uni_refused = uni.is_err();
    // c. A flood of connections from one address (127.0.0.2: the coordinator's own address
    // is exempt).
    let flood_ep = net::endpoint(&NodeKey::generate(), "127.0.0.2:0".parse()?, &[])?;
    let mut held = Vec::new();
    for _ in 0..limits::MAX_CONNECTIONS_PER_IP {
        held.push(net::connect(&flood_ep, addr, id, ALPN_BLOB).await?);
    }
    let over = net::connect(&flood_ep, addr, id, ALPN_BLOB).await;
    // An established connection may still be refused after the handshake completes on our
    // side: look at whether it is closed.
    let over_refused = match over {
        Err(_) => true,
        Ok(c) => tokio::time::timeout(PATIENCE, c.closed()).await.is_ok(),
    };
    net::close(&held.pop().expect("held"), wire::CloseCode::Done, "bye");
    let reopened = wait_for(|| async {
        Ok(match net::connect(&flood_ep, addr, id, ALPN_BLOB).await {
            Ok(c) => {
                // Refused connections close at once; an accepted one stays up.
                let closed = tokio::time::timeout(Duration::from_millis(500), c.closed()).await;
                closed.is_err().then_some(c)
            }
            Err(_) => None,
        })
    })
    .await
    .is_ok();
    let met = silent_closed && uni_refused && over_refused && reopened;
    fault(
        "silent connection, uni-stream, connection flood from one IP",
        &format!(
            "silent conn closed: {silent_closed} (after {:.1}s; limit {:?}); uni-stream granted: {}; connection {} from one IP refused: {over_refused}; one more after closing one: {reopened}",
            after.as_secs_f64(),
            limits::HELLO_TIMEOUT,
            !uni_refused,
            limits::MAX_CONNECTIONS_PER_IP + 1
        ),
        "all bounded",
        met,
    );
    assert!(met);
    drop(held);
    coord.shutdown().await?;
    Ok(())
}

/// 5. Unverified accusations: `BadPeer` from a worker that holds no assignment needing the
/// blob, or from one worker alone, never delists an honest holder; a second, independent
/// accuser (also handed that holder for that blob) does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_alone_cannot_delist_an_honest_blob_holder() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let jobdir = tempfile::tempdir()?;
    let coord = start_with(data.path(), |_| {}).await?;
    let client = Client::connect(&coord.ticket, &coord.token).await?;
    let spec = job_file(jobdir.path(), 20, "")?;
    let module = spec.load_blobs()?.0.module.id;
    client.submit(&spec).await?;
    let holder = join_holding(&coord.ticket, 1, vec![module]).await?;
    let lists_holder = |a: &Assignment| a.peers.iter().any(|p| p.node_id == holder.id());
    let mut liar = join(&coord.ticket, 1).await?;
    let mut bystander = join(&coord.ticket, 1).await?;
    let accuse = WorkerMsg::BadPeer {
        peer: holder.id(),
        blob: module,
    };
    // Without an assignment: ignored.
    bystander.send(&accuse).await?;
    bystander.request(0).await?;
    // With one, repeatedly: one accuser.
    let given = liar.request(1).await?;
    anyhow::ensure!(given.len() == 1 && lists_holder(&given[0]), "{given:?}");
    for _ in 0..5 {
        liar.send(&accuse).await?;
    }
    liar.request(0).await?;
    let mut second = join(&coord.ticket, 1).await?;
    let s = second.request(1).await?;
    let still_listed = s.len() == 1 && lists_holder(&s[0]);
    // A second, independent accuser that was handed the holder: delisted.
    second.send(&accuse).await?;
    second.request(0).await?;
    let mut third = join(&coord.ticket, 1).await?;
    let t = third.request(1).await?;
    let delisted = t.len() == 1 && !lists_holder(&t[0]);
    let met = still_listed && delisted;
    fault(
        "BadPeer against an honest holder: bystander, then one accuser 5 times, then a second",
        &format!("holder still listed after the lone accuser: {still_listed}; delisted after a second accuser: {delisted}"),
        "one worker alone never delists",
        met,
    );
    assert!(met);
    client.close().await;
    coord.shutdown().await?;
    Ok(())
}

/// 6. Quorum capture: two identities of one operator ask for work in step (B right after A)
/// among honest workers; B used to get the partner replica of each of A's tasks. Now who
/// gets a partner replica is the coordinator's seeded random choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_asking_in_step_do_not_capture_quorums() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let jobdir = tempfile::tempdir()?;
    let coord = start_with(data.path(), |_| {}).await?;
    let client = Client::connect(&coord.ticket, &coord.token).await?;
    let (job, _) = client.submit(&job_file(jobdir.path(), 60, "")?).await?;
    let mut ws = Vec::new();
    for _ in 0..5 {
        ws.push(join(&coord.ticket, 1).await?);
    }
    let (a, b) = (ws[0].id(), ws[1].id());
    let mut holders: std::collections::BTreeMap<tasks::TaskId, Vec<tasks::NodeId>> =
        Default::default();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        for w in ws.iter_mut() {
            for x in w.request(1).await? {
                holders.entry(x.task.id).or_default().push(w.id());
                w.report(&x).await?;
            }
        }
        let st = job_status(&client, job).await?;
        if st.state != wire::JobState::Running {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "job never ended: {st:?}"
        );
    }
    let of_a = holders.values().filter(|h| h.contains(&a)).count();
    let paired = holders
        .values()
        .filter(|h| h.contains(&a) && h.contains(&b))
        .count();
    let met = of_a > 0 && paired * 3 < of_a;
    fault(
        "two identities asking in step (A then B) among 3 honest workers",
        &format!("B shared {paired} of A's {of_a} tasks"),
        "< 1/3 (no systematic pairing)",
        met,
    );
    assert!(met, "B shared {paired} of A's {of_a} tasks");
    client.close().await;
    coord.shutdown().await?;
    Ok(())
}

/// 7. Hello claims the coordinator would keep: an agent or engine fingerprint longer than
/// `MAX_HELLO_TEXT` is refused, and one client inventing a new engine fingerprint per Hello
/// stops at `MAX_ENGINE_FINGERPRINTS` (the table of engines is kept for good), while workers
/// of a known engine still join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_text_and_invented_engine_fingerprints_are_bounded() -> anyhow::Result<()> {
    use tasks::limits::{MAX_ENGINE_FINGERPRINTS, MAX_HELLO_TEXT};
    let data = tempfile::tempdir()?;
    let coord = start_with(data.path(), |_| {}).await?;
    let long = SimWorker::join_with(
        &coord.ticket,
        Options {
            agent: "x".repeat(MAX_HELLO_TEXT + 1),
            ..Options::default()
        },
    )
    .await;
    let long_refused = long.is_err();
    // One identity, reconnecting with a fresh fingerprint each time.
    let key = NodeKey::generate();
    let mut joined = 0usize;
    let mut refused_at = None;
    for i in 0..MAX_ENGINE_FINGERPRINTS + 8 {
        let o = Options {
            key: key.clone(),
            fingerprint: fingerprint(&format!("invented {i}")),
            // (Its hello's engine is the claim under test; a native one would be a second.)
            native: false,
            ..Options::default()
        };
        match SimWorker::join_with(&coord.ticket, o).await {
            Ok(w) => {
                joined += 1;
                w.conn.close(0u32.into(), b"next");
            }
            Err(_) => {
                refused_at = Some(i);
                break;
            }
        }
    }
    // A known engine still joins.
    let known = SimWorker::join_with(
        &coord.ticket,
        Options {
            fingerprint: fingerprint("invented 0"),
            native: false,
            ..Options::default()
        },
    )
    .await
    .is_ok();
    let met = long_refused && refused_at == Some(MAX_ENGINE_FINGERPRINTS) && known;
    fault(
        "Hello with a 257-byte agent; one identity inventing a new engine fingerprint per Hello",
        &format!(
            "long agent refused: {long_refused}; invented fingerprints accepted: {joined}, refused from the {}th on; a worker of a known engine joins after: {known}",
            refused_at.map_or("(never)".into(), |i| (i + 1).to_string())
        ),
        &format!("long text refused; at most {MAX_ENGINE_FINGERPRINTS} engines kept; known engines unaffected"),
        met,
    );
    assert!(met);
    coord.shutdown().await?;
    Ok(())
}

/// 8. An invented engine: results are compared only within an engine class, so colluders
/// claiming an engine of their own would be compared only with each other. A coordinator
/// configured as `serve` is by default (this release's engine only) refuses them with a
/// line saying why; and a worker claiming another architecture stays in the class of this
/// release's portable settings, so its results are still compared with everyone's, while
/// `native` jobs (compared within one architecture) go only to workers of the
/// architectures the coordinator names, by default its own: a rare architecture claimed by
/// colluders is no class of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_engines_are_refused_and_another_arch_is_still_compared() -> anyhow::Result<()> {
    use tasks::release;
    let data = tempfile::tempdir()?;
    let jobdir = tempfile::tempdir()?;
    let coord = start_with(data.path(), |c| {
        c.core.engines = Some(vec![release::ENGINE.to_string()]);
    })
    .await?;
    let invented = SimWorker::join_with(&coord.ticket, Options::default()).await;
    let invented_refused = invented.is_err();
    let why = invented.err().map(|e| format!("{e:#}")).unwrap_or_default();
    let release_fp = |arch: &str| tasks::EngineFingerprint {
        engine: release::ENGINE.into(),
        arch: arch.into(),
        settings: release::settings(true),
    };
    let mut a = SimWorker::join_with(
        &coord.ticket,
        Options {
            fingerprint: release_fp(&release::native_arch()),
            ..Options::default()
        },
    )
    .await?;
    let mut b = SimWorker::join_with(
        &coord.ticket,
        Options {
            fingerprint: release_fp("riscv64-linux"),
            ..Options::default()
        },
    )
    .await?;
    let client = Client::connect(&coord.ticket, &coord.token).await?;
    let (job, _) = client
        .submit(&job_file(jobdir.path(), 1, "determinism = \"portable\"\n")?)
        .await?;
    for w in [&mut a, &mut b] {
        for x in w.request(1).await? {
            w.report(&x).await?;
        }
    }
    let st = wait_for(|| async {
        let st = job_status(&client, job).await?;
        Ok((st.state != wire::JobState::Running).then_some(st))
    })
    .await?;
    let compared = st.tasks_done == 1;
    // A native job: the riscv64 claim gets none of it, the worker of this machine's
    // architecture does.
    let (_, _) = client.submit(&job_file(jobdir.path(), 1, "")?).await?;
    let to_riscv = b.request(4).await?.len();
    let to_native_arch = a.request(4).await?.len();
    let native_kept = to_riscv == 0 && to_native_arch == 1;
    let met = invented_refused && compared && native_kept;
    fault(
        "worker claiming an engine of its own; worker claiming another architecture",
        &format!(
            "invented engine refused: {invented_refused} ({why}); x86_64 and riscv64 claims of this release agreed on a portable task and it was accepted: {compared}; replicas of a native job handed to the riscv64 claim: {to_riscv}, to the worker of the coordinator's architecture: {to_native_arch}"
        ),
        "invented engines refused; architecture claims do not split the portable class and make no native class of their own",
        met,
    );
    assert!(met, "{st:?} / {why}");
    client.close().await;
    coord.shutdown().await?;
    Ok(())
}
