//! The idle policy: is the machine busy with its owner's work?
//!
//! Reads `/proc/stat` (all CPU time) and `/proc/self/stat` (our own), so the CPU this worker
//! uses does not count as "busy". With `--idle-only`, tasks pause while other processes use
//! more than [`BUSY_FRACTION`] of the machine, and resume after it has been idle for
//! [`IDLE_SAMPLES_TO_RESUME`] samples in a row.

use std::time::Duration;

/// Other processes using more than this fraction of all cores means "busy".
pub const BUSY_FRACTION: f64 = 0.25;
/// Consecutive idle samples needed before resuming (hysteresis).
pub const IDLE_SAMPLES_TO_RESUME: u32 = 3;
/// How often the policy samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Sample {
    total: u64,
    idle: u64,
    own: u64,
}

fn read_sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() < 5 {
        return None;
    }
    let total: u64 = f.iter().take(8).sum();
    let idle = f[3] + f[4];
    let me = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &me[me.rfind(')')? + 2..];
    let g: Vec<&str> = rest.split_whitespace().collect();
    let own = g.get(11)?.parse::<u64>().ok()? + g.get(12)?.parse::<u64>().ok()?;
    Some(Sample { total, idle, own })
}

/// Tracks whether the machine's owner is using it.
pub struct IdlePolicy {
    last: Option<Sample>,
    idle_streak: u32,
    busy: bool,
    /// Fraction of all CPU time used by other processes over the last interval.
    pub others: f64,
}

impl Default for IdlePolicy {
    fn default() -> Self {
        IdlePolicy {
            last: read_sample(),
            idle_streak: 0,
            busy: false,
            others: 0.0,
        }
    }
}

impl IdlePolicy {
    /// Take a sample; returns whether tasks should be paused now.
    pub fn sample(&mut self) -> bool {
        let Some(now) = read_sample() else {
            return false;
        };
        if let Some(last) = self.last {
            let total = now.total.saturating_sub(last.total).max(1) as f64;
            let busy = total - now.idle.saturating_sub(last.idle) as f64;
            let own = now.own.saturating_sub(last.own) as f64;
            self.others = ((busy - own) / total).clamp(0.0, 1.0);
            self.decide(self.others);
        }
        self.last = Some(now);
        self.busy
    }

    fn decide(&mut self, others: f64) {
        if others > BUSY_FRACTION {
            self.busy = true;
            self.idle_streak = 0;
        } else if self.busy {
            self.idle_streak += 1;
            if self.idle_streak >= IDLE_SAMPLES_TO_RESUME {
                self.busy = false;
                self.idle_streak = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_at_once_and_resumes_only_after_a_quiet_streak() {
        let mut p = IdlePolicy {
            last: None,
            idle_streak: 0,
            busy: false,
            others: 0.0,
        };
        p.decide(0.1);
        assert!(!p.busy);
        p.decide(0.9);
        assert!(p.busy);
        p.decide(0.0);
        p.decide(0.0);
        assert!(p.busy, "two quiet samples are not enough");
        p.decide(0.0);
        assert!(!p.busy);
    }

    #[test]
    fn proc_sampling_works_here() {
        let mut p = IdlePolicy::default();
        std::thread::sleep(Duration::from_millis(50));
        let _ = p.sample();
        assert!((0.0..=1.0).contains(&p.others));
    }
}
