//! The engine keeps every accepted task's output, whatever path accepted it (issue 16,
//! item 4), and `Results` returns it: inline bytes, or `Output::Blob` present in the
//! engine's blob store.
//!
//! Each test drives one [`Engine`] over a temporary data dir (a `SqliteStore` and a
//! `BlobStore`, as `Coordinator::start` opens them) with `Cmd`s only, through
//! `apply_batch`, and reads the answers from the oneshot replies after each batch.

use super::*;

use crate::core::trust::TrustPolicy;
use crate::core::CoreConfig;
use tasks::wire::{Assignment, JobStatus};
use tasks::Status;

const START_MS: u64 = 1_000_000;
const DEADLINE_SECS: u64 = 600;

fn fingerprint() -> EngineFingerprint {
    EngineFingerprint {
        engine: "wasmtime 38".into(),
        arch: "x86_64-linux".into(),
        settings: "det".into(),
    }
}

fn node(i: u8) -> NodeId {
    let mut b = [0u8; 32];
    b[0] = i;
    b[31] = 0xee;
    NodeId(b)
}

/// A run that printed `output`.
fn run_result(output: &[u8]) -> RunResult {
    RunResult {
        status: Status::Ok,
        exit_code: 0,
        trap: String::new(),
        fuel_used: 1_000,
        output_hash: BlobId::of(output),
        output_len: output.len() as u64,
    }
}

/// `len` bytes that differ from one `seed` to another.
fn output_bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn manifest(tasks: u32, quorum: u32, max_replicas: u32) -> JobManifest {
    crate::core::sim::manifest("outputs", tasks, quorum, max_replicas, DEADLINE_SECS)
}

/// The default policy, with partner replicas due at once (`partner_spread: 0`) so who gets
/// which replica is plain to read from the test.
fn policy() -> TrustPolicy {
    TrustPolicy {
        partner_spread: 0,
        ..TrustPolicy::default()
    }
}

/// An engine over a temporary data dir, with the receiving ends of its channels.
struct Harness {
    engine: Engine,
    fetches: mpsc::UnboundedReceiver<FetchJob>,
    /// What each worker's session was sent (kept so sends succeed).
    inboxes: HashMap<NodeId, mpsc::UnboundedReceiver<CoordMsg>>,
    now: u64,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new(policy: TrustPolicy) -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let blobs = blobs::BlobStore::open(&dir.path().join(crate::server::BLOB_DIR), None)
            .expect("blob store");
        let mut store = SqliteStore::open(&dir.path().join(SqliteStore::FILE)).expect("store");
        let cfg = CoreConfig {
            policy,
            ..CoreConfig::default()
        };
        let core = Core::restore(cfg, store.load().expect("load"), START_MS);
        let (ftx, frx) = mpsc::unbounded_channel();
        Harness {
            engine: Engine::new(core, store, blobs, ftx),
            fetches: frx,
            inboxes: HashMap::new(),
            now: START_MS,
            _dir: dir,
        }
    }

    /// Apply `cmds` as one batch (one commit); the clock moves on by 1 ms.
    fn batch(&mut self, cmds: Vec<Cmd>) {
        self.now += 1;
        self.engine
            .apply_batch(cmds.into_iter(), self.now)
            .expect("the store commits");
    }

    fn hello(&mut self, worker: NodeId, port: u16) {
        let (tx, inbox) = mpsc::unbounded_channel();
        let (reply, mut rx) = oneshot::channel();
        let info = HelloInfo {
            fingerprint: fingerprint(),
            slots: 4,
            observed_addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            blobs: Vec::new(),
        };
        self.batch(vec![Cmd::Hello {
            worker,
            session: u64::from(port),
            info,
            tx,
            reply,
        }]);
        rx.try_recv().expect("hello answered");
        self.inboxes.insert(worker, inbox);
    }

    fn create_job(&mut self, manifest: JobManifest) -> JobId {
        let (reply, mut rx) = oneshot::channel();
        self.batch(vec![Cmd::CreateJob {
            manifest,
            determinism: tasks::Determinism::Portable,
            reply,
        }]);
        rx.try_recv().expect("job created").0
    }

    /// The assignments `worker` gets, by task index.
    fn request(&mut self, worker: NodeId, max: u32) -> Vec<(u32, ReplicaId)> {
        let (reply, mut rx) = oneshot::channel();
        self.batch(vec![Cmd::RequestWork { worker, max, reply }]);
        let work: Work = rx.try_recv().expect("work request answered");
        work.assignments
            .iter()
            .map(|a: &Assignment| (a.task.id.index, a.replica))
            .collect()
    }

    /// A report that must be recorded (acknowledged).
    fn report(&mut self, worker: NodeId, replica: ReplicaId, output: &[u8], inline: bool) {
        let (reply, mut rx) = oneshot::channel();
        self.batch(vec![reports_cmd(worker, replica, output, inline, reply)]);
        let msgs = rx.try_recv().expect("report answered");
        assert_eq!(
            msgs,
            vec![CoordMsg::Ack {
                replicas: vec![replica]
            }],
            "report of replica {replica} recorded"
        );
    }

    fn results(&mut self, job: JobId) -> JobResults {
        let (reply, mut rx) = oneshot::channel();
        self.batch(vec![Cmd::Results { job, reply }]);
        rx.try_recv()
            .expect("results answered")
            .expect("results readable")
            .expect("job known")
    }

    fn task(&mut self, job: JobId, index: u32) -> TaskResult {
        self.results(job).tasks[index as usize].clone()
    }

    fn status(&mut self, job: JobId) -> JobStatus {
        let (reply, mut rx) = oneshot::channel();
        self.batch(vec![Cmd::Status {
            job: Some(job),
            reply,
        }]);
        let report = rx.try_recv().expect("status answered").expect("job known");
        report.jobs.into_iter().next().expect("one job")
    }

    fn no_fetch(&mut self) {
        if let Ok(f) = self.fetches.try_recv() {
            panic!("no output fetch expected, got one for {}", f.task);
        }
    }
}

fn reports_cmd(
    worker: NodeId,
    replica: ReplicaId,
    output: &[u8],
    inline: bool,
    reply: oneshot::Sender<Vec<CoordMsg>>,
) -> Cmd {
    Cmd::Reports {
        worker,
        reports: vec![Report {
            replica,
            result: run_result(output),
            output: inline.then(|| output.to_vec()),
            wall_ms: 1,
        }],
        reply,
    }
}

fn replica_of(assignments: &[(u32, ReplicaId)], index: u32) -> ReplicaId {
    assignments
        .iter()
        .find(|(i, _)| *i == index)
        .unwrap_or_else(|| panic!("no assignment of task {index} in {assignments:?}"))
        .1
}

fn assert_accepted_inline(t: &TaskResult, output: &[u8]) {
    assert_eq!(t.status, TaskState::Accepted, "task {} accepted", t.index);
    assert_eq!(t.output_hash, Some(BlobId::of(output)));
    assert_eq!(t.output_len, Some(output.len() as u64));
    assert!(
        t.output.as_deref() == Some(output),
        "task {}: results carry the accepted output inline ({} bytes), got {:?}",
        t.index,
        output.len(),
        t.output.as_ref().map(|o| o.len())
    );
}

/// Path 1: the report that completes the quorum carries the output inline (the largest
/// size that may travel inline); the earlier report carried none, so nothing but the
/// completing report can have supplied the bytes.
#[test]
fn output_inline_in_the_report_completing_the_quorum_is_kept() {
    let mut h = Harness::new(policy());
    let (a, b) = (node(1), node(2));
    h.hello(a, 4001);
    h.hello(b, 4002);
    let job = h.create_job(manifest(1, 2, 3));
    let out = output_bytes(7, INLINE_OUTPUT_MAX as usize);
    let ra = replica_of(&h.request(a, 1), 0);
    let rb = replica_of(&h.request(b, 1), 0);

    h.report(a, ra, &out, false);
    assert_eq!(h.task(job, 0).status, TaskState::Pending);

    h.report(b, rb, &out, true);
    let t = h.task(job, 0);
    assert_accepted_inline(&t, &out);
    assert_eq!(t.agreeing_workers.len(), 2);
    h.no_fetch();
    let st = h.status(job);
    assert_eq!((st.tasks_done, st.outputs_collecting), (1, 0));
    assert_eq!(h.results(job).state, JobState::Done);
}

/// How the last step of [`unbanned_vote_accepts_later`] makes the core look at the task
/// again: none of them brings a report.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Trigger {
    /// The worker holding the task's last in-flight replica abandons it.
    Abandon,
    /// That replica's deadline passes (`Cmd::Tick`).
    Deadline,
    /// Another worker asks for work; the scheduler finds the open task decidable.
    RequestWork,
}

/// Path 2: a task accepted with no report in the command that accepted it.
///
/// The core accepts outside `report` only when a task that was left undecided has become
/// decidable without a new report: a worker's votes are discounted while it is banned and
/// count again once its standing recovers, and nothing re-examines its tasks until a loss
/// (`Abandon`, deadline `Tick`) or a work request scanning the open queue
/// (`request_work`'s "decidable") does. Sequence (quorum 2, max 3 replicas; a policy that
/// bans at the first contradiction, score < 0.5, so one valid result lifts the ban):
///
/// 1. L takes tasks 0, 1, 2; A takes 0, 1, 2.
/// 2. L lies on task 0; A and then B agree on it: accepted, L invalid, L banned. L's
///    replicas of 1 and 2 are cancelled, both tasks queued for another replica.
/// 3. A reports 1 and 2 with their outputs inline: undecided, the engine keeps the bytes.
/// 4. B takes task 1 and agrees: task 1 accepted (by report). For Abandon/Deadline B then
///    takes task 2 (in flight); for RequestWork task 2 stays in the open queue.
/// 5. L reports its cancelled replica of task 2 (right, discounted: L is banned), then of
///    task 1 (right, judged valid): L is no longer banned, so task 2 now has two counted
///    agreeing votes (A, L) but is still pending.
/// 6. The trigger: task 2 is accepted by the core with no report at hand; its output must
///    come from the engine's pending outputs (A's undecided report of step 3).
fn unbanned_vote_accepts_later(trigger: Trigger) {
    let Decidable {
        mut h,
        job,
        a,
        b,
        l,
        outs,
        b2,
    } = decidable_task_2(trigger != Trigger::RequestWork);

    // 6.
    match trigger {
        Trigger::Abandon => h.batch(vec![Cmd::Abandon {
            worker: b,
            replicas: vec![b2.expect("B holds task 2")],
        }]),
        Trigger::Deadline => {
            h.now += DEADLINE_SECS * 1000 + 1;
            h.batch(vec![Cmd::Tick]);
        }
        Trigger::RequestWork => {
            let w = h.request(b, 1);
            assert!(w.is_empty(), "nothing left to hand out: {w:?}");
        }
    }
    let t = h.task(job, 2);
    assert_accepted_inline(&t, &outs[2]);
    let mut agreeing = t.agreeing_workers.clone();
    agreeing.sort();
    assert_eq!(agreeing, vec![a, l], "accepted on A's and L's votes");
    h.no_fetch();
    let st = h.status(job);
    assert_eq!((st.tasks_done, st.outputs_collecting), (3, 0));
    assert_eq!(h.results(job).state, JobState::Done);
}

/// The state after step 5 of [`unbanned_vote_accepts_later`]: task 2 decidable (A and L
/// agree, L's ban lifted) but still pending.
struct Decidable {
    h: Harness,
    job: JobId,
    a: NodeId,
    b: NodeId,
    l: NodeId,
    /// Each task's right output.
    outs: Vec<Vec<u8>>,
    /// B's in-flight replica of task 2, when `b_holds_task_2`.
    b2: Option<ReplicaId>,
}

/// Steps 1 to 5 of [`unbanned_vote_accepts_later`].
fn decidable_task_2(b_holds_task_2: bool) -> Decidable {
    let mut h = Harness::new(TrustPolicy {
        ban_min_invalid: 1,
        ..policy()
    });
    let (a, b, l) = (node(1), node(2), node(3));
    h.hello(a, 4001);
    h.hello(b, 4002);
    h.hello(l, 4003);
    let job = h.create_job(manifest(3, 2, 3));
    let outs: Vec<Vec<u8>> = (0..3).map(|i| output_bytes(i, 1000 + i as usize)).collect();
    let lie = output_bytes(99, 1000);

    // 1.
    let l_work = h.request(l, 3);
    let a_work = h.request(a, 3);
    for i in 0..3 {
        replica_of(&l_work, i);
        replica_of(&a_work, i);
    }

    // 2.
    h.report(l, replica_of(&l_work, 0), &lie, true);
    h.report(a, replica_of(&a_work, 0), &outs[0], true);
    let b0 = h.request(b, 1);
    assert_eq!(b0.len(), 1);
    h.report(b, replica_of(&b0, 0), &outs[0], true);
    assert_accepted_inline(&h.task(job, 0), &outs[0]);
    assert!(h.engine.core.is_banned(&l), "L lied on task 0: banned");

    // 3.
    h.report(a, replica_of(&a_work, 1), &outs[1], true);
    h.report(a, replica_of(&a_work, 2), &outs[2], true);
    assert_eq!(h.task(job, 1).status, TaskState::Pending);
    assert_eq!(h.task(job, 2).status, TaskState::Pending);

    // 4.
    let b1 = h.request(b, 1);
    h.report(b, replica_of(&b1, 1), &outs[1], true);
    assert_accepted_inline(&h.task(job, 1), &outs[1]);
    let b2 = b_holds_task_2.then(|| replica_of(&h.request(b, 1), 2));

    // 5.
    h.report(l, replica_of(&l_work, 2), &outs[2], true);
    assert!(h.engine.core.is_banned(&l));
    h.report(l, replica_of(&l_work, 1), &outs[1], true);
    assert!(
        !h.engine.core.is_banned(&l),
        "a valid result lifts L's ban (score 0.5)"
    );
    assert_eq!(
        h.task(job, 2).status,
        TaskState::Pending,
        "nothing re-examined task 2 yet"
    );
    h.no_fetch();
    Decidable {
        h,
        job,
        a,
        b,
        l,
        outs,
        b2,
    }
}

#[test]
fn output_of_a_task_accepted_when_a_replica_is_abandoned_comes_from_pending_outputs() {
    unbanned_vote_accepts_later(Trigger::Abandon);
}

#[test]
fn output_of_a_task_accepted_at_a_deadline_tick_comes_from_pending_outputs() {
    unbanned_vote_accepts_later(Trigger::Deadline);
}

#[test]
fn output_of_a_task_accepted_by_a_work_request_comes_from_pending_outputs() {
    unbanned_vote_accepts_later(Trigger::RequestWork);
}

/// Path 3: an output too large to travel inline is fetched from the agreeing workers:
/// one `FetchJob`, `outputs_collecting` 1 until `OutputStored`, then 0, and the output is
/// in the engine's blob store.
#[test]
fn large_output_is_fetched_and_counted_as_collecting_until_stored() {
    let mut h = Harness::new(policy());
    let (a, b) = (node(1), node(2));
    h.hello(a, 4001);
    h.hello(b, 4002);
    let job = h.create_job(manifest(1, 2, 3));
    let out = output_bytes(5, INLINE_OUTPUT_MAX as usize + 1);
    let hash = BlobId::of(&out);
    let ra = replica_of(&h.request(a, 1), 0);
    let rb = replica_of(&h.request(b, 1), 0);

    h.report(a, ra, &out, false);
    h.no_fetch();
    assert_eq!(h.status(job).outputs_collecting, 0);
    h.report(b, rb, &out, false);

    let f = h
        .fetches
        .try_recv()
        .expect("a fetch of the accepted output");
    let task = TaskId { job, index: 0 };
    assert_eq!(f.task, task);
    assert_eq!(f.result, run_result(&out));
    let mut peers: Vec<u16> = f.peers.iter().map(|p| p.addr.port()).collect();
    peers.sort();
    assert_eq!(peers, vec![4001, 4002], "fetched from the agreeing workers");
    h.no_fetch();

    let st = h.status(job);
    assert_eq!((st.tasks_done, st.outputs_collecting), (1, 1));
    let t = h.task(job, 0);
    assert_eq!(t.status, TaskState::Accepted);
    assert_eq!(t.output_hash, Some(hash));
    assert_eq!(t.output, None);
    assert!(!h.engine.blobs.has(&hash));
    // Still collecting after other batches.
    assert_eq!(h.status(job).outputs_collecting, 1);

    // What the shell's fetcher does once the bytes are verified.
    h.engine.blobs.put(&out).expect("blob stored");
    h.batch(vec![Cmd::OutputStored {
        task,
        output: Output::Blob(hash),
    }]);
    assert_eq!(h.status(job).outputs_collecting, 0);
    let t = h.task(job, 0);
    assert_eq!(t.status, TaskState::Accepted);
    assert_eq!(t.output_hash, Some(hash));
    assert_eq!(t.output_len, Some(out.len() as u64));
    assert!(h.engine.blobs.has(&hash), "the output is in the blob store");
    assert_eq!(h.engine.blobs.read(&hash).expect("readable"), out);
    let stored = h.engine.store.task_results(job).expect("store readable");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].1, Some(Output::Blob(hash)), "recorded as a blob");
    h.no_fetch();
}

/// Path 4: `Results` in the same batch as the report that accepts the task (answered
/// after the batch's commit) already shows it accepted, with its output.
#[test]
fn results_in_the_batch_of_the_accepting_report_show_the_output() {
    let mut h = Harness::new(policy());
    let (a, b) = (node(1), node(2));
    h.hello(a, 4001);
    h.hello(b, 4002);
    let job = h.create_job(manifest(1, 2, 3));
    let out = output_bytes(3, 500);
    let ra = replica_of(&h.request(a, 1), 0);
    let rb = replica_of(&h.request(b, 1), 0);
    h.report(a, ra, &out, true);
    assert_eq!(h.task(job, 0).status, TaskState::Pending);

    let (report_reply, mut report_rx) = oneshot::channel();
    let (results_reply, mut results_rx) = oneshot::channel();
    let (status_reply, mut status_rx) = oneshot::channel();
    h.batch(vec![
        reports_cmd(b, rb, &out, true, report_reply),
        Cmd::Results {
            job,
            reply: results_reply,
        },
        Cmd::Status {
            job: Some(job),
            reply: status_reply,
        },
    ]);
    assert_eq!(
        report_rx.try_recv().expect("report answered"),
        vec![CoordMsg::Ack { replicas: vec![rb] }]
    );
    let results = results_rx
        .try_recv()
        .expect("results answered with the batch")
        .expect("results readable")
        .expect("job known");
    assert_eq!(results.state, JobState::Done);
    assert_accepted_inline(&results.tasks[0], &out);
    let st = status_rx.try_recv().expect("status answered").expect("job");
    assert_eq!(st.jobs[0].tasks_done, 1);
}

// Regressions: engine bugs these tests found (fixed: every recorded report's inline output is
// kept by hash, and the acceptance notice, which names the accepted result, picks the bytes).

/// A report can complete the acceptance of a task whose winning group it is *not* part of:
/// when the task was already decidable (votes counting again after a ban was lifted, as in
/// [`unbanned_vote_accepts_later`]), any report on it re-examines it and the core answers
/// `Recorded { accepted: true }`. The engine used to keep *that report's* output, so results
/// showed the accepted `output_hash` with another result's bytes.
#[test]
fn a_dissenting_report_that_completes_an_acceptance_does_not_supply_its_output() {
    let Decidable {
        mut h,
        job,
        a,
        b,
        l,
        outs,
        b2,
    } = decidable_task_2(true);
    let other = output_bytes(42, 900);
    h.report(b, b2.expect("B holds task 2"), &other, true);
    let t = h.task(job, 2);
    let mut agreeing = t.agreeing_workers.clone();
    agreeing.sort();
    assert_eq!(
        agreeing,
        vec![a, l],
        "accepted on A's and L's votes, not B's"
    );
    assert_accepted_inline(&t, &outs[2]);
}

/// The same with a dissenting output too large to travel inline: the engine used to ask for
/// a fetch of the *dissenting* result (its hash) from the *agreeing* workers, which never
/// held it, so the fetch could never succeed and `outputs_collecting` stayed 1, although the
/// accepted output was at hand in the pending outputs.
#[test]
fn a_dissenting_large_report_that_completes_an_acceptance_starts_no_fetch() {
    let Decidable {
        mut h,
        job,
        b,
        outs,
        b2,
        ..
    } = decidable_task_2(true);
    let other = output_bytes(42, INLINE_OUTPUT_MAX as usize + 1);
    h.report(b, b2.expect("B holds task 2"), &other, false);
    if let Ok(f) = h.fetches.try_recv() {
        assert_eq!(
            f.result.output_hash,
            BlobId::of(&outs[2]),
            "a fetch, if any, is of the accepted output"
        );
    }
    assert_accepted_inline(&h.task(job, 2), &outs[2]);
    assert_eq!(h.status(job).outputs_collecting, 0);
}

/// A `Status` in the same batch as the report that accepts a task with a large output counts
/// that output as being collected (the task used to enter `collecting` only after the
/// commit, so such a status showed a finished job and no output missing).
#[test]
fn status_in_the_batch_of_the_accepting_report_counts_the_output_being_collected() {
    let mut h = Harness::new(policy());
    let (a, b) = (node(1), node(2));
    h.hello(a, 4001);
    h.hello(b, 4002);
    let job = h.create_job(manifest(1, 2, 3));
    let out = output_bytes(5, INLINE_OUTPUT_MAX as usize + 1);
    let ra = replica_of(&h.request(a, 1), 0);
    let rb = replica_of(&h.request(b, 1), 0);
    h.report(a, ra, &out, false);

    let (report_reply, _report_rx) = oneshot::channel();
    let (status_reply, mut status_rx) = oneshot::channel();
    h.batch(vec![
        reports_cmd(b, rb, &out, false, report_reply),
        Cmd::Status {
            job: Some(job),
            reply: status_reply,
        },
    ]);
    let st = status_rx.try_recv().expect("status answered").expect("job");
    assert_eq!(st.jobs[0].tasks_done, 1);
    assert_eq!(
        st.jobs[0].outputs_collecting, 1,
        "the accepted output is not in yet"
    );
}
