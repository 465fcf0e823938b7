//! The blob swarm on real QUIC endpoints on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tasks::blob::{Outboard, CHUNK_SIZE};
use tasks::net;
use tasks::wire::{BlobRequest, BlobResponse, CloseCode, PeerAddr, ALPN_BLOB};
use tasks::{BlobRef, NodeKey};
use worker::blobs::BlobStore;
use worker::swarm::{BlobServer, FetchError, FetchOptions, Fetcher, ServeLimits};

struct Node {
    peer: PeerAddr,
    store: BlobStore,
    server: BlobServer,
    fetcher: Fetcher,
    _dir: tempfile::TempDir,
}

fn blob_data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(0x9E3779B97F4A7C15) >> 56) as u8 ^ seed)
        .collect()
}

fn opts() -> FetchOptions {
    FetchOptions {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(3),
        stall_timeout: Duration::from_secs(5),
        ..FetchOptions::default()
    }
}

fn node(limits: ServeLimits) -> anyhow::Result<Node> {
    let key = NodeKey::generate();
    let ep = net::endpoint(&key, "127.0.0.1:0".parse()?, &[ALPN_BLOB]).context("endpoint")?;
    let dir = tempfile::tempdir()?;
    let store = BlobStore::open(dir.path(), None)?;
    let server = BlobServer::new(store.clone(), limits);
    let fetcher = Fetcher::with_options(ep.clone(), store.clone(), Some(server.clone()), opts());
    let accept_ep = ep.clone();
    let srv = server.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept_ep.accept().await {
            let srv = srv.clone();
            tokio::spawn(async move {
                if let Ok(conn) = incoming.await {
                    srv.serve_connection(conn).await;
                }
            });
        }
    });
    let peer = PeerAddr {
        node_id: key.node_id(),
        addr: ep.local_addr()?,
    };
    Ok(Node {
        peer,
        store,
        server,
        fetcher,
        _dir: dir,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_workers_get_the_blob_mostly_from_each_other_and_the_seed_sends_under_3x(
) -> anyhow::Result<()> {
    let data = blob_data(6 << 20, 1);
    let seed = node(ServeLimits::seed())?;
    let blob = seed.store.put(&data)?;
    let workers: Vec<Node> = (0..8)
        .map(|_| node(ServeLimits::default()))
        .collect::<Result<_, _>>()?;
    let mut fetches = tokio::task::JoinSet::new();
    for (i, w) in workers.iter().enumerate() {
        // Each worker lists the others, then the seed last (as the coordinator does).
        let mut peers: Vec<PeerAddr> = workers
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, o)| o.peer.clone())
            .collect();
        peers.push(seed.peer.clone());
        let f = w.fetcher.clone();
        fetches.spawn(async move { f.fetch(blob, &peers).await });
    }
    while let Some(r) = fetches.join_next().await {
        let report = r??;
        assert!(report.bad_peers.is_empty());
    }
    for w in &workers {
        assert_eq!(
            w.store.read(&blob.id)?,
            data,
            "every worker holds the verified blob"
        );
    }
    let ratio = seed.server.bytes_sent() as f64 / data.len() as f64;
    let peers_sent: u64 = workers.iter().map(|w| w.server.bytes_sent()).sum();
    println!(
        "seed sent {:.2}x the blob ({} bytes) to 8 workers; workers sent each other {:.2}x; seed answered Busy {} times",
        ratio,
        seed.server.bytes_sent(),
        peers_sent as f64 / data.len() as f64,
        seed.server.busy_answers()
    );
    assert!(ratio < 3.0, "seed upload {ratio:.2}x the blob, want < 3x");
    Ok(())
}

/// The seed holds a node out of chunks another node took within its window, so that it
/// takes them from that node; but a node that knows no other holder (the first requesters
/// of a new blob are told only of the seed) is served after `SEED_PATIENCE`, not left to
/// wait out the window. The window here is a minute: without the patience the second
/// fetch would stall out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_serves_a_node_that_knows_no_other_holder_after_its_patience() -> anyhow::Result<()> {
    let data = blob_data(100_000, 2);
    let seed = node(ServeLimits {
        seed_window: Some(Duration::from_secs(60)),
        ..ServeLimits::seed()
    })?;
    let blob = seed.store.put(&data)?;
    let first = node(ServeLimits::default())?;
    let second = node(ServeLimits::default())?;
    first
        .fetcher
        .fetch(blob, std::slice::from_ref(&seed.peer))
        .await?;
    assert_eq!(seed.server.busy_answers(), 0);
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        second.fetcher.fetch(blob, std::slice::from_ref(&seed.peer)),
    )
    .await
    .context("the second fetch waited out the seed's window")??;
    assert!(
        seed.server.busy_answers() > 0,
        "the second node was held out first"
    );
    assert_eq!(
        report.bytes_by_peer.get(&seed.peer.node_id),
        Some(&(data.len() as u64))
    );
    assert_eq!(second.store.read(&blob.id)?, data);
    Ok(())
}

/// The coordinator tells each worker only of the fetchers that started *before* it (up to
/// four, newest first) and of itself, last. The seed hands each chunk out once within its
/// window, so chunks a later fetcher took must reach the earlier ones through it: they learn
/// of it when it asks them for the blob. The fetches start last-told first, so the seed's
/// first chunks go to fetchers that nobody was told of. The window here is a minute, so a
/// chunk that did not travel that way would stall its fetch (and the seed would send more
/// than one copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn earlier_fetchers_learn_of_later_ones_and_the_seed_sends_one_copy() -> anyhow::Result<()> {
    let data = blob_data(64 * CHUNK_SIZE, 3);
    let seed = node(ServeLimits {
        seed_window: Some(Duration::from_secs(60)),
        ..ServeLimits::seed()
    })?;
    let blob = seed.store.put(&data)?;
    let workers: Vec<Node> = (0..6)
        .map(|_| node(ServeLimits::default()))
        .collect::<Result<_, _>>()?;
    let mut fetches = tokio::task::JoinSet::new();
    for (i, w) in workers.iter().enumerate().rev() {
        let mut peers: Vec<PeerAddr> = workers[i.saturating_sub(4)..i]
            .iter()
            .rev()
            .map(|o| o.peer.clone())
            .collect();
        peers.push(seed.peer.clone());
        let f = w.fetcher.clone();
        fetches.spawn(async move { f.fetch(blob, &peers).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while let Some(r) = fetches.join_next().await {
        let report =
            r?.context("a fetch failed: a chunk only a later fetcher held never reached it")?;
        assert!(report.bad_peers.is_empty());
    }
    for w in &workers {
        assert_eq!(w.store.read(&blob.id)?, data);
    }
    assert_eq!(
        seed.server.bytes_sent(),
        data.len() as u64,
        "the seed uploads each chunk once"
    );
    Ok(())
}

/// A worker keeps small outputs in a pack of its blob store, not a file each; a coordinator
/// that lost them fetches them by hash from that worker as it would any blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_blobs_kept_in_a_pack_are_served_by_hash_like_any_blob() -> anyhow::Result<()> {
    let holder = node(ServeLimits::default())?;
    let outputs: Vec<Vec<u8>> = vec![blob_data(100, 1), blob_data(CHUNK_SIZE, 2)];
    let blobs = holder.store.put_small_batch(&outputs)?;
    assert!(
        !holder.store.dir().join(blobs[0].id.to_string()).exists(),
        "a small blob is packed, not a file of its own"
    );
    let asker = node(ServeLimits::default())?;
    for (blob, data) in blobs.iter().zip(&outputs) {
        let report = asker
            .fetcher
            .fetch(*blob, std::slice::from_ref(&holder.peer))
            .await?;
        assert!(report.bad_peers.is_empty());
        assert_eq!(&asker.store.read(&blob.id)?, data);
    }
    assert!(holder.server.bytes_sent() >= (CHUNK_SIZE + 100) as u64);
    Ok(())
}

/// Overwrite one byte in every chunk of a stored blob: the node now serves corrupt chunks
/// (stores trust what they verified when writing).
fn corrupt_on_disk(n: &Node, blob: BlobRef) -> anyhow::Result<()> {
    let path = n.store.dir().join(blob.id.to_string());
    let mut bytes = std::fs::read(&path)?;
    for i in (0..bytes.len()).step_by(CHUNK_SIZE) {
        bytes[i + 7] ^= 0x5a;
    }
    std::fs::write(&path, bytes)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_serving_corrupt_chunks_is_flagged_and_the_blob_comes_intact_from_others(
) -> anyhow::Result<()> {
    let data = blob_data(3 << 20, 2);
    let seed = node(ServeLimits::default())?;
    let liar = node(ServeLimits::default())?;
    let honest = node(ServeLimits::default())?;
    let blob = seed.store.put(&data)?;
    liar.store.put(&data)?;
    honest.store.put(&data)?;
    corrupt_on_disk(&liar, blob)?;
    // The fetcher spreads chunks over its sources as they answer: on a loaded machine the
    // two honest ones may serve every chunk before the liar is asked for one. A fetch that
    // never asked the liar proves nothing about flagging it, so try again with a fresh
    // fetcher (each attempt still checks that nothing corrupt is accepted).
    let mut attempt = 0;
    let (me, report) = loop {
        attempt += 1;
        let me = node(ServeLimits::default())?;
        let report = me
            .fetcher
            .fetch(
                blob,
                &[liar.peer.clone(), honest.peer.clone(), seed.peer.clone()],
            )
            .await?;
        assert_eq!(me.store.read(&blob.id)?, data);
        if !report.bad_peers.is_empty() || attempt == 5 {
            break (me, report);
        }
    };
    assert_eq!(
        report.bad_peers,
        vec![liar.peer.node_id],
        "the liar is reported (in one of {attempt} fetches)"
    );
    assert_eq!(
        report.bytes_by_peer.get(&liar.peer.node_id),
        None,
        "no byte from the liar was accepted"
    );
    assert_eq!(me.store.read(&blob.id)?, data);
    assert_eq!(
        me.store.list(),
        vec![blob.id],
        "nothing else (nothing corrupt) is stored"
    );
    let served: u64 = report.bytes_by_peer.values().sum();
    assert_eq!(served, data.len() as u64);
    Ok(())
}

/// A peer that answers `Outboard` and `Have` honestly, then on its first `Chunks` request
/// sends the header and half a chunk and vanishes (closes its endpoint). Its task returns
/// `true` only if it vanished that way (not for want of a connection or a request).
async fn vanishing_peer(
    data: Arc<Vec<u8>>,
) -> anyhow::Result<(PeerAddr, tokio::task::JoinHandle<bool>)> {
    let key = NodeKey::generate();
    let ep = net::endpoint(&key, "127.0.0.1:0".parse()?, &[ALPN_BLOB])?;
    let peer = PeerAddr {
        node_id: key.node_id(),
        addr: ep.local_addr()?,
    };
    let ob = Outboard::compute(&data);
    let task = tokio::spawn(async move {
        let Some(incoming) = ep.accept().await else {
            return false;
        };
        let Ok(conn) = incoming.await else {
            return false;
        };
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let Ok(Some(req)) = net::read_frame::<BlobRequest>(&mut recv).await else {
                return false;
            };
            let resp = match req {
                BlobRequest::Outboard { .. } => BlobResponse::Outboard {
                    size: ob.blob().size,
                    cvs: ob.cvs().to_vec(),
                },
                BlobRequest::Have { .. } => BlobResponse::Have {
                    size: ob.blob().size,
                    chunks: vec![true; ob.blob().chunk_count() as usize],
                },
                BlobRequest::Chunks { start, count, .. } => {
                    let from = start as usize * CHUNK_SIZE;
                    let len =
                        ((start as usize + count as usize) * CHUNK_SIZE).min(data.len()) - from;
                    let _ = net::write_frame(
                        &mut send,
                        &BlobResponse::Chunks {
                            start,
                            count,
                            len: len as u64,
                        },
                    )
                    .await;
                    let _ = send.write_all(&data[from..from + CHUNK_SIZE / 2]).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    ep.close(quinn::VarInt::from_u32(CloseCode::Shutdown.code()), b"gone");
                    return true;
                }
            };
            let _ = net::write_frame(&mut send, &resp).await;
            let _ = send.finish();
        }
        false
    });
    Ok((peer, task))
}

/// A liar that claims every chunk (`Have`: all of them) and answers every `Chunks` request
/// with `Busy`, forever. Counts the `Busy` answers it gave.
async fn busy_liar(blob: BlobRef) -> anyhow::Result<(PeerAddr, Arc<std::sync::atomic::AtomicU64>)> {
    let key = NodeKey::generate();
    let ep = net::endpoint(&key, "127.0.0.1:0".parse()?, &[ALPN_BLOB])?;
    let peer = PeerAddr {
        node_id: key.node_id(),
        addr: ep.local_addr()?,
    };
    let busy = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = busy.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let counter = counter.clone();
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let Ok(Some(req)) = net::read_frame::<BlobRequest>(&mut recv).await else {
                        return;
                    };
                    let resp = match req {
                        BlobRequest::Outboard { .. } => BlobResponse::NotFound,
                        BlobRequest::Have { .. } => BlobResponse::Have {
                            size: blob.size,
                            chunks: vec![true; blob.chunk_count() as usize],
                        },
                        BlobRequest::Chunks { .. } => {
                            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            BlobResponse::Busy { retry_after_ms: 10 }
                        }
                    };
                    let _ = net::write_frame(&mut send, &resp).await;
                    let _ = send.finish();
                }
            });
        }
    });
    Ok((peer, busy))
}

/// A peer that claims to hold everything and answers `Busy` forever must not hold a
/// download hostage: while it looks like a source, the seed is never asked (it is asked only
/// for chunks no other peer holds) and the stall timer never runs. After
/// `SchedLimits::busy_patience` (10 s) of nothing but `Busy` it is given up and the blob comes
/// from the seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_claims_everything_and_is_always_busy_does_not_hold_the_download_hostage(
) -> anyhow::Result<()> {
    let data = blob_data(2 << 20, 4);
    let seed = node(ServeLimits::seed())?;
    let blob = seed.store.put(&data)?;
    let (liar, busy) = busy_liar(blob).await?;
    let me = node(ServeLimits::default())?;
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        me.fetcher.fetch(blob, &[liar.clone(), seed.peer.clone()]),
    )
    .await
    .context("the download was held hostage by an always-busy peer")??;
    assert!(
        busy.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the liar was asked"
    );
    assert_eq!(report.bytes_by_peer.get(&liar.node_id), None);
    assert_eq!(me.store.read(&blob.id)?, data);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_vanishing_mid_transfer_costs_nothing_but_time_the_blob_comes_from_others(
) -> anyhow::Result<()> {
    let data = Arc::new(blob_data(2 << 20, 3));
    let seed = node(ServeLimits::default())?;
    let blob = seed.store.put(&data)?;
    let (vanishing, task) = vanishing_peer(data.clone()).await?;
    let me = node(ServeLimits::default())?;
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        me.fetcher
            .fetch(blob, &[vanishing.clone(), seed.peer.clone()]),
    )
    .await
    .context("fetch hung")??;
    // The peer's task ends when it vanishes; waiting for it assumes nothing about whether
    // the download finished before or after that.
    let vanished = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .context("the vanishing peer never got a Chunks request")??;
    assert!(vanished, "the peer really vanished during the download");
    assert_eq!(me.store.read(&blob.id)?, *data);
    assert_eq!(
        report.bytes_by_peer.get(&seed.peer.node_id),
        Some(&(data.len() as u64))
    );
    assert!(report.bad_peers.is_empty(), "vanishing is not lying");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_nobody_has_fails_with_a_clear_error_after_trying_every_peer() -> anyhow::Result<()> {
    let a = node(ServeLimits::default())?;
    let b = node(ServeLimits::default())?;
    a.store.put(b"something else")?;
    // A silent peer: a UDP socket that never answers.
    let silent_sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let silent = PeerAddr {
        node_id: NodeKey::generate().node_id(),
        addr: silent_sock.local_addr()?,
    };
    let me = node(ServeLimits::default())?;
    let wanted = BlobRef::of(&blob_data(1 << 20, 4));
    let started = std::time::Instant::now();
    let err = me
        .fetcher
        .fetch(wanted, &[silent, a.peer.clone(), b.peer.clone()])
        .await
        .unwrap_err();
    let msg = err.to_string();
    println!("{msg} (after {:?})", started.elapsed());
    assert!(
        matches!(
            err,
            FetchError::Unavailable {
                tried: 3,
                not_found: 2,
                unreachable: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        msg.contains(&wanted.id.to_string()) && msg.contains("3 peers"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "a silent peer costs its timeout, not a hang"
    );
    assert!(!me.store.has(&wanted.id));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frame_closes_only_that_connection() -> anyhow::Result<()> {
    let server = node(ServeLimits::default())?;
    let blob = server.store.put(&blob_data(1000, 5))?;
    let client_key = NodeKey::generate();
    let ep = net::endpoint(&client_key, "127.0.0.1:0".parse::<SocketAddr>()?, &[])?;
    let bad = net::connect(&ep, server.peer.addr, server.peer.node_id, ALPN_BLOB).await?;
    let good = net::connect(&ep, server.peer.addr, server.peer.node_id, ALPN_BLOB).await?;
    let (mut send, _recv) = bad.open_bi().await?;
    // A valid length prefix followed by a body that is no BlobRequest (variant 200).
    send.write_all(&[0, 0, 0, 3, 200, 1, 2]).await?;
    send.finish()?;
    let reason = tokio::time::timeout(Duration::from_secs(5), bad.closed())
        .await
        .context("bad connection not closed")?;
    assert_eq!(
        net::close_code_of(&reason),
        Some(CloseCode::Protocol),
        "{reason}"
    );
    // An oversized frame on a third connection gets FrameTooLarge.
    let big = net::connect(&ep, server.peer.addr, server.peer.node_id, ALPN_BLOB).await?;
    let (mut send, _recv) = big.open_bi().await?;
    send.write_all(&u32::MAX.to_be_bytes()).await?;
    let reason = tokio::time::timeout(Duration::from_secs(5), big.closed()).await?;
    assert_eq!(
        net::close_code_of(&reason),
        Some(CloseCode::FrameTooLarge),
        "{reason}"
    );
    // The other connection is untouched.
    let (resp, _) =
        net::request::<_, BlobResponse>(&good, &BlobRequest::Have { id: blob.id }).await?;
    assert_eq!(
        resp,
        BlobResponse::Have {
            size: 1000,
            chunks: vec![true]
        }
    );
    Ok(())
}
