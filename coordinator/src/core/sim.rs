//! The core driven by a simulated population of workers on a simulated clock.

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use tasks::job::{JobLimits, TaskEntry};
use tasks::wire::{JobState, ReplicaId};
use tasks::{
    BlobId, BlobRef, EngineFingerprint, JobId, JobManifest, NodeId, RunResult, Status, TaskId,
};

use super::trust::{Adaptive, TrustPolicy};
use super::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Honest,
    /// Sometimes far slower than the deadline; reports late anyway.
    Slow,
    /// Disconnects at random, losing its work; comes back later.
    Crashing,
    /// Reports a wrong output for a fraction of its tasks.
    Wrong,
    /// Honest, but on another engine: never compared with the others.
    OtherEngine,
    /// Always reports a random output.
    Liar,
}

struct SimWorker {
    id: NodeId,
    kind: Kind,
    slots: u32,
    connected: bool,
    back_at: u64,
    running: Vec<(ReplicaId, TaskId, u64)>,
}

fn fp(kind: Kind) -> EngineFingerprint {
    let engine = if kind == Kind::OtherEngine {
        "wasmtime 99"
    } else {
        "wasmtime 38"
    };
    EngineFingerprint {
        engine: engine.into(),
        arch: "x86_64-linux".into(),
        settings: "det".into(),
    }
}

fn truth(task: TaskId) -> RunResult {
    let out = format!("{}:{}", task.job, task.index);
    RunResult {
        status: Status::Ok,
        exit_code: 0,
        trap: String::new(),
        fuel_used: 1_000_000 + task.index as u64 * 7,
        output_hash: BlobId::of(out.as_bytes()),
        output_len: out.len() as u64,
    }
}

/// A job of `n` tasks (task i gets the argument `i`) over the module `b"module"`.
pub(crate) fn manifest(
    name: &str,
    n: u32,
    quorum: u32,
    max_replicas: u32,
    deadline_secs: u64,
) -> JobManifest {
    JobManifest {
        name: name.into(),
        module: BlobRef::of(b"module"),
        limits: JobLimits {
            quorum,
            max_replicas,
            deadline_secs,
            ..JobLimits::default()
        },
        tasks: (0..n)
            .map(|i| TaskEntry {
                args: vec![i.to_string()],
                input: None,
            })
            .collect(),
    }
}

fn node(i: u32) -> NodeId {
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(&i.to_le_bytes());
    b[31] = 1;
    NodeId(b)
}

struct Sim {
    core: Core,
    rng: StdRng,
    workers: Vec<SimWorker>,
    now: u64,
    /// Every replica ever assigned: (task, worker).
    issued: HashMap<ReplicaId, (TaskId, NodeId)>,
    failures: Vec<String>,
}

impl Sim {
    fn new(seed: u64, population: &[(Kind, u32)], cfg: CoreConfig) -> Sim {
        let mut workers = Vec::new();
        for &(kind, count) in population {
            for _ in 0..count {
                let i = workers.len() as u32;
                workers.push(SimWorker {
                    id: node(i),
                    kind,
                    slots: 2,
                    connected: false,
                    back_at: 0,
                    running: Vec::new(),
                });
            }
        }
        Sim {
            core: Core::new(cfg),
            rng: StdRng::seed_from_u64(seed),
            workers,
            now: 1_000_000,
            issued: HashMap::new(),
            failures: Vec::new(),
        }
    }

    fn step(&mut self) {
        self.now += 1_000;
        let now = self.now;
        for w in &mut self.workers {
            if !w.connected && now >= w.back_at {
                w.connected = true;
                self.core.hello(w.id, &fp(w.kind), w.slots, None, &[], now);
            }
            if !w.connected {
                continue;
            }
            if w.kind == Kind::Crashing && self.rng.gen_bool(0.02) {
                w.connected = false;
                w.running.clear();
                w.back_at = now + self.rng.gen_range(10_000..200_000);
                self.core.disconnect(w.id, now);
                continue;
            }
            // Finish what is due.
            let due: Vec<_> = w.running.iter().filter(|r| r.2 <= now).copied().collect();
            w.running.retain(|r| r.2 > now);
            for (replica, task, _) in due {
                let mut result = truth(task);
                if (w.kind == Kind::Wrong && self.rng.gen_bool(0.5)) || w.kind == Kind::Liar {
                    result.output_hash = BlobId::of(&self.rng.gen::<u64>().to_le_bytes());
                }
                let out = self.core.report(w.id, replica, result.clone(), now);
                // A late report for a replica that was lost and reissued earns nothing.
                if let ReportOutcome::Rejected(why) = &out {
                    assert!(why.contains("reissued"), "{why}");
                    continue;
                }
                // A resend of the same report is acknowledged and changes nothing.
                let again = self.core.report(w.id, replica, result, now);
                assert_eq!(
                    again,
                    ReportOutcome::Recorded {
                        accepted: false,
                        duplicate: true
                    }
                );
            }
            // Ask for work to fill the slots.
            let free = w.slots.saturating_sub(w.running.len() as u32);
            if free > 0 {
                let work = self.core.request_work(w.id, free, now);
                for a in work.assignments {
                    let prev = self.issued.insert(a.replica, (a.task.id, w.id));
                    assert!(prev.is_none(), "replica id reused");
                    let dur = match w.kind {
                        Kind::Slow if self.rng.gen_bool(0.3) => a.deadline_secs * 1000 + 30_000,
                        _ => self.rng.gen_range(1_000..20_000),
                    };
                    w.running.push((a.replica, a.task.id, now + dur));
                }
            }
        }
        // Cancels are advisory; honest workers drop cancelled work.
        for n in self.core.take_notices() {
            match n {
                Notice::Cancel { worker, replicas } => {
                    if let Some(w) = self.workers.iter_mut().find(|w| w.id == worker) {
                        w.running.retain(|r| !replicas.contains(&r.0));
                    }
                }
                Notice::Failed { reason, .. } => self.failures.push(reason),
                _ => {}
            }
        }
        self.core.take_mutations();
        self.core.tick(now);
    }

    fn run_until_done(&mut self, max_steps: u32) {
        for _ in 0..max_steps {
            if self.core.running.is_empty() {
                return;
            }
            self.step();
        }
        panic!("jobs did not finish: {:?}", self.core.status(None));
    }

    /// The invariants every run must keep.
    fn check(&self) {
        // The idle set is exactly the workers whose last request found no work.
        let flagged: HashSet<NodeId> = self
            .core
            .workers
            .iter()
            .filter(|(_, w)| w.waiting_for_work)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(self.core.idle, flagged, "Core::idle out of step");
        // Every task ended accepted or failed; no replica left in flight.
        for job in self.core.jobs.values() {
            assert_ne!(job.state, JobState::Running);
            for (i, t) in job.tasks.iter().enumerate() {
                assert_ne!(
                    t.phase,
                    TaskPhase::Pending,
                    "task {}/{i} still pending",
                    job.id
                );
                if t.phase == TaskPhase::Accepted {
                    let (_, d) = t.accepted.unwrap();
                    assert_eq!(
                        d,
                        truth(TaskId {
                            job: job.id,
                            index: i as u32
                        })
                        .digest(),
                        "accepted a wrong result"
                    );
                }
            }
            assert_eq!(job.in_flight, 0);
        }
        // Every issued replica is accounted for and none is in flight.
        assert_eq!(self.issued.len(), self.core.replicas.len());
        for (id, r) in self.core.replicas.iter() {
            assert_ne!(
                r.phase,
                ReplicaPhase::InFlight,
                "replica {id} lost in flight"
            );
            assert_eq!(self.issued[&id], (r.task, r.worker));
        }
        // Never two replicas of one task on one worker, except after losing the first; and
        // never two verdicts for one worker and task.
        let mut seen = HashSet::new();
        let mut ids: Vec<_> = self.issued.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let (task, worker) = self.issued[&id];
            if !seen.insert((task, worker)) {
                let earlier_lost = self.core.replicas.iter().any(|(o, r)| {
                    o < id && r.task == task && r.worker == worker && r.phase == ReplicaPhase::Lost
                });
                assert!(earlier_lost, "two replicas of {task} on one worker");
            }
        }
        let mut judged = HashSet::new();
        for r in self.core.replicas.values().filter(|r| r.verdict.is_some()) {
            assert!(
                judged.insert((r.task, r.worker)),
                "two verdicts for one worker on {}",
                r.task
            );
        }
        // Credit equals valid fuel; honest workers are never judged invalid.
        let mut fuel: BTreeMap<NodeId, u64> = BTreeMap::new();
        for r in self.core.replicas.values() {
            if r.verdict == Some(Verdict::Valid) {
                *fuel.entry(r.worker).or_default() += r.result.as_ref().unwrap().1.fuel_used;
            }
        }
        for w in &self.workers {
            assert_eq!(
                self.core.credit_fuel(&w.id),
                fuel.get(&w.id).copied().unwrap_or(0),
                "credit of {:?}",
                w.kind
            );
            if !matches!(w.kind, Kind::Wrong | Kind::Liar) {
                assert_eq!(self.core.reputation(&w.id).unwrap_or_default().invalid, 0);
            }
        }
        assert!(self.core.deadlines.is_empty());
    }
}

#[test]
fn mixed_population_every_task_decided_nothing_lost_credit_is_valid_fuel() {
    let pop = [
        (Kind::Honest, 20),
        (Kind::Slow, 5),
        (Kind::Crashing, 5),
        (Kind::Wrong, 4),
        (Kind::OtherEngine, 3),
    ];
    for seed in 0..4 {
        let mut sim = Sim::new(
            seed,
            &pop,
            CoreConfig {
                disconnect_grace_ms: 30_000,
                ..CoreConfig::default()
            },
        );
        let now = sim.now;
        sim.core.add_job(manifest("a", 300, 2, 6, 60), now);
        sim.core.add_job(manifest("b", 50, 3, 8, 60), now);
        sim.run_until_done(20_000);
        sim.check();
        let st = sim.core.status(None).unwrap();
        let accepted: u32 = st.jobs.iter().map(|j| j.tasks_done).sum();
        assert!(accepted >= 340, "seed {seed}: most tasks accepted: {st:?}");
        // Wrong-answer workers were caught.
        let wrong: u64 = sim
            .workers
            .iter()
            .filter(|w| w.kind == Kind::Wrong)
            .map(|w| sim.core.reputation(&w.id).unwrap().invalid)
            .sum();
        assert!(wrong > 0);
    }
}

#[test]
fn honest_population_accepts_everything_with_exactly_quorum_replicas() {
    let mut sim = Sim::new(7, &[(Kind::Honest, 10)], CoreConfig::default());
    let now = sim.now;
    let (job, n) = sim.core.add_job(manifest("a", 200, 2, 6, 600), now);
    sim.run_until_done(10_000);
    sim.check();
    assert_eq!(sim.core.job_state(job), Some(JobState::Done));
    let reported = sim
        .core
        .replicas
        .values()
        .filter(|r| r.phase == ReplicaPhase::Reported)
        .count();
    assert_eq!(
        reported,
        2 * n as usize,
        "initial replication is the quorum, no more"
    );
}

#[test]
fn unreliable_liars_cause_failed_tasks_never_wrong_acceptances() {
    // Liars answer randomly: digests never agree, so every task fails at max_replicas, with
    // exactly max_replicas replicas spent and a reason saying why.
    let mut sim = Sim::new(3, &[(Kind::Liar, 12)], CoreConfig::default());
    let now = sim.now;
    let (job, _) = sim.core.add_job(manifest("a", 5, 2, 4, 600), now);
    sim.run_until_done(10_000);
    sim.check();
    let st = sim.core.status(Some(job)).unwrap();
    assert_eq!(
        (st.jobs[0].tasks_failed, st.jobs[0].state),
        (5, JobState::Failed)
    );
    assert_eq!(sim.issued.len(), 5 * 4);
    assert_eq!(sim.failures.len(), 5);
    assert!(
        sim.failures[0].contains("no consensus") && sim.failures[0].contains("4 different results"),
        "{}",
        sim.failures[0]
    );
}

#[test]
fn jobs_are_served_round_robin() {
    let mut core = Core::new(CoreConfig::default());
    let now = 10;
    let (a, _) = core.add_job(manifest("a", 1000, 1, 2, 600), now);
    let (b, _) = core.add_job(manifest("b", 10, 1, 2, 600), now);
    let w = node(1);
    core.hello(w, &fp(Kind::Honest), 8, None, &[], now);
    let work = core.request_work(w, 8, now);
    let from_b = work
        .assignments
        .iter()
        .filter(|x| x.task.id.job == b)
        .count();
    let from_a = work
        .assignments
        .iter()
        .filter(|x| x.task.id.job == a)
        .count();
    assert_eq!((from_a, from_b), (4, 4));
}

#[test]
fn report_for_another_workers_replica_is_rejected_and_changes_nothing() {
    let mut core = Core::new(CoreConfig::default());
    core.add_job(manifest("a", 1, 2, 4, 600), 0);
    let (w1, w2) = (node(1), node(2));
    core.hello(w1, &fp(Kind::Honest), 1, None, &[], 0);
    core.hello(w2, &fp(Kind::Honest), 1, None, &[], 0);
    let a = core.request_work(w1, 1, 0).assignments.remove(0);
    core.take_mutations();
    let out = core.report(w2, a.replica, truth(a.task.id), 1);
    assert!(matches!(out, ReportOutcome::Rejected(_)));
    assert!(core.take_mutations().is_empty());
    assert!(matches!(
        core.report(w2, 999, truth(a.task.id), 1),
        ReportOutcome::Rejected(_)
    ));
}

#[test]
fn disconnected_worker_keeps_replicas_for_grace_period_then_they_are_reissued() {
    let mut core = Core::new(CoreConfig {
        disconnect_grace_ms: 5_000,
        ..CoreConfig::default()
    });
    core.add_job(manifest("a", 1, 1, 4, 600), 0);
    let (w1, w2) = (node(1), node(2));
    core.hello(w1, &fp(Kind::Honest), 1, None, &[], 0);
    core.hello(w2, &fp(Kind::Honest), 1, None, &[], 0);
    let a = core.request_work(w1, 1, 0).assignments.remove(0);
    assert!(
        core.request_work(w2, 1, 0).assignments.is_empty(),
        "quorum 1: one replica only"
    );
    core.disconnect(w1, 1_000);
    core.tick(5_000);
    assert!(
        core.request_work(w2, 1, 5_000).assignments.is_empty(),
        "still within grace"
    );
    core.tick(6_000);
    let b = core.request_work(w2, 1, 6_000).assignments.remove(0);
    assert_eq!(b.task.id, a.task.id);
    // The first worker comes back and reports late: its replica was reissued, so the report
    // is refused and earns nothing; the reissued replica decides the task.
    core.hello(w1, &fp(Kind::Honest), 1, None, &[], 7_000);
    let out = core.report(w1, a.replica, truth(a.task.id), 7_000);
    assert!(
        matches!(&out, ReportOutcome::Rejected(why) if why.contains("reissued")),
        "{out:?}"
    );
    let out = core.report(w2, b.replica, truth(b.task.id), 7_001);
    assert_eq!(
        out,
        ReportOutcome::Recorded {
            accepted: true,
            duplicate: false
        }
    );
    assert_eq!(core.credit_fuel(&w1), 0);
    assert_eq!(core.reputation(&w1).unwrap().valid, 0);
}

#[test]
fn deadline_and_abandon_reissue_replicas() {
    let mut core = Core::new(CoreConfig::default());
    core.add_job(manifest("a", 2, 1, 4, 10), 0);
    let (w1, w2) = (node(1), node(2));
    core.hello(w1, &fp(Kind::Honest), 2, None, &[], 0);
    core.hello(w2, &fp(Kind::Honest), 2, None, &[], 0);
    let got = core.request_work(w1, 2, 0).assignments;
    assert_eq!(got.len(), 2);
    core.abandon(w1, &[got[0].replica], 1);
    let again = core.request_work(w2, 2, 1).assignments;
    assert_eq!(again.len(), 1, "only the abandoned one is reissued");
    assert_eq!(again[0].task.id, got[0].task.id);
    core.tick(10_001);
    let later = core.request_work(w2, 2, 10_001).assignments;
    assert_eq!(later.len(), 1, "the replica past its deadline is reissued");
    assert_eq!(later[0].task.id, got[1].task.id);
}

/// A worker reconnecting after the coordinator restarted lists what it still has: an
/// assignment committed before the crash but never delivered is reissued at once, not at
/// its deadline; the listed ones stay with the worker and its report of them still counts.
#[test]
fn replicas_a_reconnecting_worker_does_not_hold_are_reissued_at_once() {
    let mut core = Core::new(CoreConfig::default());
    core.add_job(manifest("a", 2, 1, 4, 600), 0);
    let (w1, w2) = (node(1), node(2));
    core.hello(w1, &fp(Kind::Honest), 2, None, &[], 0);
    core.hello(w2, &fp(Kind::Honest), 2, None, &[], 0);
    let got = core.request_work(w1, 2, 0).assignments;
    assert_eq!(got.len(), 2);
    assert!(core.request_work(w2, 2, 1).assignments.is_empty());
    // The `Assign` of got[1] was lost: the worker lists only got[0] (and something unknown).
    assert_eq!(core.reconcile(w1, &[got[0].replica, 999_999], 2), 1);
    let again = core.request_work(w2, 2, 3).assignments;
    assert_eq!(again.len(), 1, "only the one not held is reissued");
    assert_eq!(again[0].task.id, got[1].task.id);
    assert_eq!(
        core.report(w1, got[0].replica, truth(got[0].task.id), 4),
        ReportOutcome::Recorded {
            accepted: true,
            duplicate: false
        }
    );
    // Listing again changes nothing; another worker's list takes nothing from w1.
    assert_eq!(core.reconcile(w1, &[], 5), 0);
    assert_eq!(core.reconcile(w2, &[], 5), 1);
    assert_eq!(core.reconcile(node(9), &[], 5), 0, "an unknown worker");
}

/// Deep prefetch hands do not let the first workers to ask hoard a job: each holds at most
/// its share (by slots) of the work left, so the last tasks are spread over everyone
/// instead of queued behind one worker while the others idle.
#[test]
fn no_worker_holds_more_than_its_fair_share_of_the_work_left() {
    let mut core = Core::new(CoreConfig {
        policy: TrustPolicy {
            new_in_flight: 10_000,
            ..TrustPolicy::trusting()
        },
        ..CoreConfig::default()
    });
    // 64 tasks at quorum 2: 128 replicas over 4 workers; w4 has twice the slots.
    core.add_job(manifest("a", 64, 2, 4, 600), 0);
    let slots = [2, 2, 2, 4];
    let ws: Vec<NodeId> = (1..=4).map(node).collect();
    for (w, s) in ws.iter().zip(slots) {
        core.hello(*w, &fp(Kind::Honest), s, None, &[], 0);
    }
    // 128 replicas left over 10 slots: 26 for a 2-slot worker, 52 for the 4-slot one.
    let got: Vec<Vec<tasks::wire::Assignment>> = ws
        .iter()
        .map(|w| core.request_work(*w, 1_000, 1).assignments)
        .collect();
    let n: Vec<usize> = got.iter().map(Vec::len).collect();
    assert_eq!(n[..3], [26, 26, 26], "shares of 128 replicas by slots");
    assert!(n[3] <= 52, "the 4-slot worker's share is 52: {n:?}");
    // As the work left shrinks so does the share (never below two per slot): w1 finishes everything it
    // holds, and with 100 replicas still left elsewhere it may refill only to its share.
    for a in &got[0] {
        core.report(ws[0], a.replica, truth(a.task.id), 2);
    }
    let left = 128 - 26;
    let share = (left as u32 * 2).div_ceil(10) as usize;
    let again = core.request_work(ws[0], 1_000, 3).assignments.len();
    assert!(again <= share, "{again} > its share {share}");
    assert!(core.fair_share(2) >= 4, "never below two per slot");
}

/// A replica whose worker keeps reporting progress (or says it is paused) is not reissued
/// at its deadline; one whose progress stalls is; and no replica is held past
/// `MAX_DEADLINE_STRETCH` job deadlines. Only the holder's reports count.
#[test]
fn progress_pushes_the_deadline_back_but_a_stall_or_the_stretch_limit_does_not() {
    use tasks::wire::ProgressUpdate;
    let up = |replica, fraction, paused| ProgressUpdate {
        replica,
        fraction,
        paused,
    };
    let mut core = Core::new(CoreConfig::default());
    // Deadline 10 s; quorum 1, one task each for two workers.
    core.add_job(manifest("a", 2, 1, 4, 10), 0);
    let (w1, w2, w3) = (node(1), node(2), node(3));
    for w in [w1, w2, w3] {
        core.hello(w, &fp(Kind::Honest), 1, None, &[], 0);
    }
    let a = core.request_work(w1, 1, 0).assignments.remove(0);
    let b = core.request_work(w2, 1, 0).assignments.remove(0);
    // Someone else's report, a bad fraction: nothing moves.
    assert_eq!(core.progress(w2, &[up(a.replica, 0.5, false)], 5_000), 0);
    assert_eq!(
        core.progress(w1, &[up(a.replica, f64::NAN, false)], 5_000),
        0
    );
    // w1 advances at 5 s and 12 s, w2 reports the same fraction twice (a stall).
    assert_eq!(core.progress(w1, &[up(a.replica, 0.2, false)], 5_000), 1);
    assert_eq!(core.progress(w2, &[up(b.replica, 0.3, false)], 5_000), 1);
    assert_eq!(core.progress(w1, &[up(a.replica, 0.4, false)], 12_000), 1);
    assert_eq!(core.progress(w2, &[up(b.replica, 0.3, false)], 12_000), 0);
    core.tick(16_000);
    let got = core.request_work(w3, 1, 16_000).assignments;
    assert_eq!(
        got.len(),
        1,
        "the stalled replica is reissued at its deadline"
    );
    assert_eq!(got[0].task.id, b.task.id);
    // Paused: no progress, still kept, up to 10 deadlines after it was issued (100 s).
    for t in (20_000..=200_000).step_by(5_000) {
        core.progress(w1, &[up(a.replica, 0.4, true)], t);
        core.tick(t);
        if t < 100_000 {
            assert!(
                core.replicas[&a.replica].phase == ReplicaPhase::InFlight,
                "paused replica kept at {t} ms"
            );
        }
    }
    assert_eq!(
        core.replicas[&a.replica].phase,
        ReplicaPhase::Lost,
        "never held past the stretch limit"
    );
}

#[test]
fn matching_fingerprint_is_preferred_for_extra_replicas() {
    let mut core = Core::new(CoreConfig::default());
    core.add_job(manifest("a", 1, 2, 6, 600), 0);
    core.add_job(manifest("b", 1, 1, 6, 600), 0);
    let (w1, other, same) = (node(1), node(2), node(3));
    core.hello(w1, &fp(Kind::Honest), 1, None, &[], 0);
    core.hello(other, &fp(Kind::OtherEngine), 1, None, &[], 0);
    core.hello(same, &fp(Kind::Honest), 1, None, &[], 0);
    let a = core.request_work(w1, 1, 0).assignments.remove(0);
    assert_eq!(a.task.id.job, JobId(1));
    // The other engine gets job b's fresh task rather than the second replica of a's task.
    let o = core.request_work(other, 1, 0).assignments.remove(0);
    assert_eq!(o.task.id.job, JobId(2));
    let s = core.request_work(same, 1, 0).assignments.remove(0);
    assert_eq!(s.task.id, a.task.id);
}

#[test]
fn banned_worker_gets_no_work() {
    let mut core = Core::new(CoreConfig::default());
    let w = node(9);
    core.hello(w, &fp(Kind::Honest), 4, None, &[], 0);
    core.workers.get_mut(&w).unwrap().rep = trust::Reputation {
        valid: 0,
        invalid: 5,
        consecutive_valid: 0,
    };
    core.add_job(manifest("a", 10, 1, 2, 600), 0);
    assert!(core.request_work(w, 4, 0).assignments.is_empty());
}

#[test]
fn adaptive_replication_gives_trusted_workers_single_replicas_with_spot_checks() {
    let policy = TrustPolicy {
        adaptive: Some(Adaptive {
            min_consecutive_valid: 5,
            spot_check_one_in: 5,
        }),
        ..Default::default()
    };
    let mut sim = Sim::new(
        11,
        &[(Kind::Honest, 8)],
        CoreConfig {
            policy,
            ..CoreConfig::default()
        },
    );
    let now = sim.now;
    let (_, n) = sim.core.add_job(manifest("a", 400, 2, 6, 600), now);
    sim.run_until_done(20_000);
    sim.check();
    let reported = sim
        .core
        .replicas
        .values()
        .filter(|r| r.phase == ReplicaPhase::Reported)
        .count();
    assert!(
        reported < (2 * n as usize) * 3 / 4,
        "fewer replicas once trusted: {reported}"
    );
    assert!(
        reported > n as usize,
        "spot checks still replicate some tasks"
    );
}

#[test]
fn a_lost_replica_goes_to_others_first_and_its_late_report_counts_only_until_reissued() {
    let mut core = Core::new(CoreConfig::default());
    core.add_job(manifest("a", 1, 2, 6, 10), 0);
    let (w1, w2, w3) = (node(1), node(2), node(3));
    for w in [w1, w2, w3] {
        core.hello(w, &fp(Kind::Honest), 1, None, &[], 0);
    }
    let a = core.request_work(w1, 1, 0).assignments.remove(0);
    let b = core.request_work(w2, 1, 0).assignments.remove(0);
    core.report(w1, a.replica, truth(a.task.id), 1);
    core.tick(10_001); // w2's replica misses its deadline
    assert_eq!(core.workers[&w2].lost, 1, "the loss is counted");
    // Not reissued yet: the late report still counts, decides the task and makes up for the
    // loss.
    let out = core.report(w2, b.replica, truth(b.task.id), 10_002);
    assert_eq!(
        out,
        ReportOutcome::Recorded {
            accepted: true,
            duplicate: false
        }
    );
    assert_eq!(core.credit_fuel(&w2), truth(b.task.id).fuel_used);
    assert_eq!(core.workers[&w2].lost, 0);

    // Again, but another worker asks first: it gets the lost replica, not its loser.
    core.add_job(manifest("b", 1, 2, 6, 10), 20_000);
    let a = core.request_work(w1, 1, 20_000).assignments.remove(0);
    let b = core.request_work(w2, 1, 20_000).assignments.remove(0);
    core.abandon(w2, &[b.replica], 20_001);
    let c = core.request_work(w3, 1, 20_002).assignments.remove(0);
    assert_eq!(c.task.id, a.task.id, "another worker takes it over");
    let late = core.report(w2, b.replica, truth(b.task.id), 20_003);
    assert!(
        matches!(&late, ReportOutcome::Rejected(why) if why.contains("reissued")),
        "{late:?}"
    );
}

#[test]
fn pool_as_small_as_quorum_reissues_a_lost_replica_to_its_own_worker_and_counts_it_once() {
    let mut core = Core::new(CoreConfig::default());
    core.add_job(manifest("a", 1, 2, 6, 10), 0);
    let (w1, w2) = (node(1), node(2));
    core.hello(w1, &fp(Kind::Honest), 1, None, &[], 0);
    core.hello(w2, &fp(Kind::Honest), 1, None, &[], 0);
    let a = core.request_work(w1, 1, 0).assignments.remove(0);
    let b = core.request_work(w2, 1, 0).assignments.remove(0);
    core.report(w1, a.replica, truth(a.task.id), 1);
    core.tick(10_001); // w2's replica misses its deadline
    let again = core.request_work(w2, 1, 10_001).assignments;
    assert_eq!(again.len(), 1, "the only other worker gets the task back");
    // The late report of the lost (and since reissued) replica earns nothing; the reissued
    // one decides the task.
    let late = core.report(w2, b.replica, truth(b.task.id), 10_002);
    assert!(matches!(late, ReportOutcome::Rejected(_)), "{late:?}");
    let out = core.report(w2, again[0].replica, truth(b.task.id), 10_003);
    assert_eq!(
        out,
        ReportOutcome::Recorded {
            accepted: true,
            duplicate: false
        }
    );
    assert_eq!(core.credit_fuel(&w2), truth(b.task.id).fuel_used);
    assert_eq!(core.reputation(&w2).unwrap().valid, 1);
}

#[test]
fn one_worker_losing_a_task_over_and_over_cannot_fail_it() {
    let mut core = Core::new(CoreConfig::default());
    core.add_job(manifest("a", 1, 2, 6, 10), 0);
    let w1 = node(1);
    core.hello(w1, &fp(Kind::Honest), 1, None, &[], 0);
    for t in 0..20 {
        for a in core.request_work(w1, 1, t).assignments {
            core.abandon(w1, &[a.replica], t);
        }
    }
    assert_eq!(
        core.task_phase(TaskId {
            job: JobId(1),
            index: 0
        }),
        Some(TaskPhase::Pending)
    );
    // Two honest workers still finish it.
    let (w2, w3) = (node(2), node(3));
    core.hello(w2, &fp(Kind::Honest), 1, None, &[], 20);
    core.hello(w3, &fp(Kind::Honest), 1, None, &[], 20);
    let b = core.request_work(w2, 1, 20).assignments.remove(0);
    let c = core.request_work(w3, 1, 20).assignments.remove(0);
    core.report(w2, b.replica, truth(b.task.id), 21);
    core.report(w3, c.replica, truth(c.task.id), 21);
    assert_eq!(core.task_phase(b.task.id), Some(TaskPhase::Accepted));
}

#[test]
fn capacity_starts_small_grows_with_valid_results_and_shrinks_with_losses() {
    let policy = TrustPolicy::default();
    let mut core = Core::new(CoreConfig {
        policy: policy.clone(),
        ..CoreConfig::default()
    });
    core.add_job(manifest("a", 10_000, 1, 2, 10), 0);
    let w = node(1);
    core.hello(w, &fp(Kind::Honest), u32::MAX, None, &[], 0);
    assert_eq!(core.workers[&w].slots, tasks::limits::MAX_WORKER_SLOTS);
    let got = core.request_work(w, 10_000, 0).assignments;
    assert_eq!(
        got.len() as u32,
        policy.new_in_flight,
        "a newcomer holds little"
    );
    for a in &got {
        core.report(w, a.replica, truth(a.task.id), 1);
    }
    let got = core.request_work(w, 10_000, 2).assignments;
    assert_eq!(
        got.len() as u32,
        policy.new_in_flight + 8 * policy.in_flight_per_valid,
        "grows with valid results"
    );
    core.tick(20_000); // all of them lapse
    let lost = got.len() as u64;
    assert_eq!(core.workers[&w].lost, lost);
    let got = core.request_work(w, 10_000, 20_000).assignments;
    assert_eq!(got.len(), 1, "losses shrink it to one at a time");
}

#[test]
fn absurd_numbers_never_panic_the_core_and_credit_saturates() {
    let mut core = Core::new(CoreConfig::default());
    let mut m = manifest("a", 2, 1, 2, u64::MAX);
    m.limits.fuel = u64::MAX;
    core.add_job(m, u64::MAX - 5);
    let w = node(1);
    core.hello(w, &fp(Kind::Honest), u32::MAX, None, &[], u64::MAX - 5);
    let got = core.request_work(w, u32::MAX, u64::MAX - 5).assignments;
    assert_eq!(got.len(), 2);
    for a in &got {
        let mut r = truth(a.task.id);
        r.fuel_used = u64::MAX - 1;
        core.report(w, a.replica, r, u64::MAX);
    }
    assert_eq!(core.credit_fuel(&w), u64::MAX);
    core.tick(u64::MAX);
}

#[test]
fn blob_announcements_are_bounded_per_message_and_per_worker() {
    use tasks::limits::{MAX_HAVE_BLOBS_PER_MSG, MAX_HAVE_BLOBS_PER_WORKER};
    let mut core = Core::new(CoreConfig::default());
    let w = node(1);
    let blob = |i: usize| BlobId::of(&i.to_le_bytes());
    let many: Vec<BlobId> = (0..MAX_HAVE_BLOBS_PER_MSG + 10).map(blob).collect();
    core.hello(w, &fp(Kind::Honest), 1, None, &many, 0);
    assert_eq!(core.workers[&w].holding, MAX_HAVE_BLOBS_PER_MSG);
    assert!(!core.holders.contains_key(&many[MAX_HAVE_BLOBS_PER_MSG]));
    let mut next = MAX_HAVE_BLOBS_PER_MSG + 10;
    while next < MAX_HAVE_BLOBS_PER_WORKER + 2 * MAX_HAVE_BLOBS_PER_MSG {
        let batch: Vec<BlobId> = (next..next + MAX_HAVE_BLOBS_PER_MSG).map(blob).collect();
        core.have_blobs(w, &batch);
        next += MAX_HAVE_BLOBS_PER_MSG;
    }
    assert_eq!(core.workers[&w].holding, MAX_HAVE_BLOBS_PER_WORKER);
    let listed: usize = core.holders.values().map(|h| h.len()).sum();
    assert_eq!(listed, MAX_HAVE_BLOBS_PER_WORKER);
}

#[test]
fn one_accuser_alone_never_delists_a_holder() {
    let mut core = Core::new(CoreConfig::default());
    let module = BlobRef::of(b"module").id;
    core.add_job(manifest("a", 10, 2, 6, 600), 0);
    let (holder, liar, bystander, second) = (node(1), node(2), node(3), node(4));
    core.hello(
        holder,
        &fp(Kind::Honest),
        1,
        Some("10.0.0.1:1".parse().unwrap()),
        &[module],
        0,
    );
    for w in [liar, bystander, second] {
        core.hello(
            w,
            &fp(Kind::Honest),
            1,
            Some("10.0.0.9:1".parse().unwrap()),
            &[],
            0,
        );
    }
    assert!(
        !core.bad_peer(bystander, holder, module),
        "no assignment needs it"
    );
    core.request_work(liar, 1, 0);
    assert!(core.bad_peer(liar, holder, module));
    assert!(core.bad_peer(liar, holder, module), "repeating counts once");
    assert!(
        core.holders[&module].contains(&holder),
        "one accuser is not enough"
    );
    core.request_work(second, 1, 0);
    assert!(core.bad_peer(second, holder, module));
    assert!(
        !core.holders[&module].contains(&holder),
        "two distinct accusers delist"
    );
}

#[test]
fn consecutive_requesters_do_not_systematically_get_each_others_partner_replicas() {
    // Newcomers throughout (anchors, with their long record, may take a partner replica at
    // once; the delay is for identities without one).
    let mut core = Core::new(CoreConfig {
        policy: TrustPolicy {
            trust_min_valid: u64::MAX,
            ..TrustPolicy::default()
        },
        ..CoreConfig::default()
    });
    core.add_job(manifest("a", 200, 2, 6, 600), 0);
    let ids: Vec<NodeId> = (1..=5).map(node).collect();
    for &w in &ids {
        core.hello(w, &fp(Kind::Honest), 1, None, &[], 0);
    }
    let (a, b) = (ids[0], ids[1]);
    let mut holders: BTreeMap<TaskId, Vec<NodeId>> = BTreeMap::new();
    let mut now = 1;
    while !core.running.is_empty() && now < 10_000 {
        for &w in &ids {
            for x in core.request_work(w, 1, now).assignments {
                holders.entry(x.task.id).or_default().push(w);
                core.report(w, x.replica, truth(x.task.id), now);
            }
            now += 1;
        }
    }
    let of_a = holders.values().filter(|h| h.contains(&a)).count();
    let paired = holders
        .values()
        .filter(|h| h.contains(&a) && h.contains(&b))
        .count();
    assert!(of_a > 20);
    assert!(
        paired * 3 < of_a,
        "B, asking right after A, shared {paired} of A's {of_a} tasks"
    );
}

#[test]
fn claims_beyond_the_jobs_limits_are_rejected() {
    let mut core = Core::new(CoreConfig::default());
    core.add_job(manifest("a", 1, 1, 2, 600), 0);
    let w = node(1);
    core.hello(w, &fp(Kind::Honest), 1, None, &[], 0);
    let a = core.request_work(w, 1, 0).assignments.remove(0);
    let mut r = truth(a.task.id);
    r.fuel_used = a.task.fuel + 1;
    let out = core.report(w, a.replica, r, 1);
    assert!(
        matches!(&out, ReportOutcome::Rejected(m) if m.contains("fuel_used")),
        "{out:?}"
    );
    let mut r = truth(a.task.id);
    r.output_len = a.task.max_output + 1;
    let out = core.report(w, a.replica, r, 1);
    assert!(
        matches!(&out, ReportOutcome::Rejected(m) if m.contains("output_len")),
        "{out:?}"
    );
    assert_eq!(core.task_phase(a.task.id), Some(TaskPhase::Pending));
    assert_eq!(core.credit_fuel(&w), 0);
}

#[test]
fn peers_list_announcing_workers_then_the_coordinator() {
    let seed = PeerAddr {
        node_id: node(100),
        addr: "127.0.0.1:7100".parse().unwrap(),
    };
    let mut core = Core::new(CoreConfig {
        seed: Some(seed.clone()),
        ..CoreConfig::default()
    });
    core.add_job(manifest("a", 4, 1, 2, 600), 0);
    let module = BlobRef::of(b"module").id;
    let (w1, w2) = (node(1), node(2));
    core.hello(
        w1,
        &fp(Kind::Honest),
        1,
        Some("10.0.0.1:1".parse().unwrap()),
        &[module],
        0,
    );
    core.hello(
        w2,
        &fp(Kind::Honest),
        1,
        Some("10.0.0.2:1".parse().unwrap()),
        &[],
        0,
    );
    let a = core.request_work(w2, 1, 0).assignments.remove(0);
    assert_eq!(a.peers.len(), 2);
    assert_eq!(a.peers[0].node_id, w1);
    assert_eq!(a.peers[1], seed);
    let b = core.request_work(w1, 1, 0).assignments.remove(0);
    assert_eq!(
        b.peers,
        vec![seed.clone()],
        "a worker is not pointed at itself, nor at fetchers of what it holds"
    );
    // A third worker is pointed at the holder, then at the worker still fetching the module
    // (it serves the chunks it has), then at the seed.
    let w3 = node(3);
    core.hello(
        w3,
        &fp(Kind::Honest),
        1,
        Some("10.0.0.3:1".parse().unwrap()),
        &[],
        0,
    );
    let c = core.request_work(w3, 1, 0).assignments.remove(0);
    let ids: Vec<NodeId> = c.peers.iter().map(|p| p.node_id).collect();
    assert_eq!(ids, vec![w1, w2, seed.node_id]);
}

#[test]
fn reachable_workers_are_listed_first_and_only_unreachable_peers_are_punched() {
    let mut core = Core::new(CoreConfig::default());
    core.add_job(manifest("a", 4, 1, 2, 600), 0);
    let module = BlobRef::of(b"module").id;
    let (nat, public, fetcher) = (node(1), node(2), node(3));
    for (w, addr, blobs) in [
        (nat, "198.51.100.7:4000", vec![module]),
        (public, "203.0.113.5:4000", vec![module]),
        (fetcher, "192.0.2.9:4000", vec![]),
    ] {
        core.hello(
            w,
            &fp(Kind::Honest),
            1,
            Some(addr.parse().unwrap()),
            &blobs,
            0,
        );
    }
    // Before any dial-back, holders come in the coordinator's rotation order; once `public`
    // answered one, it is listed first.
    core.set_reachable(public, true);
    core.set_reachable(nat, false);
    for rotate in 0..4 {
        let holders = core.holders_of(&module, Some(&fetcher), 8, rotate);
        let ids: Vec<NodeId> = holders.iter().map(|p| p.node_id).collect();
        assert_eq!(
            ids,
            vec![public, nat],
            "super-peers first, whatever the rotation"
        );
    }
    // A punch is coordinated only towards a connected peer that is not reachable, and it
    // carries the requester's address as the coordinator saw it.
    assert_eq!(
        core.punch_target(&fetcher, &nat),
        Some("192.0.2.9:4000".parse().unwrap())
    );
    assert_eq!(core.punch_target(&fetcher, &public), None);
    assert_eq!(core.punch_target(&fetcher, &fetcher), None);
    core.disconnect(nat, 1);
    assert_eq!(core.punch_target(&fetcher, &nat), None, "not connected");
    // A new session forgets reachability until the next dial-back.
    core.hello(
        public,
        &fp(Kind::Honest),
        1,
        Some("203.0.113.5:4001".parse().unwrap()),
        &[module],
        2,
    );
    assert_eq!(
        core.punch_target(&fetcher, &public),
        Some("192.0.2.9:4000".parse().unwrap())
    );
}

#[test]
fn workers_behind_the_requesters_own_nat_are_not_listed_as_peers_but_lan_workers_are() {
    let mut core = Core::new(CoreConfig::default());
    core.add_job(manifest("a", 4, 1, 2, 600), 0);
    let module = BlobRef::of(b"module").id;
    let (home_a, home_b, public, lan_a, lan_b) = (node(1), node(2), node(3), node(4), node(5));
    for (w, addr, blobs) in [
        (home_a, "198.51.100.7:40001", vec![module]),
        (home_b, "198.51.100.7:40002", vec![]),
        (public, "203.0.113.5:4000", vec![module]),
        (lan_a, "10.1.0.2:4000", vec![module]),
        (lan_b, "10.1.0.3:4000", vec![]),
    ] {
        core.hello(
            w,
            &fp(Kind::Honest),
            1,
            Some(addr.parse().unwrap()),
            &blobs,
            0,
        );
    }
    let a = core.request_work(home_b, 1, 0).assignments.remove(0);
    let ids: Vec<NodeId> = a.peers.iter().map(|p| p.node_id).collect();
    assert!(
        !ids.contains(&home_a),
        "same NAT address, no hairpin: {ids:?}"
    );
    assert!(ids.contains(&public), "{ids:?}");
    let b = core.request_work(lan_b, 1, 0).assignments.remove(0);
    let ids: Vec<NodeId> = b.peers.iter().map(|p| p.node_id).collect();
    assert!(
        ids.contains(&lan_a),
        "private addresses reach each other: {ids:?}"
    );
}

#[test]
fn workers_of_one_public_address_block_never_share_a_task_but_loopback_workers_do() {
    let mut core = Core::new(CoreConfig::default());
    core.add_job(manifest("a", 1, 2, 6, 600), 0);
    let (a, b, c) = (node(1), node(2), node(3));
    for (w, addr) in [
        (a, "198.51.100.7:1"),
        (b, "198.51.100.8:1"),
        (c, "203.0.113.9:1"),
    ] {
        core.hello(w, &fp(Kind::Honest), 1, None, &[], 0);
        core.observed_address(w, addr.parse().unwrap());
    }
    let first = core.request_work(a, 1, 0).assignments.remove(0);
    assert!(
        core.request_work(b, 1, 0).assignments.is_empty(),
        "same /24 as the first replica"
    );
    assert_eq!(
        core.request_work(c, 1, 0).assignments[0].task.id,
        first.task.id
    );

    let mut core = Core::new(CoreConfig::default());
    core.add_job(manifest("a", 1, 2, 6, 600), 0);
    for w in [a, b] {
        core.hello(
            w,
            &fp(Kind::Honest),
            1,
            Some("127.0.0.1:9".parse().unwrap()),
            &[],
            0,
        );
        core.observed_address(w, "127.0.0.1:5".parse().unwrap());
    }
    core.request_work(a, 1, 0);
    assert_eq!(
        core.request_work(b, 1, 0).assignments.len(),
        1,
        "loopback is exempt"
    );
}

#[test]
fn a_banned_workers_votes_on_undecided_tasks_are_discounted_and_its_work_reissued() {
    let policy = TrustPolicy {
        ban_min_invalid: 1,
        ban_score: f64::INFINITY,
        ..TrustPolicy::default()
    };
    let mut core = Core::new(CoreConfig {
        policy,
        ..CoreConfig::default()
    });
    core.add_job(manifest("a", 2, 2, 6, 600), 0);
    let (liar, h1, h2) = (node(1), node(2), node(3));
    for w in [liar, h1, h2] {
        core.hello(w, &fp(Kind::Honest), 2, None, &[], 0);
    }
    let lies = core.request_work(liar, 2, 0).assignments;
    assert_eq!(lies.len(), 2);
    let wrong = |t| RunResult {
        output_hash: BlobId::of(b"lie"),
        ..truth(t)
    };
    core.report(liar, lies[0].replica, wrong(lies[0].task.id), 1);
    // Task 0: one honest worker disagrees, the other breaks the tie: the liar is caught.
    let x = core.request_work(h1, 1, 1).assignments.remove(0);
    let y = core.request_work(h2, 1, 1).assignments.remove(0);
    let (hx, x, hy, y) = if x.task.id == lies[0].task.id {
        (h1, x, h2, y)
    } else {
        (h2, y, h1, x)
    };
    assert_eq!((x.task.id, y.task.id), (lies[0].task.id, lies[1].task.id));
    core.report(hx, x.replica, truth(x.task.id), 2);
    let z = core.request_work(hy, 1, 2).assignments.remove(0);
    assert_eq!(z.task.id, lies[0].task.id);
    core.take_notices();
    core.report(hy, z.replica, truth(z.task.id), 3);
    assert!(core.is_banned(&liar));
    // Its replica of task 1, still in flight, was cancelled; task 1 gets another replica.
    let notices = core.take_notices();
    assert!(notices.iter().any(|n| matches!(n, Notice::Cancel { worker, replicas } if *worker == liar && replicas == &vec![lies[1].replica])));
    let w = core.request_work(hx, 1, 3).assignments.remove(0);
    assert_eq!(w.task.id, lies[1].task.id);
    // A late lie from the banned worker on the still undecided task 1 does not count: it is
    // recorded, but as a discounted vote, in no group.
    core.report(liar, lies[1].replica, wrong(lies[1].task.id), 4);
    assert_eq!(core.task_phase(lies[1].task.id), Some(TaskPhase::Pending));
    let t = core.tally(lies[1].task.id);
    assert_eq!((t.discounted, t.reported), (1, 0));
    assert!(t.groups.is_empty(), "{t:?}");
    core.report(hy, y.replica, truth(y.task.id), 5);
    assert_eq!(
        core.report(hx, w.replica, truth(w.task.id), 6),
        ReportOutcome::Recorded {
            accepted: true,
            duplicate: false
        }
    );
}

/// One task (quorum 2 of at most 6) on a core with this dispute margin (and no other
/// defence in the way); `take(w, lie)` gives worker `w` a replica and reports it.
struct Contest {
    core: Core,
    ws: Vec<NodeId>,
}

impl Contest {
    fn new(dispute_margin: u32) -> Contest {
        let mut core = Core::new(CoreConfig {
            policy: TrustPolicy {
                dispute_margin,
                untrusted_extra: 0,
                partner_spread: 0,
                distinct_address_blocks: false,
                ..TrustPolicy::default()
            },
            ..CoreConfig::default()
        });
        core.add_job(manifest("a", 1, 2, 6, 10), 0);
        let ws: Vec<NodeId> = (1..=5).map(node).collect();
        for w in &ws {
            core.hello(*w, &fp(Kind::Honest), 1, None, &[], 0);
        }
        Contest { core, ws }
    }

    fn take(&mut self, w: usize, lie: bool) -> TaskId {
        let a = self
            .core
            .request_work(self.ws[w], 1, 1)
            .assignments
            .remove(0);
        let mut r = truth(a.task.id);
        if lie {
            r.output_hash = tasks::BlobId::of(b"collude");
        }
        self.core.report(self.ws[w], a.replica, r, 2);
        a.task.id
    }
}

#[test]
fn a_contested_result_needs_the_dispute_margin_over_its_rival() {
    let mut c = Contest::new(2);
    let task = c.take(0, false);
    c.take(1, true);
    c.take(2, false);
    // 2 agree, 1 contradicts: a plain quorum, but a lead of 1 only.
    assert_eq!(c.core.task_phase(task), Some(TaskPhase::Pending));
    c.take(3, false);
    // 3 against 1: accepted, the dissenter judged invalid.
    assert_eq!(c.core.task_phase(task), Some(TaskPhase::Accepted));
    assert_eq!(c.core.reputation(&c.ws[1]).map(|r| r.invalid), Some(1));
    assert_eq!(c.core.reputation(&c.ws[0]).map(|r| r.valid), Some(1));
    // Without the margin, the same reports are accepted at 2 against 1.
    let mut c = Contest::new(0);
    let task = c.take(0, false);
    c.take(1, true);
    c.take(2, false);
    assert_eq!(c.core.task_phase(task), Some(TaskPhase::Accepted));
}

/// A one-task job "attacked" (added at t=3) whose first replicas go to `liars`, who agree on
/// a wrong output; returns its task.
fn newcomers_agree_on_a_lie(core: &mut Core, liars: &[NodeId]) -> TaskId {
    let (job, _) = core.add_job(manifest("attacked", 1, 2, 6, 600), 3);
    let task = TaskId { job, index: 0 };
    let lie = RunResult {
        output_hash: BlobId::of(b"lie"),
        ..truth(task)
    };
    for &s in liars {
        let got = core.request_work(s, 1, 4).assignments;
        assert_eq!(got.len(), 1);
        core.report(s, got[0].replica, lie.clone(), 5);
    }
    task
}

/// `anchors` take the deciding replicas of `task` one by one and report the truth: the task
/// is accepted and the `liars` who agreed on a lie are banned.
fn anchors_outvote_liars(core: &mut Core, task: TaskId, anchors: &[NodeId], liars: &[NodeId]) {
    for (i, &a) in anchors.iter().enumerate() {
        assert_eq!(core.task_phase(task), Some(TaskPhase::Pending));
        let got = core.request_work(a, 1, 7 + i as u64).assignments;
        assert_eq!(got.len(), 1, "anchor {i} gets the deciding replica");
        core.report(a, got[0].replica, truth(task), 8 + i as u64);
    }
    assert_eq!(core.task_phase(task), Some(TaskPhase::Accepted));
    for s in liars {
        assert!(core.is_banned(s), "{s:?} contradicted three anchors");
    }
}

/// Anchors decide (opt-in `anchors_decide`): once anchors are connected, newcomers that agree
/// among themselves cannot get a result accepted; the task's next replica waits for an anchor
/// (no newcomer may take it), and `quorum + untrusted_extra` agreeing anchors win over the
/// newcomers' rival result, whose workers are then banned.
#[test]
fn newcomers_agreeing_on_a_lie_cannot_outvote_anchors_when_anchors_decide() {
    let mut core = Core::new(CoreConfig {
        policy: TrustPolicy {
            anchors_decide: true,
            untrusted_extra: 1,
            dispute_margin: 2,
            trust_min_valid: 1,
            ban_min_invalid: 1,
            ban_score: f64::INFINITY,
            partner_spread: 0,
            distinct_address_blocks: false,
            ..TrustPolicy::default()
        },
        ..CoreConfig::default()
    });
    let anchors: Vec<NodeId> = (1..=3).map(node).collect();
    let sybils: Vec<NodeId> = (10..=12).map(node).collect();
    let module = [BlobId::of(b"module")];
    for w in anchors.iter().chain(&sybils) {
        core.hello(*w, &fp(Kind::Honest), 1, None, &module, 0);
    }
    // Warm-up: no anchor yet, so three agreeing newcomers (quorum 2 + 1) accept, and each
    // becomes an anchor (one agreeing result suffices here).
    let (warm, _) = core.add_job(manifest("warm-up", 1, 2, 6, 600), 0);
    for &a in &anchors {
        let got = core.request_work(a, 1, 1).assignments;
        assert_eq!(got.len(), 1, "warm-up replica for {a:?}");
        core.report(a, got[0].replica, truth(got[0].task.id), 2);
    }
    assert_eq!(
        core.task_phase(TaskId {
            job: warm,
            index: 0
        }),
        Some(TaskPhase::Accepted)
    );
    assert_eq!(core.anchors_connected(), 3);

    let task = newcomers_agree_on_a_lie(&mut core, &sybils[..2]);
    // Two newcomers agree: no longer enough, and the next replica is for anchors only.
    assert_eq!(core.task_phase(task), Some(TaskPhase::Pending));
    assert!(
        core.request_work(sybils[2], 1, 6).assignments.is_empty(),
        "a newcomer must not take the replica that anchors decide"
    );
    anchors_outvote_liars(&mut core, task, &anchors, &sybils[..2]);
    assert!(anchors.iter().all(|a| !core.is_banned(a)));
}

/// Anchors decide over newcomers (`anchors_decide_for_newcomers`, on in `serve`'s default
/// open policy): identities that first joined once anchors were connected cannot get a lie
/// accepted among themselves, and are banned when anchors outvote them; but workers that were
/// there from the cold start still decide as peers (no anchor needed), and the flag survives
/// a restart from the store.
#[test]
fn newcomers_to_an_established_pool_cannot_outvote_its_anchors_by_default() {
    let policy = TrustPolicy {
        trust_min_valid: 1,
        partner_spread: 0,
        deal_partners: false,
        distinct_address_blocks: false,
        ..TrustPolicy::open_pool()
    };
    assert!(policy.anchors_decide_for_newcomers && !policy.anchors_decide);
    let mut core = Core::new(CoreConfig {
        policy: policy.clone(),
        ..CoreConfig::default()
    });
    let founders: Vec<NodeId> = (1..=7).map(node).collect();
    let module = [BlobId::of(b"module")];
    for w in &founders {
        core.hello(*w, &fp(Kind::Honest), 1, None, &module, 0);
    }
    // Cold start: founders 0-3 agree without any anchor (quorum 2 + untrusted_extra 1 +
    // cold_start_extra 1) and become anchors.
    let (warm, _) = core.add_job(manifest("warm-up", 1, 2, 6, 600), 0);
    for &a in &founders[..4] {
        let got = core.request_work(a, 1, 1).assignments;
        assert_eq!(got.len(), 1, "warm-up replica for {a:?}");
        core.report(a, got[0].replica, truth(got[0].task.id), 2);
    }
    let warm_task = TaskId {
        job: warm,
        index: 0,
    };
    assert_eq!(core.task_phase(warm_task), Some(TaskPhase::Accepted));
    assert_eq!(core.anchors_connected(), 4);

    // A swarm arrives: new identities while anchors are connected are newcomers.
    let sybils: Vec<NodeId> = (10..=14).map(node).collect();
    for w in &sybils {
        core.hello(*w, &fp(Kind::Honest), 1, None, &module, 3);
    }
    let task = newcomers_agree_on_a_lie(&mut core, &sybils[..2]);
    // Two newcomers agree: a quorum, but not enough while anchors are at hand; the next
    // replica is for anchors only (a third newcomer could otherwise make quorum + 1).
    assert_eq!(core.task_phase(task), Some(TaskPhase::Pending));
    for s in &sybils[2..4] {
        assert!(
            core.request_work(*s, 1, 6).assignments.is_empty(),
            "a newcomer must not take the replica that anchors decide"
        );
    }
    anchors_outvote_liars(&mut core, task, &founders[..3], &sybils[..2]);
    assert!(founders.iter().all(|a| !core.is_banned(a)));

    // Founders that are not anchors yet are no newcomers: three of them agreeing (quorum +
    // untrusted_extra) are accepted as peers are, with anchors connected and no anchor
    // among them — where three newcomers were not.
    let (job2, _) = core.add_job(manifest("founders", 1, 2, 6, 600), 20);
    let t2 = TaskId {
        job: job2,
        index: 0,
    };
    for (i, &f) in founders[4..].iter().enumerate() {
        let got = core.request_work(f, 1, 21 + i as u64).assignments;
        assert_eq!(got.len(), 1, "founder {} gets a replica", 4 + i);
        core.report(f, got[0].replica, truth(t2), 22 + i as u64);
    }
    assert_eq!(
        core.task_phase(t2),
        Some(TaskPhase::Accepted),
        "founders decide as peers"
    );

    // The newcomer flag is durable: restored from the store, a newcomer is still one and a
    // founder still is not.
    use crate::store::Store;
    let dir = tempfile::tempdir().unwrap();
    let mut store = crate::store::SqliteStore::open(&dir.path().join("c.db")).unwrap();
    store.commit(&core.take_mutations()).unwrap();
    let restored = Core::restore(
        CoreConfig {
            policy,
            ..CoreConfig::default()
        },
        store.load().unwrap(),
        30,
    );
    assert!(restored.workers[&sybils[4]].junior);
    assert!(!restored.workers[&founders[6]].junior);
}

/// What the newcomer rule costs an honest pool: 10 founders become anchors on a warm-up job,
/// 10 honest newcomers join, and a job of 400 tasks runs on all 20 (each asking in turn, one
/// replica at a time). Replicas per task with the rule on and off, printed; the rule may
/// cost newcomers' first results an anchor's replica, but every task is accepted, nobody is
/// banned and every newcomer becomes an anchor.
#[test]
fn the_newcomer_rule_costs_an_honest_pool_little() {
    let run = |rule: bool| -> (f64, usize) {
        let mut core = Core::new(CoreConfig {
            policy: TrustPolicy {
                anchors_decide_for_newcomers: rule,
                distinct_address_blocks: false,
                ..TrustPolicy::open_pool()
            },
            ..CoreConfig::default()
        });
        let module = [BlobId::of(b"module")];
        let founders: Vec<NodeId> = (1..=10).map(node).collect();
        for w in &founders {
            core.hello(*w, &fp(Kind::Honest), 1, None, &module, 0);
        }
        core.add_job(manifest("warm-up", 60, 2, 6, 600), 0);
        work_until_idle(&mut core, &founders, 1, |_, t| truth(t));
        assert_eq!(core.anchors_connected(), 10, "founders are anchors");
        let newcomers: Vec<NodeId> = (100..110).map(node).collect();
        for w in &newcomers {
            core.hello(*w, &fp(Kind::Honest), 1, None, &module, 2);
        }
        let (job, _) = core.add_job(manifest("job", 400, 2, 6, 600), 2);
        let all: Vec<NodeId> = founders.iter().chain(&newcomers).copied().collect();
        let mut issued = 0usize;
        for _ in 0..10_000 {
            let mut any = false;
            for w in &all {
                for a in core.request_work(*w, 1, 3).assignments {
                    any = true;
                    if a.task.id.job == job {
                        issued += 1;
                    }
                    core.report(*w, a.replica, truth(a.task.id), 3);
                }
            }
            if !any {
                break;
            }
        }
        let st = core.status(Some(job)).expect("job");
        assert_eq!(
            st.jobs[0].tasks_done, 400,
            "every task accepted (rule {rule})"
        );
        assert!(all.iter().all(|w| !core.is_banned(w)), "nobody banned");
        if rule {
            assert!(
                newcomers.iter().all(|w| core.workers[w].junior),
                "they joined an established pool"
            );
        }
        (issued as f64 / 400.0, core.anchors_connected())
    };
    let (with, anchors_with) = run(true);
    let (without, _) = run(false);
    println!(
        "honest pool, 10 founders + 10 newcomers, 400 tasks: {with:.3} replicas/task with the newcomer rule, {without:.3} without ({:.2}x); anchors at the end {anchors_with}/20",
        with / without
    );
    assert_eq!(anchors_with, 20, "every newcomer became an anchor");
}

/// `cold_start_extra` (open policy): with no anchor yet, a result needs quorum +
/// untrusted_extra + 1 = 4 agreeing workers when a fifth could still give a replica — but a
/// pool that cannot give that many (4 workers, one of them a liar) still decides: every task
/// is accepted with the honest result, none is left pending.
#[test]
fn a_cold_start_asks_one_more_agreement_only_where_the_pool_can_give_it() {
    let policy = TrustPolicy {
        partner_spread: 0,
        deal_partners: false,
        distinct_address_blocks: false,
        ..TrustPolicy::open_pool()
    };
    assert_eq!(policy.cold_start_extra, 1);
    let module = [BlobId::of(b"module")];
    // Six honest workers: the first task is accepted only once 4 agree.
    let mut core = Core::new(CoreConfig {
        policy: policy.clone(),
        ..CoreConfig::default()
    });
    let ws: Vec<NodeId> = (1..=6).map(node).collect();
    for w in &ws {
        core.hello(*w, &fp(Kind::Honest), 1, None, &module, 0);
    }
    let (job, _) = core.add_job(manifest("cold", 1, 2, 6, 600), 0);
    let task = TaskId { job, index: 0 };
    for (i, w) in ws.iter().enumerate() {
        let got = core.request_work(*w, 1, 1).assignments;
        if got.is_empty() {
            continue;
        }
        core.report(*w, got[0].replica, truth(task), 2);
        let phase = core.task_phase(task);
        if i < 3 {
            assert_eq!(
                phase,
                Some(TaskPhase::Pending),
                "{} agreeing are not enough",
                i + 1
            );
        }
    }
    assert_eq!(core.task_phase(task), Some(TaskPhase::Accepted));
    // Four workers, one lying on everything: the three honest ones still decide.
    let mut core = Core::new(CoreConfig {
        policy,
        ..CoreConfig::default()
    });
    let ws: Vec<NodeId> = (1..=4).map(node).collect();
    for w in &ws {
        core.hello(*w, &fp(Kind::Honest), 1, None, &module, 0);
    }
    let (job, _) = core.add_job(manifest("small", 8, 2, 6, 600), 0);
    work_until_idle(&mut core, &ws, 1, |i, t| {
        let mut r = truth(t);
        if i == 3 {
            r.output_hash = BlobId::of(b"lie");
        }
        r
    });
    for index in 0..8 {
        assert_eq!(
            core.task_phase(TaskId { job, index }),
            Some(TaskPhase::Accepted),
            "task {index}"
        );
    }
}

/// `deal_partners` (open policy): a task's replicas, its first included, go to workers the
/// coordinator draws, not to whoever asks next. One operator's two identities asking in
/// step (A, then B at once) while 8 honest workers idle-poll would otherwise hold both
/// replicas of every task; dealt, they rarely do. A drawn worker gets its replica when it
/// next asks; before the deal lapses (two retry hints) nobody else does, after it anyone.
#[test]
fn replicas_are_dealt_not_grabbed() {
    let module = [BlobId::of(b"module")];
    let (a, b) = (node(1), node(2));
    let idle: Vec<NodeId> = (3..=10).map(node).collect();
    let retry = 1_000;
    let run = |seed: u64, deal: bool, drawn_asks: bool| {
        let mut core = dealing_core(seed, deal, retry);
        for w in [a, b].iter().chain(&idle) {
            core.hello(*w, &fp(Kind::Honest), 1, None, &module, 0);
        }
        // One task of quorum 2.
        let (job, _) = core.add_job(manifest("job", 1, 2, 6, 600), 0);
        let task = TaskId { job, index: 0 };
        let holders: Vec<NodeId> = [a, b]
            .into_iter()
            .filter(|w| !core.request_work(*w, 1, 1).assignments.is_empty())
            .collect();
        if holders.len() == 2 {
            return true;
        }
        let (drawn, until) = core.deals.get(task).expect("dealt");
        assert!(!holders.contains(&drawn), "seed {seed}: dealt to a holder");
        assert_eq!(until, 1 + 2 * retry);
        let mut others = idle
            .iter()
            .copied()
            .filter(|w| *w != drawn && !holders.contains(w));
        let other = others.next().expect("idle workers left");
        let got = core.request_work(other, 1, 2).assignments;
        assert!(got.is_empty(), "seed {seed}: taken before its deal lapsed");
        let (taker, at) = if drawn_asks {
            (drawn, 3)
        } else {
            (others.next().expect("idle workers left"), until)
        };
        let got = core.request_work(taker, 1, at).assignments;
        assert_eq!(got.len(), 1, "seed {seed}: {taker:?} at {at}");
        assert_eq!(got[0].task.id, task);
        false
    };
    let trials = 90u64;
    let grabbed = (0..trials).filter(|s| run(*s, false, true)).count();
    assert_eq!(
        grabbed as u64, trials,
        "without dealing, A gets the first replica and B the partner"
    );
    let captured = (0..trials).filter(|s| run(*s, true, s % 2 == 0)).count();
    // Both replicas to A and B takes lucky draws among 10 workers; a fixed seed range makes
    // this deterministic.
    assert!(
        captured <= 9,
        "A and B held both replicas {captured}/{trials} times"
    );
}

/// The cold-start hold (open policy): while no anchor is connected, an agreement nobody
/// contradicted waits out the job's first deal window (two retry hints from its first
/// assignment) and is accepted when it ends; without dealing there is no hold.
#[test]
fn a_cold_start_agreement_waits_out_the_first_deal_window() {
    let module = [BlobId::of(b"module")];
    let ws: Vec<NodeId> = (1..=6).map(node).collect();
    for deal in [true, false] {
        let mut core = dealing_core(TrustPolicy::open_pool().seed, deal, 1_000);
        for w in &ws {
            core.hello(*w, &fp(Kind::Honest), 1, None, &module, 0);
        }
        let (job, _) = core.add_job(manifest("cold", 1, 2, 6, 600), 0);
        let task = TaskId { job, index: 0 };
        for _ in 0..10 {
            for w in &ws {
                for a in core.request_work(*w, 1, 10).assignments {
                    core.report(*w, a.replica, truth(a.task.id), 10);
                }
            }
        }
        if deal {
            assert_eq!(core.task_phase(task), Some(TaskPhase::Pending), "held");
            core.tick(2_009);
            assert_eq!(
                core.task_phase(task),
                Some(TaskPhase::Pending),
                "still held"
            );
            core.tick(2_010);
        }
        assert_eq!(
            core.task_phase(task),
            Some(TaskPhase::Accepted),
            "dealing {deal}"
        );
    }
}

/// A core for the retry tests: plain quorum, every replica due at once.
fn retry_core() -> Core {
    Core::new(CoreConfig {
        policy: TrustPolicy {
            untrusted_extra: 0,
            partner_spread: 0,
            distinct_address_blocks: false,
            ..TrustPolicy::default()
        },
        ..CoreConfig::default()
    })
}

/// Hand out and report work until nobody gets any: worker `i` reports `answer(i, task)`.
fn work_until_idle(
    core: &mut Core,
    ws: &[NodeId],
    now: u64,
    answer: impl Fn(usize, TaskId) -> RunResult,
) {
    let mut now = now;
    for _ in 0..1_000 {
        let mut any = false;
        for (i, w) in ws.iter().enumerate() {
            for a in core.request_work(*w, 4, now).assignments {
                any = true;
                core.report(*w, a.replica, answer(i, a.task.id), now);
            }
        }
        if !any {
            // Nothing to hand out: a job's cold-start hold may still keep results waiting.
            let holding = core.running.iter().any(|j| {
                matches!(
                    core.jobs[j].hold,
                    super::ColdHold::Until(_) | super::ColdHold::Failing(_)
                )
            });
            if !holding {
                return;
            }
            now += 2 * core.cfg.retry_after_ms;
            core.end_holds(now);
        }
    }
    panic!("the core kept handing out work");
}

/// Worker 1 contradicts worker 0 on every task but the last, so with quorum 2 of at most 2
/// replicas those tasks fail.
fn lie_on_all_but_last(last: u32) -> impl Fn(usize, TaskId) -> RunResult {
    move |i, t| {
        let mut r = truth(t);
        if i == 1 && t.index != last {
            r.output_hash = BlobId::of(b"wrong");
        }
        r
    }
}

#[test]
fn retry_sends_failed_tasks_back_with_a_fresh_budget_and_never_touches_accepted_ones() {
    let mut core = retry_core();
    let (job, _) = core.add_job(manifest("a", 3, 2, 2, 600), 0);
    let ws = [node(1), node(2)];
    for w in ws {
        core.hello(w, &fp(Kind::Honest), 2, None, &[], 0);
    }
    work_until_idle(&mut core, &ws, 1, lie_on_all_but_last(2));
    let s = &core.status(Some(job)).unwrap().jobs[0];
    assert_eq!(
        (s.state, s.tasks_done, s.tasks_failed),
        (JobState::Failed, 1, 2)
    );
    let accepted = TaskId { job, index: 2 };
    let valid_before = core.reputation(&ws[0]).unwrap().valid;
    core.take_mutations();

    assert_eq!(core.retry_failed(job, 2), Ok(2));
    let muts = core.take_mutations();
    let retried: Vec<u32> = muts
        .iter()
        .filter_map(|m| match m {
            Mutation::Retried { task, .. } => Some(task.index),
            _ => None,
        })
        .collect();
    assert_eq!(retried, vec![0, 1], "only the failed tasks go back");
    assert!(muts.contains(&Mutation::JobState {
        job,
        state: JobState::Running
    }));
    let s = &core.status(Some(job)).unwrap().jobs[0];
    assert_eq!(
        (s.state, s.tasks_done, s.tasks_failed),
        (JobState::Running, 1, 0)
    );
    assert_eq!(
        core.task_phase(TaskId { job, index: 0 }),
        Some(TaskPhase::Pending)
    );
    assert_eq!(core.task_phase(accepted), Some(TaskPhase::Accepted));

    // A fresh budget: the two disagreeing reports no longer count, so two new agreeing
    // replicas (max_replicas 2) decide each task, and the accepted task gets no replica.
    let mut given = Vec::new();
    for _ in 0..1_000 {
        let mut any = false;
        for w in ws {
            for a in core.request_work(w, 4, 3).assignments {
                any = true;
                given.push(a.task.id);
                core.report(w, a.replica, truth(a.task.id), 3);
            }
        }
        if !any {
            break;
        }
    }
    given.sort_unstable_by_key(|t| t.index);
    assert_eq!(
        given.iter().map(|t| t.index).collect::<Vec<_>>(),
        vec![0, 0, 1, 1],
        "two replicas of each retried task, none of the accepted one"
    );
    let s = &core.status(Some(job)).unwrap().jobs[0];
    assert_eq!(
        (s.state, s.tasks_done, s.tasks_failed),
        (JobState::Done, 3, 0)
    );
    assert_eq!(core.reputation(&ws[0]).unwrap().valid, valid_before + 2);

    // Nothing failed: nothing to retry, nothing changes.
    core.take_mutations();
    assert_eq!(core.retry_failed(job, 4), Ok(0));
    assert!(core.take_mutations().is_empty());
    assert_eq!(core.job_state(job), Some(JobState::Done));
    assert_eq!(core.retry_failed(JobId(99), 4), Err(RetryError::UnknownJob));
}

#[test]
fn a_cancelled_job_is_not_retried() {
    let mut core = retry_core();
    let (job, _) = core.add_job(manifest("a", 2, 2, 2, 600), 0);
    let ws = [node(1), node(2)];
    for w in ws {
        core.hello(w, &fp(Kind::Honest), 2, None, &[], 0);
    }
    // Task 0 fails, then the job is cancelled before task 1 is decided.
    for w in ws {
        let a = core.request_work(w, 1, 1).assignments;
        for a in a {
            let mut r = truth(a.task.id);
            if w == ws[1] {
                r.output_hash = BlobId::of(b"wrong");
            }
            core.report(w, a.replica, r, 1);
        }
    }
    assert_eq!(core.status(Some(job)).unwrap().jobs[0].tasks_failed, 1);
    assert!(core.cancel_job(job, 2));
    core.take_mutations();
    assert_eq!(core.retry_failed(job, 3), Err(RetryError::Cancelled));
    assert!(core.take_mutations().is_empty());
}

#[test]
fn a_retry_survives_a_restart_and_earlier_attempts_stay_forgotten() {
    use crate::store::{SqliteStore, Store};
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join(SqliteStore::FILE);
    let mut store = SqliteStore::open(&p).unwrap();
    let mut core = retry_core();
    let (job, _) = core.add_job(manifest("a", 3, 2, 2, 600), 0);
    let ws = [node(1), node(2)];
    for w in ws {
        core.hello(w, &fp(Kind::Honest), 2, None, &[], 0);
    }
    work_until_idle(&mut core, &ws, 1, lie_on_all_but_last(2));
    store.commit(&core.take_mutations()).unwrap();
    assert_eq!(core.retry_failed(job, 2), Ok(2));
    // One new replica of task 0 goes out (and is in flight) before the restart.
    let a = core.request_work(ws[0], 1, 3).assignments.remove(0);
    store.commit(&core.take_mutations()).unwrap();
    let mut before = core.status(None).unwrap();
    for w in &mut before.workers {
        w.connected = false;
    }
    drop((core, store));

    let mut store = SqliteStore::open(&p).unwrap();
    let cfg = retry_core().config().clone();
    let mut core = Core::restore(cfg, store.load().unwrap(), 4);
    assert!(
        core.take_mutations().is_empty(),
        "restoring changes nothing durable"
    );
    assert_eq!(core.status(None).unwrap(), before);
    assert_eq!(core.job_state(job), Some(JobState::Running));
    for w in ws {
        core.hello(w, &fp(Kind::Honest), 2, None, &[], 5);
    }
    // The in-flight replica of the new attempt is still reportable; the rest is handed out.
    core.report(ws[0], a.replica, truth(a.task.id), 5);
    work_until_idle(&mut core, &ws, 6, |_, t| truth(t));
    store.commit(&core.take_mutations()).unwrap();
    let s = &core.status(Some(job)).unwrap().jobs[0];
    assert_eq!(
        (s.state, s.tasks_done, s.tasks_failed),
        (JobState::Done, 3, 0)
    );
    let results = store.task_results(job).unwrap();
    assert_eq!(results.len(), 3);
    assert!(results.iter().all(
        |(t, _)| t.status == tasks::wire::TaskState::Accepted && t.agreeing_workers.len() == 2
    ));
    // The same again from the database alone.
    drop((core, store));
    let mut store = SqliteStore::open(&p).unwrap();
    let core = Core::restore(retry_core().config().clone(), store.load().unwrap(), 7);
    assert_eq!(core.job_state(job), Some(JobState::Done));
    assert_eq!(store.task_results_range(job, 1, 3).unwrap().len(), 2);
}

#[test]
fn checkpointing_jobs_agree_without_fuel_and_credit_the_smallest_fuel() {
    let module = BlobRef::of(b"module").id;
    let cfg = CoreConfig {
        checkpoint_probe: CheckpointProbe(Some(std::sync::Arc::new(move |id: &BlobId| {
            *id == module
        }))),
        ..CoreConfig::default()
    };
    let mut core = Core::new(cfg);
    let (job, _) = core.add_job(manifest("long", 1, 2, 4, 600), 0);
    assert!(core.jobs[&job].checkpoints);
    let (a, b) = (node(1), node(2));
    for w in [a, b] {
        core.hello(w, &fp(Kind::Honest), 1, None, &[], 0);
    }
    let ra = core.request_work(a, 1, 0).assignments;
    let rb = core.request_work(b, 1, 0).assignments;
    let task = ra[0].task.id;
    // `a` was resumed from a checkpoint (more fuel) and claims a lot more; `b` ran through.
    let honest = truth(task);
    let mut resumed = honest.clone();
    resumed.fuel_used = honest.fuel_used * 3;
    core.report(a, ra[0].replica, resumed, 1);
    let out = core.report(b, rb[0].replica, honest.clone(), 2);
    assert_eq!(
        out,
        ReportOutcome::Recorded {
            accepted: true,
            duplicate: false
        },
        "equal outputs agree whatever the fuel"
    );
    assert_eq!(
        core.credit_fuel(&a),
        honest.fuel_used,
        "no gain by claiming more"
    );
    assert_eq!(core.credit_fuel(&b), honest.fuel_used);
    let accepted = core
        .notices
        .iter()
        .find_map(|n| match n {
            Notice::Accepted { result, .. } => Some(result.clone()),
            _ => None,
        })
        .expect("accepted");
    assert_eq!(accepted.fuel_used, honest.fuel_used);

    // Another output still disagrees; and a job of another module compares fuel as before.
    let (job2, _) = core.add_job(
        JobManifest {
            module: BlobRef::of(b"other"),
            ..manifest("plain", 1, 2, 4, 600)
        },
        3,
    );
    assert!(!core.jobs[&job2].checkpoints);
    let ra = core.request_work(a, 1, 3).assignments;
    let rb = core.request_work(b, 1, 3).assignments;
    let t2 = ra[0].task.id;
    let mut more = truth(t2);
    more.fuel_used += 1;
    core.report(a, ra[0].replica, more, 4);
    let out = core.report(b, rb[0].replica, truth(t2), 5);
    assert_eq!(
        out,
        ReportOutcome::Recorded {
            accepted: false,
            duplicate: false
        },
        "fuel still counts for a job that does not checkpoint"
    );
}

/// The `native` fingerprint of a simulated worker: its hello's engine and architecture with
/// this release's native settings.
fn native_fp(kind: Kind) -> EngineFingerprint {
    EngineFingerprint {
        settings: tasks::release::settings(false),
        ..fp(kind)
    }
}

/// A `native` job's replicas go only to workers that named a native engine, run on it (the
/// assignment and the accepted decision carry the native fingerprint), and the job keeps
/// its class across a restart, where a worker must name its native engine again; a
/// `portable` job goes to every worker, on its hello engine.
#[test]
fn native_jobs_go_only_to_native_engines_and_are_judged_within_that_class() {
    use crate::store::{SqliteStore, Store};
    use tasks::Determinism;
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join(SqliteStore::FILE);
    let mut store = SqliteStore::open(&p).unwrap();
    let cfg = CoreConfig {
        policy: TrustPolicy::trusting(),
        ..CoreConfig::default()
    };
    let mut core = Core::new(cfg.clone());
    let (native_job, _) = core.add_job_in(manifest("n", 4, 2, 4, 600), Determinism::Native, 0);
    let (portable_job, _) = core.add_job(manifest("p", 4, 2, 4, 600), 0);
    assert_eq!(core.job_determinism(native_job), Some(Determinism::Native));
    assert_eq!(
        core.job_classes(None),
        vec![
            (native_job, Determinism::Native),
            (portable_job, Determinism::Portable)
        ]
    );
    let (w1, w2, w3) = (node(1), node(2), node(3));
    for w in [w1, w2, w3] {
        core.hello(w, &fp(Kind::Honest), 4, None, &[], 0);
    }
    let native = native_fp(Kind::Honest);
    assert!(core.admits_native(&fp(Kind::Honest), &native).is_ok());
    assert!(
        core.admits_native(&fp(Kind::Honest), &fp(Kind::Honest))
            .is_err(),
        "portable settings are no native engine"
    );
    assert!(
        core.admits_native(&fp(Kind::Honest), &native_fp(Kind::OtherEngine))
            .is_err(),
        "another engine than the hello's"
    );
    core.engines(w1, &native);
    core.engines(w2, &native);
    store.commit(&core.take_mutations()).unwrap();

    // w3 named no native engine: whatever it asks, only portable replicas.
    let w = core.request_work(w3, 100, 1);
    assert!(!w.assignments.is_empty());
    assert!(w.assignments.iter().all(|a| a.task.id.job == portable_job));
    assert!(w.classes.iter().all(|c| *c == Determinism::Portable));
    for a in &w.assignments {
        core.report(w3, a.replica, truth(a.task.id), 1);
    }
    // w1 and w2 get the native job, on their native engine.
    let native_id = native.class_id();
    let mut native_replicas = 0;
    for _ in 0..100 {
        let mut any = false;
        for w in [w1, w2] {
            let work = core.request_work(w, 4, 2);
            for (a, class) in work.assignments.iter().zip(&work.classes) {
                any = true;
                let expect = if a.task.id.job == native_job {
                    native_replicas += 1;
                    Determinism::Native
                } else {
                    Determinism::Portable
                };
                assert_eq!(*class, expect);
                core.report(w, a.replica, truth(a.task.id), 2);
            }
        }
        if !any {
            break;
        }
    }
    assert_eq!(native_replicas, 8, "4 tasks at quorum 2, all on w1 and w2");
    let muts = core.take_mutations();
    for m in &muts {
        match m {
            crate::store::Mutation::Assign {
                task, fingerprint, ..
            } if task.job == native_job => assert_eq!(*fingerprint, native_id),
            crate::store::Mutation::Decided {
                task,
                decision: crate::store::Decision::Accepted { fingerprint, .. },
                ..
            } if task.job == native_job => assert_eq!(*fingerprint, native_id),
            _ => {}
        }
    }
    store.commit(&muts).unwrap();
    let s = core.status(Some(native_job)).unwrap();
    assert_eq!(s.jobs[0].tasks_done, 4);

    // A third job of each class, then a restart: the classes come back from the store.
    let (native2, _) = core.add_job_in(manifest("n2", 2, 2, 4, 600), Determinism::Native, 3);
    store.commit(&core.take_mutations()).unwrap();
    drop((core, store));
    let mut store = SqliteStore::open(&p).unwrap();
    let mut core = Core::restore(cfg, store.load().unwrap(), 4);
    assert_eq!(core.job_determinism(native_job), Some(Determinism::Native));
    assert_eq!(
        core.job_determinism(portable_job),
        Some(Determinism::Portable)
    );
    assert_eq!(core.job_determinism(native2), Some(Determinism::Native));
    // A new session without `Engines`: nothing of the native job.
    core.hello(w1, &fp(Kind::Honest), 4, None, &[], 5);
    assert!(core.request_work(w1, 100, 5).assignments.is_empty());
    core.engines(w1, &native);
    let w = core.request_work(w1, 100, 6);
    assert!(!w.assignments.is_empty());
    assert!(w.assignments.iter().all(|a| a.task.id.job == native2));
}

/// A small honest pool under `serve`'s default open policy finishes its job: 3 and 4 one-slot
/// workers, with every worker in a /24 of its own and with two of four in one /24 (who may
/// not check each other), as a scientist's own few machines are. Requests run in rounds of
/// the retry hint the core answers, so cold-start holds and deal windows run out.
#[test]
fn a_small_honest_pool_finishes_its_job_under_the_open_policy() {
    for addrs in [
        &["192.0.2.11:1", "198.51.100.11:1", "203.0.113.11:1"][..],
        &[
            "192.0.2.11:1",
            "198.51.100.11:1",
            "203.0.113.11:1",
            "192.0.2.12:1",
        ][..],
        &[
            "192.0.2.11:1",
            "198.51.100.11:1",
            "203.0.113.11:1",
            "203.0.113.200:1",
        ][..],
    ] {
        let mut core = Core::new(CoreConfig {
            policy: TrustPolicy::open_pool(),
            ..CoreConfig::default()
        });
        let ws: Vec<NodeId> = (1..=addrs.len() as u32).map(node).collect();
        for (w, addr) in ws.iter().zip(addrs) {
            core.hello(*w, &fp(Kind::Honest), 1, None, &[], 0);
            core.observed_address(*w, addr.parse().unwrap());
        }
        let (job, _) = core.add_job(manifest("small", 64, 2, 4, 600), 0);
        let mut now = 0;
        for _ in 0..5_000 {
            if core.running.is_empty() {
                break;
            }
            let mut hint = u64::MAX;
            for w in &ws {
                let work = core.request_work(*w, 1, now);
                if work.assignments.is_empty() {
                    hint = hint.min(work.retry_after_ms);
                }
                for a in work.assignments {
                    core.report(*w, a.replica, truth(a.task.id), now);
                    hint = 0;
                }
            }
            now += hint.clamp(1, 2_000);
            core.tick(now);
        }
        let st = core.status(Some(job)).expect("job");
        assert_eq!(
            (st.jobs[0].tasks_done, st.jobs[0].tasks_failed),
            (64, 0),
            "{} workers at {addrs:?}: every task accepted ({:?})",
            ws.len(),
            st.jobs[0]
        );
    }
}

/// A request for a fresh task that finds one gets one, even when dealing would hand the last
/// ones to other workers first (a 2-task job, 2 workers: seeded draws that pick the other
/// worker for both used to leave the asker with nothing).
#[test]
fn the_last_fresh_task_is_never_dealt_away_from_its_asker() {
    for seed in 0..32u64 {
        let mut core = Core::new(CoreConfig {
            policy: TrustPolicy {
                seed,
                ..TrustPolicy::open_pool()
            },
            ..CoreConfig::default()
        });
        let (owner, other) = (node(1), node(2));
        for w in [owner, other] {
            core.hello(w, &fp(Kind::Honest), 1, None, &[], 0);
        }
        core.add_job(manifest("two", 2, 2, 6, 600), 0);
        assert_eq!(
            core.request_work(owner, 1, 0).assignments.len(),
            1,
            "seed {seed}: the asker gets a task"
        );
    }
}

/// A worker whose request found no work is told (`Notice::Room`) the moment a replica is
/// dealt to it, instead of idling out its retry hint; one left to anyone (no dealing) wakes
/// every such worker, and so does a deal that lapses. Who gets the replica does not change:
/// only the wait.
#[test]
fn an_idle_worker_is_woken_when_a_replica_is_dealt_to_it() {
    let module = [BlobId::of(b"module")];
    let a = node(1);
    let idle: Vec<NodeId> = (2..=6).map(node).collect();
    let woken = |deal: bool| {
        let mut core = dealing_core(7, deal, 2_000);
        for w in std::iter::once(&a).chain(&idle) {
            core.hello(*w, &fp(Kind::Honest), 1, None, &module, 0);
        }
        // Nothing to do yet: every idle worker is told to wait the full hint.
        for w in &idle {
            let got = core.request_work(*w, 1, 1);
            assert!(got.assignments.is_empty());
            assert_eq!(got.retry_after_ms, 2_000);
        }
        assert!(core.take_notices().is_empty());
        // One task of quorum 2: A takes the first replica (the last fresh task is never
        // dealt away), the partner replica is dealt or left to anyone.
        let (job, _) = core.add_job(manifest("job", 1, 2, 6, 600), 2);
        // The new job wakes every idle worker (none is a super-peer here). Say their next
        // requests, each finding nothing, came in just before A's.
        let mut all = idle.clone();
        all.sort();
        assert_eq!(rooms(&mut core), all, "a new job wakes the idle");
        for w in &idle {
            core.set_waiting_for_work(*w, true);
        }
        assert_eq!(core.request_work(a, 1, 3).assignments.len(), 1);
        let woken = rooms(&mut core);
        let deal = core.deals.get(TaskId { job, index: 0 });
        if let Some((drawn, until)) = deal {
            // The others ask again meanwhile and find nothing; the drawn worker stays busy.
            // When the deal lapses (the engine's tick), the replica is anyone's: they are
            // woken.
            let mut others: Vec<NodeId> = idle.iter().copied().filter(|w| *w != drawn).collect();
            others.sort();
            for w in &others {
                assert!(core.request_work(*w, 1, 4).assignments.is_empty());
            }
            core.tick(until - 1);
            assert!(
                core.take_notices().is_empty(),
                "woken before the deal lapsed"
            );
            core.tick(until);
            let lapsed = rooms(&mut core);
            assert_eq!(lapsed, others, "the deal lapsed: the idle are woken");
        }
        (deal, woken)
    };
    let (deal, woken_dealt) = woken(true);
    let (drawn, _) = deal.expect("the partner replica is dealt");
    assert_eq!(woken_dealt, vec![drawn], "only the drawn worker is woken");
    let (deal, woken_all) = woken(false);
    assert!(deal.is_none());
    let mut want = idle.clone();
    want.sort();
    assert_eq!(
        woken_all, want,
        "without dealing, every idle worker is woken"
    );
}

/// An open-pool core for the dealing tests: no partner spread, address blocks ignored,
/// dealing on or off, this seed and retry hint.
fn dealing_core(seed: u64, deal: bool, retry_after_ms: u64) -> Core {
    Core::new(CoreConfig {
        policy: TrustPolicy {
            seed,
            partner_spread: 0,
            distinct_address_blocks: false,
            deal_partners: deal,
            ..TrustPolicy::open_pool()
        },
        retry_after_ms,
        ..CoreConfig::default()
    })
}

/// The workers told `Notice::Room` since the last call, sorted.
fn rooms(core: &mut Core) -> Vec<NodeId> {
    let mut v: Vec<NodeId> = core
        .take_notices()
        .into_iter()
        .filter_map(|n| match n {
            Notice::Room { worker } => Some(worker),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// A new job wakes idle workers at once rather than after their retry hint: directly
/// reachable ones (super-peers) first, and the others once a super-peer has been handed a
/// replica, so their assignment lists it as a peer fetching the module (a worker behind a
/// NAT that knew only the seed would wait while super-peers fetch). The woken count as
/// fetching the module, so even the first one handed it knows the others. Without an idle
/// super-peer, everyone is woken at once.
#[test]
fn a_new_job_wakes_idle_super_peers_first_then_the_rest() {
    let addr = |i: u8| -> Option<std::net::SocketAddr> {
        Some(format!("198.51.100.{i}:7000").parse().unwrap())
    };
    let public: Vec<NodeId> = (1..=2).map(node).collect();
    let natted: Vec<NodeId> = (3..=4).map(node).collect();
    for case in ["supers take work", "supers take nothing", "no super-peer"] {
        let reachable_exists = case != "no super-peer";
        let mut core = dealing_core(3, false, 2_000);
        for (i, w) in public.iter().chain(&natted).enumerate() {
            core.hello(*w, &fp(Kind::Honest), 1, addr(i as u8 + 1), &[], 0);
            assert!(core.request_work(*w, 1, 1).assignments.is_empty());
        }
        if reachable_exists {
            for w in &public {
                core.set_reachable(*w, true);
            }
        }
        assert!(rooms(&mut core).is_empty());
        core.add_job(manifest("job", 8, 2, 6, 600), 2);
        let mut everyone: Vec<NodeId> = public.iter().chain(&natted).copied().collect();
        everyone.sort();
        if !reachable_exists {
            assert_eq!(
                rooms(&mut core),
                everyone,
                "no super-peer: all woken at once"
            );
            continue;
        }
        let mut supers = public.clone();
        supers.sort();
        assert_eq!(rooms(&mut core), supers, "super-peers are woken first");
        let mut rest = natted.clone();
        rest.sort();
        if case == "supers take nothing" {
            core.tick(1_000);
            assert_eq!(
                rooms(&mut core),
                rest,
                "the rest are woken at the next tick when no super-peer took a replica"
            );
            continue;
        }
        let got = core.request_work(public[0], 1, 3);
        assert_eq!(got.assignments.len(), 1);
        let peers: Vec<NodeId> = got.assignments[0].peers.iter().map(|p| p.node_id).collect();
        assert!(
            peers.contains(&public[1]),
            "the first one handed the module is pointed at the other woken super-peer: {peers:?}"
        );
        assert_eq!(
            rooms(&mut core),
            rest,
            "a super-peer handed a replica wakes the rest"
        );
        let got = core.request_work(natted[0], 1, 4);
        let peers: Vec<NodeId> = got.assignments[0].peers.iter().map(|p| p.node_id).collect();
        assert!(
            peers.contains(&public[0]),
            "the NATed worker is pointed at the super-peer fetching the module: {peers:?}"
        );
    }
}
