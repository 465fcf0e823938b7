//! The engine this release's workers run, named the way their fingerprints name it: what a
//! coordinator of the same release accepts by default (`coordinator serve`'s `[engines]`).
//!
//! A fingerprint is a worker's own claim. Results are compared only within one engine class
//! ([`EngineFingerprint::class_id`]), so a group of colluders that invented an engine of
//! their own would only ever be compared with each other: the coordinator therefore accepts
//! the engines its operator names (by default this release's), with this release's settings.

use crate::EngineFingerprint;

/// The wasmtime this release's worker is built with (the worker's tests check it against
/// the version it links).
pub const ENGINE: &str = "wasmtime 48.0.8";

/// Maximum wasm stack of the sandbox: fixed, so where unbounded recursion overflows is
/// deterministic (part of the settings string).
pub const MAX_WASM_STACK: usize = 512 * 1024;

/// The sandbox's determinism settings as a stable string; `deterministic = false` only turns
/// NaN canonicalization off. `no-epoch`: fuel is the only check compiled into the guest's
/// code (workers of earlier builds also compiled epoch checks, which changes the machine
/// code, so the two never compare results). `fuel-call=preserve-all`: the fuel check calls
/// wasmtime's `out_of_gas` through a register-preserving trampoline (our patch of wasmtime's
/// Cranelift integration, `third_party/README.md`), which changes the machine code of every
/// loop. `fuel-vmctx=slot`: that call's cold path takes `vmctx` from a stack slot (the same
/// patch), so no register is held for it through a loop. `latch-counters=rebased`: after
/// Cranelift's mid-end, a loop counter's compare and exit values are rewritten in terms of
/// its incremented value (a third patch, `third_party/README.md`), which changes the machine
/// code of loop latches. `latch-carried=first`: commutative operations on a loop-carried
/// value (a reduction's accumulator) take it as their first operand (the same patch), so the
/// result stays in its register. `peergrid=1`: the guest may import the checkpoint API
/// (docs/guest-abi.md); a worker without it would call such a module `invalid_module`, so
/// the two never compare results.
pub fn settings(deterministic: bool) -> String {
    let nan = if deterministic {
        "nan-canon"
    } else {
        "no-nan-canon"
    };
    format!(
        "{nan},relaxed-simd-det,no-threads,no-gc,no-exceptions,no-function-refs,fuel,fuel-call=preserve-all,fuel-vmctx=slot,latch-counters=rebased,latch-carried=first,no-epoch,stack={MAX_WASM_STACK},clock=fixed,random=blake3-xof2,hostcall-fuel=1,poll=virtual,abi=wasip1,peergrid=1"
    )
}

/// The name of the fixed ISA baseline this release's workers compile for on this build's
/// architecture (the worker's `sandbox::engine::BASELINE`, whose tests check the two agree).
pub const BASELINE_NAME: &str = if cfg!(target_arch = "x86_64") {
    "x86-64-v2"
} else if cfg!(target_arch = "aarch64") {
    "armv8.0-a"
} else {
    "undefined"
};

/// The `arch` a worker built like this program names in its fingerprint: architecture, OS
/// and ISA baseline (`x86_64-linux isa=x86-64-v2`). What `coordinator serve` admits for the
/// `native` determinism class by default.
pub fn native_arch() -> String {
    format!(
        "{}-{} isa={BASELINE_NAME}",
        std::env::consts::ARCH,
        std::env::consts::OS
    )
}

/// Whether `fp` is an engine in `engines` running with one of this release's settings.
pub fn accepted(fp: &EngineFingerprint, engines: &[String]) -> bool {
    engines.contains(&fp.engine)
        && (fp.settings == settings(true) || fp.settings == settings(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MAX_HELLO_TEXT;

    /// Coordinators refuse a Hello whose fingerprint fields are longer than `MAX_HELLO_TEXT`:
    /// this release's own must fit, with room left for the settings later releases add.
    #[test]
    fn own_fingerprint_fits_in_a_hello_with_room_to_grow() {
        for text in [
            settings(true),
            settings(false),
            ENGINE.to_string(),
            native_arch(),
        ] {
            assert!(
                text.len() <= MAX_HELLO_TEXT / 2,
                "{} bytes, more than half of MAX_HELLO_TEXT ({MAX_HELLO_TEXT}): {text}",
                text.len()
            );
        }
    }
}
