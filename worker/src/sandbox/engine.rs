//! The wasmtime engine configuration, the fingerprint that names it, and the epoch ticker.
//!
//! Every setting that can change a result is fixed here and listed in the fingerprint's
//! `settings`, so two workers compare results only when they would compute them alike.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tasks::EngineFingerprint;
use wasmtime::{Config, Engine, OptLevel};

use super::SandboxError;

/// The wasmtime this worker is built with (kept in step with Cargo.lock): this release's
/// engine as coordinators know it.
pub use tasks::release::ENGINE;

/// Maximum wasm stack: fixed, so where unbounded recursion overflows is deterministic.
pub use tasks::release::MAX_WASM_STACK;

/// How often the epoch advances: the latency of pause, cancel and the CPU duty cycle.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Build the engine. `deterministic = false` only turns NaN canonicalization off.
pub fn build(deterministic: bool) -> Result<(Engine, EngineFingerprint), SandboxError> {
    let mut c = Config::new();
    // Budget by instructions, not time: fuel is deterministic; epochs only pause/cancel.
    // Wasmtime 48's default costs: 1 per operator, plus 1 per byte or element for
    // `memory.fill/copy/init` and `table.fill/copy/init/grow` (38 charged those 1 each).
    c.consume_fuel(true);
    c.epoch_interruption(true);
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
    let engine = Engine::new(&c).map_err(|e| SandboxError::Engine(format!("{e:#}")))?;
    let fingerprint = EngineFingerprint {
        engine: ENGINE.to_string(),
        arch: format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
        settings: settings(deterministic),
    };
    Ok((engine, fingerprint))
}

/// The determinism settings as a stable string (this release's, see [`tasks::release`]).
pub fn settings(deterministic: bool) -> String {
    tasks::release::settings(deterministic)
}

/// A background thread that advances the engine's epoch every [`EPOCH_TICK`] while at least
/// one run is active, so running guests reach the epoch callback (pause, cancel, throttle).
/// Epoch checks never touch fuel, so they cannot change a result.
pub struct EpochTicker {
    shared: Arc<TickerShared>,
    thread: Option<JoinHandle<()>>,
}

struct TickerShared {
    active: AtomicUsize,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

/// Keeps the ticker running while alive.
pub struct ActiveRun<'a>(&'a TickerShared);

impl Drop for ActiveRun<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl EpochTicker {
    pub fn start(engine: &Engine) -> EpochTicker {
        let shared = Arc::new(TickerShared {
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let weak = engine.weak();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || loop {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                if s.active.load(Ordering::SeqCst) == 0 {
                    // Idle: sleep until a run starts (the timeout guards a missed wake-up).
                    let g = s.lock.lock().expect("ticker lock poisoned");
                    let _ = s.wake.wait_timeout(g, Duration::from_millis(200));
                    continue;
                }
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            })
            .expect("spawn the epoch ticker thread");
        EpochTicker {
            shared,
            thread: Some(thread),
        }
    }

    /// Mark a run as active for the guard's lifetime.
    pub fn activate(&self) -> ActiveRun<'_> {
        if self.shared.active.fetch_add(1, Ordering::SeqCst) == 0 {
            let _g = self.shared.lock.lock().expect("ticker lock poisoned");
            self.shared.wake.notify_all();
        }
        ActiveRun(&self.shared)
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().expect("ticker lock poisoned");
            self.shared.wake.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn determinism_switch_changes_the_fingerprint() {
        const REST: &str = "relaxed-simd-det,no-threads,no-gc,no-exceptions,no-function-refs,fuel,stack=524288,clock=fixed,random=blake3-xof2,hostcall-fuel=1,poll=virtual,abi=wasip1,peergrid=1";
        let (_, on) = build(true).unwrap();
        let (_, off) = build(false).unwrap();
        // Exactly one component differs, and it names the NaN setting each way.
        assert_eq!(on.settings, format!("nan-canon,{REST}"));
        assert_eq!(off.settings, format!("no-nan-canon,{REST}"));
        assert_eq!(on.settings, settings(true));
        assert_eq!(off.settings, settings(false));
        let arch = format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS);
        for fp in [&on, &off] {
            assert_eq!(fp.engine, ENGINE);
            assert_eq!(fp.arch, arch);
        }
        assert_ne!(on, off);
        assert_eq!(on, build(true).unwrap().1, "the fingerprint is stable");
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
