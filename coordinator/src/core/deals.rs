//! Replicas reserved for a worker the coordinator drew (see
//! [`TrustPolicy::deal_partners`](super::trust::TrustPolicy::deal_partners)): at most one
//! per task, indexed both ways so a worker's own are found without a scan. Not persisted:
//! after a restart, tasks are dealt anew as they are queued.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tasks::{JobId, NodeId, TaskId};

#[derive(Debug, Default)]
pub(crate) struct Deals {
    /// Task → (the worker it is dealt to, until when, in ms).
    by_task: HashMap<TaskId, (NodeId, u64)>,
    by_worker: HashMap<NodeId, BTreeSet<TaskId>>,
    /// How many deals lapse at each time: which lapse when, without a scan.
    by_until: BTreeMap<u64, usize>,
}

impl Deals {
    /// Deal `task` to `worker` until `until` (replacing an earlier deal of it).
    pub fn insert(&mut self, task: TaskId, worker: NodeId, until: u64) {
        self.remove(task);
        self.by_task.insert(task, (worker, until));
        self.by_worker.entry(worker).or_default().insert(task);
        *self.by_until.entry(until).or_default() += 1;
    }

    /// The task is no longer dealt (a replica was assigned, it was decided, or re-dealt).
    pub fn remove(&mut self, task: TaskId) {
        if let Some((w, until)) = self.by_task.remove(&task) {
            if let Some(n) = self.by_until.get_mut(&until) {
                *n -= 1;
                if *n == 0 {
                    self.by_until.remove(&until);
                }
            }
            if let Some(set) = self.by_worker.get_mut(&w) {
                set.remove(&task);
                if set.is_empty() {
                    self.by_worker.remove(&w);
                }
            }
        }
    }

    /// Deals made to `worker` (lapsed ones included until it next asks).
    pub fn count_for(&self, worker: NodeId) -> usize {
        self.by_worker.get(&worker).map_or(0, |s| s.len())
    }

    /// Forget every deal of `job` (cancelled).
    pub fn remove_job(&mut self, job: JobId) {
        let tasks: Vec<TaskId> = self
            .by_task
            .keys()
            .filter(|t| t.job == job)
            .copied()
            .collect();
        for t in tasks {
            self.remove(t);
        }
    }

    /// Whether a deal lapses in `(after, upto]` (its replica is then anyone's).
    pub fn lapses_between(&self, after: u64, upto: u64) -> bool {
        after < upto && self.by_until.range(after + 1..=upto).next().is_some()
    }

    /// Who `task` is dealt to, while its deal lasts (at `now`).
    pub fn holder(&self, task: TaskId, now: u64) -> Option<NodeId> {
        self.by_task
            .get(&task)
            .filter(|(_, until)| *until > now)
            .map(|(w, _)| *w)
    }

    /// The tasks dealt to `worker` whose deal still lasts at `now`, oldest task first; the
    /// lapsed ones are forgotten (anyone may take those).
    pub fn live_for(&mut self, worker: NodeId, now: u64) -> Vec<TaskId> {
        let Some(set) = self.by_worker.get(&worker) else {
            return Vec::new();
        };
        let (live, lapsed): (Vec<TaskId>, Vec<TaskId>) = set
            .iter()
            .partition(|t| self.by_task.get(t).is_some_and(|(_, until)| *until > now));
        for t in lapsed {
            self.remove(t);
        }
        live
    }

    #[cfg(test)]
    pub fn get(&self, task: TaskId) -> Option<(NodeId, u64)> {
        self.by_task.get(&task).copied()
    }
}
