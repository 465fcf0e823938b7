//! What operators watch: the engine's counters ([`EngineStats`], read without a round trip
//! to the engine thread) and two queries answered on it, [`Overview`] (jobs, workers and
//! their standing, validation totals) and [`TasksPage`] (a job's tasks). Both are public in
//! the HTTP API, so neither carries a digest, an output or anything else a colluder could
//! copy an accepted answer from.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use tasks::wire::{JobState, JobStatus};
use tasks::{JobId, NodeId, TaskId};

use super::Engine;
use crate::core::trust::Standing as TrustStanding;
use crate::core::TaskPhase;
use crate::store::{ReplicaPhase, Store, Verdict};

/// Upper bounds (seconds) of the store commit latency histogram's buckets.
pub const COMMIT_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Most tasks one [`TasksPage`] holds.
pub const MAX_TASKS_PAGE: u32 = 1000;

/// A cumulative histogram of commit latencies (Prometheus semantics: bucket `i` counts
/// every observation `<= COMMIT_BUCKETS[i]`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommitHistogram {
    /// Observations per bucket (not cumulative; [`CommitHistogram::cumulative`] sums them).
    pub buckets: [u64; COMMIT_BUCKETS.len()],
    /// All observations, including those above the last bound.
    pub count: u64,
    pub sum_seconds: f64,
}

impl CommitHistogram {
    fn observe(&mut self, seconds: f64) {
        if let Some(i) = COMMIT_BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum_seconds += seconds;
    }

    /// `(upper bound, observations <= bound)` per bucket.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        COMMIT_BUCKETS
            .iter()
            .zip(self.buckets)
            .map(|(b, n)| {
                acc += n;
                (*b, acc)
            })
            .collect()
    }
}

/// The engine's running counters, shared with its handles.
#[derive(Debug, Default)]
pub struct EngineStats {
    commits: Mutex<CommitHistogram>,
    batches: AtomicU64,
    commands: AtomicU64,
    reports_rejected: AtomicU64,
}

impl EngineStats {
    /// A batch was committed in `took`; `commands` applied so far in total.
    pub(super) fn committed(&self, took: Duration, commands: u64) {
        self.commits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(took.as_secs_f64());
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.commands.store(commands, Ordering::Relaxed);
    }

    pub(super) fn report_rejected(&self) {
        self.reports_rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Store commit latencies since the engine started.
    pub fn commit_histogram(&self) -> CommitHistogram {
        self.commits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Batches committed since the engine started.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Commands applied since the engine started (as of the last commit).
    pub fn commands(&self) -> u64 {
        self.commands.load(Ordering::Relaxed)
    }

    /// Reports refused before judgement (a replica not the worker's, a changed result, an
    /// inline output not matching its hash) since the engine started.
    pub fn reports_rejected(&self) -> u64 {
        self.reports_rejected.load(Ordering::Relaxed)
    }
}

/// Where a worker stands, as operators say it: the trust policy's standing, with good
/// standing split into anchors (trusted by their run of agreeing results) and newcomers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    Newcomer,
    Anchor,
    Probation,
    Banned,
}

impl Standing {
    pub const ALL: [Standing; 4] = [
        Standing::Newcomer,
        Standing::Anchor,
        Standing::Probation,
        Standing::Banned,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Standing::Newcomer => "newcomer",
            Standing::Anchor => "anchor",
            Standing::Probation => "probation",
            Standing::Banned => "banned",
        }
    }
}

/// A job, with what `status` shows and what only the dashboard needs.
#[derive(Debug, Clone, Serialize)]
pub struct JobOverview {
    #[serde(flatten)]
    pub status: JobStatus,
    /// Tasks neither accepted nor failed yet.
    pub tasks_pending: u32,
    /// Tasks whose reports disagree (two results from the same engine class).
    pub tasks_contested: u32,
}

/// A worker, with its standing and activity.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerOverview {
    pub node_id: NodeId,
    pub connected: bool,
    pub credit: f64,
    pub valid: u64,
    pub invalid: u64,
    pub standing: Standing,
    /// Replicas it holds now.
    pub in_flight: u32,
    /// The slots it claimed in its hello.
    pub slots: u32,
    /// Milliseconds since the Unix epoch of its last hello, request or report.
    pub last_seen_ms: u64,
    /// A dial-back reached it this session: it serves blobs to peers directly.
    pub reachable: bool,
    /// Bytes of job blobs (modules, inputs) it is listed as holding: what it fetched, from
    /// the coordinator or from peers (or kept from an earlier session).
    pub blob_bytes_held: u64,
}

/// The dashboard's and `/metrics`' view of the whole coordinator.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// The engine's clock when it answered (ms since the Unix epoch).
    pub now_ms: u64,
    pub jobs: Vec<JobOverview>,
    pub workers: Vec<WorkerOverview>,
    /// Reported replicas judged to agree with their task's accepted result (all workers).
    pub verdicts_valid: u64,
    /// Reported replicas judged to contradict it.
    pub verdicts_invalid: u64,
}

/// One task, public fields only.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskRow {
    pub index: u32,
    /// `pending`, `accepted` or `failed`.
    pub state: &'static str,
    /// Agreeing reports it needs (the job's quorum, or more for a spot-checked task).
    pub quorum: u32,
    /// Replicas issued so far.
    pub replicas: u32,
    pub in_flight: u32,
    /// Reports counted (one per worker; banned workers' reports are not counted).
    pub reported: u32,
    /// Reports in the largest group of identical results.
    pub agreeing: u32,
    /// Counted reports outside that group.
    pub disagreeing: u32,
    /// Two different results from the same engine class: a validation dispute.
    pub contested: bool,
    /// Replicas lost (deadline, abandon, disconnect; one per worker) and reissued.
    pub lost: u32,
    /// Fuel the accepted result used (accepted tasks only).
    pub fuel_used: Option<u64>,
    /// The furthest progress (0..=1) a worker reported for one of its in-flight replicas
    /// (tasks whose guests call `peergrid.progress`; docs/guest-abi.md).
    pub progress: Option<f64>,
}

/// A slice of one job's tasks.
#[derive(Debug, Clone, Serialize)]
pub struct TasksPage {
    pub job: JobId,
    pub name: String,
    pub state: JobState,
    pub tasks_total: u32,
    pub offset: u32,
    pub tasks: Vec<TaskRow>,
}

impl<S: Store> Engine<S> {
    /// Jobs (with pending and contested counts), workers (with standing), verdict totals.
    /// Walks the replicas of running jobs only; an ended job's contested count is kept.
    pub(super) fn overview(&mut self, now: u64) -> Overview {
        let mut jobs = Vec::with_capacity(self.core.jobs.len());
        let statuses = self.status(None).map(|r| r.jobs).unwrap_or_default();
        for status in statuses {
            let id = status.id;
            let contested = match self.ended_contested.get(&id) {
                Some(n) => *n,
                None => {
                    let n = self.contested_in(id);
                    if status.state != JobState::Running {
                        self.ended_contested.insert(id, n);
                    }
                    n
                }
            };
            jobs.push(JobOverview {
                tasks_pending: status
                    .tasks_total
                    .saturating_sub(status.tasks_done + status.tasks_failed),
                tasks_contested: contested,
                status,
            });
        }
        // Job blobs by id, each once, then what each worker is listed as holding of them.
        let mut sizes: std::collections::HashMap<tasks::BlobId, u64> = Default::default();
        for j in self.core.jobs.values() {
            sizes.insert(j.manifest.module.id, j.manifest.module.size);
            for t in &j.manifest.tasks {
                if let Some(i) = t.input {
                    sizes.insert(i.id, i.size);
                }
            }
        }
        let mut held: std::collections::HashMap<NodeId, u64> = Default::default();
        for (blob, size) in &sizes {
            for w in self.core.holders.get(blob).into_iter().flatten() {
                *held.entry(*w).or_default() += size;
            }
        }
        let policy = &self.core.cfg.policy;
        let mut workers: Vec<WorkerOverview> = self
            .core
            .workers
            .values()
            .map(|w| WorkerOverview {
                node_id: w.id,
                connected: w.connected,
                credit: w.credit_fuel as f64 / 1e9,
                valid: w.rep.valid,
                invalid: w.rep.invalid,
                standing: match policy.standing(&w.rep) {
                    TrustStanding::Banned => Standing::Banned,
                    TrustStanding::Probation => Standing::Probation,
                    TrustStanding::Good if policy.is_trusted(&w.rep) => Standing::Anchor,
                    TrustStanding::Good => Standing::Newcomer,
                },
                in_flight: w.in_flight.len() as u32,
                slots: w.slots,
                last_seen_ms: w.last_seen_ms,
                reachable: w.reachable,
                blob_bytes_held: held.get(&w.id).copied().unwrap_or(0),
            })
            .collect();
        workers.sort_by_key(|w| w.node_id);
        Overview {
            now_ms: now,
            verdicts_valid: workers.iter().map(|w| w.valid).sum(),
            verdicts_invalid: workers.iter().map(|w| w.invalid).sum(),
            jobs,
            workers,
        }
    }

    /// Contested tasks of a job.
    fn contested_in(&self, job: JobId) -> u32 {
        let Some(j) = self.core.jobs.get(&job) else {
            return 0;
        };
        (0..j.tasks.len() as u32)
            .filter(|&index| {
                self.task_row(TaskId { job, index })
                    .is_some_and(|r| r.contested)
            })
            .count() as u32
    }

    /// Up to `limit` (at most [`MAX_TASKS_PAGE`]) tasks of `job` from index `offset`.
    pub(super) fn tasks(&self, job: JobId, offset: u32, limit: u32) -> Option<TasksPage> {
        let j = self.core.jobs.get(&job)?;
        let total = j.tasks.len() as u32;
        let end = offset.saturating_add(limit.min(MAX_TASKS_PAGE)).min(total);
        Some(TasksPage {
            job,
            name: j.manifest.name.clone(),
            state: j.state,
            tasks_total: total,
            offset,
            tasks: (offset.min(end)..end)
                .filter_map(|index| self.task_row(TaskId { job, index }))
                .collect(),
        })
    }

    fn task_row(&self, task: TaskId) -> Option<TaskRow> {
        let j = self.core.jobs.get(&task.job)?;
        let slot = j.tasks.get(task.index as usize)?;
        let t = self.core.tally(task);
        let agreeing = t
            .groups
            .iter()
            .map(|g| g.replicas.len() as u32)
            .max()
            .unwrap_or(0);
        let contested = t.groups.iter().enumerate().any(|(i, g)| {
            t.groups[i + 1..]
                .iter()
                .any(|o| o.key.0 == g.key.0 && o.key.1 != g.key.1)
        });
        let fuel_used = match (slot.phase, slot.accepted) {
            (TaskPhase::Accepted, Some((fp, digest))) => slot.replicas.iter().find_map(|r| {
                let rep = self.core.replicas.get(r)?;
                let (d, result) = rep.result.as_ref()?;
                (rep.fp == fp && *d == digest && rep.verdict != Some(Verdict::Invalid))
                    .then_some(result.fuel_used)
            }),
            _ => None,
        };
        Some(TaskRow {
            index: task.index,
            state: match slot.phase {
                TaskPhase::Pending => "pending",
                TaskPhase::Accepted => "accepted",
                TaskPhase::Failed => "failed",
            },
            quorum: if slot.quorum == 0 {
                j.manifest.limits.quorum
            } else {
                slot.quorum
            },
            replicas: slot.replicas.len() as u32,
            in_flight: slot
                .replicas
                .iter()
                .filter_map(|r| self.core.replicas.get(r))
                .filter(|r| r.phase == ReplicaPhase::InFlight)
                .count() as u32,
            reported: t.reported,
            agreeing,
            disagreeing: t.reported.saturating_sub(agreeing),
            contested,
            lost: t.lost,
            fuel_used,
            progress: slot
                .replicas
                .iter()
                .filter_map(|r| self.core.replicas.get(r))
                .filter(|r| r.phase == ReplicaPhase::InFlight)
                .filter_map(|r| r.progress)
                .reduce(f64::max),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_everything() {
        let mut h = CommitHistogram::default();
        for s in [0.0001, 0.003, 0.003, 20.0] {
            h.observe(s);
        }
        let c = h.cumulative();
        assert_eq!(c[0], (0.0005, 1));
        assert_eq!(c[3], (0.005, 3));
        assert_eq!(c.last(), Some(&(10.0, 3)), "20 s is only in +Inf");
        assert_eq!(h.count, 4);
        assert!((h.sum_seconds - 20.0061).abs() < 1e-9);
    }
}
