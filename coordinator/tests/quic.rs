//! Real QUIC on loopback: a coordinator started in-process, a submitter using `Client`, and
//! simulated workers that speak the wire protocol (no wasm; [`SimWorker`] with its default
//! options: tasks whose first argument is `big` output too much to travel inline).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::simworker::{fuel_for, output_for, result_of, SimWorker};
use coordinator::client::{Client, ClientError};
use coordinator::server::{Coordinator, RunningCoordinator, ServeConfig};
use tasks::net;
use tasks::wire::{CloseCode, CoordMsg, JobState, TaskState, INLINE_OUTPUT_MAX};
use tasks::{JobId, JobSpec, NodeKey};

async fn start(dir: &std::path::Path) -> anyhow::Result<RunningCoordinator> {
    let listen: SocketAddr = "127.0.0.1:0".parse()?;
    Coordinator::start(ServeConfig::new(dir, listen)).await
}

/// A job directory with a (never executed) module and `n` tasks; the first `big` tasks
/// produce outputs too large to travel inline.
fn job_file(dir: &std::path::Path, n: usize, big: usize) -> anyhow::Result<JobSpec> {
    std::fs::write(dir.join("m.wasm"), b"\0asm\x01\0\0\0 not really run")?;
    let mut toml = String::from(
        "name = \"sim\"\nmodule = \"m.wasm\"\nquorum = 2\nmax_replicas = 4\ndeadline_secs = 600\n",
    );
    for i in 0..n {
        let arg = if i < big {
            "big".to_string()
        } else {
            format!("t{i}")
        };
        toml += &format!("[[task]]\nargs = [\"{arg}\"]\n");
    }
    std::fs::write(dir.join("job.toml"), toml)?;
    Ok(JobSpec::from_file(&dir.join("job.toml"))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agreeing_workers_finish_job_and_results_carry_verified_outputs() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let jobdir = tempfile::tempdir()?;
    let coord = start(data.path()).await?;
    let spec = job_file(jobdir.path(), 5, 1)?;
    let client = Client::connect(&coord.ticket, &coord.token).await?;
    let (job, n) = client.submit(&spec).await?;
    assert_eq!(n, 5);

    let mut a = SimWorker::join(&coord.ticket).await?;
    let mut b = SimWorker::join(&coord.ticket).await?;
    let wa = a.request(8).await?;
    let wb = b.request(8).await?;
    assert_eq!(wa.len() + wb.len(), 10, "quorum 2 × 5 tasks");
    // Never two replicas of one task on one worker.
    for w in [&wa, &wb] {
        let mut tasks: Vec<_> = w.iter().map(|x| x.task.id).collect();
        tasks.sort_unstable();
        tasks.dedup();
        assert_eq!(tasks.len(), w.len());
    }
    // The coordinator lists itself as the seed of the module.
    assert_eq!(wa[0].peers.last().map(|p| p.node_id), Some(coord.node_id));
    for x in &wa {
        assert!(matches!(a.report(x).await?, CoordMsg::Ack { .. }));
    }
    for x in &wb {
        assert!(matches!(b.report(x).await?, CoordMsg::Ack { .. }));
    }
    // Wait for the big output to be pulled from a worker.
    let results = wait_for(|| async {
        let r = client.results(job).await?;
        Ok(r.tasks.iter().all(|t| t.output.is_some()).then_some(r))
    })
    .await?;
    assert_eq!(results.state, JobState::Done);
    for t in &results.tasks {
        assert_eq!(t.status, TaskState::Accepted);
        let a = wa.iter().find(|x| x.task.id.index == t.index).unwrap();
        assert_eq!(t.output.as_deref(), Some(&output_for(a)[..]));
        assert_eq!(t.fuel_used, Some(fuel_for(a)));
        assert_eq!(t.agreeing_workers.len(), 2);
    }
    let st = client.status(Some(job)).await?;
    assert_eq!(
        (st.jobs[0].tasks_done, st.jobs[0].state),
        (5, JobState::Done)
    );
    let fuel: u64 = wa.iter().map(fuel_for).sum();
    for w in &st.workers {
        assert!(
            (w.credit - fuel as f64 / 1e9).abs() < 1e-12,
            "credit = valid fuel"
        );
        assert_eq!((w.valid, w.invalid), (5, 0));
    }
    // The module went out once to nobody (workers here never fetched it), and the results
    // download of the big output counts as coordinator upload.
    assert!(st.coordinator_bytes_sent >= INLINE_OUTPUT_MAX * 5);
    client.close().await;
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_for_replica_not_assigned_to_this_worker_is_rejected() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let jobdir = tempfile::tempdir()?;
    let coord = start(data.path()).await?;
    let client = Client::connect(&coord.ticket, &coord.token).await?;
    client.submit(&job_file(jobdir.path(), 1, 0)?).await?;
    let mut a = SimWorker::join(&coord.ticket).await?;
    let mut thief = SimWorker::join(&coord.ticket).await?;
    let wa = a.request(1).await?;
    let stolen = thief.report(&wa[0]).await?;
    assert!(
        matches!(stolen, CoordMsg::Rejected { replica: Some(r), .. } if r == wa[0].replica),
        "{stolen:?}"
    );
    let unknown = thief
        .report_raw(987_654, result_of(b"x", 1), Some(b"x".to_vec()))
        .await?;
    assert!(matches!(unknown, CoordMsg::Rejected { .. }));
    // A lying inline output is refused too.
    let lie = a
        .report_raw(wa[0].replica, result_of(b"x", 1), Some(b"y".to_vec()))
        .await?;
    assert!(matches!(lie, CoordMsg::Rejected { .. }));
    // The rightful owner's report still goes through, and the thief's session still works.
    assert!(matches!(a.report(&wa[0]).await?, CoordMsg::Ack { .. }));
    let st = client.status(None).await?;
    assert_eq!(st.jobs[0].replicas_reported, 1);
    assert_eq!(thief.request(1).await?.len(), 1);
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frame_closes_only_that_connection() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let jobdir = tempfile::tempdir()?;
    let coord = start(data.path()).await?;
    let client = Client::connect(&coord.ticket, &coord.token).await?;
    client.submit(&job_file(jobdir.path(), 4, 0)?).await?;
    let mut good = SimWorker::join(&coord.ticket).await?;
    let mut bad = SimWorker::join(&coord.ticket).await?;
    // A length prefix followed by bytes that are no WorkerMsg.
    bad.send.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await?;
    let err = tokio::time::timeout(Duration::from_secs(60), bad.conn.closed()).await?;
    assert_eq!(
        net::close_code_of(&err),
        Some(CloseCode::Protocol),
        "{err:?}"
    );
    // An oversized frame gets its own code.
    let mut big = SimWorker::join(&coord.ticket).await?;
    big.send.write_all(&u32::MAX.to_be_bytes()).await?;
    let err = tokio::time::timeout(Duration::from_secs(60), big.conn.closed()).await?;
    assert_eq!(net::close_code_of(&err), Some(CloseCode::FrameTooLarge));
    // Everyone else carries on.
    let w = good.request(2).await?;
    assert_eq!(w.len(), 2);
    assert!(matches!(good.report(&w[0]).await?, CoordMsg::Ack { .. }));
    assert!(client.status(None).await.is_ok());
    drop(bad);
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_unknown_job_and_unreachable_coordinator_get_one_line_errors(
) -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let coord = start(data.path()).await?;
    let err = Client::connect(&coord.ticket, "not-the-token")
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Unauthorized), "{err}");
    assert!(err.to_string().contains("submit-token"));
    let client = Client::connect(&coord.ticket, &coord.token).await?;
    let err = client.results(JobId(42)).await.unwrap_err();
    assert!(matches!(err, ClientError::UnknownJob(JobId(42))), "{err}");
    let ticket = coord.ticket.clone();
    coord.shutdown().await?;
    let err = tokio::time::timeout(Duration::from_secs(30), Client::connect(&ticket, "x"))
        .await?
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect(_)), "{err}");
    assert!(!err.to_string().contains('\n'), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_job_keeps_accepted_results_in_flight_replicas_and_credit_once(
) -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let jobdir = tempfile::tempdir()?;
    let coord = start(data.path()).await?;
    let token = coord.token.clone();
    let node = coord.node_id;
    let client = Client::connect(&coord.ticket, &token).await?;
    let (job, _) = client.submit(&job_file(jobdir.path(), 2, 0)?).await?;
    let key_a = NodeKey::generate();
    let key_b = NodeKey::generate();
    let mut a = SimWorker::join_as(key_a.clone(), &coord.ticket).await?;
    let mut b = SimWorker::join_as(key_b.clone(), &coord.ticket).await?;
    let wa = a.request(2).await?;
    let wb = b.request(2).await?;
    let t0a = wa.iter().find(|x| x.task.id.index == 0).unwrap().clone();
    let t0b = wb.iter().find(|x| x.task.id.index == 0).unwrap().clone();
    let t1a = wa.iter().find(|x| x.task.id.index == 1).unwrap().clone();
    let t1b = wb.iter().find(|x| x.task.id.index == 1).unwrap().clone();
    // Task 0 is accepted; task 1 has one report and one replica in flight.
    assert!(matches!(a.report(&t0a).await?, CoordMsg::Ack { .. }));
    assert!(matches!(b.report(&t0b).await?, CoordMsg::Ack { .. }));
    assert!(matches!(a.report(&t1a).await?, CoordMsg::Ack { .. }));
    client.close().await;
    // Crash: no goodbye, only committed state survives.
    coord.kill().await;
    drop((a, b));

    let coord = start(data.path()).await?;
    assert_eq!(coord.node_id, node, "same identity after restart");
    assert_eq!(coord.token, token, "same token after restart");
    let client = Client::connect(&coord.ticket, &token).await?;
    let st = client.status(Some(job)).await?;
    assert_eq!(
        (st.jobs[0].tasks_done, st.jobs[0].replicas_in_flight),
        (1, 1)
    );
    let results = client.results(job).await?;
    assert_eq!(results.tasks[0].status, TaskState::Accepted);
    assert_eq!(
        results.tasks[0].output.as_deref(),
        Some(&output_for(&t0a)[..])
    );

    // Both reconnect; A resends an already-committed report (its ack may have been lost):
    // acknowledged, not credited twice. B reports its in-flight replica: the job is done.
    let mut a = SimWorker::join_as(key_a.clone(), &coord.ticket).await?;
    let mut b = SimWorker::join_as(key_b.clone(), &coord.ticket).await?;
    assert!(matches!(a.report(&t0a).await?, CoordMsg::Ack { .. }));
    assert!(matches!(b.report(&t1b).await?, CoordMsg::Ack { .. }));
    let st = client.status(Some(job)).await?;
    assert_eq!(st.jobs[0].state, JobState::Done);
    let credit_a = st
        .workers
        .iter()
        .find(|w| w.node_id == key_a.node_id())
        .unwrap();
    let fuel = (fuel_for(&t0a) + fuel_for(&t1a)) as f64 / 1e9;
    assert!(
        (credit_a.credit - fuel).abs() < 1e-12,
        "credit counted once: {} vs {fuel}",
        credit_a.credit
    );
    assert_eq!(credit_a.valid, 2);
    // New work after restart gets fresh replica ids, never one issued before the crash.
    let before: Vec<u64> = [&t0a, &t0b, &t1a, &t1b].map(|x| x.replica).to_vec();
    let more = tempfile::tempdir()?;
    client.submit(&job_file(more.path(), 2, 0)?).await?;
    let fresh: Vec<u64> = a.request(2).await?.iter().map(|x| x.replica).collect();
    assert_eq!(fresh.len(), 2);
    assert!(
        fresh.iter().all(|r| !before.contains(r)),
        "replica ids reused after restart: {fresh:?} vs {before:?}"
    );
    client.close().await;
    coord.shutdown().await?;
    Ok(())
}

async fn wait_for<T, F, Fut>(mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(t) = f().await? {
            return Ok(t);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
