//! Pull scheduling: which replicas a worker gets when it asks for work.
//!
//! Rules:
//! - a worker never holds two replicas of one task; the one exception is a worker whose
//!   earlier replica of the task was *lost* (deadline, disconnect, abandon), and only as the
//!   very last resort, when no fresh, open or held-back task fits it — otherwise a pool as
//!   small as the quorum stalls. Every other worker gets a lost replica first. Losses cost
//!   the worker capacity and count once per worker towards failing the task, so taking and
//!   losing a task over and over neither fails it nor is free. The validator counts one
//!   vote and one verdict per worker and task regardless;
//! - a worker holds at most [`TrustPolicy::allowance`](super::trust::TrustPolicy::allowance)
//!   replicas: capacity follows delivered results (not the slots it claims), losses shrink
//!   it, and workers that disagree repeatedly get less or no work;
//! - a task never has replicas on two different workers of one address block (/24, /48;
//!   publicly routed addresses only) when
//!   [`TrustPolicy::distinct_address_blocks`](super::trust::TrustPolicy::distinct_address_blocks)
//!   is on (the default): colluders behind one network cannot outvote others;
//! - fresh tasks get `quorum` replicas up front; more only after disagreement or loss;
//! - a replica that would complete the quorum of a task none of whose workers is an anchor
//!   goes to an anchor (trusted worker) first: while anchors are connected, other workers
//!   take a fresh task instead, and such tasks only when no fresh task is left
//!   ([`TrustPolicy::prefer_anchors`](super::trust::TrustPolicy::prefer_anchors));
//! - a fresh task's partner replicas become due only after a seeded random number (1 to
//!   [`TrustPolicy::partner_spread`](super::trust::TrustPolicy::partner_spread)) of further
//!   assignments while other work is left, so consecutive requesters do not systematically
//!   share tasks (one operator cannot capture quorums by asking in step with itself);
//! - with [`TrustPolicy::deal_partners`](super::trust::TrustPolicy::deal_partners) (the open
//!   preset), replicas are dealt, not grabbed: each replica after a task's first is reserved
//!   for one connected worker drawn at random among those that could take it (among anchors
//!   when it would complete an unanchored lead), for two no-work retry hints, and that worker
//!   gets it on its next request even at a full hand (up to twice its cap); a request for a
//!   fresh task first deals up to [`FRESH_DEALS`] fresh tasks to drawn workers. A task's
//!   quorum is then the pool's random sample, not whoever polls fastest (idle workers poll
//!   on their hint, colluders need not);
//! - tasks already under way come first (they finish sooner), and among them those whose
//!   leading fingerprint matches the worker's; a task whose replicas ran on another engine
//!   goes to a mismatched worker only when nothing else is left in that job;
//! - a worker holds at most its fair share of the work left: the replicas in flight plus
//!   those still to issue, split over the connected workers by their slots (never fewer
//!   than two per slot of its own, so claimed slots or a swarm of identities that inflate
//!   the divisor cost others no more than deep prefetch). Early in a job that is no limit at all; near its end it stops the
//!   first workers to ask from hoarding the last tasks in deep prefetch hands while others
//!   idle (BOINC volunteers' over-fetch complaint), so a job ends as fast as its workers
//!   allow;
//! - jobs take turns, one assignment each (round robin), so a big job cannot starve a small
//!   one;
//! - a job's replicas go only to workers with an engine of its determinism class
//!   ([`tasks::Determinism`]: `portable` is every worker's hello engine, `native` the one a
//!   worker names with `WorkerMsg::Engines`), and run on that engine;
//! - each assignment lists up to `max_peers` connected workers that announced its blobs,
//!   then the coordinator itself.

use std::net::SocketAddr;

use tasks::wire::{Assignment, JobState, PeerAddr};
use tasks::{BlobId, JobId, NodeId, TaskId};

use super::validator::Need;
use super::{Core, Notice, TaskPhase, Worker};
use crate::store::{Mutation, ReplicaPhase};

/// Retry hint for a worker refused only because it holds its cap of replicas.
const AT_CAP_RETRY_MS: u64 = 100;

/// Random draws the dealer makes for one replica before it leaves the replica to whoever
/// asks (a pool where few workers could take it; each draw is O(1)).
const DEAL_DRAWS: usize = 16;

/// Fresh tasks one request for a fresh task may deal to other workers before the asking
/// worker gets one (see [`Core::deal_fresh`]).
const FRESH_DEALS: u32 = 2;

/// The asking worker, as `pick` needs it.
struct Me {
    id: NodeId,
    /// Its engine for `portable` jobs.
    fp: u32,
    /// Its engine for `native` jobs, if it has one.
    native_fp: Option<u32>,
    trusted: bool,
    block: Option<super::trust::AddressBlock>,
    /// It has room for a fresh task. Without room (its hand full of replicas and votes
    /// awaiting a decision) it may still take one replica of a task already under way, but
    /// only in a job with no replica in flight anywhere: a stalled job, as when a pool of
    /// quorum + 1 workers holds each other's missing votes, which would otherwise wait for
    /// ever. In a busy job a full hand waits (a greedy liar gains nothing from this).
    fresh_ok: bool,
}

/// The answer to a work request.
#[derive(Debug, Clone, PartialEq)]
pub struct Work {
    pub assignments: Vec<Assignment>,
    /// The determinism class of each assignment, in order (the engine to run it on).
    pub classes: Vec<tasks::Determinism>,
    /// When empty: ask again after this long.
    pub retry_after_ms: u64,
}

impl Core {
    /// Hand `worker` up to `max` replicas. An unknown or disconnected worker gets none.
    pub fn request_work(&mut self, worker: NodeId, max: u32, now: u64) -> Work {
        self.end_holds(now);
        let empty = Work {
            assignments: Vec::new(),
            classes: Vec::new(),
            retry_after_ms: self.cfg.retry_after_ms,
        };
        let Some(w) = self.workers.get_mut(&worker) else {
            return empty;
        };
        w.last_seen_ms = now;
        let Some(fp) = w.fp.filter(|_| w.connected) else {
            return empty;
        };
        let native_fp = w.native_fp;
        let slots = w.slots;
        let cap = self.cfg.policy.allowance(&w.rep, slots, w.lost);
        let cap = cap.min(self.fair_share(slots));
        let counts_undecided = self.cfg.policy.cap_counts_undecided;
        let held = move |w: &Worker| {
            (w.in_flight.len() as u32).saturating_add(if counts_undecided {
                w.undecided
            } else {
                0
            })
        };
        // Replicas dealt to this worker come first, even beyond its room (up to twice its
        // cap): the coordinator chose it for them, it did not ask for more. A busy honest
        // worker so takes its share of partners when it next asks, rather than leaving them
        // to whoever has room — a liar, who computes nothing, always has.
        let mut out = Vec::new();
        let mut classes = Vec::new();
        if self.cfg.policy.deal_partners && cap > 0 {
            let w = &self.workers[&worker];
            let mut budget = (2 * cap).saturating_sub(held(w)).min(max) as usize;
            for task in self.deals.live_for(worker, now) {
                if budget == 0 {
                    break;
                }
                if let Some((job_fp, class)) = self.dealt_fits(task, worker, fp, native_fp) {
                    classes.push(class);
                    out.push(self.assign(task, worker, job_fp, now));
                    budget -= 1;
                }
            }
        }
        let Some(w) = self.workers.get(&worker) else {
            return empty;
        };
        let in_flight = w.in_flight.len() as u32;
        let held = held(w);
        let room = cap.saturating_sub(held);
        let stalled = room == 0 && in_flight < cap;
        let max = max.saturating_sub(out.len() as u32);
        let want = out.len()
            + if room > 0 {
                max.min(room)
            } else {
                max.min(u32::from(stalled))
            } as usize;
        let me = Me {
            id: worker,
            fp,
            native_fp,
            trusted: self.cfg.policy.is_trusted(&w.rep),
            block: w.block(),
            fresh_ok: room > 0,
        };
        let mut decidable = Vec::new();
        while out.len() < want && !self.running.is_empty() {
            let n = self.running.len();
            let mut picked = None;
            for k in 0..n {
                let job = self.running[(self.rr + k) % n];
                // Only jobs of a class this worker has an engine for.
                let Some(job_fp) = self.jobs.get(&job).and_then(|j| match j.determinism {
                    tasks::Determinism::Portable => Some(me.fp),
                    tasks::Determinism::Native => me.native_fp,
                }) else {
                    continue;
                };
                if let Some(index) = self.pick(job, &me, job_fp, &mut decidable, now) {
                    self.rr = (self.rr + k + 1) % n;
                    picked = Some((TaskId { job, index }, job_fp));
                    break;
                }
            }
            let Some((task, job_fp)) = picked else { break };
            classes.push(self.jobs[&task.job].determinism);
            out.push(self.assign(task, worker, job_fp, now));
        }
        // Open tasks that turned out to be decidable (a ban lifted, say) are decided now
        // rather than dropped from the queue.
        for t in decidable {
            self.reevaluate(t, now);
        }
        self.settle_bans(now);
        // Refused only because the worker's hand is full (its reports are on their way): it
        // may ask again soon. No work at all, or a banned worker: the full wait.
        let at_cap = out.is_empty() && room == 0 && cap > 0 && !self.running.is_empty();
        if let Some(w) = self.workers.get_mut(&worker) {
            w.waiting_for_room = at_cap;
        }
        self.set_waiting_for_work(worker, out.is_empty() && !at_cap && cap > 0);
        let retry_after_ms = match (out.is_empty(), at_cap) {
            (false, _) => 0,
            (true, true) => self.cfg.retry_after_ms.min(AT_CAP_RETRY_MS),
            (true, false) => self.cfg.retry_after_ms,
        };
        Work {
            assignments: out,
            classes,
            retry_after_ms,
        }
    }

    /// The most replicas a worker with `slots` slots should hold now: the work left (in
    /// flight, plus replicas still to issue: a fresh task's quorum, one for each open task)
    /// over all connected slots, rounded up, and never below two per slot of its own (what
    /// a worker needs to keep its slots busy across a round trip).
    pub(crate) fn fair_share(&self, slots: u32) -> u32 {
        let left: u64 = self
            .running
            .iter()
            .filter_map(|j| self.jobs.get(j))
            .map(|j| {
                let fresh = (j.tasks.len() as u64).saturating_sub(u64::from(j.next_fresh));
                fresh * u64::from(j.manifest.limits.quorum.max(1))
                    + j.open.len() as u64
                    + u64::from(j.in_flight)
            })
            .sum();
        let share = (left * u64::from(slots)).div_ceil(self.connected_slots.max(1));
        u32::try_from(share)
            .unwrap_or(u32::MAX)
            .max(slots.saturating_mul(2))
    }

    /// Choose a task of `job` for this worker, whose engine for the job's class is `fp`, or
    /// none. Open tasks found decidable are dropped from the queue and added to
    /// `decidable`.
    fn pick(
        &mut self,
        job: JobId,
        me: &Me,
        fp: u32,
        decidable: &mut Vec<TaskId>,
        now: u64,
    ) -> Option<u32> {
        let worker = me.id;
        let scan = self.cfg.open_scan_limit;
        let j = self.jobs.get(&job)?;
        if j.state != JobState::Running || (!me.fresh_ok && j.in_flight > 0) {
            return None;
        }
        let defer_to_anchors = self.cfg.policy.prefer_anchors && !me.trusted && self.anchors > 0;
        let my_block = me.block.filter(|_| self.cfg.policy.distinct_address_blocks);
        // 1. Open tasks (already issued, need more replicas).
        let mut fallback = None;
        let mut deferred = None;
        let mut held_back = None;
        let mut lost_fallback = None;
        let mut stale = Vec::new();
        let mut chosen = None;
        for (pos, &index) in j.open.iter().enumerate().take(scan) {
            let task = TaskId { job, index };
            let slot = &j.tasks[index as usize];
            if slot.phase != TaskPhase::Pending {
                stale.push(pos);
                continue;
            }
            // Cheap check first: most skipped entries are tasks this worker already runs.
            let mut mine = slot
                .replicas
                .iter()
                .map(|r| &self.replicas[r])
                .filter(|r| r.worker == worker)
                .peekable();
            let has_mine = mine.peek().is_some();
            let only_lost = has_mine && mine.all(|r| r.phase == ReplicaPhase::Lost);
            if has_mine && !only_lost {
                continue;
            }
            // One network, one vote: never beside another worker of this address block.
            if my_block.is_some()
                && slot
                    .replicas
                    .iter()
                    .map(|r| &self.replicas[r])
                    .any(|r| r.worker != worker && r.block == my_block)
            {
                continue;
            }
            let (lead, anchor_wanted) = match self.need(task) {
                Need::More {
                    anchors_only: true,
                    n,
                    ..
                } if n > 0 && !me.trusted => {
                    // Anchors decide this task: it stays queued for one.
                    continue;
                }
                Need::More {
                    n,
                    fp,
                    anchor_wanted,
                    ..
                } if n > 0 => (fp, anchor_wanted),
                Need::More { .. } => {
                    stale.push(pos);
                    continue;
                }
                _ => {
                    stale.push(pos);
                    decidable.push(task);
                    continue;
                }
            };
            if has_mine {
                // It lost its earlier replica of this task: only as the very last resort
                // (a pool as small as the quorum would stall otherwise). Its loss was
                // counted, and counts once however often it repeats.
                if lost_fallback.is_none() {
                    lost_fallback = Some(pos);
                }
                continue;
            }
            // Dealt to a worker (and not yet past its wait): that worker's, or an anchor's.
            let dealt_to = self.deals.holder(task, now);
            let mine_dealt = dealt_to == Some(worker);
            if dealt_to.is_some() && !mine_dealt && !me.trusted {
                continue;
            }
            if slot.ready_at > self.issued && !me.trusted && !mine_dealt {
                // A partner replica not yet due: not for whoever happens to ask next (an
                // anchor, with its long agreeing record, may take it at once).
                if held_back.is_none() {
                    held_back = Some(pos);
                }
                continue;
            }
            if lead.is_none() || lead == Some(fp) {
                if anchor_wanted && defer_to_anchors {
                    // Leave it to an anchor while fresh work remains for this worker.
                    if deferred.is_none() {
                        deferred = Some(pos);
                    }
                    continue;
                }
                chosen = Some(pos);
                break;
            }
            if fallback.is_none() {
                fallback = Some(pos);
            }
        }
        let j = self.jobs.get_mut(&job).expect("checked");
        let take_open = |j: &mut super::Job, pos: usize, stale: &[usize]| {
            let index = j.open[pos];
            let mut remove: Vec<usize> = stale.to_vec();
            remove.push(pos);
            remove.sort_unstable();
            for p in remove.into_iter().rev() {
                let i = j.open.remove(p).expect("in range");
                j.tasks[i as usize].queued = false;
            }
            index
        };
        if let Some(pos) = chosen {
            return Some(take_open(j, pos, &stale));
        }
        // 2. A fresh task.
        if me.fresh_ok && (j.next_fresh as usize) < j.tasks.len() {
            for p in stale.into_iter().rev() {
                let i = j.open.remove(p).expect("in range");
                j.tasks[i as usize].queued = false;
            }
            if self.cfg.policy.deal_partners && !me.trusted {
                return self.deal_fresh(job, me, fp, now);
            }
            let index = j.next_fresh;
            j.next_fresh += 1;
            return Some(index);
        }
        // 3. An open task better left to an anchor (none is fresh any more); 4. a partner
        // replica not yet due; 5. one whose replicas ran on another engine; 6. one whose
        // replica on this very worker was lost (otherwise a pool as small as the quorum
        // could stall).
        // (Not for a worker without room for a fresh task while fresh ones are left.)
        let fresh_left = (j.next_fresh as usize) < j.tasks.len();
        if let Some(pos) = deferred
            .or(held_back)
            .or(fallback)
            .or(lost_fallback)
            .filter(|_| me.fresh_ok || !fresh_left)
        {
            return Some(take_open(j, pos, &stale));
        }
        for p in stale.into_iter().rev() {
            let i = j.open.remove(p).expect("in range");
            j.tasks[i as usize].queued = false;
        }
        None
    }

    fn assign(&mut self, task: TaskId, worker: NodeId, fp: u32, now: u64) -> Assignment {
        let replica = self.alloc_replica();
        let (anchor, block) = {
            let w = &self.workers[&worker];
            (self.cfg.policy.is_trusted(&w.rep), w.block())
        };
        let job = self
            .jobs
            .get_mut(&task.job)
            .expect("picked from a known job");
        let limits = job.manifest.limits;
        let slot = &mut job.tasks[task.index as usize];
        if slot.replicas.is_empty() && slot.quorum == 0 {
            let rep = self.workers[&worker].rep;
            let q = self.cfg.policy.quorum_for(limits.quorum, task, &rep);
            if q != limits.quorum {
                slot.quorum = q;
                self.mutations
                    .push(Mutation::TaskQuorum { task, quorum: q });
            }
        }
        let job = self.jobs.get_mut(&task.job).expect("known");
        if job.hold == super::ColdHold::Unstarted {
            job.hold = super::ColdHold::Until(
                now.saturating_add(self.cfg.retry_after_ms.saturating_mul(2)),
            );
        }
        job.tasks[task.index as usize].replicas.push(replica);
        job.in_flight += 1;
        let manifest = job
            .manifest
            .task(task.job, task.index)
            .expect("index in range");
        // Saturating: the core must never panic on a number a submitter chose.
        let deadline_ms = now.saturating_add(limits.deadline_secs.saturating_mul(1000));
        self.replicas.insert(
            replica,
            super::Replica {
                task,
                worker,
                fp,
                deadline_ms,
                phase: ReplicaPhase::InFlight,
                result: None,
                verdict: None,
                anchor,
                block,
                lost_mark: 0,
                first_deadline_ms: deadline_ms,
                progress: None,
            },
        );
        self.deadlines.insert((deadline_ms, replica));
        self.workers
            .get_mut(&worker)
            .expect("known")
            .in_flight
            .insert(replica);
        self.mutations.push(Mutation::Assign {
            replica,
            task,
            worker,
            fingerprint: self.fp_short(fp),
            assigned_ms: now,
            deadline_ms,
        });
        self.issued += 1;
        // Still short of replicas (quorum > 1 on a fresh task): keep it at the front of the
        // open queue so it completes soon — but due only after a seeded random number of
        // further assignments, so the next worker to ask (maybe the same operator under
        // another identity) does not systematically get its partner replica.
        let spread = self.cfg.policy.partner_spread;
        let fresh = self.jobs[&task.job].tasks[task.index as usize]
            .replicas
            .len()
            == 1;
        let ready_at = if spread > 0 && fresh {
            self.issued + rand::Rng::gen_range(&mut self.rng, 1..=u64::from(spread))
        } else {
            0
        };
        self.deals.remove(task);
        if let Need::More { n, .. } = self.need(task) {
            let job = self.jobs.get_mut(&task.job).expect("known");
            let slot = &mut job.tasks[task.index as usize];
            slot.ready_at = slot.ready_at.max(ready_at);
            if n > 0 && !slot.queued {
                slot.queued = true;
                job.open.push_front(task.index);
            }
            if n > 0 {
                self.deal(task, now);
            }
        }
        let mut peers: Vec<PeerAddr> = Vec::new();
        let blobs: Vec<BlobId> = std::iter::once(manifest.module.id)
            .chain(manifest.input.map(|b| b.id))
            .collect();
        for b in &blobs {
            for p in self.holders_of(b, Some(&worker), self.cfg.max_peers, replica) {
                if !peers.contains(&p) {
                    peers.push(p);
                }
            }
            // Peers still downloading it serve the chunks they already hold: when many
            // workers start on a new blob at once, they share what the seed sends each.
            let holds = self.holders.get(b).is_some_and(|h| h.contains(&worker));
            for p in if holds {
                Vec::new()
            } else {
                self.fetchers_of(b, &worker, self.cfg.max_peers, now)
            } {
                if !peers.contains(&p) {
                    peers.push(p);
                }
            }
        }
        for b in blobs {
            self.note_fetching(b, worker, now);
        }
        if self.wake_rest_on_assign && self.workers.get(&worker).is_some_and(|w| w.reachable) {
            self.wake_rest_on_assign = false;
            self.wake_idle();
        }
        // Workers behind the requester's own NAT (the same public address) cannot be reached
        // through it (few NATs hairpin): listing them would only cost connect timeouts.
        let me = self.workers.get(&worker).and_then(|w| w.peer_addr);
        peers.retain(|p| !behind_one_nat(me, p.addr) && !self.cfg.central_only);
        self.super_peers_first(&mut peers);
        if let Some(seed) = &self.cfg.seed {
            peers.push(seed.clone());
        }
        Assignment {
            replica,
            task: manifest,
            deadline_secs: limits.deadline_secs,
            peers,
        }
    }
}

impl Core {
    /// `me` asks for a fresh task of `job` (its engine there `fp`): the first replicas are
    /// dealt too, so whoever asks most often does not get most of them (a liar answers at
    /// once and asks again; idle honest workers ask once per retry hint). Each time, a
    /// worker is drawn at random: if it is another one that could run the task and holds
    /// fewer dealt replicas than its cap, the task is dealt to it (queued, its for two retry
    /// hints) and the draw repeats, at most [`FRESH_DEALS`] times; otherwise `me` gets the
    /// next fresh task. The last fresh task is never dealt away: a request for one that finds
    /// some gets one (it would get exactly one either way, so this costs the dealing
    /// nothing). None when no fresh task is left.
    fn deal_fresh(&mut self, job: JobId, me: &Me, fp: u32, now: u64) -> Option<u32> {
        let until = now.saturating_add(self.cfg.retry_after_ms.saturating_mul(2));
        let mut dealt = 0;
        loop {
            let j = self.jobs.get(&job)?;
            if j.next_fresh as usize >= j.tasks.len() {
                return None;
            }
            let native = j.determinism == tasks::Determinism::Native;
            let last = j.next_fresh as usize + 1 == j.tasks.len();
            let target = if dealt < FRESH_DEALS && !last && !self.roster.is_empty() {
                let i = rand::Rng::gen_range(&mut self.rng, 0..self.roster.len());
                let id = self.roster[i];
                self.workers
                    .get(&id)
                    .filter(|w| {
                        id != me.id
                            && (if native { w.native_fp } else { w.fp }) == Some(fp)
                            && (self.deals.count_for(id) as u32)
                                < self.cfg.policy.allowance(&w.rep, w.slots, w.lost)
                    })
                    .map(|_| id)
            } else {
                None
            };
            let j = self.jobs.get_mut(&job)?;
            let index = j.next_fresh;
            j.next_fresh += 1;
            let Some(target) = target else {
                return Some(index);
            };
            j.tasks[index as usize].queued = true;
            j.open.push_back(index);
            self.deal_to(TaskId { job, index }, target, until);
            dealt += 1;
        }
    }

    /// Whether a task whose next replica `anchor_wanted` should wait for an anchor of
    /// engine `fp`: the policy prefers anchors and one is connected.
    fn wants_anchor(&self, anchor_wanted: bool, fp: u32) -> bool {
        anchor_wanted && self.cfg.policy.prefer_anchors && self.anchors_of(fp) > 0
    }

    /// Whether `worker` (engines `fp`, `native_fp`) may take the replica of `task` dealt to
    /// it now: the task still needs one, not from anchors only, and the worker holds none
    /// of it and has an engine of its class. Gives the engine to run it on, and the class.
    fn dealt_fits(
        &self,
        task: TaskId,
        worker: NodeId,
        fp: u32,
        native_fp: Option<u32>,
    ) -> Option<(u32, tasks::Determinism)> {
        let j = self.jobs.get(&task.job)?;
        let slot = j.tasks.get(task.index as usize)?;
        if j.state != JobState::Running || slot.phase != TaskPhase::Pending {
            return None;
        }
        if slot
            .replicas
            .iter()
            .any(|r| self.replicas[r].worker == worker)
        {
            return None;
        }
        let trusted = self.cfg.policy.is_trusted(&self.workers.get(&worker)?.rep);
        let engine = match j.determinism {
            tasks::Determinism::Portable => Some(fp),
            tasks::Determinism::Native => native_fp,
        }?;
        match self.need(task) {
            Need::More {
                n,
                anchors_only,
                anchor_wanted,
                ..
            } if n > 0
                && (trusted || !anchors_only)
                && (trusted || !self.wants_anchor(anchor_wanted, engine)) => {}
            _ => return None,
        }
        let ran_on = slot.replicas.first().map(|r| self.replicas[r].fp);
        (ran_on.is_none() || ran_on == Some(engine)).then_some((engine, j.determinism))
    }

    /// Reserve `task`'s next replica for a worker drawn at random (seeded) from the
    /// connected ones that could take it — an engine of the fingerprint its replicas ran
    /// on, no replica of it yet, not of a holder's address block — until
    /// two no-work retry hints from `now` (an idle worker asks within one). With no such
    /// worker found in [`DEAL_DRAWS`] draws, whoever asks may take it. See
    /// [`TrustPolicy::deal_partners`](super::trust::TrustPolicy::deal_partners).
    pub(crate) fn deal(&mut self, task: TaskId, now: u64) {
        self.deals.remove(task);
        let policy = &self.cfg.policy;
        if !policy.deal_partners || self.roster.is_empty() {
            self.wake_idle();
            return;
        }
        let Some(j) = self.jobs.get(&task.job) else {
            return;
        };
        let native = j.determinism == tasks::Determinism::Native;
        let slot = &j.tasks[task.index as usize];
        let Some(fp) = slot.replicas.first().map(|r| self.replicas[r].fp) else {
            // No replica ran yet (its only one was lost): anyone's, of any engine.
            self.wake_idle();
            return;
        };
        let holders: Vec<(NodeId, Option<super::trust::AddressBlock>)> = slot
            .replicas
            .iter()
            .map(|r| (self.replicas[r].worker, self.replicas[r].block))
            .collect();
        // The replica that would complete an unanchored lead goes to an anchor: drawn among
        // anchors then (anchors' own rule, `prefer_anchors`).
        let anchors_only = matches!(
            self.need(task),
            Need::More { anchor_wanted, .. } if self.wants_anchor(anchor_wanted, fp)
        );
        let until = now.saturating_add(self.cfg.retry_after_ms.saturating_mul(2));
        let mut dealt = None;
        for _ in 0..DEAL_DRAWS {
            let i = rand::Rng::gen_range(&mut self.rng, 0..self.roster.len());
            let id = self.roster[i];
            let Some(w) = self.workers.get(&id) else {
                continue;
            };
            let engine = if native { w.native_fp } else { w.fp };
            let block = w.block().filter(|_| policy.distinct_address_blocks);
            // Not "has room now": that would favour whoever reports fastest (a liar
            // computes nothing). A busy worker takes its dealt replica when it next asks.
            if engine != Some(fp)
                || holders
                    .iter()
                    .any(|(h, b)| *h == id || (block.is_some() && *b == block))
                || (anchors_only && !policy.is_trusted(&w.rep))
            {
                continue;
            }
            dealt = Some(id);
            break;
        }
        match dealt {
            Some(id) => self.deal_to(task, id, until),
            None => self.wake_idle(),
        }
    }

    /// Deal `task` to `worker` until `until`; if its last request found no work, tell it
    /// to ask now rather than after its retry hint (who gets the replica is the draw's
    /// choice either way: this only saves the wait).
    fn deal_to(&mut self, task: TaskId, worker: NodeId, until: u64) {
        self.deals.insert(task, worker, until);
        self.wake(worker);
    }

    /// A replica was queued for whoever asks: every connected worker whose last request
    /// found no work is told to ask now (one notice per such request, so bounded by the
    /// connected workers).
    pub(crate) fn wake_idle(&mut self) {
        for id in self.idle_in_roster_order() {
            self.wake(id);
        }
    }

    /// The idle workers ([`Core::idle`]) that are in the roster, in its order: the order in
    /// which waking them used to visit the whole roster. O(idle), not O(workers).
    fn idle_in_roster_order(&self) -> Vec<NodeId> {
        if self.idle.is_empty() {
            return Vec::new();
        }
        let mut idle: Vec<(usize, NodeId)> = self
            .idle
            .iter()
            .filter_map(|id| self.roster.get_index_of(id).map(|i| (i, *id)))
            .collect();
        idle.sort_unstable();
        idle.into_iter().map(|(_, id)| id).collect()
    }

    /// A job was added: idle workers would otherwise wait out their retry hint (seconds)
    /// before they see its tasks. Directly reachable ones (super-peers) are woken first;
    /// the others when the first super-peer is handed a replica (see [`Self::assign`]), so
    /// that their assignments list super-peers fetching the module. With no idle
    /// super-peer, everyone is woken at once.
    ///
    /// Each woken worker is also noted as fetching `module` (it is about to): the first to
    /// be handed a replica is then pointed at the others, not at the seed alone. Woken all
    /// at once, the first requesters knew only the seed, which held them out of the chunks
    /// it had just sent the others (netswarm, NAT topology: 2 of 4 runs took 9 s to
    /// distribute the module and the seed sent 3 copies, against 1.3-1.5 s and 1 copy).
    pub(crate) fn wake_for_new_job(&mut self, module: BlobId, now: u64) {
        let idle: Vec<(NodeId, bool)> = self
            .idle_in_roster_order()
            .into_iter()
            .filter_map(|id| {
                let w = self.workers.get(&id)?;
                w.connected.then_some((id, w.reachable))
            })
            .collect();
        let supers_first = idle.iter().any(|&(_, reachable)| reachable);
        self.wake_rest_on_assign |= supers_first;
        for (w, reachable) in idle {
            if reachable || !supers_first {
                self.note_fetching(module, w, now);
                self.wake(w);
            }
        }
    }

    /// [`Notice::Room`] to `worker` if its last request found no work (once per request).
    fn wake(&mut self, worker: NodeId) {
        if self.set_waiting_for_work(worker, false)
            && self.workers.get(&worker).is_some_and(|w| w.connected)
        {
            self.notices.push(Notice::Room { worker });
        }
    }

    /// Set `worker`'s `waiting_for_work` and keep [`Core::idle`] in step (the only place
    /// either changes); returns what the flag was.
    pub(crate) fn set_waiting_for_work(&mut self, worker: NodeId, waiting: bool) -> bool {
        let Some(w) = self.workers.get_mut(&worker) else {
            return false;
        };
        if waiting {
            self.idle.insert(worker);
        } else {
            self.idle.remove(&worker);
        }
        std::mem::replace(&mut w.waiting_for_work, waiting)
    }
}

/// Whether two observed addresses are one public address (a NAT shared by both): a public
/// IP (see [`super::trust::address_block`]) with different ports. Loopback and private
/// addresses (one host, a LAN) reach each other directly.
fn behind_one_nat(me: Option<SocketAddr>, other: SocketAddr) -> bool {
    me.is_some_and(|me| me.ip() == other.ip() && super::trust::address_block(&me).is_some())
}
