//! Poisoned peers (issue 10, part 3), on real QUIC endpoints on loopback: 30% of the peers
//! that hold a module serve corrupted chunks, in three ways (a flipped byte in every chunk, in
//! every other chunk, random bytes from a hand-written server). Every download must complete
//! and verify, every corrupter must be flagged (`FetchReport::bad_peers`, what the daemon sends
//! the coordinator as `WorkerMsg::BadPeer`) and no honest peer, the stores must hold exactly
//! the original bytes, and the module fetched through the poisoned swarm must run with the
//! original's digest.
//!
//! `PEERGRID_FAULTS_FULL=1` runs a bigger swarm. Prints a `FAULT|poison|...` line.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::seq::SliceRandom;
use rand::Rng;
use tasks::blob::{Outboard, CHUNK_SIZE};
use tasks::net;
use tasks::wire::{BlobRequest, BlobResponse, PeerAddr, ALPN_BLOB};
use tasks::{BlobRef, NodeId, NodeKey};
use worker::blobs::BlobStore;
use worker::sandbox::{RunControl, RunSpec, Sandbox, SandboxConfig};
use worker::swarm::{BlobServer, FetchOptions, Fetcher, ServeLimits};

const PRIMES_WASM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/primes/primes.wasm"
);

fn full() -> bool {
    std::env::var("PEERGRID_FAULTS_FULL").is_ok_and(|v| v == "1")
}

struct Node {
    peer: PeerAddr,
    store: BlobStore,
    server: BlobServer,
    fetcher: Fetcher,
    _dir: tempfile::TempDir,
}

fn node() -> anyhow::Result<Node> {
    let key = NodeKey::generate();
    let ep = net::endpoint(&key, "127.0.0.1:0".parse()?, &[ALPN_BLOB]).context("endpoint")?;
    let dir = tempfile::tempdir()?;
    let store = BlobStore::open(dir.path(), None)?;
    let server = BlobServer::new(store.clone(), ServeLimits::default());
    let opts = FetchOptions {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        stall_timeout: Duration::from_secs(20),
        ..FetchOptions::default()
    };
    let fetcher = Fetcher::with_options(ep.clone(), store.clone(), Some(server.clone()), opts);
    let accept = ep.clone();
    let srv0 = server.clone();
    tokio::spawn(async move {
        let server = srv0;
        while let Some(incoming) = accept.accept().await {
            let srv = server.clone();
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

/// The primes module padded with a custom section to `size` bytes: many chunks, and the
/// same behaviour (custom sections are ignored by the engine).
fn padded_module(size: usize) -> Vec<u8> {
    let mut wasm = std::fs::read(PRIMES_WASM).expect("examples/primes/primes.wasm");
    let name = b"peergrid-padding";
    let payload = size.saturating_sub(wasm.len() + name.len() + 8);
    let mut section = Vec::new();
    leb(&mut section, name.len() as u64);
    section.extend_from_slice(name);
    section.extend((0..payload).map(|i| (i * 31 % 251) as u8));
    wasm.push(0); // custom section id
    leb(&mut wasm, section.len() as u64);
    wasm.extend_from_slice(&section);
    wasm
}

fn leb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// How a corrupter lies.
#[derive(Debug, Clone, Copy)]
enum Lie {
    /// The stored blob has a flipped byte in every chunk (served by the real `BlobServer`).
    EveryChunk,
    /// ... in every other chunk: honest half the time.
    EveryOtherChunk,
    /// A hand-written server: honest `Outboard` and `Have`, random bytes for `Chunks`.
    RandomBytes,
}

/// Flip one byte in the chunks `pick` selects, on disk, behind the store's back (stores trust
/// what they verified when writing).
fn corrupt_on_disk(n: &Node, blob: BlobRef, pick: impl Fn(u64) -> bool) -> anyhow::Result<()> {
    let path = n.store.dir().join(blob.id.to_string());
    let mut bytes = std::fs::read(&path)?;
    for (i, at) in (0..bytes.len()).step_by(CHUNK_SIZE).enumerate() {
        if pick(i as u64) {
            let j = (at + 1000 + i * 7).min(bytes.len() - 1);
            bytes[j] ^= 0x20;
        }
    }
    std::fs::write(&path, bytes)?;
    Ok(())
}

async fn random_bytes_server(
    data: Arc<Vec<u8>>,
    served: Arc<AtomicU64>,
) -> anyhow::Result<PeerAddr> {
    let key = NodeKey::generate();
    let ep = net::endpoint(&key, "127.0.0.1:0".parse()?, &[ALPN_BLOB])?;
    let peer = PeerAddr {
        node_id: key.node_id(),
        addr: ep.local_addr()?,
    };
    let ob = Arc::new(Outboard::compute(&data));
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let ob = ob.clone();
            let served = served.clone();
            let size = data.len() as u64;
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let ob = ob.clone();
                    let served = served.clone();
                    tokio::spawn(async move {
                        let Ok(Some(req)) = net::read_frame::<BlobRequest>(&mut recv).await else {
                            return;
                        };
                        match req {
                            BlobRequest::Outboard { .. } => {
                                let _ = net::write_frame(
                                    &mut send,
                                    &BlobResponse::Outboard {
                                        size,
                                        cvs: ob.cvs().to_vec(),
                                    },
                                )
                                .await;
                            }
                            BlobRequest::Have { .. } => {
                                let chunks = vec![true; ob.blob().chunk_count() as usize];
                                let _ = net::write_frame(
                                    &mut send,
                                    &BlobResponse::Have { size, chunks },
                                )
                                .await;
                            }
                            BlobRequest::Chunks { start, count, .. } => {
                                let b = ob.blob();
                                let end = (start + count as u64).min(b.chunk_count());
                                let len = b.chunk_range(end - 1).end - b.chunk_range(start).start;
                                let _ = net::write_frame(
                                    &mut send,
                                    &BlobResponse::Chunks { start, count, len },
                                )
                                .await;
                                let junk: Vec<u8> =
                                    (0..len).map(|_| rand::random::<u8>()).collect();
                                served.fetch_add(len, Ordering::Relaxed);
                                let _ = send.write_all(&junk).await;
                            }
                        }
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    });
                }
            });
        }
    });
    Ok(peer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_poisoned_peers_every_download_verifies_corrupters_flagged_module_runs_right(
) -> anyhow::Result<()> {
    let (holders, fetchers, size) = if full() {
        (20, 16, 16 << 20)
    } else {
        (10, 8, 4 << 20)
    };
    let corrupters = holders * 3 / 10;
    let data = Arc::new(padded_module(size));
    let blob = BlobRef::of(&data);

    // The seed (as the coordinator is) and the holders; the first `corrupters` lie.
    let seed = node()?;
    seed.store.put(&data)?;
    let mut peers = Vec::new();
    let mut bad: HashSet<NodeId> = HashSet::new();
    let lies = [Lie::EveryChunk, Lie::EveryOtherChunk, Lie::RandomBytes];
    let mut keep = Vec::new();
    // Corrupt bytes each corrupter sent: (node, counter of its server).
    let mut lied: Vec<(NodeId, Box<dyn Fn() -> u64>)> = Vec::new();
    for i in 0..holders {
        if i < corrupters && matches!(lies[i % 3], Lie::RandomBytes) {
            let served = Arc::new(AtomicU64::new(0));
            let p = random_bytes_server(data.clone(), served.clone()).await?;
            lied.push((p.node_id, Box::new(move || served.load(Ordering::Relaxed))));
            bad.insert(p.node_id);
            peers.push(p);
            continue;
        }
        let n = node()?;
        n.store.put(&data)?;
        if i < corrupters {
            match lies[i % 3] {
                Lie::EveryChunk => corrupt_on_disk(&n, blob, |_| true)?,
                _ => corrupt_on_disk(&n, blob, |c| c % 2 == 0)?,
            }
            bad.insert(n.peer.node_id);
            let server = n.server.clone();
            lied.push((n.peer.node_id, Box::new(move || server.bytes_sent())));
        }
        peers.push(n.peer.clone());
        keep.push(n);
    }

    // Workers fetch at once, each with the holders in its own random order, the seed last;
    // for half of them the corrupters come first (as if they had pushed themselves forward).
    let workers: Vec<Node> = (0..fetchers).map(|_| node()).collect::<Result<_, _>>()?;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, w) in workers.iter().enumerate() {
        let mut list = peers.clone();
        list.shuffle(&mut rand::thread_rng());
        if i % 2 == 1 {
            list.sort_by_key(|p| !bad.contains(&p.node_id));
        }
        list.push(seed.peer.clone());
        let f = w.fetcher.clone();
        set.spawn(async move {
            (
                i,
                tokio::time::timeout(Duration::from_secs(120), f.fetch(blob, &list)).await,
            )
        });
    }
    let (mut completed, mut flagged, mut honest_flagged, mut flags) = (0, HashSet::new(), 0, 0);
    let mut from_corrupters = 0u64;
    let mut failures = Vec::new();
    while let Some(r) = set.join_next().await {
        let (i, r) = r?;
        match r {
            Ok(Ok(report)) => {
                completed += 1;
                for p in &report.bad_peers {
                    flags += 1;
                    if bad.contains(p) {
                        flagged.insert(*p);
                    } else {
                        honest_flagged += 1;
                    }
                }
                from_corrupters += report
                    .bytes_by_peer
                    .iter()
                    .filter(|(p, _)| bad.contains(p))
                    .map(|(_, b)| b)
                    .sum::<u64>();
            }
            Ok(Err(e)) => failures.push(format!("worker {i}: {e}")),
            Err(_) => failures.push(format!("worker {i}: fetch hung for 120 s")),
        }
    }
    let elapsed = started.elapsed();
    // What is stored is the original, byte for byte, everywhere.
    let intact = workers
        .iter()
        .filter(|w| w.store.read(&blob.id).is_ok_and(|b| b == *data))
        .count();

    // A module fetched through the poisoned swarm runs exactly like the original.
    let pick = rand::thread_rng().gen_range(0..workers.len());
    let fetched = workers[pick].store.read(&blob.id)?;
    // The sandbox blocks: off the async threads, as the daemon runs it.
    let (want, got) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let sandbox = Sandbox::new(SandboxConfig::default())?;
        let spec = RunSpec {
            argv: vec![
                "primes".into(),
                "block".into(),
                "3".into(),
                "1000000".into(),
            ],
            fuel: 1_000_000_000,
            memory_mb: 32,
            max_output: 64,
            ..RunSpec::default()
        };
        let original = std::fs::read(PRIMES_WASM)?;
        let want = sandbox
            .run_bytes(&original, &spec, &RunControl::default())
            .expect("not cancelled");
        let got = sandbox
            .run_bytes(&fetched, &spec, &RunControl::default())
            .expect("not cancelled");
        Ok((want, got))
    })
    .await??;
    let same_digest = got.result.digest() == want.result.digest() && got.output == want.output;

    // Every corrupter that got to send chunk bytes was caught.
    let sent_chunks: Vec<NodeId> = lied
        .iter()
        .filter(|(_, f)| f() > 0)
        .map(|(n, _)| *n)
        .collect();
    let unflagged_liars = sent_chunks.iter().filter(|n| !flagged.contains(*n)).count();
    let met = failures.is_empty()
        && intact == fetchers
        && unflagged_liars == 0
        && !sent_chunks.is_empty()
        && honest_flagged == 0
        && same_digest;
    println!(
        "FAULT|poison|{corrupters} of {holders} peers (30%) serve corrupt chunks (flipped byte in every chunk / every other chunk / random bytes), {fetchers} workers fetch a {} MiB module ({} chunks) at once|{completed}/{fetchers} downloads complete, {intact}/{fetchers} stores hold the exact original, {} of {} corrupters sent chunks and {} of those were flagged as bad peers ({}/{} corrupters flagged in all, {flags} flags, {honest_flagged} honest peers flagged), {from_corrupters} verified bytes taken from corrupters' honest chunks, module from the swarm runs with the original digest: {same_digest}, {:.1} s|every download completes and verifies, corrupters banned, no corrupt byte executed|{}",
        size >> 20, blob.chunk_count(), sent_chunks.len(), bad.len(), sent_chunks.len() - unflagged_liars, flagged.len(), bad.len(), elapsed.as_secs_f64(), if met { "yes" } else { "no" }
    );
    assert!(failures.is_empty(), "downloads failed: {failures:?}");
    assert_eq!(
        intact, fetchers,
        "a store holds something other than the original"
    );
    assert_eq!(honest_flagged, 0, "an honest peer was flagged");
    assert!(
        !sent_chunks.is_empty(),
        "no corrupter got to send a chunk: the test did not exercise poisoning"
    );
    assert_eq!(
        unflagged_liars, 0,
        "a corrupter sent chunks and was not flagged"
    );
    assert!(
        same_digest,
        "the module fetched through poisoned peers ran differently: {:?} vs {:?}",
        got.result, want.result
    );
    assert_eq!(
        want.result.status,
        tasks::Status::Ok,
        "the original module runs: {:?}",
        want.error
    );
    Ok(())
}
