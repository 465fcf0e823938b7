//! `coordinator serve --config FILE`: the scheduler and trust policy, in TOML.
//!
//! Every key is optional; what is not set keeps the value of the chosen preset (or of the
//! scheduler's defaults). Unknown keys are errors, so a typo never silently keeps a default.
//!
//! ```toml
//! store = "postgres://peergrid@db.example/peergrid" # or "sqlite" (the default); --store wins
//!
//! [policy]
//! preset = "open"            # open (default) | trusting | hardened | fixed-quorum
//! in_flight_per_slot = 2     # any field of core::trust::TrustPolicy overrides the preset
//! dispute_margin = 2
//!
//! [scheduler]
//! disconnect_grace_secs = 60 # a disconnected worker's replicas are reissued after this
//! retry_after_ms = 2000      # hint sent with an empty batch of work
//! max_peers = 4              # blob sources listed per assignment, besides the coordinator
//!
//! [engines]
//! allow = ["wasmtime 48.0.8"] # default: this release's engine (tasks::release::ENGINE)
//! native_archs = ["x86_64-linux isa=x86-64-v2"] # default: the coordinator's own
//!
//! [ha]                       # several coordinators on one PostgreSQL store (crate::ha)
//! lease_secs = 4             # a leader silent this long is replaced by a standby
//! ```
//!
//! `seed` (of the partner-replica and spot-check draws) is drawn at random at every start
//! unless set: an attacker must not be able to predict who gets a task's next replica.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::core::trust::{Adaptive, TrustPolicy};
use crate::core::CoreConfig;

/// A trust policy preset (see [`crate::core::trust`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Anyone may join: assumes some workers lie and collude (the default).
    Open,
    /// A private pool of your own machines: no extra replicas, deep prefetch.
    Trusting,
    /// Open, without the dispute margin and with newcomers at one replica (slower).
    Hardened,
    /// The textbook fixed quorum, for comparison only.
    FixedQuorum,
}

impl Preset {
    pub fn policy(self) -> TrustPolicy {
        match self {
            Preset::Open => TrustPolicy::open_pool(),
            Preset::Trusting => TrustPolicy::trusting(),
            Preset::Hardened => TrustPolicy::hardened(),
            Preset::FixedQuorum => TrustPolicy::fixed_quorum(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::Open => "open",
            Preset::Trusting => "trusting",
            Preset::Hardened => "hardened",
            Preset::FixedQuorum => "fixed-quorum",
        }
    }
}

/// The file's contents.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Where the durable state lives: `sqlite` (`DATA_DIR/coordinator.db`, the default) or a
    /// `postgres://` URL (see [`crate::store::StoreUrl`]). `serve --store` overrides it.
    pub store: Option<String>,
    #[serde(default)]
    pub policy: PolicySection,
    #[serde(default)]
    pub scheduler: SchedulerSection,
    #[serde(default)]
    pub engines: EnginesSection,
    #[serde(default)]
    pub ha: HaSection,
}

/// `[ha]`: the leader lease of coordinators sharing a PostgreSQL store ([`crate::ha`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaSection {
    /// A leader that has not renewed its lease for this long (seconds, 1 to 60; default 4)
    /// is replaced by a standby. Shorter fails over sooner; a leader stalled longer than
    /// this (e.g. a swapping machine) loses the lead and exits.
    pub lease_secs: Option<f64>,
}

impl HaSection {
    /// The lease timing: renewed every quarter of the lease, checked by standbys every
    /// sixteenth (at most every 250 ms).
    pub fn lease(&self) -> anyhow::Result<crate::ha::LeaseConfig> {
        let mut c = crate::ha::LeaseConfig::default();
        if let Some(secs) = self.lease_secs {
            if !(1.0..=60.0).contains(&secs) {
                bail!("ha.lease_secs must be 1 to 60 seconds (got {secs})");
            }
            c.ttl = std::time::Duration::from_secs_f64(secs);
            c.renew = c.ttl / 4;
            c.poll = (c.ttl / 16).min(std::time::Duration::from_millis(250));
        }
        Ok(c)
    }
}

/// `[engines]`: which workers' engines may join. Default: this release's
/// ([`tasks::release::ENGINE`]), with its settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnginesSection {
    /// Engine names (`wasmtime X.Y.Z`, as worker fingerprints name them), e.g. to run two
    /// releases' workers side by side during an upgrade.
    pub allow: Option<Vec<String>>,
    /// Accept any engine a worker claims. Colluders that invent an engine are then compared
    /// only with each other: for closed pools and tests only. Also admits any architecture
    /// to the native class (unless `native_archs` is set).
    pub any: Option<bool>,
    /// Architectures (fingerprint `arch`) whose workers run `native`-class jobs; default the
    /// coordinator's own ([`tasks::release::native_arch`]). Native results are compared only
    /// within one architecture, so each one named is a class of its own: name another only
    /// when enough honest workers of it join (colluders claiming a rare architecture are
    /// compared mostly with each other). Workers of other architectures run portable jobs.
    pub native_archs: Option<Vec<String>>,
}

/// `[scheduler]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSection {
    pub disconnect_grace_secs: Option<u64>,
    pub retry_after_ms: Option<u64>,
    pub max_peers: Option<usize>,
    pub open_scan_limit: Option<usize>,
    pub bad_peer_accusers: Option<usize>,
    pub central_only: Option<bool>,
}

/// `[policy]`: a preset and overrides of [`TrustPolicy`]'s fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    pub preset: Option<Preset>,
    pub ban_min_invalid: Option<u64>,
    pub ban_score: Option<f64>,
    pub probation_score: Option<f64>,
    pub in_flight_per_slot: Option<u32>,
    pub trust_min_valid: Option<u64>,
    pub prefer_anchors: Option<bool>,
    pub untrusted_extra: Option<u32>,
    /// 0 = no separate cap for workers that are not anchors yet.
    pub unproven_in_flight: Option<u32>,
    pub cap_counts_undecided: Option<bool>,
    pub distinct_address_blocks: Option<bool>,
    pub seed: Option<u64>,
    pub new_in_flight: Option<u32>,
    pub in_flight_per_valid: Option<u32>,
    pub in_flight_per_loss: Option<u32>,
    pub partner_spread: Option<u32>,
    pub dispute_margin: Option<u32>,
    pub anchors_decide: Option<bool>,
    pub anchors_decide_for_newcomers: Option<bool>,
    pub cold_start_extra: Option<u32>,
    pub deal_partners: Option<bool>,
    /// Adaptive replication: `{ min_consecutive_valid = 20, spot_check_one_in = 10 }`.
    pub adaptive: Option<AdaptiveSection>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveSection {
    pub min_consecutive_valid: u64,
    pub spot_check_one_in: u64,
}

/// What `serve` runs with: the core's configuration and the name of the preset it started
/// from (for the log).
#[derive(Debug, Clone)]
pub struct Effective {
    pub core: CoreConfig,
    pub preset: Preset,
    /// The seed was set in the file (otherwise drawn at random).
    pub fixed_seed: bool,
    /// The file's `store` (SQLite when unset).
    pub store: crate::store::StoreUrl,
    /// `[ha]`'s lease timing.
    pub ha: crate::ha::LeaseConfig,
}

impl ConfigFile {
    /// Read and check `path`. Errors name the file and the key.
    pub fn load(path: &Path) -> anyhow::Result<ConfigFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<ConfigFile> {
        let f: ConfigFile = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end().replace('\n', " ")))?;
        Ok(f)
    }

    /// The store `serve` uses: `flag` (`--store`) wins over the file's `store`; neither means
    /// SQLite in the data dir.
    pub fn store(&self, flag: Option<&str>) -> anyhow::Result<crate::store::StoreUrl> {
        match flag.or(self.store.as_deref()) {
            None => Ok(crate::store::StoreUrl::Sqlite),
            Some(s) => s.parse().map_err(|e: String| {
                anyhow::anyhow!(
                    "{}{e}",
                    if flag.is_some() {
                        "--store: "
                    } else {
                        "store: "
                    }
                )
            }),
        }
    }

    /// The configuration `serve` runs: `preset` (from `--policy`) wins over the file's, the
    /// file's keys over the preset's values. Every number is checked against a sane range.
    pub fn effective(&self, preset: Option<Preset>) -> anyhow::Result<Effective> {
        let preset = preset.or(self.policy.preset).unwrap_or(Preset::Open);
        let mut core = CoreConfig {
            policy: preset.policy(),
            ..CoreConfig::default()
        };
        let s = &self.scheduler;
        if let Some(v) = s.disconnect_grace_secs {
            core.disconnect_grace_ms =
                range("scheduler.disconnect_grace_secs", v, 1, 7 * 86_400)? * 1000;
        }
        if let Some(v) = s.retry_after_ms {
            core.retry_after_ms = range("scheduler.retry_after_ms", v, 10, 600_000)?;
        }
        if let Some(v) = s.max_peers {
            core.max_peers = range("scheduler.max_peers", v as u64, 0, 64)? as usize;
        }
        if let Some(v) = s.open_scan_limit {
            core.open_scan_limit =
                range("scheduler.open_scan_limit", v as u64, 1, 1_000_000)? as usize;
        }
        if let Some(v) = s.bad_peer_accusers {
            core.bad_peer_accusers =
                range("scheduler.bad_peer_accusers", v as u64, 1, 64)? as usize;
        }
        if let Some(v) = s.central_only {
            core.central_only = v;
        }
        let p = &self.policy;
        let pol = &mut core.policy;
        if let Some(v) = p.ban_min_invalid {
            pol.ban_min_invalid = range("policy.ban_min_invalid", v, 1, u64::MAX)?;
        }
        if let Some(v) = p.ban_score {
            pol.ban_score = score("policy.ban_score", v, true)?;
        }
        if let Some(v) = p.probation_score {
            pol.probation_score = score("policy.probation_score", v, false)?;
        }
        if let Some(v) = p.in_flight_per_slot {
            pol.in_flight_per_slot = range("policy.in_flight_per_slot", v.into(), 1, 4096)? as u32;
        }
        if let Some(v) = p.trust_min_valid {
            pol.trust_min_valid = range("policy.trust_min_valid", v, 1, u64::MAX)?;
        }
        if let Some(v) = p.prefer_anchors {
            pol.prefer_anchors = v;
        }
        if let Some(v) = p.untrusted_extra {
            pol.untrusted_extra = range("policy.untrusted_extra", v.into(), 0, 16)? as u32;
        }
        if let Some(v) = p.unproven_in_flight {
            pol.unproven_in_flight = match range("policy.unproven_in_flight", v.into(), 0, 4096)? {
                0 => None,
                n => Some(n as u32),
            };
        }
        if let Some(v) = p.cap_counts_undecided {
            pol.cap_counts_undecided = v;
        }
        if let Some(v) = p.distinct_address_blocks {
            pol.distinct_address_blocks = v;
        }
        if let Some(v) = p.new_in_flight {
            pol.new_in_flight = range("policy.new_in_flight", v.into(), 1, 4096)? as u32;
        }
        if let Some(v) = p.in_flight_per_valid {
            pol.in_flight_per_valid =
                range("policy.in_flight_per_valid", v.into(), 0, 4096)? as u32;
        }
        if let Some(v) = p.in_flight_per_loss {
            pol.in_flight_per_loss = range("policy.in_flight_per_loss", v.into(), 0, 4096)? as u32;
        }
        if let Some(v) = p.partner_spread {
            pol.partner_spread = range("policy.partner_spread", v.into(), 0, 1024)? as u32;
        }
        if let Some(v) = p.dispute_margin {
            pol.dispute_margin = range("policy.dispute_margin", v.into(), 0, 16)? as u32;
        }
        if let Some(v) = p.anchors_decide {
            pol.anchors_decide = v;
        }
        if let Some(v) = p.anchors_decide_for_newcomers {
            pol.anchors_decide_for_newcomers = v;
        }
        if let Some(v) = p.cold_start_extra {
            pol.cold_start_extra = range("policy.cold_start_extra", v.into(), 0, 16)? as u32;
        }
        if let Some(v) = p.deal_partners {
            pol.deal_partners = v;
        }
        if let Some(a) = p.adaptive {
            pol.adaptive = Some(Adaptive {
                min_consecutive_valid: range(
                    "policy.adaptive.min_consecutive_valid",
                    a.min_consecutive_valid,
                    1,
                    u64::MAX,
                )?,
                spot_check_one_in: range(
                    "policy.adaptive.spot_check_one_in",
                    a.spot_check_one_in,
                    1,
                    1_000_000,
                )?,
            });
        }
        let e = &self.engines;
        core.engines = match (e.any, &e.allow) {
            (Some(true), Some(_)) => {
                bail!("engines: set either any = true or allow = [...], not both")
            }
            (Some(true), None) => None,
            (_, Some(list)) => {
                let bad = |n: &String| n.is_empty() || n.len() > tasks::limits::MAX_HELLO_TEXT;
                if list.is_empty() || list.len() > 64 || list.iter().any(bad) {
                    bail!(
                        "engines.allow must name 1 to 64 engines like {:?}",
                        tasks::release::ENGINE
                    );
                }
                Some(list.clone())
            }
            (_, None) => Some(vec![tasks::release::ENGINE.to_string()]),
        };
        core.native_archs = match (e.any, &e.native_archs) {
            (_, Some(list)) => {
                let bad = |n: &String| n.is_empty() || n.len() > tasks::limits::MAX_HELLO_TEXT;
                if list.is_empty() || list.len() > 16 || list.iter().any(bad) {
                    bail!(
                        "engines.native_archs must name 1 to 16 architectures like {:?}",
                        tasks::release::native_arch()
                    );
                }
                Some(list.clone())
            }
            (Some(true), None) => None,
            (_, None) => Some(vec![tasks::release::native_arch()]),
        };
        pol.seed = match p.seed {
            Some(s) => s,
            None => rand::random(),
        };
        Ok(Effective {
            core,
            preset,
            fixed_seed: p.seed.is_some(),
            store: self.store(None)?,
            ha: self.ha.lease()?,
        })
    }
}

fn range(key: &str, v: u64, lo: u64, hi: u64) -> anyhow::Result<u64> {
    if v < lo || v > hi {
        bail!("{key} = {v} is out of range: use {lo} to {hi}");
    }
    Ok(v)
}

/// An agreement-score threshold: 0 to 1 (`inf` allowed where it means "always").
fn score(key: &str, v: f64, inf_ok: bool) -> anyhow::Result<f64> {
    if v.is_nan() || v < 0.0 || (v > 1.0 && !(inf_ok && v.is_infinite())) {
        let also = if inf_ok {
            " (or inf: any caught lie counts)"
        } else {
            ""
        };
        bail!("{key} = {v} is out of range: use 0 to 1{also}");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_open_pool_policy_with_a_random_seed() {
        let f = ConfigFile::parse("").unwrap();
        let a = f.effective(None).unwrap();
        let b = f.effective(None).unwrap();
        assert_eq!(a.preset, Preset::Open);
        let open = TrustPolicy::open_pool();
        assert_eq!(
            TrustPolicy {
                seed: open.seed,
                ..a.core.policy.clone()
            },
            open
        );
        assert_ne!(
            a.core.policy.seed, b.core.policy.seed,
            "seed drawn per start"
        );
        assert!(!a.fixed_seed);
        assert_eq!(
            a.core.engines,
            Some(vec![tasks::release::ENGINE.to_string()])
        );
        assert_eq!(
            a.core.native_archs,
            Some(vec![tasks::release::native_arch()])
        );
        let any = ConfigFile::parse("[engines]\nany = true\n").unwrap();
        assert_eq!(any.effective(None).unwrap().core.engines, None);
        assert_eq!(any.effective(None).unwrap().core.native_archs, None);
        let archs = ConfigFile::parse(
            "[engines]\nnative_archs = [\"x86_64-linux isa=x86-64-v2\", \"aarch64-linux isa=armv8.0-a\"]\n",
        )
        .unwrap();
        assert_eq!(
            archs
                .effective(None)
                .unwrap()
                .core
                .native_archs
                .map(|v| v.len()),
            Some(2)
        );
        assert!(ConfigFile::parse("[engines]\nnative_archs = []\n")
            .unwrap()
            .effective(None)
            .is_err());
        let two =
            ConfigFile::parse("[engines]\nallow = [\"wasmtime 37.0.0\", \"wasmtime 38.0.4\"]\n")
                .unwrap();
        assert_eq!(
            two.effective(None).unwrap().core.engines.map(|v| v.len()),
            Some(2)
        );
    }

    #[test]
    fn keys_override_the_preset_and_the_command_line_overrides_the_file() {
        let f = ConfigFile::parse(
            "[policy]\npreset = \"hardened\"\ndispute_margin = 3\nseed = 7\nunproven_in_flight = 0\n\
             [scheduler]\ndisconnect_grace_secs = 5\nmax_peers = 8\n",
        )
        .unwrap();
        let e = f.effective(None).unwrap();
        assert_eq!(e.preset, Preset::Hardened);
        assert_eq!(e.core.policy.dispute_margin, 3);
        assert_eq!(e.core.policy.seed, 7);
        assert_eq!(e.core.policy.unproven_in_flight, None);
        assert_eq!(
            e.core.policy.ban_min_invalid,
            TrustPolicy::hardened().ban_min_invalid
        );
        assert_eq!(e.core.disconnect_grace_ms, 5000);
        assert_eq!(e.core.max_peers, 8);
        let e = f.effective(Some(Preset::Trusting)).unwrap();
        assert_eq!(e.preset, Preset::Trusting);
        assert_eq!(e.core.policy.dispute_margin, 3, "file keys still apply");
        assert_eq!(
            e.core.policy.in_flight_per_slot,
            TrustPolicy::trusting().in_flight_per_slot
        );
    }

    #[test]
    fn the_store_flag_wins_over_the_file_and_unknown_stores_are_one_line_errors() {
        use crate::store::StoreUrl;
        let none = ConfigFile::parse("").unwrap();
        assert_eq!(none.store(None).unwrap(), StoreUrl::Sqlite);
        let f = ConfigFile::parse("store = \"postgres://u:pw@db/grid\"\n").unwrap();
        assert_eq!(
            f.effective(None).unwrap().store,
            StoreUrl::Postgres("postgres://u:pw@db/grid".into())
        );
        assert_eq!(f.store(Some("sqlite")).unwrap(), StoreUrl::Sqlite);
        let e = f.store(Some("mongodb://u:pw@x/y")).unwrap_err().to_string();
        assert!(
            e.starts_with("--store: unknown store") && !e.contains("pw") && !e.contains('\n'),
            "{e}"
        );
        let e = ConfigFile::parse("store = \"redis://x\"\n")
            .unwrap()
            .effective(None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("store: unknown store"), "{e}");
    }

    #[test]
    fn typos_wrong_types_and_absurd_numbers_are_one_line_errors_naming_the_key() {
        let err = |t: &str| {
            ConfigFile::parse(t)
                .and_then(|f| f.effective(None).map(|_| ()))
                .unwrap_err()
                .to_string()
        };
        let e = err("[policy]\nin_flight_per_slott = 2\n");
        assert!(e.contains("in_flight_per_slott"), "{e}");
        let e = err("[policy]\npreset = \"paranoid\"\n");
        assert!(e.contains("paranoid"), "{e}");
        let e = err("[policy]\nin_flight_per_slot = 4294967295\n");
        assert!(
            e.contains("policy.in_flight_per_slot") && e.contains("1 to 4096"),
            "{e}"
        );
        let e = err("[scheduler]\ndisconnect_grace_secs = 0\n");
        assert!(e.contains("scheduler.disconnect_grace_secs"), "{e}");
        let e = err("[policy]\nban_score = nan\n");
        assert!(e.contains("policy.ban_score"), "{e}");
        let e = err("[policy]\nin_flight_per_slot = -1\n");
        assert!(!e.contains('\n'), "one line: {e}");
        for e in [err("[nope]\n"), err("policy = 3\n")] {
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }
}
