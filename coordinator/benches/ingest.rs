//! Result ingest: validated results per second through the durable store path (SQLite WAL,
//! `synchronous = FULL`, group commit), driven by simulated workers (no wasm), printed beside
//! a raw SQLite batch-insert baseline measured in the same run.
//!
//! - `engine`: workers in-process send RequestWork / Reports to the engine thread (core +
//!   store), exactly as QUIC sessions do, and wait for each batch's acknowledgement;
//! - `quic`: the same over loopback QUIC against a coordinator started in-process, workers
//!   speaking `peergrid/coord/1`;
//! - `sqlite raw`: plain INSERTs of result-sized rows, 1000 per transaction, same pragmas.
//!
//! `cargo bench -p coordinator --bench ingest`; `PEERGRID_BENCH_SMOKE=1` for a quick run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use coordinator::core::{Core, CoreConfig};
use coordinator::server::engine::{self, Cmd, HelloInfo};
use coordinator::server::{Coordinator, ServeConfig};
use coordinator::store::{SqliteStore, Store};
use tasks::job::{JobLimits, TaskEntry};
use tasks::net;
use tasks::wire::{self, CoordMsg, WorkerMsg, ALPN_COORD};
use tasks::{BlobId, BlobRef, EngineFingerprint, JobManifest, NodeId, NodeKey, RunResult, Status};

struct Sizes {
    tasks: u32,
    workers: usize,
    batch: u32,
    raw_rows: u64,
}

fn fp() -> EngineFingerprint {
    EngineFingerprint {
        engine: "wasmtime bench".into(),
        arch: "x86_64-linux".into(),
        settings: "det".into(),
    }
}

fn manifest(tasks: u32) -> JobManifest {
    JobManifest {
        name: "bench".into(),
        module: BlobRef::of(b"bench module"),
        limits: JobLimits {
            quorum: 2,
            max_replicas: 4,
            ..JobLimits::default()
        },
        tasks: (0..tasks)
            .map(|i| TaskEntry {
                args: vec![i.to_string()],
                input: None,
            })
            .collect(),
    }
}

fn result_for(task: &tasks::TaskManifest) -> (RunResult, Vec<u8>) {
    let out = format!("{}\n", task.id.index).into_bytes();
    let r = RunResult {
        status: Status::Ok,
        exit_code: 0,
        trap: String::new(),
        fuel_used: 1_000_000 + task.id.index as u64,
        output_hash: BlobId::of(&out),
        output_len: out.len() as u64,
    };
    (r, out)
}

fn core_config(batch: u32) -> CoreConfig {
    let mut cfg = CoreConfig::default();
    // Let each simulated worker hold a whole batch.
    cfg.policy.in_flight_per_slot = 2;
    cfg.open_scan_limit = 4 * batch as usize;
    cfg
}

/// Raw SQLite: result-sized rows, `batch` per transaction, WAL + synchronous=FULL.
fn sqlite_raw(rows: u64, batch: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("raw.db")).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.pragma_update(None, "cache_size", -65536).unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 8192)
        .unwrap();
    conn.execute_batch("CREATE TABLE r (id INTEGER PRIMARY KEY, job INTEGER, idx INTEGER, worker BLOB, result BLOB)").unwrap();
    let worker = [7u8; 32];
    let result =
        postcard::to_stdvec(&result_for(&manifest(1).task(tasks::JobId(1), 0).unwrap()).0).unwrap();
    let mut conn = conn;
    let t = Instant::now();
    let mut id = 0u64;
    while id < rows {
        let tx = conn.transaction().unwrap();
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO r (id, job, idx, worker, result) VALUES (?1, 1, ?2, ?3, ?4)",
                )
                .unwrap();
            for _ in 0..batch.min(rows - id) {
                st.execute(rusqlite::params![
                    id as i64,
                    id as i64,
                    &worker[..],
                    &result
                ])
                .unwrap();
                id += 1;
            }
        }
        tx.commit().unwrap();
    }
    rows as f64 / t.elapsed().as_secs_f64()
}

struct Run {
    reports: u64,
    accepted: u32,
    elapsed: Duration,
}

/// A store that forgets everything: isolates the core and engine cost.
struct NullStore;

impl Store for NullStore {
    fn load(&mut self) -> Result<coordinator::store::Snapshot, coordinator::store::StoreError> {
        Ok(Default::default())
    }
    fn commit(
        &mut self,
        _: &[coordinator::store::Mutation],
    ) -> Result<(), coordinator::store::StoreError> {
        Ok(())
    }
    fn task_results(
        &mut self,
        _: tasks::JobId,
    ) -> Result<
        Vec<(tasks::wire::TaskResult, Option<coordinator::store::Output>)>,
        coordinator::store::StoreError,
    > {
        Ok(vec![])
    }
    fn task_results_range(
        &mut self,
        _: tasks::JobId,
        _: u32,
        _: u32,
    ) -> Result<
        Vec<(tasks::wire::TaskResult, Option<coordinator::store::Output>)>,
        coordinator::store::StoreError,
    > {
        Ok(vec![])
    }
    fn task_failures(
        &mut self,
        job: tasks::JobId,
        _: Option<u32>,
        _: u32,
    ) -> Result<tasks::wire::FailurePage, coordinator::store::StoreError> {
        Ok(tasks::wire::FailurePage {
            job,
            total: 0,
            failures: vec![],
            more: false,
        })
    }
    fn outputs_missing(
        &mut self,
    ) -> Result<Vec<(tasks::TaskId, RunResult, Vec<NodeId>)>, coordinator::store::StoreError> {
        Ok(vec![])
    }
}

/// Simulated workers in-process, talking to the engine thread through its channel.
async fn engine_path(s: &Sizes) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SqliteStore::open(&dir.path().join(SqliteStore::FILE)).unwrap();
    let mut core = Core::new(core_config(s.batch));
    core.add_job(manifest(s.tasks), engine::now_ms());
    store.commit(&core.take_mutations()).unwrap();
    drive(s, core, store, &dir).await
}

/// The same without durability: what the core and engine cost on their own.
async fn engine_null(s: &Sizes) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let mut core = Core::new(core_config(s.batch));
    core.add_job(manifest(s.tasks), engine::now_ms());
    core.take_mutations();
    drive(s, core, NullStore, &dir).await
}

async fn drive<S: Store + 'static>(
    s: &Sizes,
    core: Core,
    store: S,
    dir: &tempfile::TempDir,
) -> Run {
    let blobs = blobs::BlobStore::open(&dir.path().join("blobs"), None).unwrap();
    let (handle, _fetches, thread) =
        engine::spawn(core, store, blobs, 16384, Default::default()).unwrap();
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..s.workers {
        let handle = handle.clone();
        let batch = s.batch;
        set.spawn(async move {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(w as u64 + 1).to_le_bytes());
            let worker = NodeId(id);
            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
            let info = HelloInfo { fingerprint: fp(), slots: batch, observed_addr: "127.0.0.1:1".parse().unwrap(), blobs: vec![] };
            handle.call(|reply| Cmd::Hello { worker, session: w as u64, info, tx, reply }).await.unwrap();
            let mut reports = 0u64;
            loop {
                let work = handle.call(|reply| Cmd::RequestWork { worker, max: batch, reply }).await.unwrap();
                if work.assignments.is_empty() {
                    break;
                }
                let rs: Vec<wire::Report> = work
                    .assignments
                    .iter()
                    .map(|a| {
                        let (result, out) = result_for(&a.task);
                        wire::Report { replica: a.replica, result, output: Some(out), wall_ms: 1 }
                    })
                    .collect();
                let n = rs.len() as u64;
                let acks = handle.call(|reply| Cmd::Reports { worker, reports: rs, reply }).await.unwrap();
                assert!(matches!(acks.first(), Some(CoordMsg::Ack { replicas }) if replicas.len() as u64 == n), "{acks:?}");
                reports += n;
            }
            reports
        });
    }
    let mut reports = 0;
    while let Some(r) = set.join_next().await {
        reports += r.unwrap();
    }
    let elapsed = start.elapsed();
    let st = handle
        .call(|reply| Cmd::Status { job: None, reply })
        .await
        .unwrap()
        .unwrap();
    drop(handle);
    tokio::task::spawn_blocking(move || thread.join().unwrap().unwrap())
        .await
        .unwrap();
    Run {
        reports,
        accepted: st.jobs[0].tasks_done,
        elapsed,
    }
}

/// The same over loopback QUIC: coordinator in-process, workers as QUIC sessions.
async fn quic_path(s: &Sizes) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServeConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    cfg.core = core_config(s.batch);
    let coord = Coordinator::start(cfg).await.unwrap();
    let client = coordinator::client::Client::connect(&coord.ticket, &coord.token)
        .await
        .unwrap();
    let m = manifest(s.tasks);
    let blobs: BTreeMap<BlobId, Vec<u8>> = [(m.module.id, b"bench module".to_vec())].into();
    let (job, _) = client.submit_manifest(m, &blobs).await.unwrap();
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..s.workers {
        let ticket = coord.ticket.clone();
        let batch = s.batch;
        set.spawn(async move {
            let key = NodeKey::generate();
            let ep = net::endpoint(&key, "127.0.0.1:0".parse().unwrap(), &[]).unwrap();
            let conn = net::connect(
                &ep,
                ticket.socket_addrs().unwrap()[0],
                ticket.node_id,
                ALPN_COORD,
            )
            .await
            .unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let hello = WorkerMsg::Hello {
                agent: "bench".into(),
                fingerprint: fp(),
                slots: batch,
                peer_addr: None,
                blobs: vec![],
            };
            net::write_frame(&mut send, &hello).await.unwrap();
            let _welcome: CoordMsg = net::read_frame(&mut recv).await.unwrap().unwrap();
            let mut reports = 0u64;
            loop {
                net::write_frame(&mut send, &WorkerMsg::RequestWork { max: batch })
                    .await
                    .unwrap();
                let assignments = loop {
                    match net::read_frame::<CoordMsg>(&mut recv)
                        .await
                        .unwrap()
                        .unwrap()
                    {
                        CoordMsg::Assign { assignments, .. } => break assignments,
                        CoordMsg::Cancel { .. }
                        | CoordMsg::Reachability { .. }
                        | CoordMsg::Punch { .. } => continue,
                        other => panic!("{other:?}"),
                    }
                };
                if assignments.is_empty() {
                    break;
                }
                let rs: Vec<wire::Report> = assignments
                    .iter()
                    .map(|a| {
                        let (result, out) = result_for(&a.task);
                        wire::Report {
                            replica: a.replica,
                            result,
                            output: Some(out),
                            wall_ms: 1,
                        }
                    })
                    .collect();
                reports += rs.len() as u64;
                net::write_frame(&mut send, &WorkerMsg::Reports(rs))
                    .await
                    .unwrap();
                loop {
                    match net::read_frame::<CoordMsg>(&mut recv)
                        .await
                        .unwrap()
                        .unwrap()
                    {
                        CoordMsg::Ack { .. } => break,
                        CoordMsg::Cancel { .. }
                        | CoordMsg::Reachability { .. }
                        | CoordMsg::Punch { .. } => continue,
                        other => panic!("{other:?}"),
                    }
                }
            }
            net::close(&conn, wire::CloseCode::Done, "done");
            reports
        });
    }
    let mut reports = 0;
    while let Some(r) = set.join_next().await {
        reports += r.unwrap();
    }
    let elapsed = start.elapsed();
    let st = client.status(Some(job)).await.unwrap();
    client.close().await;
    coord.shutdown().await.unwrap();
    Run {
        reports,
        accepted: st.jobs[0].tasks_done,
        elapsed,
    }
}

fn print(name: &str, r: &Run, baseline: f64) {
    let rate = r.reports as f64 / r.elapsed.as_secs_f64();
    println!(
        "{name:<28} {:>9} results in {:>7.3}s = {:>9.0} validated results/s ({:>8.0} accepted tasks/s; {:.2}x raw insert)",
        r.reports,
        r.elapsed.as_secs_f64(),
        rate,
        r.accepted as f64 / r.elapsed.as_secs_f64(),
        rate / baseline
    );
}

fn main() {
    let smoke = std::env::var_os("PEERGRID_BENCH_SMOKE").is_some();
    let s = if smoke {
        Sizes {
            tasks: 5_000,
            workers: 8,
            batch: 128,
            raw_rows: 20_000,
        }
    } else {
        Sizes {
            tasks: 200_000,
            workers: 32,
            batch: 256,
            raw_rows: 1_000_000,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "ingest benchmark{}: {} tasks x quorum 2, {} simulated workers, {} replicas per request, SQLite WAL synchronous=FULL",
        if smoke { " (smoke)" } else { "" },
        s.tasks,
        s.workers,
        s.batch
    );
    let raw = sqlite_raw(s.raw_rows, 1000);
    println!(
        "{:<28} {:>9} rows                        = {:>9.0} rows/s (1000 per transaction)",
        "sqlite raw batch insert", s.raw_rows, raw
    );
    let n = rt.block_on(engine_null(&s));
    print("engine, no store (diag.)", &n, raw);
    let e = rt.block_on(engine_path(&s));
    assert_eq!(e.accepted, s.tasks, "every task accepted");
    print("engine (core+store)", &e, raw);
    let q = rt.block_on(quic_path(&s));
    assert_eq!(q.accepted, s.tasks, "every task accepted");
    print("loopback QUIC sessions", &q, raw);
    let target = 50_000.0;
    let best = e.reports as f64 / e.elapsed.as_secs_f64();
    println!(
        "target >= {target:.0} validated results/s: {}",
        if best >= target { "met" } else { "NOT met" }
    );
}
