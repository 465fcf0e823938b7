//! Worker reputation and the policy hooks that turn it into scheduling decisions.
//!
//! A worker's reputation is its agreement history: replicas that matched an accepted result
//! (`valid`) and replicas that contradicted one computed on a compatible engine (`invalid`),
//! plus a run of consecutive valid results (reset by every invalid one, as BOINC does).
//! [`TrustPolicy`] maps that history to
//! - a *standing*: how much work the worker may hold, down to none (banned). A banned
//!   worker's votes on undecided tasks stop counting and its in-flight replicas are
//!   cancelled and reissued (see `Core::settle_bans`);
//! - *trust*: a worker in good standing with `trust_min_valid` agreeing results in a row is
//!   an **anchor**. Extra replicas that would complete a task without an anchor go to
//!   anchors first, and `untrusted_extra` can demand more agreement from groups without one;
//! - when adaptive replication is switched on, whether a fresh task may be trusted to a
//!   single replica (with deterministic random spot checks);
//! - [`address_block`]: the /24 (IPv4) or /48 (IPv6) a worker connects from, so that one
//!   task never has replicas on two workers of one block (one operator, one botnet subnet).
//!
//! Presets (`coordinator serve --policy` or `[policy] preset` in its config file):
//! - [`TrustPolicy::open_pool`] (`open`) is what `coordinator serve` runs unless told
//!   otherwise: anyone may join, so it assumes some workers lie and collude. It caps votes
//!   awaiting a decision, asks one more agreeing replica from workers without a record, bans
//!   at the first caught lie and settles contested tasks by a margin. Needs quorum + 1
//!   workers of one engine before the first task can be accepted.
//! - [`TrustPolicy::trusting`] (`trusting`, also `Default`, which the core's own tests and
//!   an embedded [`ServeConfig`](crate::server::ServeConfig) use) is for private pools whose
//!   workers are all yours: never more replicas than the quorum when everyone agrees, deep
//!   prefetch. Greedy colluders overrun it (FAULTS.md).
//! - [`TrustPolicy::hardened`] (`hardened`) is the open policy without the dispute margin and
//!   with newcomers at one replica: slower for honest workers.
//! - [`TrustPolicy::fixed_quorum`] (`fixed-quorum`) is the plain policy the theory
//!   describes, for comparison.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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
    /// no work at all, and its votes on undecided tasks no longer count.
    pub ban_min_invalid: u64,
    pub ban_score: f64,
    /// A worker with any invalid result and a score below this holds one replica at a time.
    pub probation_score: f64,
    /// In-flight replicas per slot a worker in good standing may hold (prefetch: workers
    /// with short tasks keep many in hand). Also how many votes a worker that turns
    /// dishonest can cast at once before it is caught.
    pub in_flight_per_slot: u32,
    /// Agreeing results in a row (in good standing) that make a worker an anchor.
    /// `u64::MAX` switches trust off: nobody is an anchor.
    pub trust_min_valid: u64,
    /// Replicas that would complete a task's quorum without an anchor go to anchors first
    /// while any anchor is connected (other workers take such tasks only when no fresh task
    /// is left, so nothing stalls). Costs nothing in replicas; changes only who gets what.
    pub prefer_anchors: bool,
    /// Extra agreeing replicas a result needs when none of its agreeing workers is an anchor
    /// (0 = plain quorum). Protects the start of a pool, before anyone has a record; needs
    /// at least quorum + extra distinct workers, so it is off by default.
    pub untrusted_extra: u32,
    /// In-flight cap of workers that are not (yet) anchors, if lower than the usual one:
    /// limits how much a newcomer can vote on before it has a record.
    pub unproven_in_flight: Option<u32>,
    /// The in-flight cap also counts the worker's reported votes on tasks not yet decided:
    /// a saboteur that answers at once (a lie needs no computing) cannot cast votes faster
    /// than its tasks are decided. Costs honest workers some throughput while their
    /// partners are still computing.
    pub cap_counts_undecided: bool,
    /// Never give two replicas of one task to different workers whose addresses share a
    /// /24 (IPv4) or /48 (IPv6). Loopback, private, link-local, CGNAT and unique-local
    /// addresses are exempt (see [`address_block`]), so LAN and test setups are unaffected.
    pub distinct_address_blocks: bool,
    pub adaptive: Option<Adaptive>,
    /// Seed of the spot-check rolls and of who gets a task's partner replicas
    /// (deterministic, so the core stays a pure function).
    pub seed: u64,
    /// Capacity follows delivered results, not the `slots` a worker claims: a worker may
    /// hold `new_in_flight + in_flight_per_valid × valid − in_flight_per_loss × losses`
    /// replicas (at least 1, at most the slot-based cap above). A newcomer claiming
    /// `u32::MAX` slots holds `new_in_flight`; every replica it lets lapse or abandons
    /// shrinks that, down to one at a time.
    pub new_in_flight: u32,
    pub in_flight_per_valid: u32,
    pub in_flight_per_loss: u32,
    /// A task's partner replicas (the ones that complete its quorum) are handed out only
    /// after 1..=`partner_spread` (a seeded random draw) further assignments, while other
    /// work is left: the worker asking right after another never systematically gets the
    /// partner of its task (a second identity cannot capture quorums by asking in step).
    /// Anchors are exempt (they may take a partner replica at once, as `prefer_anchors`
    /// wants). 0 = off.
    pub partner_spread: u32,
    /// A result that other reports on the same engine contradict is accepted only when its
    /// group outnumbers the largest contradicting group by this many (0 or 1 = plain quorum).
    pub dispute_margin: u32,
    /// While anchors of a task's engine are connected, anchors decide: a result no anchor
    /// agreed with is not accepted (its task waits for an anchor's replica, given to anchors
    /// only), and a result that `quorum + untrusted_extra` anchors agree with is accepted over rivals that no
    /// anchor agreed with (the workers of those rivals are then caught and banned). A swarm
    /// of new identities, however many addresses it comes from, cannot outvote an
    /// established pool. With no anchor connected (a pool's cold start), or none left that
    /// could take another replica of the task, the other rules apply alone.
    ///
    /// Only for a pool whose anchors are known good (e.g. its first workers were the
    /// project's own machines): whoever holds the anchors decides, so colluders that became
    /// anchors in a cold start take over every result.
    pub anchors_decide: bool,
    /// Anchors decide over newcomers: [`anchors_decide`](TrustPolicy::anchors_decide)'s
    /// rules, applied only to results that **newcomers alone** agreed with — workers that
    /// first joined while anchors of their engine were connected (an established pool), and
    /// are not anchors themselves yet. A swarm of new identities, however many addresses it
    /// comes from, cannot outvote an established pool: its results wait for an anchor's
    /// replica, and `quorum + untrusted_extra` anchors win over it. Workers of a cold start
    /// (there before any anchor) keep deciding as peers, so colluders that won the first
    /// quorums of a cold start do not get to decide everything, as they would with
    /// `anchors_decide`. Costs an honest newcomer an anchor's replica beside its own until it
    /// is an anchor itself.
    pub anchors_decide_for_newcomers: bool,
    /// In a cold start — no anchor of the task's engine connected — a result no anchor
    /// agreed with needs this many agreeing replicas more than `untrusted_extra` asks.
    /// Nobody has a record yet then, and colluders that ask fastest hold more than their
    /// share of the first replicas; the cost is paid only until the first anchors appear.
    /// Not applied while fewer workers are connected than the agreement it asks for (a
    /// small pool still starts).
    pub cold_start_extra: u32,
    /// Replicas are dealt, not grabbed: each replica after a task's first is reserved for
    /// one connected worker the coordinator draws at random (seeded) among those that could
    /// take it (busy or not: a liar computes nothing and always has room; one that would
    /// complete an unanchored lead is drawn among anchors), and only that worker gets it —
    /// on its next request, even at a full hand (up to twice its cap) — for two no-work
    /// retry hints, then anyone may. A request for a fresh task first deals up to two fresh
    /// tasks to drawn workers (each holding fewer dealt replicas than its cap). And a job's
    /// first deal window (two hints from its first assignment) holds every decision of a
    /// group no anchor is part of, while no anchor is connected, then makes them in an order
    /// that catches liars first (split votes fail a task only one window later): the idle
    /// workers dealt replicas have asked by then, and liars caught in the disputes they
    /// raised lose their votes before those votes decide anything. Whoever polls fastest — a colluder asking every few
    /// milliseconds while honest workers idle-poll on their hint as a job arrives — cannot
    /// choose who checks its results: a task's quorum is the pool's random sample. Anchors
    /// are exempt, as with `partner_spread`. Costs a cold start's first decisions up to two
    /// hints of latency, and a job's last replicas may wait as long for their drawn worker.
    pub deal_partners: bool,
}

impl Default for TrustPolicy {
    fn default() -> Self {
        TrustPolicy {
            ban_min_invalid: 3,
            ban_score: 0.5,
            probation_score: 0.8,
            in_flight_per_slot: 128,
            trust_min_valid: 10,
            prefer_anchors: true,
            untrusted_extra: 0,
            unproven_in_flight: None,
            cap_counts_undecided: false,
            distinct_address_blocks: true,
            adaptive: None,
            seed: 0x5eed,
            new_in_flight: 8,
            in_flight_per_valid: 2,
            in_flight_per_loss: 2,
            partner_spread: 4,
            dispute_margin: 0,
            anchors_decide: false,
            anchors_decide_for_newcomers: false,
            cold_start_extra: 0,
            deal_partners: false,
        }
    }
}

/// Where a worker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// No work; its votes on undecided tasks do not count.
    Banned,
    /// One replica at a time.
    Probation,
    Good,
}

impl TrustPolicy {
    /// The plain fixed-quorum policy of the textbook analysis: no bans, no probation, no
    /// anchors, no address rule. For comparison only.
    pub fn fixed_quorum() -> TrustPolicy {
        TrustPolicy {
            ban_min_invalid: u64::MAX,
            probation_score: 0.0,
            trust_min_valid: u64::MAX,
            prefer_anchors: false,
            distinct_address_blocks: false,
            ..TrustPolicy::default()
        }
    }

    /// The policy for private pools (= `Default`): see the module doc.
    pub fn trusting() -> TrustPolicy {
        TrustPolicy::default()
    }

    /// What `coordinator serve` runs by default: safe for an open pool. [`hardened`]'s
    /// defences (ban at the first caught lie, one more agreeing replica without an anchor,
    /// votes awaiting a decision count against a prefetch of 2 per slot), plus: a contested
    /// result needs a lead of 2 over its rival ([`dispute_margin`]), which stops the cascade
    /// in which colluders that won a few early quorums get the honest dissenters banned; and
    /// newcomers may hold 2 replicas (not 1), which costs no safety in the saboteur
    /// simulation and gives honest newcomers both their slots. [`anchors_decide`] is left
    /// off: it stops a swarm of fresh identities from outvoting an established pool, but
    /// colluders that win the first quorums of a cold start become the anchors and then
    /// decide everything (a run over QUIC at 30% greedy colluders had 600 of 600 wrong).
    /// [`anchors_decide_for_newcomers`] is on: anchors decide only over identities that
    /// joined once the pool was established, which stops a swarm of them without handing a
    /// cold start's early winners the rest.
    ///
    /// [`hardened`]: TrustPolicy::hardened
    /// [`dispute_margin`]: TrustPolicy::dispute_margin
    /// [`anchors_decide`]: TrustPolicy::anchors_decide
    /// [`anchors_decide_for_newcomers`]: TrustPolicy::anchors_decide_for_newcomers
    pub fn open_pool() -> TrustPolicy {
        TrustPolicy {
            unproven_in_flight: Some(2),
            dispute_margin: 2,
            anchors_decide_for_newcomers: true,
            cold_start_extra: 1,
            deal_partners: true,
            ..TrustPolicy::hardened()
        }
    }

    /// For open pools facing saboteurs: a worker caught contradicting an accepted result is
    /// banned for good (and its undecided votes discounted); results agreed only by workers
    /// without a record need one more agreeing replica; newcomers hold one replica at a time
    /// until they are anchors; anchors come after 5 agreeing results; prefetch is 2 per slot,
    /// and votes on undecided tasks count against it.
    pub fn hardened() -> TrustPolicy {
        TrustPolicy {
            ban_min_invalid: 1,
            ban_score: f64::INFINITY,
            in_flight_per_slot: 2,
            trust_min_valid: 5,
            untrusted_extra: 1,
            unproven_in_flight: Some(1),
            cap_counts_undecided: true,
            ..TrustPolicy::default()
        }
    }

    pub fn standing(&self, rep: &Reputation) -> Standing {
        let score = rep.score();
        if rep.invalid >= self.ban_min_invalid && score < self.ban_score {
            Standing::Banned
        } else if rep.invalid > 0 && score < self.probation_score {
            Standing::Probation
        } else {
            Standing::Good
        }
    }

    pub fn is_banned(&self, rep: &Reputation) -> bool {
        self.standing(rep) == Standing::Banned
    }

    /// Whether this worker is an anchor: in good standing with a long enough run of agreeing
    /// results.
    pub fn is_trusted(&self, rep: &Reputation) -> bool {
        self.trust_min_valid != u64::MAX
            && rep.consecutive_valid >= self.trust_min_valid
            && self.standing(rep) == Standing::Good
    }

    /// Most replicas this worker may hold in flight (0 = banned from work), with no losses.
    pub fn in_flight_cap(&self, rep: &Reputation, slots: u32) -> u32 {
        self.allowance(rep, slots, 0)
    }

    /// Most replicas this worker may hold in flight (0 = banned from work), given its
    /// claimed `slots` and `losses` (replicas it lost that valid results have not yet made
    /// up for): what it earned by delivering, never more than its slots allow.
    pub fn allowance(&self, rep: &Reputation, slots: u32, losses: u64) -> u32 {
        let cap = match self.standing(rep) {
            Standing::Banned => return 0,
            Standing::Probation => return 1,
            Standing::Good => {
                let cap = slots.max(1).saturating_mul(self.in_flight_per_slot.max(1));
                match self.unproven_in_flight {
                    Some(u) if !self.is_trusted(rep) => cap.min(u.max(1)),
                    _ => cap,
                }
            }
        };
        let earned = u64::from(self.new_in_flight)
            .saturating_add(u64::from(self.in_flight_per_valid).saturating_mul(rep.valid));
        let owed = u64::from(self.in_flight_per_loss).saturating_mul(losses);
        let earned = earned.saturating_sub(owed).max(1);
        cap.min(u32::try_from(earned).unwrap_or(u32::MAX))
    }

    /// Replicas that must agree for this fresh task, given the worker its first replica goes
    /// to. The job's quorum unless adaptive replication trusts this worker and the task is
    /// not a spot check.
    #[allow(clippy::manual_is_multiple_of)] // is_multiple_of is newer than our MSRV (1.85)
    pub fn quorum_for(&self, job_quorum: u32, task: TaskId, first: &Reputation) -> u32 {
        match self.adaptive {
            Some(a)
                if job_quorum > 1
                    && first.consecutive_valid >= a.min_consecutive_valid
                    && self.standing(first) == Standing::Good =>
            {
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

/// A /24 IPv4 or /48 IPv6 network: workers in one are treated as one operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressBlock {
    V4([u8; 3]),
    V6([u16; 3]),
}

/// The block of a publicly routed address; `None` for addresses that say nothing about who
/// runs a worker (loopback, unspecified, private, link-local, CGNAT, unique-local,
/// multicast), so local and test setups where every worker shares one address still work.
/// An IPv4-mapped IPv6 address is judged as the IPv4 address.
pub fn address_block(addr: &SocketAddr) -> Option<AddressBlock> {
    match addr.ip() {
        IpAddr::V4(v4) => v4_block(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4_block(v4),
            None => v6_block(v6),
        },
    }
}

fn v4_block(ip: Ipv4Addr) -> Option<AddressBlock> {
    let o = ip.octets();
    let cgnat = o[0] == 100 && (o[1] & 0xc0) == 64;
    if ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || cgnat
    {
        return None;
    }
    Some(AddressBlock::V4([o[0], o[1], o[2]]))
}

fn v6_block(ip: Ipv6Addr) -> Option<AddressBlock> {
    let s = ip.segments();
    let unique_local = (s[0] & 0xfe00) == 0xfc00;
    let link_local = (s[0] & 0xffc0) == 0xfe80;
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || unique_local || link_local {
        return None;
    }
    Some(AddressBlock::V6([s[0], s[1], s[2]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tasks::JobId;

    #[test]
    fn repeated_disagreement_reduces_then_stops_work() {
        let p = TrustPolicy::default();
        let mut r = Reputation::default();
        assert_eq!(
            p.in_flight_cap(&r, 4),
            p.new_in_flight,
            "newcomers start small"
        );
        r.record_invalid();
        assert_eq!(p.in_flight_cap(&r, 4), 1, "probation after a wrong answer");
        r.record_invalid();
        r.record_invalid();
        assert_eq!(
            p.in_flight_cap(&r, 4),
            0,
            "banned after repeated wrong answers"
        );
        for _ in 0..1000 {
            r.record_valid();
        }
        assert_eq!(
            p.in_flight_cap(&r, 4),
            4 * p.in_flight_per_slot,
            "trust can be earned back"
        );
    }

    #[test]
    fn capacity_follows_delivered_results_not_claimed_slots() {
        let p = TrustPolicy::default();
        let mut r = Reputation::default();
        assert_eq!(p.allowance(&r, u32::MAX, 0), p.new_in_flight);
        for _ in 0..10 {
            r.record_valid();
        }
        assert_eq!(
            p.allowance(&r, u32::MAX, 0),
            p.new_in_flight + 10 * p.in_flight_per_valid
        );
        assert_eq!(
            p.allowance(&r, 1, 0),
            p.in_flight_per_slot.min(28),
            "slots still cap"
        );
        assert_eq!(
            p.allowance(&r, u32::MAX, 1_000),
            1,
            "losses shrink it to one"
        );
        let new = Reputation::default();
        assert_eq!(
            p.allowance(&new, 8, 4),
            1,
            "a newcomer losing 4 is down to one"
        );
    }

    #[test]
    fn adaptive_replication_trusts_with_spot_checks() {
        let p = TrustPolicy {
            adaptive: Some(Adaptive {
                min_consecutive_valid: 10,
                spot_check_one_in: 4,
            }),
            ..Default::default()
        };
        let new = Reputation::default();
        let trusted = Reputation {
            valid: 50,
            invalid: 0,
            consecutive_valid: 50,
        };
        let t = |i| TaskId {
            job: JobId(1),
            index: i,
        };
        assert!((0..100).all(|i| p.quorum_for(2, t(i), &new) == 2));
        let singles = (0..1000)
            .filter(|&i| p.quorum_for(2, t(i), &trusted) == 1)
            .count();
        assert!(
            (650..850).contains(&singles),
            "about 3 in 4 single: {singles}"
        );
        assert_eq!(
            TrustPolicy::default().quorum_for(2, t(0), &trusted),
            2,
            "off by default"
        );
    }

    #[test]
    fn hardened_policy_bans_at_the_first_caught_lie_and_trusts_after_a_run() {
        let p = TrustPolicy::hardened();
        let mut r = Reputation::default();
        assert_eq!(p.in_flight_cap(&r, 4), 1, "newcomers hold one replica");
        for _ in 0..5 {
            r.record_valid();
        }
        assert!(p.is_trusted(&r));
        assert_eq!(p.in_flight_cap(&r, 4), 8);
        r.record_invalid();
        assert!(p.is_banned(&r) && !p.is_trusted(&r));
        for _ in 0..100 {
            r.record_valid();
        }
        assert!(p.is_banned(&r), "a hardened ban is for good");
        assert!(!TrustPolicy::fixed_quorum().is_trusted(&Reputation {
            valid: 99,
            invalid: 0,
            consecutive_valid: 99
        }));
    }

    #[test]
    fn address_blocks_group_public_slash24_and_slash48_and_exempt_local_addresses() {
        let b = |s: &str| address_block(&s.parse().unwrap());
        assert_eq!(b("203.0.113.7:1"), b("203.0.113.200:9"));
        assert_ne!(b("203.0.113.7:1"), b("203.0.114.7:1"));
        assert_eq!(b("[::ffff:203.0.113.9]:1"), b("203.0.113.7:1"));
        assert_eq!(b("[2001:db8:1:2::1]:1"), b("[2001:db8:1:ffff::9]:1"));
        assert_ne!(b("[2001:db8:1::1]:1"), b("[2001:db8:2::1]:1"));
        for local in [
            "127.0.0.1:1",
            "0.0.0.0:1",
            "10.1.2.3:1",
            "192.168.1.1:1",
            "172.16.0.1:1",
            "100.64.0.1:1",
            "169.254.1.1:1",
            "[::1]:1",
            "[::]:1",
            "[fd00::1]:1",
            "[fe80::1]:1",
        ] {
            assert_eq!(b(local), None, "{local}");
        }
    }
}
