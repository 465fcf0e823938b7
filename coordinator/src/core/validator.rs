//! Quorum validation: when a task is accepted or failed, and who earns credit or loses trust.
//!
//! Rules:
//! - results are grouped by (engine fingerprint, digest); only equal fingerprints are compared;
//! - a task is **accepted** when one group reaches the task's quorum — plus
//!   [`TrustPolicy::untrusted_extra`](super::trust::TrustPolicy::untrusted_extra) when none of
//!   the group's workers was an anchor when it reported; and, when reports on the same engine
//!   contradict it, only if it outnumbers the largest contradicting group by
//!   [`TrustPolicy::dispute_margin`](super::trust::TrustPolicy::dispute_margin) (a contested
//!   task gets more replicas until one side leads by that much, or fails at
//!   `max_replicas`). Replicas of that group are `valid`
//!   and earn `RunResult::credit()`; reported replicas with the same fingerprint and another
//!   digest are `invalid` (their workers lose trust); replicas of other fingerprints get no
//!   verdict; replicas still in flight are cancelled;
//! - with [`TrustPolicy::anchors_decide`](super::trust::TrustPolicy::anchors_decide)
//!   (opt-in), while an anchor of the task's engine is connected that could take
//!   a replica of it: a group no anchor is part of is not accepted (the task's next replica
//!   goes to anchors only, one at a time), and a group with `quorum + untrusted_extra`
//!   anchors wins over rivals no anchor is part of;
//! - with [`TrustPolicy::deal_partners`](super::trust::TrustPolicy::deal_partners), a job's
//!   first deal window (`ColdHold`: two no-work retry hints from its first assignment) holds
//!   every decision of a group no anchor is part of while no anchor of its engine is
//!   connected, then makes them in `Core::hold_order` (the decisions that catch liars
//!   first); a split vote may not fail a task until one more window has passed;
//! - a worker that becomes banned (caught contradicting accepted results) loses its vote on
//!   every undecided task: its reports there stop counting, its in-flight replicas are
//!   cancelled, and those tasks are re-examined and get replacement replicas;
//! - a task **fails** when no group can reach quorum within `max_replicas` counted replicas
//!   (reported by workers not banned + in flight; lost ones do not count), or when
//!   `max_replicas` *distinct workers* lost a replica of it without result (one worker's
//!   losses count once, so one identity cannot fail tasks by letting them lapse). A failed
//!   task's replicas get no verdict (nobody is known to be right);
//! - a report arriving after the decision (late, or for a cancelled replica) is judged
//!   against the accepted result the same way — except a report for a replica that was
//!   *lost and since reissued*: it is rejected and earns neither credit nor trust. A late
//!   report judged valid is credited, and its worker joins the task's agreeing workers;
//! - a report's claims are checked against the job: `fuel_used` above the task's `fuel` or
//!   `output_len` above its `max_output` is rejected; credit sums saturate;
//! - a *checkpointing* job (its module imports the checkpoint API, [`tasks::module`]) is
//!   compared by [`RunResult::digest_without_fuel`]: a resumed replica uses more fuel than an
//!   uninterrupted one. Its accepted result, and the credit of each valid replica, is the
//!   smallest fuel among the replicas with the accepted digest: claiming more earns nothing.

use tasks::wire::ReplicaId;
use tasks::{NodeId, ResultDigest, RunResult, TaskId};

use super::{Core, Notice, TaskPhase};
use crate::store::{Decision, Mutation, ReplicaPhase, Verdict};

/// What became of a report.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportOutcome {
    /// Recorded (or already recorded with the same result): acknowledge it.
    Recorded {
        /// The task was accepted by this report.
        accepted: bool,
        /// A resend of a report already recorded; nothing changed.
        duplicate: bool,
    },
    /// Refused; nothing changed.
    Rejected(String),
}

/// Replicas of one task that reported the same (fingerprint, digest).
#[derive(Debug)]
pub(crate) struct Group {
    pub key: (u32, ResultDigest),
    pub replicas: Vec<ReplicaId>,
    /// One of them was reported by an anchor.
    pub anchored: bool,
    /// How many of them were reported by anchors.
    pub anchors: u32,
    /// How many of them were reported by anchors or by workers that are not newcomers to an
    /// established pool (see `TrustPolicy::anchors_decide_for_newcomers`).
    pub seniors: u32,
}

/// Counts of one task's replicas, by fingerprint class. Replicas per task are few (at most
/// `max_replicas` ≤ 64 counted), so plain vectors beat hash maps here.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub groups: Vec<Group>,
    /// (fingerprint, replicas in flight, of which on anchors).
    pub outstanding: Vec<(u32, u32, u32)>,
    pub reported: u32,
    pub in_flight: u32,
    pub lost: u32,
    /// Reports of banned workers, not counted.
    pub discounted: u32,
    /// Distinct workers holding a replica of the task (any phase) that are anchors now, by
    /// fingerprint: how many of the connected anchors could not take another replica.
    pub anchors_on_task: Vec<(u32, u32)>,
    /// Distinct workers holding a replica of the task (any phase).
    pub holder_ids: Vec<NodeId>,
}

impl Tally {
    /// Best achievable agreement per fingerprint right now (largest group + in flight), the
    /// fingerprint that leads (ties: the smaller fingerprint index), and whether that
    /// agreement could include an anchor.
    pub fn lead(&self) -> (u32, Option<u32>, bool) {
        // (fp, largest group, it is anchored, in flight, on anchors)
        let mut best: Vec<(u32, u32, bool, u32, u32)> = Vec::new();
        for g in &self.groups {
            let n = g.replicas.len() as u32;
            match best.iter_mut().find(|b| b.0 == g.key.0) {
                Some(b) if n > b.1 || (n == b.1 && g.anchored) => (b.1, b.2) = (n, g.anchored),
                Some(_) => {}
                None => best.push((g.key.0, n, g.anchored, 0, 0)),
            }
        }
        for &(fp, n, anchors) in &self.outstanding {
            match best.iter_mut().find(|b| b.0 == fp) {
                Some(b) => (b.3, b.4) = (n, anchors),
                None => best.push((fp, 0, false, n, anchors)),
            }
        }
        best.into_iter()
            .map(|(fp, g, anchored, n, anchors)| (g + n, Some(fp), anchored || anchors > 0))
            .max_by_key(|&(n, fp, _)| (n, std::cmp::Reverse(fp)))
            .unwrap_or((0, None, false))
    }
}

/// What a pending task needs next.
#[derive(Debug, PartialEq)]
pub(crate) enum Need {
    Accept {
        fp: u32,
        digest: ResultDigest,
        agreeing: Vec<ReplicaId>,
    },
    Fail(String),
    /// `n` more replicas, preferably on fingerprint `fp`. `anchor_wanted`: the next replica
    /// would complete the quorum of a result no anchor is part of, so it should go to one.
    /// `anchors_only`: anchors decide this task (see
    /// [`TrustPolicy::anchors_decide`](super::trust::TrustPolicy::anchors_decide)); no
    /// other worker may take its next replica.
    More {
        n: u32,
        fp: Option<u32>,
        anchor_wanted: bool,
        anchors_only: bool,
    },
}

impl Tally {
    /// Whether reports on one engine disagree (two groups with the same fingerprint).
    pub fn contested(&self) -> bool {
        self.groups.iter().any(|g| {
            self.groups
                .iter()
                .any(|o| o.key.0 == g.key.0 && o.key.1 != g.key.1)
        })
    }
}

/// Workers [`Core::another_could_take`] looks at before it assumes one could.
const COULD_TAKE_SCAN: usize = 256;

impl Core {
    pub(crate) fn tally(&self, task: TaskId) -> Tally {
        let mut t = Tally::default();
        let Some((slot, class)) = self.jobs.get(&task.job).and_then(|j| {
            j.tasks
                .get(task.index as usize)
                .map(|slot| (slot, j.determinism))
        }) else {
            return t;
        };
        let mut reporters: Vec<NodeId> = Vec::new();
        let mut losers: Vec<NodeId> = Vec::new();
        let mut holders: Vec<NodeId> = Vec::new();
        let policy = &self.cfg.policy;
        for r in &slot.replicas {
            let Some(rep) = self.replicas.get(r) else {
                continue;
            };
            if !holders.contains(&rep.worker) {
                holders.push(rep.worker);
                // An anchor counts under its engine of the job's class.
                let anchor = self.workers.get(&rep.worker).and_then(|w| w.anchor);
                if let Some(fp) = anchor.and_then(|(portable, native)| match class {
                    tasks::Determinism::Portable => Some(portable),
                    tasks::Determinism::Native => native,
                }) {
                    match t.anchors_on_task.iter_mut().find(|(f, _)| *f == fp) {
                        Some((_, n)) => *n += 1,
                        None => t.anchors_on_task.push((fp, 1)),
                    }
                }
            }
            match rep.phase {
                ReplicaPhase::Reported => {
                    // One vote per worker: a worker that got a task again after losing its
                    // first replica (and then reported both) is counted once.
                    if reporters.contains(&rep.worker) {
                        continue;
                    }
                    reporters.push(rep.worker);
                    let worker = self.workers.get(&rep.worker);
                    if worker.is_some_and(|w| policy.is_banned(&w.rep)) {
                        t.discounted += 1;
                        continue;
                    }
                    let senior = rep.anchor || worker.is_some_and(|w| !w.junior);
                    t.reported += 1;
                    let (d, _) = rep
                        .result
                        .as_ref()
                        .expect("reported replicas carry a result");
                    let key = (rep.fp, *d);
                    match t.groups.iter_mut().find(|g| g.key == key) {
                        Some(g) => {
                            g.replicas.push(*r);
                            g.anchored |= rep.anchor;
                            g.anchors += u32::from(rep.anchor);
                            g.seniors += u32::from(senior);
                        }
                        None => t.groups.push(Group {
                            key,
                            replicas: vec![*r],
                            anchored: rep.anchor,
                            anchors: u32::from(rep.anchor),
                            seniors: u32::from(senior),
                        }),
                    }
                }
                ReplicaPhase::InFlight => {
                    t.in_flight += 1;
                    let a = u32::from(rep.anchor);
                    match t.outstanding.iter_mut().find(|(f, _, _)| *f == rep.fp) {
                        Some((_, n, anchors)) => (*n, *anchors) = (*n + 1, *anchors + a),
                        None => t.outstanding.push((rep.fp, 1, a)),
                    }
                }
                // One loss per worker: a worker's repeated losses cannot fail a task.
                ReplicaPhase::Lost if !losers.contains(&rep.worker) => {
                    losers.push(rep.worker);
                    t.lost += 1;
                }
                ReplicaPhase::Lost => {}
                ReplicaPhase::Cancelled => {}
            }
        }
        t.holder_ids = holders;
        t
    }

    /// Whether some connected worker could still be given a replica of the task `t` tallies:
    /// one that may take work, holds none of it, and (with `distinct_address_blocks`) is
    /// outside every holder's address block. Looks at most [`COULD_TAKE_SCAN`] workers, then
    /// assumes one could (in a pool that large, almost any can).
    fn another_could_take(&self, t: &Tally) -> bool {
        if self.roster.len() <= t.holder_ids.len() {
            return false;
        }
        let blocks: Vec<_> = if self.cfg.policy.distinct_address_blocks {
            t.holder_ids
                .iter()
                .filter_map(|w| self.workers.get(w)?.block())
                .collect()
        } else {
            Vec::new()
        };
        for (i, w) in self.roster.iter().enumerate() {
            if i >= COULD_TAKE_SCAN {
                return true;
            }
            if t.holder_ids.contains(w) {
                continue;
            }
            match self.workers.get(w) {
                Some(worker) if !worker.block().is_some_and(|b| blocks.contains(&b)) => {
                    return true
                }
                _ => {}
            }
        }
        false
    }

    pub(crate) fn need(&self, task: TaskId) -> Need {
        let job = &self.jobs[&task.job];
        let limits = job.manifest.limits;
        let slot = &job.tasks[task.index as usize];
        let q = if slot.quorum == 0 {
            limits.quorum
        } else {
            slot.quorum
        };
        // Agreement without an anchor needs `extra` more (never beyond max_replicas).
        let extra = self
            .cfg
            .policy
            .untrusted_extra
            .min(limits.max_replicas.saturating_sub(q));
        let t = self.tally(task);
        // In a cold start (no anchor of the engine connected), one more still: nobody has a
        // record yet, and colluders that ask fastest hold more than their share of the first
        // replicas. Only while a connected worker could still give it (one not holding a
        // replica of the task, nor sharing a holder's address block where blocks must
        // differ): a small pool, or one with a liar in it, must still decide.
        let cold_extra = if self.another_could_take(&t) {
            self.cfg.policy.cold_start_extra
        } else {
            0
        };
        let extra_of = |fp: Option<u32>| -> u32 {
            let cold = fp.is_some_and(|fp| self.anchors_of(fp) == 0);
            self.cfg
                .policy
                .untrusted_extra
                .saturating_add(if cold { cold_extra } else { 0 })
                .min(limits.max_replicas.saturating_sub(q))
        };
        let margin = self.cfg.policy.dispute_margin;
        // The largest group that disagrees with `g` on the same engine.
        let rival = |g: &Group| -> u32 {
            t.groups
                .iter()
                .filter(|o| o.key.0 == g.key.0 && o.key.1 != g.key.1)
                .map(|o| o.replicas.len() as u32)
                .max()
                .unwrap_or(0)
        };
        let decide_all = self.cfg.policy.anchors_decide;
        let decide_new = self.cfg.policy.anchors_decide_for_newcomers;
        // Whether anchors decide over group `g`: any group with `anchors_decide`, else one
        // that only newcomers agreed with.
        let decides_over = |g: &Group| decide_all || (decide_new && g.seniors == 0);
        // The largest group that disagrees with `g` on the same engine and that anchors do
        // not decide over (one an anchor agreed with).
        let anchored_rival = |g: &Group| -> u32 {
            t.groups
                .iter()
                .filter(|o| {
                    o.key.0 == g.key.0 && o.key.1 != g.key.1 && (o.anchors > 0 || !decides_over(o))
                })
                .map(|o| o.replicas.len() as u32)
                .max()
                .unwrap_or(0)
        };
        // Anchors can decide on engine `fp`: one is connected that could still take a replica
        // of this task, or one is computing one.
        let anchors_at_hand = |fp: u32| -> bool {
            let busy = t
                .anchors_on_task
                .iter()
                .find(|(f, _)| *f == fp)
                .map_or(0, |(_, n)| *n as usize);
            let in_flight = t
                .outstanding
                .iter()
                .any(|&(f, _, anchors)| f == fp && anchors > 0);
            (decide_all || decide_new) && (self.anchors_of(fp) > busy || in_flight)
        };
        // The job's cold-start hold (see `ColdHold`): a group no anchor is part of waits
        // while no anchor of its engine is connected.
        let holding = matches!(job.hold, super::ColdHold::Until(_));
        let mut held = None;
        // Deterministic choice when (unusually) two groups reach quorum: the larger, then the
        // smaller fingerprint index.
        if let Some(g) = t
            .groups
            .iter()
            .filter(|g| {
                let n = g.replicas.len() as u32;
                if (decide_all || decide_new)
                    && g.anchors >= q.saturating_add(extra)
                    && anchored_rival(g) == 0
                {
                    // `quorum + untrusted_extra` anchors agree and every disagreeing group
                    // is one anchors decide over.
                    return true;
                }
                if g.anchors == 0 && decides_over(g) && anchors_at_hand(g.key.0) {
                    return false;
                }
                let r = rival(g);
                let agreed =
                    n >= if g.anchored {
                        q
                    } else {
                        q.saturating_add(extra_of(Some(g.key.0)))
                    } && (r == 0 || n >= r.saturating_add(margin));
                if agreed && holding && !g.anchored && self.anchors_of(g.key.0) == 0 {
                    held = Some(g.key.0);
                    return false;
                }
                agreed
            })
            .max_by_key(|g| (g.replicas.len(), std::cmp::Reverse(g.key.0), g.key.1))
        {
            let mut agreeing = g.replicas.clone();
            agreeing.sort_unstable();
            return Need::Accept {
                fp: g.key.0,
                digest: g.key.1,
                agreeing,
            };
        }
        if let Some(fp) = held {
            // Agreed, but held: no more replicas, no verdict until the hold ends.
            return Need::More {
                n: 0,
                fp: Some(fp),
                anchor_wanted: false,
                anchors_only: false,
            };
        }
        let counted = t.reported + t.in_flight;
        let remaining = limits.max_replicas.saturating_sub(counted);
        let (lead, lead_fp, lead_anchored) = t.lead();
        if t.lost >= limits.max_replicas && t.in_flight == 0 {
            return Need::Fail(format!(
                "{} replicas were lost (deadline passed or worker left) without a result; {} reported",
                t.lost, t.reported
            ));
        }
        // Held too: a cold start's split vote may be a liar's that a decision on another
        // held task will void (see `Core::hold_order`).
        let hold_failure = matches!(
            job.hold,
            super::ColdHold::Until(_) | super::ColdHold::Failing(_)
        ) && lead_fp.is_some_and(|fp| self.anchors_of(fp) == 0);
        let waiting = Need::More {
            n: 0,
            fp: lead_fp,
            anchor_wanted: false,
            anchors_only: false,
        };
        if lead + remaining < q {
            if hold_failure {
                return waiting;
            }
            let distinct = t.groups.len();
            return Need::Fail(format!(
                "no consensus: {} replicas reported {} different results (best agreement {} of quorum {}) and max_replicas {} is reached",
                t.reported,
                distinct,
                t.groups.iter().map(|g| g.replicas.len()).max().unwrap_or(0),
                q,
                limits.max_replicas
            ));
        }
        // Anchors decide: with enough replicas issued to decide and no anchor among them (or
        // results that disagree), the next one goes to an anchor, one at a time, until
        // `quorum + untrusted_extra` anchors agree or an anchored result wins the usual way.
        let disputed = |fp: u32| t.groups.iter().filter(|g| g.key.0 == fp).count() > 1;
        // With `anchors_decide_for_newcomers`: a result only newcomers agreed with is in play.
        let newcomers_contest = |fp: u32| {
            t.groups
                .iter()
                .any(|g| g.key.0 == fp && g.anchors == 0 && g.seniors == 0)
        };
        let anchors_decide_now = |fp: u32| {
            (decide_all && (disputed(fp) || !lead_anchored))
                || (decide_new && newcomers_contest(fp))
        };
        if let Some(fp) =
            lead_fp.filter(|&fp| lead >= q && anchors_at_hand(fp) && anchors_decide_now(fp))
        {
            let anchor_in_flight = t
                .outstanding
                .iter()
                .any(|&(f, _, anchors)| f == fp && anchors > 0);
            // With `max_replicas` reached and no anchor computing, the rules below fail it.
            if anchor_in_flight || remaining > 0 {
                return Need::More {
                    n: u32::from(!anchor_in_flight),
                    fp: Some(fp),
                    anchor_wanted: true,
                    anchors_only: true,
                };
            }
        }
        // Up to the quorum, assume the missing replicas can go to anchors (the scheduler
        // prefers them); beyond it, an unanchored lead needs the extra replicas now.
        let base = if lead_anchored || lead < q {
            q
        } else {
            q + extra_of(lead_fp)
        };
        // A contested lead must also outnumber its largest rival by the margin.
        let contested = t
            .groups
            .iter()
            .filter(|g| Some(g.key.0) == lead_fp)
            .map(|g| (g.replicas.len() as u32, rival(g)))
            .max()
            .map_or(0, |(_, r)| if r > 0 { r.saturating_add(margin) } else { 0 });
        let target = base.max(contested);
        let n = target.saturating_sub(lead).min(remaining);
        if n == 0 && t.in_flight == 0 {
            if hold_failure {
                return waiting;
            }
            return Need::Fail(format!(
                "no trusted consensus: {} workers without an agreement record agreed (needed {} without one), and max_replicas {} is reached",
                lead,
                q + extra_of(lead_fp),
                limits.max_replicas
            ));
        }
        Need::More {
            n,
            fp: lead_fp,
            // The replicas that would complete an unanchored lead's agreement, the extra
            // ones included, go to anchors first: colluders that hold the first replicas of
            // a task must not also get the one that decides it.
            anchor_wanted: !lead_anchored && lead < base,
            anchors_only: false,
        }
    }

    /// Re-examine a pending task after something changed: decide it or queue more replicas.
    pub(crate) fn reevaluate(&mut self, task: TaskId, now: u64) {
        let Some(job) = self.jobs.get(&task.job) else {
            return;
        };
        if job.state != tasks::wire::JobState::Running
            || job.tasks[task.index as usize].phase != TaskPhase::Pending
        {
            return;
        }
        match self.need(task) {
            Need::Accept {
                fp,
                digest,
                agreeing,
            } => self.accept(task, fp, digest, &agreeing, now),
            Need::Fail(reason) => self.fail(task, reason, now),
            Need::More { n, .. } => {
                let job = self.jobs.get_mut(&task.job).expect("checked");
                let slot = &mut job.tasks[task.index as usize];
                if n > 0 && !slot.queued && task.index < job.next_fresh {
                    slot.queued = true;
                    job.open.push_back(task.index);
                    self.deal(task, now);
                }
            }
        }
    }

    fn accept(
        &mut self,
        task: TaskId,
        fp: u32,
        digest: ResultDigest,
        agreeing: &[ReplicaId],
        now: u64,
    ) {
        self.deals.remove(task);
        let job = self.jobs.get_mut(&task.job).expect("task's job exists");
        let slot = &mut job.tasks[task.index as usize];
        slot.phase = TaskPhase::Accepted;
        slot.accepted = Some((fp, digest));
        job.done += 1;
        let replicas = slot.replicas.clone();
        let checkpoints = job.checkpoints;
        let mut result = self.replicas[&agreeing[0]]
            .result
            .as_ref()
            .expect("reported")
            .1
            .clone();
        if checkpoints {
            // Fuel is not compared (resumed runs differ): the accepted result carries the
            // smallest fuel among the agreeing replicas, so no one gains by claiming more.
            result.fuel_used = self.min_agreeing_fuel(agreeing);
        }
        let counted: Vec<ReplicaId> = self
            .tally(task)
            .groups
            .into_iter()
            .flat_map(|g| g.replicas)
            .collect();
        let mut from: Vec<NodeId> = Vec::new();
        let mut in_flight = Vec::new();
        for r in replicas {
            let rep = &self.replicas[&r];
            match rep.phase {
                ReplicaPhase::Reported if counted.contains(&r) => {
                    self.judge(r, fp, digest);
                    if agreeing.contains(&r) {
                        from.push(self.replicas[&r].worker);
                    }
                }
                ReplicaPhase::InFlight => in_flight.push(r),
                _ => {}
            }
        }
        self.cancel_replicas(&in_flight);
        self.release_votes(task);
        self.mutations.push(Mutation::Decided {
            task,
            decision: Decision::Accepted {
                digest,
                result: result.clone(),
                fingerprint: self.fp_short(fp),
                agreeing: from.clone(),
            },
            decided_ms: now,
            output: None,
        });
        self.notices.push(Notice::Accepted {
            task,
            result,
            from,
            replica: *agreeing.last().expect("quorum >= 1"),
        });
        self.maybe_finish_job(task.job);
    }

    /// Give a reported replica of an accepted task its verdict (once).
    fn judge(&mut self, r: ReplicaId, fp: u32, digest: ResultDigest) {
        let rep = &self.replicas[&r];
        // One verdict per worker and task (see `tally`).
        let (task, worker) = (rep.task, rep.worker);
        let judged_before = self.jobs[&task.job].tasks[task.index as usize]
            .replicas
            .iter()
            .any(|o| {
                *o != r && self.replicas[o].worker == worker && self.replicas[o].verdict.is_some()
            });
        let rep = self.replicas.get_mut(&r).expect("replica exists");
        if rep.verdict.is_some() || rep.fp != fp || judged_before {
            return;
        }
        let (d, result) = rep.result.as_ref().expect("reported");
        let verdict = if *d == digest {
            Verdict::Valid
        } else {
            Verdict::Invalid
        };
        rep.verdict = Some(verdict);
        let (worker, mut fuel) = (rep.worker, result.fuel_used);
        let task_replicas = &self.jobs[&task.job].tasks[task.index as usize].replicas;
        if verdict == Verdict::Valid && self.jobs[&task.job].checkpoints {
            // Credit: the smallest fuel reported by a replica with the accepted digest.
            let agreeing: Vec<ReplicaId> = task_replicas
                .iter()
                .copied()
                .filter(|o| {
                    self.replicas[o]
                        .result
                        .as_ref()
                        .is_some_and(|(d, _)| *d == digest)
                        && self.replicas[o].fp == fp
                })
                .collect();
            fuel = fuel.min(self.min_agreeing_fuel(&agreeing));
        }
        self.mutations.push(Mutation::Verdict {
            replica: r,
            verdict,
        });
        if let Some(w) = self.workers.get_mut(&worker) {
            let was_banned = self.cfg.policy.is_banned(&w.rep);
            match verdict {
                Verdict::Valid => {
                    w.credit_fuel = w.credit_fuel.saturating_add(fuel);
                    w.rep.record_valid();
                    // A delivered result makes up for one lost replica.
                    w.lost = w.lost.saturating_sub(1);
                }
                Verdict::Invalid => w.rep.record_invalid(),
            }
            let banned = self.cfg.policy.is_banned(&w.rep);
            if !was_banned && banned {
                self.newly_banned.push(worker);
            }
            if w.connected && was_banned != banned {
                // The roster holds the connected workers that may take work.
                if banned {
                    self.roster.swap_remove(&worker);
                } else {
                    self.roster.insert(worker);
                }
            }
        }
        self.sync_anchor(worker);
        self.persist_worker(worker);
    }

    /// The smallest `fuel_used` among these reported replicas (`u64::MAX` if none is).
    fn min_agreeing_fuel(&self, agreeing: &[ReplicaId]) -> u64 {
        agreeing
            .iter()
            .filter_map(|r| self.replicas.get(r)?.result.as_ref())
            .map(|(_, res)| res.fuel_used)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// A task was decided (or its job cancelled): its reported votes are no longer undecided.
    pub(crate) fn release_votes(&mut self, task: TaskId) {
        let Some(slot) = self
            .jobs
            .get(&task.job)
            .and_then(|j| j.tasks.get(task.index as usize))
        else {
            return;
        };
        for r in &slot.replicas {
            let Some(rep) = self.replicas.get(r) else {
                continue;
            };
            if rep.phase == ReplicaPhase::Reported {
                if let Some(w) = self.workers.get_mut(&rep.worker) {
                    w.undecided = w.undecided.saturating_sub(1);
                    if std::mem::take(&mut w.waiting_for_room) && w.connected {
                        self.notices.push(Notice::Room { worker: w.id });
                    }
                }
            }
        }
    }

    /// Take their vote on undecided tasks away from workers banned since the last call:
    /// cancel their in-flight replicas and re-examine every pending task they reported on,
    /// so those tasks get replacement replicas. Deciding a task here may ban more workers.
    pub(crate) fn settle_bans(&mut self, now: u64) {
        while let Some(worker) = self.newly_banned.pop() {
            // Bans are rare; a scan of the replica table keeps workers free of a vote index.
            let mut touched: Vec<TaskId> = self
                .replicas
                .values()
                .filter(|r| {
                    r.worker == worker
                        && matches!(r.phase, ReplicaPhase::Reported | ReplicaPhase::InFlight)
                })
                .map(|r| r.task)
                .filter(|t| self.task_phase(*t) == Some(TaskPhase::Pending))
                .collect();
            touched.sort_unstable();
            touched.dedup();
            let in_flight = self.in_flight_of(&worker);
            self.cancel_replicas(&in_flight);
            for t in touched {
                self.reevaluate(t, now);
            }
        }
    }

    fn fail(&mut self, task: TaskId, reason: String, now: u64) {
        self.deals.remove(task);
        let job = self.jobs.get_mut(&task.job).expect("task's job exists");
        let slot = &mut job.tasks[task.index as usize];
        slot.phase = TaskPhase::Failed;
        job.failed += 1;
        let in_flight: Vec<ReplicaId> = slot
            .replicas
            .iter()
            .copied()
            .filter(|r| self.replicas[r].phase == ReplicaPhase::InFlight)
            .collect();
        self.cancel_replicas(&in_flight);
        self.release_votes(task);
        self.mutations.push(Mutation::Decided {
            task,
            decision: Decision::Failed {
                reason: reason.clone(),
            },
            decided_ms: now,
            output: None,
        });
        self.notices.push(Notice::Failed { task, reason });
        self.maybe_finish_job(task.job);
    }

    /// A worker reports a replica's result. Idempotent: a resend of the same result is
    /// `Recorded { duplicate: true }`. A report for a replica not assigned to `worker` is
    /// rejected and changes nothing.
    pub fn report(
        &mut self,
        worker: NodeId,
        replica: ReplicaId,
        result: RunResult,
        now: u64,
    ) -> ReportOutcome {
        let checkpoints = self
            .replicas
            .get(&replica)
            .and_then(|r| self.jobs.get(&r.task.job))
            .is_some_and(|j| j.checkpoints);
        let digest = Core::digest_of(&result, checkpoints);
        let Some(rep) = self.replicas.get_mut(&replica) else {
            return ReportOutcome::Rejected(format!("unknown replica {replica}"));
        };
        if rep.worker != worker {
            return ReportOutcome::Rejected(format!(
                "replica {replica} is not assigned to this worker"
            ));
        }
        if rep.phase != ReplicaPhase::Reported {
            // Claims are checked against what the job allowed, before anything is recorded.
            let limits = self.jobs[&rep.task.job].manifest.limits;
            if result.fuel_used > limits.fuel {
                return ReportOutcome::Rejected(format!(
                    "replica {replica}: fuel_used {} exceeds the task's fuel {}",
                    result.fuel_used, limits.fuel
                ));
            }
            if result.output_len > limits.max_output {
                return ReportOutcome::Rejected(format!(
                    "replica {replica}: output_len {} exceeds the task's max_output {}",
                    result.output_len, limits.max_output
                ));
            }
            if rep.phase == ReplicaPhase::Lost {
                let mark = rep.lost_mark;
                let reissued = self.jobs[&rep.task.job].tasks[rep.task.index as usize]
                    .replicas
                    .iter()
                    .any(|r| *r >= mark);
                if reissued {
                    return ReportOutcome::Rejected(format!(
                        "replica {replica} was lost (deadline passed, abandoned or worker gone) and has been reissued: a late report earns nothing"
                    ));
                }
            }
        }
        let rep = self.replicas.get_mut(&replica).expect("checked above");
        if rep.phase == ReplicaPhase::Reported {
            let same = rep.result.as_ref().is_some_and(|(d, _)| *d == digest);
            return if same {
                ReportOutcome::Recorded {
                    accepted: false,
                    duplicate: true,
                }
            } else {
                ReportOutcome::Rejected(format!(
                    "replica {replica} was already reported with a different result"
                ))
            };
        }
        let was = rep.phase;
        rep.phase = ReplicaPhase::Reported;
        // An anchor is judged by its standing when it answers (a saboteur may earn trust and
        // then cheat; its later answers still anchor until it is caught).
        rep.anchor = self
            .workers
            .get(&worker)
            .is_some_and(|w| self.cfg.policy.is_trusted(&w.rep));
        rep.result = Some((digest, result.clone()));
        let (task, deadline) = (rep.task, rep.deadline_ms);
        self.mutations.push(Mutation::Reported {
            replica,
            result,
            reported_ms: now,
            verdict: None,
        });
        if let Some(w) = self.workers.get_mut(&worker) {
            w.last_seen_ms = now;
            w.in_flight.remove(&replica);
        }
        let job = self.jobs.get_mut(&task.job).expect("replica's job exists");
        job.reported += 1;
        if was == ReplicaPhase::InFlight {
            job.in_flight -= 1;
            self.deadlines.remove(&(deadline, replica));
        }
        let slot = &job.tasks[task.index as usize];
        let outcome = match slot.phase {
            TaskPhase::Pending if job.state == tasks::wire::JobState::Running => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.undecided += 1;
                }
                self.reevaluate(task, now);
                let accepted =
                    self.jobs[&task.job].tasks[task.index as usize].phase == TaskPhase::Accepted;
                ReportOutcome::Recorded {
                    accepted,
                    duplicate: false,
                }
            }
            TaskPhase::Accepted => {
                let (fp, d) = slot.accepted.expect("accepted tasks keep their digest");
                self.judge(replica, fp, d);
                if self.replicas[&replica].verdict == Some(Verdict::Valid) {
                    self.mutations
                        .push(Mutation::LateAgreement { task, worker });
                }
                ReportOutcome::Recorded {
                    accepted: false,
                    duplicate: false,
                }
            }
            _ => ReportOutcome::Recorded {
                accepted: false,
                duplicate: false,
            },
        };
        self.settle_bans(now);
        outcome
    }
}
