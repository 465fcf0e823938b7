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
    let (total, idle) = parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)?;
    let own = parse_self_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    Some(Sample { total, idle, own })
}

/// (all CPU time, idle + iowait time) from the `cpu` line of `/proc/stat`, in jiffies.
fn parse_proc_stat(stat: &str) -> Option<(u64, u64)> {
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
    Some((total, f[3] + f[4]))
}

/// This process's user + system time from `/proc/self/stat`, in jiffies.
fn parse_self_stat(me: &str) -> Option<u64> {
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = me.get(me.rfind(')')? + 2..)?;
    let g: Vec<&str> = rest.split_whitespace().collect();
    Some(g.get(11)?.parse::<u64>().ok()? + g.get(12)?.parse::<u64>().ok()?)
}

/// Fraction of all CPU time that other processes used between two samples.
fn others_fraction(last: Sample, now: Sample) -> f64 {
    let total = now.total.saturating_sub(last.total).max(1) as f64;
    let busy = total - now.idle.saturating_sub(last.idle) as f64;
    let own = now.own.saturating_sub(last.own) as f64;
    ((busy - own) / total).clamp(0.0, 1.0)
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
            self.others = others_fraction(last, now);
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
    fn proc_stat_texts_parse_to_exact_counters() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat =
            "cpu  100 20 30 400 50 6 7 8 90 10\ncpu0 50 10 15 200 25 3 3 4 45 5\nintr 1 2 3\n";
        assert_eq!(
            parse_proc_stat(stat),
            Some((621, 450)),
            "8 fields summed; idle + iowait"
        );
        assert_eq!(parse_proc_stat("cpu 1 2 3 4\n"), None, "too few fields");
        assert_eq!(parse_proc_stat(""), None);
        // A command name with spaces and a ')' of its own; utime 1234, stime 56.
        let me = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 1000 0 0 0 1234 56 0 0 20 0 3 0 999 12345678 900 18446744073709551615";
        assert_eq!(parse_self_stat(me), Some(1290));
        assert_eq!(parse_self_stat("4242 (cut) S 1 2"), None);
        assert_eq!(parse_self_stat("no parenthesis"), None);
    }

    #[test]
    fn others_fraction_subtracts_idle_and_our_own_time() {
        let s = |total, idle, own| Sample { total, idle, own };
        // 400 jiffies passed, 100 idle, 100 ours: others used 200 of 400.
        assert_eq!(others_fraction(s(1000, 500, 10), s(1400, 600, 110)), 0.5);
        // Only we were busy: nobody else counts.
        assert_eq!(others_fraction(s(1000, 500, 10), s(1400, 700, 210)), 0.0);
        // Nothing but others.
        assert_eq!(others_fraction(s(1000, 500, 10), s(1400, 500, 10)), 1.0);
    }

    #[test]
    fn proc_sampling_works_here() {
        let a = read_sample().expect("/proc/stat and /proc/self/stat parse here");
        assert!(a.total > 0, "the machine has run for some jiffies");
        assert!(a.idle <= a.total);
        // Spin until this process has been charged CPU time (/proc/self/stat really is ours
        // and advances) and the machine's counters have moved on too. No speed assumption: we
        // wait for the counters, however long it takes.
        let start = std::time::Instant::now();
        let b = loop {
            let b = read_sample().expect("second sample");
            assert!(
                b.total >= a.total && b.idle >= a.idle && b.own >= a.own,
                "counters are monotonic: {a:?} then {b:?}"
            );
            if b.own > a.own && b.total > a.total {
                break b;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "our own CPU time or the machine's never advanced while spinning: {a:?} then {b:?}"
            );
            std::hint::black_box((0..10_000u64).fold(0u64, |x, y| x ^ y.wrapping_mul(31)));
        };
        // A policy fed the real files measures a fraction from them.
        let mut p = IdlePolicy::default();
        assert!(p.last.is_some());
        let _ = p.sample();
        assert!(p.last.is_some_and(|l| l.total >= b.total));
    }
}
