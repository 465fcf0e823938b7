//! Hostile peers against a real `coordinator serve` process (issue 10, part 4): garbage and
//! oversized frames on each of its three ALPNs close only that connection, with the wire close
//! code, while well-behaved clients in the same test keep working; a worker reporting for a
//! replica it was not given, a submitter without the token and a peer presenting the wrong key
//! are refused with one clear log line each (read from the processes' stderr); a peer reported
//! for serving bad data by two workers handed it is no longer handed out to other workers.
//!
//! Prints `FAULT|hostile|...` lines for FAULTS.md.

mod common;

use std::time::{Duration, Instant};

use anyhow::Context;
use common::simworker::{release_fingerprint, Options, Peer, SimWorker, PATIENCE};
use common::{worker_bin, Cluster};
use coordinator::client::{Client, ClientError};
use tasks::net;
use tasks::wire::{CloseCode, CoordMsg, WorkerMsg};
use tasks::wire::{ALPN_BLOB, ALPN_COORD, ALPN_SUBMIT, MAX_FRAME};
use tasks::{BlobId, JobSpec, NodeKey, Ticket};

fn fault(scenario: &str, figures: &str, target: &str, met: bool) {
    println!(
        "FAULT|hostile|{scenario}|{figures}|{target}|{}",
        if met { "yes" } else { "no" }
    );
}

/// A simulated worker announcing `blobs` and an address where it answers nobody (not
/// directly reachable).
async fn join(ticket: &Ticket, blobs: Vec<BlobId>) -> anyhow::Result<SimWorker> {
    let opts = Options {
        agent: "hostile-test".into(),
        // The engine `coordinator serve` admits by default.
        fingerprint: release_fingerprint(),
        slots: 2,
        blobs,
        peer: Peer::Silent,
        ..Options::default()
    };
    SimWorker::join_with(ticket, opts).await
}

/// Fuel claimed by every report here (`SimWorker::report_output`).
const FUEL: u64 = 1000;

/// Open a fresh connection on `alpn`, send `bytes` on a new stream (after `hello` on the
/// coordinator ALPN), and wait for the coordinator to close the connection.
async fn hostile_conn(
    ticket: &Ticket,
    alpn: &[u8],
    hello: bool,
    bytes: &[u8],
) -> anyhow::Result<Option<CloseCode>> {
    let key = NodeKey::generate();
    let ep = net::endpoint(&key, "127.0.0.1:0".parse()?, &[])?;
    let conn = net::connect(&ep, ticket.socket_addrs()?[0], ticket.node_id, alpn).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    if hello {
        let fingerprint = release_fingerprint();
        net::write_frame(
            &mut send,
            &WorkerMsg::Hello {
                agent: "garbage".into(),
                fingerprint,
                slots: 1,
                peer_addr: None,
                blobs: vec![],
            },
        )
        .await?;
        let _: Option<CoordMsg> = net::read_frame(&mut recv).await?;
    }
    send.write_all(bytes).await?;
    let err = tokio::time::timeout(PATIENCE, conn.closed())
        .await
        .context("the coordinator did not close the hostile connection")?;
    Ok(net::close_code_of(&err))
}

/// A job with a (never executed) module and `n` tasks.
fn job(dir: &std::path::Path, n: usize) -> anyhow::Result<JobSpec> {
    std::fs::write(dir.join("m.wasm"), b"\0asm\x01\0\0\0 hostile test")?;
    let toml = format!("name = \"hostile\"\nmodule = \"m.wasm\"\nquorum = 2\nmax_replicas = 4\ndeadline_secs = 600\n[tasks]\ncount = {n}\nargs = [\"{{i}}\"]\n");
    std::fs::write(dir.join("job.toml"), toml)?;
    Ok(JobSpec::from_file(&dir.join("job.toml"))?)
}

/// Lines of `log` containing `needle`, waiting up to 10 s for one to appear.
fn log_lines(read: impl Fn() -> String, needle: &str) -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let lines: Vec<String> = read()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect();
        if !lines.is_empty() || t0.elapsed() > PATIENCE {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_on_every_alpn_close_only_that_connection(
) -> anyhow::Result<()> {
    let c = Cluster::start_trusting(0); // one good worker takes a replica after every case
    let ticket: Ticket = c.ticket.parse()?;
    let jobdir = tempfile::tempdir()?;
    let client = Client::connect(&ticket, &c.token).await?;
    let (job_id, _) = client.submit(&job(jobdir.path(), 20)?).await?;
    let mut good = join(&ticket, vec![]).await?;
    let garbage: &[u8] = &[0, 0, 0, 3, 0xff, 0xff, 0xff];
    let oversized = ((MAX_FRAME + 1) as u32).to_be_bytes();
    let huge = u32::MAX.to_be_bytes();
    // (scenario, alpn, hello first, bytes, expected close code)
    type Case<'a> = (&'a str, &'a [u8], bool, &'a [u8], CloseCode);
    let cases: Vec<Case> = vec![
        (
            "coord: garbage instead of Hello",
            ALPN_COORD,
            false,
            garbage,
            CloseCode::Protocol,
        ),
        (
            "coord: garbage after Hello",
            ALPN_COORD,
            true,
            garbage,
            CloseCode::Protocol,
        ),
        (
            "coord: MAX_FRAME+1 prefix",
            ALPN_COORD,
            true,
            &oversized,
            CloseCode::FrameTooLarge,
        ),
        (
            "coord: 4 GiB prefix instead of Hello",
            ALPN_COORD,
            false,
            &huge,
            CloseCode::FrameTooLarge,
        ),
        (
            "submit: garbage",
            ALPN_SUBMIT,
            false,
            garbage,
            CloseCode::Protocol,
        ),
        (
            "submit: MAX_FRAME+1 prefix",
            ALPN_SUBMIT,
            false,
            &oversized,
            CloseCode::FrameTooLarge,
        ),
        (
            "blob: garbage",
            ALPN_BLOB,
            false,
            garbage,
            CloseCode::Protocol,
        ),
        (
            "blob: 4 GiB prefix",
            ALPN_BLOB,
            false,
            &huge,
            CloseCode::FrameTooLarge,
        ),
    ];
    let mut right = 0;
    let mut seen = Vec::new();
    for (name, alpn, hello, bytes, want) in &cases {
        let got = hostile_conn(&ticket, alpn, *hello, bytes).await?;
        if got == Some(*want) {
            right += 1;
        }
        seen.push(format!("{name}: {got:?}"));
        // Between hostile connections, the well-behaved worker and submitter carry on.
        assert_eq!(
            good.request(1).await?.len(),
            1,
            "the good worker still gets work after '{name}'"
        );
        assert!(
            client.status(Some(job_id)).await.is_ok(),
            "the submitter still works after '{name}'"
        );
    }
    // The good worker's session survived everything: report what it was given.
    let mut work = Vec::new();
    work.extend(good.request(8).await?);
    let coordinator_alive = c.try_status().is_some();
    let lines = c
        .coordinator_logs()
        .lines()
        .filter(|l| l.contains("bad frame"))
        .count();
    let met = right == cases.len() && coordinator_alive;
    fault(
        "garbage and oversized frames from a connected peer, on the coordinator's coord, submit and blob ALPNs (8 connections)",
        &format!("{right}/{} closed with the right code (Protocol / FrameTooLarge); a good worker and a submitter kept working between every one; coordinator up: {coordinator_alive}; {lines} 'bad frame' log lines", cases.len()),
        "only that connection closes, with its close code",
        met,
    );
    assert_eq!(right, cases.len(), "close codes: {seen:?}");
    assert!(coordinator_alive);
    client.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unassigned_report_wrong_token_and_wrong_key_are_refused_with_one_clear_log_line(
) -> anyhow::Result<()> {
    let c = Cluster::start(0);
    let ticket: Ticket = c.ticket.parse()?;
    let jobdir = tempfile::tempdir()?;
    let client = Client::connect(&ticket, &c.token).await?;
    client.submit(&job(jobdir.path(), 2)?).await?;

    // 1. A worker reports for a replica given to someone else, and for one that never existed.
    let mut owner = join(&ticket, vec![]).await?;
    let mut thief = join(&ticket, vec![]).await?;
    let given = owner.request(1).await?;
    let replica = given[0].replica;
    let stolen = thief.report_output(replica, b"x".to_vec(), FUEL).await?;
    let unknown = thief.report_output(987_654, b"x".to_vec(), FUEL).await?;
    let refused = matches!(stolen, CoordMsg::Rejected { replica: Some(r), .. } if r == replica)
        && matches!(unknown, CoordMsg::Rejected { .. });
    let thief_id = thief.key.node_id().short();
    let lines = log_lines(|| c.coordinator_logs(), "report rejected");
    let clear = lines.iter().any(|l| {
        l.contains("WARN")
            && l.contains(&format!("replica {replica} is not assigned to this worker"))
            && l.contains(&thief_id)
    }) && lines.iter().any(|l| l.contains("unknown replica 987654"));
    // ... and the rightful owner's report still counts.
    let owner_ok = matches!(
        owner.report_output(replica, b"x".to_vec(), FUEL).await?,
        CoordMsg::Ack { .. }
    );
    fault(
        "worker reports for a replica it was not given (and for an unknown one)",
        &format!("refused with Rejected: {refused}; owner's report still accepted: {owner_ok}; coordinator log: {}", lines.first().map(|l| trim_log(l)).unwrap_or_else(|| "NONE".into())),
        "rejected, one clear log line",
        refused && owner_ok && clear,
    );
    assert!(refused && owner_ok, "{stolen:?} / {unknown:?}");
    assert!(
        clear,
        "no clear 'report rejected' line naming the replica and the worker: {lines:?}"
    );

    // 2. A submitter without the token.
    let err = Client::connect(&ticket, "not-the-token").await.err();
    let unauthorized = matches!(err, Some(ClientError::Unauthorized));
    let user_msg = err.map(|e| e.to_string()).unwrap_or_default();
    let lines = log_lines(|| c.coordinator_logs(), "wrong token");
    let clear = lines.len() == 1 && lines[0].contains("WARN") && lines[0].contains("127.0.0.1");
    fault(
        "submitter without the token",
        &format!("refused (Unauthorized): {unauthorized}; submitter sees: \"{user_msg}\"; coordinator log: {}", lines.first().map(|l| trim_log(l)).unwrap_or_else(|| "NONE".into())),
        "rejected, one clear log line",
        unauthorized && clear && !user_msg.contains('\n'),
    );
    assert!(unauthorized, "{user_msg}");
    assert!(
        clear,
        "want one WARN line about the wrong token with the address: {lines:?}"
    );

    // 3. A peer presenting the wrong key: the ticket pins another node id. Both the worker
    // daemon and the submitter refuse the connection and say why.
    let impostor = Ticket::new(NodeKey::generate().node_id(), ticket.addr.clone());
    let err = Client::connect(&impostor, &c.token)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    let client_clear = err.contains("not the one we expected")
        && err.contains(&c.ticket[10..74])
        && !err.contains('\n');
    let wdir = c.dir.path().join("impostor-worker");
    let log = c.dir.path().join("impostor-worker.log");
    let mut w = common::Proc {
        child: std::process::Command::new(worker_bin())
            .args([
                "join",
                &impostor.to_string(),
                "--slots",
                "1",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(&wdir)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
        name: "impostor-worker".into(),
    };
    let lines = log_lines(
        || std::fs::read_to_string(&log).unwrap_or_default(),
        "not the one we expected",
    );
    w.kill9();
    let worker_clear = lines.len() == 1
        && lines[0].contains("WARN")
        && lines[0].contains(&impostor.node_id.to_string());
    // The coordinator is unharmed and never counted the refused daemon as a worker.
    let st = client.status(None).await?;
    let workers = st.workers.len();
    fault(
        "peer presenting the wrong key (ticket pins another node id): worker daemon and submitter",
        &format!("worker refuses and logs once: {worker_clear} (\"{}\"); submitter error: \"{err}\"; coordinator still sees {workers} workers", lines.first().map(|l| trim_log(l)).unwrap_or_else(|| "NONE".into())),
        "rejected, one clear log line",
        worker_clear && client_clear && workers == 2,
    );
    assert!(client_clear, "{err}");
    assert!(
        worker_clear,
        "want exactly one WARN line naming the pinned node id: {lines:?}"
    );
    assert_eq!(workers, 2);
    client.close().await;
    Ok(())
}

/// A log line without its timestamp and colour codes, and no `|` (the table separator).
fn trim_log(l: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for ch in l.chars() {
        match (esc, ch) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, '|') => out.push('/'),
            (false, c) => out.push(c),
        }
    }
    let out = out.trim().to_string();
    // Drop the leading RFC 3339 timestamp.
    match out.split_once(' ') {
        Some((ts, rest)) if ts.contains('T') && ts.ends_with('Z') => rest.trim().to_string(),
        _ => out,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_reported_for_bad_data_is_no_longer_handed_out_for_that_blob() -> anyhow::Result<()> {
    let c = Cluster::start(0);
    let ticket: Ticket = c.ticket.parse()?;
    let jobdir = tempfile::tempdir()?;
    let client = Client::connect(&ticket, &c.token).await?;
    let spec = job(jobdir.path(), 6)?;
    let module = BlobId::of(&std::fs::read(&spec.module)?);
    client.submit(&spec).await?;
    // The poisoner announces the module; an honest worker sees it listed as a peer.
    let poisoner = join(&ticket, vec![module]).await?;
    let mut a = join(&ticket, vec![]).await?;
    let before = a.request(1).await?;
    let listed_before = before[0]
        .peers
        .iter()
        .any(|p| p.node_id == poisoner.key.node_id());
    // A fetches from it, the chunks fail verification, A reports it; so does A2, also handed
    // the poisoner for the module (one accuser alone never delists a holder: issue 17).
    let mut a2 = join(&ticket, vec![]).await?;
    let before2 = a2.request(1).await?;
    anyhow::ensure!(before2.len() == 1, "a2 got no work");
    for w in [&mut a, &mut a2] {
        net::write_frame(
            &mut w.send,
            &WorkerMsg::BadPeer {
                peer: poisoner.key.node_id(),
                blob: module,
            },
        )
        .await?;
        // Answered after the accusation was applied (one session's messages are in order).
        w.request(0).await?;
    }
    let lines = log_lines(|| c.coordinator_logs(), "peer serving bad data");
    // Other workers are no longer pointed at it (it is still connected).
    let mut b = join(&ticket, vec![]).await?;
    let after = b.request(2).await?;
    let listed_after = after
        .iter()
        .any(|x| x.peers.iter().any(|p| p.node_id == poisoner.key.node_id()));
    let still_connected = poisoner.conn.close_reason().is_none();
    let met = listed_before && !listed_after && !lines.is_empty();
    fault(
        "two workers report a peer that served corrupt chunks (WorkerMsg::BadPeer)",
        &format!("listed as a peer for the module before: {listed_before}, after: {listed_after} (in {} new assignments); poisoner still connected: {still_connected}; coordinator log: {}", after.len(), lines.first().map(|l| trim_log(l)).unwrap_or_else(|| "NONE".into())),
        "corrupter no longer handed out for that blob",
        met,
    );
    assert!(
        listed_before,
        "the poisoner was never listed: {:?}",
        before[0].peers
    );
    // Not being listed means something only if b was handed the module's peers at all, and
    // the poisoner was still there to be listed.
    assert!(
        !after.is_empty() && after.iter().all(|x| !x.peers.is_empty()),
        "b got no assignments with peers to check: {after:?}"
    );
    assert!(
        still_connected,
        "the poisoner left: its absence proves nothing"
    );
    assert!(!listed_after, "the reported peer is still handed out");
    assert!(!lines.is_empty(), "no log line about the bad peer");
    client.close().await;
    Ok(())
}
