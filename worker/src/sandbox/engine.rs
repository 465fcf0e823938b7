//! The wasmtime engine configuration and the fingerprint that names it.
//!
//! Every setting that can change a result is fixed here and listed in the fingerprint's
//! `settings`, so two workers compare results only when they would compute them alike.

use tasks::EngineFingerprint;
use wasmtime::{Config, Engine, OptLevel};

use super::SandboxError;

/// The wasmtime this worker is built with (kept in step with Cargo.lock): this release's
/// engine as coordinators know it.
pub use tasks::release::ENGINE;

/// Maximum wasm stack: fixed, so where unbounded recursion overflows is deterministic.
pub use tasks::release::MAX_WASM_STACK;

/// Fuel a guest burns between two yields to its run's thread, where pause, cancel and the
/// CPU duty cycle act (`RunControl`). Fuel is then the only check compiled into the guest:
/// each loop header pays one check and one cold call, not two (the epoch check beside it
/// added 0-8% on the C kernels of examples/kernels). 2^22 (~4.2 million): those kernels burn
/// 7-16 billion fuel per second here (locals and constants cost fuel but no instruction), so
/// they yield every 0.3-0.6 ms, which costs nothing measurable (a fiber switch and a few
/// atomic loads); a guest as slow as 40 million per second (a loop of cache-missing loads)
/// still yields every ~100 ms. Where a guest yields never changes what it computes or the
/// fuel it is charged: the interval only splits the same budget (wasmtime refuels from the
/// rest of it at each yield, and traps `out_of_fuel` where a single budget would).
pub const YIELD_FUEL: u64 = 1 << 22;

/// The fixed ISA baseline this worker compiles for on its architecture: what Cranelift may
/// assume of the CPU, whatever CPU the worker runs on. With it, the machine code of a module is
/// byte-identical on every host of the architecture (proved by `tests/isa_baseline.rs`), so
/// NaN bit patterns, which depend only on the instructions executed, are too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsaBaseline {
    /// The name the fingerprint carries (`isa=<name>` in its `arch`).
    pub name: &'static str,
    /// Cranelift ISA flags turned on.
    pub enabled: &'static [&'static str],
    /// Cranelift ISA flags explicitly turned off (so a newer default cannot slip in).
    pub disabled: &'static [&'static str],
    /// The CPU features the host must have, as the standard library names them.
    pub requires: &'static [&'static str],
}

/// x86_64: x86-64-v2 (SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, CMPXCHG16B). Wasm SIMD is 128-bit,
/// and SSE4.1 is what Cranelift needs to lower nearly all of it to single instructions
/// (without it, many lane operations fall back to longer sequences); AVX/AVX2 (v3) would
/// only add VEX encodings of the same 128-bit operations, and would shut out the volunteer
/// machines without AVX (Atom, and Pentium/Celeron parts sold until ~2020). Every x86_64 CPU
/// since 2009 has v2.
#[cfg(target_arch = "x86_64")]
pub const BASELINE: IsaBaseline = IsaBaseline {
    name: "x86-64-v2",
    enabled: &[
        "has_sse3",
        "has_ssse3",
        "has_cmpxchg16b",
        "has_sse41",
        "has_sse42",
        "has_popcnt",
    ],
    disabled: &[
        "has_avx",
        "has_avx2",
        "has_fma",
        "has_avx_vnni",
        "has_avx512bitalg",
        "has_avx512dq",
        "has_avx512vl",
        "has_avx512vbmi",
        "has_avx512f",
        "has_avx512vnni",
        "has_bmi1",
        "has_bmi2",
        "has_lzcnt",
    ],
    requires: &["sse3", "ssse3", "cmpxchg16b", "sse4.1", "sse4.2", "popcnt"],
};

/// aarch64: ARMv8.0-A with its mandatory Advanced SIMD (NEON), which wasm SIMD maps onto
/// directly, and none of the optional extensions (LSE atomics are unused without wasm
/// threads; FP16, dot product and i8mm only serve relaxed-SIMD lowerings that determinism
/// rules out), so every 64-bit ARM (Raspberry Pi 3 and later, Apple silicon, Graviton)
/// qualifies. Untested here (no aarch64 machine).
#[cfg(target_arch = "aarch64")]
pub const BASELINE: IsaBaseline = IsaBaseline {
    name: "armv8.0-a",
    enabled: &[],
    disabled: &[
        "has_lse",
        "has_pauth",
        "has_fp16",
        "has_dotprod",
        "has_i8mm",
        "sign_return_address",
        "sign_return_address_all",
        "use_bti",
    ],
    requires: &[],
};

/// Other architectures: no baseline is defined, so the worker refuses to start.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub const BASELINE: IsaBaseline = IsaBaseline {
    name: "undefined",
    enabled: &[],
    disabled: &[],
    requires: &["a Peergrid ISA baseline for this architecture"],
};

impl IsaBaseline {
    /// The first required CPU feature this host lacks, if any.
    pub fn missing_on_host(&self) -> Option<&'static str> {
        self.requires.iter().copied().find(|f| !host_has(f))
    }
}

fn host_has(feature: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match feature {
            "sse3" => std::is_x86_feature_detected!("sse3"),
            "ssse3" => std::is_x86_feature_detected!("ssse3"),
            "cmpxchg16b" => std::is_x86_feature_detected!("cmpxchg16b"),
            "sse4.1" => std::is_x86_feature_detected!("sse4.1"),
            "sse4.2" => std::is_x86_feature_detected!("sse4.2"),
            "popcnt" => std::is_x86_feature_detected!("popcnt"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        false
    }
}

/// What Cranelift compiles for: the fixed [`BASELINE`] (what workers run), or the features
/// wasmtime detects on this CPU (only to show that detection changes the code: the proof
/// test and the benchmark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Baseline,
    HostDetected,
}

/// The fingerprint's `arch`: architecture, OS and the ISA the code is compiled for. Results
/// of the portable settings are compared across architectures (their class ignores `arch`);
/// the others only within one `arch`, so within one baseline.
pub fn arch(isa: Isa) -> String {
    let isa = match isa {
        Isa::Baseline => BASELINE.name,
        Isa::HostDetected => "host-detected",
    };
    format!(
        "{}-{} isa={isa}",
        std::env::consts::ARCH,
        std::env::consts::OS
    )
}

/// Build the engine. `deterministic = false` only turns NaN canonicalization off.
/// Compiles for the fixed [`BASELINE`]; refuses (one clear line) on a CPU that lacks it.
pub fn build(deterministic: bool) -> Result<(Engine, EngineFingerprint), SandboxError> {
    build_for(deterministic, Isa::Baseline)
}

/// [`build`], choosing what Cranelift compiles for. Everything that can change the machine
/// code is fixed in [`config`] and named in the fingerprint: the wasmtime release (`engine`),
/// the target and ISA (`arch`), and the code generation settings (`settings`: NaN
/// canonicalization, relaxed SIMD, fuel and no epoch checks, stack). `opt_level` is fixed
/// at `speed`; wasmtime's remaining defaults are the same on every worker of a release.
pub fn build_for(
    deterministic: bool,
    isa: Isa,
) -> Result<(Engine, EngineFingerprint), SandboxError> {
    let c = config(deterministic, isa)?;
    let engine = Engine::new(&c).map_err(|e| SandboxError::Engine(format!("{e:#}")))?;
    let fingerprint = EngineFingerprint {
        engine: ENGINE.to_string(),
        arch: arch(isa),
        settings: settings(deterministic),
    };
    Ok((engine, fingerprint))
}

/// The wasmtime configuration of [`build_for`] (public so tests can vary what must not
/// matter, such as the allocator, and show the code stays the same).
pub fn config(deterministic: bool, isa: Isa) -> Result<Config, SandboxError> {
    let mut c = Config::new();
    if isa == Isa::Baseline {
        if let Some(f) = BASELINE.missing_on_host() {
            return Err(SandboxError::Engine(format!(
                "this CPU lacks {f}, part of the {} baseline every {} worker compiles for (so that all compute bit-identical results): this machine cannot run Peergrid tasks",
                BASELINE.name,
                std::env::consts::ARCH
            )));
        }
        // An explicit target turns off wasmtime's host feature detection: Cranelift starts
        // from no optional feature at all and gets exactly the baseline's.
        c.target(&target_lexicon::HOST.to_string())
            .map_err(|e| SandboxError::Engine(format!("{e:#}")))?;
        // SAFETY: every flag enabled is a feature the host was just checked to have (and
        // wasmtime checks again before it runs code); flags turned off are always safe.
        unsafe {
            for f in BASELINE.enabled {
                c.cranelift_flag_enable(f);
            }
            for f in BASELINE.disabled {
                c.cranelift_flag_set(f, "false");
            }
        }
    }
    // Budget by instructions, not time: fuel is deterministic. Wasmtime 48's default costs:
    // 1 per operator, plus 1 per byte or element for `memory.fill/copy/init` and
    // `table.fill/copy/init/grow` (38 charged those 1 each). Fuel is also how a running
    // guest is interrupted (it yields every `YIELD_FUEL`, see `run`): no epoch checks,
    // which would add a second check and call on every loop header. That changes the
    // machine code (and so, for instance, the frame sizes that decide where a recursion
    // overflows the stack), so it is named in the fingerprint (`no-epoch`).
    c.consume_fuel(true);
    c.epoch_interruption(false);
    c.cranelift_nan_canonicalization(deterministic);
    c.wasm_relaxed_simd(true);
    c.relaxed_simd_deterministic(true);
    c.wasm_threads(false);
    // Its heap is a second memory, which the one-memory limiter (`run::Limits`) does not
    // account for; no wasm32-wasip1 toolchain emits it.
    c.wasm_gc(false);
    // Exception objects live in that GC heap. Wasmtime 48 turns exceptions and typed function
    // references on by default (38 had both off): off, so the modules we accept stay the same.
    c.wasm_exceptions(false);
    c.wasm_function_references(false);
    c.max_wasm_stack(MAX_WASM_STACK);
    c.cranelift_opt_level(OptLevel::Speed);
    // Compile on the calling thread only: the sandbox compiles on a thread at idle priority,
    // and a parallel pool would run Cranelift at normal priority. Codegen is unaffected.
    c.parallel_compilation(false);
    Ok(c)
}

/// The determinism settings as a stable string (this release's, see [`tasks::release`]).
pub fn settings(deterministic: bool) -> String {
    tasks::release::settings(deterministic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn determinism_switch_changes_the_fingerprint() {
        const REST: &str = "relaxed-simd-det,no-threads,no-gc,no-exceptions,no-function-refs,fuel,fuel-call=preserve-all,fuel-vmctx=slot,latch-counters=rebased,latch-carried=first,no-epoch,stack=524288,clock=fixed,random=blake3-xof2,hostcall-fuel=1,poll=virtual,abi=wasip1,peergrid=1";
        let (_, on) = build(true).unwrap();
        let (_, off) = build(false).unwrap();
        // What coordinators admit for the native class by default names this baseline.
        assert_eq!(BASELINE.name, tasks::release::BASELINE_NAME);
        assert_eq!(off.arch, tasks::release::native_arch());
        // Exactly one component differs, and it names the NaN setting each way.
        assert_eq!(on.settings, format!("nan-canon,{REST}"));
        assert_eq!(off.settings, format!("no-nan-canon,{REST}"));
        assert_eq!(on.settings, settings(true));
        assert_eq!(off.settings, settings(false));
        let arch = format!(
            "{}-{} isa={}",
            std::env::consts::ARCH,
            std::env::consts::OS,
            BASELINE.name
        );
        for fp in [&on, &off] {
            assert_eq!(fp.engine, ENGINE);
            assert_eq!(fp.arch, arch);
        }
        assert_ne!(on, off);
        assert_eq!(on, build(true).unwrap().1, "the fingerprint is stable");
    }

    /// `fuel-call=preserve-all` in the settings is true of the code: the fuel check calls
    /// `out_of_gas` through the register-preserving trampoline of our patched Cranelift
    /// integration (third_party/README.md), never through the ordinary one. Fails if the
    /// workspace builds against stock wasmtime (the `[patch.crates-io]` entry lost).
    #[test]
    fn fuel_checks_call_out_of_gas_through_the_preserving_trampoline() {
        let (engine, _) = build(false).unwrap();
        let wasm = wat::parse_str(
            r#"(module (func (export "_start") (local i32)
                (loop (local.set 0 (i32.add (local.get 0) (i32.const 1)))
                      (br_if 0 (i32.lt_u (local.get 0) (i32.const 1000))))))"#,
        )
        .unwrap();
        let code = engine.precompile_module(&wasm).unwrap();
        let has = |name: &[u8]| code.windows(name.len()).any(|w| w == name);
        assert!(has(b"wasmtime_patchable_builtin_out_of_gas"));
        assert!(!has(b"wasmtime_builtin_out_of_gas"));
    }

    #[test]
    fn proposals_left_off_are_refused() {
        let (engine, _) = build(true).unwrap();
        let compiles = |wat: &str| wasmtime::Module::new(&engine, wat::parse_str(wat).unwrap());
        // What a wasm32-wasip1 toolchain emits (bulk memory, SIMD, multi-value) compiles.
        compiles(
            r#"(module (memory 1)
                (func (result i32 i32)
                    (memory.fill (i32.const 0) (i32.const 1) (i32.const 8))
                    (drop (i8x16.splat (i32.const 1)))
                    (i32.const 1) (i32.const 2)))"#,
        )
        .expect("an ordinary module compiles");
        // Each refused for the proposal being off (the error names it).
        for (proposal, wat) in [
            ("threads", "(module (memory 1 1 shared))"),
            ("gc", "(module (type (struct)))"),
            ("gc", "(module (rec (type (func)) (type (func))))"),
            ("exceptions", "(module (tag))"),
            (
                "function references",
                "(module (type $t (func)) (func (param (ref null $t))))",
            ),
        ] {
            let e = compiles(wat).expect_err(wat);
            assert!(format!("{e:#}").contains(proposal), "{wat}: {e:#}");
        }
    }

    #[test]
    fn engine_name_is_the_locked_wasmtime_version() {
        let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))
            .expect("the workspace's Cargo.lock");
        let version = lock
            .split("[[package]]")
            .find_map(|p| {
                let mut lines = p.trim().lines();
                (lines.next()? == "name = \"wasmtime\"").then(|| lines.next())?
            })
            .and_then(|l| l.strip_prefix("version = \""))
            .and_then(|v| v.strip_suffix('"'))
            .expect("wasmtime in Cargo.lock");
        assert_eq!(ENGINE, format!("wasmtime {version}"));
    }
}
