//! Worker reputation and the policy hooks that turn it into scheduling decisions.
//!
//! A worker's reputation is its agreement history: replicas that matched an accepted result
//! (`valid`) and replicas that contradicted one computed on a compatible engine (`invalid`),
//! plus a run of consecutive valid results (reset by every invalid one, as BOINC does).
//! [`TrustPolicy`] maps that history to how much work the worker may hold, and — when
//! adaptive replication is switched on — to whether a fresh task may be trusted to a single
//! replica (with deterministic random spot checks).

use serde::{Deserialize, Serialize};

use tasks::TaskId;

/// Agreement history of one worker (persisted with the worker).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Reputation {
    pub valid: u64,
    pub invalid: u64,
    /// Valid results since the last invalid one.
    pub consecutive_valid: u64,
}

impl Reputation {
    /// Laplace-smoothed agreement rate in (0, 1): a new worker starts at 0.5.
    pub fn score(&self) -> f64 {
        (self.valid as f64 + 1.0) / ((self.valid + self.invalid) as f64 + 2.0)
    }

    pub fn record_valid(&mut self) {
        self.valid += 1;
        self.consecutive_valid += 1;
    }

    pub fn record_invalid(&mut self) {
        self.invalid += 1;
        self.consecutive_valid = 0;
    }
}

/// Adaptive replication (off by default): a fresh task whose first replica goes to a worker
/// with at least `min_consecutive_valid` agreeing results in a row needs only that one
/// replica — except for one task in `spot_check_one_in`, which is replicated to the job's
/// full quorum so cheating trusted workers are still caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adaptive {
    pub min_consecutive_valid: u64,
    pub spot_check_one_in: u64,
}

/// How reputation affects scheduling.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustPolicy {
    /// A worker with at least this many invalid results and a score below `ban_score` gets
    /// no work at all.
    pub ban_min_invalid: u64,
    pub ban_score: f64,
    /// A worker with any invalid result and a score below this holds one replica at a time.
    pub probation_score: f64,
    /// In-flight replicas per slot a worker in good standing may hold (prefetch).
    pub in_flight_per_slot: u32,
    pub adaptive: Option<Adaptive>,
    /// Seed of the spot-check rolls (deterministic, so the core stays a pure function).
    pub seed: u64,
}

impl Default for TrustPolicy {
    fn default() -> Self {
        TrustPolicy {
            ban_min_invalid: 3,
            ban_score: 0.5,
            probation_score: 0.8,
            in_flight_per_slot: 2,
            adaptive: None,
            seed: 0x5eed,
        }
    }
}

impl TrustPolicy {
    /// Most replicas this worker may hold in flight (0 = banned from work).
    pub fn in_flight_cap(&self, rep: &Reputation, slots: u32) -> u32 {
        let score = rep.score();
        if rep.invalid >= self.ban_min_invalid && score < self.ban_score {
            0
        } else if rep.invalid > 0 && score < self.probation_score {
            1
        } else {
            slots.max(1).saturating_mul(self.in_flight_per_slot.max(1))
        }
    }

    /// Replicas that must agree for this fresh task, given the worker its first replica goes
    /// to. The job's quorum unless adaptive replication trusts this worker and the task is
    /// not a spot check.
    #[allow(clippy::manual_is_multiple_of)] // is_multiple_of is newer than our MSRV (1.85)
    pub fn quorum_for(&self, job_quorum: u32, task: TaskId, first: &Reputation) -> u32 {
        match self.adaptive {
            Some(a) if job_quorum > 1 && first.consecutive_valid >= a.min_consecutive_valid => {
                if self.roll(task) % a.spot_check_one_in.max(1) == 0 {
                    job_quorum
                } else {
                    1
                }
            }
            _ => job_quorum,
        }
    }

    fn roll(&self, task: TaskId) -> u64 {
        let mut h = blake3::Hasher::new_derive_key("peergrid 2026 spot check v1");
        h.update(&self.seed.to_le_bytes());
        h.update(&task.job.0.to_le_bytes());
        h.update(&task.index.to_le_bytes());
        u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tasks::JobId;

    #[test]
    fn repeated_disagreement_reduces_then_stops_work() {
        let p = TrustPolicy::default();
        let mut r = Reputation::default();
        assert_eq!(p.in_flight_cap(&r, 4), 8);
        r.record_invalid();
        assert_eq!(p.in_flight_cap(&r, 4), 1, "probation after a wrong answer");
        r.record_invalid();
        r.record_invalid();
        assert_eq!(p.in_flight_cap(&r, 4), 0, "banned after repeated wrong answers");
        for _ in 0..20 {
            r.record_valid();
        }
        assert_eq!(p.in_flight_cap(&r, 4), 8, "trust can be earned back");
    }

    #[test]
    fn adaptive_replication_trusts_with_spot_checks() {
        let p = TrustPolicy { adaptive: Some(Adaptive { min_consecutive_valid: 10, spot_check_one_in: 4 }), ..Default::default() };
        let new = Reputation::default();
        let trusted = Reputation { valid: 50, invalid: 0, consecutive_valid: 50 };
        let t = |i| TaskId { job: JobId(1), index: i };
        assert!((0..100).all(|i| p.quorum_for(2, t(i), &new) == 2));
        let singles = (0..1000).filter(|&i| p.quorum_for(2, t(i), &trusted) == 1).count();
        assert!((650..850).contains(&singles), "about 3 in 4 single: {singles}");
        assert_eq!(TrustPolicy::default().quorum_for(2, t(0), &trusted), 2, "off by default");
    }
}
