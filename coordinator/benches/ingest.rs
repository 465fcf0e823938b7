//! Result ingest: validated results per second through the durable store path (SQLite WAL,
//! `synchronous = FULL`, group commit; and PostgreSQL, `synchronous_commit = on`), driven by
//! simulated workers (no wasm), printed beside a raw SQLite batch-insert baseline measured
//! in the same run.
//!
//! - `engine`: workers in-process send RequestWork / Reports to the engine thread (core +
//!   store), exactly as QUIC sessions do, and wait for each batch's acknowledgement. Run on
//!   SQLite and on PostgreSQL (a throwaway local server on a Unix socket, started by the
//!   bench; skipped with one line where none is installed), interleaved, `ROUNDS` times
//!   each; the medians are printed, with the work-request latency (median and p99 of each
//!   RequestWork call, which waits for its batch's commit);
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
use coordinator::store::postgres::throwaway::ThrowawayPostgres;
use coordinator::store::{PostgresStore, SqliteStore, Store};
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
    /// Every RequestWork call's duration (empty for the QUIC path).
    requests: Vec<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.reports as f64 / self.elapsed.as_secs_f64()
    }

    /// (median, p99) of the work-request latency, in ms.
    fn latency_ms(&self) -> (f64, f64) {
        let mut v = self.requests.clone();
        v.sort();
        if v.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
        (at(0.5), at(0.99))
    }
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

/// The job in a fresh store (on the caller's plain thread: the PostgreSQL client must not
/// run inside the async runtime).
fn prepared<S: Store>(s: &Sizes, mut store: S) -> (Core, S) {
    let mut core = Core::new(core_config(s.batch));
    core.add_job(manifest(s.tasks), engine::now_ms());
    store.commit(&core.take_mutations()).unwrap();
    (core, store)
}

/// Simulated workers in-process, talking to the engine thread through its channel.
fn engine_path<S: Store + 'static>(rt: &tokio::runtime::Runtime, s: &Sizes, store: S) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let (core, store) = prepared(s, store);
    rt.block_on(drive(s, core, store, &dir))
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
    // Off the runtime: spawning reads the store (the PostgreSQL client runs its own runtime).
    let (handle, _fetches, thread) = tokio::task::block_in_place(|| {
        engine::spawn(core, store, blobs, 16384, Default::default()).unwrap()
    });
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
            let mut requests = Vec::new();
            loop {
                let asked = Instant::now();
                let work = handle.call(|reply| Cmd::RequestWork { worker, max: batch, reply }).await.unwrap();
                requests.push(asked.elapsed());
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
            (reports, requests)
        });
    }
    let (mut reports, mut requests) = (0, Vec::new());
    while let Some(r) = set.join_next().await {
        let (n, mut l) = r.unwrap();
        reports += n;
        requests.append(&mut l);
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
        requests,
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
        requests: Vec::new(),
    }
}

fn print(name: &str, r: &Run, baseline: f64) {
    let rate = r.rate();
    let latency = if r.requests.is_empty() {
        String::new()
    } else {
        let (p50, p99) = r.latency_ms();
        format!("; work request median {p50:.1} ms, p99 {p99:.1} ms")
    };
    println!(
        "{name:<28} {:>9} results in {:>7.3}s = {:>9.0} validated results/s ({:>8.0} accepted tasks/s; {:.2}x raw insert{latency})",
        r.reports,
        r.elapsed.as_secs_f64(),
        rate,
        r.accepted as f64 / r.elapsed.as_secs_f64(),
        rate / baseline
    );
}

/// The run with the median rate.
fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    let mid = runs.len() / 2;
    runs.swap_remove(mid)
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
    // Engine runs per store, interleaved (SQLite, PostgreSQL, SQLite, ...) so both see the
    // same background load; the medians are printed.
    let rounds: usize = std::env::var("PEERGRID_BENCH_INGEST_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke { 1 } else { 3 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "ingest benchmark{}: {} tasks x quorum 2, {} simulated workers, {} replicas per request, SQLite WAL synchronous=FULL and PostgreSQL synchronous_commit=on, {rounds} engine run(s) per store",
        if smoke { " (smoke)" } else { "" },
        s.tasks,
        s.workers,
        s.batch
    );
    let pg = match ThrowawayPostgres::start() {
        Ok(Some(pg)) => Some(pg),
        Ok(None) => {
            println!(
                "postgres: {}",
                coordinator::store::postgres::throwaway::SKIPPED
            );
            None
        }
        Err(e) => {
            println!("postgres: skipped: cannot start a throwaway server: {e}");
            None
        }
    };
    let raw = sqlite_raw(s.raw_rows, 1000);
    println!(
        "{:<28} {:>9} rows                        = {:>9.0} rows/s (1000 per transaction)",
        "sqlite raw batch insert", s.raw_rows, raw
    );
    let n = rt.block_on(engine_null(&s));
    print("engine, no store (diag.)", &n, raw);
    let (mut on_sqlite, mut on_pg) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join(SqliteStore::FILE)).unwrap();
        let e = engine_path(&rt, &s, store);
        assert_eq!(e.accepted, s.tasks, "every task accepted");
        println!("  round {round}: SQLite {:.0} results/s", e.rate());
        on_sqlite.push(e);
        if let Some(pg) = &pg {
            let url = pg.fresh_database().unwrap();
            let mut store = PostgresStore::open(&url).unwrap();
            // Fenced like a real coordinator on PostgreSQL: every commit checks the lease.
            let epoch = coordinator::ha::acquire_at(
                &url,
                "ingest-bench",
                "bench@127.0.0.1:0",
                std::time::Duration::from_secs(3600),
            )
            .unwrap()
            .expect("a fresh database's lease is free");
            store
                .fence(epoch, coordinator::ha::LeaseConfig::default().ttl)
                .unwrap();
            let e = engine_path(&rt, &s, store);
            assert_eq!(e.accepted, s.tasks, "every task accepted");
            println!("  round {round}: PostgreSQL {:.0} results/s", e.rate());
            on_pg.push(e);
        }
    }
    let e = median(on_sqlite);
    print("engine (core+store)", &e, raw);
    let p = (!on_pg.is_empty()).then(|| median(on_pg));
    if let Some(p) = &p {
        print("engine, PostgreSQL store", p, raw);
    }
    let q = rt.block_on(quic_path(&s));
    assert_eq!(q.accepted, s.tasks, "every task accepted");
    print("loopback QUIC sessions", &q, raw);
    let target = 50_000.0;
    println!(
        "target >= {target:.0} validated results/s: {}",
        if e.rate() >= target { "met" } else { "NOT met" }
    );
    if let Some(p) = &p {
        let target = 20_000.0;
        println!(
            "target >= {target:.0} validated results/s on PostgreSQL: {}",
            if p.rate() >= target { "met" } else { "NOT met" }
        );
    }
}
