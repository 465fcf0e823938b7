//! Saboteur scenarios: a simulated population in which a fraction of the workers return
//! wrong digests, driven through [`Core`] on a simulated clock, and the figures that come out
//! (wrong results accepted, tasks failed, replicas spent, saboteurs banned).
//!
//! The simulated workers use exactly the calls the QUIC shell makes — [`Core::hello`] (and
//! [`Core::observed_address`]), [`Core::request_work`], [`Core::report`], [`Core::tick`] —
//! and learn about acceptances and cancellations only from [`Core::take_notices`]. Nothing
//! reads the core's internals, so a figure here is what a real coordinator with the same
//! policy would do against the same population. Pure and deterministic: no clock, no I/O, one
//! seeded RNG; thousands of tasks run in well under a second in release builds.
//!
//! Behaviours ([`Behaviour`]): (a) each saboteur its own wrong answer, (b) all saboteurs the
//! same wrong answer per task (collusion), (c) honest until it has the record that makes it
//! an anchor, then colluding like (b). Saboteurs can be spread over the address space (a
//! botnet) or share one /24 (one operator).
//!
//! [`theory_wrong`] is the textbook figure for a plain fixed quorum (q agreeing of n
//! replicas): P(wrong) = Σ_{j≥q} C(n,j) φ^j (1−φ)^(n−j).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use tasks::job::{JobLimits, TaskEntry};
use tasks::wire::{JobState, ReplicaId};
use tasks::{BlobId, BlobRef, EngineFingerprint, JobManifest, NodeId, RunResult, Status, TaskId};

use super::trust::TrustPolicy;
use super::{Core, CoreConfig, Notice};

/// How the saboteurs answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// (a) Each saboteur its own wrong digest: wrong answers never agree.
    OwnWrong,
    /// (b) Every saboteur the same wrong digest for a task, from the start.
    Colluding,
    /// (c) Honest until its reputation makes it an anchor (`turn_after_valid` agreeing results
    /// in a row), then colluding like (b) for good.
    TrustThenCheat,
}

impl Behaviour {
    pub fn label(self) -> &'static str {
        match self {
            Behaviour::OwnWrong => "non-colluding",
            Behaviour::Colluding => "colluding",
            Behaviour::TrustThenCheat => "honest-then-colluding",
        }
    }
}

/// One run: a population, a job and a policy.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub workers: u32,
    /// Fraction of the workers that are saboteurs (rounded to a whole number).
    pub saboteur_fraction: f64,
    pub behaviour: Behaviour,
    pub tasks: u32,
    pub quorum: u32,
    pub max_replicas: u32,
    pub slots: u32,
    pub policy: TrustPolicy,
    pub seed: u64,
    /// All saboteurs connect from one /24 (one operator) instead of addresses of their own.
    pub saboteurs_in_one_block: bool,
    /// (c): agreeing results in a row before a saboteur turns; `None` = the policy's
    /// `trust_min_valid` (10 if the policy has no trust), i.e. the attacker knows the policy.
    pub turn_after_valid: Option<u64>,
    /// Saboteurs that are lying ask for as much work as the core lets them hold and report
    /// at once (a lie needs no computing). Otherwise they pace themselves like honest workers.
    pub greedy_saboteurs: bool,
    /// Give up after this much simulated time.
    pub max_sim_ms: u64,
}

impl Scenario {
    /// 100 workers with 2 slots, 2000 tasks, quorum 2 of at most 6.
    pub fn new(
        behaviour: Behaviour,
        saboteur_fraction: f64,
        policy: TrustPolicy,
        seed: u64,
    ) -> Scenario {
        Scenario {
            workers: 100,
            saboteur_fraction,
            behaviour,
            tasks: 2000,
            quorum: 2,
            max_replicas: 6,
            slots: 2,
            policy,
            seed,
            saboteurs_in_one_block: false,
            turn_after_valid: None,
            greedy_saboteurs: false,
            max_sim_ms: 100_000_000,
        }
    }

    pub fn saboteurs(&self) -> u32 {
        ((self.workers as f64) * self.saboteur_fraction).round() as u32
    }

    /// The plain fixed-quorum figure for this population: q agreeing of 2q−1 replicas, with
    /// φ = the saboteur fraction for colluders and 0 for saboteurs whose lies never agree.
    pub fn theory(&self) -> f64 {
        let phi = match self.behaviour {
            Behaviour::OwnWrong => 0.0,
            Behaviour::Colluding | Behaviour::TrustThenCheat => {
                self.saboteurs() as f64 / self.workers.max(1) as f64
            }
        };
        theory_wrong(self.quorum, 2 * self.quorum - 1, phi)
    }
}

/// P(wrong accepted) under a plain "q agreeing of n" policy when a fraction `phi` of the
/// replicas carry one and the same wrong answer: Σ_{j≥q} C(n,j) φ^j (1−φ)^(n−j).
pub fn theory_wrong(quorum: u32, replicas: u32, phi: f64) -> f64 {
    (quorum..=replicas)
        .map(|j| {
            binomial(replicas, j) * phi.powi(j as i32) * (1.0 - phi).powi((replicas - j) as i32)
        })
        .sum()
}

fn binomial(n: u32, k: u32) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

/// What a run produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub tasks: u32,
    pub accepted: u32,
    /// Accepted with a digest other than the honest one.
    pub wrong_accepted: u32,
    pub failed: u32,
    /// Neither accepted nor failed when the run stopped (should be 0).
    pub undecided: u32,
    /// Replicas handed out (including ones later cancelled or reissued).
    pub replicas_issued: u64,
    pub saboteurs: u32,
    pub saboteurs_banned: u32,
    pub honest_banned: u32,
    /// The plain fixed-quorum figure for the same population ([`Scenario::theory`]).
    pub theory_wrong: f64,
    pub sim_ms: u64,
}

impl Outcome {
    pub fn wrong_fraction(&self) -> f64 {
        ratio(self.wrong_accepted as f64, self.accepted as f64)
    }

    pub fn failed_fraction(&self) -> f64 {
        ratio(self.failed as f64, self.tasks as f64)
    }

    /// Replicas issued per decided task.
    pub fn replicas_per_task(&self) -> f64 {
        ratio(
            self.replicas_issued as f64,
            (self.accepted + self.failed) as f64,
        )
    }

    pub fn banned_fraction(&self) -> f64 {
        ratio(self.saboteurs_banned as f64, self.saboteurs as f64)
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        a / b
    }
}

/// Medians over several runs of one scenario (different seeds), plus the worst run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub runs: Vec<Outcome>,
    pub wrong: f64,
    pub worst_wrong: f64,
    pub failed: f64,
    pub replicas_per_task: f64,
    pub worst_replicas_per_task: f64,
    pub banned: f64,
    pub honest_banned: u32,
    pub undecided: u32,
    pub theory_wrong: f64,
}

impl Summary {
    pub fn of(runs: Vec<Outcome>) -> Summary {
        let med = |f: &dyn Fn(&Outcome) -> f64| median(runs.iter().map(f).collect());
        let max = |f: &dyn Fn(&Outcome) -> f64| runs.iter().map(f).fold(0.0, f64::max);
        Summary {
            wrong: med(&Outcome::wrong_fraction),
            worst_wrong: max(&Outcome::wrong_fraction),
            failed: med(&Outcome::failed_fraction),
            replicas_per_task: med(&Outcome::replicas_per_task),
            worst_replicas_per_task: max(&Outcome::replicas_per_task),
            banned: med(&Outcome::banned_fraction),
            honest_banned: runs.iter().map(|o| o.honest_banned).sum(),
            undecided: runs.iter().map(|o| o.undecided).sum(),
            theory_wrong: runs.first().map_or(0.0, |o| o.theory_wrong),
            runs,
        }
    }

    /// `wrong 0.04% (worst 0.10%; theory 2-of-3 2.8%), 2.07 replicas/task (worst 2.11),
    /// failed 0.00%, 100% banned, 0 honest banned, 5 runs` — medians over the runs.
    pub fn figures(&self, quorum: u32) -> String {
        let n = 2 * quorum - 1;
        let runs = if self.runs.len() > 1 {
            format!(", median of {} runs", self.runs.len())
        } else {
            String::new()
        };
        let worst = if self.runs.len() > 1 {
            format!("worst {:.2}%; ", 100.0 * self.worst_wrong)
        } else {
            String::new()
        };
        let worst_rep = if self.runs.len() > 1 {
            format!(" (worst {:.2})", self.worst_replicas_per_task)
        } else {
            String::new()
        };
        let undecided = if self.undecided > 0 {
            format!(", {} UNDECIDED", self.undecided)
        } else {
            String::new()
        };
        format!(
            "wrong {:.2}% ({worst}theory {quorum}-of-{n} {:.1}%), {:.2} replicas/task{worst_rep}, failed {:.2}%, {:.0}% saboteurs banned, {} honest banned{undecided}{runs}",
            100.0 * self.wrong,
            100.0 * self.theory_wrong,
            self.replicas_per_task,
            100.0 * self.failed,
            100.0 * self.banned,
            self.honest_banned,
        )
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Run `sc` once per seed in `seeds` (the scenario's own seed is ignored).
pub fn run_seeds(sc: &Scenario, seeds: impl IntoIterator<Item = u64>) -> Summary {
    Summary::of(
        seeds
            .into_iter()
            .map(|seed| run(&Scenario { seed, ..sc.clone() }))
            .collect(),
    )
}

struct SimWorker {
    id: NodeId,
    index: u32,
    saboteur: bool,
    /// (c) has started cheating.
    turned: bool,
    addr: SocketAddr,
    connected: bool,
    /// Milliseconds per unit of work: workers differ in speed.
    speed: f64,
    running: Vec<(ReplicaId, TaskId, u64)>,
}

/// The honest result of a task.
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

fn node(i: u32) -> NodeId {
    let h = blake3::derive_key("peergrid 2026 adversary node", &i.to_le_bytes());
    NodeId(h)
}

fn public_addr(i: u32) -> SocketAddr {
    // One /24 per worker, all publicly routed (20.0.0.0/8 onwards).
    let ip = Ipv4Addr::new(20 + (i >> 16) as u8, (i >> 8) as u8, i as u8, 10);
    SocketAddr::new(IpAddr::V4(ip), 7000)
}

fn shared_block_addr(j: u32) -> SocketAddr {
    let ip = Ipv4Addr::new(45, 67, 89, (j % 250) as u8 + 1);
    SocketAddr::new(IpAddr::V4(ip), 40_000 + (j % 20_000) as u16)
}

/// Run one scenario to the end of its job (or `max_sim_ms`).
pub fn run(sc: &Scenario) -> Outcome {
    let mut rng = StdRng::seed_from_u64(sc.seed ^ 0xadd5_a5a5);
    let fingerprint = EngineFingerprint {
        engine: "wasmtime 38".into(),
        arch: "x86_64-linux".into(),
        settings: "det".into(),
    };
    let turn_after = sc
        .turn_after_valid
        .unwrap_or(match sc.policy.trust_min_valid {
            u64::MAX => 10,
            t => t,
        });
    let n_sab = sc.saboteurs().min(sc.workers);
    let mut roles: Vec<bool> = (0..sc.workers).map(|i| i < n_sab).collect();
    roles.shuffle(&mut rng);
    let mut sab_seen = 0;
    let mut workers: Vec<SimWorker> = roles
        .iter()
        .enumerate()
        .map(|(i, &saboteur)| {
            let i = i as u32;
            let addr = if saboteur && sc.saboteurs_in_one_block {
                sab_seen += 1;
                shared_block_addr(sab_seen)
            } else {
                public_addr(i)
            };
            SimWorker {
                id: node(i),
                index: i,
                saboteur,
                turned: false,
                addr,
                connected: false,
                speed: rng.gen_range(0.5..2.0),
                running: Vec::new(),
            }
        })
        .collect();

    let mut core = Core::new(CoreConfig {
        policy: sc.policy.clone(),
        ..CoreConfig::default()
    });
    let mut now: u64 = 1_000_000;
    let manifest = JobManifest {
        name: "saboteurs".into(),
        module: BlobRef::of(b"module"),
        limits: JobLimits {
            quorum: sc.quorum,
            max_replicas: sc.max_replicas,
            deadline_secs: 600,
            ..JobLimits::default()
        },
        tasks: (0..sc.tasks)
            .map(|i| TaskEntry {
                args: vec![i.to_string()],
                input: None,
            })
            .collect(),
    };
    let (job, _) = core.add_job(manifest, now);
    let mut out = Outcome {
        tasks: sc.tasks,
        saboteurs: n_sab,
        theory_wrong: sc.theory(),
        ..Outcome::default()
    };
    let start = now;
    let nw = workers.len();
    while core.job_state(job) == Some(JobState::Running) && now - start < sc.max_sim_ms {
        now += 1_000;
        // Who asks first changes every step.
        let offset = if nw == 0 { 0 } else { rng.gen_range(0..nw) };
        for k in 0..nw {
            let w = &mut workers[(offset + k) % nw];
            if !w.connected {
                w.connected = true;
                core.hello(w.id, &fingerprint, sc.slots, Some(w.addr), &[], now);
                core.observed_address(w.id, w.addr);
            }
            let due: Vec<_> = w.running.iter().filter(|r| r.2 <= now).copied().collect();
            w.running.retain(|r| r.2 > now);
            for (replica, task, _) in due {
                if sc.behaviour == Behaviour::TrustThenCheat && w.saboteur && !w.turned {
                    // What `coordinator status` shows of the worker tells it when it is trusted.
                    w.turned = core
                        .reputation(&w.id)
                        .is_some_and(|r| r.consecutive_valid >= turn_after);
                }
                let mut result = truth(task);
                let cheat = w.saboteur && (sc.behaviour != Behaviour::TrustThenCheat || w.turned);
                if cheat {
                    let lie = match sc.behaviour {
                        Behaviour::OwnWrong => format!("lie {} {task}", w.index),
                        Behaviour::Colluding | Behaviour::TrustThenCheat => {
                            format!("collude {task}")
                        }
                    };
                    result.output_hash = BlobId::of(lie.as_bytes());
                }
                core.report(w.id, replica, result, now);
            }
            let lying = w.saboteur && (sc.behaviour != Behaviour::TrustThenCheat || w.turned);
            let greedy = lying && sc.greedy_saboteurs;
            let free = if greedy {
                u32::MAX
            } else {
                sc.slots.saturating_sub(w.running.len() as u32)
            };
            if free > 0 {
                for a in core.request_work(w.id, free, now).assignments {
                    out.replicas_issued += 1;
                    let dur = if greedy {
                        1_000
                    } else {
                        (rng.gen_range(2_000.0..20_000.0) * w.speed) as u64
                    };
                    w.running.push((a.replica, a.task.id, now + dur));
                }
            }
        }
        for n in core.take_notices() {
            match n {
                Notice::Cancel { worker, replicas } => {
                    // Everyone drops cancelled work (a saboteur gains nothing by finishing it).
                    if let Some(w) = workers.iter_mut().find(|w| w.id == worker) {
                        w.running.retain(|r| !replicas.contains(&r.0));
                    }
                }
                Notice::Accepted { task, result, .. } => {
                    out.accepted += 1;
                    if result.digest() != truth(task).digest() {
                        out.wrong_accepted += 1;
                    }
                }
                Notice::Failed { .. } => out.failed += 1,
                Notice::JobEnded { .. } | Notice::Room { .. } => {}
            }
        }
        core.take_mutations();
        core.tick(now);
    }
    out.sim_ms = now - start;
    out.undecided = sc.tasks - out.accepted - out.failed;
    for w in &workers {
        let banned = core.is_banned(&w.id);
        match (w.saboteur, banned) {
            (true, true) => out.saboteurs_banned += 1,
            (false, true) => out.honest_banned += 1,
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn theory_matches_the_issue_figure_for_two_of_three() {
        assert!((theory_wrong(2, 3, 0.1) - 0.028).abs() < 1e-12);
        assert_eq!(theory_wrong(2, 3, 0.0), 0.0);
        assert!((theory_wrong(1, 1, 0.3) - 0.3).abs() < 1e-12);
    }

    #[test]
    fn fixed_quorum_against_colluders_lands_near_the_theory() {
        // Small but large enough to tell 2.8% from 0: 3000 tasks, ~84 wrong expected.
        let mut sc = Scenario::new(Behaviour::Colluding, 0.1, TrustPolicy::fixed_quorum(), 1);
        sc.tasks = 3000;
        let o = run(&sc);
        assert_eq!(o.undecided, 0);
        let w = o.wrong_fraction();
        assert!(
            (0.015..0.045).contains(&w),
            "wrong {w} vs theory {}",
            o.theory_wrong
        );
    }

    #[test]
    fn same_seed_same_figures() {
        let mut sc = Scenario::new(Behaviour::TrustThenCheat, 0.3, TrustPolicy::hardened(), 9);
        sc.tasks = 300;
        sc.workers = 30;
        assert_eq!(run(&sc), run(&sc));
    }
}
