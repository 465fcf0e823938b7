//! The store's behaviour, run against every backend: each test body takes an [`Opener`]
//! that opens the *same* store again (a coordinator restart), and is instantiated once for
//! SQLite and once for PostgreSQL (a throwaway server, see [`super::postgres::throwaway`]).

use super::postgres::throwaway::ThrowawayPostgres;
use super::*;
use crate::core::{Core, CoreConfig};
use tasks::job::{JobLimits, TaskEntry};
use tasks::wire::TaskState;
use tasks::{BlobRef, Status};

/// Opens the store under test (again).
type Opener<'a> = &'a dyn Fn() -> Box<dyn Store>;

/// `migrations_are_idempotent_and_versioned`: opening twice keeps the newest version; a
/// database from a newer coordinator is refused. The backend's own hooks: open, read the
/// version, set the version behind the store's back.
struct Versioning<'a> {
    open: &'a dyn Fn() -> Result<i64, StoreError>,
    set_version: &'a dyn Fn(i64),
    newest: i64,
}

fn migrations_are_idempotent_and_versioned(v: Versioning<'_>) {
    assert_eq!((v.open)().unwrap(), v.newest);
    assert_eq!((v.open)().unwrap(), v.newest, "reopening changes nothing");
    (v.set_version)(99);
    match (v.open)() {
        Err(e @ StoreError::TooNew { found: 99, .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("upgrade the coordinator") && !msg.contains('\n'),
                "{msg}"
            );
        }
        other => panic!("a newer schema must be refused: {other:?}"),
    }
}

/// Instantiate each generic test body once per backend.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            use super::*;
            $(
                #[test]
                fn $name() {
                    let d = tempfile::tempdir().unwrap();
                    let p = d.path().join(SqliteStore::FILE);
                    super::$name(&|| Box::new(SqliteStore::open(&p).unwrap()));
                }
            )*

            #[test]
            fn migrations_are_idempotent_and_versioned() {
                let d = tempfile::tempdir().unwrap();
                let p = d.path().join(SqliteStore::FILE);
                super::migrations_are_idempotent_and_versioned(Versioning {
                    open: &|| SqliteStore::open(&p)?.schema_version(),
                    set_version: &|n| {
                        rusqlite::Connection::open(&p)
                            .unwrap()
                            .execute("UPDATE schema_version SET version = ?1", [n])
                            .unwrap();
                    },
                    newest: schema::MIGRATIONS.len() as i64,
                });
            }
        }

        mod on_postgres {
            use super::*;
            $(
                #[test]
                fn $name() {
                    let Some(pg) = ThrowawayPostgres::for_tests() else { return };
                    let url = pg.fresh_database().unwrap();
                    super::$name(&|| Box::new(PostgresStore::open(&url).unwrap()));
                }
            )*

            #[test]
            fn migrations_are_idempotent_and_versioned() {
                let Some(pg) = ThrowawayPostgres::for_tests() else { return };
                let url = pg.fresh_database().unwrap();
                super::migrations_are_idempotent_and_versioned(Versioning {
                    open: &|| PostgresStore::open(&url)?.schema_version(),
                    set_version: &|n| {
                        ::postgres::Client::connect(&url, ::postgres::NoTls)
                            .unwrap()
                            .execute("UPDATE schema_version SET version = $1", &[&n])
                            .unwrap();
                    },
                    newest: crate::store::postgres::MIGRATIONS.len() as i64,
                });
            }
        }
    };
}

on_every_backend!(
    core_rebuilt_from_store_matches_and_keeps_in_flight_replicas_reportable,
    a_late_agreement_joins_the_agreeing_workers_once,
    losses_survive_a_restart,
    a_jobs_determinism_class_survives_a_restart,
    failures_list_failed_and_non_ok_tasks_in_pages,
);

/// `task_failures`: failed tasks and tasks accepted with a non-ok outcome, in index order,
/// paged; tasks accepted `ok` are not failures.
fn failures_list_failed_and_non_ok_tasks_in_pages(open: Opener) {
    let mut store = open();
    let job = JobId(1);
    let manifest = crate::core::sim::manifest("j", 4, 2, 6, 60);
    let mut trapped = result(2);
    trapped.status = Status::Trap;
    trapped.trap = "unreachable".into();
    let accepted = |index: u32, r: RunResult| Mutation::Decided {
        task: TaskId { job, index },
        decision: Decision::Accepted {
            digest: ResultDigest([index as u8; 32]),
            result: r,
            fingerprint: "f".into(),
            agreeing: vec![NodeId([1; 32])],
        },
        decided_ms: 1,
        output: None,
    };
    store
        .commit(&[
            Mutation::PutJob {
                job,
                manifest: std::sync::Arc::new(manifest),
                determinism: tasks::Determinism::Native,
                created_ms: 0,
            },
            accepted(0, result(0)),
            Mutation::Decided {
                task: TaskId { job, index: 1 },
                decision: Decision::Failed {
                    reason: "no quorum".into(),
                },
                decided_ms: 1,
                output: None,
            },
            accepted(2, trapped),
        ])
        .unwrap();
    let page = store.task_failures(job, None, 10).unwrap();
    assert_eq!(page.total, 2);
    assert!(!page.more);
    let got: Vec<_> = page
        .failures
        .iter()
        .map(|f| (f.index, f.status, f.reason.clone(), f.trap.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                1,
                TaskState::Failed,
                Some("no quorum".to_string()),
                String::new()
            ),
            (2, TaskState::Accepted, None, "unreachable".to_string()),
        ]
    );
    let first = store.task_failures(job, None, 1).unwrap();
    assert_eq!((first.failures.len(), first.more), (1, true));
    let rest = store.task_failures(job, Some(1), 10).unwrap();
    assert_eq!(
        rest.failures.iter().map(|f| f.index).collect::<Vec<_>>(),
        vec![2]
    );
}

fn a_jobs_determinism_class_survives_a_restart(open: Opener) {
    use tasks::Determinism;
    let mut store = open();
    let mut core = Core::new(CoreConfig::default());
    let manifest = |name: &str| JobManifest {
        name: name.into(),
        module: BlobRef::of(b"m"),
        limits: JobLimits::default(),
        tasks: vec![TaskEntry {
            args: vec![],
            input: None,
        }],
    };
    let (native, _) = core.add_job_in(manifest("n"), Determinism::Native, 0);
    let (portable, _) = core.add_job_in(manifest("p"), Determinism::Portable, 0);
    store.commit(&core.take_mutations()).unwrap();
    drop(store);
    let snap = open().load().unwrap();
    let class = |job| {
        snap.jobs
            .iter()
            .find(|j| j.job == job)
            .map(|j| j.determinism)
    };
    assert_eq!(class(native), Some(Determinism::Native));
    assert_eq!(class(portable), Some(Determinism::Portable));
    let core = Core::restore(CoreConfig::default(), snap, 1);
    assert_eq!(core.job_determinism(native), Some(Determinism::Native));
}

fn fp() -> EngineFingerprint {
    EngineFingerprint {
        engine: "wasmtime 38".into(),
        arch: "x86_64".into(),
        settings: "det".into(),
    }
}

fn result(i: u32) -> RunResult {
    RunResult {
        status: Status::Ok,
        exit_code: 0,
        trap: String::new(),
        fuel_used: 1000 + i as u64,
        output_hash: BlobId::of(&i.to_le_bytes()),
        output_len: 4,
    }
}

fn core_rebuilt_from_store_matches_and_keeps_in_flight_replicas_reportable(open: Opener) {
    let mut store = open();
    let mut core = Core::new(CoreConfig::default());
    let manifest = JobManifest {
        name: "j".into(),
        module: BlobRef::of(b"m"),
        limits: JobLimits {
            quorum: 2,
            ..JobLimits::default()
        },
        tasks: (0..4)
            .map(|i| TaskEntry {
                args: vec![i.to_string()],
                input: None,
            })
            .collect(),
    };
    let (job, _) = core.add_job(manifest, 0);
    let ws = [NodeId([1; 32]), NodeId([2; 32])];
    for w in ws {
        core.hello(
            w,
            &fp(),
            4,
            Some("127.0.0.1:9".parse().unwrap()),
            &[BlobId::of(b"m")],
            0,
        );
    }
    let a = core.request_work(ws[0], 4, 0).assignments;
    let b = core.request_work(ws[1], 4, 0).assignments;
    assert_eq!((a.len(), b.len()), (4, 4));
    // Both report task 0 and 1; only worker 0 reports task 2.
    for x in a.iter().filter(|x| x.task.id.index < 3) {
        core.report(ws[0], x.replica, result(x.task.id.index), 1);
    }
    for x in b.iter().filter(|x| x.task.id.index < 2) {
        core.report(ws[1], x.replica, result(x.task.id.index), 1);
    }
    store.commit(&core.take_mutations()).unwrap();
    let before = core.status(None).unwrap();
    drop(store);

    let mut store = open();
    let mut again = Core::restore(CoreConfig::default(), store.load().unwrap(), 2);
    assert!(
        again.take_mutations().is_empty(),
        "restoring changes nothing durable"
    );
    let mut after = again.status(None).unwrap();
    for w in &mut after.workers {
        w.connected = true;
    }
    assert_eq!(before, after);
    assert_eq!(again.credit_fuel(&ws[0]), 1000 + 1001);
    // Worker 1 reconnects and reports its in-flight replica of task 2: accepted, once.
    again.hello(ws[1], &fp(), 4, None, &[], 3);
    let r2 = b.iter().find(|x| x.task.id.index == 2).unwrap();
    let out = again.report(ws[1], r2.replica, result(2), 3);
    assert_eq!(
        out,
        crate::core::ReportOutcome::Recorded {
            accepted: true,
            duplicate: false
        }
    );
    let out = again.report(
        ws[0],
        a.iter().find(|x| x.task.id.index == 0).unwrap().replica,
        result(0),
        3,
    );
    assert_eq!(
        out,
        crate::core::ReportOutcome::Recorded {
            accepted: false,
            duplicate: true
        }
    );
    store.commit(&again.take_mutations()).unwrap();
    assert_eq!(again.credit_fuel(&ws[0]), 1000 + 1001 + 1002);
    let results = store.task_results(job).unwrap();
    assert_eq!(results.len(), 3);
    assert!(results
        .iter()
        .all(|(t, _)| t.status == TaskState::Accepted && t.agreeing_workers.len() == 2));
    // New replica ids continue after the old ones.
    let c = again.request_work(ws[1], 1, 4).assignments;
    assert!(c
        .iter()
        .all(|x| x.replica > b.iter().map(|y| y.replica).max().unwrap()));
}

/// A report judged valid after its task was accepted joins the task's agreeing workers
/// (it is credited, so `results` must name it), once, and only on an accepted task.
fn a_late_agreement_joins_the_agreeing_workers_once(open: Opener) {
    let mut store = open();
    let limits = JobLimits::default();
    let manifest = crate::core::sim::manifest("j", 2, 2, limits.max_replicas, 60);
    let job = JobId(1);
    let (t0, t1) = (TaskId { job, index: 0 }, TaskId { job, index: 1 });
    let ws = [NodeId([1; 32]), NodeId([2; 32]), NodeId([3; 32])];
    store
        .commit(&[
            Mutation::PutJob {
                job,
                manifest: std::sync::Arc::new(manifest),
                determinism: tasks::Determinism::Portable,
                created_ms: 0,
            },
            Mutation::Decided {
                task: t0,
                decision: Decision::Accepted {
                    digest: ResultDigest([9; 32]),
                    result: result(0),
                    fingerprint: "f".into(),
                    agreeing: ws[..2].to_vec(),
                },
                decided_ms: 1,
                output: Some(Output::Inline(vec![1])),
            },
        ])
        .unwrap();
    store
        .commit(&[
            Mutation::LateAgreement {
                task: t0,
                worker: ws[2],
            },
            Mutation::LateAgreement {
                task: t0,
                worker: ws[2],
            },
            // Task 1 is not accepted: nothing to join.
            Mutation::LateAgreement {
                task: t1,
                worker: ws[2],
            },
        ])
        .unwrap();
    let results = store.task_results(job).unwrap();
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0].0.agreeing_workers, ws.to_vec());
}

/// A worker's unmade-up losses cost it capacity; a coordinator restart must not wipe
/// them (a hostile worker would otherwise wait for one to start losing work afresh).
fn losses_survive_a_restart(open: Opener) {
    let mut store = open();
    let mut core = Core::new(CoreConfig::default());
    let d = JobLimits::default();
    let manifest = crate::core::sim::manifest("j", 3, d.quorum, d.max_replicas, d.deadline_secs);
    core.add_job(manifest, 0);
    let w = NodeId([7; 32]);
    core.hello(w, &fp(), 4, None, &[BlobId::of(b"module")], 0);
    let given = core.request_work(w, 2, 0).assignments;
    assert_eq!(given.len(), 2);
    let replicas: Vec<_> = given.iter().map(|a| a.replica).collect();
    core.abandon(w, &replicas, 1);
    assert_eq!(core.workers[&w].lost, 2);
    store.commit(&core.take_mutations()).unwrap();
    drop(store);

    let mut store = open();
    let again = Core::restore(CoreConfig::default(), store.load().unwrap(), 2);
    assert_eq!(again.workers[&w].lost, 2, "the losses are remembered");
}
