//! Chunk scheduling for one download: which run of chunks to ask which peer for next.
//!
//! I/O-free: the async shell in [`super::fetch`] reports what peers said and asks for the next
//! request; time comes in as `now`.
//!
//! Rules:
//! - a peer is asked only for chunks its last `Have` answer listed;
//! - the last peer of the list is the *seed* (the coordinator lists itself last): when other
//!   peers exist it is asked only for chunks no other live peer holds, in short runs at
//!   random places, one request at a time, so a crowd of requesters pulls different
//!   chunks out of it and then trades them among themselves;
//! - a chunk is in flight at most once, except in the end game (every missing chunk is in
//!   flight) when a different non-seed peer may race a slow one for it;
//! - a peer that answered `Busy` rests until the time it named; one that sent bad data is
//!   dropped for the rest of the download; one that failed `max_failures` times is given up.

use std::ops::Range;
use std::time::{Duration, Instant};

use rand::Rng;
use tasks::wire::MAX_CHUNKS_PER_REQUEST;

/// Tuning of one download.
#[derive(Debug, Clone)]
pub struct SchedLimits {
    /// Chunk requests in flight to one peer.
    pub max_inflight_per_peer: usize,
    /// Chunk requests in flight for the whole download (each buffers at most one chunk).
    pub max_inflight_total: usize,
    /// Chunks per request to an ordinary peer.
    pub run: u32,
    /// Chunks per request to the seed while other peers exist.
    pub seed_run: u32,
    /// Consecutive failures (timeouts, broken streams) before a peer is given up.
    pub max_failures: u32,
    /// In the end game, a chunk in flight this long may be raced by another peer.
    pub race_after: Duration,
    /// A peer (not the seed) that has answered nothing but `Busy` for this long is given
    /// up: one that claims every chunk and is always busy would otherwise keep the seed
    /// from being asked and the download from ever stalling out.
    pub busy_patience: Duration,
}

impl Default for SchedLimits {
    fn default() -> Self {
        SchedLimits {
            max_inflight_per_peer: 4,
            max_inflight_total: 32,
            run: MAX_CHUNKS_PER_REQUEST,
            seed_run: 2,
            max_failures: 3,
            race_after: Duration::from_millis(1500),
            busy_patience: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    Live,
    /// Unreachable or failing: given up for this download.
    Gone,
    /// Sent data that failed verification.
    Bad,
}

#[derive(Debug)]
pub struct PeerSlot {
    pub state: PeerState,
    /// Last `Have` answer; `None` before the first.
    pub have: Option<Vec<bool>>,
    pub inflight: usize,
    pub busy_until: Option<Instant>,
    /// The first of its `Busy` answers since it last delivered a run.
    pub busy_since: Option<Instant>,
    pub failures: u32,
}

#[derive(Debug)]
pub struct Sched {
    done: Vec<bool>,
    /// Peers fetching each chunk right now, and since when.
    owners: Vec<Vec<(usize, Instant)>>,
    remaining: u64,
    pub peers: Vec<PeerSlot>,
    seed: Option<usize>,
    limits: SchedLimits,
    inflight_total: usize,
    /// The chunk after the last run asked of the seed.
    seed_cursor: Option<usize>,
}

impl Sched {
    /// `held`: one bool per chunk already verified locally. The last of `peers` peers is the
    /// seed when there is more than one.
    pub fn new(held: Vec<bool>, peers: usize, limits: SchedLimits) -> Sched {
        let remaining = held.iter().filter(|h| !**h).count() as u64;
        let n = held.len();
        let mut s = Sched {
            done: held,
            owners: vec![Vec::new(); n],
            remaining,
            peers: Vec::new(),
            seed: (peers > 1).then(|| peers - 1),
            limits,
            inflight_total: 0,
            seed_cursor: None,
        };
        for _ in 0..peers {
            s.add_peer();
        }
        s
    }

    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    pub fn inflight(&self) -> usize {
        self.inflight_total
    }

    pub fn is_live(&self, p: usize) -> bool {
        self.peers[p].state == PeerState::Live
    }

    pub fn any_live(&self) -> bool {
        self.peers.iter().any(|p| p.state == PeerState::Live)
    }

    /// Peers in the order to offer them work: everyone before the seed.
    pub fn order(&self) -> impl Iterator<Item = usize> {
        let seed = self.seed;
        (0..self.peers.len())
            .filter(move |p| Some(*p) != seed)
            .chain(seed)
    }

    /// A source learnt during the download (it asked us for the blob): a live peer whose
    /// holdings are unknown until its first `Have`. Returns its index. The seed stays the
    /// seed.
    pub fn add_peer(&mut self) -> usize {
        self.peers.push(PeerSlot {
            state: PeerState::Live,
            have: None,
            inflight: 0,
            busy_until: None,
            busy_since: None,
            failures: 0,
        });
        self.peers.len() - 1
    }

    fn has(&self, p: usize, i: usize) -> bool {
        self.peers[p]
            .have
            .as_ref()
            .is_some_and(|h| h.get(i).copied().unwrap_or(false))
    }

    /// Whether some live non-seed peer other than `p` holds chunk `i`.
    fn elsewhere(&self, p: usize, i: usize) -> bool {
        (0..self.peers.len())
            .any(|q| q != p && Some(q) != self.seed && self.is_live(q) && self.has(q, i))
    }

    /// Whether nothing is in flight to non-seed peers and no live non-seed peer holds a
    /// missing chunk: only then is the seed worth asking.
    pub fn starving(&self) -> bool {
        let Some(seed) = self.seed else { return true };
        let others = (0..self.peers.len()).filter(|&q| q != seed && self.is_live(q));
        let mut others = others.peekable();
        let busy = self.inflight_total > self.peers[seed].inflight;
        !busy && !others.any(|q| (0..self.done.len()).any(|i| !self.done[i] && self.has(q, i)))
    }

    /// Whether any live peer could serve some missing chunk (now or after a `Busy` rest).
    pub fn can_progress(&self) -> bool {
        (0..self.done.len()).any(|i| {
            !self.done[i] && (0..self.peers.len()).any(|p| self.is_live(p) && self.has(p, i))
        })
    }

    /// The next run of chunks to request from peer `p`, if any; marks it in flight.
    pub fn next(&mut self, p: usize, now: Instant, rng: &mut impl Rng) -> Option<Range<u64>> {
        let is_seed = Some(p) == self.seed;
        let slot = &self.peers[p];
        let per_peer = if is_seed {
            1
        } else {
            self.limits.max_inflight_per_peer
        };
        if slot.state != PeerState::Live
            || slot.have.is_none()
            || slot.inflight >= per_peer
            || self.inflight_total >= self.limits.max_inflight_total
            || slot.busy_until.is_some_and(|t| t > now)
        {
            return None;
        }
        let n = self.done.len();
        let wanted =
            |s: &Sched, i: usize| !s.done[i] && s.has(p, i) && !(is_seed && s.elsewhere(p, i));
        let fresh: Vec<usize> = (0..n)
            .filter(|&i| wanted(self, i) && self.owners[i].is_empty())
            .collect();
        let (start, run) = if !fresh.is_empty() {
            let start = if is_seed {
                self.seed_start(&fresh, rng)
            } else {
                // A random fresh chunk, so requesters spread over the blob.
                fresh[rng.gen_range(0..fresh.len())]
            };
            // Begin at the start of the fresh stretch it lies in, so runs stay long.
            let mut s = start;
            let max = if is_seed {
                self.limits.seed_run
            } else {
                self.limits.run
            } as usize;
            if !is_seed {
                while s > 0
                    && s > start.saturating_sub(max - 1)
                    && wanted(self, s - 1)
                    && self.owners[s - 1].is_empty()
                {
                    s -= 1;
                }
            }
            let mut e = s + 1;
            while e < n && e - s < max && wanted(self, e) && self.owners[e].is_empty() {
                e += 1;
            }
            (s, e - s)
        } else if !is_seed {
            // End game: race a chunk another peer has been slow to deliver.
            let race = |i: usize| matches!(self.owners[i].as_slice(), [(q, since)] if *q != p && now.duration_since(*since) >= self.limits.race_after);
            let dup = (0..n).find(|&i| wanted(self, i) && race(i))?;
            (dup, 1)
        } else {
            return None;
        };
        for i in start..start + run {
            self.owners[i].push((p, now));
        }
        if is_seed {
            self.seed_cursor = Some(start + run);
        }
        self.peers[p].inflight += 1;
        self.inflight_total += 1;
        Some(start as u64..(start + run) as u64)
    }

    /// Where to ask the seed next, among `fresh` (sorted) chunks nobody else holds. Many
    /// requesters do this at once without seeing each other's requests, so each keeps
    /// extending its own stretch, and when that runs into chunks already held, jumps into
    /// the middle part of a random gap (weighted by length): as far as possible from the
    /// stretches others are extending.
    fn seed_start(&self, fresh: &[usize], rng: &mut impl Rng) -> usize {
        if let Some(c) = self.seed_cursor {
            if fresh.binary_search(&c).is_ok() {
                return c;
            }
        }
        let mut gaps: Vec<(usize, usize)> = Vec::new();
        for &i in fresh {
            match gaps.last_mut() {
                Some((_, end)) if *end == i => *end += 1,
                _ => gaps.push((i, i + 1)),
            }
        }
        let mut pick = rng.gen_range(0..fresh.len());
        for (a, b) in gaps {
            let len = b - a;
            if pick < len {
                let lo = a + len / 4;
                let hi = (a + (3 * len).div_ceil(4)).max(lo + 1);
                return rng.gen_range(lo..hi);
            }
            pick -= len;
        }
        fresh[0]
    }

    /// A request to `p` for `run` ended; chunks in `got` were verified and written.
    pub fn finish(&mut self, p: usize, run: Range<u64>, got: &[u64]) {
        for i in run.clone() {
            self.owners[i as usize].retain(|(q, _)| *q != p);
        }
        for &i in got {
            if !self.done[i as usize] {
                self.done[i as usize] = true;
                self.remaining -= 1;
            }
        }
        let slot = &mut self.peers[p];
        slot.inflight -= 1;
        self.inflight_total -= 1;
    }

    /// Mark a chunk held (e.g. written by another request).
    pub fn is_done(&self, i: u64) -> bool {
        self.done[i as usize]
    }

    /// The peer answered `Busy`: it rests until `now + retry_after`; a peer other than the
    /// seed that has been busy for [`SchedLimits::busy_patience`] since it last delivered
    /// anything is given up.
    pub fn busy(&mut self, p: usize, now: Instant, retry_after: Duration) {
        let seed = self.seed == Some(p);
        let slot = &mut self.peers[p];
        slot.busy_until = Some(now + retry_after);
        let since = *slot.busy_since.get_or_insert(now);
        if !seed
            && slot.state == PeerState::Live
            && now.duration_since(since) >= self.limits.busy_patience
        {
            slot.state = PeerState::Gone;
        }
    }

    /// The peer does not hold chunks it was asked for: forget them until its next `Have`.
    pub fn not_held(&mut self, p: usize, run: Range<u64>) {
        if let Some(h) = self.peers[p].have.as_mut() {
            for i in run {
                if let Some(b) = h.get_mut(i as usize) {
                    *b = false;
                }
            }
        }
    }

    pub fn set_have(&mut self, p: usize, have: Vec<bool>) {
        if have.len() == self.done.len() {
            self.peers[p].have = Some(have);
            self.peers[p].failures = 0;
        }
    }

    pub fn succeeded(&mut self, p: usize) {
        self.peers[p].failures = 0;
        self.peers[p].busy_since = None;
    }

    /// A timeout or broken stream; gives the peer up after too many in a row.
    pub fn failed(&mut self, p: usize) {
        let slot = &mut self.peers[p];
        slot.failures += 1;
        if slot.failures >= self.limits.max_failures && slot.state == PeerState::Live {
            slot.state = PeerState::Gone;
        }
    }

    pub fn gone(&mut self, p: usize) {
        if self.peers[p].state == PeerState::Live {
            self.peers[p].state = PeerState::Gone;
        }
    }

    pub fn bad(&mut self, p: usize) {
        self.peers[p].state = PeerState::Bad;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng() -> rand::rngs::StdRng {
        rand::SeedableRng::seed_from_u64(7)
    }

    #[test]
    fn seed_is_asked_only_for_chunks_no_other_peer_holds() {
        let now = Instant::now();
        let mut s = Sched::new(vec![false; 8], 2, SchedLimits::default());
        s.set_have(0, vec![true, true, true, true, false, false, false, false]);
        s.set_have(1, vec![true; 8]);
        let mut r = rng();
        let a = s.next(0, now, &mut r).unwrap();
        assert_eq!(a, 0..4, "the non-seed peer gets the whole run it holds");
        let b = s.next(1, now, &mut r).unwrap();
        assert!(
            b.start >= 4 && b.end <= 8 && b.end - b.start <= 2,
            "seed serves only what others lack: {b:?}"
        );
        assert_eq!(
            s.next(1, now, &mut r),
            None,
            "one request at a time to the seed"
        );
        s.finish(0, a, &[0, 1, 2, 3]);
        s.finish(1, b.clone(), &[b.start]);
        assert_eq!(s.remaining(), 3);
    }

    #[test]
    fn single_peer_is_not_treated_as_seed_and_end_game_races_other_peers() {
        let now = Instant::now();
        let mut s = Sched::new(vec![false; 20], 1, SchedLimits::default());
        s.set_have(0, vec![true; 20]);
        let mut r = rng();
        let a = s.next(0, now, &mut r).unwrap();
        let b = s.next(0, now, &mut r).unwrap();
        assert_eq!(a.end - a.start + b.end - b.start, 20);
        assert_eq!(
            s.next(0, now, &mut r),
            None,
            "no duplicates from the same peer"
        );

        let mut s = Sched::new(vec![false; 2], 3, SchedLimits::default());
        s.set_have(0, vec![true; 2]);
        s.set_have(1, vec![true; 2]);
        let a = s.next(0, now, &mut r).unwrap();
        assert_eq!(a, 0..2);
        assert_eq!(
            s.next(1, now, &mut r),
            None,
            "no race while the first peer is not slow"
        );
        let later = now + SchedLimits::default().race_after;
        assert_eq!(
            s.next(1, later, &mut r),
            Some(0..1),
            "end game: another peer races a slow one"
        );
        s.bad(0);
        s.finish(0, a, &[]);
        assert_eq!(s.remaining(), 2);
        assert!(s.can_progress());
    }

    #[test]
    fn busy_peers_rest_and_failing_peers_are_given_up() {
        let now = Instant::now();
        let mut s = Sched::new(vec![false; 4], 1, SchedLimits::default());
        s.set_have(0, vec![true; 4]);
        s.busy(0, now, Duration::from_millis(50));
        let mut r = rng();
        assert_eq!(s.next(0, now, &mut r), None);
        assert!(s.next(0, now + Duration::from_millis(60), &mut r).is_some());
        for _ in 0..3 {
            s.failed(0);
        }
        assert!(!s.any_live());
    }

    #[test]
    fn a_peer_busy_for_its_whole_patience_is_given_up_but_never_the_seed() {
        let t0 = Instant::now();
        let limits = SchedLimits::default();
        let patience = limits.busy_patience;
        let mut s = Sched::new(vec![false; 4], 2, limits);
        for p in 0..2 {
            s.set_have(p, vec![true; 4]);
        }
        let rest = Duration::from_millis(50);
        s.busy(0, t0, rest);
        s.busy(0, t0 + patience / 2, rest);
        assert!(s.is_live(0), "busy for a while is not given up");
        // A delivered run starts the patience over.
        s.succeeded(0);
        s.busy(0, t0 + patience, rest);
        s.busy(0, t0 + patience + patience / 2, rest);
        assert!(s.is_live(0));
        s.busy(0, t0 + patience * 2, rest);
        assert!(!s.is_live(0), "nothing but Busy for its patience: given up");
        // The seed (the last of two) is the last resort: never given up for being busy.
        s.busy(1, t0, rest);
        s.busy(1, t0 + patience * 10, rest);
        assert!(s.is_live(1));
    }
}
