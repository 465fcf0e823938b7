//! What running one replica of a task produced, and how replicas are compared.
//!
//! Two honest workers with the same [`EngineFingerprint`] running the same task produce the
//! same [`RunResult`], so the same [`ResultDigest`]. The coordinator compares digests only;
//! it never sees or re-runs the computation.

use serde::{Deserialize, Serialize};

use crate::blob::BlobId;

/// How a replica ended. Every variant is a deterministic outcome of (module, input, args,
/// limits): a worker reports it; it is not an infrastructure failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// `_start` returned or called `proc_exit(0)`.
    Ok,
    /// `proc_exit(n)` with `n != 0`.
    Exit,
    /// A wasm trap (unreachable, out-of-bounds access, stack overflow, ...).
    Trap,
    /// The fuel budget ran out.
    OutOfFuel,
    /// The guest needed more memory than the job allows (a failed `memory.grow` that it
    /// treated as fatal, or a trap after one).
    MemoryLimit,
    /// The guest wrote more than `max_output` bytes to stdout.
    OutputLimit,
    /// The module failed to compile, link, or has no `_start`.
    InvalidModule,
}

impl Status {
    /// The lower-case name used in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Exit => "exit",
            Status::Trap => "trap",
            Status::OutOfFuel => "out_of_fuel",
            Status::MemoryLimit => "memory_limit",
            Status::OutputLimit => "output_limit",
            Status::InvalidModule => "invalid_module",
        }
    }

    fn code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Exit => 1,
            Status::Trap => 2,
            Status::OutOfFuel => 3,
            Status::MemoryLimit => 4,
            Status::OutputLimit => 5,
            Status::InvalidModule => 6,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The deterministic outcome of one replica: everything that goes into its digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RunResult {
    pub status: Status,
    /// The guest's exit code (0 for `ok`, the `proc_exit` value for `exit`, 0 otherwise).
    pub exit_code: i32,
    /// For `trap`: the trap kind (e.g. `unreachable`, `stack overflow`); empty otherwise.
    pub trap: String,
    /// Fuel consumed; deterministic, so it is also the unit of credit.
    pub fuel_used: u64,
    /// blake3 of the stdout bytes (the output blob's id).
    pub output_hash: BlobId,
    pub output_len: u64,
}

impl RunResult {
    /// blake3 over (status, exit code, trap kind, fuel consumed, output hash, output length),
    /// domain-separated. Hashing the output's hash is equivalent to hashing the output bytes.
    pub fn digest(&self) -> ResultDigest {
        let mut h = blake3::Hasher::new_derive_key("peergrid 2026 result digest v1");
        h.update(&[self.status.code()]);
        h.update(&self.exit_code.to_le_bytes());
        h.update(&(self.trap.len() as u64).to_le_bytes());
        h.update(self.trap.as_bytes());
        h.update(&self.fuel_used.to_le_bytes());
        h.update(self.output_hash.as_bytes());
        h.update(&self.output_len.to_le_bytes());
        ResultDigest(*h.finalize().as_bytes())
    }

    /// The digest of a replica of a *checkpointing* job (its module imports the checkpoint
    /// API, [`crate::module`]): like [`digest`](Self::digest) without the fuel, which depends
    /// on where the run was interrupted and resumed. Domain-separated from `digest`, so the
    /// two never collide. Everything else (status, exit code, trap, output) must agree.
    pub fn digest_without_fuel(&self) -> ResultDigest {
        let mut h = blake3::Hasher::new_derive_key("peergrid 2026 result digest without fuel v1");
        h.update(&[self.status.code()]);
        h.update(&self.exit_code.to_le_bytes());
        h.update(&(self.trap.len() as u64).to_le_bytes());
        h.update(self.trap.as_bytes());
        h.update(self.output_hash.as_bytes());
        h.update(&self.output_len.to_le_bytes());
        ResultDigest(*h.finalize().as_bytes())
    }

    /// Credit earned by an accepted replica: fuel in units of 10^9 instructions.
    pub fn credit(&self) -> f64 {
        self.fuel_used as f64 / 1e9
    }
}

/// The digest replicas are compared by.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ResultDigest(pub [u8; 32]);

impl std::fmt::Display for ResultDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for ResultDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ResultDigest({})", &hex::encode(self.0)[..12])
    }
}

/// What determines a worker's results beyond the task itself: results are only compared
/// between workers of one class ([`EngineFingerprint::class_id`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EngineFingerprint {
    /// e.g. `wasmtime 38.0.4`
    pub engine: String,
    /// e.g. `x86_64-linux`
    pub arch: String,
    /// The determinism settings, as a stable string (e.g. `nan-canon,relaxed-simd-det,...`).
    pub settings: String,
}

impl EngineFingerprint {
    /// A short stable id (first 16 hex digits of blake3 of the fields), for logs and keys.
    pub fn short_id(&self) -> String {
        let mut h = blake3::Hasher::new();
        for part in [&self.engine, &self.arch, &self.settings] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(&h.finalize().as_bytes()[..8])
    }

    /// Settings under which results are identical on every architecture: NaN bit patterns
    /// canonicalized and relaxed SIMD deterministic (the sandbox's default).
    pub fn portable(&self) -> bool {
        let has = |s: &str| self.settings.split(',').any(|x| x == s);
        has("nan-canon") && has("relaxed-simd-det")
    }

    /// The class whose results are compared with each other: engine and settings, and the
    /// architecture only when the settings are not [`portable`](Self::portable). So a worker
    /// cannot keep out of comparison with the others by claiming another architecture.
    pub fn class_id(&self) -> String {
        if !self.portable() {
            return self.short_id();
        }
        let mut h = blake3::Hasher::new();
        for part in [&self.engine, "*any-arch*", &self.settings] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(&h.finalize().as_bytes()[..8])
    }

    /// Results of the two are compared: same [`class_id`](Self::class_id).
    pub fn compatible(&self, other: &EngineFingerprint) -> bool {
        self.class_id() == other.class_id()
    }
}

impl std::fmt::Display for EngineFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} [{}]", self.engine, self.arch, self.settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RunResult {
        RunResult {
            status: Status::Ok,
            exit_code: 0,
            trap: String::new(),
            fuel_used: 1234,
            output_hash: BlobId::of(b"42\n"),
            output_len: 3,
        }
    }

    #[test]
    fn digest_changes_with_every_field() {
        let base = sample();
        let d = base.digest();
        let mut r = base.clone();
        r.fuel_used += 1;
        assert_ne!(r.digest(), d);
        let mut r = base.clone();
        r.status = Status::Exit;
        assert_ne!(r.digest(), d);
        let mut r = base.clone();
        r.exit_code = 1;
        assert_ne!(r.digest(), d);
        let mut r = base.clone();
        r.output_hash = BlobId::of(b"43\n");
        assert_ne!(r.digest(), d);
        let mut r = base.clone();
        r.trap = "unreachable".into();
        assert_ne!(r.digest(), d);
        assert_eq!(base.digest(), sample().digest());
    }

    #[test]
    fn digest_without_fuel_ignores_only_fuel() {
        let base = sample();
        let d = base.digest_without_fuel();
        assert_ne!(d, base.digest(), "domain-separated");
        let mut r = base.clone();
        r.fuel_used += 1000;
        assert_eq!(r.digest_without_fuel(), d);
        let mut r = base.clone();
        r.output_hash = BlobId::of(b"43\n");
        assert_ne!(r.digest_without_fuel(), d);
        let mut r = base.clone();
        r.status = Status::OutOfFuel;
        assert_ne!(r.digest_without_fuel(), d);
        let mut r = base.clone();
        r.exit_code = 3;
        assert_ne!(r.digest_without_fuel(), d);
    }

    #[test]
    fn status_names_match_json() {
        for s in [
            Status::Ok,
            Status::Exit,
            Status::Trap,
            Status::OutOfFuel,
            Status::MemoryLimit,
            Status::OutputLimit,
            Status::InvalidModule,
        ] {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
    }
}
