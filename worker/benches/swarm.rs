//! Blob swarm benchmark (`cargo bench -p worker --bench swarm`), on loopback QUIC.
//!
//! (a) The seed's (coordinator's) upload when N workers each need one blob, as a multiple
//!     of the blob size, swarm vs central-server-only (every worker fetches from the seed
//!     only), with wall times, in the same run.
//! (b) One verified peer-to-peer fetch (into a store on disk) vs a raw quinn stream copy of
//!     the same bytes over the same kind of endpoint, in the same run.
//!
//! Env: `PEERGRID_BENCH_SMOKE=1` (4 workers, 4 MiB, 1 run); `PEERGRID_BENCH_WORKERS`,
//! `PEERGRID_BENCH_MIB`, `PEERGRID_BENCH_RUNS` override the sizes (default 32, 64, 3).
//! All nodes share this process and the machine's cores: on loopback the swarm cannot beat
//! the central server on wall time (there is no uplink to saturate); it shows what the
//! swarm costs in time for what it saves the seed.

use std::time::{Duration, Instant};

use anyhow::Context;
use tasks::net;
use tasks::wire::{PeerAddr, ALPN_BLOB};
use tasks::{BlobRef, NodeKey};
use worker::blobs::BlobStore;
use worker::swarm::{BlobServer, Fetcher, ServeLimits};

const ALPN_RAW: &[u8] = b"peergrid-bench/raw";

struct Node {
    peer: PeerAddr,
    store: BlobStore,
    server: BlobServer,
    fetcher: Fetcher,
    ep: quinn::Endpoint,
    _dir: tempfile::TempDir,
}

fn node(limits: ServeLimits) -> anyhow::Result<Node> {
    let key = NodeKey::generate();
    let ep = net::endpoint(&key, "127.0.0.1:0".parse()?, &[ALPN_BLOB])?;
    let dir = tempfile::tempdir()?;
    let store = BlobStore::open(dir.path(), None)?;
    let server = BlobServer::new(store.clone(), limits);
    let fetcher = Fetcher::new(ep.clone(), store.clone(), Some(server.clone()));
    let (accept_ep, srv) = (ep.clone(), server.clone());
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
        ep,
        _dir: dir,
    })
}

fn blob_data(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut x = 0x9E3779B97F4A7C15u64;
    for c in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    out
}

/// N fresh workers fetch `blob`; returns (wall time, seed bytes sent).
async fn distribute(
    seed: &Node,
    blob: BlobRef,
    workers: usize,
    swarm: bool,
) -> anyhow::Result<(Duration, u64)> {
    let nodes: Vec<Node> = (0..workers)
        .map(|_| node(ServeLimits::default()))
        .collect::<Result<_, _>>()?;
    let before = seed.server.bytes_sent();
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, w) in nodes.iter().enumerate() {
        let mut peers: Vec<PeerAddr> = if swarm {
            nodes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, o)| o.peer.clone())
                .collect()
        } else {
            Vec::new()
        };
        peers.push(seed.peer.clone());
        let f = w.fetcher.clone();
        set.spawn(async move { f.fetch(blob, &peers).await });
    }
    while let Some(r) = set.join_next().await {
        r?.context("fetch")?;
    }
    let wall = started.elapsed();
    for w in &nodes {
        anyhow::ensure!(w.store.has(&blob.id), "a worker lacks the blob");
        w.ep.close(0u32.into(), b"done");
    }
    Ok((wall, seed.server.bytes_sent() - before))
}

/// Raw copy: the server writes the bytes on one stream, the client reads them all.
async fn raw_copy(data: std::sync::Arc<Vec<u8>>) -> anyhow::Result<Duration> {
    let skey = NodeKey::generate();
    let sep = net::endpoint(&skey, "127.0.0.1:0".parse()?, &[ALPN_RAW])?;
    let addr = sep.local_addr()?;
    let server = tokio::spawn(async move {
        let conn = sep.accept().await.context("no connection")?.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let _ = recv.read_to_end(64).await?;
        send.write_all(&data).await?;
        send.finish()?;
        let _ = conn.closed().await;
        anyhow::Ok(())
    });
    let cep = net::endpoint(&NodeKey::generate(), "127.0.0.1:0".parse()?, &[])?;
    let started = Instant::now();
    let conn = net::connect(&cep, addr, skey.node_id(), ALPN_RAW).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(b"go").await?;
    send.finish()?;
    let mut total = 0usize;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        total += chunk.bytes.len();
    }
    let took = started.elapsed();
    conn.close(0u32.into(), b"done");
    let _ = server.await;
    anyhow::ensure!(total > 0);
    Ok(took)
}

async fn p2p_fetch(source: &Node, blob: BlobRef) -> anyhow::Result<Duration> {
    let me = node(ServeLimits::default())?;
    let started = Instant::now();
    me.fetcher
        .fetch(blob, std::slice::from_ref(&source.peer))
        .await?;
    let took = started.elapsed();
    anyhow::ensure!(me.store.has(&blob.id));
    me.ep.close(0u32.into(), b"done");
    Ok(took)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let smoke = std::env::var_os("PEERGRID_BENCH_SMOKE").is_some_and(|v| v != "0");
    let workers = env("PEERGRID_BENCH_WORKERS", if smoke { 4 } else { 32 });
    let mib = env("PEERGRID_BENCH_MIB", if smoke { 4 } else { 64 });
    let runs = env("PEERGRID_BENCH_RUNS", if smoke { 1 } else { 3 }).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let data = std::sync::Arc::new(blob_data(mib << 20));
        let size = data.len() as f64;
        let swarm_seed = node(ServeLimits::seed())?;
        let central_seed = node(ServeLimits { max_concurrent_uploads: workers.max(8), ..ServeLimits::default() })?;
        let blob = swarm_seed.store.put(&data)?;
        central_seed.store.put(&data)?;
        println!("swarm benchmark: {workers} workers, {mib} MiB blob, {runs} run(s), {} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));

        let (mut s_wall, mut s_up, mut c_wall, mut c_up) = (vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            let (w, up) = distribute(&swarm_seed, blob, workers, true).await?;
            s_wall.push(w.as_secs_f64());
            s_up.push(up as f64 / size);
            let (w, up) = distribute(&central_seed, blob, workers, false).await?;
            c_wall.push(w.as_secs_f64());
            c_up.push(up as f64 / size);
        }
        let (mut raw, mut p2p) = (vec![], vec![]);
        for _ in 0..runs {
            raw.push(raw_copy(data.clone()).await?.as_secs_f64());
            p2p.push(p2p_fetch(&central_seed, blob).await?.as_secs_f64());
        }
        let mbps = |secs: f64| (mib as f64) / secs;
        let (sw, su, cw, cu) = (median(&mut s_wall), median(&mut s_up), median(&mut c_wall), median(&mut c_up));
        let (r, p) = (median(&mut raw), median(&mut p2p));
        println!();
        let row = |name: String, up: String, wall: f64, tput: f64| {
            println!("| {name:<48} | {up:>11} | {wall:>8.3} s | {tput:>7.0} MiB/s |");
        };
        println!("| {:<48} | seed upload | wall time  | throughput    |", format!("scenario (median of {runs})"));
        println!("|{}|-------------|------------|---------------|", "-".repeat(50));
        row(format!("(a) swarm: {workers} workers x {mib} MiB, seed last"), format!("{su:.2}x"), sw, mbps(sw) * workers as f64);
        row("(a) central server only".into(), format!("{cu:.2}x"), cw, mbps(cw) * workers as f64);
        row(format!("(b) raw quinn stream copy, {mib} MiB"), "-".into(), r, mbps(r));
        row(format!("(b) verified p2p fetch into a store, {mib} MiB"), "-".into(), p, mbps(p));
        println!();
        println!("(a) seed upload, swarm: {su:.2}x the blob (target <= 1.2x; central: {cu:.2}x); wall time swarm/central = {:.2}", sw / cw);
        println!("(b) verified p2p / raw quinn throughput = {:.2} (target >= 0.9)", r / p);
        anyhow::Ok(())
    })
}
